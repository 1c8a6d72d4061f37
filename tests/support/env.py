"""The test corp: fixed placeholder credentials (valid in shape only) and a complete service environment."""
from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TEST_CORP_ID = "ww0123456789abcdef"
TEST_SECRET = "test-contact-secret-0123456789abcdef"
TEST_TOKEN = "TestCallbackToken123"
TEST_AES_KEY = "kWxPEV2UEDyxWpmPdKC3F4dgPDmOvfKX1HGnEUDS1aR"
TEST_ADMIN_TOKEN = "test-admin-token-0123456789abcdefghij"  # ADMIN_TOKEN needs 32 characters or more
DEPARTMENT = 2  # the watched department of the stand-in's corp


def base_env(**overrides) -> dict[str, str]:
    """A complete, valid environment for the service; tests override what they exercise."""
    env = {
        "WECOM_CORP_ID": TEST_CORP_ID,
        "WECOM_CONTACT_SECRET": TEST_SECRET,
        "WECOM_CALLBACK_TOKEN": TEST_TOKEN,
        "WECOM_CALLBACK_AES_KEY": TEST_AES_KEY,
        "WECOM_DEPARTMENT_ID": str(DEPARTMENT),
        "MAIL_BACKEND": "file",
        "MAIL_FROM": "it@corp.example",
        "WORKER_IN_WEB": "false",
        "LOG_LEVEL": "INFO",
        # One mail per event unless a test is about the digest (the seed's flow).
        "DIGEST_WINDOW_SECONDS": "0",
        "RECONCILE_SECONDS": "0",
        # No pruning unless a test is about retention: many tests write rows dated long ago.
        "RETENTION_DAYS": "0",
    }
    env.update({k: str(v) for k, v in overrides.items()})
    return env
