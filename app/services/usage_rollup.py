"""The usage roll-up: ledger rows summed per team, UTC day, agent and user, with histograms for the medians.

A histogram is one non-negative integer: the count of bucket `b` is its decimal digits `FIELD * b` to
`FIELD * (b + 1)`. Adding two histograms is adding the integers (no carry: a field holds up to 10**FIELD - 1
values), so PostgreSQL adds and sums them as NUMERIC, in C, without unpacking anything; a report reads one
integer per group and takes the median from it here.

Buckets: one per millisecond below `EXACT_BELOW`, then each `RATIO` times wider than the one before, up to
2**31 ms (the ledger's integer). A median is computed as PostgreSQL's `percentile_cont(0.5)` would (the
mean of the two middle values for an even count), each middle value taken as its bucket's midpoint: exact
below `EXACT_BELOW` ms, and otherwise off by less than (RATIO - 1) / 2 = 2.5 % of the true median.
Changing the buckets changes what the stored integers mean: it needs a migration that rebuilds the roll-up
(with a frozen copy of the new code of its own: migrations 0011 and 0020 use theirs, migrations/frozen).
"""

from __future__ import annotations

import uuid
from bisect import bisect_right
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, date, datetime, timedelta
from itertools import accumulate
from typing import Any

from sqlalchemy import ColumnElement, Insert, Integer, Numeric, bindparam, cast, func, literal, select, union_all

from app.dialects import Statements
from app.models import UsageRollup

#: "All agents" / "all users" in a roll-up key.
NIL = uuid.UUID(int=0)
#: The key of a ledger row whose user or agent was already deleted (nulled) when it was rolled up.
GONE = uuid.UUID(int=1)
#: Outcomes the `errors` column counts: the answer failed, whether n8n or a stopped server ended it.
ERROR_OUTCOMES = ("error", "interrupted")
#: The ledger's millisecond columns are 32-bit integers (24.8 days); a longer duration is held there.
MS_MAX = 2**31 - 1
EXACT_BELOW = 64
RATIO = 1.05
#: Decimal digits per bucket: up to 999,999,999 values of one group in one bucket.
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
_CHUNK = 16
_CHUNK_DIGITS = FIELD * _CHUNK
_NINES = 10**FIELD - 1
#: Slices of a histogram's digits: its chunks, then a chunk's fields, lowest first (counted from the right).
_CHUNKS = tuple(slice(-end - _CHUNK_DIGITS, -end or None) for end in range(0, FIELD * BUCKETS, _CHUNK_DIGITS))
_IN_CHUNK = tuple(slice(-end - FIELD, -end or None) for end in range(0, _CHUNK_DIGITS, FIELD))


def bucket(value: int) -> int:
    """The bucket of a value in milliseconds (negative values count as 0)."""
    return min(max(bisect_right(BOUNDS, value) - 1, 0), BUCKETS - 1)


def histogram_of(value: int | None) -> int:
    """The histogram of one value (empty for None)."""
    return 0 if value is None else _ONE[bucket(value)]


def summed_digits(text: str | None) -> str:
    """A histogram summed in SQL (`Statements.sum_histograms`) as decimal digits: PostgreSQL's sum is already
    that text; SQLite's terms (joined by commas) are added here."""
    if not text:
        return "0"
    return str(sum(int(part) for part in text.split(","))) if "," in text else text


def _digits(histogram: int | str, multiple: int) -> str:
    """A histogram's decimal digits, zero-padded on the left to a multiple of `multiple`."""
    digits = histogram if isinstance(histogram, str) else str(histogram)  # under Python's 4,300-digit limit
    return "0" * (-len(digits) % multiple) + digits


def counts(histogram: int | str) -> list[tuple[int, int]]:
    """(bucket, count) of the non-empty buckets, lowest first, of a histogram or of its decimal digits."""
    digits = _digits(histogram, FIELD)
    fields = [int(digits[end - FIELD : end]) for end in range(len(digits), 0, -FIELD)]
    return [(b, count) for b, count in enumerate(fields) if count]


def median(histogram: int | str) -> float | None:
    """The median of the values in a histogram (None when it is empty); see the module's docstring.

    It runs for every group of every report, so it reads few fields, and in C (map over slices): the
    histogram is cut into chunks of `_CHUNK` fields, and a chunk's total is its integer modulo 10**FIELD - 1
    (the sum of its base-10**FIELD digits, as casting out nines; exact while a group has fewer than
    10**FIELD - 1 values). Only the chunks holding the two middle values are read field by field.
    """
    digits = histogram if isinstance(histogram, str) else str(histogram)
    chunks = list(map(digits.__getitem__, _CHUNKS[: -(-len(digits) // _CHUNK_DIGITS)]))  # lowest first
    running = list(accumulate(map(_NINES.__rmod__, map(int, chunks))))
    total = running[-1]
    if total == 0:
        return None
    return (_middle(chunks, running, (total - 1) // 2) + _middle(chunks, running, total // 2)) / 2


def _middle(chunks: list[str], running: list[int], rank: int) -> float:
    """The midpoint of the bucket holding the value of this rank (0-based, in increasing order)."""
    c = bisect_right(running, rank)  # the first chunk whose running count passes the rank
    fields = accumulate(map(int, map(chunks[c].zfill(_CHUNK_DIGITS).__getitem__, _IN_CHUNK)))
    b = c * _CHUNK + bisect_right(list(fields), rank - (running[c - 1] if c else 0))
    return (BOUNDS[b] + BOUNDS[b + 1] - 1) / 2


# --- from ledger rows to roll-up rows ----------------------------------------------------------------

Key = tuple[uuid.UUID, date, uuid.UUID, uuid.UUID]
_COUNTERS = ("generations", "completed", "errors", "cancelled", "chars_in", "chars_out")
_NULLABLE = ("tokens_in", "tokens_out")
_HISTOGRAMS = ("ttfc_hist", "duration_hist")


def started_on(created_at: datetime, duration_ms: int) -> date:
    """The UTC day a ledger row's generation began: its final write's time less its duration. The quota counts
    a generation on that day (`usage.claim_generation` reads the ledger the same way), so the reports do too:
    an answer begun before midnight and ended after it is the day before's in both."""
    return (created_at - timedelta(milliseconds=duration_ms)).astimezone(UTC).date()


def rollup_rows(records: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The roll-up rows (four grains) that ledger rows add up to, sorted by key.

    A record has the ledger's columns (`team_id`, `user_id`, `agent_id`, `outcome`, `chars_in`, `chars_out`,
    `tokens_in`, `tokens_out`, `ttfc_ms`, `duration_ms`, `created_at`); its day is the one it began on
    (`started_on`). The sort gives concurrent upserts one lock order (the team's day first), so they queue
    rather than deadlock.
    """
    rows: dict[Key, dict[str, Any]] = {}
    _accumulate(rows, records)
    return _sorted(rows)


def _sorted(rows: Mapping[Key, dict[str, Any]]) -> list[dict[str, Any]]:
    return [rows[key] for key in sorted(rows, key=lambda k: (str(k[0]), k[1], str(k[2]), str(k[3])))]


def _accumulate(rows: dict[Key, dict[str, Any]], records: Iterable[Mapping[str, Any]], *, by_end: bool = False) -> None:
    """Add ledger rows to roll-up rows (`rollup_rows`), by key; `by_end`: dated by the final write instead
    (the roll-up before migration 0020, which its downgrade restores)."""
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
    """The roll-up of a ledger read one team's UTC day of final writes at a time (a rebuild on SQLite, a
    migration's back-fill), in rows ready to insert: a row is dated by its start (`started_on`), up to `_START_LAG_DAYS`
    before its final write, so a roll-up row is handed out once no later final write can add to it, and each
    key exactly once (the reads of two days added to one key; a second INSERT of it was a duplicate key). Only
    the roll-up of the last few weeks of one team is held in memory."""

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


#: The roll-up's key: one row per team, UTC day, agent and user.
_KEY = ["team_id", "day", "agent_id", "user_id"]


def _adding(statements: Statements) -> Callable[[Any], dict[str, Any]]:
    """The ON CONFLICT update of a roll-up row: the new row's counters, sums and histograms added to it."""

    def set_of(excluded: Any) -> dict[str, Any]:
        t = UsageRollup
        changes: dict[str, Any] = {name: getattr(t, name) + getattr(excluded, name) for name in _COUNTERS}
        for name in _NULLABLE:
            mine, theirs = getattr(t, name), getattr(excluded, name)
            changes[name] = func.coalesce(mine + theirs, mine, theirs)
        for name in _HISTOGRAMS:
            changes[name] = statements.add_histograms(getattr(t, name), getattr(excluded, name))
        return changes

    return set_of


def add_to_rollup(statements: Statements, rows: list[dict[str, Any]]) -> Insert:
    """One upsert adding roll-up rows to the stored ones (inserting the missing): safe under concurrency,
    since each row's update is done under its row lock by the database."""
    return statements.upsert(UsageRollup, rows, _KEY, _adding(statements))


def prebuilt_add_to_rollup(statements: Statements, count: int, where: ColumnElement[bool]) -> Insert:
    """`add_to_rollup` of the `count` rows of ONE ledger row as a prebuilt statement (SQLAlchemy caches its
    compiled form), bound by `prebuilt_params`; it upserts the rows in their order (`rollup_rows`' lock order).

    The rows' histograms are the same one-value histogram, 10**(FIELD * bucket): built in SQL from the bucket
    (`ttfc_bucket`, `duration_bucket`; NULL for no value) rather than sent as numbers of up to ~3,600 digits
    each, whose encoding cost more CPU than the rest of the statement's parameters together. Only where
    `where` holds (the caller's condition, e.g. `true()`)."""
    columns = list(UsageRollup.__table__.columns)

    def value(i: int, column: Any) -> Any:
        if column.key in _HISTOGRAMS:
            bucket_ = bindparam(_BUCKET_PARAMS[column.key], type_=Integer())
            digits = func.coalesce(literal("1").concat(func.repeat("0", bucket_ * FIELD)), "0")
            return cast(digits, Numeric()).label(column.key)
        return bindparam(f"r{i}_{column.key}", type_=column.type).label(column.key)

    rows = union_all(*(select(*(value(i, c) for c in columns)).where(where) for i in range(count)))
    return statements.upsert_select(UsageRollup, [c.key for c in columns], rows, _KEY, _adding(statements))


#: The bucket parameter of each histogram column in `prebuilt_add_to_rollup`, and the ledger column it is of.
_BUCKET_PARAMS = {"ttfc_hist": "ttfc_bucket", "duration_hist": "duration_bucket"}


def prebuilt_params(record: Mapping[str, Any]) -> dict[str, Any]:
    """The parameters of `prebuilt_add_to_rollup` for one ledger row (the columns `rollup_rows` reads)."""
    rows = rollup_rows([record])
    params = {
        f"r{i}_{name}": value for i, row in enumerate(rows) for name, value in row.items() if name not in _HISTOGRAMS
    }
    for ms in ("ttfc_ms", "duration_ms"):
        params[ms.replace("_ms", "_bucket")] = None if record[ms] is None else bucket(record[ms])
    return params


def _ledger_rollup_sql() -> str:
    """The whole roll-up of the ledger as one INSERT ... SELECT (PostgreSQL): the rows `rollup_rows` gives for
    all of it, summed by the database, where a rebuild in Python spent its time sending each roll-up row's
    histograms (numbers of up to ~3,800 digits) back. A row's bucket is `bucket`'s (`width_bucket` over
    `BOUNDS` is `bisect_right`), its histogram `prebuilt_add_to_rollup`'s `10**(FIELD * bucket)`; each
    ledger row is added to its (user, agent) group once, and those groups summed into the four grains."""
    bounds = "ARRAY[" + ",".join(map(str, BOUNDS)) + "]::bigint[]"

    def one(ms: str) -> str:
        # NULL (no value: an empty histogram, skipped by sum) stays NULL: greatest() and least() ignore it.
        b = f"least(greatest(width_bucket({ms}::bigint, {bounds}) - 1, 0), {BUCKETS - 1})"
        return f"CASE WHEN {ms} IS NOT NULL THEN (SELECT ones FROM histograms)[{b} + 1] END"

    counters = ", ".join(_COUNTERS + _NULLABLE + _HISTOGRAMS)
    sums = ", ".join(f"sum({name})" for name in _COUNTERS + _NULLABLE + _HISTOGRAMS)
    return f"""
INSERT INTO usage_rollups (team_id, day, agent_id, user_id, {counters})
WITH histograms AS MATERIALIZED (
  SELECT array_agg(CAST('1' || repeat('0', {FIELD} * b) AS numeric) ORDER BY b) AS ones
  FROM generate_series(0, {BUCKETS - 1}) b
)
SELECT team_id, day, coalesce(agent_id, '{NIL}'), coalesce(user_id, '{NIL}'), {sums}
FROM (
  SELECT team_id, ((created_at - duration_ms * interval '1 millisecond') AT TIME ZONE 'UTC')::date AS day,
         coalesce(agent_id, '{GONE}'::uuid) AS agent_id, coalesce(user_id, '{GONE}'::uuid) AS user_id,
         count(*) AS generations,
         count(*) FILTER (WHERE outcome = 'complete') AS completed,
         count(*) FILTER (WHERE outcome IN ({", ".join(f"'{o}'" for o in ERROR_OUTCOMES)})) AS errors,
         count(*) FILTER (WHERE outcome = 'cancelled') AS cancelled,
         sum(chars_in) AS chars_in, sum(chars_out) AS chars_out,
         sum(tokens_in) AS tokens_in, sum(tokens_out) AS tokens_out,
         coalesce(sum({one("ttfc_ms")}), 0) AS ttfc_hist,
         sum({one("duration_ms")}) AS duration_hist
  FROM usage_records
  GROUP BY 1, 2, 3, 4
) pairs
GROUP BY GROUPING SETS ((team_id, day), (team_id, day, agent_id), (team_id, day, user_id),
                        (team_id, day, agent_id, user_id))
"""


#: `_ledger_rollup_sql`, built once.
LEDGER_ROLLUP_SQL = _ledger_rollup_sql()
