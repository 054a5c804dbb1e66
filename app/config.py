"""Application settings, read once from the environment and an optional `.env` file."""

from __future__ import annotations

import logging
import os
import secrets
import time
from functools import cached_property, lru_cache
from ipaddress import ip_network
from pathlib import Path
from typing import Annotated, Literal

from cryptography.fernet import Fernet, MultiFernet
from limits import parse as parse_limit
from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from app.crypto import KeyListError, key_ring

CommaList = Annotated[list[str], NoDecode]
#: The file types a chat accepts unless FILE_ALLOWED_TYPES narrows them (app.filetypes judges every one).
DEFAULT_FILE_TYPES = (
    "image/png",
    "image/jpeg",
    "image/gif",
    "image/webp",
    "application/pdf",
    "text/plain",
    "text/markdown",
    "text/csv",
    "application/json",
)
logger = logging.getLogger("app")


class ConfigError(SystemExit):
    """Raised at start-up when the configuration is invalid; the message names the variable."""


class Settings(BaseSettings):
    """Every tunable of the service. Names are the environment variables (see .env.example)."""

    model_config = SettingsConfigDict(env_file=".env", extra="ignore", case_sensitive=True)

    APP_ENV: Literal["development", "production", "test"] = "development"
    DATA_DIR: Path = Path("./data")
    DATABASE_URL: str = ""
    DB_POOL_SIZE: int = Field(10, ge=1, le=1000)
    DB_MAX_OVERFLOW: int = Field(10, ge=0, le=1000)
    DB_CONNECT_TIMEOUT: float = Field(5.0, gt=0)
    DB_POOL_PRE_PING: bool = False
    DB_POOL_RECYCLE_SECONDS: int = Field(1800, ge=0)
    #: Seconds `migrate` and `init` wait for another run's migration lock before they give up (exit 1); 0 = as
    #: long as it takes.
    MIGRATION_LOCK_WAIT_SECONDS: float = Field(0, ge=0)
    REDIS_URL: str | None = None

    JWT_SECRET: str = ""
    JWT_ALGORITHM: Literal["HS256", "HS384", "HS512"] = "HS256"
    JWT_ISSUER: str = "n8n-chat-relay"
    JWT_AUDIENCE: str = "n8n-chat-relay"
    ACCESS_TOKEN_EXPIRE_MINUTES: int = Field(60, ge=1)
    REFRESH_TOKEN_EXPIRE_DAYS: int = Field(7, ge=1)
    REFRESH_REUSE_GRACE_SECONDS: int = Field(10, ge=0, le=300)
    #: Fernet keys, comma-separated: the first encrypts, every one decrypts (a rotation lists the new key first
    #: and the old one after it until `python -m app.cli rotate-encryption-key` has run: docs/OPERATIONS.md).
    ENCRYPTION_KEY: str = ""
    #: The HMAC secret of stored API keys; empty = JWT_SECRET (then rotating JWT_SECRET also voids every key).
    API_KEY_SECRET: str = ""
    BCRYPT_ROUNDS: int = Field(12, ge=4, le=16)

    COOKIE_SECURE: bool = True
    COOKIE_SAMESITE: Literal["strict", "lax", "none"] = "strict"
    COOKIE_DOMAIN: str | None = None
    CORS_ORIGINS: CommaList = []
    TRUSTED_PROXIES: CommaList = []

    TEAM_SIGNUP_ENABLED: bool = True
    RATE_LIMIT_ENABLED: bool = True
    RATE_LIMIT_LOGIN: str = "5/minute"
    RATE_LIMIT_REGISTER: str = "10/hour"
    RATE_LIMIT_TEAM_SIGNUP: str = "5/hour"
    RATE_LIMIT_AGENT_TEST: str = "10/minute"

    MAX_REQUEST_BODY_BYTES: int = Field(1_048_576, ge=1024)
    MESSAGE_MAX_CHARS: int = Field(32_000, ge=1)
    AVATAR_MAX_BYTES: int = Field(2_097_152, ge=1024)
    AVATAR_MAX_PIXELS: int = Field(40_000_000, ge=1)
    AVATAR_MAX_SIDE: int = Field(512, ge=16)
    #: POST /api/chats/import: the largest body (counted while it arrives, before any parsing), how many
    #: imports one server process reads at once (one per user; more are refused with 429), and how many chats
    #: one import may hold (they are stored in one transaction: 10 MB of empty chats was ~90,000 of them).
    IMPORT_MAX_BODY_BYTES: int = Field(10_485_760, ge=1024)
    IMPORT_MAX_CONCURRENT: int = Field(4, ge=1, le=1000)
    IMPORT_MAX_CHATS: int = Field(1000, ge=1, le=100_000)
    #: ... and how many messages, all its chats together (one chat of 60,000 was a 5 s transaction).
    IMPORT_MAX_MESSAGES: int = Field(20_000, ge=1, le=1_000_000)

    #: Files in messages (docs/FILES.md): the largest upload, the types accepted (judged by content), how many
    #: files one message, one chat, and one chat's unsent uploads may hold, how many uploads one user may run
    #: at once (per process), the largest file sent inline as base64, and how long a signed file link outlives
    #: its generation (seconds).
    FILE_MAX_BYTES: int = Field(10_485_760, ge=1024)
    FILE_ALLOWED_TYPES: CommaList = list(DEFAULT_FILE_TYPES)
    FILES_PER_MESSAGE_MAX: int = Field(5, ge=1, le=100)
    FILES_PER_CHAT_MAX: int = Field(200, ge=1)
    FILES_UNSENT_PER_CHAT_MAX: int = Field(20, ge=1)
    FILE_UPLOADS_PER_USER: int = Field(3, ge=1)
    FILE_INLINE_MAX_BYTES: int = Field(1_048_576, ge=1024)
    FILE_URL_GRACE_SECONDS: float = Field(300.0, ge=0)

    WEBHOOK_ALLOW_PRIVATE_NETWORKS: bool = False
    WEBHOOK_ALLOWED_HOSTS: CommaList = []
    N8N_CONNECT_TIMEOUT: float = Field(10.0, gt=0)
    N8N_FIRST_BYTE_TIMEOUT: float = Field(120.0, gt=0)
    N8N_READ_TIMEOUT: float = Field(120.0, gt=0)
    N8N_TOTAL_TIMEOUT: float = Field(900.0, gt=0)
    N8N_MAX_LINE_BYTES: int = Field(1_048_576, ge=1024)
    N8N_MAX_RESPONSE_BYTES: int = Field(10_485_760, ge=1024)
    N8N_HISTORY_MAX_MESSAGES: int = Field(50, ge=1)
    N8N_HISTORY_MAX_BYTES: int = Field(200_000, ge=1024)
    N8N_POOL_LIMIT: int = Field(0, ge=0)
    AGENT_TEST_TIMEOUT: float = Field(15.0, gt=0)

    STREAM_PING_INTERVAL: float = Field(15.0, gt=0)
    STREAM_CHECKPOINT_INTERVAL: float = Field(5.0, gt=0)
    #: How long a generation's events stay followable after its end (GET /api/chats/{id}/stream).
    STREAM_LOG_TTL: float = Field(60.0, ge=60)
    #: A response whose client has taken none of its buffered bytes for this long is cut off (the connection is
    #: reset; app.write_stall): a phone asleep or a NAT that forgot the connection otherwise holds the connection,
    #: its coroutine and its buffers for good. The answer is stored either way. 0 = no limit.
    STREAM_WRITE_TIMEOUT: float = Field(60.0, ge=0)
    SHUTDOWN_GRACE_SECONDS: float = Field(10.0, ge=0)
    WORKER_HEARTBEAT_INTERVAL: float = Field(10.0, gt=0)
    #: Error-log rows (GET /api/error-logs) are deleted this many days after they were written, by the
    #: heartbeat's periodic sweep (app.services.retention); 0 keeps them for ever.
    ERROR_LOG_RETENTION_DAYS: int = Field(90, ge=0, le=36_500)
    #: Uploads no message carries are deleted this many hours after their upload, by the same sweep (their bytes
    #: with them when nothing else uses them): otherwise a user can store bytes at will without ever sending.
    #: 0 keeps them for ever.
    UPLOAD_RETENTION_HOURS: int = Field(24, ge=0, le=876_000)
    #: Invites that ended (expired, revoked or used up) are deleted this many days later, by the same sweep, so
    #: the admin's list keeps recent ones with their status and does not grow for ever; 0 keeps them for ever.
    INVITE_RETENTION_DAYS: int = Field(30, ge=0, le=36_500)

    #: This service's address as n8n reaches it (e.g. `https://chat.example.com`): callback URLs are built on
    #: it. Unset: no generation gets a `metadata.callback_url`, and agents cannot use `response_mode: callback`.
    PUBLIC_BASE_URL: str | None = None
    CALLBACK_MAX_BODY_BYTES: int = Field(65_536, ge=1024)
    #: Callback mode: the longest silence between two callbacks, and the longest whole generation (seconds).
    CALLBACK_SILENCE_TIMEOUT: float = Field(600.0, gt=0)
    CALLBACK_TOTAL_TIMEOUT: float = Field(3600.0, gt=0)
    #: `metadata.steps` of a message: at most this many steps, each cut to this many characters per field.
    CALLBACK_MAX_STEPS: int = Field(100, ge=1)
    CALLBACK_STEP_MAX_CHARS: int = Field(2000, ge=100)

    #: The browser client at `/` (app/web, docs/WEB_CLIENT.md); off: `/` and `/web/...` answer 404.
    WEB_CLIENT_ENABLED: bool = True

    METRICS_ENABLED: bool = False
    METRICS_TOKEN: str | None = None

    LOG_LEVEL: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    LOG_FORMAT: Literal["text", "json"] = "text"

    FIRST_TEAM_NAME: str = "My team"
    FIRST_ADMIN_EMAIL: str = "admin@example.com"
    FIRST_ADMIN_PASSWORD: str = ""

    @field_validator("CORS_ORIGINS", "TRUSTED_PROXIES", "WEBHOOK_ALLOWED_HOSTS", "FILE_ALLOWED_TYPES", mode="before")
    @classmethod
    def _split_commas(cls, value: object) -> object:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @field_validator("CORS_ORIGINS")
    @classmethod
    def _no_wildcard_origin(cls, value: list[str]) -> list[str]:
        # Credentials (cookies) are allowed, and browsers reject `*` with credentials anyway.
        if "*" in value:
            raise ValueError("'*' is not allowed; list the SPA origins explicitly")
        # `null` is the origin of sandboxed frames, data: URLs and local files: any site can send it, so listing
        # it would let every site past CORS and the cookie Origin check (app.auth.check_cookie_origin).
        if any(origin.rstrip("/").lower() == "null" for origin in value):
            raise ValueError("'null' is not allowed (any site can send it); list the SPA origins explicitly")
        return value

    @field_validator("FILE_ALLOWED_TYPES")
    @classmethod
    def _known_file_types(cls, value: list[str]) -> list[str]:
        types = [item.lower() for item in value]
        unknown = [item for item in types if item not in DEFAULT_FILE_TYPES]
        if unknown:
            raise ValueError(f"unknown file types {', '.join(unknown)}; choose among {', '.join(DEFAULT_FILE_TYPES)}")
        return types

    @field_validator("PUBLIC_BASE_URL")
    @classmethod
    def _base_url(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        value = value.strip().rstrip("/")
        if not value.startswith(("http://", "https://")) or "?" in value or "#" in value:
            raise ValueError("must be an http(s) URL without query or fragment, like https://chat.example.com")
        return value

    @field_validator("TRUSTED_PROXIES")
    @classmethod
    def _proxies_are_networks(cls, value: list[str]) -> list[str]:
        for entry in value:
            ip_network(entry, strict=False)  # ValueError names the bad entry
        return value

    @field_validator("RATE_LIMIT_LOGIN", "RATE_LIMIT_REGISTER", "RATE_LIMIT_TEAM_SIGNUP", "RATE_LIMIT_AGENT_TEST")
    @classmethod
    def _limit_syntax(cls, value: str) -> str:
        try:
            parse_limit(value)
        except ValueError as exc:
            raise ValueError(f"not a rate limit like '5/minute': {value!r}") from exc
        return value

    @model_validator(mode="after")
    def _fill_and_check(self) -> Settings:
        if not self.DATABASE_URL:
            self.DATABASE_URL = f"sqlite+aiosqlite:///{self.DATA_DIR / 'app.db'}"
        if self.APP_ENV == "production":
            missing = [name for name in ("JWT_SECRET", "ENCRYPTION_KEY") if not getattr(self, name)]
            if missing:
                raise ValueError(f"{', '.join(missing)} must be set when APP_ENV=production")
            if len(self.JWT_SECRET) < 32:
                raise ValueError("JWT_SECRET must be at least 32 characters in production")
            if not self.COOKIE_SECURE:
                raise ValueError("COOKIE_SECURE must be true in production")
        else:
            if not self.JWT_SECRET:
                self.JWT_SECRET = _persistent_secret(self.DATA_DIR / "jwt_secret", lambda: secrets.token_urlsafe(48))
            if not self.ENCRYPTION_KEY:
                self.ENCRYPTION_KEY = _persistent_secret(
                    self.DATA_DIR / "encryption_key", lambda: Fernet.generate_key().decode()
                )
        try:
            _ = self.fernet  # built now: a bad key stops the start-up, and the first send finds it built
        except KeyListError as exc:
            raise ValueError(str(exc)) from None
        if self.COOKIE_SAMESITE == "none" and not self.COOKIE_SECURE:
            raise ValueError("COOKIE_SAMESITE=none requires COOKIE_SECURE=true")
        return self

    @cached_property
    def _built_keys(self) -> tuple[str, MultiFernet]:
        return self.ENCRYPTION_KEY, key_ring(self.ENCRYPTION_KEY)

    @property
    def fernet(self) -> MultiFernet:
        """The keys of ENCRYPTION_KEY (the first encrypts, every one decrypts), built once per settings object:
        every send decrypts with them. A cached_property, not a private attribute: pydantic reads those through
        `__getattr__`, ~2 us a read."""
        built = self._built_keys
        if built[0] != self.ENCRYPTION_KEY:  # a `model_copy(update=...)` copies the built keys, not the check
            del self.__dict__["_built_keys"]
            built = self._built_keys
        return built[1]

    @property
    def is_sqlite(self) -> bool:
        return self.DATABASE_URL.startswith("sqlite")


def _persistent_secret(path: Path, make: object) -> str:
    """Generate a development secret once and keep it, so restarts keep sessions and encrypted data."""
    if path.exists():
        return _read_secret(path)
    private_dir(path.parent)
    value = str(make() if callable(make) else make)
    # Created 0600 in one step: never readable by others, not even between writing and a chmod.
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another worker of `uvicorn --workers N` made it first: everyone uses that one
        return _read_secret(path)
    with os.fdopen(fd, "w") as file:
        file.write(value)
    return value


def _read_secret(path: Path) -> str:
    """The secret in `path`, waiting briefly while the worker that created it is still writing it."""
    for _ in range(100):
        value = path.read_text().strip()
        if value:
            return value
        time.sleep(0.01)
    raise ConfigError(f"{path} is empty: delete it to generate a new development secret")


def private_dir(path: Path) -> None:
    """Create a directory for secrets (DATA_DIR: keys, the SQLite file with password hashes) as 0700.

    An existing directory keeps its mode: it may be shared on purpose; the files in it are 0600.
    """
    path.mkdir(mode=0o700, parents=True, exist_ok=True)


def private_file(path: Path) -> None:
    """Create `path` empty as 0600 if missing, else narrow it to 0600 (a file of an older version)."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        narrow_to_owner(path)


def narrow_to_owner(path: Path) -> None:
    """chmod 0600; a file we may use but not chmod (another owner, read-only mount) is left as it is."""
    try:
        path.chmod(0o600)
    except OSError as exc:  # not ours (EPERM) or a read-only mount (EROFS)
        logger.warning("could not make %s private (chmod 600): %s", path, exc.strerror)


def load_settings(**overrides: object) -> Settings:
    """Build settings, turning a validation failure into a message that names each bad variable."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        lines = []
        for err in exc.errors(include_input=False, include_url=False):
            # Our validators' own sentences, without pydantic's "Value error, "; a check of several settings
            # (the model's) names them itself ("JWT_SECRET, ENCRYPTION_KEY must be set when APP_ENV=production").
            message = err["msg"].removeprefix("Value error, ")
            name = ".".join(str(part) for part in err["loc"])
            lines.append(f"  {name}: {message}" if name else f"  {message}")
        raise ConfigError("Invalid configuration:\n" + "\n".join(lines)) from None


@lru_cache
def get_settings() -> Settings:
    return load_settings()
