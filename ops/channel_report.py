"""The two channels in `status` and /admin: deliveries by channel and status, and what keeps WeCom messages
from going, in the admin's words (channels/wecom_message.py EXPLAINED)."""
from __future__ import annotations

import sqlalchemy as sa

from channels import wecom_message
from store.channel_rows import channel_counts
from store.schema import deliveries

CHANNELS = ("email", "wecom")


def totals(engine) -> dict[str, dict[str, int]]:
    """channel → status → deliveries, over the whole outbox (both channels always present)."""
    out: dict[str, dict[str, int]] = {channel: {} for channel in CHANNELS}
    for (channel, status), n in channel_counts(engine).items():
        out.setdefault(channel, {})[status] = n
    return out


def problems(engine, limit: int = 5) -> list[tuple[str, int]]:
    """The commonest reasons WeCom deliveries failed or wait (configuration errors first), with counts."""
    with engine.connect() as conn:
        rows = conn.execute(sa.select(deliveries.c.reason, sa.func.count())
                            .where(deliveries.c.channel == "wecom", deliveries.c.status.in_(("failed", "retry")),
                                   deliveries.c.reason.is_not(None))
                            .group_by(deliveries.c.reason).order_by(sa.func.count().desc()).limit(50)).all()
    explained = set(wecom_message.EXPLAINED.values())
    ranked = sorted(rows, key=lambda r: (r[0] not in explained, -r[1]))
    return [(reason, n) for reason, n in ranked[:limit]]


def lines(engine) -> list[str]:
    """`status`'s lines about the channels (nothing while no WeCom delivery exists)."""
    by_channel = totals(engine)
    if not by_channel.get("wecom"):
        return []
    out = ["channels: " + "; ".join(
        f"{channel}: " + (", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "none")
        for channel, counts in by_channel.items())]
    out += [f"  WeCom messages: {n} × {reason}" for reason, n in problems(engine)]
    return out
