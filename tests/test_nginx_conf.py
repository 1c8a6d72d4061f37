"""Security round three (issue 24), item 5: deploy/nginx.conf in a real nginx. /admin admits only the ranges an
operator names (none by default), nginx tells no version, and the login and the callback are rate-limited."""
from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests

from support.nginx import NGINX_HINT, Nginx, nginx_binary
from test_proxy import tls_files  # noqa: F401  (the fixture: a private CA and a certificate for localhost)


class _Upstream(BaseHTTPRequestHandler):
    """Stands in for gunicorn: 200 for everything nginx lets through."""

    def _answer(self):
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    do_GET = do_POST = _answer

    def log_message(self, *args):
        pass


@pytest.fixture
def upstream():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Upstream)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


@pytest.fixture
def nginx_at(tmp_path, upstream, tls_files):  # noqa: F811
    if nginx_binary() is None:
        pytest.skip(NGINX_HINT)
    cert_file, key_file, ca_file = tls_files

    def start(admin_allow: str = ""):
        directory = tmp_path / f"nginx{len(list(tmp_path.glob('nginx*')))}"
        directory.mkdir()
        return Nginx(directory, upstream, cert_file, key_file, admin_allow=admin_allow), str(ca_file)
    return start


def test_admin_is_denied_unless_the_operator_names_a_range_and_nginx_tells_no_version(nginx_at):
    nginx, ca = nginx_at()
    with nginx:
        base = f"https://localhost:{nginx.https_port}"
        denied = requests.get(f"{base}/admin/login", verify=ca, timeout=5)
        assert denied.status_code == 403  # even from 127.0.0.1: the shipped list is empty
        assert denied.headers["Server"] == "nginx" and "nginx/" not in denied.text
    allowed, ca = nginx_at("127.0.0.1/32 1;")
    with allowed:
        response = requests.get(f"https://localhost:{allowed.https_port}/admin/login", verify=ca, timeout=5)
        assert response.status_code == 200 and response.text == "ok"


def test_the_login_and_the_callback_are_rate_limited(nginx_at):
    nginx, ca = nginx_at("127.0.0.1/32 1;")
    with nginx, requests.Session() as session:
        base = f"https://localhost:{nginx.https_port}"
        logins = [session.post(f"{base}/admin/login", data={"token": "x"}, verify=ca, timeout=5).status_code
                  for _ in range(40)]
        assert 200 in logins and 429 in logins, logins
        callbacks = [session.post(f"{base}/wecom/callback", data=b"<xml/>", verify=ca, timeout=5).status_code
                     for _ in range(400)]
        assert callbacks[:50] == [200] * 50 and 429 in callbacks  # WeCom's bursts pass, a flood does not
        assert session.get(f"{base}/admin/", verify=ca, timeout=5).status_code == 200  # pages are not limited
