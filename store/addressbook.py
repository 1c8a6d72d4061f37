"""Member addresses: WeCom, the service's own address book (CSV import) and a pattern, in configured order."""
from __future__ import annotations

import csv
import io
import time
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from config import Settings
from mailer import address_problem
from store import suppressions
from store.schema import address_book, insert_ignore
from wecom_api import Member

USERID_HEADERS = ("userid", "帐号", "账号")
EMAIL_HEADERS = ("email", "邮箱")
EXPECTED = "a CSV of userid,email (headers userid/帐号/账号 and email/邮箱, or no header row)"
CHUNK = 500  # ids per IN (...) query: well under every driver's parameter limit
MAX_USERID = 64  # WeCom userids are 1-64 bytes; also the column width

@dataclass(frozen=True)
class ImportResult:
    added: int
    updated: int
    rejected: int
    errors: tuple[str, ...]


def _key(userid: str) -> str:
    # WeCom userids are case-insensitive; MariaDB's collation agrees, SQLite's does not, so store lower case.
    return userid.strip().lower()


def _read_rows(path) -> list[tuple[int, list[str]]]:
    """(line number, cells) of each non-blank CSV row, from UTF-8 (BOM or not) or GB18030."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror}; expected {EXPECTED}") from None
    for encoding in ("utf-8-sig", "gb18030"):  # Excel: "CSV UTF-8", then the Chinese Windows default
        try:
            text = data.decode(encoding)
            break
        except UnicodeDecodeError:
            continue
    else:
        raise ValueError(f"{path} is neither UTF-8 nor GB18030 text; expected {EXPECTED}")
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        return [(reader.line_num, row) for row in reader if any(cell.strip() for cell in row)]
    except csv.Error as exc:
        raise ValueError(f"{path} line {reader.line_num} is not valid CSV ({exc}); expected {EXPECTED}") from None


def _columns(first: list[str], path) -> tuple[int, int, bool]:
    """(userid index, email index, first row is a header)."""
    names = [cell.strip().lower() for cell in first]
    userid = next((i for i, n in enumerate(names) if n in USERID_HEADERS), None)
    email = next((i for i, n in enumerate(names) if n in EMAIL_HEADERS), None)
    if userid is not None and email is not None:
        return userid, email, True
    if userid is None and email is None and len(first) >= 2 and "@" in first[1]:
        return 0, 1, False  # no header row: the first row is already data
    raise ValueError(f"{path} has no userid and email columns (first row: {','.join(first)[:80]!r}); "
                     f"expected {EXPECTED}")


def import_csv(engine: Engine, path) -> ImportResult:
    """Upsert the file's userid,email rows into the address book; bad rows are counted, not fatal."""
    rows = _read_rows(path)
    if not rows:
        raise ValueError(f"{path} is empty; expected {EXPECTED}")
    userid_at, email_at, has_header = _columns(rows[0][1], path)
    wanted: dict[str, str] = {}  # a userid listed twice: the later line wins
    errors = []
    for line, cells in rows[1:] if has_header else rows:
        userid = cells[userid_at].strip() if userid_at < len(cells) else ""
        email = cells[email_at].strip() if email_at < len(cells) else ""
        if not userid:
            errors.append(f"line {line}: empty userid")
        elif len(userid.encode("utf-8")) > MAX_USERID:
            errors.append(f"line {line}: userid {userid[:20]!r}… is longer than {MAX_USERID} bytes")
        elif address_problem(email) is not None:
            errors.append(f"line {line}: {email[:80]!r} is not an email address")
        else:
            wanted[_key(userid)] = email
    now = time.time()
    with engine.begin() as conn:
        current = _lookup(conn, list(wanted))
        new = [{"userid": u, "email": e, "updated_at": now} for u, e in wanted.items() if u not in current]
        changed = [{"key": u, "email": e, "updated_at": now}
                   for u, e in wanted.items() if u in current and current[u] != e]
        if new:
            conn.execute(insert_ignore(address_book), new)
        if changed:
            conn.execute(address_book.update().where(address_book.c.userid == sa.bindparam("key"))
                         .values(email=sa.bindparam("email"), updated_at=sa.bindparam("updated_at")), changed)
    return ImportResult(len(new), len(changed), len(errors), tuple(errors))


def _lookup(conn, userids: list[str]) -> dict[str, str]:
    """Address-book emails by (lower-case) userid, one query per CHUNK ids."""
    found = {}
    for start in range(0, len(userids), CHUNK):
        chunk = userids[start:start + CHUNK]
        query = sa.select(address_book.c.userid, address_book.c.email).where(address_book.c.userid.in_(chunk))
        found.update({_key(row.userid): row.email for row in conn.execute(query)})
    return found


@dataclass(frozen=True)
class Choice:
    """A member's address and the EMAIL_SOURCES source it came from; or None with the reason (`no address`,
    or `address suppressed: …` when every address found is suppressed or a guess that bounced)."""
    member: Member
    address: str | None
    source: str | None
    reason: str | None


def choose(settings: Settings, engine: Engine, members: list[Member]) -> list[Choice]:
    """Each member's first valid address along settings.email_sources that is not suppressed (a suppressed one
    falls through to the next source) and, for `pattern`, not a guess that bounced for this member."""
    directory: dict[str, str] = {}
    if "directory" in settings.email_sources and members:
        with engine.connect() as conn:
            directory = _lookup(conn, list(dict.fromkeys(_key(m.userid) for m in members)))
    pattern = settings.email_pattern
    listed = []
    for member in members:
        candidates = {
            "wecom": (member.email, member.biz_mail),
            "directory": (directory.get(_key(member.userid), ""),),
            "pattern": (pattern.replace("{userid}", member.userid) if pattern else "",),
        }
        listed.append((member, [(source, c.strip()) for source in settings.email_sources for c in candidates[source]
                                if c and address_problem(c.strip()) is None]))
    blocked = suppressions.suppressed(engine, [a for _, found in listed for _, a in found]) if members else {}
    guessed = [m.userid for m, found in listed if any(source == "pattern" for source, _ in found)]
    bad = suppressions.bad_guesses_of(engine, guessed) if guessed else set()
    chosen = []
    for member, found in listed:
        choice, why = None, None
        for source, address in found:
            if source == "pattern" and (_key(member.userid), suppressions.normal(address)) in bad:
                why = why or f"address suppressed: the EMAIL_PATTERN guess {address} bounced for this member"
            elif suppressions.normal(address) in blocked:
                why = why or suppressions.describe(*blocked[suppressions.normal(address)], settings.tz)
            else:
                choice = Choice(member, address, source, None)
                break
        chosen.append(choice or Choice(member, None, None, why or "no address"))
    return chosen


def resolve(settings: Settings, engine: Engine, members: list[Member]) -> list[tuple[Member, str | None]]:
    """Each member with the first valid, unsuppressed address along settings.email_sources, or None."""
    return [(c.member, c.address) for c in choose(settings, engine, members)]
