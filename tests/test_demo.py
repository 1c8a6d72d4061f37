"""`make demo` runs on a machine with no configuration and shows every email."""
import os
import subprocess
import sys

from conftest import ROOT


def test_demo_runs_without_configuration_and_prints_the_emails():
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp")}
    result = subprocess.run([sys.executable, "-m", "flask", "--app", "app", "demo"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "5 of 5 emails written" in result.stdout
    assert result.stdout.count("Subject: 新增成员") == 5
    assert "新增成员 ID：wangxiaoming" in result.stdout and "To:      王小明 <wangxiaoming@corp.example>" in result.stdout
