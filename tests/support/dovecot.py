"""A private Dovecot for tests: IMAP on 127.0.0.1 (STARTTLS and implicit TLS), one passwd-file user per
mailbox, Maildirs in a temporary directory (Postfix's virtual delivery writes into the same Maildirs).

The certificate comes from a throwaway CA (trustme, built on `cryptography`); its PEM is `ca_file`, which
the service trusts through SMTP_CA_FILE (the one CA setting it has for its mail servers).
"""
from __future__ import annotations

import imaplib
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
from pathlib import Path

from bounces.imap import quote
from devtools.ports import free_ports
from devtools.waiting import wait_until

DOVECOT_HINT = "dovecot is not installed: apt-get install --no-install-recommends dovecot-imapd (.ci/run installs it)"
MAIL_UID = 65534  # nobody/nogroup: Dovecot refuses root as a mail user, Postfix's virtual(8) too
PASSWORD = "imap-test-password"


def skip_without_mail_servers(*, postfix: bool = False):
    """Skip (fail under REQUIRE_MAIL_SERVERS=1, as .ci/run sets) when Dovecot, or Postfix, is not installed."""
    import pytest

    from support.postfix import POSTFIX_HINT, postfix_binary

    missing = [hint for hint, found in ((DOVECOT_HINT, dovecot_binary()),
                                        (POSTFIX_HINT, postfix_binary() if postfix else True)) if not found]
    if missing:
        if os.environ.get("REQUIRE_MAIL_SERVERS") == "1":
            pytest.fail("REQUIRE_MAIL_SERVERS=1 but " + "; ".join(missing))
        pytest.skip("; ".join(missing))


def dovecot_binary() -> str | None:
    return shutil.which("dovecot") or shutil.which("dovecot", path="/usr/sbin:/usr/local/sbin")


def private_directory(prefix: str) -> Path:
    """A directory the daemons' unprivileged users can enter (pytest's tmp_path is 0700 root)."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o755)
    return path


class Dovecot:
    """`with Dovecot(ca) as imap:` users are `<local>@<domain>`, their Maildir is `maildir(address)`."""

    def __init__(self, ca, users=("bounces@bounce.test",), directory: Path | None = None):
        self.directory = directory or private_directory("wm-dovecot-")
        self.owns_directory = directory is None
        self.mail_root = self.directory / "mail"
        self.port, self.imaps_port = free_ports(2)
        self.users = tuple(users)
        self.ca_file = self.directory / "ca.pem"
        ca.cert_pem.write_to_path(str(self.ca_file))
        issued = ca.issue_cert("127.0.0.1", "localhost")
        issued.private_key_pem.write_to_path(str(self.directory / "key.pem"))
        issued.cert_chain_pems[0].write_to_path(str(self.directory / "cert.pem"))
        self.proc: subprocess.Popen | None = None

    # -- layout ------------------------------------------------------------------------------

    def home(self, address: str) -> Path:
        local, domain = address.split("@")
        return self.mail_root / domain / local

    def maildir(self, address: str) -> Path:
        return self.home(address) / "Maildir"

    def _write_config(self) -> Path:
        d = self.directory
        for sub in ("run", "state"):
            (d / sub).mkdir(exist_ok=True)
        lines = []
        for address in self.users:
            home = self.home(address)
            for part in ("cur", "new", "tmp"):
                (home / "Maildir" / part).mkdir(parents=True, exist_ok=True)
            lines.append(f"{address}:{{PLAIN}}{PASSWORD}:{MAIL_UID}:{MAIL_UID}::{home}::")
        (d / "users").write_text("\n".join(lines) + "\n")
        chown_mail_tree(self.mail_root)
        conf = d / "dovecot.conf"
        conf.write_text(f"""
base_dir = {d}/run
state_dir = {d}/state
log_path = {d}/dovecot.log
instance_name = wm-dovecot-{self.port}
protocols = imap
listen = 127.0.0.1
ssl = required
ssl_cert = <{d}/cert.pem
ssl_key = <{d}/key.pem
disable_plaintext_auth = yes
auth_mechanisms = plain login
first_valid_uid = 100
mail_location = maildir:~/Maildir
default_internal_user = dovecot
default_login_user = dovenull
passdb {{
  driver = passwd-file
  args = {d}/users
}}
userdb {{
  driver = passwd-file
  args = {d}/users
}}
namespace inbox {{
  inbox = yes
  separator = /
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {self.port}
  }}
  inet_listener imaps {{
    address = 127.0.0.1
    port = {self.imaps_port}
    ssl = yes
  }}
}}
service stats {{
  unix_listener stats-reader {{
    mode = 0666
  }}
  unix_listener stats-writer {{
    mode = 0666
  }}
}}
""")
        return conf

    # -- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> "Dovecot":
        conf = self._write_config()
        self.proc = subprocess.Popen([dovecot_binary(), "-F", "-c", str(conf)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_until(self._listening, timeout=20, what="dovecot to listen")
        return self

    def _listening(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"dovecot exited: {self.proc.stderr.read().decode(errors='replace')}\n{self.log}")
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                return sock.recv(200).startswith(b"* OK")
        except OSError:
            return False

    @property
    def log(self) -> str:
        path = self.directory / "dovecot.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def __exit__(self, *exc) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if self.owns_directory:
            shutil.rmtree(self.directory, ignore_errors=True)

    # -- what tests need -----------------------------------------------------------------------

    def url(self, address: str = "bounces@bounce.test", folder: str = "INBOX", implicit_tls: bool = False) -> str:
        """BOUNCE_IMAP_URL for `address`'s `folder` (STARTTLS by default)."""
        scheme, port = ("imaps", self.imaps_port) if implicit_tls else ("imap", self.port)
        return f"{scheme}://{address}@127.0.0.1:{port}/{folder}"

    def env(self, address: str = "bounces@bounce.test", folder: str = "INBOX", **more) -> dict[str, str]:
        """The service's settings that read this mailbox."""
        return {"BOUNCE_IMAP_URL": self.url(address, folder), "BOUNCE_IMAP_PASSWORD": PASSWORD,
                "SMTP_CA_FILE": str(self.ca_file), **{k: str(v) for k, v in more.items()}}

    def connect(self, address: str = "bounces@bounce.test") -> imaplib.IMAP4:
        """A logged-in client of the test's own (for arranging and inspecting the mailbox)."""
        client = imaplib.IMAP4("127.0.0.1", self.port, timeout=10)
        client.starttls(ssl.create_default_context(cafile=str(self.ca_file)))
        client.login(address, PASSWORD)
        return client

    def append(self, raw: bytes, folder: str = "INBOX", address: str = "bounces@bounce.test",
               flags: str = "") -> None:
        """Put one message into `folder` (created when missing)."""
        client = self.connect(address)
        try:
            client.create(quote(folder))  # NO [ALREADYEXISTS] when it is there
            status, _ = client.append(quote(folder), f"({flags})" if flags else None, None, raw)
            assert status == "OK", f"APPEND refused: {status}"
        finally:
            client.logout()

    def snapshot(self, folder: str = "INBOX", address: str = "bounces@bounce.test") -> dict[int, tuple]:
        """UID → (flags, RFC822.SIZE) of every message in `folder`, read without changing anything."""
        client = self.connect(address)
        try:
            status, _ = client.select(quote(folder), readonly=True)
            if status != "OK":
                return {}
            status, data = client.uid("FETCH", "1:*", "(FLAGS RFC822.SIZE)")
            result = {}
            for line in data:
                if not line:
                    continue
                text = line.decode() if isinstance(line, bytes) else line[0].decode()
                if "UID " not in text:  # Dovecot telling of another session's flag change (`* 2 FETCH (FLAGS
                    continue            # (\\Seen))`) while we read: each answer to our UID FETCH names its UID
                uid = int(text.split("UID ")[1].split()[0].rstrip(")"))
                flags = tuple(sorted(f for f in text.split("FLAGS (")[1].split(")")[0].split() if f != "\\Recent"))
                size = int(text.split("RFC822.SIZE ")[1].split()[0].rstrip(")"))
                result[uid] = (flags, size)
            return result
        finally:
            client.logout()


def chown_mail_tree(root: Path) -> None:
    """Give the Maildirs to the mail user (Dovecot and Postfix's virtual(8) both write there as it)."""
    for dirpath, dirnames, filenames in os.walk(root):
        os.chown(dirpath, MAIL_UID, MAIL_UID)
        for name in filenames:
            os.chown(os.path.join(dirpath, name), MAIL_UID, MAIL_UID)
