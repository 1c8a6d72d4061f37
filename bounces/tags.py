"""The tag that names a delivery (or a digest) in what we send: Message-ID, VERP envelope sender, DSN ENVID.

`d<delivery id>-<mac>` or `g<digest id>-<mac>`; the MAC is HMAC-SHA256 under a key of its own (derived from
SECRET_KEY, else from a secret generated once into the state database under its own name), cut to 80 bits
and written in lower-case base32, so a relay that lower-cases the local part changes nothing. Nobody without
the key can make a tag that names one of our deliveries: a forged bounce matches nothing.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import re
import threading
import weakref
from dataclasses import dataclass

KEY_NAME = "bounce-tag"  # the generated secret's row in wm_service_secrets (never the admin signing secret)
_CONTEXT = b"wecom-mailer bounce tag v1"
MAC_CHARS = 16  # 80 bits
TAG = re.compile(r"(?<![A-Za-z0-9])([dgDG])([0-9]{1,19})-([A-Za-z2-7]{16})(?![A-Za-z0-9])")


@dataclass(frozen=True)
class Named:
    """What a valid tag names: a delivery or a digest."""
    kind: str  # 'd' delivery, 'g' digest
    id: int


def derive_key(secret: str) -> bytes:
    """The tag key for a service secret: its own HMAC derivation, so it never equals the secret."""
    return hmac.new(secret.encode("utf-8"), _CONTEXT, hashlib.sha256).digest()


_keys: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # engine -> generated key, read once per process
_keys_lock = threading.Lock()


def service_key(engine, settings) -> bytes:
    """The tag key of this service: from SECRET_KEY when set, else from the state database's own secret."""
    if settings.secret_key:
        return derive_key(settings.secret_key)
    from store.sessions import shared_secret  # the one store of generated secrets

    with _keys_lock:
        key = _keys.get(engine)
        if key is None:
            key = _keys[engine] = derive_key(shared_secret(engine, KEY_NAME))
        return key


def _mac(key: bytes, name: str) -> str:
    digest = hmac.new(key, name.encode("ascii"), hashlib.sha256).digest()
    return base64.b32encode(digest).decode("ascii").lower()[:MAC_CHARS]


def make(key: bytes, kind: str, ident: int) -> str:
    """The tag of delivery (`kind` 'd') or digest ('g') `ident`."""
    name = f"{kind}{int(ident)}"
    return f"{name}-{_mac(key, name)}"


def find(key: bytes, text: str) -> tuple[Named | None, bool]:
    """The first valid tag in `text`, and whether something looked like a tag but its MAC was wrong."""
    forged = False
    for match in TAG.finditer(text or ""):
        name = f"{match.group(1).lower()}{int(match.group(2))}"
        if hmac.compare_digest(_mac(key, name), match.group(3).lower()):
            return Named(match.group(1).lower(), int(match.group(2))), forged
        forged = True
    return None, forged


def verp(bounce_address: str, tag: str) -> str:
    """The VERP envelope sender: `local+tag@domain` of BOUNCE_ADDRESS."""
    local, _, domain = bounce_address.rpartition("@")
    return f"{local}+{tag}@{domain}"
