"""What differs between PostgreSQL and SQLite: the column types, and one set of statements per dialect.

The set is chosen once, where the `Database` is created, and rides on every session it makes
(`statements_of(session)`); services never look at a dialect name.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import (
    JSON,
    ColumnElement,
    DateTime,
    Executable,
    Numeric,
    Text,
    TextClause,
    Uuid,
    bindparam,
    cast,
    func,
    text,
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


def add_sqlite_histograms(current: str | None, more: str | None) -> str | None:
    """SQLite's `usage_histogram_add(a, b)` (registered on each connection by app.db): a + b, in decimal text."""
    if current is None or more is None:
        return current if more is None else more
    return str(int(current) + int(more))


def _typed(statement: str) -> TextClause:
    """A text() statement built once, with the types of the parameters it uses (`:now`, `:id`, `:aid`...)."""
    types: dict[str, TypeEngine[Any]] = {
        "now": UTCDateTime(),
        "created_at": UTCDateTime(),
        "id": Uuid(),
        "uid": Uuid(),
        "aid": Uuid(),
        "cid": Uuid(),
    }
    used = set(re.findall(r":(\w+)", statement))
    return text(statement).bindparams(*(bindparam(name, type_=type_) for name, type_ in types.items() if name in used))


class Statements(ABC):
    """The statements whose SQL differs per dialect; each is built once (not one `text()` per write).

    - `finish`: the final write of an assistant message (`:aid`) and the activity stamp of its chat (`:cid`),
      one statement on PostgreSQL (a data-modifying CTE), two in one transaction on SQLite, which has none;
    - `children_join`: a join from parents `p` to their children `s`, forced to be index lookups;
    - `insert_ignoring_conflict`: an INSERT that keeps the existing row on a unique conflict;
    - `insert_locking_existing`: an INSERT that, on a unique conflict, rewrites one column of the existing row
      to itself: the row is then locked until commit (a concurrent DELETE waits, then fails on a reference).
    - `upsert`: an INSERT whose conflicting rows are updated instead (`set_of(excluded)` says how);
    - `add_histograms` / `sum_histograms`: histograms (`Histogram`) added in an UPDATE and summed in a GROUP BY
      (the sum as decimal text, or comma-separated decimal terms to add: `histogram_total` reads either).
    """

    name: str
    _finish_sql: tuple[str, ...]
    #: `children_of(p)`: the rows `s` (id, parent_id, created_at) whose parent is `p.parent_id`, one index
    #: lookup per parent (a plain join lets PostgreSQL's planner pick a hash join over the whole table when
    #: its estimates are off).
    children_join: str

    def __init__(self) -> None:
        self.finish = tuple(_typed(sql) for sql in self._finish_sql)

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
    ) -> Executable:
        """INSERT ... ON CONFLICT (index_elements) DO UPDATE SET set_of(excluded), for several rows at once."""
        statement = self._insert(table).values(list(rows))
        return statement.on_conflict_do_update(index_elements=index_elements, set_=set_of(statement.excluded))

    @abstractmethod
    def add_histograms(self, current: Any, more: Any) -> ColumnElement[Any]:
        """The SQL sum of two `Histogram` values."""

    @abstractmethod
    def sum_histograms(self, column: Any) -> ColumnElement[str]:
        """A GROUP BY aggregate of a `Histogram` column, as text that `histogram_total` reads."""


_FINISH_MESSAGE = (
    "UPDATE messages SET content = :content, status = :status, error = {json_error}, metadata = {json_metadata}, "
    "created_at = :created_at, updated_at = :now WHERE id = :aid"
)
_TOUCH_CHAT = "UPDATE chats SET last_message_at = :now, updated_at = :now"


class PostgresStatements(Statements):
    name = "postgresql"
    _finish_sql = (
        "WITH m AS ("
        + _FINISH_MESSAGE.format(json_error="CAST(:error AS jsonb)", json_metadata="CAST(:metadata AS jsonb)")
        + " RETURNING chat_id) "
        + _TOUCH_CHAT
        + " FROM m WHERE chats.id = m.chat_id",
    )
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


class SqliteStatements(Statements):
    name = "sqlite"
    _finish_sql = (
        _FINISH_MESSAGE.format(json_error=":error", json_metadata=":metadata"),
        _TOUCH_CHAT + " WHERE id = :cid",
    )
    #: SQLite has no LATERAL and no hash join: its nested loop uses the parent index anyway.
    children_join = "JOIN messages s ON s.parent_id = p.parent_id"

    def _insert(self, table: type[Any]) -> SqliteInsert:
        return sqlite_insert(table)

    def add_histograms(self, current: Any, more: Any) -> ColumnElement[Any]:
        return func.usage_histogram_add(current, more, type_=Histogram())

    def sum_histograms(self, column: Any) -> ColumnElement[str]:
        # No big integers in SQLite: the terms, joined, are added in Python (`histogram_total`).
        return func.group_concat(column, ",", type_=Text())


_BY_DIALECT: dict[str, Statements] = {s.name: s for s in (PostgresStatements(), SqliteStatements())}
_KEY = "statements"


def statements_for(dialect_name: str) -> Statements:
    """The statement set of an engine's dialect (called once, by `Database`)."""
    return _BY_DIALECT[dialect_name]


def session_info(statements: Statements) -> dict[str, Any]:
    """What `Database` puts in the `info` of every session it makes."""
    return {_KEY: statements}


def statements_of(session: AsyncSession) -> Statements:
    """The statement set of the `Database` that made this session."""
    statements: Statements = session.info[_KEY]
    return statements
