"""Database engine and sessions (the dialect's statement set is chosen here, once: app/dialects.py)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import asyncpg
from sqlalchemy import ClauseElement, Connection, Executable, Result, event
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects.postgresql.asyncpg import dialect as asyncpg_dialect
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.pool import NullPool
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.util import greenlet_spawn

from app.config import Settings, narrow_to_owner, private_dir, private_file
from app.dialects import add_sqlite_histograms, session_info, statements_for, unicode_lower


async def execute_core(
    session: AsyncSession, statement: Executable, params: dict[str, Any] | list[dict[str, Any]]
) -> Result[Any]:
    """A Core statement on the session's connection, past the ORM's execution layer.

    For the per-stream statements of the general send path, checkpoints and SQLite's final write: the ORM
    layer adds ~300 µs of CPU per statement and these return plain rows anyway (docs/PERFORMANCE.md). The
    two on every PostgreSQL stream's path go further (`Direct`).
    """
    connection = await session.connection()
    return await connection.execute(statement, params)


class Direct:
    """A PostgreSQL statement compiled once (here, for asyncpg), run by `execute_direct` on asyncpg itself.

    For the two statements on every stream's path, the one-statement start and the final write: through
    SQLAlchemy's execution layer each cost ~0.4-0.9 ms of CPU on the test machine (parameter processing,
    result wrapping, greenlet hops), several times asyncpg's own (docs/PERFORMANCE.md). The statement stays a
    SQLAlchemy construct, so its SQL and its parameters' types are SQLAlchemy's; asyncpg prepares it once per
    connection (its statement cache). `Database.fetch_direct` runs one.
    """

    __slots__ = ("fixed", "names", "processors", "sql")

    def __init__(self, statement: ClauseElement) -> None:
        compiled = cast(SQLCompiler, statement.compile(dialect=_ASYNCPG))
        self.sql = compiled.string
        #: The parameters in `$n` order (a name used twice is one `$n`).
        self.names: tuple[str, ...] = tuple(compiled.positiontup or ())
        # The types' own conversions (JSON to text, a Histogram to Decimal, ...), as SQLAlchemy would apply them.
        bind_processors: dict[str, Any] = getattr(compiled, "_bind_processors")  # noqa: B009 - the compiled form's converters
        self.processors = tuple(bind_processors.get(name) for name in self.names)
        #: The statement's own values (literals it was built with), for the parameters a call does not give.
        self.fixed = {name: bind.effective_value for name, bind in compiled.binds.items() if not bind.required}

    def arguments(self, params: dict[str, Any]) -> list[Any]:
        """The positional arguments, converted by their types as SQLAlchemy converts them (None included)."""
        fixed = self.fixed
        return [
            value if process is None else process(value)
            for process, value in (
                (p, params[n] if n in params else fixed[n]) for p, n in zip(self.processors, self.names, strict=True)
            )
        ]


_ASYNCPG = asyncpg_dialect()  # type: ignore[no-untyped-call]


class ConnectionLost(ConnectionError):
    """The database connection died under a statement run by `Database.fetch_direct`: a retryable 503 for a
    request (a `ConnectionError`, app.error_handlers). Whether the statement committed is unknown."""


def _connection_lost(exc: BaseException) -> bool:
    """Whether the connection may be unusable after `exc` (never handed out again then). A server error of
    a statement (a constraint, a bad value; asyncpg's own refusal of a value too) leaves an autocommit
    connection as good as before."""
    if isinstance(exc, asyncpg.PostgresError):
        return isinstance(exc, asyncpg.PostgresConnectionError | asyncpg.OperatorInterventionError)
    if isinstance(exc, asyncpg.DataError):
        return False  # a value asyncpg could not encode: refused before anything was sent
    return True  # a lost socket, a protocol error, a cancel in the middle of the exchange


def _replace_if_closed(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
    """A pooled connection asyncpg already knows is closed (it read the server's goodbye while the connection sat
    in the pool: a restart, an idle timeout) is replaced at checkout, before any statement fails on it. A local
    check, no round trip; SQLAlchemy reconnects that one connection (pre-ping would cost a round trip each)."""
    if dbapi_connection.driver_connection.is_closed():
        raise sa_exc.DisconnectionError("the pooled connection was closed")


def _refused_before_sending(exc: BaseException) -> bool:
    """asyncpg would not start the exchange (its protocol was still reading the server's goodbye, for one): the
    statement never left. Raised when an operation starts (`_set_state`), before anything is written."""
    return isinstance(exc, asyncpg.InternalClientError) and str(exc).startswith("cannot switch to state")


def utcnow() -> datetime:
    return datetime.now(UTC)


#: SQLite's companions of the database file; it creates them with the database file's mode.
SQLITE_SIDECARS = ("-wal", "-shm", "-journal")


def secure_sqlite_file(url: str) -> None:
    """The SQLite file holds password hashes: its directory 0700 when we create it, the file and its
    companions 0600. Created before SQLite opens it (SQLite would make it 0644), so -wal/-shm/-journal
    inherit 0600 too. No-op for other databases and for in-memory SQLite.
    """
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:") or parsed.query.get("uri"):
        return  # not a file we can name (another database, in memory, or a `file:` URI)
    path = Path(parsed.database)
    private_dir(path.parent)
    private_file(path)
    for suffix in SQLITE_SIDECARS:
        sidecar = path.with_name(path.name + suffix)
        if sidecar.exists():
            narrow_to_owner(sidecar)


def _sqlite_lock_for_update(conn: Connection, statement: Any, *_args: Any) -> None:
    """SQLite ignores FOR UPDATE and FOR SHARE, and its driver opens a transaction only at the first write: two
    requests could both read a row "locked" and both act on what they read (two admins demoting each other
    left a team without one). A locking read there starts the transaction with BEGIN IMMEDIATE instead: the
    database's one write lock, held until commit or rollback, so the second request waits for the first and
    reads what it wrote, as it would behind PostgreSQL's row lock. Inside a transaction that already wrote,
    the lock is held already."""
    if getattr(statement, "_for_update_arg", None) is None:
        return
    driver: Any = conn.connection.driver_connection  # aiosqlite's Connection
    if not driver.in_transaction:
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def make_engine(settings: Settings) -> AsyncEngine:
    url = settings.DATABASE_URL
    # No pre-ping by default: it is a round trip on every checkout (two per stream). SQLAlchemy already
    # invalidates the whole pool when a statement fails on a dead connection (see DB_POOL_PRE_PING).
    # hide_parameters: SQLAlchemy's error text would carry every bound value (tokens, secret headers, message
    # text) into the logged traceback of a failing statement.
    kwargs: dict[str, Any] = {"pool_pre_ping": settings.DB_POOL_PRE_PING, "hide_parameters": True}
    if settings.is_sqlite:
        secure_sqlite_file(url)
        kwargs["connect_args"] = {"timeout": 30}
    else:
        kwargs.update(
            pool_size=settings.DB_POOL_SIZE,
            max_overflow=settings.DB_MAX_OVERFLOW,
            pool_timeout=30,
            # The connection returned last goes out first: at low concurrency the statements keep to the few
            # connections that have already prepared them and reached PostgreSQL's generic plan. On a new
            # connection the send's start statement is prepared once (~10 ms) and planned anew on each of its
            # first five runs (~1.2 ms instead of ~0.4): first-in-first-out over 10 connections spread that
            # over a quiet service's first ~60 sends after start-up, a restart or a recycle (docs/PERFORMANCE.md).
            pool_use_lifo=True,
            pool_recycle=settings.DB_POOL_RECYCLE_SECONDS or -1,
            connect_args={"timeout": settings.DB_CONNECT_TIMEOUT},
        )
    engine = create_async_engine(url, **kwargs)
    if not settings.is_sqlite:
        event.listen(engine.sync_engine, "checkout", _replace_if_closed)
    if settings.is_sqlite:

        @event.listens_for(engine.sync_engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cursor = dbapi_conn.cursor()
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()
            # The usage roll-up's histograms are integers larger than SQLite's 64 bits (app.dialects.Histogram).
            dbapi_conn.create_function("usage_histogram_add", 2, add_sqlite_histograms, deterministic=True)
            # Chat search ignores case beyond ASCII (app.dialects.SqliteStatements.matches_ignoring_case).
            dbapi_conn.create_function("unicode_lower", 1, unicode_lower, deterministic=True)

        event.listen(engine.sync_engine, "before_execute", _sqlite_lock_for_update)

    return engine


class Database:
    """The engine, session factories and statement set of one application instance (held by `AppState`)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.engine = make_engine(settings)
        self._probe_engine: AsyncEngine | None = None
        #: The readiness checks of a busy instance take turns on one connection of their own (`probe`).
        self._probe_turn = asyncio.Lock()
        #: The most connections the pool may hold at once (`fetch_direct` tries each at most once).
        self.max_connections = settings.DB_POOL_SIZE + settings.DB_MAX_OVERFLOW
        #: Chosen once for the engine's dialect; every session made here carries it (`statements_of`).
        self.statements = statements_for(self.engine.dialect.name)
        info = session_info(self.statements)
        self.sessionmaker = async_sessionmaker(self.engine, expire_on_commit=False, autoflush=False, info=info)
        # Same pool, no BEGIN/COMMIT: for work that is one statement (a checkpoint, the final write of an
        # answer), where a transaction only adds two round trips. PostgreSQL only: on SQLite (one file, a
        # thread per connection) switching the isolation level costs more thread hops than it saves, so
        # there these sessions are ordinary ones.
        self.autocommit = (
            self.sessionmaker
            if settings.is_sqlite
            else async_sessionmaker(
                self.engine.execution_options(isolation_level="AUTOCOMMIT"),
                expire_on_commit=False,
                autoflush=False,
                info=info,
            )
        )

    async def fetch_direct(self, direct: Direct, params: dict[str, Any]) -> list[asyncpg.Record]:
        """`direct` on a pooled connection, through asyncpg itself: one round trip, no BEGIN/COMMIT (no
        transaction is open on it: the statement commits on its own). PostgreSQL only.

        The pool never hands out a connection asyncpg already knows is closed (`_replace_if_closed`). One that
        asyncpg refuses to use before sending anything is dropped and the statement goes to the next: it never
        left. A connection lost while the statement ran raises `ConnectionLost`: the statement may or may not
        have committed, and the caller decides. Then the pool's older connections are dropped too, as
        SQLAlchemy does on a disconnect (a restart kills them all), so a restart costs at most one statement.
        """
        arguments = direct.arguments(params)
        for _ in range(self.max_connections + 1):
            pooled = await self.engine.raw_connection()
            try:
                driver: asyncpg.Connection = pooled.driver_connection
                try:
                    rows: list[asyncpg.Record] = await driver.fetch(direct.sql, *arguments)
                except BaseException as exc:
                    if not _connection_lost(exc):
                        raise
                    error = exc if isinstance(exc, Exception) else None
                    refused = _refused_before_sending(exc)
                    if error is None or isinstance(exc, TimeoutError) or refused:
                        # A cancel or a timeout in the middle of the exchange, or a refusal before it: this
                        # connection only. The refused statement goes to the next connection.
                        await greenlet_spawn(pooled.invalidate, error)
                        if refused:
                            continue
                        raise
                    self.engine.pool._invalidate(pooled, error, _checkin=False)
                    await greenlet_spawn(pooled.invalidate, error)
                    raise ConnectionLost(type(exc).__name__) from exc
                return rows
            finally:
                await greenlet_spawn(pooled.close)
        raise ConnectionLost("no live connection")

    def pool_in_use(self) -> int | None:
        """Connections checked out of the pool now (None for a pool that does not count them)."""
        checkedout = getattr(self.engine.pool, "checkedout", None)
        return int(checkedout()) if callable(checkedout) else None

    @asynccontextmanager
    async def probe(self) -> AsyncIterator[AsyncConnection]:
        """A connection for the readiness check: a pooled one while the pool has one to give, else one of its
        own, opened for the check (PostgreSQL). A busy instance is not a broken one: waiting for a pooled
        connection made the check time out and report the database unreachable when every connection was
        merely in use. One such connection at a time: /ready is public, and a burst of checks opening one each
        would go past the pool's bound, towards the database's own connection limit (shared by every
        instance); they wait their turn, within the check's timeout."""
        in_use = self.pool_in_use()
        if self.settings.is_sqlite or in_use is None or in_use < self.max_connections:
            async with self.engine.connect() as conn:
                yield conn
            return
        if self._probe_engine is None:
            self._probe_engine = create_async_engine(
                self.settings.DATABASE_URL,
                poolclass=NullPool,
                hide_parameters=True,
                connect_args={"timeout": self.settings.DB_CONNECT_TIMEOUT},
            )
        async with self._probe_turn, self._probe_engine.connect() as conn:
            yield conn

    async def dispose(self) -> None:
        await self.engine.dispose()
        if self._probe_engine is not None:
            await self._probe_engine.dispose()
