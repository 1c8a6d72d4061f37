"""Settings: one frozen object built from the environment (and `.env`); every error names the variable."""
from __future__ import annotations

import collections
import os
import re
from dataclasses import MISSING, dataclass, field, fields
from functools import cached_property
from pathlib import Path
from typing import Mapping
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

# ConfigError and the token rules are the names callers know config by; envvars.py reads the values.
import envvars
from envvars import MIN_ADMIN_TOKEN, MIN_SECRET, TOKEN_HOWTO, ConfigError, ImapUrl, Reader  # noqa: F401

MIN_MASKED = MIN_SECRET  # shorter values are never masked: "a" is not a secret, and starring it out hides logs

DEFAULT_API_BASE = "https://qyapi.weixin.qq.com/cgi-bin/"
EMAIL_SOURCE_NAMES = ("wecom", "directory", "pattern")
SMTP_DEFAULT_PORTS = {"ssl": 465, "starttls": 587, "none": 25}
MAIL_BACKENDS = ("smtp", "file", "console")
WECOM_MESSAGE_MODES = ("off", "fallback", "all", "only")  # which members get a WeCom application message


@dataclass(frozen=True)
class Settings:
    """Every setting of the service; the defaults here are the only ones (from_env reads them)."""

    corp_id: str
    contact_secret: str = field(repr=False)
    callback_token: str = field(repr=False)
    callback_aes_key: str = field(repr=False)
    department_ids: tuple[int, ...]
    fetch_child: bool = False
    email_sources: tuple[str, ...] = EMAIL_SOURCE_NAMES
    email_pattern: str | None = None
    api_base: str = DEFAULT_API_BASE
    wecom_timeout: float = 15.0
    notify_scope: str = "department"
    database_url: str = field(default="sqlite:///var/wecom-mailer.db", repr=False)  # may hold a password
    template_database_url: str = field(default="", repr=False)  # "" here: DATABASE_URL
    template_table: str = "ipaas_email_template"
    template_app: str = "tencent-wechat"
    mail_backend: str = "smtp"
    mail_file_dir: str = "var/outbox"
    smtp_host: str | None = None
    smtp_port: int = 465  # by SMTP_SECURITY: SMTP_DEFAULT_PORTS
    smtp_security: str = "ssl"
    smtp_user: str = ""
    smtp_password: str = field(default="", repr=False)
    smtp_timeout: float = 10.0
    smtp_connections: int = 1
    smtp_pipelining: str = "auto"
    smtp_max_per_minute: int = 0
    smtp_max_per_day: int = 0
    smtp_ca_file: str | None = None
    mail_from: str = ""
    timezone: str = "Asia/Shanghai"
    callback_path: str = "/wecom/callback"
    callback_max_skew: int = 300
    callback_max_body: int = 262144
    retry_backoff: float = 30.0
    retry_max_hours: float = 48.0
    digest_window: float = 60.0
    quiet_hours: tuple[int, int] | None = None  # (start, end) in minutes after midnight, TIMEZONE
    reconcile_seconds: float = 900.0
    lease_seconds: float = 30.0
    worker_in_web: bool = True
    admin_token: str | None = field(default=None, repr=False)
    secret_key: str | None = field(default=None, repr=False)  # None: generated once into the state database
    admin_cookie_secure: bool = True
    trusted_proxies: int = 0
    # Peers whose X-Forwarded-* headers count (ops/forwarded.py); () with TRUSTED_PROXIES set: loopback only.
    trusted_proxy_networks: tuple = ()
    metrics_token: str | None = field(default=None, repr=False)
    log_level: str = "INFO"
    log_format: str = "text"
    # The self-built app (自建应用), shared by WeCom application messages and WeCom sign-in.
    agent_id: int | None = None
    app_secret: str | None = field(default=None, repr=False)
    # Bounces (issue 20, docs/bounces.md): the VERP address and the soft-bounce limit.
    bounce_address: str | None = None
    bounce_soft_limit: int = 3
    wecom_message: str = "off"  # WECOM_MESSAGE_MODES
    wecom_message_max_per_day: int = 0
    # WeCom sign-in to /admin (docs/admin.md): who may sign in, where WeCom sends them back, its two pages.
    admin_userids: tuple[str, ...] = ()
    public_url: str | None = None
    qr_login_url: str = "https://login.work.weixin.qq.com/wwlogin/sso/login"
    oauth_url: str = "https://open.weixin.qq.com/connect/oauth2/authorize"
    # Retention and Kubernetes (issue 23): finished events older than this are pruned (0: never); the file
    # the delivery loop touches every round, for a liveness probe (None: none).
    retention_days: int = 90
    worker_heartbeat_file: str | None = None
    # Bounce intake over IMAP (bounces/intake.py); the server's certificate is checked against SMTP_CA_FILE.
    bounce_imap: ImapUrl | None = None  # BOUNCE_IMAP_URL
    bounce_imap_password: str = field(default="", repr=False)
    bounce_imap_done_folder: str | None = None
    bounce_poll_seconds: float = 60.0

    @property
    def tz(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    def secrets(self) -> list[str]:
        """Every secret value, for masking in logs and error messages (database passwords included)."""
        values = [self.contact_secret, self.callback_token, self.callback_aes_key, self.smtp_password,
                  self.admin_token or "", self.secret_key or "", self.metrics_token or "", self.app_secret or "",
                  self.bounce_imap_password,
                  *_passwords(self.database_url), *_passwords(self.template_database_url)]
        return [v for v in values if len(v) >= MIN_MASKED]

    @cached_property
    def masked_values(self) -> tuple[str, ...]:
        """secrets(), longest first, computed once: every log line is masked with them."""
        return tuple(sorted(self.secrets(), key=len, reverse=True))


# Secrets that exist only at run time (the generated signing key, WeCom access tokens): masked like the
# configured ones. Bounded: an access token is replaced every two hours, each new one is remembered.
_RUNTIME_SECRETS: collections.deque = collections.deque(maxlen=32)


def remember_secret(value: str | None) -> None:
    """Mask `value` in every log line of this process from now on (8 characters or more only)."""
    if value and len(value) >= MIN_MASKED and value not in _RUNTIME_SECRETS:
        _RUNTIME_SECRETS.append(value)


DEFAULTS = {f.name: f.default for f in fields(Settings) if f.default is not MISSING}


def load_dotenv_file(path: str | os.PathLike = ".env") -> None:
    """Load `.env` into os.environ without overriding what is already set (gunicorn does not)."""
    if Path(path).is_file():
        from dotenv import load_dotenv

        load_dotenv(path, override=False)


def from_env(env: Mapping[str, str] | None = None) -> Settings:
    """Build Settings from `env` (default: os.environ); raise ConfigError naming the first bad variable."""
    env = os.environ if env is None else env
    r = Reader(env)
    d = DEFAULTS
    database_url = r.url("DATABASE_URL", d["database_url"])
    admin_token = r.admin_token()
    security = r.choice("SMTP_SECURITY", d["smtp_security"], tuple(SMTP_DEFAULT_PORTS))
    backend = r.choice("MAIL_BACKEND", d["mail_backend"], MAIL_BACKENDS)
    smtp_host = r.text("SMTP_HOST", "") or None
    if backend == "smtp" and not smtp_host:
        raise ConfigError("SMTP_HOST is required when MAIL_BACKEND=smtp: set it (e.g. smtp.qq.com) "
                          "or use MAIL_BACKEND=file for a dry run")
    smtp_user = r.text("SMTP_USER", d["smtp_user"])
    mail_from = r.text("MAIL_FROM", "") or smtp_user
    if backend == "smtp" and not mail_from:
        raise ConfigError("MAIL_FROM is required when SMTP_USER is empty: set MAIL_FROM=it@corp.example")
    sources = r.csv("EMAIL_SOURCES", ",".join(d["email_sources"]))
    for name in sources:
        if name not in EMAIL_SOURCE_NAMES:
            raise ConfigError(f"EMAIL_SOURCES has unknown source {name!r}: use a comma list of "
                              f"{', '.join(EMAIL_SOURCE_NAMES)}")
    pattern = r.text("EMAIL_PATTERN", "") or None
    if pattern is not None and ("{userid}" not in pattern or "@" not in pattern):
        raise ConfigError("EMAIL_PATTERN must contain {userid} and an @, e.g. {userid}@corp.example")
    timezone = r.text("TIMEZONE", d["timezone"])
    try:
        ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(f"TIMEZONE {timezone!r} is not an IANA zone: use e.g. Asia/Shanghai") from None
    path = r.text("CALLBACK_PATH", d["callback_path"])
    if not path.startswith("/"):
        raise ConfigError(f"CALLBACK_PATH must start with '/' (got {path!r})")
    api_base = r.text("WECOM_API_BASE", d["api_base"])
    if not re.match(r"^https?://", api_base):
        raise ConfigError("WECOM_API_BASE must be an http(s) URL, e.g. " + DEFAULT_API_BASE)
    agent_id, app_secret = r.agent_id(), r.secret("WECOM_APP_SECRET") or None
    admin_userids, public_url = r.admin_userids(), r.public_url()
    if admin_userids:
        missing = [name for name, value in (("WECOM_AGENT_ID", agent_id), ("WECOM_APP_SECRET", app_secret),
                                            ("PUBLIC_URL", public_url)) if not value]
        if missing:
            raise ConfigError(f"ADMIN_USERIDS needs {', '.join(missing)}: set the self-built app's AgentId and "
                              "Secret and the service's public https origin (docs/admin.md), or unset ADMIN_USERIDS")
    bounce_imap, bounce_imap_password, bounce_done = _bounce_imap(r)
    return Settings(
        corp_id=r.required("WECOM_CORP_ID", "copy 企业ID from 我的企业 > 企业信息"),
        contact_secret=r.required("WECOM_CONTACT_SECRET", "copy the Secret from 管理工具 > 通讯录同步")
        and r.secret("WECOM_CONTACT_SECRET"),
        callback_token=r.callback_token(),
        callback_aes_key=r.aes_key(),
        department_ids=r.department_ids(),
        fetch_child=r.bool("WECOM_FETCH_CHILD", d["fetch_child"]),
        email_sources=tuple(sources),
        email_pattern=pattern,
        api_base=api_base if api_base.endswith("/") else api_base + "/",
        wecom_timeout=r.number("WECOM_TIMEOUT_SECONDS", d["wecom_timeout"], 0.1, 600),
        notify_scope=r.choice("NOTIFY_SCOPE", d["notify_scope"], ("department", "corp")),
        database_url=database_url,
        template_database_url=r.url("TEMPLATE_DATABASE_URL", database_url),
        template_table=r.identifier("TEMPLATE_TABLE", d["template_table"]),
        template_app=r.text("TEMPLATE_APP", d["template_app"]),
        mail_backend=backend,
        mail_file_dir=r.text("MAIL_FILE_DIR", d["mail_file_dir"]),
        smtp_host=smtp_host,
        smtp_port=r.int("SMTP_PORT", SMTP_DEFAULT_PORTS[security], 1, 65535),
        smtp_security=security,
        smtp_user=smtp_user,
        smtp_password=r.secret("SMTP_PASSWORD"),
        smtp_timeout=r.number("SMTP_TIMEOUT_SECONDS", d["smtp_timeout"], 0.1, 600),
        smtp_connections=r.int("SMTP_CONNECTIONS", d["smtp_connections"], 1, 32),
        smtp_pipelining=r.choice("SMTP_PIPELINING", d["smtp_pipelining"], ("auto", "off")),
        smtp_max_per_minute=r.int("SMTP_MAX_PER_MINUTE", d["smtp_max_per_minute"], 0, 100_000),
        smtp_max_per_day=r.int("SMTP_MAX_PER_DAY", d["smtp_max_per_day"], 0, 10_000_000),
        smtp_ca_file=r.ca_file("SMTP_CA_FILE"),
        mail_from=mail_from,
        timezone=timezone,
        callback_path=path,
        callback_max_skew=r.int("CALLBACK_MAX_SKEW_SECONDS", d["callback_max_skew"], 1, 86400),
        callback_max_body=r.int("CALLBACK_MAX_BODY_BYTES", d["callback_max_body"], 1024, 16 * 1024 * 1024),
        retry_backoff=r.number("RETRY_BACKOFF_SECONDS", d["retry_backoff"], 0.01, 3600),
        retry_max_hours=r.number("RETRY_MAX_HOURS", d["retry_max_hours"], 0.0001, 24 * 365),
        digest_window=r.number("DIGEST_WINDOW_SECONDS", d["digest_window"], 0, 7 * 86400),
        quiet_hours=r.quiet_hours("QUIET_HOURS"),
        reconcile_seconds=r.number("RECONCILE_SECONDS", d["reconcile_seconds"], 0, 7 * 86400),
        lease_seconds=r.number("LEASE_SECONDS", d["lease_seconds"], 1, 3600),
        worker_in_web=r.bool("WORKER_IN_WEB", d["worker_in_web"]),
        admin_token=admin_token,
        secret_key=r.secret_key(admin_token),
        admin_cookie_secure=r.bool("ADMIN_COOKIE_SECURE", d["admin_cookie_secure"]),
        trusted_proxies=r.int("TRUSTED_PROXIES", d["trusted_proxies"], 0, 10),
        trusted_proxy_networks=r.proxy_networks("TRUSTED_PROXY_NETWORKS"),
        metrics_token=r.secret("METRICS_TOKEN", envvars.MIN_METRICS_TOKEN, generated=True) or None,
        log_level=r.choice("LOG_LEVEL", d["log_level"], ("DEBUG", "INFO", "WARNING", "ERROR"), upper=True),
        log_format=r.choice("LOG_FORMAT", d["log_format"], ("text", "json")),
        agent_id=agent_id,
        app_secret=app_secret,
        admin_userids=admin_userids,
        public_url=public_url,
        qr_login_url=r.page_url("WECOM_QR_LOGIN_URL", d["qr_login_url"]),
        oauth_url=r.page_url("WECOM_OAUTH_URL", d["oauth_url"]),
        bounce_address=r.bounce_address(),
        bounce_soft_limit=r.int("BOUNCE_SOFT_LIMIT", d["bounce_soft_limit"], 1, 100),
        **_wecom_message(r, d),
        retention_days=r.int("RETENTION_DAYS", d["retention_days"], 0, 36500),
        worker_heartbeat_file=r.text("WORKER_HEARTBEAT_FILE", "") or None,
        bounce_imap=bounce_imap,
        bounce_imap_password=bounce_imap_password,
        bounce_imap_done_folder=bounce_done,
        bounce_poll_seconds=r.number("BOUNCE_POLL_SECONDS", d["bounce_poll_seconds"], 0, 86400),
    )


def _wecom_message(r: Reader, d: dict) -> dict:
    """WECOM_MESSAGE and its daily limit; a mode other than off needs the self-built app's id and secret."""
    mode = r.choice("WECOM_MESSAGE", d["wecom_message"], WECOM_MESSAGE_MODES)
    if mode != "off":
        for name in ("WECOM_AGENT_ID", "WECOM_APP_SECRET"):
            if not r.raw(name):  # WECOM_APP_SECRET_FILE counts (raw reads NAME_FILE)
                raise ConfigError(f"WECOM_MESSAGE={mode} needs {name}: copy the self-built app's AgentId and "
                                  "Secret from 应用管理 > 自建应用 > the app, or set WECOM_MESSAGE=off")
    return {"wecom_message": mode,
            "wecom_message_max_per_day": r.int("WECOM_MESSAGE_MAX_PER_DAY", d["wecom_message_max_per_day"],
                                               0, 100_000_000)}


def _bounce_imap(r: Reader) -> tuple[ImapUrl | None, str, str | None]:
    """BOUNCE_IMAP_URL, its password and the done folder, checked together."""
    url = r.imap_url("BOUNCE_IMAP_URL")
    password = r.secret("BOUNCE_IMAP_PASSWORD")
    done = r.text("BOUNCE_IMAP_DONE_FOLDER", "") or None
    if url is not None and not password:
        raise ConfigError("BOUNCE_IMAP_PASSWORD is required when BOUNCE_IMAP_URL is set: set it, or "
                          "BOUNCE_IMAP_PASSWORD_FILE=/run/secrets/bounce-imap-password")
    if url is not None and done is not None and done == url.folder:
        raise ConfigError(f"BOUNCE_IMAP_DONE_FOLDER is the polled folder itself ({done!r}): name another folder, "
                          "e.g. Bounces/Processed, or unset it to only mark bounces \\Seen")
    return url, password, done


def _passwords(url: str) -> tuple[str, ...]:
    """The password of a database URL as written and as decoded (%40 is @): either may show up in a message."""
    match = re.match(r"^[^:/]+://[^:@/]*:([^@/]*)@", url or "")
    if not match or not match.group(1):
        return ()
    from urllib.parse import unquote

    return match.group(1), unquote(match.group(1))


def mask(text: str, settings: Settings | None) -> str:
    """Replace every secret value that appears in `text` with ***."""
    if settings is None:
        return text
    for secret in (*settings.masked_values, *_RUNTIME_SECRETS):
        if secret in text:
            text = text.replace(secret, "***")
    return text
