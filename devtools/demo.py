"""`make demo` (`flask --app app demo`): the whole scenario on embedded defaults, no credentials, nothing leaves 127.0.0.1.

Starts the WeCom API stand-in with a small department, seeds the original templates in SQLite,
runs the real service under gunicorn on a free loopback port, sends an encrypted create_user with
`flask simulate`, waits for the delivery and prints every email the file backend wrote.
"""
from __future__ import annotations

import base64
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from email import policy
from email.parser import BytesParser
from pathlib import Path

import requests

import click

from devtools.ports import free_port
from devtools.wecom_standin import WeComStandIn, make_members

ROOT = Path(__file__).resolve().parent.parent
DEMO_DIR = ROOT / "var" / "demo"
DEPARTMENT = 2
NEW_MEMBER = {"userid": "wangxiaoming", "name": "王小明", "department": [DEPARTMENT],
              "email": "wangxiaoming@corp.example", "biz_mail": ""}


def demo_env(api_base: str, port: int, corp_id: str, secret: str) -> dict[str, str]:
    """Embedded defaults: fresh random credentials each run, SQLite, the file mail backend."""
    return {
        **os.environ,
        "WECOM_CORP_ID": corp_id,
        "WECOM_CONTACT_SECRET": secret,
        "WECOM_CALLBACK_TOKEN": secrets.token_hex(8),
        "WECOM_CALLBACK_AES_KEY": base64.b64encode(secrets.token_bytes(32)).decode()[:43],
        "WECOM_DEPARTMENT_ID": str(DEPARTMENT),
        "WECOM_API_BASE": api_base,
        "DATABASE_URL": f"sqlite:///{DEMO_DIR / 'state.db'}",
        # Set, even when empty, so that a .env in the working directory cannot leak into the demo.
        "TEMPLATE_DATABASE_URL": f"sqlite:///{DEMO_DIR / 'state.db'}",
        "TEMPLATE_TABLE": "", "TEMPLATE_APP": "", "NOTIFY_SCOPE": "", "EMAIL_SOURCES": "", "EMAIL_PATTERN": "",
        "WECOM_FETCH_CHILD": "", "ADMIN_TOKEN": "", "CALLBACK_PATH": "", "WORKER_IN_WEB": "true",
        "MAIL_BACKEND": "file",
        "MAIL_FILE_DIR": str(DEMO_DIR / "outbox"),
        "MAIL_FROM": "IT 部 <it@corp.example>",
        "WEB_CONCURRENCY": "1",
        "BIND": f"127.0.0.1:{port}",
        "RETRY_BACKOFF_SECONDS": "1",
    }


def step(text: str) -> None:
    print(f"\n== {text}", flush=True)


def main() -> int:
    """Run the demo; 0 when every member's email was written."""
    if DEMO_DIR.exists():
        shutil.rmtree(DEMO_DIR)
    DEMO_DIR.mkdir(parents=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}/wecom/callback"
    members = make_members(4, DEPARTMENT) + [NEW_MEMBER]
    corp_id, secret = "wwdemo" + secrets.token_hex(6), secrets.token_urlsafe(32)
    with WeComStandIn(corp_id, secret, {DEPARTMENT: members}) as standin:
        env = demo_env(standin.api_base, port, corp_id, secret)
        flask = [sys.executable, "-m", "flask", "--app", "app"]

        step("creating the state tables and the original ipaas_email_template rows (SQLite)")
        subprocess.run(flask + ["init-db", "--seed-templates"], cwd=ROOT, env=env, check=True)

        step(f"starting the service: gunicorn 'app:create_app()' on 127.0.0.1:{port}")
        server = subprocess.Popen([sys.executable, "-m", "gunicorn", "app:create_app()"], cwd=ROOT, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            if not wait_ready(f"http://127.0.0.1:{port}/readyz", server):
                print(server.stdout.read() if server.poll() is not None else "", file=sys.stderr)
                print("the service did not become ready", file=sys.stderr)
                return 1
            step("WeCom's URL check, then a create_user event for 王小明 (wangxiaoming), encrypted and signed")
            subprocess.run(flask + ["simulate", "--url", url, "--verify"], cwd=ROOT, env=env, check=True)
            subprocess.run(flask + ["simulate", "--url", url, "--change-type", "create_user",
                                    "--user-id", NEW_MEMBER["userid"]], cwd=ROOT, env=env, check=True)
            step(f"waiting for {len(members)} emails (one per member of department {DEPARTMENT})")
            written = wait_for_files(DEMO_DIR / "outbox", len(members), timeout=30)
        finally:
            server.send_signal(signal.SIGTERM)
            try:
                log, _ = server.communicate(timeout=20)
            except subprocess.TimeoutExpired:
                server.kill()
                log, _ = server.communicate()
    step("service log (excerpt)")
    print("\n".join(line for line in log.splitlines() if "wecom_mailer" in line)[-3000:])
    for path in written:
        show(path)
    subprocess.run(flask + ["status"], cwd=ROOT, env=env)
    ok = len(written) == len(members)
    step(f"{len(written)} of {len(members)} emails written to {DEMO_DIR / 'outbox'}" + ("" if ok else " — FAILED"))
    return 0 if ok else 1


def wait_ready(url: str, server: subprocess.Popen, timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and server.poll() is None:
        try:
            if requests.get(url, timeout=1).status_code == 200:
                return True
        except requests.RequestException:
            pass
        time.sleep(0.2)
    return False


def wait_for_files(directory: Path, count: int, timeout: float) -> list[Path]:
    deadline = time.monotonic() + timeout
    while True:
        files = sorted(directory.glob("*.eml")) if directory.exists() else []
        if len(files) >= count or time.monotonic() > deadline:
            return files
        time.sleep(0.2)


def show(path: Path) -> None:
    message = BytesParser(policy=policy.default).parse(path.open("rb"))
    print(f"\n--- {path.name}\nFrom:    {message['From']}\nTo:      {message['To']}\n"
          f"Subject: {message['Subject']}\nDate:    {message['Date']}\n\n{message.get_content().rstrip()}")


@click.command("demo")
def command() -> None:
    """Run the whole scenario on embedded defaults and print the emails (what `make demo` runs)."""
    sys.exit(main())


if __name__ == "__main__":
    sys.exit(main())
