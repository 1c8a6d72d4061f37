"""The per-recipient backoff digest (DIGEST_WINDOW_SECONDS, QUIET_HOURS): the policy expansion applies, and
the flush that sends each recipient's held changes as one mail when their window (or quiet hours) ends."""
from __future__ import annotations

import logging
import time
from datetime import datetime, time as clock_time, timedelta

from sqlalchemy.exc import DBAPIError

import mailer
import templates_repo
from channels import message_digests
from delivery import bounce_rules, retry
from delivery.digest_message import DIGEST, ChangeRenderer, compose
from delivery.lease import LeaseKeeper
from delivery.limits import next_day_start
from delivery.sending import send_batch
from store import digests, template_versions
from store.channel_rows import WECOM_PREFIX
from store.recipients import Hold
from store.snapshots import member_names

log = logging.getLogger("wecom_mailer.worker")
BATCH = 50  # digests claimed and sent per flush
TEMPLATES_RETRY_SECONDS = 30.0


def active(settings) -> bool:
    """The digest is on: a window, or quiet hours. Off (DIGEST_WINDOW_SECONDS=0 and no QUIET_HOURS), every
    change goes at once and expansion touches no digest table."""
    return settings.digest_window > 0 or settings.quiet_hours is not None


def quiet_until(now: float, quiet_hours: tuple[int, int] | None, tz) -> float | None:
    """When the quiet hours around `now` end (epoch seconds), or None outside them. (start, end) are
    minutes after midnight in TIMEZONE; start > end wraps midnight (22:00-08:00)."""
    if quiet_hours is None:
        return None
    start, end = quiet_hours
    local = datetime.fromtimestamp(now, tz)
    minute = local.hour * 60 + local.minute
    inside = start <= minute < end if start < end else (minute >= start or minute < end)
    if not inside:
        return None
    day = local.date() if minute < end else local.date() + timedelta(days=1)
    return datetime.combine(day, clock_time(end // 60, end % 60), tzinfo=tz).timestamp()


def hold_for(worker) -> Hold | None:
    """How expansion decides at the worker's now; None while the digest is off."""
    settings = worker.settings
    if not active(settings):
        return None
    now = worker.clock()
    return Hold(now, settings.digest_window, quiet_until(now, settings.quiet_hours, settings.tz))


def send_due(worker) -> bool:
    """Claim the digests that are due (up to BATCH) and send each as one mail, marking every delivery it
    carries as its outcome is known; True when any was claimed."""
    settings, engine = worker.settings, worker.engine
    now = worker.clock()
    candidates = digests.due(engine, now, BATCH)
    if not candidates:
        return False
    try:
        templates = templates_repo.load_templates(worker.template_engine, settings.template_table,
                                                  settings.template_app)
    except DBAPIError as exc:  # the digests stay due; nothing is claimed until the templates can be read
        worker.digests_paused_until = time.monotonic() + TEMPLATES_RETRY_SECONDS
        log.warning("digests wait %.0f s: template database unavailable (%s)", TEMPLATES_RETRY_SECONDS,
                    exc.orig.__class__.__name__)
        return False
    keeper = LeaseKeeper(engine, None, worker.owner, settings.lease_seconds, worker.clock,
                         renew=digests.renew_leases, what="digests")
    try:
        quiet = quiet_until(now, settings.quiet_hours, settings.tz)
        claimed = [c for c in (digests.claim(engine, digest_id, address, worker.owner, settings.lease_seconds,
                                             now, quiet) for digest_id, address in candidates) if c]
        if claimed:
            _send(worker, claimed, templates)
    finally:
        keeper.close()
    return bool(claimed)


def _send(worker, claimed: list, templates: dict) -> None:
    settings, engine = worker.settings, worker.engine
    claimed = bounce_rules.screen_digests(worker, claimed)
    if not claimed:
        return
    names = member_names(engine, settings.department_ids, {c.user_id for d in claimed for c in d.changes})
    render = ChangeRenderer(settings, templates, names)
    messages = [d for d in claimed if d.address.startswith(WECOM_PREFIX)]  # the wecom channel's digests
    if messages:
        message_digests.send(worker, messages, render, templates)
        claimed = [d for d in claimed if not d.address.startswith(WECOM_PREFIX)]
        if not claimed:
            return
    # A digest's mail is named after the first delivery it carries (log lines, MAIL_BACKEND=file names):
    # that delivery has no mail of its own, so no name is shared with another message.
    by_item, items = {}, []
    for digest in claimed:
        message = compose(digest.changes, render, templates.get(DIGEST), settings.tz)
        if templates.get(DIGEST) is not None:  # which saved version of the 'digest' row people received
            template_versions.mark_digest(engine, digest.id, settings.template_app, templates[DIGEST].title,
                                          templates[DIGEST].body)
        item = mailer.Outgoing(digest.changes[0].delivery_id, digest.address, digest.changes[-1].name,
                               message.subject, message.body, bounce_rules.tag(worker, "g", digest.id))
        by_item[item.delivery_id] = (digest, message)
        items.append(item)
    finished: set[int] = set()
    started = time.monotonic()

    def record(item: mailer.Outgoing, result: mailer.SendResult) -> bool:
        """Mark the digest and every delivery it carries (one transaction) before the next mail goes."""
        digest, message = by_item[item.delivery_id]
        now = worker.clock()
        finished.add(digest.id)
        if result.quota:  # the day's quota: no attempt, it waits for tomorrow
            resume = next_day_start(now, settings.tz)
            ok = digests.release(engine, digest, worker.owner, resume, result.reason)
            _log(digest, f"waits for tomorrow: {result.reason}", started)
            return ok
        values = retry.outcome(settings, result, digest.attempts, digest.first_attempt_at, now)
        if worker.metrics:
            worker.metrics.digest(values["status"])
        if values["status"] == "retry":
            ok = digests.release(engine, digest, worker.owner, values["next_attempt_at"], values["reason"], values)
            _log(digest, f"to retry ({values['reason']})", started, logging.WARNING)
            return ok
        done = digests.finish(engine, digest, worker.owner, now, values, settings.digest_window,
                              message.notes, message.problem)
        if done is None:
            log.warning("digest %s: lease lost; another worker has it", digest.id)
            return False
        if values["status"] == "failed":  # 550 5.1.1 at RCPT: every change it carried bounced
            bounce_rules.after_refusal(worker, "g", digest.id, result)
        if message.problem:
            log.warning("digest %s: %s", digest.id, message.problem)
        for _ in done:
            worker.observe_event("done")
        what = "sent" if values["status"] == "sent" else f"failed ({values['reason']})"
        _log(digest, what, started, logging.INFO if values["status"] == "sent" else logging.WARNING)
        return True

    def record_each(outcomes) -> bool:
        """Each digest in its own transaction; every one is recorded, even after one says stop."""
        return all([record(item, result) is not False for item, result in outcomes])

    halt = send_batch(settings, items, record_each, stop=worker.stop, pool=worker.smtp_pool, gate=worker.gate)
    untried = [digest for digest, _ in by_item.values() if digest.id not in finished]
    if untried:
        now = worker.clock()
        if halt is None:  # stopping (SIGTERM) or a lease lost: another worker may go on at once
            due_at, why = now, "not tried: this worker stopped first"
        elif halt.quota:
            due_at, why = halt.resume_at or next_day_start(now, settings.tz), halt.reason
        else:  # no connection, or throttled: one retry time for all, on the backoff schedule
            due_at, why = now + retry.backoff_seconds(1, settings.retry_backoff), halt.reason
        for digest in untried:
            digests.release(engine, digest, worker.owner, due_at, why)
        log.warning("%d digest(s) not tried (%s); they wait until %s", len(untried), why,
                    datetime.fromtimestamp(due_at, settings.tz).strftime("%H:%M:%S"))


def _log(digest, outcome: str, started: float, level: int = logging.INFO) -> None:
    """One line per digest: its recipient and the events it carries."""
    log.log(level, "digest %s to %s: %d change(s), events %s: %s in %.1f s", digest.id, digest.address,
            len(digest.changes), id_ranges(digest.event_ids), outcome, time.monotonic() - started)


def id_ranges(ids) -> str:
    """Event ids as short ranges: 3-7,9,12-13."""
    ordered, parts = sorted(set(ids)), []
    for value in ordered:
        if parts and value == parts[-1][1] + 1:
            parts[-1][1] = value
        else:
            parts.append([value, value])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in parts)
