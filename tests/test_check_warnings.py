"""`check` warns about settings that work but expose a secret or the service (issue 14, findings 6 and 13)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

import config
from ops import checks
from support import ROOT, base_env

SMTP_PASSWORD = "smtp-password-for-warnings-1234"
ADMIN_TOKEN = "admin-token-for-warnings-0123456789abcdef"

CASES = [
    # (environment, BIND and the like, the words of the one warning expected, or None for no warning)
    ({}, {}, None),
    ({"WECOM_API_BASE": "http://qyapi.weixin.qq.com/cgi-bin/"}, {}, "WECOM_API_BASE=http://qyapi.weixin.qq.com/cgi-bin/ is plain HTTP"),
    ({"WECOM_API_BASE": "http://127.0.0.1:9000/cgi-bin/"}, {}, None),  # a stand-in or tunnel on this host
    ({"WECOM_API_BASE": "https://qyapi.weixin.qq.com/cgi-bin/"}, {}, None),
    ({"MAIL_BACKEND": "smtp", "SMTP_HOST": "smtp.qq.com", "SMTP_SECURITY": "none", "SMTP_USER": "it@qq.example",
      "SMTP_PASSWORD": SMTP_PASSWORD}, {}, "SMTP_SECURITY=none with SMTP_USER set: the SMTP password goes to smtp.qq.com in clear"),
    ({"MAIL_BACKEND": "smtp", "SMTP_HOST": "smtp.qq.com", "SMTP_SECURITY": "none"}, {}, None),  # no login
    ({"MAIL_BACKEND": "smtp", "SMTP_HOST": "127.0.0.1", "SMTP_SECURITY": "none", "SMTP_USER": "it@corp.example",
      "SMTP_PASSWORD": SMTP_PASSWORD}, {}, None),  # a relay on this host
    ({"MAIL_BACKEND": "smtp", "SMTP_HOST": "smtp.qq.com", "SMTP_SECURITY": "starttls", "SMTP_USER": "it@qq.example",
      "SMTP_PASSWORD": SMTP_PASSWORD}, {}, None),
    ({"ADMIN_TOKEN": ADMIN_TOKEN, "ADMIN_COOKIE_SECURE": "false"}, {}, "ADMIN_COOKIE_SECURE=false with ADMIN_TOKEN set"),
    ({"ADMIN_COOKIE_SECURE": "false"}, {}, None),  # no /admin at all
    ({"ADMIN_TOKEN": ADMIN_TOKEN}, {}, None),
    ({}, {"BIND": "0.0.0.0:8000"}, "BIND=0.0.0.0:8000 listens on a public address with no proxy declared"),
    ({}, {"BIND": "[::]:8000"}, "BIND=[::]:8000 listens on a public address"),
    ({}, {"BIND": "192.0.2.10:8000"}, "BIND=192.0.2.10:8000 listens on a public address"),
    ({"TRUSTED_PROXIES": "1"}, {"BIND": "0.0.0.0:8000"}, None),
    ({}, {"BIND": "0.0.0.0:8000", "FORWARDED_ALLOW_IPS": "10.0.0.5"}, None),
    ({}, {"BIND": "127.0.0.1:8000"}, None),
    ({}, {"BIND": "[::1]:8000"}, None),
    ({}, {"BIND": "unix:/run/wecom-mailer.sock"}, None),
    ({}, {"PORT": "9000"}, None),  # gunicorn.conf.py's default: 127.0.0.1
]


@pytest.mark.parametrize("env,process_env,expected", CASES, ids=[str({**e, **p}) or "defaults" for e, p, _ in CASES])
def test_config_warnings(env, process_env, expected):
    settings = config.from_env(base_env(**env))
    warnings = checks.config_warnings(settings, process_env)
    if expected is None:
        assert warnings == []
    else:
        (warning,) = warnings
        assert expected in warning
        assert any(fix in warning for fix in (" — use ", " — put ", ": run gunicorn behind")), warning
        assert SMTP_PASSWORD not in warning and ADMIN_TOKEN not in warning


def test_check_prints_the_warnings_after_the_checks_and_still_passes(service, service_env, tmp_path):
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "PYTHONPATH": str(ROOT), **service_env,
           "BIND": "0.0.0.0:8000", "ADMIN_TOKEN": ADMIN_TOKEN, "ADMIN_COOKIE_SECURE": "false"}
    result = subprocess.run([sys.executable, "-m", "flask", "--app", "app", "check"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=60)
    lines = result.stdout.splitlines()
    assert result.returncode == 0, result.stdout + result.stderr  # a warning is not a failed check
    assert [line[0] for line in lines] == ["✓"] * 8 + ["⚠"] * 2, lines  # 6 checks and 2 bounce lines (issue 20)
    assert lines[8].startswith("⚠ ADMIN_COOKIE_SECURE=false") and lines[9].startswith("⚠ BIND=0.0.0.0:8000")
    assert ADMIN_TOKEN not in result.stdout + result.stderr
