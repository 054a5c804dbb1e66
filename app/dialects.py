"""What differs between PostgreSQL and SQLite: the column types, and one set of statements per dialect.

The set is chosen once, where the `Database` is created, and rides on every session it makes
(`statements_of(session)`); services never look at a dialect name.
"""

from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, DateTime, Executable, TextClause, Uuid, bindparam, text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.types import TypeDecorator, TypeEngine

#: JSONB on PostgreSQL (indexable, `||` appends), JSON text on SQLite.
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


def _typed(statement: str) -> TextClause:
    """A text() statement built once, with the types of the parameters it uses (`:now`, `:id`, `:uid`)."""
    types: dict[str, TypeEngine[Any]] = {"now": UTCDateTime(), "id": Uuid(), "uid": Uuid()}
    used = set(re.findall(r":(\w+)", statement))
    return text(statement).bindparams(*(bindparam(name, type_=type_) for name, type_ in types.items() if name in used))


_TOUCH = ", updated_at = :now, last_message_at = :now"


class Statements(ABC):
    """The statements whose SQL differs per dialect; each variant is built once (not one `text()` per write).

    - `append`: [user message, assistant placeholder] appended to a chat unless a generation is running;
    - `patch`: `:patch` merged into element `:idx`, guarded by its id (and, optionally, its status);
    - `streaming_chats`: the chats holding a `streaming` message (start-up recovery);
    - `message_text_matches`: some message's `content` contains `:pattern` (chat search);
    - `insert_ignoring_conflict`: an INSERT that keeps the existing row on a unique conflict.
    """

    name: str
    _append_sql: str
    _patch_sql: str
    _streaming_guard: str
    streaming_chats: TextClause
    message_text_matches: TextClause

    def __init__(self) -> None:
        self._append = _typed(self._append_sql)
        self._patches = {
            (only_streaming, touch): _typed(
                self._patch_sql.format(
                    touch=_TOUCH if touch else "", streaming=self._streaming_guard if only_streaming else ""
                )
            )
            for only_streaming in (False, True)
            for touch in (False, True)
        }

    @abstractmethod
    def append(self, user_message: dict[str, Any], placeholder: dict[str, Any]) -> tuple[TextClause, dict[str, Any]]:
        """The append statement and its dialect's own parameters (the caller adds :now, :title, :id, :uid)."""

    @abstractmethod
    def patch(self, *, index: int, only_streaming: bool, touch: bool) -> tuple[TextClause, dict[str, Any]]:
        """The element patch and its index parameters (the caller adds :id, :mid, :patch, :now)."""

    @abstractmethod
    def insert_ignoring_conflict(self, table: type[Any], index_elements: list[str], **values: Any) -> Executable:
        """INSERT ... ON CONFLICT DO NOTHING into an ORM class's table, in the dialect's own construct."""


class PostgresStatements(Statements):
    name = "postgresql"
    _append_sql = (
        "UPDATE chats SET messages = messages || CAST(:new AS jsonb), message_count = message_count + 2, "
        "last_message_at = :now, updated_at = :now, title = COALESCE(title, :title) "
        'WHERE id = :id AND user_id = :uid AND NOT (messages @> CAST(\'[{"status": "streaming"}]\' AS jsonb)) '
        "RETURNING jsonb_array_length(messages)"
    )
    _patch_sql = (
        "UPDATE chats SET messages = jsonb_set(messages, ARRAY[CAST(:idx_s AS text)], "
        "(messages -> CAST(:idx AS integer)) || CAST(:patch AS jsonb)){touch} "
        "WHERE id = :id AND messages -> CAST(:idx AS integer) ->> 'id' = :mid{streaming}"
    )
    _streaming_guard = " AND messages -> CAST(:idx AS integer) ->> 'status' = 'streaming'"
    streaming_chats = text('chats.messages @> CAST(\'[{"status": "streaming"}]\' AS jsonb)')
    #: Only the text of each message is searched, never the JSON around it (keys, quotes, commas). A cheap
    #: prefilter comes first: `:body_pattern` (the needle JSON-escaped) against the JSON text of the array of
    #: contents, an expression a pg_trgm GIN index can serve (docs/PERFORMANCE.md); every content holding
    #: the needle passes it. The exact per-message check then runs on those rows only.
    message_text_matches = text(
        "(jsonb_path_query_array(chats.messages, '$[*].content')::text ILIKE :body_pattern ESCAPE '\\' "
        "AND EXISTS (SELECT 1 FROM jsonb_array_elements(chats.messages) AS m(value) "
        "WHERE m.value ->> 'content' ILIKE :pattern ESCAPE '\\'))"
    )

    def append(self, user_message: dict[str, Any], placeholder: dict[str, Any]) -> tuple[TextClause, dict[str, Any]]:
        return self._append, {"new": json.dumps([user_message, placeholder])}

    def patch(self, *, index: int, only_streaming: bool, touch: bool) -> tuple[TextClause, dict[str, Any]]:
        return self._patches[only_streaming, touch], {"idx": index, "idx_s": str(index)}

    def insert_ignoring_conflict(self, table: type[Any], index_elements: list[str], **values: Any) -> Executable:
        return pg_insert(table).values(**values).on_conflict_do_nothing(index_elements=index_elements)


class SqliteStatements(Statements):
    name = "sqlite"
    _append_sql = (
        "UPDATE chats SET messages = json_insert(json_insert(messages, '$[#]', json(:m1)), '$[#]', json(:m2)), "
        "message_count = message_count + 2, last_message_at = :now, updated_at = :now, "
        "title = COALESCE(title, :title) "
        "WHERE id = :id AND user_id = :uid AND NOT EXISTS "
        "(SELECT 1 FROM json_each(chats.messages) WHERE json_extract(value, '$.status') = 'streaming') "
        "RETURNING json_array_length(messages)"
    )
    _patch_sql = (
        "UPDATE chats SET messages = json_set(messages, '$[' || :idx || ']', "
        "json_patch(json_extract(messages, '$[' || :idx || ']'), json(:patch))){touch} "
        "WHERE id = :id AND json_extract(messages, '$[' || :idx || '].id') = :mid{streaming}"
    )
    _streaming_guard = " AND json_extract(messages, '$[' || :idx || '].status') = 'streaming'"
    streaming_chats = text(
        "EXISTS (SELECT 1 FROM json_each(chats.messages) WHERE json_extract(value, '$.status') = 'streaming')"
    )
    #: SQLite's LIKE is case-insensitive for ASCII letters only.
    message_text_matches = text(
        "EXISTS (SELECT 1 FROM json_each(chats.messages) AS m "
        "WHERE json_extract(m.value, '$.content') LIKE :pattern ESCAPE '\\')"
    )

    def append(self, user_message: dict[str, Any], placeholder: dict[str, Any]) -> tuple[TextClause, dict[str, Any]]:
        return self._append, {"m1": json.dumps(user_message), "m2": json.dumps(placeholder)}

    def patch(self, *, index: int, only_streaming: bool, touch: bool) -> tuple[TextClause, dict[str, Any]]:
        return self._patches[only_streaming, touch], {"idx": index}

    def insert_ignoring_conflict(self, table: type[Any], index_elements: list[str], **values: Any) -> Executable:
        return sqlite_insert(table).values(**values).on_conflict_do_nothing(index_elements=index_elements)


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
