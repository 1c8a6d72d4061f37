"""Prometheus metrics: counters per process (multiprocess mode under gunicorn), outbox gauges read at scrape time."""
from __future__ import annotations

import os
import time

import sqlalchemy as sa
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from sqlalchemy.exc import DBAPIError

from store.schema import DELIVERY_OPEN, EVENT_OPEN, deliveries, digests, events

CALLBACKS = Counter("wecom_mailer_callbacks_total", "Callbacks answered, by outcome and reason",
                    ["outcome", "reason"])
ACK_SECONDS = Histogram("wecom_mailer_callback_seconds", "Time to answer a callback",
                        buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
DELIVERIES = Counter("wecom_mailer_deliveries_total", "Delivery attempts by outcome (sent, retry, failed)",
                     ["outcome"])
EVENTS = Counter("wecom_mailer_events_finished_total", "Events finished, by final status", ["status"])
DIGESTS = Counter("wecom_mailer_digests_total", "Digest mails by outcome (sent, retry, failed)", ["outcome"])
THROTTLE_PAUSES = Counter("wecom_mailer_smtp_throttle_pauses_total",
                          "Sending rounds stopped because the SMTP server kept refusing (throttling)")
WECOM_CALLS = Counter("wecom_mailer_wecom_api_calls_total", "WeCom API calls by API and errcode",
                      ["api", "errcode"])


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
    def wecom_call(api: str, errcode) -> None:
        WECOM_CALLS.labels(api, str(errcode)).inc()


def callback(outcome: str, reason: str, seconds: float) -> None:
    CALLBACKS.labels(outcome, reason).inc()
    ACK_SECONDS.observe(seconds)


class OutboxCollector:
    """Events and deliveries by status, queue depth and the age of the oldest open delivery."""

    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        up = GaugeMetricFamily("wecom_mailer_state_database_up", "1 when the state database answered the scrape")
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
        except DBAPIError:
            up.add_metric([], 0)
            yield up
            return
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
    registry.register(OutboxCollector(engine))
    return registry
