"""A state database that hangs (accepts, never answers) still gets WeCom a 503 inside its 5 s, so WeCom retries;
/readyz says 503 as promptly."""
from __future__ import annotations

import select
import socket
import threading
from urllib.parse import urlencode

import pytest
import requests
import sqlalchemy as sa

from store import schema
import wecom
from support import TEST_CORP_ID
from support.reliability import prepare_database, reliability_env


class FreezableProxy:
    """TCP proxy on 127.0.0.1 to the MariaDB server; `frozen` holds every connection open and silent."""

    def __init__(self, upstream: tuple[str, int]):
        self.upstream = upstream
        self.frozen = threading.Event()
        self.closing = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        self.listener.settimeout(0.2)
        while not self.closing.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                continue
            threading.Thread(target=self._pump, args=(client,), daemon=True).start()

    def _pump(self, client: socket.socket) -> None:
        with client, socket.create_connection(self.upstream, timeout=5) as server:
            peers = {client: server, server: client}
            while not self.closing.is_set():
                if self.frozen.is_set():  # a hung server: the bytes stay where they are
                    self.closing.wait(0.05)
                    continue
                ready, _, _ = select.select(list(peers), [], [], 0.05)
                for sock in ready:
                    data = sock.recv(65536)
                    if not data:
                        return
                    peers[sock].sendall(data)

    def close(self) -> None:
        self.closing.set()
        self.listener.close()


def _packet(crypto, userid: str) -> dict:
    return crypto.encrypt(wecom.event_xml("create_user", userid, TEST_CORP_ID, "2"))


def _post(base: str, packet: dict) -> requests.Response:
    # WeCom waits 5 s: a slower answer is a timeout here, and fails the test.
    return requests.post(f"{base}/wecom/callback?{urlencode(packet['query'])}", data=packet["body"], timeout=5)


@pytest.mark.slow
def test_a_hung_database_gets_wecom_a_503_in_time_and_the_retry_is_recorded_once(
        standin, smtp_sink, mysql_url, processes, crypto):
    engine = prepare_database(mysql_url)
    url = sa.engine.make_url(mysql_url)
    proxy = FreezableProxy((url.host, url.port or 3306))
    try:
        through_proxy = url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
        env = reliability_env(standin, smtp_sink, through_proxy, WORKER_IN_WEB="false")
        _, base = processes.gunicorn(env)
        assert _post(base, _packet(crypto, "before")).text == "success"

        proxy.frozen.set()
        packets = [_packet(crypto, f"during{i}") for i in range(3)]
        hung = [_post(base, packet) for packet in packets]
        assert [(r.status_code, r.text.strip()) for r in hung] == [(503, "state database unavailable")] * 3
        assert requests.get(f"{base}/readyz", timeout=5).status_code == 503  # a probe's timeout is short too

        proxy.frozen.clear()
        retried = [_post(base, packet) for packet in packets]  # WeCom resends the same requests
        assert [r.text for r in retried] == ["success"] * 3
    finally:
        proxy.close()
    with engine.connect() as conn:
        users = conn.execute(sa.select(schema.events.c.user_id).order_by(schema.events.c.id)).scalars().all()
    assert users == ["before", "during0", "during1", "during2"]
