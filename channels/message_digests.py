"""Digests on the wecom channel: each person's held changes as WeCom messages when their window ends.

A WeCom text holds 2,048 bytes, so a long digest goes as a few messages (each a digest of the changes it
carries, in order), never cut: every change reaches the member once. Digests whose parts are the same (one
held change for many members) share each call, up to 1,000 members."""
from __future__ import annotations

import logging

import mailer
from channels import wecom_message
from channels.admission import admit
from delivery import retry
from delivery.digest_message import DIGEST, compose
from store import digests
from store.channel_rows import WECOM_PREFIX

log = logging.getLogger("wecom_mailer.worker")


def send(worker, claimed: list, render, templates: dict) -> None:
    """Send each claimed wecom digest and mark it (and the deliveries it carries) as its calls answer."""
    settings, engine = worker.settings, worker.engine
    if worker.app_client is None or settings.wecom_message == "off":
        for digest in claimed:  # nothing to send them with: they wait, and say why
            digests.release(engine, digest, worker.owner, worker.clock() + 3600,
                            "WECOM_MESSAGE is off (or no WECOM_APP_SECRET): the WeCom digest waits")
        return
    by_parts: dict[tuple[str, ...], list] = {}
    for digest in claimed:
        parts, notes, problem = split(digest.changes, render, templates.get(DIGEST), settings.tz)
        by_parts.setdefault(parts, []).append((digest, notes, problem))
    for parts, group in by_parts.items():
        for start in range(0, len(group), wecom_message.MAX_USERS):
            _call(worker, parts, group[start:start + wecom_message.MAX_USERS])


def split(changes, render, template, tz) -> tuple[tuple[str, ...], dict, str | None]:
    """The digest's texts, each within WeCom's 2,048 bytes and carrying whole changes (a change too long on
    its own is cut with …); the notes and problem of composing them."""
    parts, notes, problem, group = [], {}, None, []

    def text(of) -> tuple[str, object]:
        message = compose(of, render, template, tz)
        return f"{message.subject}\n\n{message.body}" if message.body else message.subject, message

    for change in changes:
        candidate = group + [change]
        content, _ = text(candidate)
        if group and len(content.encode("utf-8")) > wecom_message.TEXT_BYTES:
            content, message = text(group)
            parts.append(wecom_message.cut(content, wecom_message.TEXT_BYTES))
            notes.update(message.notes)
            problem = problem or message.problem
            candidate = [change]
        group = candidate
    content, message = text(group)
    parts.append(wecom_message.cut(content, wecom_message.TEXT_BYTES))
    notes.update(message.notes)
    return tuple(parts), notes, problem or message.problem


def _userid(digest) -> str:
    return digest.address[len(WECOM_PREFIX):]


def _call(worker, parts: tuple[str, ...], group: list) -> None:
    settings, engine, owner = worker.settings, worker.engine, worker.owner
    go, waits = admit(worker, group, lambda entry: entry[0].address)
    for (digest, *_), until, reason in waits:
        digests.release(engine, digest, owner, until, reason)
    results: dict[int, mailer.SendResult] = {}
    for content in parts:  # every part to everyone still in; a failure ends that member's digest here
        going = [entry for entry in go if entry[0].id not in results]
        if not going:
            break
        outcome = wecom_message.send(worker.app_client, settings.agent_id, [_userid(d) for d, *_ in going],
                                     content)
        for digest, *_ in going:
            if outcome.transient or outcome.permanent:
                results[digest.id] = mailer.SendResult(ok=False, permanent=bool(outcome.permanent),
                                                       reason=outcome.permanent or outcome.transient)
            elif _userid(digest) in outcome.failed:
                results[digest.id] = mailer.SendResult(ok=False, permanent=True,
                                                       reason=outcome.failed[_userid(digest)])
    now = worker.clock()
    for digest, notes, problem in go:
        result = results.get(digest.id, mailer.SENT)
        values = retry.outcome(settings, result, digest.attempts, digest.first_attempt_at, now)
        if worker.metrics:
            worker.metrics.digest(values["status"])
        if values["status"] == "retry":
            digests.release(engine, digest, owner, values["next_attempt_at"], values["reason"], values)
            what = f"to retry ({values['reason']})"
        else:
            done = digests.finish(engine, digest, owner, now, values, settings.digest_window, notes, problem)
            if done is None:
                log.warning("digest %s: lease lost; another worker has it", digest.id)
                continue
            for _ in done:
                worker.observe_event("done")
            what = "sent" if values["status"] == "sent" else f"failed ({values['reason']})"
        log.info("digest %s to %s: %d change(s) in %d WeCom message(s): %s", digest.id, digest.address,
                 len(digest.changes), len(parts), what)
