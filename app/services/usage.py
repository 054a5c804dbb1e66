"""Usage: the ledger row of each generation (with its roll-up), the usage reports, the daily quota."""

from __future__ import annotations

import asyncio
import math
import uuid
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Any, Literal

from sqlalchemy import ColumnElement, Insert, bindparam, delete, func, insert, literal, null, select, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession

from app import metrics
from app.db import execute_core, utcnow
from app.dialects import Statements, statements_of
from app.errors import RateLimited, Unprocessable
from app.models import Agent, Team, UsageDaily, UsageRecord, UsageRollup, User
from app.security import Caller
from app.services.usage_rollup import (
    LEDGER_ROLLUP_SQL,
    MS_MAX,
    NIL,
    RollupBuilder,
    add_to_rollup,
    median,
    prebuilt_add_to_rollup,
    prebuilt_params,
    rollup_rows,
    summed_digits,
)

GroupBy = Literal["day", "agent", "user"]
DEFAULT_DAYS = 30
MAX_DAYS = 366
QUOTA_REACHED = "Daily message quota reached; it resets at midnight UTC"
#: PostgreSQL's `lock_not_available`: a lock not granted within `lock_timeout`.
LOCK_NOT_AVAILABLE = "55P03"


# --- the ledger ----------------------------------------------------------------------------------


#: The ledger's millisecond columns are 32-bit integers (24.8 days, `usage_rollup.MS_MAX`): a generation
#: recovered long after its start is held there, which still dates it before any day a quota counts.


def _ms(value: Any) -> int | None:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return None
    return min(max(round(value), 0), MS_MAX)


def ledger_row(
    *,
    team_id: uuid.UUID,
    user_id: uuid.UUID,
    agent_id: uuid.UUID,
    chat_id: uuid.UUID | None,
    outcome: str,
    error_code: str | None,
    chars_in: int,
    chars_out: int,
    metadata: dict[str, Any],
) -> dict[str, Any]:
    """A generation's ledger row (all its columns but `id`). `chat_id` is None for a completion of the
    OpenAI-compatible API, which stores no chat.

    Timings and token counts come from the message metadata the generation gathered: `ttfc_ms`,
    `duration_ms`, `tokens_in`/`tokens_out` (present only when n8n reported usage).
    """
    return {
        "team_id": team_id,
        "user_id": user_id,
        "agent_id": agent_id,
        "chat_id": chat_id,
        "outcome": outcome,
        "error_code": error_code,
        "chars_in": chars_in,
        "chars_out": chars_out,
        "tokens_in": _ms(metadata.get("tokens_in")),
        "tokens_out": _ms(metadata.get("tokens_out")),
        "ttfc_ms": _ms(metadata.get("ttfc_ms")),
        "duration_ms": _ms(metadata.get("duration_ms")) or 0,
        "created_at": utcnow(),
    }


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
    """Insert the generation's ledger row (`ledger_row`) in the caller's transaction (the final message's;
    no commit)."""
    row = ledger_row(
        team_id=team_id,
        user_id=user_id,
        agent_id=agent_id,
        chat_id=chat_id,
        outcome=outcome,
        error_code=error_code,
        chars_in=chars_in,
        chars_out=chars_out,
        metadata=metadata,
    )
    await add_ledger_rows(session=session, rows=[row])


async def add_ledger_rows(*, session: AsyncSession, rows: list[dict[str, Any]]) -> None:
    """Ledger rows (all their columns but `id`) and their roll-up, in the caller's transaction: with
    `ledger_writes` (the same for one row, chained into a larger statement), the only way rows enter the
    ledger, so the roll-up the reports read always equals the ledger."""
    ledger = insert(UsageRecord).values(
        user_id=_existing(User, bindparam("l_user_id", type_=UsageRecord.user_id.type)),
        agent_id=_existing(Agent, bindparam("l_agent_id", type_=UsageRecord.agent_id.type)),
    )
    params = [
        {k: v for k, v in row.items() if k not in ("user_id", "agent_id")}
        | {"l_user_id": row["user_id"], "l_agent_id": row["agent_id"]}
        for row in rows
    ]
    await session.execute(ledger, params)
    await session.execute(add_to_rollup(statements_of(session), rollup_rows(rows)))


def _existing(model: type[Agent] | type[User], value: Any) -> Any:
    """The id while its row exists, else NULL: a user or agent deleted (in SQL) while its answer ran is stored
    as the deletion leaves the ledger's older rows (the foreign key refused the row, and the usage was lost).
    The roll-up keeps the id, as it does for those rows."""
    return select(model.id).where(model.id == value).scalar_subquery()


#: The roll-up rows of one ledger row: the team's day, the agent's, the user's, the user's with the agent.
GRAINS = 4


def ledger_writes(statements: Statements, where: ColumnElement[bool]) -> tuple[Insert, Insert]:
    """`add_ledger_rows` of ONE row as two prebuilt statements, for a statement that chains writes
    (`Statements.chains_writes`), bound by `ledger_params`: the ledger's INSERT (its `id` bound too: a chained
    INSERT gets no Python-side default) and the roll-up's upsert (`add_to_rollup`'s, its rows in the order
    `rollup_rows` sorts them, so concurrent writers take the row locks in one order). Both write only `where`
    holds (the final write's: the answer was not final already)."""
    columns = list(UsageRecord.__table__.columns)
    owners: dict[str, type[Agent] | type[User]] = {"user_id": User, "agent_id": Agent}

    def value(c: Any) -> Any:
        bound = bindparam(f"u_{c.key}", type_=c.type)
        return _existing(owners[c.key], bound) if c.key in owners else bound

    row = select(*(value(c) for c in columns)).where(where)
    ledger = insert(UsageRecord).from_select([c.key for c in columns], row)
    return ledger, prebuilt_add_to_rollup(statements, GRAINS, where)


def ledger_params(row: dict[str, Any]) -> dict[str, Any]:
    """The parameters of `ledger_writes` for one ledger row (`ledger_row`)."""
    params = {f"u_{name}": value for name, value in row.items()}
    params["u_id"] = uuid.uuid4()
    return params | prebuilt_params(row)


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


@dataclass(slots=True)
class _Group:
    """A report row's sums before labels: groups whose key is gone are merged into one."""

    generations: int
    completed: int
    errors: int
    cancelled: int
    chars_in: int
    chars_out: int
    tokens_in: int | None
    tokens_out: int | None
    #: Histograms (app.services.usage_rollup) as decimal digits.
    ttfc: str
    duration: str

    def add(self, other: _Group) -> None:
        self.generations += other.generations
        self.completed += other.completed
        self.errors += other.errors
        self.cancelled += other.cancelled
        self.chars_in += other.chars_in
        self.chars_out += other.chars_out
        self.tokens_in = _plus(self.tokens_in, other.tokens_in)
        self.tokens_out = _plus(self.tokens_out, other.tokens_out)
        self.ttfc = str(int(self.ttfc) + int(other.ttfc))
        self.duration = str(int(self.duration) + int(other.duration))


def _plus(a: int | None, b: int | None) -> int | None:
    return b if a is None else a if b is None else a + b


def _grain(group_by: GroupBy, user_id: uuid.UUID | None) -> tuple[Any, list[ColumnElement[bool]]]:
    """The roll-up rows a report reads (one grain) and the column it groups them by."""
    t = UsageRollup
    user = t.user_id == (NIL if user_id is None else user_id)
    if group_by == "day":
        return t.day, [t.agent_id == NIL, user]
    if group_by == "agent":
        return t.agent_id, [t.agent_id != NIL, user]
    return t.user_id, [t.agent_id == NIL, t.user_id != NIL]


async def usage_report(
    *,
    session: AsyncSession,
    team_id: uuid.UUID,
    user_id: uuid.UUID | None,
    start: date,
    end: date,
    group_by: GroupBy,
) -> list[UsageRow]:
    """One row per day, agent or user with data in [start, end] (UTC days), of the team or of one user.

    Read from the roll-up (app.services.usage_rollup), not the ledger: a few rows per day and group instead
    of one per generation. The medians come from its histograms (exact below 64 ms, else within 2.5 %).
    """
    if group_by == "user" and user_id is not None:
        raise ValueError("a user's own report has no `user` grouping")
    t = UsageRollup
    statements = statements_of(session)
    key, grain = _grain(group_by, user_id)
    grouped = (
        select(
            key.label("k"),
            func.sum(t.generations).label("generations"),
            func.sum(t.completed).label("completed"),
            func.sum(t.errors).label("errors"),
            func.sum(t.cancelled).label("cancelled"),
            func.sum(t.chars_in).label("chars_in"),
            func.sum(t.chars_out).label("chars_out"),
            func.sum(t.tokens_in).label("tokens_in"),
            func.sum(t.tokens_out).label("tokens_out"),
            statements.sum_histograms(t.ttfc_hist).label("ttfc"),
            statements.sum_histograms(t.duration_hist).label("duration"),
        )
        .where(t.team_id == team_id, t.day >= start, t.day <= end, *grain)
        .group_by(key)
        .subquery()
    )
    # The names in the same round trip: a key with no agent or user row left is a deleted one's usage.
    if group_by == "agent":
        query = select(grouped, Agent.id.label("found"), Agent.name, null().label("email"))
        query = query.outerjoin(Agent, Agent.id == grouped.c.k)
    elif group_by == "user":
        query = select(grouped, User.id.label("found"), User.full_name.label("name"), User.email)
        query = query.outerjoin(User, User.id == grouped.c.k)
    else:
        query = select(grouped, grouped.c.k.label("found"), null().label("name"), null().label("email"))
    groups: dict[Any, _Group] = {}
    labels: dict[Any, str] = {}
    for r in await execute_core(session, query, {}):  # plain rows: past the ORM's layer
        group = _Group(
            generations=int(r.generations),
            completed=int(r.completed),
            errors=int(r.errors),
            cancelled=int(r.cancelled),
            chars_in=int(r.chars_in),
            chars_out=int(r.chars_out),
            tokens_in=None if r.tokens_in is None else int(r.tokens_in),
            tokens_out=None if r.tokens_out is None else int(r.tokens_out),
            ttfc=summed_digits(r.ttfc),
            duration=summed_digits(r.duration),
        )
        k = None if r.found is None else r.k  # all the deleted agents' (or users') usage: one row
        labels[k] = str(k) if group_by == "day" else "(deleted)" if k is None else (r.name or r.email)
        if k in groups:
            groups[k].add(group)
        else:
            groups[k] = group
    out = [
        UsageRow(
            key=None if k is None else str(k),
            label=labels[k],
            generations=g.generations,
            completed=g.completed,
            errors=g.errors,
            cancelled=g.cancelled,
            chars_in=g.chars_in,
            chars_out=g.chars_out,
            tokens_in=g.tokens_in,
            tokens_out=g.tokens_out,
            ttfc_ms_p50=_rounded(median(g.ttfc)),
            duration_ms_p50=_rounded(median(g.duration)),
        )
        for k, g in groups.items()
    ]
    if group_by == "day":
        return sorted(out, key=lambda row: row.key or "")
    return sorted(out, key=lambda row: (-row.generations, row.label))


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


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
    (generations before the quota was set count too), and so does any claim that finds the ledger ahead of the
    counter (the quota was lifted for a while). Returns the day claimed (to `release_generation` a
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
    day_start = datetime.combine(today, time(), UTC)
    # The day's generations so far: those that started today (one begun before midnight and ended after it
    # was claimed yesterday; counting it again refused a first send of the day at a tight quota).
    so_far = (
        select(func.count().label("n"))
        .select_from(UsageRecord)
        .where(
            UsageRecord.user_id == user.id,
            UsageRecord.created_at >= day_start,
            statements_of(session).started_since(UsageRecord.created_at, UsageRecord.duration_ms, day_start),
        )
        .subquery()
    )
    # No row at all when the ledger alone reaches the quota: the send is refused, and must not be counted (the
    # day's first claim stored the ledger's count plus one, a generation short once the quota was raised).
    claim = select(
        literal(user.id, UsageDaily.user_id.type), literal(today, UsageDaily.day.type), so_far.c.n + 1
    ).where(so_far.c.n < limit)
    dialect = session.get_bind().dialect.name
    upsert = (postgresql.insert if dialect == "postgresql" else sqlite.insert)(UsageDaily)
    statements = statements_of(session)
    # The counter, or the ledger's count when that is higher: generations made while the team had no quota
    # raised no counter, so a quota set again the same day must not start from the counter's old value.
    ledger = upsert.excluded.generations - 1
    statement = (
        upsert.from_select(["user_id", "day", "generations"], claim)
        .on_conflict_do_update(
            index_elements=[UsageDaily.user_id, UsageDaily.day],
            set_={"generations": statements.greatest(UsageDaily.generations, ledger) + 1},
            where=statements.greatest(UsageDaily.generations, ledger) < limit,
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


#: Roll-up rows per INSERT of a rebuild (SQLite's, built here).
REBUILD_BATCH = 5_000
#: How long one try of a rebuild waits for the ledger's lock (seconds): the final writes begun meanwhile
#: queue behind that request, so a rebuild that cannot start (a VACUUM, an index build holds the ledger) stops
#: asking after this, lets them through, and asks again after `LEDGER_LOCK_PAUSE`.
LEDGER_LOCK_WAIT = 1.0
LEDGER_LOCK_PAUSE = 1.0
#: A rebuild gives up after trying for this long (seconds).
LEDGER_LOCK_PATIENCE = 300.0
#: SHARE ROW EXCLUSIVE: conflicts with ROW EXCLUSIVE (any INSERT, UPDATE, DELETE) and with itself (two
#: rebuilds take turns), not with ACCESS SHARE (the quota's and the reports' reads).
_LOCK_LEDGER = f'LOCK TABLE "{UsageRecord.__tablename__}" IN SHARE ROW EXCLUSIVE MODE'


async def rebuild_rollups(*, session: AsyncSession) -> int:
    """Empty the roll-up and sum the whole ledger into it again, in one transaction; the roll-up rows written.

    The ledger is the record: this is the repair when the roll-up is in doubt (`python -m app.cli
    rebuild-usage`), safe while the service runs. Before it touches the roll-up it locks the ledger against
    writers (`_lock_the_ledger`): a final write that inserted its ledger row already commits first (its
    roll-up upsert takes no lock this transaction holds yet) and is read here; any later one waits for this
    commit, holding no roll-up row (its ledger INSERT, or its one statement, takes the table lock before any
    row), then adds to the rebuilt roll-up. So every answer is counted once, and nothing deadlocks: the final
    write locks the ledger, then the roll-up; this, the ledger, then the roll-up.

    On PostgreSQL the database sums the ledger (`LEDGER_ROLLUP_SQL`): the final writes wait for it. On SQLite
    (one writer at a time: the DELETE takes the database's write lock, once a writer begun before has
    committed) the ledger is read one team's UTC day of final writes at a time, so a big ledger is never held
    in memory; the rows are dated by their start as the live roll-up dates them (`RollupBuilder`)."""
    statements = statements_of(session)
    if statements.name == "postgresql":
        await _lock_the_ledger(session)
        await session.execute(delete(UsageRollup))
        result = await session.execute(text(LEDGER_ROLLUP_SQL))
        await session.commit()
        return int(getattr(result, "rowcount", 0))
    await session.execute(delete(UsageRollup))
    columns = [c for c in UsageRecord.__table__.columns if c.name != "id"]
    spans = (
        await session.execute(
            select(UsageRecord.team_id, func.min(UsageRecord.created_at), func.max(UsageRecord.created_at)).group_by(
                UsageRecord.team_id
            )
        )
    ).all()
    written = 0
    pending: list[dict[str, Any]] = []
    for team_id, first, last in spans:
        builder = RollupBuilder()
        day = first.astimezone(UTC).date()
        while day <= last.astimezone(UTC).date():
            start = datetime.combine(day, time(), UTC)
            query = select(*columns).where(
                UsageRecord.team_id == team_id,
                UsageRecord.created_at >= start,
                UsageRecord.created_at < start + timedelta(days=1),
            )
            records = [dict(row) for row in (await session.execute(query)).mappings()]
            pending += builder.add(records, written_on=day)
            if len(pending) >= REBUILD_BATCH:
                await session.execute(insert(UsageRollup), pending)
                written += len(pending)
                pending = []
            day += timedelta(days=1)
        pending += builder.rest()
    if pending:
        await session.execute(insert(UsageRollup), pending)
        written += len(pending)
    await session.commit()
    return written


async def _lock_the_ledger(session: AsyncSession) -> None:
    """Begin the rebuild's transaction with the ledger locked against writers (PostgreSQL), waiting for the
    transactions writing it now. A try waits `LEDGER_LOCK_WAIT` at most (the final writes begun meanwhile
    queue behind it), then the transaction is rolled back (nothing was done) and tried again."""
    loop = asyncio.get_running_loop()
    give_up_at = loop.time() + LEDGER_LOCK_PATIENCE
    while True:
        await session.execute(text(f"SET LOCAL lock_timeout = '{round(LEDGER_LOCK_WAIT * 1000)}ms'"))
        try:
            await session.execute(text(_LOCK_LEDGER))
        except DBAPIError as exc:
            if getattr(exc.orig, "sqlstate", None) != LOCK_NOT_AVAILABLE or loop.time() > give_up_at:
                raise
            await session.rollback()
            await asyncio.sleep(LEDGER_LOCK_PAUSE)
            continue
        # The rest of the transaction waits as the role's settings say (no lock of the ledger's writers is in
        # its way now).
        await session.execute(text("SET LOCAL lock_timeout TO DEFAULT"))
        return
