"""Issue 20 benchmark: the IMAP bounce intake on a folder of 10,000 messages (`bench/run.py --only bounces`).

A private Dovecot (tests/support/dovecot.py) serves one folder holding DSNs in Postfix's format (each
returning a message whose Message-ID carries a valid tag), auto-replies and ordinary mail, mixed. Two
child processes read it over IMAP with STARTTLS, in alternation, each with its peak RSS measured apart:

- the floor: login, SELECT, then the same UID windows and body batches as the intake (`UID FETCH … (UID
  RFC822.SIZE)`, then `BODY.PEEK[]` in batches of at most 100 messages / 2 MB), and nothing else;
- the intake alone: `bounces.intake.poll` with a handler that only looks at the Content-Type (the poll's
  own cost: windows, batches, flags, the position), state in a fresh SQLite file;
- the service: `bounces.intake.poll` with the real processing (bounces/handle.py) on MariaDB, which also
  marks the reports `\\Seen`; its progress lines go to bench/out/bounces-service.log.
"""
from __future__ import annotations

import json
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import harness as h  # noqa: E402
from bench.harness import say  # noqa: E402

SIZE = 10_000


def bounces(run) -> None:
    """Rows: messages/s of the floor and of the service on the same folder, and each one's peak RSS."""
    sys.path.insert(0, str(ROOT / "tests"))
    from support.dovecot import Dovecot, dovecot_binary

    if dovecot_binary() is None:
        say("dovecot not installed: apt-get install --no-install-recommends dovecot-imapd; skipping bounces")
        return
    import trustme

    size = getattr(run.args, "bounce_size", None) or (2_000 if run.args.quick else SIZE)
    with Dovecot(trustme.CA()) as imap, h.database("bounces") as url:
        counts = fill(imap, size)
        say(f"bounces: a folder of {size} messages ({counts}); Dovecot indexes it on a first read")
        env = {**os.environ, **imap.env(), "PYTHONPATH": str(ROOT)}
        child(env, "floor")  # warm-up: Dovecot's index and cache, not counted
        floors, bare = [], []
        for _ in range(max(1, run.args.repeats)):  # alternating; each intake pass starts from a fresh position
            floors.append(child(env, "floor"))
            bare.append(child(env, "intake"))
        h.prepare_state(url)  # the real processing reads each message once: one measured pass per folder
        service = child({**env, **h.service_env(url, "http://127.0.0.1:9/", 9), **imap.env(),
                         "SECRET_KEY": "bench-bounce-tag-key-0123456789"}, "service")
        floor, intake_only = max(floors, key=lambda r: r["rate"]), max(bare, key=lambda r: r["rate"])
        run.raw["bounces"] = {"floors": floors, "intake": bare, "service": service, "size": size, "counts": counts}
        assert service["messages"] == size, f"the poll read {service['messages']} of {size} messages"
        run.add("bounces", f"poll of {size} messages, trivial handler (msg/s)", f"{intake_only['rate']:.0f}",
                f"{floor['rate']:.0f} (fetch only)", intake_only["rate"] / floor["rate"], "≥ 0.5 × floor",
                intake_only["rate"] >= 0.5 * floor["rate"])
        run.add("bounces", f"poll of {size} messages, real processing (msg/s)", f"{service['rate']:.0f}",
                f"{floor['rate']:.0f} (fetch only)", service["rate"] / floor["rate"], "recorded")
        run.add("bounces", "peak RSS (MB), service / fetch-only floor", f"{service['rss_mb']:.0f}",
                f"{floor['rss_mb']:.0f}", service["rss_mb"] / floor["rss_mb"], "< 150 MB", service["rss_mb"] < 150)
        run.add("bounces", "reports marked \\Seen / others left untouched", f"{service['reports']} / "
                f"{service['left_alone']}", f"{counts['dsn']} / {counts['auto'] + counts['plain']}", None,
                "all / all", service["reports"] == counts["dsn"])


def fill(imap, size: int) -> dict[str, int]:
    """Write `size` messages straight into the Maildir (what virtual(8) does), mixed: 40 % DSNs, 20 %
    auto-replies, 40 % ordinary mail; deterministic."""
    import bounces.tags as tags

    rng = random.Random(20)
    key = b"k" * 32  # a tag key other than the service's: the MAC check fails, the report is `unmatched`
    maildir = imap.maildir("bounces@bounce.test") / "new"
    counts = {"dsn": 0, "auto": 0, "plain": 0}
    padding = "这是一封普通的邮件，用来把文件夹填满。 Ordinary mail to fill the folder.\r\n"
    for n in range(size):
        pick = rng.random()
        if pick < 0.4:
            counts["dsn"] += 1
            raw = dsn(n, tags.make(key, "d", n + 1))
        elif pick < 0.6:
            counts["auto"] += 1
            raw = (f"From: user{n}@corp.example\r\nTo: it@corp.example\r\nSubject: 自动回复: 新增成员\r\n"
                   f"Message-ID: <auto{n}@corp.example>\r\nAuto-Submitted: auto-replied\r\n"
                   f"Content-Type: text/plain; charset=utf-8\r\n\r\n我正在休假。\r\n").encode()
        else:
            counts["plain"] += 1
            raw = (f"From: colleague{n}@corp.example\r\nTo: it@corp.example\r\nSubject: weekly report {n}\r\n"
                   f"Message-ID: <plain{n}@corp.example>\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
                   + padding * rng.randint(5, 60)).encode()
        (maildir / f"{1700000000 + n}.M{n}P1.bench").write_bytes(raw)
    from support.dovecot import chown_mail_tree

    chown_mail_tree(imap.mail_root)
    return counts


def dsn(n: int, tag: str) -> bytes:
    """A DSN as Postfix writes it (tests/support/postfix.py made the original), returning one of our messages."""
    boundary = f"B{n}.1700000000/mx.corp.example"
    return (f"From: Mail Delivery System <MAILER-DAEMON@mx.corp.example>\r\nTo: it@corp.example\r\n"
            f"Subject: Undelivered Mail Returned to Sender\r\nMessage-Id: <dsn{n}@mx.corp.example>\r\n"
            f"Auto-Submitted: auto-replied\r\nMIME-Version: 1.0\r\n"
            f"Content-Type: multipart/report; report-type=delivery-status;\r\n\tboundary=\"{boundary}\"\r\n\r\n"
            f"--{boundary}\r\nContent-Description: Notification\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n"
            f"<gone{n}@corp.example>: unknown user: \"gone{n}@corp.example\"\r\n\r\n"
            f"--{boundary}\r\nContent-Description: Delivery report\r\nContent-Type: message/delivery-status\r\n\r\n"
            f"Reporting-MTA: dns; mx.corp.example\r\nArrival-Date: Mon, 7 Dec 2026 01:07:12 +0000 (UTC)\r\n\r\n"
            f"Final-Recipient: rfc822; gone{n}@corp.example\r\nOriginal-Recipient: rfc822;gone{n}@corp.example\r\n"
            f"Action: failed\r\nStatus: 5.1.1\r\nDiagnostic-Code: X-Postfix; unknown user: \"gone{n}@corp.example\"\r\n\r\n"
            f"--{boundary}\r\nContent-Description: Undelivered Message\r\nContent-Type: message/rfc822\r\n\r\n"
            f"From: it@corp.example\r\nTo: gone{n}@corp.example\r\nSubject: 新增成员\r\n"
            f"Message-ID: <{tag}@corp.example>\r\nAuto-Submitted: auto-generated\r\n\r\n新增成员 ID：user{n}\r\n\r\n"
            f"--{boundary}--\r\n").encode()


def child(env: dict[str, str], kind: str) -> dict:
    """Run one pass in a process of its own (its RSS is its own); returns what it printed."""
    log = h.OUT / f"bounces-{kind}.log"
    with log.open("a") as err:
        done = subprocess.run([sys.executable, str(Path(__file__)), kind], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=err, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"the {kind} pass failed (exit {done.returncode}): see {log}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    say(f"bounces: {kind}: {result['messages']} messages in {result['seconds']:.1f} s "
        f"({result['rate']:.0f}/s), peak RSS {result['rss_mb']:.0f} MB")
    return result


def _floor() -> dict:
    """Fetch every message of the folder as the intake does, and do nothing with it."""
    import config
    from bounces import intake
    from bounces.imap import Mailbox

    settings = config.from_env(_bench_env())
    messages, started = 0, time.monotonic()
    with Mailbox(settings) as box:
        selected = box.select(settings.bounce_imap.folder)
        last, end = 0, selected.uidnext - 1
        while last < end:
            upper = min(last + intake.SIZE_WINDOW, end)
            for batch in intake._batches(box.sizes(last + 1, upper)):
                small = [uid for uid, size in batch if size < intake.MAX_MESSAGE_BYTES]
                messages += len(box.bodies(small))
            last = upper
    return {"messages": messages, "seconds": time.monotonic() - started}


def _intake() -> dict:
    """The poll with a handler that only recognises a report by its Content-Type: the intake's own cost."""
    import config
    from bounces import intake
    from store.db import make_engine
    from store.migrate import ensure_schema

    class Seen:
        def __init__(self, report: bool):
            self.kind, self.is_bounce, self.duplicate = ("unmatched" if report else "ignored"), report, False

    import tempfile

    settings = config.from_env(_bench_env())
    with tempfile.TemporaryDirectory(prefix="wm-bench-") as directory:  # a fresh position each pass
        engine = make_engine(f"sqlite:///{directory}/state.db")
        ensure_schema(engine)
        started = time.monotonic()
        report = intake.poll(settings, engine, "bench", backlog=True, budget=1800,
                             handler=lambda e, s, raw, source: Seen(b"report-type=delivery-status" in raw[:2000]))
        seconds = time.monotonic() - started
        engine.dispose()
    assert report is not None and report.error is None, report and report.error
    return {"messages": report.seen, "reports": report.reports, "left_alone": report.left_alone,
            "seconds": seconds}


def _service() -> dict:
    import logging

    import config
    from bounces import intake
    from store.db import make_engine

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    settings = config.from_env(_bench_env())
    engine = make_engine(settings.database_url)
    from bounces import handle  # imported before the clock starts, as in a running worker

    started = time.monotonic()
    report = intake.poll(settings, engine, "bench", backlog=True, budget=1800, handler=handle.process_message)
    assert report is not None and report.error is None, report and report.error
    return {"messages": report.seen, "reports": report.reports, "left_alone": report.left_alone,
            "kinds": dict(report.kinds), "seconds": time.monotonic() - started}


def _bench_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("WECOM_CORP_ID", h.CORP_ID)
    env.setdefault("WECOM_CONTACT_SECRET", h.SECRET)
    env.setdefault("WECOM_CALLBACK_TOKEN", h.TOKEN)
    env.setdefault("WECOM_CALLBACK_AES_KEY", h.AES_KEY)
    env.setdefault("WECOM_DEPARTMENT_ID", str(h.DEPARTMENT))
    env.setdefault("MAIL_BACKEND", "file")
    env.setdefault("MAIL_FROM", h.MAIL_FROM)
    env["DATABASE_URL"] = env.get("DATABASE_URL") or "sqlite:///:memory:"
    return env


if __name__ == "__main__":  # a child pass: `python bench/bounce_intake.py floor|service`
    result = {"floor": _floor, "intake": _intake, "service": _service}[sys.argv[1]]()  # timed inside: no imports
    result.update(rate=result["messages"] / result["seconds"],
                  rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(json.dumps(result))
