"""Encryption at rest for stored secrets (Fernet: AES-128-CBC + HMAC, keys from settings): agents' webhook
headers, and a spent refresh token's successor while its reuse grace window lasts.

ENCRYPTION_KEY lists one or more keys, comma-separated: the first encrypts, every one decrypts (MultiFernet),
so a key is rotated without downtime (docs/OPERATIONS.md, `python -m app.cli rotate-encryption-key`)."""

from __future__ import annotations

import json

from cryptography.fernet import Fernet, InvalidToken, MultiFernet


class DecryptionError(ValueError):
    """Stored secrets cannot be read with any configured ENCRYPTION_KEY (key dropped or data corrupt)."""


class KeyListError(ValueError):
    """ENCRYPTION_KEY holds an entry that is no Fernet key; the message names its position, never the key."""


def parse_keys(value: str) -> list[Fernet]:
    """The keys of ENCRYPTION_KEY in order (spaces around each dropped). An empty entry is refused rather than
    skipped: `NEW,$OLD` with OLD unset would otherwise drop the key every stored secret was written with."""
    entries = [entry.strip() for entry in value.split(",")]
    keys = []
    for position, entry in enumerate(entries, start=1):
        where = f"key {position} of {len(entries)}" if len(entries) > 1 else "the key"
        if not entry:
            raise KeyListError(f"ENCRYPTION_KEY: {where} is empty (keys are separated by single commas)")
        try:
            keys.append(Fernet(entry.encode()))
        except (ValueError, TypeError):
            raise KeyListError(f"ENCRYPTION_KEY: {where} is not a Fernet key (url-safe base64 of 32 bytes)") from None
    return keys


def key_ring(value: str) -> MultiFernet:
    """What encrypts and decrypts: built once per settings object (`Settings.fernet`), as sends decrypt."""
    return MultiFernet(parse_keys(value))


def encrypt_headers(headers: dict[str, str], keys: MultiFernet) -> str | None:
    """None for no headers, so "no secret" is visible in the row without decrypting."""
    if not headers:
        return None
    return keys.encrypt(json.dumps(headers, separators=(",", ":")).encode()).decode()


def decrypt_headers(token: str | None, keys: MultiFernet) -> dict[str, str]:
    if not token:
        return {}
    try:
        data = json.loads(keys.decrypt(token.encode()))
    except (InvalidToken, ValueError) as exc:
        raise DecryptionError("webhook headers cannot be decrypted with any configured ENCRYPTION_KEY") from exc
    return {str(k): str(v) for k, v in data.items()}


def encrypt_text(value: str, keys: MultiFernet) -> str:
    return keys.encrypt(value.encode()).decode()


def decrypt_text(token: str, keys: MultiFernet) -> str:
    try:
        return keys.decrypt(token.encode()).decode()
    except (InvalidToken, ValueError) as exc:
        raise DecryptionError("a stored secret cannot be decrypted with any configured ENCRYPTION_KEY") from exc


def rotate(token: str, *, current: Fernet, keys: MultiFernet) -> str | None:
    """`token` encrypted again with `current` (the first key), or None when it already is, so a second run
    writes nothing. DecryptionError when no key in `keys` reads it."""
    try:
        current.decrypt(token.encode())
    except InvalidToken:
        pass
    else:
        return None
    try:
        return keys.rotate(token.encode()).decode()
    except InvalidToken as exc:
        raise DecryptionError("a stored secret cannot be decrypted with any configured ENCRYPTION_KEY") from exc
