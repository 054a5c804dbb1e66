"""An email's stored form as migration 0018 (2026-12-07) folds stored emails into it: a frozen copy of
`app.fields.stored_email` and what it calls (see this package's docstring: never edit it). email-validator
is the version requirements.txt pins (2.4.0)."""

from __future__ import annotations

import unicodedata

from email_validator import EmailNotValidError, ValidatedEmail, validate_email


def canonical_email(value: str) -> str:
    """Trimmed, Unicode NFC, lower-case (NFC again after lower-casing, which can decompose a few characters)."""
    return unicodedata.normalize("NFC", unicodedata.normalize("NFC", value.strip()).lower())


def _validated(canonical: str) -> ValidatedEmail | None:
    """email-validator's reading of an address already in canonical form (syntax only, no DNS), or None."""
    try:
        return validate_email(canonical, check_deliverability=False)
    except EmailNotValidError:
        return None


def stored_email(value: str) -> str:
    """The form a new address was stored in: the domain in Unicode (email-validator's `normalized`, folded as
    IDNA folds it), canonical; a value that is no valid address only put in canonical form."""
    canonical = canonical_email(value)
    valid = _validated(canonical)
    if valid is None:
        return canonical
    return canonical_email(valid.normalized)
