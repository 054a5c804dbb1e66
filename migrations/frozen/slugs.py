"""Agent slugs as migration 0006 (2026-12-06) makes them for the agents it finds: a frozen copy of
`app.slugs.slugify` and `first_free` (see this package's docstring: never edit it)."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Collection

SLUG_MAX = 64
FALLBACK = "agent"


def slugify(name: str) -> str:
    """`Support Bot (EU)` -> `support-bot-eu`; accents folded (`Café` -> `cafe`); `agent` when nothing is left."""
    folded = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode().lower()
    slug = re.sub(r"[^a-z0-9]+", "-", folded).strip("-")[:SLUG_MAX].rstrip("-")
    return slug or FALLBACK


def first_free(base: str, taken: Collection[str]) -> str:
    """`base` if free, else `base-2`, `base-3`...; the base is shortened so the suffix fits in 64 characters."""
    if base not in taken:
        return base
    n = 2
    while True:
        suffix = f"-{n}"
        candidate = base[: SLUG_MAX - len(suffix)].rstrip("-") + suffix
        if candidate not in taken:
            return candidate
        n += 1
