"""The usage roll-up's rows and column types as migrations 0011 and 0020 (2026-12-07) build them from the
ledger: a frozen copy of `app.services.usage_rollup.RollupBuilder` and what it calls, and of the column types
`app.dialects.UTCDateTime` and `Histogram` (see this package's docstring: never edit it).

A histogram is one non-negative integer: the count of bucket `b` is its decimal digits `FIELD * b` to
`FIELD * (b + 1)`; buckets of one millisecond below `EXACT_BELOW`, then each `RATIO` times wider than the
one before, up to 2**31 ms. A row is dated by the UTC day its generation began (`started_on`), or, with
`by_end`, by the day of its final write (the roll-up before 0020, which 0020's downgrade restores).
"""

from __future__ import annotations

import uuid
from bisect import bisect_right
from collections.abc import Iterable, Mapping
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy import DateTime, Numeric, Text
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator, TypeEngine


class UTCDateTime(TypeDecorator[datetime]):
    """`timestamptz` on PostgreSQL; on SQLite, which drops the offset, values come back as UTC."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime stored; use utcnow()")
        if value is not None and dialect.name == "sqlite":
            return value.astimezone(UTC).replace(tzinfo=None)
        return value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:  # noqa: ARG002
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


class Histogram(TypeDecorator[int]):
    """A histogram packed into one non-negative integer: NUMERIC on PostgreSQL, decimal text on SQLite."""

    impl = Numeric
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        return dialect.type_descriptor(Text() if dialect.name == "sqlite" else Numeric(asdecimal=True))

    def process_bind_param(self, value: int | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        return str(value) if dialect.name == "sqlite" else Decimal(value)

    def process_result_value(self, value: Any, dialect: Dialect) -> int | None:  # noqa: ARG002
        return None if value is None else int(value)


#: "All agents" / "all users" in a roll-up key.
NIL = uuid.UUID(int=0)
#: The key of a ledger row whose user or agent was already deleted (nulled) when it was rolled up.
GONE = uuid.UUID(int=1)
#: Outcomes the `errors` column counts.
ERROR_OUTCOMES = ("error", "interrupted")
#: The ledger's millisecond columns are 32-bit integers (24.8 days).
MS_MAX = 2**31 - 1
EXACT_BELOW = 64
RATIO = 1.05
#: Decimal digits per bucket.
FIELD = 9


def _bounds() -> tuple[int, ...]:
    """The buckets' lower bounds, and the upper bound (exclusive) of the last one."""
    bounds = list(range(EXACT_BELOW))
    low = EXACT_BELOW
    while low <= MS_MAX:
        bounds.append(low)
        low = max(low + 1, int(low * RATIO))
    bounds.append(low)
    return tuple(bounds)


BOUNDS = _bounds()
BUCKETS = len(BOUNDS) - 1
_ONE = tuple(10 ** (FIELD * b) for b in range(BUCKETS))


def bucket(value: int) -> int:
    """The bucket of a value in milliseconds (negative values count as 0)."""
    return min(max(bisect_right(BOUNDS, value) - 1, 0), BUCKETS - 1)


def histogram_of(value: int | None) -> int:
    """The histogram of one value (empty for None)."""
    return 0 if value is None else _ONE[bucket(value)]


Key = tuple[uuid.UUID, date, uuid.UUID, uuid.UUID]
_COUNTERS = ("generations", "completed", "errors", "cancelled", "chars_in", "chars_out")
_NULLABLE = ("tokens_in", "tokens_out")
_HISTOGRAMS = ("ttfc_hist", "duration_hist")


def started_on(created_at: datetime, duration_ms: int) -> date:
    """The UTC day a ledger row's generation began: its final write's time less its duration."""
    return (created_at - timedelta(milliseconds=duration_ms)).astimezone(UTC).date()


def _sorted(rows: Mapping[Key, dict[str, Any]]) -> list[dict[str, Any]]:
    return [rows[key] for key in sorted(rows, key=lambda k: (str(k[0]), k[1], str(k[2]), str(k[3])))]


def _accumulate(rows: dict[Key, dict[str, Any]], records: Iterable[Mapping[str, Any]], *, by_end: bool = False) -> None:
    """Add ledger rows to roll-up rows (four grains a row), by key; `by_end`: dated by the final write."""
    for r in records:
        day = r["created_at"].astimezone(UTC).date() if by_end else started_on(r["created_at"], r["duration_ms"] or 0)
        agent = r["agent_id"] or GONE
        user = r["user_id"] or GONE
        outcome = r["outcome"]
        add: dict[str, Any] = {
            "generations": 1,
            "completed": int(outcome == "complete"),
            "errors": int(outcome in ERROR_OUTCOMES),
            "cancelled": int(outcome == "cancelled"),
            "chars_in": r["chars_in"],
            "chars_out": r["chars_out"],
            "tokens_in": r["tokens_in"],
            "tokens_out": r["tokens_out"],
            "ttfc_hist": histogram_of(r["ttfc_ms"]),
            "duration_hist": histogram_of(r["duration_ms"]),
        }
        for key in ((r["team_id"], day, NIL, NIL), (r["team_id"], day, agent, NIL),
                    (r["team_id"], day, NIL, user), (r["team_id"], day, agent, user)):  # fmt: skip
            row = rows.get(key)
            if row is None:
                rows[key] = {"team_id": key[0], "day": key[1], "agent_id": key[2], "user_id": key[3], **add}
                continue
            for name in (*_COUNTERS, *_HISTOGRAMS):
                row[name] += add[name]
            for name in _NULLABLE:
                if add[name] is not None:
                    row[name] = (row[name] or 0) + add[name]


#: Whole UTC days a generation may begin before the day of its final write (its duration is held at MS_MAX).
_START_LAG_DAYS = -(-MS_MAX // 86_400_000)


class RollupBuilder:
    """The roll-up of a ledger read one team's UTC day of final writes at a time, in rows ready to insert: a
    roll-up row is handed out once no later final write can add to it, and each key exactly once."""

    def __init__(self, *, by_end: bool = False) -> None:
        self._rows: dict[Key, dict[str, Any]] = {}
        self._by_end = by_end

    def add(self, records: Iterable[Mapping[str, Any]], *, written_on: date) -> list[dict[str, Any]]:
        """Add the ledger rows whose final write was on `written_on` (the days of a team read in order);
        return the roll-up rows no later day can change."""
        _accumulate(self._rows, records, by_end=self._by_end)
        settled = written_on - timedelta(days=_START_LAG_DAYS)
        done = {key: row for key, row in self._rows.items() if key[1] < settled}
        for key in done:
            del self._rows[key]
        return _sorted(done)

    def rest(self) -> list[dict[str, Any]]:
        """The roll-up rows still held (the team's last days are read): all of them, once."""
        rows, self._rows = self._rows, {}
        return _sorted(rows)
