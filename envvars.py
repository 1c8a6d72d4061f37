"""Reading environment variables: typed, and every error names the variable and says how to fix it."""
from __future__ import annotations

import base64
import binascii
import ipaddress
import re
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping
from urllib.parse import unquote, urlsplit

MIN_ADMIN_TOKEN = 32
MIN_SECRET_KEY = 32
MIN_METRICS_TOKEN = 16
MIN_SECRET = 8  # shorter values are never masked: masking them would star out common words in every log line
TOKEN_HOWTO = "python -c 'import secrets; print(secrets.token_urlsafe(32))'"
_NUMBER = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)")  # ASCII only: float() also takes '١٢'
_CLOCK = re.compile(r"([01]?[0-9]|2[0-3]):([0-5][0-9])")


class ConfigError(Exception):
    """A setting is missing or malformed; the message names it and says how to fix it."""


@dataclass(frozen=True)
class ImapUrl:
    """BOUNCE_IMAP_URL, read: implicit TLS (imaps) or STARTTLS (imap), who logs in where, which folder."""

    implicit_tls: bool
    user: str
    host: str
    port: int
    folder: str

    @property
    def key(self) -> str:
        """The folder's name in the state database and the log: user@host:port/FOLDER (no password)."""
        return f"{self.user}@{self.host}:{self.port}/{self.folder}"[:255]


IMAP_URL_HOWTO = "use imaps://user@imap.example.com:993/INBOX, or imap://user@imap.example.com:143/INBOX (STARTTLS)"


class Reader:
    """Typed access to the environment; every error names the variable."""

    def __init__(self, env: Mapping[str, str]):
        self.env = env

    def raw(self, name: str) -> str | None:
        # NAME_FILE lets secrets come from a mounted file (Docker/Kubernetes secrets).
        file_name = self.env.get(name + "_FILE")
        if file_name and not self.env.get(name):
            try:
                return Path(file_name).read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise ConfigError(f"{name}_FILE points to {file_name!r}, which cannot be read "
                                  f"({exc.strerror})") from None
        value = self.env.get(name)
        return None if value is None else value.strip()

    def text(self, name: str, default: str) -> str:
        value = self.raw(name)
        return default if value in (None, "") else value

    def secret(self, name: str, minimum: int = 0, generated: bool = False) -> str:
        """A secret: empty when unset; shorter than `minimum`, or (`generated`) of low entropy, is refused.

        Only the tokens the service's own safety rests on have a minimum (ADMIN_TOKEN, SECRET_KEY, METRICS_TOKEN);
        a password or secret someone else issued is taken as given, and masked in logs only from 8 characters."""
        value = self.raw(name) or ""
        if value and len(value) < minimum:
            raise ConfigError(f"{name} must be at least {minimum} characters (got {len(value)})"
                              + (f": generate one with {TOKEN_HOWTO}" if generated else ""))
        if value and generated and low_entropy(value):
            raise ConfigError(f"{name} is too easy to guess (few distinct characters, or a repeated block): "
                              f"generate one with {TOKEN_HOWTO}")
        return value

    def required(self, name: str, how: str) -> str:
        value = self.raw(name)
        if not value:
            raise ConfigError(f"{name} is required: {how}")
        return value

    def bool(self, name: str, default: bool) -> bool:
        value = self.raw(name)
        if value in (None, ""):
            return default
        if value.lower() in ("true", "1", "yes", "on"):
            return True
        if value.lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{name} must be true or false (got {value!r})")

    def number(self, name: str, default: float, lo: float, hi: float, whole: bool = False) -> float:
        value = self.raw(name)
        if value in (None, ""):
            return default
        if not _NUMBER.fullmatch(value) or (whole and "." in value):
            kind = "a whole number" if whole else "a number"
            raise ConfigError(f"{name} must be {kind} written with the digits 0-9 (got {value!r})")
        number = int(value) if whole else float(value)
        if not lo <= number <= hi:
            raise ConfigError(f"{name} must be between {lo:g} and {hi:g} (got {number:g})")
        return number

    def int(self, name: str, default: int, lo: int, hi: int) -> int:
        return int(self.number(name, default, lo, hi, whole=True))

    def choice(self, name: str, default: str, options: tuple[str, ...], upper: bool = False) -> str:
        value = self.text(name, default)
        value = value.upper() if upper else value.lower()
        if value not in options:
            raise ConfigError(f"{name} must be one of {', '.join(options)} (got {value!r})")
        return value

    def csv(self, name: str, default: str) -> list[str]:
        return [part.strip() for part in self.text(name, default).split(",") if part.strip()]

    def identifier(self, name: str, default: str) -> str:
        value = self.text(name, default)
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,63}", value):
            raise ConfigError(f"{name} must be a plain table name of letters, digits and _ (got {value!r})")
        return value

    def url(self, name: str, default: str) -> str:
        value = self.text(name, default)
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError

        try:
            url = make_url(value)
        except ArgumentError:
            raise ConfigError(f"{name} is not a database URL: use e.g. "
                              "mysql+pymysql://user:password@host:3306/dbname or sqlite:///var/state.db") from None
        if url.get_backend_name() not in ("sqlite", "mysql", "mariadb"):
            raise ConfigError(f"{name} must use mysql+pymysql:// or sqlite:/// "
                              f"(got {url.get_backend_name()}://)")
        if url.get_backend_name() in ("mysql", "mariadb") and url.get_driver_name() != "pymysql":
            raise ConfigError(f"{name} must name the pymysql driver: mysql+pymysql://…")
        return value

    def ca_file(self, name: str) -> str | None:
        path = self.text(name, "")
        if not path:
            return None
        try:
            ssl.create_default_context(cafile=path)
        except FileNotFoundError:
            raise ConfigError(f"{name} points to {path!r}, which does not exist: give the path of a PEM "
                              "bundle of the CA that signed the SMTP server's certificate") from None
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"{name} {path!r} is not a readable PEM certificate bundle "
                              f"({getattr(exc, 'strerror', None) or exc.__class__.__name__})") from None
        return path

    def imap_url(self, name: str) -> ImapUrl | None:
        """An IMAP mailbox URL with TLS (imaps://, or imap:// which must STARTTLS); no password inside it."""
        value = self.text(name, "")
        if not value:
            return None
        try:
            parts = urlsplit(value)
            port = parts.port
        except ValueError:
            raise ConfigError(f"{name} is not a URL: {IMAP_URL_HOWTO}") from None
        if parts.scheme not in ("imaps", "imap"):
            raise ConfigError(f"{name} must start with imaps:// or imap:// (STARTTLS), got {parts.scheme or 'none'}: "
                              f"{IMAP_URL_HOWTO}")
        if parts.password is not None:
            raise ConfigError(f"{name} must not hold the password: remove it from the URL and set "
                              "BOUNCE_IMAP_PASSWORD or BOUNCE_IMAP_PASSWORD_FILE")
        if not parts.username or not parts.hostname or parts.query or parts.fragment:
            raise ConfigError(f"{name} needs a user and a host and nothing after the folder: {IMAP_URL_HOWTO}")
        folder = unquote(parts.path.lstrip("/")) or "INBOX"
        if any(ord(ch) < 32 for ch in folder):
            raise ConfigError(f"{name} names a folder with control characters: {IMAP_URL_HOWTO}")
        return ImapUrl(parts.scheme == "imaps", unquote(parts.username), parts.hostname,
                       port or (993 if parts.scheme == "imaps" else 143), folder)

    def quiet_hours(self, name: str) -> tuple[int, int] | None:
        value = self.text(name, "")
        if not value:
            return None
        start, _, end = value.partition("-")
        clocks = [_CLOCK.fullmatch(part.strip()) for part in (start, end)]
        if not all(clocks):
            raise ConfigError(f"{name} must be two times HH:MM-HH:MM in TIMEZONE, e.g. 22:00-08:00 "
                              f"(got {value!r})")
        begin, finish = (int(m.group(1)) * 60 + int(m.group(2)) for m in clocks)
        if begin == finish:
            raise ConfigError(f"{name} starts and ends at the same time ({value!r}): unset it for no quiet hours")
        return begin, finish

    def admin_token(self) -> str | None:
        return self.secret("ADMIN_TOKEN", MIN_ADMIN_TOKEN, generated=True) or None

    def secret_key(self, admin_token: str | None) -> str | None:
        key = self.secret("SECRET_KEY", MIN_SECRET_KEY, generated=True)
        if key and key == admin_token:
            # One value for both would sign every cookie with the admin token: a stolen cookie becomes an oracle.
            raise ConfigError(f"SECRET_KEY must differ from ADMIN_TOKEN: generate another with {TOKEN_HOWTO}")
        return key or None

    def proxy_networks(self, name: str) -> tuple:
        """Comma-separated CIDRs (10.0.0.0/8,fd00::/8) as ip_network objects; unset: ()."""
        networks = []
        for part in self.csv(name, ""):
            try:
                networks.append(ipaddress.ip_network(part, strict=False))
            except ValueError:
                raise ConfigError(f"{name} has {part!r}, which is not a network: use CIDRs such as "
                                  "10.0.0.0/8,fd00::/8 (the addresses your reverse proxies connect from)") from None
        return tuple(networks)

    def agent_id(self) -> int | None:
        value = self.raw("WECOM_AGENT_ID")
        if not value:
            return None
        if not re.fullmatch(r"[0-9]{1,10}", value) or int(value) < 1:
            raise ConfigError(f"WECOM_AGENT_ID must be the app's AgentId, a positive whole number (got {value!r}): "
                              "copy it from 应用管理 > 自建应用 > the app")
        return int(value)

    def bounce_address(self) -> str | None:
        """BOUNCE_ADDRESS: a plain ASCII name@domain whose local part has no `+` (the VERP tag goes after one)."""
        value = self.raw("BOUNCE_ADDRESS")
        if not value:
            return None
        local, at, domain = value.rpartition("@")
        if (not at or not re.fullmatch(r"[A-Za-z0-9._-]{1,24}", local)
                or not re.fullmatch(r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?", domain) or "." not in domain):
            # 24: with the tag after the `+`, the local part stays within RFC 5321's 64 characters.
            raise ConfigError(f"BOUNCE_ADDRESS must be a plain address such as bounces@corp.example, its name part "
                              f"at most 24 letters, digits, '.', '_' or '-' and no '+' (got {value[:80]!r}); unset "
                              "it to keep MAIL_FROM's address as the envelope sender")
        return value

    def admin_userids(self) -> tuple[str, ...]:
        userids = self.csv("ADMIN_USERIDS", "")
        for userid in userids:
            if not re.fullmatch(r"[A-Za-z0-9_.@-]{1,64}", userid):
                raise ConfigError(f"ADMIN_USERIDS must be WeCom userids (帐号) separated by commas (got {userid!r}): "
                                  "copy them from 通讯录 > the member > 帐号")
        return tuple(dict.fromkeys(userids))

    def public_url(self) -> str | None:
        value = self.text("PUBLIC_URL", "").rstrip("/")
        if not value:
            return None
        match = re.fullmatch(r"(https?)://([A-Za-z0-9.-]+|\[[0-9A-Fa-f:]+\])(:[0-9]{1,5})?", value)
        local = bool(match) and match.group(2) in ("127.0.0.1", "localhost")
        if not match or (match.group(1) == "http" and not local):
            raise ConfigError(f"PUBLIC_URL must be the service's https origin without a path, e.g. "
                              f"https://notify.corp.example (http only for 127.0.0.1 or localhost; got {value!r})")
        return value

    def page_url(self, name: str, default: str) -> str:
        value = self.text(name, default)
        if not re.fullmatch(r"https?://[^\s?#]+", value):
            raise ConfigError(f"{name} must be an http(s) URL without a query (got {value!r}): unset it for "
                              f"WeCom's own page {default}")
        return value

    def callback_token(self) -> str:
        token = self.required("WECOM_CALLBACK_TOKEN", "copy Token from the contact callback settings (接收事件服务器)")
        if not re.fullmatch(r"[A-Za-z0-9]{1,32}", token):
            raise ConfigError(f"WECOM_CALLBACK_TOKEN must be 1-32 letters or digits (got {len(token)} characters "
                              "of another kind): copy Token from the WeCom admin console")
        return token

    def aes_key(self) -> str:
        name = "WECOM_CALLBACK_AES_KEY"
        key = self.required(name, "copy EncodingAESKey from the contact callback settings (接收事件服务器)")
        if len(key) != 43:
            raise ConfigError(f"{name} must be 43 characters (got {len(key)}): "
                              "copy EncodingAESKey from the WeCom admin console")
        try:
            if len(base64.b64decode(key + "=", validate=True)) != 32:
                raise binascii.Error
        except binascii.Error:
            raise ConfigError(f"{name} is not a valid EncodingAESKey (letters and digits only): "
                              "copy it again from the WeCom admin console") from None
        return key

    def department_ids(self) -> tuple[int, ...]:
        name = "WECOM_DEPARTMENT_ID"
        raw = self.required(name, "find the id under 通讯录 > 部门 (the ⋮ menu next to the department)")
        ids = []
        for part in raw.split(","):
            part = part.strip()
            if not re.fullmatch(r"[0-9]{1,12}", part) or int(part) < 1:
                raise ConfigError(f"{name} must be positive integer department ids separated by commas "
                                  f"(got {part!r})")
            ids.append(int(part))
        return tuple(dict.fromkeys(ids))


def low_entropy(token: str) -> bool:
    """Few distinct characters, or one block repeated (passwordpassword…): a guesser tries those first."""
    if len(set(token)) < min(8, len(token) // 3 + 1):
        return True
    for period in range(1, len(token) // 2 + 1):
        if all(token[i] == token[i + period] for i in range(len(token) - period)):
            return True
    # Half of it one character or one short run repeated: aaaa…aaabbbb, 0123…0123 with a different tail.
    counts = sorted((token.count(c) for c in set(token)), reverse=True)
    return counts[0] * 2 >= len(token)
