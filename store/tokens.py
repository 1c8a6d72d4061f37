"""WeCom access tokens shared by every process through the state database (gettoken is rate limited).

Each token is stored sealed: AES-256-GCM under a key derived (HKDF-SHA256) from the secret it was issued for,
with the row's key as associated data. Every process has the secret; a reader of the database (a backup, a
read-only leak) has only ciphertext, and a row copied under another key, or sealed for another secret, does
not open. A row that does not open (a clear token of the release before, another secret's) reads as absent:
the client fetches a new token and overwrites it.
"""
from __future__ import annotations

import base64
import binascii
import os

import sqlalchemy as sa
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from sqlalchemy.engine import Engine

from store.schema import access_tokens, insert_ignore

SEALED_PREFIX = "v1:"  # a sealed value: v1:<base64url of nonce + ciphertext + tag>
_INFO = b"wecom-mailer access token at rest v1"


def _cipher(secret: str) -> AESGCM:
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_INFO).derive(secret.encode("utf-8"))
    return AESGCM(key)


def seal(token: str, secret: str, key: str) -> str:
    """`token` encrypted for the holders of `secret`, bound to the row `key`."""
    nonce = os.urandom(12)
    sealed = _cipher(secret).encrypt(nonce, token.encode("utf-8"), key.encode("utf-8"))
    return SEALED_PREFIX + base64.urlsafe_b64encode(nonce + sealed).decode("ascii")


def unseal(stored: str, secret: str, key: str) -> str | None:
    """The token sealed in `stored`, or None when it is not ours to open (clear, another secret, another row)."""
    if not stored.startswith(SEALED_PREFIX):
        return None
    try:
        raw = base64.urlsafe_b64decode(stored[len(SEALED_PREFIX):].encode("ascii"))
        if len(raw) < 12 + 16:
            return None
        return _cipher(secret).decrypt(raw[:12], raw[12:], key.encode("utf-8")).decode("utf-8")
    except (InvalidTag, binascii.Error, ValueError, UnicodeError):
        return None


class TokenStore:
    """get/put by key (a digest of corp id and secret, made by the WeCom client: the secret is never stored).

    It stores what it is given: the WeCom client seals before put and unseals after get.
    """

    def __init__(self, engine: Engine):
        self.engine = engine

    def get(self, key: str) -> tuple[str, float] | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(access_tokens.c.access_token, access_tokens.c.expires_at)
                               .where(access_tokens.c.key == key)).first()
        return (row.access_token, row.expires_at) if row else None

    def put(self, key: str, token: str, expires_at: float) -> None:
        with self.engine.begin() as conn:
            updated = conn.execute(access_tokens.update().where(access_tokens.c.key == key)
                                   .values(access_token=token, expires_at=expires_at)).rowcount
            if not updated:
                conn.execute(insert_ignore(access_tokens),
                             {"key": key, "access_token": token, "expires_at": expires_at})
