"""Real service processes (gunicorn, `flask worker`) started by a test, with their output kept in a file."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import requests

from devtools.ports import free_port
from support.env import ROOT
from devtools.waiting import wait_until


class Process:
    """One service process; `log` is what it printed so far."""

    def __init__(self, args, env, log_path, cwd: Path = ROOT):
        self.log_path = Path(log_path)
        self._log = open(log_path, "ab")
        full_env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"), **env}
        self.proc = subprocess.Popen(args, cwd=cwd, env=full_env, stdout=self._log, stderr=subprocess.STDOUT)

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, signum):
        self.proc.send_signal(signum)

    def stop(self, timeout: float = 20):
        """SIGTERM, then SIGKILL if it has not exited within `timeout` seconds."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._log.close()


class Launcher:
    """Starts processes in `directory`; stop_all() ends them (the `processes` fixture calls it)."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.started: list[Process] = []

    def gunicorn(self, env, workers: int = 1, port: int | None = None, cwd: Path = ROOT) -> tuple[Process, str]:
        """`gunicorn 'app:create_app()'` on 127.0.0.1 (the repository's gunicorn.conf.py applies); its base URL.
        `cwd`: another checkout of the service (an older release) to run instead."""
        port = port or free_port()
        args = [sys.executable, "-m", "gunicorn", "app:create_app()", "-b", f"127.0.0.1:{port}",
                "--workers", str(workers), "--no-control-socket"]
        process = self._start(args, env, f"gunicorn-{port}.log", cwd)
        base = f"http://127.0.0.1:{port}"
        wait_http(base + "/healthz", process)
        return process, base

    def worker(self, env, name: str = "worker", cwd: Path = ROOT) -> Process:
        """`flask --app app worker`: delivery only (from `cwd`, another checkout, when given)."""
        return self._start([sys.executable, "-m", "flask", "--app", "app", "worker"], env,
                           f"{name}-{len(self.started)}.log", cwd)

    def _start(self, args, env, log_name: str, cwd: Path = ROOT) -> Process:
        process = Process(args, env, self.directory / log_name, cwd)
        self.started.append(process)
        return process

    def stop_all(self) -> None:
        for process in self.started:
            process.stop()


def wait_http(url: str, process: Process | None = None, timeout: float = 30) -> None:
    """Wait until `url` answers at all (any status); fail at once if `process` exits meanwhile."""
    def answers():
        if process is not None and process.proc.poll() is not None:
            raise AssertionError(f"process exited early:\n{process.log[-3000:]}")
        try:
            requests.get(url, timeout=1)
            return True
        except requests.RequestException:
            return False
    wait_until(answers, timeout=timeout, interval=0.1, what=f"{url} to answer")
