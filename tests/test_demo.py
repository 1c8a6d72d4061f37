"""`make demo` (`flask --app app demo`) runs on a machine with no configuration and shows every email."""
import os
import subprocess
import sys

from support import ROOT, base_env


def test_demo_runs_without_configuration_and_prints_the_emails():
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp")}
    result = subprocess.run([sys.executable, "-m", "flask", "--app", "app", "demo"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "5 of 5 emails written" in result.stdout and "1 WeCom message(s) sent to zhaoli" in result.stdout
    assert "--- WeCom application message (message/send, agentid 1000002)\ntouser:  zhaoli\n" in result.stdout
    assert result.stdout.count("Subject: 新增成员") == 5
    assert "新增成员 ID：wangxiaoming" in result.stdout and "To:      王小明 <wangxiaoming@corp.example>" in result.stdout


def test_demo_is_a_command_that_needs_no_configuration_and_says_what_it_does(tmp_path):
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp")}
    configured = {**env, **base_env(DATABASE_URL=f"sqlite:///{tmp_path / 'state.db'}")}
    listing = subprocess.run([sys.executable, "-m", "flask", "--app", "app", "--help"], cwd=ROOT, env=configured,
                             capture_output=True, text=True, timeout=60)
    assert "  demo " in listing.stdout and "  worker " in listing.stdout
    result = subprocess.run([sys.executable, "-m", "flask", "--app", "app", "demo", "--help"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())  # click wraps the help at the terminal width
    assert "embedded defaults" in text and "make demo" in text
