"""Prometheus metrics: counters per process (multiprocess mode under gunicorn), outbox gauges from the database.

The outbox gauges cost three aggregate queries; each process runs them at most once per GAUGE_SECONDS and
answers the scrapes in between from that reading, so a scrape (or a flood of them) is cheap.
"""
from __future__ import annotations

import os
import threading
import time
import weakref

import sqlalchemy as sa
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from sqlalchemy.exc import DBAPIError

from store.schema import (BOUNCE_KINDS, DELIVERY_OPEN, EVENT_OPEN, bounce_reports, deliveries, digests, events,
                          suppressions)

CALLBACKS = Counter("wecom_mailer_callbacks_total", "Callbacks answered, by outcome and reason",
                    ["outcome", "reason"])
ACK_SECONDS = Histogram("wecom_mailer_callback_seconds", "Time to answer a callback",
                        buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
CALLBACK_BATCHES = Histogram("wecom_mailer_callback_batch_rows",
                             "Callbacks recorded per INSERT (group commit): _count batches, _sum rows",
                             buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
DELIVERIES = Counter("wecom_mailer_deliveries_total", "Delivery attempts by outcome (sent, retry, failed)",
                     ["outcome"])
EVENTS = Counter("wecom_mailer_events_finished_total", "Events finished, by final status", ["status"])
DIGESTS = Counter("wecom_mailer_digests_total", "Digest mails by outcome (sent, retry, failed)", ["outcome"])
SENT_TODAY = Gauge("wecom_mailer_smtp_sent_today",
                   "Messages counted against SMTP_MAX_PER_DAY today (kept only while a daily limit is set)",
                   multiprocess_mode="mostrecent")
THROTTLE_PAUSES = Counter("wecom_mailer_smtp_throttle_pauses_total",
                          "Sending rounds stopped because the SMTP server kept refusing (throttling)")
ADMIN_LOGIN_FAILURES = Counter("wecom_mailer_admin_login_failures_total",
                               "Refused /admin logins, by reason (wrong_token, throttled)", ["reason"])
WECOM_CALLS = Counter("wecom_mailer_wecom_api_calls_total", "WeCom API calls by API and errcode",
                      ["api", "errcode"])
RECONCILE_ROUNDS = Counter("wecom_mailer_reconcile_rounds_total",
                           "Reconciliation rounds run by this process, by outcome (ok, failed)", ["outcome"])
RECONCILE_FAILURES = Counter("wecom_mailer_reconcile_failures_total",
                             "Department listings reconciliation did not act on: listing (WeCom failed or "
                             "refused), empty (an empty listing of a department with announced members)",
                             ["reason"])
RECONCILE_EVENTS = Counter("wecom_mailer_reconcile_events_total",
                           "Synthetic events recorded by reconciliation (changes whose callback never came)",
                           ["change_type"])


class Recorder:
    """What the worker and the WeCom client report; one per process."""

    @staticmethod
    def delivery(outcome: str) -> None:
        DELIVERIES.labels(outcome).inc()

    @staticmethod
    def event_finished(status: str) -> None:
        EVENTS.labels(status).inc()

    @staticmethod
    def digest(outcome: str) -> None:
        DIGESTS.labels(outcome).inc()

    @staticmethod
    def throttle_pause() -> None:
        THROTTLE_PAUSES.inc()

    @staticmethod
    def sent_today(count: int) -> None:
        SENT_TODAY.set(count)

    @staticmethod
    def wecom_call(api: str, errcode) -> None:
        WECOM_CALLS.labels(api, str(errcode)).inc()

    @staticmethod
    def reconcile_round(outcome: str) -> None:
        RECONCILE_ROUNDS.labels(outcome).inc()

    @staticmethod
    def reconcile_failure(reason: str) -> None:
        RECONCILE_FAILURES.labels(reason).inc()

    @staticmethod
    def reconcile_event(change_type: str) -> None:
        RECONCILE_EVENTS.labels(change_type).inc()


def callback(outcome: str, reason: str, seconds: float) -> None:
    CALLBACKS.labels(outcome, reason).inc()
    ACK_SECONDS.observe(seconds)


def callback_batch(rows: int) -> None:
    CALLBACK_BATCHES.observe(rows)


def admin_login_failed(reason: str) -> None:
    ADMIN_LOGIN_FAILURES.labels(reason).inc()


GAUGE_SECONDS = 15.0  # how long one reading of the outbox serves the scrapes of this process


class OutboxCollector:
    """Events and deliveries by status, queue depth and the age of the oldest open delivery."""

    def __init__(self, reading: "OutboxReading"):
        self.reading = reading

    def collect(self):
        up = GaugeMetricFamily("wecom_mailer_state_database_up", "1 when the state database answered the scrape")
        counts = self.reading.get()
        if counts is None:
            up.add_metric([], 0)
            yield up
            return
        by_event, by_delivery, oldest, next_digest, bounces, suppressed = counts
        up.add_metric([], 1)
        yield up
        for name, rows in (("events", by_event), ("deliveries", by_delivery)):
            family = GaugeMetricFamily(f"wecom_mailer_{name}", f"{name.capitalize()} in the outbox by status",
                                       labels=["status"])
            for status, count in rows:
                family.add_metric([status], count)
            yield family
        depth = sum(count for status, count in by_delivery if status in DELIVERY_OPEN)
        yield GaugeMetricFamily("wecom_mailer_queue_depth", "Open deliveries (pending or retry)", value=depth)
        held = sum(count for status, count in by_delivery if status == "held")
        yield GaugeMetricFamily("wecom_mailer_held_deliveries", "Deliveries held for a digest", value=held)
        yield GaugeMetricFamily("wecom_mailer_next_digest_seconds",
                                "Seconds until the next digest is due (0 when none waits or one is due)",
                                value=max(next_digest - time.time(), 0) if next_digest else 0)
        yield GaugeMetricFamily("wecom_mailer_oldest_open_event_seconds",
                                "Age of the oldest event not yet finished (0 when none)",
                                value=time.time() - oldest if oldest else 0)
        # Bounces (issue 20): read from the stored reports, so every process says the same, across restarts.
        total = CounterMetricFamily("wecom_mailer_bounces", "Bounce reports and refusals for good at send time, by "
                                    "kind (hard, soft, sender_blocked, ignored, delayed, unmatched)", labels=["kind"])
        for kind in BOUNCE_KINDS:
            total.add_metric([kind], bounces.get(kind, 0))
        yield total
        yield GaugeMetricFamily("wecom_mailer_suppressed_addresses", "Addresses not mailed because they bounced",
                                value=suppressed)


class OutboxReading:
    """The outbox counts of one engine, read from the database at most once per GAUGE_SECONDS."""

    def __init__(self, engine):
        self.engine = engine
        self._lock = threading.Lock()
        self._read_at = float("-inf")
        self._counts = None

    def get(self):
        """(events by status, deliveries by status, oldest open event's received_at, the next digest's due
        time, bounce reports by kind, suppressed addresses), or None: the database is down."""
        with self._lock:  # one query at a time per process, however many scrapes arrive together
            if time.monotonic() - self._read_at >= GAUGE_SECONDS:
                self._counts = self._query()
                # A failed reading is not kept: the next scrape asks again.
                self._read_at = time.monotonic() if self._counts is not None else float("-inf")
            return self._counts

    def _query(self):
        try:
            with self.engine.connect() as conn:
                by_event = conn.execute(sa.select(events.c.status, sa.func.count())
                                        .group_by(events.c.status)).all()
                by_delivery = conn.execute(sa.select(deliveries.c.status, sa.func.count())
                                           .group_by(deliveries.c.status)).all()
                oldest = conn.execute(sa.select(sa.func.min(events.c.received_at))
                                      .where(events.c.status.in_(EVENT_OPEN))).scalar()
                next_digest = conn.execute(sa.select(sa.func.min(digests.c.due_at))
                                           .where(digests.c.status == "collecting")).scalar()
                bounces = dict(conn.execute(sa.select(bounce_reports.c.kind, sa.func.count())
                                            .group_by(bounce_reports.c.kind)).all())
                suppressed = conn.execute(sa.select(sa.func.count()).select_from(suppressions)).scalar()
        except DBAPIError:
            return None
        return by_event, by_delivery, oldest, next_digest, bounces, suppressed


_readings: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_readings_lock = threading.Lock()


def _reading(engine) -> OutboxReading:
    with _readings_lock:
        reading = _readings.get(engine)
        if reading is None:
            reading = _readings[engine] = OutboxReading(engine)
        return reading


def exposition(engine) -> tuple[bytes, str]:
    """The /metrics body: every process's counters (multiprocess mode) plus the outbox gauges."""
    registry = CollectorRegistry()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.MultiProcessCollector(registry)
    else:
        from prometheus_client import REGISTRY

        registry = REGISTRY
    body = generate_latest(registry)
    body += generate_latest(_outbox_registry(engine))
    return body, CONTENT_TYPE_LATEST


def _outbox_registry(engine) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(OutboxCollector(_reading(engine)))
    return registry
