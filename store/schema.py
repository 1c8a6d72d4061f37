"""Every table of the service, declared once (SQLAlchemy Core); migrations/ turns changes into upgrades."""
from __future__ import annotations

from sqlalchemy import (BigInteger, Column, Double, Index, Integer, MetaData, String, Table, Text,
                        UniqueConstraint)
from sqlalchemy.dialects.mysql import MEDIUMTEXT

metadata = MetaData()

# Event status: pending (recorded, not yet expanded) → sending (deliveries written) → done;
# or ignored / skipped / failed, with `reason`. `held`: only deliveries held for a digest are left (the
# digests finish it; the event round does not claim it).
EVENT_OPEN = ("pending", "sending")
EVENT_STATUSES = ("pending", "sending", "held", "done", "failed", "skipped", "ignored")
# Delivery status: pending → sent | retry → … | failed | skipped (no address); held → sent | failed in a
# digest (wm_digests), which the digest flush sends, never the event round.
DELIVERY_OPEN = ("pending", "retry")
# `bounced`: accepted by the relay, then refused for good (a hard bounce, or a refusal at RCPT saying the
# mailbox does not exist); its address is suppressed (store/suppressions.py).
DELIVERY_STATUSES = ("pending", "retry", "held", "sent", "failed", "skipped", "bounced")
# Digest status: collecting (held deliveries join it) → sending (leased) → sent | failed; a failed try goes
# back to collecting; `merged` when its deliveries moved into an older digest of the same address.
DIGEST_STATUSES = ("collecting", "sending", "sent", "failed", "merged")
DIGEST_OPEN = ("collecting", "sending")

Id = BigInteger().with_variant(Integer, "sqlite")  # SQLite autoincrements only INTEGER keys
# MySQL's TEXT holds 64 KB; an event's XML (up to CALLBACK_MAX_BODY_BYTES) and its rendered message may not fit.
LongText = Text().with_variant(MEDIUMTEXT(), "mysql", "mariadb")

events = Table(
    "wm_events", metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("dedup_key", String(64), nullable=False),
    Column("change_type", String(32), nullable=False, default=""),
    Column("user_id", String(64), nullable=False, default=""),
    Column("departments", String(255), nullable=False, default=""),
    Column("create_time", BigInteger),
    Column("xml", LongText, nullable=False),
    Column("status", String(16), nullable=False),
    Column("reason", Text),
    Column("subject", LongText),
    Column("body", LongText),
    Column("attempts", Integer, nullable=False, default=0),
    Column("received_at", Double, nullable=False),
    Column("first_attempt_at", Double),
    Column("next_attempt_at", Double, nullable=False, default=0),
    Column("finished_at", Double),
    Column("lease_owner", String(64)),
    Column("lease_until", Double),
    # callback: recorded from WeCom; reconcile: announced by reconciliation (delivery/reconcile.py)
    Column("source", String(16), nullable=False, default="callback", server_default="callback"),
    Column("held_rows", Integer, nullable=False, server_default="0"),  # deliveries still held for a digest
    UniqueConstraint("dedup_key", name="uq_wm_events_dedup"),
    Index("ix_wm_events_due", "status", "next_attempt_at"),
)

deliveries = Table(
    "wm_deliveries", metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("event_id", BigInteger, nullable=False),
    Column("userid", String(64), nullable=False),
    Column("name", String(255), nullable=False, default=""),
    Column("address", String(320)),  # NULL when skipped for want of an address (unique allows many NULLs)
    Column("status", String(16), nullable=False),
    Column("reason", Text),
    Column("attempts", Integer, nullable=False, default=0),
    Column("first_attempt_at", Double),
    Column("next_attempt_at", Double, nullable=False, default=0),
    Column("sent_at", Double),
    Column("digest_id", BigInteger),  # the digest that carries (or carried) it; NULL when sent on its own
    # Which EMAIL_SOURCES source gave the address (wecom, directory, pattern): a bounced guess is never guessed
    # again. NULL on rows written before bounces (issue 20).
    Column("address_source", String(16)),
    # email, or wecom (a WeCom application message, issue 21): a wecom row's `address` is `wecom:<userid in
    # lower case>`, which has no @ and so never equals an email address; the unique key (event, address) is
    # then one row per (event, member, channel), and the digest's per-address rows are per person per channel.
    Column("channel", String(8), nullable=False, default="email", server_default="email"),
    UniqueConstraint("event_id", "address", name="uq_wm_deliveries_event_address"),
    Index("ix_wm_deliveries_status", "status", "next_attempt_at"),
    Index("ix_wm_deliveries_digest", "digest_id"),
)

department_snapshots = Table(
    "wm_department_snapshots", metadata,
    Column("department_id", BigInteger, primary_key=True, autoincrement=False),
    Column("taken_at", Double, nullable=False),
    Column("member_count", Integer, nullable=False, default=0),
    Column("covered", Text, nullable=False, default=""),  # the department and, with FETCH_CHILD, its descendants
)

snapshot_members = Table(
    "wm_snapshot_members", metadata,
    Column("department_id", BigInteger, primary_key=True, autoincrement=False),
    Column("userid", String(64), primary_key=True),
    Column("name", String(255), nullable=False, default=""),
)

# The membership announced per watched department (reconciliation, issue 13): who was announced as joined and
# not yet as left. Seeded from the department's first reconciliation listing (announced_by 'seed': never mailed);
# callbacks and reconciliation move rows between joined and left by compare-and-set, so a change is announced once.
MEMBERSHIP_STATES = ("joined", "left")
membership = Table(
    "wm_membership", metadata,
    Column("department_id", BigInteger, primary_key=True, autoincrement=False),
    Column("userid", String(64), primary_key=True),
    Column("state", String(8), nullable=False),
    Column("name", String(255), nullable=False, default=""),
    Column("announced_by", String(16), nullable=False),  # seed | callback | reconcile
    Column("announced_at", Double, nullable=False),
    Column("changed_at", Double),  # when the change happened, as its announcement says (CreateTime)
    Column("event_id", BigInteger),
)

# What reconciliation's listings show that the announced membership does not: a member listed but not announced
# (kind 'join') or announced but not listed ('leave'), and in how many consecutive listings since when. Only
# these differences have rows; every successful listing of a department replaces its rows.
observations = Table(
    "wm_observations", metadata,
    Column("department_id", BigInteger, primary_key=True, autoincrement=False),
    Column("userid", String(64), primary_key=True),
    Column("kind", String(8), nullable=False),
    Column("listings", Integer, nullable=False),
    Column("since", Double, nullable=False),
    Column("name", String(255), nullable=False, default=""),
)

# Per watched department: when reconciliation seeded it, and its last successful listing.
reconciled_departments = Table(
    "wm_reconciled_departments", metadata,
    Column("department_id", BigInteger, primary_key=True, autoincrement=False),
    Column("seeded_at", Double, nullable=False),
    Column("last_round", BigInteger, nullable=False),
    Column("listed_at", Double, nullable=False),
    Column("member_count", Integer, nullable=False, default=0),
    Column("fetch_child", Integer, nullable=False, default=0),  # WECOM_FETCH_CHILD of the seed: a change re-seeds
)

# Named leases for work that one process does per interval (reconciliation): taken by compare-and-set.
leases = Table(
    "wm_leases", metadata,
    Column("name", String(32), primary_key=True),
    Column("owner", String(64)),
    Column("lease_until", Double),
    Column("last_run_at", Double),
    Column("runs", BigInteger, nullable=False, default=0),
    Column("last_outcome", Text),
)

address_book = Table(
    "wm_address_book", metadata,
    Column("userid", String(64), primary_key=True),  # stored lower case: WeCom userids are case-insensitive
    Column("email", String(320), nullable=False),
    Column("updated_at", Double, nullable=False),
)

access_tokens = Table(
    "wm_access_tokens", metadata,
    Column("key", String(64), primary_key=True),  # digest of corp id + secret: the secret is never stored
    Column("access_token", String(512), nullable=False),
    Column("expires_at", Double, nullable=False),
)


# /admin (ops/admin/sessions.py, ops/admin/login_throttle.py). The secret that signs admin cookies when SECRET_KEY is unset:
# generated once, shared by every process through this table.
service_secrets = Table(
    "wm_service_secrets", metadata,
    Column("name", String(64), primary_key=True),
    Column("value", String(128), nullable=False),
    Column("created_at", Double, nullable=False),
)

admin_sessions = Table(
    "wm_admin_sessions", metadata,
    Column("digest", String(64), primary_key=True),  # sha256 of the session id in the cookie, never the id itself
    Column("client", String(64), nullable=False, default=""),
    Column("created_at", Double, nullable=False),
    Column("expires_at", Double, nullable=False),
    Index("ix_wm_admin_sessions_expires", "expires_at"),
)

login_failures = Table(
    "wm_login_failures", metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("client", String(64), nullable=False),  # the client address (an IPv6 address by its /64)
    Column("failed_at", Double, nullable=False),
    Index("ix_wm_login_failures_client", "client", "failed_at"),
    Index("ix_wm_login_failures_at", "failed_at"),
)

def template_table(name: str) -> Table:
    """The original flow's template table (TEMPLATE_TABLE): only the columns it uses; an existing one may have more.

    It lives in TEMPLATE_DATABASE_URL, which the service may only read, so it is not part of `metadata`
    and no migration touches it; `init-db --seed-templates` creates it where asked to.
    """
    return Table(
        name, MetaData(),
        Column("app", String(64), nullable=False),
        Column("change_type", String(64), nullable=False),
        Column("email_title", String(255), nullable=False),
        Column("email_body", Text, nullable=False),
        UniqueConstraint("app", "change_type", name=f"uq_{name}_app_change"[:64]),
        mysql_charset="utf8mb4", mysql_engine="InnoDB",
    )


def insert_ignore(table: Table):
    """INSERT that skips rows whose unique key exists (SQLite and MySQL/MariaDB)."""
    return table.insert().prefix_with("OR IGNORE", dialect="sqlite").prefix_with("IGNORE", dialect="mysql")



# --- sending limits (SMTP_MAX_PER_MINUTE, SMTP_MAX_PER_DAY), shared by every process ---------------------

send_log = Table(  # one row per message handed to the SMTP server, kept for a few minutes
    "wm_send_log", metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("sent_at", Double, nullable=False),
    Index("ix_wm_send_log_sent_at", "sent_at"),
)

send_days = Table(  # messages handed per calendar day in TIMEZONE
    "wm_send_days", metadata,
    Column("day", String(10), primary_key=True),  # YYYY-MM-DD
    Column("sent", Integer, nullable=False),
)

limit_locks = Table(  # one row per limit: updating it first serialises the check-then-insert of every process
    "wm_limit_locks", metadata,
    Column("name", String(32), primary_key=True),
    Column("ticks", BigInteger, nullable=False),
)


# --- the per-recipient digest (DIGEST_WINDOW_SECONDS, QUIET_HOURS) ------------------------------------

recipients = Table(  # one row per address mailed with the digest on: the lock every decision about it takes
    "wm_recipients", metadata,
    Column("address", String(320), primary_key=True),
    Column("window_until", Double, nullable=False, default=0),  # no mail but a digest before this time
)

digests = Table(
    "wm_digests", metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("address", String(320), nullable=False),
    Column("status", String(16), nullable=False),
    Column("due_at", Double, nullable=False),  # when it may go (its recipient's window end, quiet hours' end)
    Column("attempts", Integer, nullable=False, default=0),
    Column("first_attempt_at", Double),
    Column("created_at", Double, nullable=False),
    Column("sent_at", Double),
    Column("changes", Integer, nullable=False, default=0),  # how many it carried when it went
    Column("reason", Text),
    Column("lease_owner", String(64)),
    Column("lease_until", Double),
    Index("ix_wm_digests_due", "status", "due_at"),
    Index("ix_wm_digests_address", "address", "status"),
)


# --- the audit log: one row per state-changing action, from /admin or the CLI (store/audit.py) ---------

audit_log = Table(  # append only: nothing in the service updates or deletes a row
    "wm_audit_log", metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("at", Double, nullable=False),
    Column("actor", String(64), nullable=False),  # a WeCom userid, `token` (ADMIN_TOKEN) or `cli`
    Column("client", String(64), nullable=False, default=""),  # the client address (after TRUSTED_PROXIES)
    Column("action", String(32), nullable=False),  # sign-in, sign-in-refused, sign-out, retry, template-save, …
    Column("target", String(255), nullable=False, default=""),
    Column("detail", String(255), nullable=False, default=""),  # short, never a secret, never a whole body
    Index("ix_wm_audit_log_at", "at"),
    Index("ix_wm_audit_log_actor", "actor", "at"),
)


# --- bounces (issue 20, docs/bounces.md): suppressed addresses, soft-bounce counts, stored reports ---------

BOUNCE_KINDS = ("hard", "soft", "sender_blocked", "ignored", "delayed", "unmatched")
SUPPRESSION_SOURCES = ("bounce", "rcpt", "admin")

suppressions = Table(  # an address here is not mailed until an admin removes it
    "wm_suppressions", metadata,
    Column("address", String(320), primary_key=True),  # lower case
    Column("reason", String(1000), nullable=False),  # status and diagnostic: 5.1.1 <a@corp.example>: User unknown
    Column("since", Double, nullable=False),
    Column("source", String(16), nullable=False),  # bounce (a report), rcpt (refused at send time), admin
    Column("delivery_id", BigInteger),  # the delivery whose bounce suppressed it
)

soft_bounces = Table(  # at most one per address per day (TIMEZONE): BOUNCE_SOFT_LIMIT within 7 days suppress
    "wm_soft_bounces", metadata,
    Column("address", String(320), primary_key=True),
    Column("day", String(10), primary_key=True),  # YYYY-MM-DD
    Column("at", Double, nullable=False),
    Column("reason", String(1000), nullable=False, default=""),
)

bounce_reports = Table(  # every report once (keyed by its own Message-ID), matched or not, for the admin
    "wm_bounce_reports", metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("report_key", String(64), nullable=False),  # sha256 of the report's Message-ID (else of its bytes)
    Column("received_at", Double, nullable=False),
    Column("source", String(16), nullable=False),  # file, imap, rcpt, …
    Column("kind", String(16), nullable=False),  # BOUNCE_KINDS
    Column("delivery_id", BigInteger),
    Column("digest_id", BigInteger),
    Column("address", String(320)),  # the matched delivery's address
    Column("reason", String(1000), nullable=False, default=""),
    Column("subject", String(255), nullable=False, default=""),
    Column("raw", LongText),  # the report as received, cut at 256 KB
    UniqueConstraint("report_key", name="uq_wm_bounce_reports_key"),
    Index("ix_wm_bounce_reports_kind", "kind", "received_at"),
    Index("ix_wm_bounce_reports_at", "received_at"),
)

bad_guesses = Table(  # an EMAIL_PATTERN guess that bounced hard: never guessed again for that member
    "wm_bad_guesses", metadata,
    Column("userid", String(64), primary_key=True),  # lower case
    Column("address", String(320), primary_key=True),  # lower case
    Column("since", Double, nullable=False),
)


# --- WeCom application messages (issue 21): per-person and daily limits shared by every process ---------

message_log = Table(  # one row per person per message/send call, kept an hour (WeCom: 30 a minute, 1,000 an hour)
    "wm_message_log", metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("address", String(320), nullable=False),  # wecom:<userid>, as on the delivery
    Column("sent_at", Double, nullable=False),
    Index("ix_wm_message_log_address", "address", "sent_at"),
    Index("ix_wm_message_log_sent_at", "sent_at"),
)

message_days = Table(  # message recipients per calendar day in TIMEZONE (WECOM_MESSAGE_MAX_PER_DAY)
    "wm_message_days", metadata,
    Column("day", String(10), primary_key=True),  # YYYY-MM-DD
    Column("sent", Integer, nullable=False),
)


# --- /admin for a team: WeCom sign-in, who a session belongs to, template versions (issue 22) -------------

# Who a session belongs to: a WeCom userid, or `token` for ADMIN_TOKEN (a session of the previous release is
# a token session, hence the server default).
admin_sessions.append_column(Column("actor", String(64), nullable=False, server_default="token"))
# The template version an event's message was rendered from (store/template_versions.py); NULL when the row
# in the template table matches no version saved through /admin (edited with SQL, or before versions).
events.append_column(Column("template_version", BigInteger))
# The same for a digest's own wrapper: the version of the 'digest' row it was composed with (NULL: the built-in
# text, or a row no saved version matches); each change inside it keeps its event's version.
digests.append_column(Column("template_version", BigInteger))

sign_in_states = Table(  # a WeCom sign-in in progress: its `state`, bound to the visitor's pre-session cookie
    "wm_sign_in_states", metadata,
    Column("state_digest", String(64), primary_key=True),  # sha256 of `state`; taken (deleted) once
    Column("visitor_digest", String(64), nullable=False),  # sha256 of the pre-session cookie's value
    Column("created_at", Double, nullable=False),
    Column("expires_at", Double, nullable=False),
    Index("ix_wm_sign_in_states_expires", "expires_at"),
)

template_versions = Table(  # every title/body saved through /admin/templates: who, when, what (append only)
    "wm_template_versions", metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("app", String(64), nullable=False),
    Column("change_type", String(32), nullable=False),
    Column("email_title", Text, nullable=False),
    Column("email_body", LongText, nullable=False),
    Column("digest", String(64), nullable=False),  # sha256 of title and body: which version a row is
    Column("saved_by", String(64), nullable=False),
    Column("saved_at", Double, nullable=False),
    Column("action", String(16), nullable=False),  # save | rollback | original (the row as found before)
    Column("restored_from", BigInteger),  # the version a rollback restored
    Index("ix_wm_template_versions_type", "app", "change_type", "id"),
    Index("ix_wm_template_versions_digest", "app", "change_type", "digest"),
)


# --- Security round three (issue 24): the idle timeout of /admin sessions (migration 0012) ------------------
# When the session was last used; NULL for a row opened before 0012 (its created_at stands in).
admin_sessions.append_column(Column("last_seen_at", Double, nullable=True))


# --- retention (RETENTION_DAYS, store/retention.py): old finished events are pruned in received order ------

Index("ix_wm_events_received", events.c.received_at)


# --- bounce intake (BOUNCE_IMAP_URL): where the poll of the bounce mailbox stands (bounces/intake.py) --------

bounce_mailbox = Table(  # one row per polled folder; the lease "bounce-intake" lets one process poll at a time
    "wm_bounce_mailbox", metadata,
    Column("folder", String(255), primary_key=True),  # user@host:port/FOLDER (never a password)
    Column("uidvalidity", BigInteger, nullable=False),  # a new value: the UIDs were renumbered, rescan
    Column("last_uid", BigInteger, nullable=False, default=0),  # every UID up to it has been processed
    Column("updated_at", Double, nullable=False),
)
