"""`check`'s line about the bounce mailbox: can we log in and open the folder, where the poll stands, and
how its last poll went. Read-only (EXAMINE): checking changes nothing in the mailbox."""
from __future__ import annotations

import time

from sqlalchemy.exc import DBAPIError

from bounces.imap import Mailbox, MailboxError
from bounces.intake import LEASE
from store import leases, mailbox


def mailbox_line(settings, engine) -> tuple[bool, str]:
    """(ok, line) for BOUNCE_IMAP_URL; `engine` None when the state database is not reachable."""
    url = settings.bounce_imap
    where = f"bounce mailbox {url.key}"
    try:
        with Mailbox(settings) as box:
            selected = box.select(url.folder, readonly=True)
            moves = "MOVE" if "MOVE" in box.capabilities else "UIDPLUS" if "UIDPLUS" in box.capabilities else None
    except MailboxError as exc:
        return False, f"{where}: {exc}"
    parts = [f"logged in ({'implicit TLS' if url.implicit_tls else 'STARTTLS'}), {selected.exists} message(s)"]
    if settings.bounce_imap_done_folder:
        parts.append(f"reports are moved to {settings.bounce_imap_done_folder}" if moves else
                     f"the server has neither MOVE nor UIDPLUS: reports are copied to "
                     f"{settings.bounce_imap_done_folder} and stay, marked \\Seen")
    parts.append("polled every %g s" % settings.bounce_poll_seconds if settings.bounce_poll_seconds else
                 "BOUNCE_POLL_SECONDS=0: not polled (the `bounces` command still works)")
    if engine is not None:
        try:
            position, turn = mailbox.position(engine, url.key), leases.last_turn(engine, LEASE)
        except DBAPIError as exc:
            return False, f"{where}: {exc.orig.__class__.__name__} reading where the poll stands"
        if position is None or position.uidvalidity != selected.uidvalidity:
            parts.append("not read yet" if position is None else "UIDVALIDITY changed: the next poll reads it again")
        else:
            parts.append(f"read up to UID {position.last_uid} of {selected.uidnext - 1}")
        if turn is not None and turn.last_outcome:
            ago = time.time() - (turn.last_run_at or 0)
            parts.append(f"last poll {ago:.0f} s ago: {turn.last_outcome}")
            if turn.last_outcome.startswith("failed"):
                return False, f"{where}: " + "; ".join(parts)
    return True, f"{where}: " + "; ".join(parts)
