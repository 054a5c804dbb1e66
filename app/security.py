"""Security primitives without FastAPI: password hashing in the bcrypt pool, JWTs and token hashes."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hashlib
import hmac
import os
import secrets
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from types import MappingProxyType
from typing import Any, Literal, TypeVar

import bcrypt
import jwt

from app.config import Settings
from app.db import utcnow
from app.errors import Unauthorized

T = TypeVar("T")
TokenType = Literal["access", "refresh"]
REQUIRED_CLAIMS = ["sub", "team_id", "type", "jti", "iat", "exp", "iss", "aud"]
INVALID_TOKEN = "Could not validate credentials"


# --- passwords -------------------------------------------------------------------------------


def _prehash(password: str) -> bytes:
    """SHA-256 then base64 before bcrypt, so long passwords are neither truncated at 72 bytes nor rejected."""
    return base64.b64encode(hashlib.sha256(password.encode("utf-8")).digest())


def hash_password_sync(password: str, rounds: int) -> str:
    return bcrypt.hashpw(_prehash(password), bcrypt.gensalt(rounds=rounds)).decode()


#: bcrypt threads per process: all cores but one, so a login burst never takes the core the event loop
#: (and every open stream) runs on. bcrypt releases the GIL; the contention is for CPU, not the lock.
BCRYPT_THREADS = max(1, (os.cpu_count() or 2) - 1)
#: ...and they run 10 nice levels below the event loop, so when the machine is busy anyway (a small box
#: shared with PostgreSQL, n8n or a load generator) the scheduler still gives the event loop the CPU first.
BCRYPT_NICE = 10


def _lower_thread_priority() -> None:
    # On Linux a thread id is a valid PRIO_PROCESS target and changes only that thread; elsewhere no-op.
    with contextlib.suppress(AttributeError, OSError):
        thread = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, thread, min(19, os.getpriority(os.PRIO_PROCESS, thread) + BCRYPT_NICE))


_bcrypt_pool = ThreadPoolExecutor(BCRYPT_THREADS, thread_name_prefix="bcrypt", initializer=_lower_thread_priority)


async def _in_bcrypt_thread(function: Callable[..., T], *args: Any) -> T:
    return await asyncio.get_running_loop().run_in_executor(_bcrypt_pool, function, *args)


async def hash_password(password: str, rounds: int) -> str:
    """bcrypt runs in a worker thread: at cost 12 it takes ~250 ms, which must not block the event loop."""
    return await _in_bcrypt_thread(hash_password_sync, password, rounds)


def verify_password_sync(password: str, password_hash: str) -> bool:
    try:
        return bcrypt.checkpw(_prehash(password), password_hash.encode())
    except ValueError:
        return False


async def verify_password(password: str, password_hash: str) -> bool:
    return await _in_bcrypt_thread(verify_password_sync, password, password_hash)


def hash_cost(password_hash: str) -> int | None:
    """The cost (log2 rounds) a bcrypt hash was made with, from its `$2b$<cost>$...` prefix; None if unreadable."""
    parts = password_hash.split("$")
    if len(parts) < 4 or not parts[2].isdigit():
        return None
    return int(parts[2])


def needs_rehash(password_hash: str, rounds: int) -> bool:
    """True when the stored hash was made with another cost than BCRYPT_ROUNDS (raised or lowered since)."""
    return hash_cost(password_hash) != rounds


# --- tokens ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class IssuedToken:
    token: str
    jti: str
    expires_at: datetime
    expires_in: int


@dataclass(frozen=True, slots=True)
class Caller:
    """The authenticated caller as the send path needs it: ids only.

    FastAPI keeps resolved dependencies until the response ends, so an ORM `User` (and its session) would
    live as long as the stream; this costs a few KB per open stream less (docs/PERFORMANCE.md).
    """

    id: uuid.UUID
    team_id: uuid.UUID


def create_token(
    *,
    settings: Settings,
    user_id: uuid.UUID,
    team_id: uuid.UUID,
    token_type: TokenType,
    extra: dict[str, Any] | None = None,
) -> IssuedToken:
    now = utcnow()
    lifetime = (
        timedelta(minutes=settings.ACCESS_TOKEN_EXPIRE_MINUTES)
        if token_type == "access"
        else timedelta(days=settings.REFRESH_TOKEN_EXPIRE_DAYS)
    )
    jti = uuid.uuid4().hex
    claims: dict[str, Any] = {
        "sub": str(user_id),
        "team_id": str(team_id),
        "type": token_type,
        "jti": jti,
        "iat": int(now.timestamp()),
        # `iat` has whole seconds; revocation by `tokens_valid_after` needs finer grain (see token_issued_us).
        "iat_us": _epoch_us(now),
        "exp": int((now + lifetime).timestamp()),
        "iss": settings.JWT_ISSUER,
        "aud": settings.JWT_AUDIENCE,
        **(extra or {}),
    }
    token = jwt.encode(claims, settings.JWT_SECRET, algorithm=settings.JWT_ALGORITHM)
    return IssuedToken(token=token, jti=jti, expires_at=now + lifetime, expires_in=int(lifetime.total_seconds()))


#: Tokens verified recently (`_verified`): a browser sends the same access token with every request of its
#: lifetime, and checking its signature and claims again cost ~0.15 ms of CPU per request (docs/PERFORMANCE.md).
VERIFIED_TOKENS_KEPT = 4096


@functools.lru_cache(maxsize=VERIFIED_TOKENS_KEPT)
def _verified(
    token: str, expected_type: str, secret: str, algorithm: str, audience: str, issuer: str
) -> Mapping[str, Any]:
    """The claims of a token whose signature, algorithm, issuer, audience, required claims and type hold.

    A pure function of its arguments but for the expiry, which `decode_token` checks again on every call. An
    invalid token raises, and nothing is kept for it (the cache keeps results only), so garbage cannot crowd
    valid tokens out. The key holds every setting the verdict depends on: a new secret verifies anew.
    """
    claims: dict[str, Any] = jwt.decode(
        token, secret, algorithms=[algorithm], audience=audience, issuer=issuer, options={"require": REQUIRED_CLAIMS}
    )
    if claims.get("type") != expected_type:
        raise ValueError("wrong token type")
    uuid.UUID(str(claims["sub"]))
    uuid.UUID(str(claims["team_id"]))
    return MappingProxyType(claims)


def decode_token(token: str, *, settings: Settings, expected_type: TokenType) -> dict[str, Any]:
    """Verify signature, algorithm (pinned), issuer, audience, expiry, required claims and type.

    The verdict but for the expiry is remembered per token (`_verified`); the expiry is checked here on every
    call, by PyJWT's rule (expired from the second `exp`). The caller gets its own copy of the claims.
    """
    try:
        s = settings
        claims = _verified(token, expected_type, s.JWT_SECRET, s.JWT_ALGORITHM, s.JWT_AUDIENCE, s.JWT_ISSUER)
    except (jwt.PyJWTError, ValueError, TypeError) as exc:
        raise Unauthorized(INVALID_TOKEN) from exc
    if int(claims["exp"]) <= time.time():
        raise Unauthorized(INVALID_TOKEN)
    return dict(claims)


def token_issued_us(claims: dict[str, Any]) -> int:
    """Issue instant in microseconds; a token without `iat_us` counts as issued at the start of its second."""
    value = claims.get("iat_us")
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return int(claims["iat"]) * 1_000_000


def issued_before(claims: dict[str, Any], instant: datetime | None) -> bool:
    """True when the token predates `instant` (a user's `tokens_valid_after`), at microsecond precision."""
    if instant is None:
        return False
    return token_issued_us(claims) < _epoch_us(instant)


def same_instant(a: datetime | None, b: datetime | None) -> bool:
    """Both unset, or the same instant at microsecond precision (whatever their time zones)."""
    if a is None or b is None:
        return a is b
    return _epoch_us(a) == _epoch_us(b)


def _epoch_us(instant: datetime) -> int:
    delta = instant - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def family_key(family_id: str) -> str:
    """Revocation-store key of a refresh family: revoking it also kills the family's access tokens."""
    return f"fam:{family_id}"


def hash_refresh_token(token: str) -> str:
    """Refresh tokens are stored as SHA-256: a database leak does not hand out live sessions."""
    return hashlib.sha256(token.encode()).hexdigest()


# --- API keys --------------------------------------------------------------------------------

#: Every key starts with this, so logs, secret scanners and people recognise one (and the auth path tells
#: a key from a JWT without trying to decode it).
API_KEY_PREFIX = "n8nr_"
#: The characters of a key shown in lists: the prefix and the first 8 random characters.
API_KEY_SHOWN = len(API_KEY_PREFIX) + 8
#: We issue 48-character keys; anything much longer is refused before hashing.
API_KEY_MAX_LENGTH = 128


def new_api_key() -> str:
    """256 random bits, URL-safe, behind the recognisable prefix."""
    return API_KEY_PREFIX + secrets.token_urlsafe(32)


def is_api_key(token: str) -> bool:
    return token.startswith(API_KEY_PREFIX)


def hash_api_key(key: str, settings: Settings) -> str:
    """HMAC-SHA256 with a server secret: a leaked table neither opens anything nor can be checked offline."""
    secret = (settings.API_KEY_SECRET or settings.JWT_SECRET).encode()
    return hmac.new(secret, key.encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()
