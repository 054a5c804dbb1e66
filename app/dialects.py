"""What differs between PostgreSQL and SQLite: the column types, and one set of statements per dialect.

The set is chosen once, where the `Database` is created, and rides on every session it makes
(`statements_of(session)`); services never look at a dialect name.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import (
    JSON,
    ColumnElement,
    CompoundSelect,
    DateTime,
    Executable,
    Insert,
    Interval,
    Numeric,
    Select,
    Text,
    cast,
    func,
    literal_column,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.dialects.postgresql import Insert as PgInsert
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import Insert as SqliteInsert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.types import TypeDecorator, TypeEngine

#: JSONB on PostgreSQL, JSON text on SQLite.
JSONType = JSON().with_variant(JSONB(), "postgresql")


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
    """A histogram packed into one non-negative integer (app.services.usage_rollup): NUMERIC on PostgreSQL,
    whose `+` and `sum()` add histograms exactly; decimal text on SQLite, added by `usage_histogram_add`."""

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


def unicode_lower(text: str | None) -> str | None:
    """SQLite's `unicode_lower()`: its built-in lower() leaves every letter outside ASCII as it is."""
    return None if text is None else text.lower()


def add_sqlite_histograms(current: str | None, more: str | None) -> str | None:
    """SQLite's `usage_histogram_add(a, b)` (registered on each connection by app.db): a + b, in decimal text."""
    if current is None or more is None:
        return current if more is None else more
    return str(int(current) + int(more))


class Statements(ABC):
    """The statements whose SQL differs per dialect; each is built once (not one `text()` per write).

    - `chains_writes`: whether one statement can hold several writes (data-modifying CTEs, PostgreSQL): the
      final write of an answer is then one statement in autocommit (app.services.messages); SQLite has none,
      so there it is several statements in one transaction;
    - `children_join`: a join from parents `p` to their children `s`, forced to be index lookups;
    - `insert_ignoring_conflict`: an INSERT that keeps the existing row on a unique conflict;
    - `insert_locking_existing`: an INSERT that, on a unique conflict, sets one column of the existing row to
      the value inserted: the row is then locked until commit (a concurrent DELETE waits, then fails on a
      reference).
    - `upsert`: an INSERT whose conflicting rows are updated instead (`set_of(excluded)` says how);
      `upsert_select` the same for the rows of a query;
    - `add_histograms` / `sum_histograms`: histograms (`Histogram`) added in an UPDATE and summed in a GROUP BY
      (the sum as decimal text, or comma-separated decimal terms to add: `histogram_total` reads either).
    """

    name: str
    chains_writes: bool
    #: `children_of(p)`: the rows `s` (id, parent_id, created_at) whose parent is `p.parent_id`, one index
    #: lookup per parent (a plain join lets PostgreSQL's planner pick a hash join over the whole table when
    #: its estimates are off).
    children_join: str

    @abstractmethod
    def _insert(self, table: type[Any]) -> PgInsert | SqliteInsert:
        """The dialect's own INSERT construct (the one with ON CONFLICT) for an ORM class's table."""

    def insert_ignoring_conflict(self, table: type[Any], index_elements: list[str], **values: Any) -> Executable:
        """INSERT ... ON CONFLICT DO NOTHING."""
        return self._insert(table).values(**values).on_conflict_do_nothing(index_elements=index_elements)

    def insert_locking_existing(self, table: type[Any], key: str, column: str, **values: Any) -> Executable:
        """INSERT ... ON CONFLICT (key) DO UPDATE SET column = excluded.column."""
        statement = self._insert(table).values(**values)
        return statement.on_conflict_do_update(index_elements=[key], set_={column: statement.excluded[column]})

    def upsert(
        self,
        table: type[Any],
        rows: Sequence[dict[str, Any]],
        index_elements: list[str],
        set_of: Callable[[Any], dict[str, Any]],
    ) -> Insert:
        """INSERT ... ON CONFLICT (index_elements) DO UPDATE SET set_of(excluded), for several rows at once."""
        statement = self._insert(table).values(list(rows))
        return statement.on_conflict_do_update(index_elements=index_elements, set_=set_of(statement.excluded))

    def upsert_select(
        self,
        table: type[Any],
        columns: list[str],
        rows: Select[Any] | CompoundSelect[Any],
        index_elements: list[str],
        set_of: Callable[[Any], dict[str, Any]],
    ) -> Insert:
        """INSERT ... SELECT ... ON CONFLICT (index_elements) DO UPDATE SET set_of(excluded): `upsert` of the
        rows a query gives, in its order. For prebuilt statements, which select their parameters: SQLAlchemy
        caches no multi-row VALUES (it would compile `upsert` again on every call)."""
        statement = self._insert(table).from_select(columns, rows)
        return statement.on_conflict_do_update(index_elements=index_elements, set_=set_of(statement.excluded))

    @abstractmethod
    def add_histograms(self, current: Any, more: Any) -> ColumnElement[Any]:
        """The SQL sum of two `Histogram` values."""

    @abstractmethod
    def sum_histograms(self, column: Any) -> ColumnElement[str]:
        """A GROUP BY aggregate of a `Histogram` column, as text that `histogram_total` reads."""

    @abstractmethod
    def started_since(self, ended_at: Any, duration_ms: Any, moment: Any) -> ColumnElement[bool]:
        """Whether what ended at `ended_at` after `duration_ms` milliseconds started at or after `moment`."""

    @abstractmethod
    def greatest(self, a: Any, b: Any) -> ColumnElement[Any]:
        """The larger of two values."""

    @abstractmethod
    def matches_ignoring_case(self, text: Any, pattern: Any) -> ColumnElement[bool]:
        """`text` LIKE `pattern` (escape character `\\`), case ignored for every letter, not ASCII's alone."""


class PostgresStatements(Statements):
    name = "postgresql"
    chains_writes = True
    #: `OFFSET 0` keeps the planner from flattening the subquery back into a (hash) join.
    children_join = (
        "CROSS JOIN LATERAL (SELECT c.id, c.parent_id, c.created_at FROM messages c"
        " WHERE c.parent_id = p.parent_id OFFSET 0) s"
    )

    def _insert(self, table: type[Any]) -> PgInsert:
        return pg_insert(table)

    def add_histograms(self, current: Any, more: Any) -> ColumnElement[Any]:
        return current + more  # type: ignore[no-any-return]

    def sum_histograms(self, column: Any) -> ColumnElement[str]:
        return cast(func.sum(column), Text)

    def greatest(self, a: Any, b: Any) -> ColumnElement[Any]:
        return func.greatest(a, b)

    def matches_ignoring_case(self, text: Any, pattern: Any) -> ColumnElement[bool]:
        return text.ilike(pattern, escape="\\")  # type: ignore[no-any-return]

    def started_since(self, ended_at: Any, duration_ms: Any, moment: Any) -> ColumnElement[bool]:
        return ended_at - duration_ms * literal_column("interval '1 millisecond'", Interval()) >= moment  # type: ignore[no-any-return]


class SqliteStatements(Statements):
    name = "sqlite"
    chains_writes = False
    #: SQLite has no LATERAL and no hash join: its nested loop uses the parent index anyway.
    children_join = "JOIN messages s ON s.parent_id = p.parent_id"

    def _insert(self, table: type[Any]) -> SqliteInsert:
        return sqlite_insert(table)

    def add_histograms(self, current: Any, more: Any) -> ColumnElement[Any]:
        return func.usage_histogram_add(current, more, type_=Histogram())

    def sum_histograms(self, column: Any) -> ColumnElement[str]:
        # No big integers in SQLite: the terms, joined, are added in Python (`histogram_total`).
        return func.group_concat(column, ",", type_=Text())

    def greatest(self, a: Any, b: Any) -> ColumnElement[Any]:
        return func.max(a, b)  # SQLite's scalar max() of two arguments

    def matches_ignoring_case(self, text: Any, pattern: Any) -> ColumnElement[bool]:
        # SQLite's own lower() and LIKE fold ASCII letters only: both sides are lowered by Python's str.lower
        # (`unicode_lower`, registered on each connection), as PostgreSQL's ILIKE does under a UTF-8 locale.
        return func.unicode_lower(text).like(func.unicode_lower(pattern), escape="\\")

    def started_since(self, ended_at: Any, duration_ms: Any, moment: Any) -> ColumnElement[bool]:
        # Times are stored as UTC text; julianday() reads them as days.
        return func.julianday(ended_at) - duration_ms / 86_400_000.0 >= func.julianday(moment)  # type: ignore[no-any-return]


_BY_DIALECT: dict[str, Statements] = {s.name: s for s in (PostgresStatements(), SqliteStatements())}
_KEY = "statements"


def statements_for(dialect_name: str) -> Statements:
    """The statement set of an engine's dialect (called once, by `Database`)."""
    return _BY_DIALECT[dialect_name]


def all_statements() -> tuple[Statements, ...]:
    """Every dialect's statement set (for statements prebuilt once per set, at import)."""
    return tuple(_BY_DIALECT.values())


def session_info(statements: Statements) -> dict[str, Any]:
    """What `Database` puts in the `info` of every session it makes."""
    return {_KEY: statements}


def statements_of(session: AsyncSession) -> Statements:
    """The statement set of the `Database` that made this session."""
    statements: Statements = session.info[_KEY]
    return statements
