"""Usage: the ledger row of each generation, the usage reports computed in SQL, the daily quota."""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Any, Literal

from sqlalchemy import ColumnElement, Date, Select, case, cast, func, insert, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from app import metrics
from app.db import utcnow
from app.errors import RateLimited, Unprocessable
from app.models import Agent, Team, UsageDaily, UsageRecord, User
from app.security import Caller

GroupBy = Literal["day", "agent", "user"]
#: Outcomes the `errors` column counts: the answer failed, whether n8n or a stopped server ended it.
ERROR_OUTCOMES = ("error", "interrupted")
DEFAULT_DAYS = 30
MAX_DAYS = 366
QUOTA_REACHED = "Daily message quota reached; it resets at midnight UTC"


# --- the ledger ----------------------------------------------------------------------------------


def _ms(value: Any) -> int | None:
    return round(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


async def record_generation(
    *,
    session: AsyncSession,
    team_id: uuid.UUID,
    user_id: uuid.UUID,
    agent_id: uuid.UUID,
    chat_id: uuid.UUID | None,
    outcome: str,
    error_code: str | None,
    chars_in: int,
    chars_out: int,
    metadata: dict[str, Any],
) -> None:
    """Insert the generation's ledger row in the caller's transaction (the final message's; no commit).
    `chat_id` is None for a completion of the OpenAI-compatible API, which stores no chat.

    Timings and token counts come from the message metadata the generation gathered: `ttfc_ms`,
    `duration_ms`, `tokens_in`/`tokens_out` (present only when n8n reported usage).
    """
    await session.execute(
        insert(UsageRecord).values(
            team_id=team_id,
            user_id=user_id,
            agent_id=agent_id,
            chat_id=chat_id,
            outcome=outcome,
            error_code=error_code,
            chars_in=chars_in,
            chars_out=chars_out,
            tokens_in=_ms(metadata.get("tokens_in")),
            tokens_out=_ms(metadata.get("tokens_out")),
            ttfc_ms=_ms(metadata.get("ttfc_ms")),
            duration_ms=_ms(metadata.get("duration_ms")) or 0,
        )
    )


# --- reports -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class UsageRow:
    key: str | None
    label: str
    generations: int
    completed: int
    errors: int
    cancelled: int
    chars_in: int
    chars_out: int
    tokens_in: int | None
    tokens_out: int | None
    ttfc_ms_p50: float | None
    duration_ms_p50: float | None


def date_range(start: date | None, end: date | None) -> tuple[date, date]:
    """The days asked for, both included; by default the last 30 days up to today (UTC). 422 when reversed,
    longer than MAX_DAYS, or at the very ends of the calendar (where the bounds cannot be computed)."""
    end = end or utcnow().date()
    if end >= date.max or (start is None and end < date.min + timedelta(days=DEFAULT_DAYS - 1)):
        # The half-open bound is the day after `to`, and the default `from` 29 days before it: both must exist.
        raise Unprocessable("`to` is out of range", loc=("query", "to"))
    start = start or end - timedelta(days=DEFAULT_DAYS - 1)
    if start > end:
        raise Unprocessable("`from` must not be after `to`", loc=("query", "from"))
    if (end - start).days + 1 > MAX_DAYS:
        raise Unprocessable(f"At most {MAX_DAYS} days per query", loc=("query", "from"))
    return start, end


def _day_key(dialect: str) -> ColumnElement[Any]:
    if dialect == "postgresql":
        return cast(func.timezone("UTC", UsageRecord.created_at), Date)
    return func.date(UsageRecord.created_at)  # SQLite stores UTC text: its first ten characters are the day


def _key_of(group_by: GroupBy, dialect: str) -> Any:
    if group_by == "agent":
        return UsageRecord.agent_id
    if group_by == "user":
        return UsageRecord.user_id
    return _day_key(dialect)


def _counted(outcomes: tuple[str, ...]) -> ColumnElement[Any]:
    return func.sum(case((UsageRecord.outcome.in_(outcomes), 1), else_=0))


def _medians_sqlite(key: ColumnElement[Any], where: list[ColumnElement[bool]], column: Any) -> Select[tuple[Any, Any]]:
    """SQLite has no percentile_cont: the median (its 0.5 value, interpolated) from row numbers."""
    ranked = (
        select(
            key.label("k"),
            column.label("v"),
            func.row_number().over(partition_by=key, order_by=column).label("rn"),
            func.count().over(partition_by=key).label("n"),
        )
        .where(*where, column.is_not(None))
        .subquery()
    )
    middle = or_(ranked.c.rn == (ranked.c.n + 1) // 2, ranked.c.rn == (ranked.c.n + 2) // 2)
    return select(ranked.c.k, func.avg(ranked.c.v)).where(middle).group_by(ranked.c.k)


async def usage_report(
    *,
    session: AsyncSession,
    team_id: uuid.UUID,
    user_id: uuid.UUID | None,
    start: date,
    end: date,
    group_by: GroupBy,
) -> list[UsageRow]:
    """One row per day, agent or user with data in [start, end] (UTC days), of the team or of one user."""
    dialect = session.get_bind().dialect.name
    key = _key_of(group_by, dialect)
    where: list[ColumnElement[bool]] = [
        UsageRecord.team_id == team_id,
        UsageRecord.created_at >= datetime.combine(start, time(), UTC),
        UsageRecord.created_at < datetime.combine(end + timedelta(days=1), time(), UTC),
    ]
    if user_id is not None:
        where.append(UsageRecord.user_id == user_id)
    columns: list[Any] = [
        key.label("k"),
        func.count().label("generations"),
        _counted(("complete",)).label("completed"),
        _counted(ERROR_OUTCOMES).label("errors"),
        _counted(("cancelled",)).label("cancelled"),
        func.sum(UsageRecord.chars_in).label("chars_in"),
        func.sum(UsageRecord.chars_out).label("chars_out"),
        func.sum(UsageRecord.tokens_in).label("tokens_in"),
        func.sum(UsageRecord.tokens_out).label("tokens_out"),
    ]
    if dialect == "postgresql":
        columns += [
            func.percentile_cont(0.5).within_group(UsageRecord.ttfc_ms).label("ttfc"),
            func.percentile_cont(0.5).within_group(UsageRecord.duration_ms).label("duration"),
        ]
    rows = (await session.execute(select(*columns).where(*where).group_by(key))).all()
    if dialect == "postgresql":
        ttfc = {r.k: r.ttfc for r in rows}
        duration = {r.k: r.duration for r in rows}
    else:
        ttfc = {r[0]: r[1] for r in await session.execute(_medians_sqlite(key, where, UsageRecord.ttfc_ms))}
        duration = {r[0]: r[1] for r in await session.execute(_medians_sqlite(key, where, UsageRecord.duration_ms))}
    labels = await _labels(session, group_by, [r.k for r in rows if r.k is not None])
    out = [
        UsageRow(
            key=None if r.k is None else str(r.k),
            label=_label(group_by, r.k, labels),
            generations=int(r.generations),
            completed=int(r.completed or 0),
            errors=int(r.errors or 0),
            cancelled=int(r.cancelled or 0),
            chars_in=int(r.chars_in or 0),
            chars_out=int(r.chars_out or 0),
            tokens_in=None if r.tokens_in is None else int(r.tokens_in),
            tokens_out=None if r.tokens_out is None else int(r.tokens_out),
            ttfc_ms_p50=_rounded(ttfc.get(r.k)),
            duration_ms_p50=_rounded(duration.get(r.k)),
        )
        for r in rows
    ]
    if group_by == "day":
        return sorted(out, key=lambda row: row.key or "")
    return sorted(out, key=lambda row: (-row.generations, row.label))


def _rounded(value: Any) -> float | None:
    return None if value is None else round(float(value), 1)


async def _labels(session: AsyncSession, group_by: GroupBy, keys: list[Any]) -> dict[Any, str]:
    if group_by == "agent" and keys:
        agents = await session.execute(select(Agent.id, Agent.name).where(Agent.id.in_(keys)))
        return {row[0]: row[1] for row in agents}
    if group_by == "user" and keys:
        users = await session.execute(select(User.id, User.full_name, User.email).where(User.id.in_(keys)))
        return {row.id: row.full_name or row.email for row in users}
    return {}


def _label(group_by: GroupBy, key: Any, labels: dict[Any, str]) -> str:
    if group_by == "day":
        return str(key)
    if key is None:
        return "(deleted)"
    return labels.get(key, "(deleted)")


# --- the daily quota -----------------------------------------------------------------------------


def quota_of(team_settings: dict[str, Any] | None) -> int | None:
    """`quota.messages_per_user_per_day` of a team's settings; None (unlimited) when unset."""
    quota = (team_settings or {}).get("quota")
    value = quota.get("messages_per_user_per_day") if isinstance(quota, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def seconds_to_midnight(now: datetime) -> int:
    midnight = datetime.combine(now.date() + timedelta(days=1), time(), UTC)
    return max(1, math.ceil((midnight - now).total_seconds()))


async def claim_generation(*, session: AsyncSession, user: Caller) -> date | None:
    """Count one generation against the caller's daily quota before anything is stored; 429 past it.

    One conditional upsert raises the user's counter for today only while it is under the quota, so
    concurrent sends cannot overshoot it. The day's first claim starts from the ledger's count of the day
    (generations before the quota was set count too). Returns the day claimed (to `release_generation` a
    send refused afterwards), None when the team has no quota.
    """
    team_settings = (await session.execute(select(Team.settings).where(Team.id == user.team_id))).scalar()
    limit = quota_of(team_settings)
    if limit is None:
        return None
    now = utcnow()
    today = now.date()
    refusal = RateLimited(QUOTA_REACHED, headers={"Retry-After": str(seconds_to_midnight(now))})
    if limit <= 0:
        metrics.refused("quota")
        raise refusal
    so_far = (
        select(func.count())
        .select_from(UsageRecord)
        .where(
            UsageRecord.user_id == user.id,
            UsageRecord.created_at >= datetime.combine(today, time(), UTC),
        )
        .scalar_subquery()
    )
    dialect = session.get_bind().dialect.name
    upsert = (postgresql.insert if dialect == "postgresql" else sqlite.insert)(UsageDaily)
    statement = (
        upsert.values(user_id=user.id, day=today, generations=so_far + 1)
        .on_conflict_do_update(
            index_elements=[UsageDaily.user_id, UsageDaily.day],
            set_={"generations": UsageDaily.generations + 1},
            where=UsageDaily.generations < limit,
        )
        .returning(UsageDaily.generations)
    )
    count = (await session.execute(statement)).scalar()
    await session.commit()
    if count is None or count > limit:
        metrics.refused("quota")
        raise refusal
    return today


async def release_generation(*, session: AsyncSession, user: Caller, day: date) -> None:
    """Give a claim back when the send was refused after it (a generation already running)."""
    await session.execute(
        update(UsageDaily)
        .where(UsageDaily.user_id == user.id, UsageDaily.day == day, UsageDaily.generations > 0)
        .values(generations=UsageDaily.generations - 1)
    )
    await session.commit()
