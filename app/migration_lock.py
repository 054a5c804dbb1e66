"""The lock that lets one `migrate` or `init` run at a time on a database (several replicas may each run `init`
before `serve`): the others wait for it, then find the database at the head and already initialised.

PostgreSQL: a session-level advisory lock (`MIGRATION_LOCK_KEY`) on a connection of its own, in autocommit. It
is never inside a transaction: an index built CONCURRENTLY by a migration (app.migrations) waits for every
transaction of the database older than itself, so a lock held in an open transaction, or a waiter blocked
in `pg_advisory_lock` (a statement with a snapshot), would stop the build of the run that holds the lock,
and with it the run. A waiter therefore polls `pg_try_advisory_lock`, each try a statement of a moment. The
lock is the session's: it ends with the connection, also when the process dies (and so the session sets no
`idle_session_timeout`, which would end it midway).

SQLite (one file, on one machine): an exclusive `flock` of a file beside the database, `<file>.migrate-lock`,
which the kernel releases when the process ends; never the database file itself (closing a second descriptor
of it drops SQLite's own POSIX locks). An in-memory database, or one named by a `file:` URI, has no such file:
no lock (it is one process's anyway).
"""

from __future__ import annotations

import asyncio
import fcntl
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

from sqlalchemy import NullPool, make_url, text
from sqlalchemy.ext.asyncio import create_async_engine

#: The advisory lock's key: 64 bits of sha256("n8n-chat-relay: migrate"), signed. Advisory locks are per
#: database, so it only has to differ from the keys of other advisory locks taken on the same database.
MIGRATION_LOCK_KEY = 8909224118198124124
#: Seconds between two tries of a waiting run.
POLL_SECONDS = 0.5
WAITING = (
    "Waiting for another migrate run... (a `migrate` or `init` of this database holds the migration lock; "
    "this one goes on once it has finished)"
)


class LockWaitExceeded(Exception):
    """Another run held the lock for longer than this run's wait limit (`MIGRATION_LOCK_WAIT_SECONDS`)."""


@asynccontextmanager
async def migration_lock(
    url: str, waiting: Callable[[str], None], wait_limit: float | None = None
) -> AsyncIterator[None]:
    """Hold the database's migration lock inside the block; `waiting` is told (`WAITING`) once when another run
    holds it, before this one waits for it: for `wait_limit` seconds at most (None: as long as it takes), then
    `LockWaitExceeded` (so a run stuck behind a hung one fails, and its orchestrator can say so)."""
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend == "postgresql":
        async with _advisory_lock(url, waiting, wait_limit):
            yield
    elif backend == "sqlite" and parsed.database not in (None, "", ":memory:") and not parsed.query.get("uri"):
        async with _file_lock(Path(parsed.database), waiting, wait_limit):
            yield
    else:
        yield


@asynccontextmanager
async def _advisory_lock(url: str, waiting: Callable[[str], None], wait_limit: float | None) -> AsyncIterator[None]:
    # NullPool: closing the connection really closes it, which ends the session and releases its lock.
    engine = create_async_engine(url, poolclass=NullPool, isolation_level="AUTOCOMMIT")
    try:
        async with engine.connect() as connection:
            if await connection.scalar(text("SELECT current_setting('server_version_num')::int")) >= 140000:
                # Idle all through the run: an `idle_session_timeout` of the role or database would end the
                # session, and the lock with it, midway.
                await connection.execute(text("SET idle_session_timeout = 0"))
            statement = text("SELECT pg_try_advisory_lock(:key)").bindparams(key=MIGRATION_LOCK_KEY)
            if not await connection.scalar(statement):
                waiting(WAITING)
                deadline = _deadline(wait_limit)
                while True:  # polled: a statement blocked in pg_advisory_lock would stop the holder (see above)
                    await _pause(deadline)
                    if await connection.scalar(statement):
                        break
            yield
    finally:
        await engine.dispose()


@asynccontextmanager
async def _file_lock(database: Path, waiting: Callable[[str], None], wait_limit: float | None) -> AsyncIterator[None]:
    path = database.with_name(database.name + ".migrate-lock")
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        if not _try_flock(descriptor):
            waiting(WAITING)
            deadline = _deadline(wait_limit)
            while True:  # polled, so the event loop is never blocked (a Ctrl-C stops the wait)
                await _pause(deadline)
                if _try_flock(descriptor):
                    break
        yield
    finally:
        os.close(descriptor)  # releases the lock (the file stays, empty: deleting it could let two runs in)


def _deadline(wait_limit: float | None) -> float | None:
    return None if wait_limit is None else asyncio.get_running_loop().time() + wait_limit


async def _pause(deadline: float | None) -> None:
    """Sleep until the next try; `LockWaitExceeded` once the deadline has passed (a last try falls on it)."""
    if deadline is None:
        await asyncio.sleep(POLL_SECONDS)
        return
    left = deadline - asyncio.get_running_loop().time()
    if left <= 0:
        raise LockWaitExceeded
    await asyncio.sleep(min(POLL_SECONDS, left))


def _try_flock(descriptor: int) -> bool:
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True
