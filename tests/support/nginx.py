"""A private nginx for tests: deploy/nginx.conf with its ports, upstream and certificate moved to tmp_path."""
from __future__ import annotations

import shutil
import signal
import subprocess
from pathlib import Path

from devtools.ports import free_ports
from support.env import ROOT
from devtools.waiting import wait_until

NGINX_HINT = "nginx is not installed: apt-get install nginx-light (.ci/run installs it)"
SITE = ROOT / "deploy" / "nginx.conf"


def nginx_binary() -> str | None:
    return shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")


class Nginx:
    """deploy/nginx.conf served on 127.0.0.1 (http_port, https_port), proxying to 127.0.0.1:`upstream_port`."""

    def __init__(self, directory: Path, upstream_port: int, cert_file: Path, key_file: Path, admin_allow: str = ""):
        """`admin_allow`: the lines of the /admin allow-list (deploy/admin-allow.conf), e.g. `127.0.0.1/32 1;`."""
        self.directory = directory
        self.http_port, self.https_port = free_ports(2)
        site = SITE.read_text(encoding="utf-8")
        replacements = [(r"server web:8000;", f"server 127.0.0.1:{upstream_port};"),
                        (r"listen 80;", f"listen 127.0.0.1:{self.http_port};"),
                        (r"listen 443 ssl;", f"listen 127.0.0.1:{self.https_port} ssl;"),
                        (r"/etc/nginx/tls/fullchain.pem", str(cert_file)),
                        (r"/etc/nginx/tls/privkey.pem", str(key_file)),
                        (r"/etc/nginx/wecom-mailer/admin-allow.conf", str(directory / "admin-allow.conf"))]
        (directory / "admin-allow.conf").write_text(admin_allow + "\n")
        for old, new in replacements:
            assert old in site, f"deploy/nginx.conf no longer has {old!r}: update tests/support/nginx.py"
            site = site.replace(old, new)
        (directory / "site.conf").write_text(site)
        temp = {name: directory / name for name in ("body", "proxy", "fastcgi", "uwsgi", "scgi")}
        for path in temp.values():
            path.mkdir(exist_ok=True)
        (directory / "nginx.conf").write_text(f"""
daemon off;
master_process off;
worker_processes 1;
pid {directory}/nginx.pid;
error_log {directory}/error.log info;
events {{ worker_connections 256; }}
http {{
    access_log {directory}/access.log;
    client_body_temp_path {temp['body']};
    proxy_temp_path {temp['proxy']};
    fastcgi_temp_path {temp['fastcgi']};
    uwsgi_temp_path {temp['uwsgi']};
    scgi_temp_path {temp['scgi']};
    include {directory}/site.conf;
}}
""")
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "Nginx":
        binary = nginx_binary()
        args = [binary, "-p", str(self.directory), "-c", str(self.directory / "nginx.conf"),
                "-e", str(self.directory / "error.log")]
        tested = subprocess.run(args + ["-t"], capture_output=True, text=True, timeout=30)
        assert tested.returncode == 0, f"nginx -t refused deploy/nginx.conf:\n{tested.stderr}"
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(self._listening, timeout=20, what="nginx to listen")
        return self

    def _listening(self) -> bool:
        assert self.proc.poll() is None, f"nginx exited:\n{self.error_log}"
        return self._connects()

    def _connects(self) -> bool:
        import socket

        try:
            with socket.create_connection(("127.0.0.1", self.https_port), timeout=1):
                return True
        except OSError:
            return False

    @property
    def error_log(self) -> str:
        path = self.directory / "error.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def __exit__(self, *exc) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)  # graceful: finish what is in flight
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
