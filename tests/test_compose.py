"""Security round three (issue 24), item 9: compose has no fixed database password and pulls images by digest;
`make serve` and `make demo` install from requirements.lock with --require-hashes."""
from __future__ import annotations

import re

from support import ROOT

COMPOSE = (ROOT / "docker-compose.yml").read_text(encoding="utf-8")
MAKEFILE = (ROOT / "Makefile").read_text(encoding="utf-8")


def test_every_pulled_image_is_pinned_by_digest():
    images = re.findall(r"^\s*image:\s*(\S+)", COMPOSE, re.M)
    pulled = [image for image in images if not image.startswith("wecom-mailer:")]  # built here: `build: .`
    assert len(pulled) >= 3
    for image in pulled:
        assert re.search(r"@sha256:[0-9a-f]{64}$", image), f"{image} is not pinned by digest"


def test_the_database_password_comes_from_env_and_is_required():
    assert "MARIADB_PASSWORD: ${MARIADB_PASSWORD:?" in COMPOSE
    assert "wecom:${MARIADB_PASSWORD:?" in COMPOSE  # the service's DATABASE_URL uses the same
    assert not re.search(r"MARIADB_PASSWORD:\s*wecom\b", COMPOSE) and "wecom:wecom@" not in COMPOSE


def test_runtime_installs_are_hash_locked():
    runtime = re.search(r"^\$\(VENV\)/\.runtime:.*?(?=^\S)", MAKEFILE, re.M | re.S).group(0)
    assert "--require-hashes" in runtime and "requirements.lock" in runtime
    assert "-r requirements.txt" not in runtime
