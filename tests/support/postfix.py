"""A private Postfix for tests: SMTP on 127.0.0.1:<free port>, its own config, queue and data directories in a
temporary directory, and virtual(8) mailboxes written into the Maildirs a tests/support/dovecot.py serves.

What it does with mail, by recipient domain:
- `bounce.test` and `corp.test`: final delivery into the Maildirs of the listed mailboxes; a recipient that
  is not listed is accepted at RCPT and refused by virtual(8), so Postfix itself writes the DSN (RFC 3464)
  to the envelope sender (`recipient_delimiter = +`: bounces+<tag>@bounce.test lands in bounces@).
- `refused.test`: refused at RCPT (reject_unlisted_recipient: `550 5.1.1 … User unknown`), the send-time path.
- any domain given in `relays`: relayed to a stand-in remote server on 127.0.0.1 (e.g. one answering QQ's
  `550 Connection frequency limited`), whose refusal Postfix turns into a DSN as well.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
from pathlib import Path

from devtools.ports import free_port
from devtools.waiting import wait_until
from support.dovecot import MAIL_UID, chown_mail_tree, private_directory

POSTFIX_HINT = "postfix is not installed: apt-get install --no-install-recommends postfix (.ci/run installs it)"
LOCAL_DOMAINS = ("bounce.test", "corp.test", "refused.test")

MASTER_CF = """\
{listen} inet n - n - - smtpd
pickup     unix n - n 60 1 pickup
cleanup    unix n - n -  0 cleanup
qmgr       unix n - n 300 1 qmgr
rewrite    unix - - n -  - trivial-rewrite
bounce     unix - - n -  0 bounce
defer      unix - - n -  0 bounce
trace      unix - - n -  0 bounce
verify     unix - - n -  1 verify
flush      unix n - n 1000? 0 flush
proxymap   unix - - n -  - proxymap
proxywrite unix - - n -  1 proxymap
smtp       unix - - n -  - smtp
relay      unix - - n -  - smtp
showq      unix n - n -  - showq
error      unix - - n -  - error
retry      unix - - n -  - error
discard    unix - - n -  - discard
virtual    unix - n n -  - virtual
anvil      unix - - n -  1 anvil
scache     unix - - n -  1 scache
postlog    unix-dgram n - n - 1 postlogd
"""


def postfix_binary() -> str | None:
    return shutil.which("postfix") or shutil.which("postfix", path="/usr/sbin:/usr/local/sbin")


class Postfix:
    """`with Postfix(dovecot, mailboxes=[...], relays={"qq.test": port}) as mta:` send to 127.0.0.1:mta.port."""

    def __init__(self, dovecot, mailboxes=(), relays: dict[str, int] | None = None, **main_cf: str):
        self.directory = private_directory("wm-postfix-")
        self.port = free_port()
        self.dovecot = dovecot
        self.mailboxes = tuple(dict.fromkeys((*dovecot.users, *mailboxes)))
        self.relays = dict(relays or {})
        self.main_cf = main_cf  # more main.cf settings, e.g. maximal_queue_lifetime="0" (a 4xx bounces at once)

    def _write_config(self) -> None:
        d = self.directory
        (d / "data").mkdir()
        (d / "queue").mkdir()
        shutil.chown(d / "data", "postfix")  # Postfix's own databases (verify, scache) live there
        mail_root = self.dovecot.mail_root
        rows = []
        for address in self.mailboxes:
            maildir = self.dovecot.maildir(address)
            for part in ("cur", "new", "tmp"):
                (maildir / part).mkdir(parents=True, exist_ok=True)
            rows.append(f"{address} {maildir.relative_to(mail_root)}/")
        chown_mail_tree(mail_root)
        (d / "mailboxes").write_text("\n".join(rows) + "\n")
        (d / "transport").write_text("".join(f"{domain} smtp:[127.0.0.1]:{port}\n"
                                             for domain, port in self.relays.items()) or "# none\n")
        (d / "rcpt_access").write_text("refused.test reject_unlisted_recipient\n")
        (d / "main.cf").write_text(f"""
compatibility_level = 3.6
queue_directory = {d}/queue
data_directory = {d}/data
mail_owner = postfix
setgid_group = postdrop
myhostname = mx.postfix.test
mydomain = postfix.test
myorigin = $myhostname
mydestination =
local_recipient_maps =
alias_maps =
alias_database =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
smtpd_recipient_restrictions = check_recipient_access texthash:{d}/rcpt_access
smtpd_reject_unlisted_recipient = no
virtual_mailbox_domains = {", ".join(LOCAL_DOMAINS)}
virtual_mailbox_base = {mail_root}
virtual_mailbox_maps = texthash:{d}/mailboxes
virtual_uid_maps = static:{MAIL_UID}
virtual_gid_maps = static:{MAIL_UID}
virtual_minimum_uid = 100
recipient_delimiter = +
transport_maps = texthash:{d}/transport
smtp_host_lookup = native
smtp_connect_timeout = 5s
maillog_file = {d}/maillog
maillog_file_prefixes = {d}
queue_run_delay = 1s
minimal_backoff_time = 1s
maximal_backoff_time = 2s
delay_warning_time = 0
biff = no
smtputf8_enable = no
""" + "".join(f"{name} = {value}\n" for name, value in self.main_cf.items()))
        (d / "master.cf").write_text(MASTER_CF.format(listen=f"127.0.0.1:{self.port}"))

    def _postfix(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        done = subprocess.run([postfix_binary(), "-c", str(self.directory), *args], capture_output=True,
                              text=True, timeout=60)
        if check:
            assert done.returncode == 0, f"postfix {' '.join(args)} failed:\n{done.stdout}{done.stderr}\n{self.log}"
        return done

    def __enter__(self) -> "Postfix":
        self._write_config()
        self._postfix("check")
        self._postfix("start")
        wait_until(self._listening, timeout=30, what="postfix to listen")
        return self

    def _listening(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                return sock.recv(200).startswith(b"220")
        except OSError:
            return False

    @property
    def log(self) -> str:
        path = self.directory / "maillog"
        return path.read_text(errors="replace") if path.exists() else ""

    def env(self, **more) -> dict[str, str]:
        """The service's SMTP settings that send through this Postfix."""
        return {"MAIL_BACKEND": "smtp", "SMTP_HOST": "127.0.0.1", "SMTP_PORT": str(self.port),
                "SMTP_SECURITY": "none", "SMTP_TIMEOUT_SECONDS": "10", **{k: str(v) for k, v in more.items()}}

    def delivered(self, address: str) -> list[Path]:
        """The message files virtual(8) wrote into `address`'s Maildir (new/ and cur/)."""
        maildir = self.dovecot.maildir(address)
        return sorted([*maildir.glob("new/*"), *maildir.glob("cur/*")])

    def __exit__(self, *exc) -> None:
        self._postfix("stop", check=False)
        pid_file = self.directory / "queue" / "pid" / "master.pid"
        wait_until(lambda: not _master_alive(pid_file), timeout=20, what="postfix to stop")
        shutil.rmtree(self.directory, ignore_errors=True)


def _master_alive(pid_file: Path) -> bool:
    try:
        pid = int(pid_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return False
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
