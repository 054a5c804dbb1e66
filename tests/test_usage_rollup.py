"""The roll-up's histograms: buckets, packing, medians and their error bound (pure functions, no database)."""

from __future__ import annotations

import itertools
import random
import statistics
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from app.services.usage_rollup import (
    BOUNDS,
    BUCKETS,
    EXACT_BELOW,
    FIELD,
    GONE,
    NIL,
    RollupBuilder,
    bucket,
    counts,
    histogram_of,
    median,
    rollup_rows,
    started_on,
    summed_digits,
)


def test_buckets_cover_every_ledger_value_with_at_most_2_5_percent_from_their_midpoint() -> None:
    assert BOUNDS[: EXACT_BELOW + 1] == tuple(range(EXACT_BELOW + 1))
    assert BOUNDS[-1] > 2**31 - 1  # the last bucket holds the ledger's largest integer
    for low, high in itertools.pairwise(BOUNDS):
        assert high > low
        middle = (low + high - 1) / 2
        assert abs(middle - low) <= 0.025 * low if low else middle == 0
        assert abs(middle - (high - 1)) <= 0.025 * (high - 1)
    assert [bucket(v) for v in (-5, 0, 63, 64, 2**31 - 1)] == [0, 0, 63, 64, BUCKETS - 1]


def test_histograms_add_as_integers_and_unpack() -> None:
    values = [0, 5, 5, 64, 1000, 1000, 1001, 2**31 - 1]
    histogram = sum(histogram_of(v) for v in values) + histogram_of(None)
    assert counts(histogram) == sorted(_bucket_counts(values).items())
    assert counts(str(histogram)) == counts(histogram)
    assert len(str(histogram)) <= FIELD * BUCKETS  # below Python's 4,300-digit str(int) limit
    # A bucket's field holds 10**FIELD - 1 values without carrying into the next bucket.
    full = (10**FIELD - 1) * histogram_of(70)
    assert counts(full + histogram_of(80)) == [(bucket(70), 10**FIELD - 1), (bucket(80), 1)]


def _bucket_counts(values: list[int]) -> dict[int, int]:
    out: dict[int, int] = {}
    for v in values:
        out[bucket(v)] = out.get(bucket(v), 0) + 1
    return out


def test_summed_digits_reads_both_databases_sums() -> None:
    a, b = histogram_of(7), histogram_of(900)
    assert summed_digits(str(a + b)) == str(a + b)  # PostgreSQL: sum(numeric) as text
    assert summed_digits(f"{a},{b}") == str(a + b)  # SQLite: the terms, joined
    assert summed_digits(None) == "0"
    assert median(summed_digits(None)) is None


@pytest.mark.parametrize("seed", range(20))
def test_median_matches_percentile_cont_within_the_bound(seed: int) -> None:
    rng = random.Random(seed)
    values = [
        rng.choice([rng.randint(0, 63), rng.randint(0, 5000), int(rng.lognormvariate(8, 3)) % 2**31])
        for _ in range(rng.randint(1, 400))
    ]
    exact = statistics.median(values)
    got = median(sum(histogram_of(v) for v in values))
    assert got == pytest.approx(exact, rel=0.025, abs=1e-9)


def test_median_is_exact_below_64_ms_odd_and_even() -> None:
    assert median(sum(histogram_of(v) for v in (10, 20, 30, 40))) == 25.0
    assert median(sum(histogram_of(v) for v in (3, 63, 9))) == 9.0
    assert median(histogram_of(0)) == 0.0
    assert median(0) is None


def test_rollup_rows_sum_four_grains_and_key_deleted_ids_as_gone() -> None:
    team, user, agent = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    late = datetime(2026, 11, 20, 23, tzinfo=UTC)
    base = {"team_id": team, "outcome": "complete", "chars_in": 1, "chars_out": 2, "tokens_in": None,
            "tokens_out": None, "ttfc_ms": None, "duration_ms": 10, "created_at": late}  # fmt: skip
    rows = rollup_rows([
        {**base, "user_id": user, "agent_id": agent, "tokens_in": 4},
        {**base, "user_id": None, "agent_id": agent, "outcome": "interrupted", "ttfc_ms": 3},
    ])  # fmt: skip
    by_key = {(r["agent_id"], r["user_id"]): r for r in rows}
    assert set(by_key) == {(NIL, NIL), (agent, NIL), (NIL, user), (agent, user), (NIL, GONE), (agent, GONE)}
    total = by_key[(NIL, NIL)]
    assert (total["generations"], total["completed"], total["errors"], total["tokens_in"]) == (2, 1, 1, 4)
    assert by_key[(agent, GONE)]["tokens_in"] is None  # no count reported: null, as the ledger's sum
    assert counts(total["ttfc_hist"]) == [(3, 1)]
    assert counts(total["duration_hist"]) == [(10, 2)]


def test_median_reads_chunk_totals_exactly_at_large_counts() -> None:
    """Chunk totals come from casting out nines: exact up to 10**FIELD - 2 values in a group."""
    many = 10**FIELD - 2
    histogram = (many - 3) * histogram_of(5) + histogram_of(70) + histogram_of(5_000) + 2 * histogram_of(2**31 - 1)
    assert median(histogram) == 5.0
    assert median(histogram_of(5) + 2 * histogram_of(900_000)) == pytest.approx(900_000, rel=0.025)
    # Middle values in two different chunks of buckets (an even count: their mean).
    assert median(histogram_of(10) + histogram_of(1_000_000)) == pytest.approx((10 + 1_000_000) / 2, rel=0.025)


def test_the_builder_of_a_rebuild_gives_each_roll_up_row_once_as_rollup_rows_does() -> None:
    """Ledger rows read one UTC day of final writes at a time (a rebuild, a migration's back-fill), begun up to
    24.8 days before (the ledger's longest duration): every key handed out once, summed as `rollup_rows` sums
    them all at once, and none before its last row was read."""
    rng = random.Random(18)
    team = uuid.uuid4()
    start = datetime(2026, 10, 1, tzinfo=UTC)
    records: list[dict[str, Any]] = [
        {"team_id": team, "user_id": rng.choice([None, uuid.uuid4()]), "agent_id": None, "outcome": "complete",
         "chars_in": 1, "chars_out": 2, "tokens_in": None, "tokens_out": None, "ttfc_ms": None,
         "duration_ms": rng.choice([0, 5_000, 3_600_000, 2**31 - 1]),
         "created_at": start + timedelta(hours=rng.randint(0, 60 * 24))}
        for _ in range(400)
    ]  # fmt: skip
    builder = RollupBuilder()
    handed: list[dict[str, object]] = []
    day = start.date()
    while day <= (start + timedelta(days=60)).date():
        written = [r for r in records if r["created_at"].date() == day]
        out = builder.add(written, written_on=day)
        later = [r for r in records if r["created_at"].date() > day]
        assert not {row["day"] for row in out} & {started_on(r["created_at"], r["duration_ms"]) for r in later}
        handed += out
        day += timedelta(days=1)
    handed += builder.rest()
    keys = [(row["day"], row["agent_id"], row["user_id"]) for row in handed]
    assert len(keys) == len(set(keys))
    assert sorted(handed, key=str) == sorted(rollup_rows(records), key=str)
