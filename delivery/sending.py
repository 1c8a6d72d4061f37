"""Sending a batch over MAIL_BACKEND: SMTP_CONNECTIONS sessions, each taking the next message from one queue,
their outcomes recorded by one writer."""
from __future__ import annotations

import collections
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable

import mailer
from smtp_session import Halt, Pool, SmtpSession

Outcome = tuple[mailer.Outgoing, mailer.SendResult]
OnResults = Callable[[list[Outcome]], "bool | None"]


def send_batch(settings, items: Iterable[mailer.Outgoing], on_results: OnResults, *,
               stop: threading.Event | None = None, pool: Pool | None = None, gate=None,
               tls_context=None) -> Halt | None:
    """Send every item; `on_results(outcomes)` records outcomes durably (False from it stops the batch), and
    the next message's content on a connection goes out only after its previous outcome is recorded.
    Returns the Halt that stopped the batch early (throttled, a daily quota, no connection), or None.

    `gate.admit(block)` (delivery/limits.py) is asked before each message; `pool` keeps the connections open
    for the next batch (without one they are closed at the end).
    """
    stop = stop or threading.Event()
    waiting = collections.deque(items)
    halts: list[Halt] = []
    lock = threading.Lock()

    def take(block: bool) -> mailer.Outgoing | None:
        # Not blocking (a pipelined lookahead) must not wait for another sender held up by the minute limit.
        if not lock.acquire(blocking=block):
            return None
        try:
            if stop.is_set() or halts or not waiting:
                return None
            if gate is not None and gate.active and not gate.admit(block):
                return None
            return waiting.popleft()
        finally:
            lock.release()

    def log(outcomes: list[Outcome]) -> None:
        for item, result in outcomes:
            mailer.log_result(item, result)

    def logged(outcomes: list[Outcome]):
        log(outcomes)
        return on_results(outcomes)

    renderer = mailer.Renderer(settings)
    try:
        if settings.mail_backend == "smtp":
            with OutcomeWriter(on_results, then=log) as writer:
                _over_smtp(settings, take, renderer, writer.submit, halts, pool, tls_context, len(waiting))
        else:
            _locally(take, renderer, _local_backend(settings), logged)
    except Halt as halt:
        halts.append(halt)
    return halts[0] if halts else None


class OutcomeWriter:
    """Records the outcomes of every connection of a batch, one write at a time and in the order they come;
    what several connections hand over meanwhile goes into the next write together (one UPDATE for the sent
    ones). A connection waits only for its own latest outcome.

    A thread of its own writes them, so that a connection goes on with its next message while its outcome is
    written (at loopback that overlap is a quarter of the rate). But a connection that comes to wait for an
    outcome the thread has not taken yet writes it itself: the thread sleeps between messages when the server
    is far, and at 20 ms its two wake-ups (take, hand back) cost 0.65 ms of each 23 ms cycle here. The log
    lines (`then`) are always the thread's, in order, after the waiting connections are released."""

    def __init__(self, on_results: OnResults, then: Callable[[list[Outcome]], None] = lambda outcomes: None):
        self.on_results, self.then = on_results, then
        self._changed = threading.Condition()
        self._queue: collections.deque = collections.deque()  # (item, result, future), not yet taken
        self._unlogged: collections.deque = collections.deque()  # written, for the thread to log
        self._writing = self._closing = False
        self._thread = threading.Thread(target=self._run, name="smtp-outcomes", daemon=True)

    def __enter__(self) -> "OutcomeWriter":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        with self._changed:
            self._closing = True
            self._changed.notify_all()
        self._thread.join()

    def submit(self, item: mailer.Outgoing, result: mailer.SendResult) -> Future:
        """Queue one outcome; the future gives what on_results said of its batch (False: stop), or raises."""
        recorded = _Recorded(self)
        with self._changed:
            self._queue.append((item, result, recorded))
            self._changed.notify_all()
        return recorded

    def wait(self, recorded: "_Recorded") -> None:
        """Until `recorded` is written: by the thread, or here when the thread has not taken it yet."""
        with self._changed:
            while not recorded.done():
                if not self._writing and any(entry[2] is recorded for entry in self._queue):
                    self._write_queued()
                else:
                    self._changed.wait()

    def _run(self) -> None:
        with self._changed:
            while True:
                if self._unlogged:
                    entries = self._unlogged.popleft()
                    self._changed.release()
                    try:
                        self.then([(item, result) for item, result, _ in entries])
                    finally:
                        self._changed.acquire()
                elif self._queue and not self._writing:
                    self._write_queued()
                elif self._closing and not self._queue and not self._writing:
                    return
                else:
                    self._changed.wait()

    def _write_queued(self) -> None:
        """Write every queued outcome (called holding the condition; writes without it)."""
        entries, self._writing = list(self._queue), True
        self._queue.clear()
        self._changed.release()
        try:
            go_on = self.on_results([(item, result) for item, result, _ in entries])
        except BaseException as exc:  # the sessions raise it at their next wait
            for *_, recorded in entries:
                recorded.set_exception(exc)
        else:
            for *_, recorded in entries:
                recorded.set_result(go_on is not False)
        finally:
            self._unlogged.append(entries)  # sent or refused, whether or not it could be recorded
            self._changed.acquire()
            self._writing = False
            self._changed.notify_all()


class _Recorded(Future):
    """The future of one outcome: waiting for it may write it (OutcomeWriter.wait)."""

    def __init__(self, writer: OutcomeWriter):
        super().__init__()
        self._writer = writer

    def result(self, timeout=None):
        self._writer.wait(self)
        return super().result(timeout)


def _over_smtp(settings, take, render, submit, halts: list, pool: Pool | None, tls_context, count: int) -> None:
    sessions = (pool.sessions if pool is not None else
                [SmtpSession(settings, tls_context) for _ in range(settings.smtp_connections)])[:max(count, 1)]
    failed = threading.Event()  # one connection's error stops the others' taking too

    def guarded_take(block: bool):
        return None if failed.is_set() else take(block)

    def run(session: SmtpSession) -> None:
        try:
            session.usable()  # a kept connection: closed here if idle too long or gone; send() reopens it
            session.send(guarded_take, render, submit)
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


def _locally(take, render, write, on_results) -> None:
    """The file and console backends: one message after the other, each outcome recorded before the next."""
    while (item := take(True)) is not None:
        try:
            result = write(item, render(item))
        except mailer.Unsendable as exc:
            result = exc.result
        if on_results([(item, result)]) is False:
            return
