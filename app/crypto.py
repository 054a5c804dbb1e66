"""Encryption at rest for stored secrets (Fernet: AES-128-CBC + HMAC, key from settings): agents' webhook
headers, and a spent refresh token's successor while its reuse grace window lasts."""

from __future__ import annotations

import json

from cryptography.fernet import Fernet, InvalidToken


class DecryptionError(ValueError):
    """Stored secrets cannot be read with the configured ENCRYPTION_KEY (key changed or data corrupt)."""


def encrypt_headers(headers: dict[str, str], key: str) -> str | None:
    """None for no headers, so "no secret" is visible in the row without decrypting."""
    if not headers:
        return None
    return Fernet(key.encode()).encrypt(json.dumps(headers, separators=(",", ":")).encode()).decode()


def decrypt_headers(token: str | None, key: str) -> dict[str, str]:
    if not token:
        return {}
    try:
        data = json.loads(Fernet(key.encode()).decrypt(token.encode()))
    except (InvalidToken, ValueError) as exc:
        raise DecryptionError("webhook headers cannot be decrypted with the configured ENCRYPTION_KEY") from exc
    return {str(k): str(v) for k, v in data.items()}


def encrypt_text(value: str, key: str) -> str:
    return Fernet(key.encode()).encrypt(value.encode()).decode()


def decrypt_text(token: str, key: str) -> str:
    try:
        return Fernet(key.encode()).decrypt(token.encode()).decode()
    except (InvalidToken, ValueError) as exc:
        raise DecryptionError("a stored secret cannot be decrypted with the configured ENCRYPTION_KEY") from exc
