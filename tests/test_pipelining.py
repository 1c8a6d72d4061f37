"""RFC 2920 pipelining against real SMTP servers (aiosmtpd advertising PIPELINING): one round trip per
message, every reply still matched to its command, and no message accepted before the previous outcome.
The failure cases run against pipelined and one-command-at-a-time servers, in plain text, STARTTLS and TLS."""
from __future__ import annotations

import asyncio
import ssl

import pytest
import trustme

import config
from delivery.sending import send_batch
from devtools.latency_proxy import LatencyProxy
from mailer import Outgoing, SendResult
from support import base_env
from support.smtp_server import SmtpSink

N = 20


def smtp_settings(port: int, **env) -> config.Settings:
    env = {"SMTP_SECURITY": "none", "SMTP_TIMEOUT_SECONDS": "5", **env}
    return config.from_env(base_env(MAIL_BACKEND="smtp", SMTP_HOST="127.0.0.1", SMTP_PORT=port, **env))


def members(n: int = N) -> list[Outgoing]:
    return [Outgoing(i, f"user{i}@corp.example", f"Member {i}", "Welcome", f"Hello {i}\n.a line with a dot\n")
            for i in range(1, n + 1)]


def send(settings, items, **kwargs):
    results = []
    halt = send_batch(settings, items, lambda outcomes: results.extend((i.delivery_id, r) for i, r in outcomes),
                      **kwargs)
    return results, halt


class Server:
    """A test SMTP server and the settings that reach it (its CA trusted through SMTP_CA_FILE)."""

    def __init__(self, sink: SmtpSink, settings: config.Settings):
        self.sink, self.settings = sink, settings


@pytest.fixture(scope="module")
def ca():
    return trustme.CA()


MODES = [(pipelining, security) for pipelining in (True, False) for security in ("none", "starttls", "ssl")]


def _mode_id(mode) -> str:
    return f"{'pipelined' if mode[0] else 'one-by-one'}-{mode[1]}"


def serving(ca, tmp_path, pipelining: bool, security: str, sink_class=SmtpSink):
    """The server of one mode, as a context manager yielding a Server."""
    import contextlib

    @contextlib.contextmanager
    def run():
        options, env = {}, {}
        if security != "none":
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ca.issue_cert("127.0.0.1").configure_cert(context)
            options = ({"starttls_context": context, "require_starttls": True} if security == "starttls"
                       else {"tls_context": context})
            ca_file = tmp_path / "ca.pem"
            ca.cert_pem.write_to_path(str(ca_file))
            env = {"SMTP_SECURITY": security, "SMTP_CA_FILE": str(ca_file)}
        with sink_class(pipelining=pipelining, **options) as sink:
            yield Server(sink, smtp_settings(sink.port, **env))
    return run()


@pytest.fixture(params=MODES, ids=_mode_id)
def server(request, ca, tmp_path):
    with serving(ca, tmp_path, *request.param) as running:
        yield running


@pytest.mark.parametrize("setting, advertised, turns_per_message", [
    ("auto", True, 1), ("off", True, 4), ("auto", False, 4)])
def test_one_round_trip_per_message_when_the_server_offers_pipelining(setting, advertised, turns_per_message):
    with SmtpSink(pipelining=advertised) as server, LatencyProxy(("127.0.0.1", server.port)) as proxy:
        results, halt = send(smtp_settings(proxy.port, SMTP_PIPELINING=setting), members())

    assert halt is None and [r for _, r in results] == [SendResult(ok=True)] * N
    assert [m["X-RcptTo"] for m in server.messages] == [f"user{i}@corp.example" for i in range(1, N + 1)]
    assert server.messages[0].get_content().replace("\r\n", "\n") == "Hello 1\n.a line with a dot\n"  # dot-stuffed
    # EHLO and the first envelope are two turns; the rest is per message.
    assert N * turns_per_message <= proxy.turns <= N * turns_per_message + 3, proxy.turns


def test_a_refused_recipient_in_a_group_fails_that_one_and_its_data_is_not_taken_for_a_success(server):
    pipelined = server.sink
    pipelined.reject("user5@corp.example", "550 5.1.1 no such user")
    pipelined.reject("user9@corp.example", "450 4.2.1 mailbox busy")

    results, halt = send(server.settings, members())

    outcome = dict(results)
    assert outcome[5] == SendResult(ok=False, permanent=True, reason="550 5.1.1 no such user")
    assert outcome[9] == SendResult(ok=False, permanent=False, reason="450 4.2.1 mailbox busy")
    assert all(outcome[i].ok for i in range(1, N + 1) if i not in (5, 9))
    got = [m["X-RcptTo"] for m in pipelined.messages]
    assert got == [f"user{i}@corp.example" for i in range(1, N + 1) if i not in (5, 9)]
    assert halt is None and pipelined.connections == 1  # RSET in the next group, on over the same connection


def test_421_mid_group_closes_the_connection_and_the_rest_reconnects(server):
    pipelined = server.sink
    pipelined.reject("user7@corp.example", "421 4.7.0 closing, too many errors")

    results, halt = send(server.settings, members())

    outcome = dict(results)
    assert not outcome[7].ok and not outcome[7].permanent and outcome[7].reason.startswith("421")
    assert sorted(m["X-RcptTo"] for m in pipelined.messages) == sorted(
        f"user{i}@corp.example" for i in range(1, N + 1) if i != 7)
    assert halt is None and pipelined.connections == 2


def test_a_connection_dropped_after_the_content_leaves_that_message_unconfirmed_and_loses_nothing(server):
    pipelined = server.sink

    def drop_at_member_4(session, envelope):
        if envelope.rcpt_tos == ["user4@corp.example"]:
            pipelined.drop_after_content(1)

    pipelined.on_data = drop_at_member_4

    results, halt = send(server.settings, members(8))

    outcome = dict(results)
    assert not outcome[4].ok and not outcome[4].permanent and "may have arrived" in outcome[4].reason
    assert all(outcome[i].ok for i in (1, 2, 3, 5, 6, 7, 8)) and len(outcome) == 8
    # Member 4's content reached the server, which dropped the connection before answering: it may be kept
    # or not; it is never confirmed. Everyone else arrives exactly once, over a second connection.
    others = [m["X-RcptTo"] for m in pipelined.messages if m["X-RcptTo"] != "user4@corp.example"]
    assert sorted(others) == sorted(f"user{i}@corp.example" for i in (1, 2, 3, 5, 6, 7, 8))
    assert halt is None and pipelined.connections == 2


class Slow(SmtpSink):
    async def handle_DATA(self, server, session, envelope):
        await asyncio.sleep(0.05)
        return await super().handle_DATA(server, session, envelope)


@pytest.mark.parametrize("mode", MODES, ids=_mode_id)
def test_a_slow_server_gets_every_message_once(ca, tmp_path, mode):
    import dataclasses

    with serving(ca, tmp_path, *mode, sink_class=Slow) as slow:
        results, halt = send(dataclasses.replace(slow.settings, smtp_connections=2), members(10))

    assert halt is None and sorted(i for i, r in results if r.ok) == list(range(1, 11))
    assert sorted(m["X-RcptTo"] for m in slow.sink.messages) == sorted(f"user{i}@corp.example" for i in range(1, 11))


@pytest.mark.parametrize("security", ["starttls", "ssl"])
def test_pipelining_over_tls_with_login(ca, security, tmp_path):
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_tls)
    options = {"starttls_context": server_tls, "require_starttls": True} if security == "starttls" \
        else {"tls_context": server_tls}
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    with SmtpSink(pipelining=True, auth={"mailer@corp.example": "auth-code-1234"}, **options) as server, \
            LatencyProxy(("127.0.0.1", server.port)) as proxy:
        settings = smtp_settings(proxy.port, SMTP_SECURITY=security, SMTP_USER="mailer@corp.example",
                                 SMTP_PASSWORD="auth-code-1234", MAIL_FROM="", SMTP_CA_FILE=str(ca_file))
        results, halt = send(settings, members(10))

    assert halt is None and [r.ok for _, r in results] == [True] * 10
    assert len(server.messages) == 10 and server.logins == 1
    assert proxy.turns <= 10 + 8  # TLS and AUTH take a few turns; the messages one each


@pytest.mark.parametrize("advertised", [True, False], ids=["pipelined", "one-by-one"])
def test_an_outcome_that_cannot_be_recorded_cuts_the_connection_and_the_next_batch_starts_clean(advertised):
    from smtp_session import Pool

    with SmtpSink(pipelining=advertised) as server:
        settings = smtp_settings(server.port)
        pool = Pool(settings)

        def database_gone_at_2(outcomes):
            if any(item.delivery_id == 2 for item, _ in outcomes):
                raise RuntimeError("database is gone")

        with pytest.raises(RuntimeError, match="database is gone"):
            send_batch(settings, members(5), database_gone_at_2, pool=pool)
        # Message 3's content never followed (pipelined: its commands went out with 2's end; one by one: it never
        # started): the server kept nothing of it, and the connection is not kept for the next batch (whose
        # commands would be read as data after a staged DATA).
        assert [m["X-RcptTo"] for m in server.messages] == ["user1@corp.example", "user2@corp.example"]
        assert [session.smtp for session in pool.sessions] == [None]

        results, halt = send(settings, members(3), pool=pool)  # the same pool: a fresh connection
        pool.close()
    assert halt is None and [r.ok for _, r in results] == [True] * 3
    assert [m["X-RcptTo"] for m in server.messages][2:] == [f"user{i}@corp.example" for i in (1, 2, 3)]
    assert all("MAIL FROM" not in m.get_content() for m in server.messages)
    assert server.connections == 2
