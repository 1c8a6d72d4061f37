"""The bounce mailbox over IMAP (stdlib imaplib): connect with TLS, read sizes and bodies by UID without
setting \\Seen (BODY.PEEK), and mark or move only the UIDs it is given."""
from __future__ import annotations

import base64
import imaplib
import re
import ssl
from dataclasses import dataclass

from config import mask

_FETCH_UID = re.compile(rb"\bUID (\d+)")
_FETCH_SIZE = re.compile(rb"\bRFC822\.SIZE (\d+)")


class MailboxError(Exception):
    """The mailbox cannot be read or changed right now; the message names the cause (never the password)."""


@dataclass(frozen=True)
class Selected:
    """The folder as SELECT reported it."""

    uidvalidity: int
    uidnext: int  # every message that arrives later gets a UID from this one on
    exists: int


def quote(name: str) -> str:
    """A mailbox name as an IMAP quoted string, in modified UTF-7 (RFC 3501 5.1.3: 退信 is &kABP4Q-)."""
    encoded, pending = [], []

    def flush():
        if pending:
            raw = "".join(pending).encode("utf-16-be")
            encoded.append("&" + base64.b64encode(raw).decode().rstrip("=").replace("/", ",") + "-")
            pending.clear()
    for ch in name:
        if 0x20 <= ord(ch) <= 0x7e:
            flush()
            encoded.append("&-" if ch == "&" else ch)
        else:
            pending.append(ch)
    flush()
    text = "".join(encoded)
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


class Mailbox:
    """One logged-in IMAP session on the folder of BOUNCE_IMAP_URL. `with Mailbox(settings) as box:`."""

    def __init__(self, settings, timeout: float | None = None):
        self.settings = settings
        self.url = settings.bounce_imap
        self.timeout = timeout or settings.smtp_timeout
        self.client: imaplib.IMAP4 | None = None
        self.capabilities: set[str] = set()

    def __enter__(self) -> "Mailbox":
        self.connect()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def connect(self) -> None:
        """Connect (implicit TLS, or STARTTLS which must succeed before the password is sent) and log in."""
        url, where = self.url, f"{self.url.host}:{self.url.port}"
        context = ssl.create_default_context(cafile=self.settings.smtp_ca_file)
        try:
            if url.implicit_tls:
                self.client = imaplib.IMAP4_SSL(url.host, url.port, ssl_context=context, timeout=self.timeout)
            else:
                self.client = imaplib.IMAP4(url.host, url.port, timeout=self.timeout)
                if "STARTTLS" not in self.client.capabilities:
                    raise MailboxError(f"the IMAP server {where} does not offer STARTTLS, and the password is "
                                       "never sent in clear: use imaps:// (port 993) in BOUNCE_IMAP_URL")
                self.client.starttls(context)
            self.client.login(url.user, self.settings.bounce_imap_password)
            # What the server offers once logged in (MOVE, UIDPLUS) may differ from its greeting's list.
            status, data = self.client.capability()
            listed = data[0].decode(errors="replace").split() if status == "OK" and data and data[0] else []
            self.capabilities = {c.upper() for c in (*self.client.capabilities, *listed)}
        except MailboxError:
            self.close()
            raise
        except ssl.SSLCertVerificationError as exc:
            self.close()
            trust = f"SMTP_CA_FILE={self.settings.smtp_ca_file}" if self.settings.smtp_ca_file else \
                "the system trust store"
            raise MailboxError(f"the IMAP server {where}'s certificate was refused ({exc.verify_message}), checked "
                               f"against {trust}: for a private CA set SMTP_CA_FILE") from None
        except imaplib.IMAP4.error as exc:
            self.close()
            raise MailboxError(f"the IMAP server {where} refused the login of {url.user}: "
                               f"{self._text(exc)} (check BOUNCE_IMAP_PASSWORD)") from None
        except (OSError, EOFError) as exc:
            self.close()
            raise MailboxError(f"cannot reach the IMAP server {where}: {self._text(exc) or type(exc).__name__}") \
                from None

    def close(self) -> None:
        """Log out (best effort) and drop the connection."""
        client, self.client = self.client, None
        if client is None:
            return
        try:
            if client.state == "SELECTED":
                client.close()  # no EXPUNGE: CLOSE only removes what we flagged \Deleted, i.e. nothing else
        except (imaplib.IMAP4.error, OSError, EOFError):
            pass
        try:
            client.logout()
        except (imaplib.IMAP4.error, OSError, EOFError):
            pass

    def _text(self, exc: BaseException) -> str:
        """An error's text without the password."""
        text = " ".join(str(a.decode(errors="replace") if isinstance(a, bytes) else a) for a in exc.args) or str(exc)
        return mask(text, self.settings)[:300]

    def _call(self, what: str, fn, *args):
        """Run one command; NO/BAD and a broken connection become MailboxError naming the command."""
        try:
            status, data = fn(*args)
        except (imaplib.IMAP4.abort, OSError, EOFError) as exc:
            raise MailboxError(f"the connection to the IMAP server broke during {what}: "
                               f"{self._text(exc) or type(exc).__name__}") from None
        except imaplib.IMAP4.error as exc:
            raise MailboxError(f"the IMAP server refused {what}: {self._text(exc)}") from None
        if status != "OK":
            detail = b" ".join(d for d in data if isinstance(d, bytes)).decode(errors="replace")
            raise MailboxError(f"the IMAP server refused {what}: {status} {mask(detail, self.settings)[:300]}")
        return data

    # -- reading -----------------------------------------------------------------------------------

    def select(self, folder: str, readonly: bool = False) -> Selected:
        """SELECT `folder` (read-write: processed bounces get flags; `readonly`: EXAMINE, which changes
        nothing); its UIDVALIDITY, UIDNEXT and size."""
        data = self._call(f"SELECT {folder}", self.client.select, quote(folder), readonly)
        responses = self.client.untagged_responses
        validity = responses.get("UIDVALIDITY", [None])[-1]
        uidnext = responses.get("UIDNEXT", [None])[-1]
        if validity is None or uidnext is None:  # RFC 3501 requires both in the answer to SELECT
            raise MailboxError(f"the IMAP server gave no UIDVALIDITY or UIDNEXT for {folder}: it cannot be "
                               "polled safely")
        return Selected(int(validity), int(uidnext), int(data[0] or 0))

    def sizes(self, first: int, last: int) -> list[tuple[int, int]]:
        """(UID, RFC822.SIZE) of the messages with first <= UID <= last, by UID."""
        found = {}
        span = f"{first}:{last}"
        for item in self._call(f"UID FETCH {span} RFC822.SIZE", self.client.uid, "FETCH", span, "(UID RFC822.SIZE)"):
            line = item[0] if isinstance(item, tuple) else item
            uid, size = _FETCH_UID.search(line or b""), _FETCH_SIZE.search(line or b"")
            if uid and size and first <= int(uid.group(1)) <= last:
                found[int(uid.group(1))] = int(size.group(1))
        return sorted(found.items())

    def bodies(self, uids: list[int], limit: int | None = None) -> dict[int, bytes]:
        """The raw messages of `uids` (the first `limit` bytes of each when given), without setting \\Seen."""
        part = f"BODY.PEEK[]<0.{limit}>" if limit else "BODY.PEEK[]"
        found, pending_uid = {}, None
        data = self._call(f"UID FETCH {_set(uids)} BODY", self.client.uid, "FETCH", _set(uids), f"(UID {part})")
        for item in data:
            if isinstance(item, tuple):
                uid = _FETCH_UID.search(item[0])
                pending_uid = None
                if uid:
                    found[int(uid.group(1))] = item[1]
                else:  # a server that puts UID after the literal: the closing line names it
                    pending_uid = item[1]
            elif pending_uid is not None and item:
                uid = _FETCH_UID.search(item)
                if uid:
                    found[int(uid.group(1))] = pending_uid
                pending_uid = None
        return {uid: found[uid] for uid in uids if uid in found}

    # -- changing (processed bounces only) ------------------------------------------------------------

    def mark_seen(self, uids: list[int]) -> None:
        """Set \\Seen on exactly these UIDs."""
        self._call("UID STORE +FLAGS (\\Seen)", self.client.uid, "STORE", _set(uids), "+FLAGS.SILENT", r"(\Seen)")

    def move(self, uids: list[int], folder: str) -> bool:
        """Move these UIDs to `folder` (created when missing): UID MOVE, else COPY + \\Deleted + UID EXPUNGE of
        only these UIDs (UIDPLUS). False when the server can do neither: they stay, copied and \\Seen."""
        target = quote(folder)
        if "MOVE" in self.capabilities:
            self._with_create(folder, lambda: self._call(f"UID MOVE to {folder}", self.client.uid, "MOVE",
                                                         _set(uids), target))
            return True
        self._with_create(folder, lambda: self._call(f"UID COPY to {folder}", self.client.uid, "COPY",
                                                     _set(uids), target))
        if "UIDPLUS" not in self.capabilities:
            return False  # a plain EXPUNGE would also remove what the mailbox's owner flagged \Deleted
        self._call("UID STORE +FLAGS (\\Deleted)", self.client.uid, "STORE", _set(uids), "+FLAGS.SILENT",
                   r"(\Deleted)")
        self._call("UID EXPUNGE", self.client.uid, "EXPUNGE", _set(uids))
        return True

    def _with_create(self, folder: str, command) -> None:
        try:
            command()
        except MailboxError as exc:
            if "TRYCREATE" not in str(exc).upper():
                raise
            try:
                self._call(f"CREATE {folder}", self.client.create, quote(folder))
            except MailboxError as created:
                if "ALREADYEXISTS" not in str(created).upper():
                    raise
            command()


def _set(uids: list[int]) -> str:
    """A UID set, runs collapsed (5:9,12): short commands for long batches."""
    runs, start, prev = [], None, None
    for uid in sorted(uids):
        if start is None:
            start = prev = uid
        elif uid == prev + 1:
            prev = uid
        else:
            runs.append(f"{start}:{prev}" if prev != start else str(start))
            start = prev = uid
    if start is not None:
        runs.append(f"{start}:{prev}" if prev != start else str(start))
    return ",".join(runs)
