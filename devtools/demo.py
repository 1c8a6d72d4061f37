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
# WeCom withholds this member's address: with WECOM_MESSAGE=fallback a WeCom application message reaches her.
NO_ADDRESS = {"userid": "zhaoli", "name": "赵丽", "department": [DEPARTMENT], "email": "", "biz_mail": ""}
DEMO_AGENT_ID = 1000002


def demo_env(api_base: str, port: int, corp_id: str, secret: str, app_secret: str) -> dict[str, str]:
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
        # WeCom application messages for whom email cannot reach (the stand-in's self-built app).
        "WECOM_MESSAGE": "fallback", "WECOM_AGENT_ID": str(DEMO_AGENT_ID), "WECOM_APP_SECRET": app_secret,
        "WECOM_MESSAGE_MAX_PER_DAY": "",
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
    corp_id, secret, app_secret = "wwdemo" + secrets.token_hex(6), secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    with WeComStandIn(corp_id, secret, {DEPARTMENT: members + [NO_ADDRESS]}) as standin:
        standin.enable_app(DEMO_AGENT_ID, app_secret)
        env = demo_env(standin.api_base, port, corp_id, secret, app_secret)
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
            step(f"waiting for the WeCom message to {NO_ADDRESS['name']} ({NO_ADDRESS['userid']}), who has no address")
            messages = wait_for_messages(standin, timeout=30)
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
    for call in messages:
        show_message(call)
    subprocess.run(flask + ["status"], cwd=ROOT, env=env)
    ok = len(written) == len(members) and len(messages) == 1
    step(f"{len(written)} of {len(members)} emails written to {DEMO_DIR / 'outbox'}, {len(messages)} WeCom "
         f"message(s) sent to {NO_ADDRESS['userid']}" + ("" if ok else " — FAILED"))
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


def wait_for_messages(standin: WeComStandIn, timeout: float) -> list[dict]:
    """What the stand-in's message/send received (it records every call)."""
    deadline = time.monotonic() + timeout
    while not standin.message_calls and time.monotonic() < deadline:
        time.sleep(0.2)
    return list(standin.message_calls)


def show_message(call: dict) -> None:
    request = call["request"]
    print(f"\n--- WeCom application message (message/send, agentid {request['agentid']})\n"
          f"touser:  {request['touser']}\nmsgtype: {request['msgtype']}, safe {request['safe']}, "
          f"enable_duplicate_check {request['enable_duplicate_check']} "
          f"({request['duplicate_check_interval']} s)\n\n{request['text']['content']}")


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
