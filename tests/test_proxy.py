"""Slow clients (finding 6): behind deploy/nginx.conf in a real nginx, five slow uploads leave /healthz and the
callback answering; straight at gunicorn, the same five take every thread. Also ProxyFix's client address."""
from __future__ import annotations

import socket
import ssl
from contextlib import ExitStack
from urllib.parse import urlencode

import pytest
import requests

import wecom
from support import DEPARTMENT, TEST_CORP_ID, base_env, wait_until
from support.nginx import NGINX_HINT, Nginx, nginx_binary

SLOW_CLIENTS = 5  # one more than a gunicorn worker's threads (GUNICORN_THREADS=4)
PROBE_TIMEOUT = 3.0  # seconds a probe waits: /healthz for Docker's HEALTHCHECK, the callback inside WeCom's 5 s


def slow_upload(port: int, tls: ssl.SSLContext | None = None) -> socket.socket:
    """A client that announces 1000 bytes of body and sends 3 (the review's reproduction), left open."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    if tls is not None:
        sock = tls.wrap_socket(sock, server_hostname="localhost")
    sock.sendall(b"POST /wecom/callback?msg_signature=x&timestamp=1&nonce=1 HTTP/1.1\r\nHost: localhost\r\n"
                 b"Content-Type: text/xml\r\nContent-Length: 1000\r\n\r\n<xm")
    return sock


def healthz_answers(base: str) -> bool:
    try:
        return requests.get(f"{base}/healthz", timeout=PROBE_TIMEOUT).status_code == 200
    except requests.Timeout:
        return False


@pytest.fixture
def tls_files(tmp_path):
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    cert_file, key_file, ca_file = tmp_path / "fullchain.pem", tmp_path / "privkey.pem", tmp_path / "ca.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(key_file))
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    ca.cert_pem.write_to_path(str(ca_file))
    return cert_file, key_file, ca_file


@pytest.mark.slow
def test_behind_nginx_slow_uploads_leave_healthz_and_the_callback_answering(processes, crypto, tls_files, tmp_path):
    if nginx_binary() is None:
        pytest.skip(NGINX_HINT)
    cert_file, key_file, ca_file = tls_files
    env = base_env(DATABASE_URL=f"sqlite:///{tmp_path / 'state.db'}", TRUSTED_PROXIES="1", GUNICORN_THREADS="4")
    gunicorn, base = processes.gunicorn(env, workers=1)
    port = int(base.rpartition(":")[2])

    # Straight at gunicorn, the review's finding: five slow uploads and /healthz does not answer.
    with ExitStack() as hold:
        for _ in range(SLOW_CLIENTS):
            hold.callback(slow_upload(port).close)
        assert not healthz_answers(base), "the slow clients did not tie gunicorn up: this test proves nothing"
    wait_until(lambda: healthz_answers(base), timeout=30, what="gunicorn to recover once the clients went")

    # Through nginx: the same five are nginx's problem.
    nginx_dir = tmp_path / "nginx"
    nginx_dir.mkdir()
    with Nginx(nginx_dir, port, cert_file, key_file) as nginx, ExitStack() as hold:
        tls = ssl.create_default_context(cafile=str(ca_file))
        for _ in range(SLOW_CLIENTS):
            hold.callback(slow_upload(nginx.https_port, tls).close)
        proxy = f"https://localhost:{nginx.https_port}"
        for n in range(3):
            assert healthz_answers(base), f"/healthz did not answer within {PROBE_TIMEOUT} s behind nginx"
            packet = crypto.encrypt(wecom.event_xml("create_user", f"user{n:04d}", TEST_CORP_ID, str(DEPARTMENT)))
            answer = requests.post(f"{proxy}/wecom/callback?{urlencode(packet['query'])}", data=packet["body"],
                                   headers={"Content-Type": "text/xml"}, timeout=PROBE_TIMEOUT, verify=str(ca_file))
            assert (answer.status_code, answer.text) == (200, "success"), nginx.error_log[-2000:]
        # What the shipped file also promises: internal endpoints stay internal, plain HTTP is redirected.
        assert requests.get(f"{proxy}/metrics", timeout=PROBE_TIMEOUT, verify=str(ca_file)).status_code == 404
        redirect = requests.get(f"http://127.0.0.1:{nginx.http_port}/wecom/callback", timeout=PROBE_TIMEOUT,
                                allow_redirects=False)
        assert redirect.status_code == 301 and redirect.headers["Location"].startswith("https://")
    assert "event 1 create_user userid=user0000: recorded" in gunicorn.log


def test_behind_trusted_proxies_the_logs_name_the_client_not_the_proxy(make_app, caplog):
    client = make_app(TRUSTED_PROXIES="1").test_client()
    client.post("/wecom/callback", data=b"<xml/>", headers={"X-Forwarded-For": "203.0.113.9"})
    assert "from 203.0.113.9" in caplog.text
    caplog.clear()
    direct = make_app().test_client()  # no proxy declared: the header is the client's own word
    direct.post("/wecom/callback", data=b"<xml/>", headers={"X-Forwarded-For": "203.0.113.9"})
    assert "from 127.0.0.1" in caplog.text and "203.0.113.9" not in caplog.text


def test_x_forwarded_proto_counts_only_from_a_trusted_proxy(make_app):
    from flask import request

    for env, expected in (({"TRUSTED_PROXIES": "1"}, "https"), ({}, "http")):
        app = make_app(**env)
        app.add_url_rule("/scheme", "scheme", lambda: request.scheme)
        assert app.test_client().get("/scheme", headers={"X-Forwarded-Proto": "https"}).text == expected
