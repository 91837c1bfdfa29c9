"""Settings: command-line flags, then ``ATLAS_*`` environment variables, then defaults.

Every setting is declared once in ``SETTINGS``; the CLI builds its flags from that table and
``load_settings`` resolves the values. A value that cannot be used raises ``ConfigError`` naming
the setting, which the CLI prints as one line before exiting with status 2.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

DEFAULT_SERVE_BIND = "127.0.0.1:1999"
DEFAULT_AGENT_BIND = "127.0.0.1:8788"
# Provider connections per process, busy or idle: well above the streams one process relays at
# once on a small machine (300-450 on 2 cores), so that none waits for a connection
# (docs/benchmarks.md, "the provider pool").
DEFAULT_PROVIDER_MAX_CONNECTIONS = 1000


class ConfigError(Exception):
    """A setting has a value Atlas cannot use. ``str()`` is the one line shown to the user."""

    def __init__(self, setting: str, message: str) -> None:
        super().__init__(f"invalid {setting}: {message}")
        self.setting = setting


@dataclass(frozen=True)
class Bind:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_bind(value: str) -> Bind:
    text = value.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ValueError("expected HOST:PORT or [IPV6]:PORT")
        port_text = rest[1:]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise ValueError("expected HOST:PORT, for example 127.0.0.1:1999")
    if not host:
        raise ValueError("the host is empty (use 0.0.0.0 to listen everywhere)")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"port {port_text!r} is not a number from 0 to 65535")
    return Bind(host, int(port_text))


def parse_http_url(value: str) -> str:
    """An http(s) base URL, normalised: lower-case scheme and host, no trailing slash."""
    text = value.strip()
    parts = urlsplit(text)
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise ValueError("expected an http:// or https:// URL")
    if parts.query or parts.fragment:
        raise ValueError("a base URL takes no query string or fragment")
    if parts.username or parts.password:
        raise ValueError("put credentials in their own setting, not in the URL")
    return normalize_url(text)


def parse_address_list(value: str) -> tuple[str, ...]:
    addresses = []
    for part in (p.strip() for p in value.split(",")):
        if not part:
            continue
        try:
            addresses.append(str(ipaddress.ip_address(part)))
        except ValueError:
            raise ValueError(f"{part!r} is not an IP address") from None
    return tuple(addresses)


def parse_log_format(value: str) -> str:
    choice = value.strip().lower()
    if choice not in ("text", "json"):
        raise ValueError("expected text or json")
    return choice


def parse_agent_id(value: str) -> str:
    text = value.strip()
    if not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", text):
        raise ValueError("an agent id is 1-64 of A-Z a-z 0-9 . _ -")
    return text


def parse_proxy_url(value: str) -> str:
    """An http:// proxy URL (credentials allowed: they are never printed)."""
    text = value.strip()
    parts = urlsplit(text)
    if parts.scheme.lower() != "http" or not parts.hostname:
        raise ValueError("expected an http:// proxy URL (HTTPS and SOCKS proxies are not supported)")
    return text


def normalize_url(url: str) -> str:
    """The form in which URLs are compared: scheme and host lower-case, default port and
    trailing slashes dropped."""
    parts = urlsplit(url.strip())
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    if ":" in host:
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:
        port = None
    default_port = {"http": 80, "https": 443}.get(scheme)
    netloc = host if port is None or port == default_port else f"{host}:{port}"
    path = parts.path.rstrip("/")
    return f"{scheme}://{netloc}{path}"


def parse_url_list(value: str) -> tuple[str, ...]:
    urls = [item for item in (part.strip() for part in value.split(",")) if item]
    return tuple(parse_http_url(url) for url in urls)


def parse_database_url(value: str) -> str:
    """A PostgreSQL URL (``postgresql://USER[:PASSWORD]@HOST[:PORT]/DATABASE[?PARAMS]``)."""
    text = value.strip()
    if urlsplit(text).scheme.lower() not in ("postgresql", "postgres"):
        raise ValueError("expected a postgresql:// URL, for example postgresql://atlas@db.example/atlas")
    return text


def parse_positive_float(value: str) -> float:
    number = float(value)
    if not number > 0:
        raise ValueError("must be greater than 0")
    return number


def parse_non_negative_float(value: str) -> float:
    number = float(value)
    if not number >= 0:
        raise ValueError("must be 0 or more")
    return number


def parse_positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise ValueError("must be at least 1")
    return number


def parse_non_negative_int(value: str) -> int:
    number = int(value)
    if number < 0:
        raise ValueError("must be 0 or more")
    return number


def parse_origins(value: str) -> tuple[str, ...]:
    """Browser origins (``scheme://host[:port]``, as a browser sends them in ``Origin``), or ``*``."""
    origins = []
    for item in (part.strip() for part in value.split(",")):
        if not item:
            continue
        if item == "*":
            origins.append(item)
            continue
        parts = urlsplit(item)
        if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{item!r} is not an origin: expected scheme://host[:port]")
        if parts.path.strip("/") or parts.query or parts.fragment or parts.username:
            raise ValueError(f"{item!r}: an origin has no path, query or user name")
        origins.append(normalize_url(item))
    return tuple(origins)


def parse_log_level(value: str) -> str:
    level = value.strip().upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ValueError("expected one of debug, info, warning, error")
    return level


def parse_transport(value: str) -> str:
    choice = value.strip().lower()
    if choice == "lean":
        return "atlas"  # the name of the first version of Atlas's own transport
    if choice not in ("atlas", "httpx"):
        raise ValueError("expected atlas (Atlas's own HTTP/1.1 transport, on h11) or httpx (httpcore)")
    return choice


def parse_secret(value: str) -> str:
    if not value.strip():
        raise ValueError("is empty")
    return value.strip()


@dataclass(frozen=True)
class Setting:
    name: str  # attribute of Settings
    env: tuple[str, ...]  # environment variables, first one wins
    flag: str | None  # command-line flag, None for environment-only settings (secrets)
    parse: Callable[[str], Any]
    help: str
    secret: bool = False  # may hold a password: an error about it never shows the value


SETTINGS: tuple[Setting, ...] = (
    Setting("data_dir", ("ATLAS_DATA_DIR",), "--data-dir", Path, "data directory (default ./data)"),
    Setting("database_url", ("ATLAS_DATABASE_URL",), "--database-url", parse_database_url,
            "PostgreSQL URL, postgresql://USER@HOST/DB, holding users, tokens and rooms for every "
            "process that shares it (default: JSON files in the data directory); prefer the "
            "environment variable for a URL with a password", secret=True),
    Setting("bind", ("ATLAS_BIND",), "--bind", parse_bind, "address to listen on, HOST:PORT"),
    Setting("auth_url", ("ATLAS_AUTH_URL",), "--auth-url", parse_http_url,
            "external auth API base URL (default: built-in auth from the data directory)"),
    Setting("auth_cache_seconds", ("ATLAS_AUTH_CACHE_SECONDS",), "--auth-cache-seconds",
            float, "how long a verified token is trusted before asking the auth API again"),
    Setting("auth_timeout", ("ATLAS_AUTH_TIMEOUT",), "--auth-timeout", parse_positive_float,
            "seconds to wait for the auth API"),
    Setting("auth_max_concurrent", ("ATLAS_AUTH_MAX_CONCURRENT",), "--auth-max-concurrent",
            parse_positive_int, "auth API calls in flight at once (more wait their turn)"),
    Setting("auth_failures_per_minute", ("ATLAS_AUTH_FAILURES_PER_MINUTE",), "--auth-failures-per-minute",
            parse_non_negative_int,
            "failed token checks allowed per client address and minute before 429 (0: no limit)"),
    Setting("trusted_proxies", ("ATLAS_TRUSTED_PROXIES",), "--trusted-proxies", parse_address_list,
            "comma-separated addresses of balancers whose X-Forwarded-For names the client (default: none)"),
    Setting("write_timeout_seconds", ("ATLAS_WRITE_TIMEOUT_SECONDS",), "--write-timeout-seconds",
            parse_positive_float, "seconds a client may leave what it was sent unread before it is disconnected"),
    Setting("ws_ping_interval_seconds", ("ATLAS_WS_PING_INTERVAL_SECONDS",), "--ws-ping-interval-seconds",
            parse_non_negative_float, "seconds between WebSocket pings; a client that has not answered one "
            "when the next is due is closed with 1011 (0: no pings)"),
    Setting("max_connections_per_user", ("ATLAS_MAX_CONNECTIONS_PER_USER",), "--max-connections-per-user",
            parse_positive_int, "WebSocket connections one user may hold open at once"),
    Setting("request_deadline_seconds", ("ATLAS_REQUEST_DEADLINE_SECONDS",), "--request-deadline-seconds",
            parse_positive_float, "longest an agent request may take, start to end, on every path"),
    Setting("backlog", ("ATLAS_BACKLOG",), "--backlog", parse_positive_int,
            "connections the kernel may queue before they are accepted"),
    Setting("agent_url", ("ATLAS_AGENT_URL", "VOLTAGENT_URL"), "--agent-url", parse_http_url,
            "remote agent base URL (default: the agent runs in this process)"),
    Setting("agent_secret", ("ATLAS_AGENT_SECRET",), None, parse_secret,
            "shared secret between the transport and a remote agent (default: none)"),
    Setting("provider_url", ("ATLAS_PROVIDER_URL",), "--provider-url", parse_http_url,
            "default OpenAI-compatible provider base URL, ending in /v1 (default: built-in dev provider)"),
    Setting("provider_urls", ("ATLAS_PROVIDER_URLS",), "--provider-urls", parse_url_list,
            "comma-separated provider URLs the agent may call (default: the default provider only)"),
    Setting("provider_timeout", ("ATLAS_PROVIDER_TIMEOUT",), "--provider-timeout",
            parse_positive_float, "seconds without a byte from the provider before giving up"),
    Setting("provider_retries", ("ATLAS_PROVIDER_RETRIES",), "--provider-retries",
            parse_non_negative_int, "retries before the first token on 429/5xx/connect failures"),
    Setting("provider_transport", ("ATLAS_PROVIDER_TRANSPORT",), "--provider-transport",
            parse_transport, "HTTP transport for provider calls: atlas (h11) or httpx (httpcore)"),
    Setting("provider_max_connections", ("ATLAS_PROVIDER_MAX_CONNECTIONS",), "--provider-max-connections",
            parse_positive_int, "connections to providers open at once, busy or idle (one pool per "
            "process); a request past it waits for one, up to the provider timeout"),
    Setting("provider_proxy", ("ATLAS_PROVIDER_PROXY",), None, parse_proxy_url,
            "http:// proxy for every provider call (default: HTTPS_PROXY, HTTP_PROXY, ALL_PROXY "
            "and NO_PROXY decide, as for every outbound call)"),
    Setting("default_agent", ("ATLAS_DEFAULT_AGENT",), "--default-agent", parse_agent_id,
            "agent for requests that name none (default: the first agent configured)"),
    Setting("agents_file", ("ATLAS_AGENTS_FILE",), "--agents-file", Path,
            "TOML file defining agents (default DATA_DIR/agents.toml when it exists)"),
    Setting("room_idle_seconds", ("ATLAS_ROOM_IDLE_SECONDS",), "--room-idle-seconds",
            parse_positive_float, "seconds an idle room stays in memory"),
    Setting("room_handoff_seconds", ("ATLAS_ROOM_HANDOFF_SECONDS",), "--room-handoff-seconds",
            parse_non_negative_float, "with several processes on one database: seconds a room "
            "with connections stays with its process before it is handed to another process "
            "that was asked for it (see docs/scaling.md)"),
    Setting("max_message_bytes", ("ATLAS_MAX_MESSAGE_BYTES",), "--max-message-bytes",
            parse_positive_int, "largest WebSocket message accepted"),
    Setting("max_reply_bytes", ("ATLAS_MAX_REPLY_BYTES",), "--max-reply-bytes",
            parse_positive_int, "largest agent reply relayed to a client, in UTF-8 bytes (a "
            "longer one ends with the error too_large; its usage is still settled)"),
    Setting("max_requests_per_connection", ("ATLAS_MAX_REQUESTS_PER_CONNECTION",),
            "--max-requests-per-connection", parse_positive_int,
            "agent requests in flight on one WebSocket"),
    Setting("resume_grace_seconds", ("ATLAS_RESUME_GRACE_SECONDS",), "--resume-grace-seconds",
            parse_positive_float,
            "seconds a resumable agent request runs on after its last connection dropped, and "
            "stays resumable after it ended"),
    Setting("resume_buffer_bytes", ("ATLAS_RESUME_BUFFER_BYTES",), "--resume-buffer-bytes",
            parse_positive_int,
            "reply text a room keeps for resuming, in characters (finished replies go first, "
            "oldest first)"),
    Setting("conversation_turns", ("ATLAS_CONVERSATION_TURNS",), "--conversation-turns",
            parse_positive_int, "messages kept per conversation"),
    Setting("shutdown_seconds", ("ATLAS_SHUTDOWN_SECONDS",), "--shutdown-seconds",
            parse_positive_float, "grace period for connections at shutdown"),
    Setting("log_level", ("ATLAS_LOG_LEVEL",), "--log-level", parse_log_level,
            "debug, info, warning or error"),
    Setting("log_format", ("ATLAS_LOG_FORMAT",), "--log-format", parse_log_format,
            "text (for people) or json (one object per line, for machines)"),
    Setting("limit_tokens_per_day", ("ATLAS_LIMIT_TOKENS_PER_DAY",), "--limit-tokens-per-day",
            parse_non_negative_int, "default tokens per user per UTC day (default: unlimited)"),
    Setting("limit_tokens_per_month", ("ATLAS_LIMIT_TOKENS_PER_MONTH",), "--limit-tokens-per-month",
            parse_non_negative_int, "default tokens per user per UTC month (default: unlimited)"),
    Setting("limit_requests_per_minute", ("ATLAS_LIMIT_REQUESTS_PER_MINUTE",),
            "--limit-requests-per-minute", parse_non_negative_int,
            "default agent requests per user per minute (default: unlimited)"),
    Setting("limit_concurrent_requests", ("ATLAS_LIMIT_CONCURRENT_REQUESTS",),
            "--limit-concurrent-requests", parse_non_negative_int,
            "default agent requests per user in flight at once (default: unlimited)"),
    Setting("default_output_tokens", ("ATLAS_DEFAULT_OUTPUT_TOKENS",), "--default-output-tokens",
            parse_positive_int,
            "output cap reserved and sent for a request that sets none, when a token limit applies"),
    Setting("limit_wait_seconds", ("ATLAS_LIMIT_WAIT_SECONDS",), "--limit-wait-seconds",
            parse_non_negative_float, "how long a request may wait for budget held by requests in flight"),
    Setting("cors_origins", ("ATLAS_CORS_ORIGINS",), "--cors-origins", parse_origins,
            "comma-separated browser origins allowed to call /v1/* and /party/* (default: none)"),
)


@dataclass(frozen=True)
class Settings:
    data_dir: Path = Path("data")
    database_url: str | None = None
    bind: Bind = field(default_factory=lambda: parse_bind(DEFAULT_SERVE_BIND))
    auth_url: str | None = None
    auth_cache_seconds: float = 5.0
    auth_timeout: float = 5.0
    auth_max_concurrent: int = 32
    auth_failures_per_minute: int = 30
    trusted_proxies: tuple[str, ...] = ()
    backlog: int = 1024
    request_deadline_seconds: float = 600.0
    write_timeout_seconds: float = 30.0
    ws_ping_interval_seconds: float = 20.0
    max_connections_per_user: int = 32
    agent_url: str | None = None
    agent_secret: str | None = None
    provider_url: str | None = None
    provider_urls: tuple[str, ...] = ()
    provider_timeout: float = 60.0
    provider_retries: int = 2
    provider_transport: str = "atlas"
    provider_max_connections: int = DEFAULT_PROVIDER_MAX_CONNECTIONS
    provider_proxy: str | None = None
    default_agent: str | None = None
    agents_file: Path | None = None
    room_idle_seconds: float = 60.0
    room_handoff_seconds: float = 10.0
    max_message_bytes: int = 1024 * 1024
    max_reply_bytes: int = 8 * 1024 * 1024
    max_requests_per_connection: int = 8
    conversation_turns: int = 40
    resume_grace_seconds: float = 60.0
    resume_buffer_bytes: int = 1024 * 1024
    shutdown_seconds: float = 5.0
    log_level: str = "INFO"
    log_format: str = "text"
    limit_tokens_per_day: int | None = None
    limit_tokens_per_month: int | None = None
    limit_requests_per_minute: int | None = None
    limit_concurrent_requests: int | None = None
    default_output_tokens: int = 4096
    limit_wait_seconds: float = 3.0
    cors_origins: tuple[str, ...] = ()

    def default_limits(self) -> dict[str, int | None]:
        """The limits every user has unless ``atlas user limit`` or the auth API says otherwise
        (``atlas.store.Limits`` field names; None: unlimited)."""
        return {
            "tokens_per_day": self.limit_tokens_per_day,
            "tokens_per_month": self.limit_tokens_per_month,
            "requests_per_minute": self.limit_requests_per_minute,
            "concurrent_requests": self.limit_concurrent_requests,
        }

    def allowed_provider_urls(self, default_provider_url: str) -> tuple[str, ...]:
        """The provider URLs the agent may call: the configured list, else the default one."""
        return self.provider_urls or (normalize_url(default_provider_url),)

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)


def load_settings(
    flags: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    *,
    default_bind: str = DEFAULT_SERVE_BIND,
) -> Settings:
    """Resolve every setting: a flag (already a string, or None when not given) wins over the
    environment, which wins over the default."""
    flags = flags or {}
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {"bind": parse_bind(default_bind)}
    for setting in SETTINGS:
        raw, source = flags.get(setting.name), setting.flag
        if raw is None:
            raw, source = next(
                ((environ[name], name) for name in setting.env if environ.get(name)), (None, None)
            )
        if raw is None:
            continue
        try:
            values[setting.name] = raw if not isinstance(raw, str) else setting.parse(raw)
        except ValueError as exc:
            shown = "<hidden>" if setting.flag is None or setting.secret else repr(raw)  # may hold a secret
            raise ConfigError(source or setting.name, f"{shown}: {exc}") from None
    return Settings(**values)


def prepare_data_dir(path: Path) -> Path:
    """Create the data directory (0700) and prove that it is writable, or raise ConfigError."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        probe = path / f".write-probe-{secrets.token_hex(4)}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ConfigError("data directory", f"{str(path)!r}: {exc.strerror or exc}") from None
    return path


def default_text(setting: Setting, *, default_bind: str) -> str | None:
    """A setting's default as ``--help`` shows it; None where the help text says what unset means."""
    if setting.name == "bind":
        return default_bind
    spec = Settings.__dataclass_fields__[setting.name]
    value = spec.default if spec.default is not dataclasses.MISSING else None
    if value is None or value == ():
        return None
    if isinstance(value, Path):
        return f"./{value}"
    return str(value)
