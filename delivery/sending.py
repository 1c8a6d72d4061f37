"""Sending a batch over MAIL_BACKEND: SMTP_CONNECTIONS sessions, each taking the next message from one queue."""
from __future__ import annotations

import collections
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable

import mailer
from smtp_session import Halt, Pool, SmtpSession

OnResult = Callable[[mailer.Outgoing, mailer.SendResult], "bool | None"]


def send_batch(settings, items: Iterable[mailer.Outgoing], on_result: OnResult, *,
               stop: threading.Event | None = None, pool: Pool | None = None, gate=None,
               tls_context=None) -> Halt | None:
    """Send every item; `on_result(item, result)` records each outcome, in order per connection, before the
    next message's content goes out on it (False from it stops). Returns the Halt that stopped the batch
    early (throttled, a daily quota, no connection), or None.

    `gate.admit(block)` (delivery/limits.py) is asked before each message; `pool` keeps the connections open
    for the next batch (without one they are closed at the end).
    """
    stop = stop or threading.Event()
    queue = collections.deque(items)
    halts: list[Halt] = []
    lock = threading.Lock()

    def take(block: bool) -> mailer.Outgoing | None:
        # Not blocking (a pipelined lookahead) must not wait for another sender held up by the minute limit.
        if not lock.acquire(blocking=block):
            return None
        try:
            if stop.is_set() or halts or not queue:
                return None
            if gate is not None and gate.active and not gate.admit(block):
                return None
            return queue.popleft()
        finally:
            lock.release()

    def logged(item: mailer.Outgoing, result: mailer.SendResult):
        mailer.log_result(item, result)
        return on_result(item, result)

    renderer = mailer.Renderer(settings)
    try:
        if settings.mail_backend == "smtp":
            _over_smtp(settings, take, renderer, logged, halts, pool, tls_context, len(queue))
        else:
            _locally(take, renderer, _local_backend(settings), logged)
    except Halt as halt:
        halts.append(halt)
    return halts[0] if halts else None


def _over_smtp(settings, take, render, on_result, halts: list, pool: Pool | None, tls_context, count: int) -> None:
    sessions = (pool.sessions if pool is not None else
                [SmtpSession(settings, tls_context) for _ in range(settings.smtp_connections)])[:max(count, 1)]
    failed = threading.Event()  # one connection's error stops the others' taking too

    def guarded_take(block: bool):
        return None if failed.is_set() else take(block)

    def run(session: SmtpSession) -> None:
        try:
            session.usable()  # a kept connection: closed here if idle too long or gone; send() reopens it
            session.send(guarded_take, render, on_result)
        except Halt as halt:
            halts.append(halt)
        except BaseException:
            failed.set()
            raise
        finally:
            if pool is None:
                session.close()

    if len(sessions) == 1:
        run(sessions[0])
        return
    with ThreadPoolExecutor(len(sessions), thread_name_prefix="smtp") as threads:
        for future in [threads.submit(run, session) for session in sessions]:
            future.result()


def _local_backend(settings):
    if settings.mail_backend == "file":
        return lambda item, data: mailer.write_eml(Path(settings.mail_file_dir), item, data)
    return mailer.print_message


def _locally(take, render, write, on_result) -> None:
    """The file and console backends: one message after the other, each outcome recorded before the next."""
    while (item := take(True)) is not None:
        try:
            result = write(item, render(item))
        except mailer.Unsendable as exc:
            result = exc.result
        if on_result(item, result) is False:
            return
