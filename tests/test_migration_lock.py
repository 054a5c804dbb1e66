"""`migrate` and `init` started at once (replicas each running `init` before `serve`) take turns on the database's
migration lock (app.migration_lock): real processes, on PostgreSQL and on SQLite."""

from __future__ import annotations

import asyncio
import fcntl
import os
import subprocess
import sys
from pathlib import Path

import asyncpg
import pytest

from app.migration_lock import MIGRATION_LOCK_KEY, WAITING
from app.services.health import migration_head
from tests.conftest import ROOT, _admin_execute, _plain_url, fresh_postgres

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


def _env(tmp_path: Path, url: str, bcrypt_rounds: int = 4) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in {"DATABASE_URL", "JWT_SECRET", "FIRST_ADMIN_PASSWORD"}}
    env.update({"DATA_DIR": str(tmp_path / "data"), "BCRYPT_ROUNDS": str(bcrypt_rounds), "DATABASE_URL": url})
    return env


def _at_once(tmp_path: Path, url: str, command: str, count: int, bcrypt_rounds: int = 4) -> list[tuple[int, str]]:
    """Start `count` runs of `python -m app.cli <command>` together: each one's exit status and output.
    `bcrypt_rounds`: 13 or more makes the first admin's password hash take a second or more."""
    runs = [
        subprocess.Popen(
            [sys.executable, "-m", "app.cli", command],
            cwd=ROOT,
            env=_env(tmp_path, url, bcrypt_rounds),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(count)
    ]
    results = []
    try:
        for run in runs:
            output, _ = run.communicate(timeout=150)
            results.append((run.returncode, output))
    finally:
        for run in runs:
            run.kill()  # none left behind by a failure (a no-op for those that ended)
            run.wait()
    return results


async def _pg_state(url: str) -> tuple[str | None, int, int]:
    """(the database's revision, teams, users)."""
    conn = await asyncpg.connect(_plain_url(url))
    try:
        revision = await conn.fetchval("SELECT version_num FROM alembic_version")
        return (
            revision,
            await conn.fetchval("SELECT count(*) FROM teams"),
            await conn.fetchval("SELECT count(*) FROM users"),
        )
    finally:
        await conn.close()


def _check_one_initialised(results: list[tuple[int, str]]) -> None:
    for status, output in results:
        assert status == 0, output
        assert "Traceback" not in output, output
    outputs = [output for _, output in results]
    assert sum("First team and admin created" in output for output in outputs) == 1, outputs
    assert sum("Database already has data" in output for output in outputs) == len(results) - 1, outputs


def test_inits_started_at_once_on_postgresql_migrate_and_create_one_admin(tmp_path: Path) -> None:
    """Without the lock, the runs applied the same migrations at once: all but one failed (a duplicate
    `pg_type` key, exit 1), and runs that both found the database empty made two first teams. The first admin
    is created under the lock too: its password's hash takes a second here, and a run that released the lock
    after migrating let the next one find the database still empty (two first teams)."""
    with fresh_postgres() as url:
        results = _at_once(tmp_path, url, "init", 3, bcrypt_rounds=13)
        _check_one_initialised(results)
        assert asyncio.run(_pg_state(url)) == (migration_head(), 1, 1)


def test_inits_started_at_once_on_sqlite_migrate_and_create_one_admin(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'data' / 'app.db'}"
    results = _at_once(tmp_path, url, "init", 3)
    _check_one_initialised(results)
    assert (tmp_path / "data" / "app.db.migrate-lock").stat().st_mode & 0o777 == 0o600


async def _migrate_waits_for(tmp_path: Path, url: str) -> asyncio.subprocess.Process:
    """Start `migrate` while the caller holds the lock: it says it waits, and still waits a second later. The
    process, still running."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "app.cli",
        "migrate",
        cwd=ROOT,
        env=_env(tmp_path, url),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    assert process.stdout is not None
    try:
        async with asyncio.timeout(60):
            first = (await process.stdout.readline()).decode().strip()
        assert first == WAITING
        await asyncio.sleep(1)
        assert process.returncode is None  # still waiting
    except BaseException:
        await _stop(process)
        raise
    return process


async def _stop(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        process.kill()
        await process.wait()


async def _finish(process: asyncio.subprocess.Process) -> None:
    assert process.stdout is not None
    try:
        async with asyncio.timeout(120):
            rest = (await process.stdout.read()).decode()
            assert await process.wait() == 0, rest
        assert WAITING not in rest  # said once, not at every try
    finally:
        await _stop(process)


async def _migrate_behind_a_held_advisory_lock(tmp_path: Path, url: str) -> None:
    holder = await asyncpg.connect(_plain_url(url))
    try:
        await holder.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
        process = await _migrate_waits_for(tmp_path, url)
        tables = "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"
        assert await holder.fetchval(tables) == 0  # nothing migrated while it waits
        await holder.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)
        await _finish(process)
    finally:
        await holder.close()
    revision, teams, _ = await _pg_state(url)
    assert (revision, teams) == (migration_head(), 0)


def test_migrate_waits_while_another_run_holds_the_lock_on_postgresql(tmp_path: Path) -> None:
    """The lock held here as a `migrate` run holds it (session-level, outside a transaction)."""
    with fresh_postgres() as url:
        asyncio.run(_migrate_behind_a_held_advisory_lock(tmp_path, url))


async def test_migrate_waits_while_another_run_holds_the_lock_on_sqlite(tmp_path: Path) -> None:
    database = tmp_path / "data" / "app.db"
    database.parent.mkdir()
    lock = os.open(database.with_name("app.db.migrate-lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        process = await _migrate_waits_for(tmp_path, f"sqlite+aiosqlite:///{database}")
        assert not database.exists() or database.stat().st_size == 0  # nothing migrated while it waits
        fcntl.flock(lock, fcntl.LOCK_UN)
        await _finish(process)
    finally:
        os.close(lock)
    assert database.stat().st_size > 0


def test_the_lock_outlives_an_idle_session_timeout_on_postgresql(tmp_path: Path) -> None:
    """The lock's connection is idle through the whole run: the database's `idle_session_timeout` (1 s here)
    ended its session, and with it the lock, while the run that held it was still migrating. The run here holds
    the lock for well over a second (the first admin's password hash takes that long alone): with a fast run,
    the lock was never idle long enough to be lost, and the test passed without the fix."""
    with fresh_postgres() as url:
        name = url.rpartition("/")[2]
        asyncio.run(_admin_execute(f"ALTER DATABASE \"{name}\" SET idle_session_timeout = '1s'"))
        results = _at_once(tmp_path, url, "init", 3, bcrypt_rounds=14)
        _check_one_initialised(results)
        assert asyncio.run(_pg_state(url)) == (migration_head(), 1, 1)


async def _migrate_gives_up(tmp_path: Path, url: str) -> None:
    """`migrate` with `MIGRATION_LOCK_WAIT_SECONDS=1` while the lock stays held: it says it waits, then gives up
    with status 1 and one line naming the setting, within a few seconds, having migrated nothing."""
    env = _env(tmp_path, url) | {"MIGRATION_LOCK_WAIT_SECONDS": "1"}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "app.cli", "migrate", cwd=ROOT, env=env, stdout=asyncio.subprocess.PIPE
    )
    try:
        async with asyncio.timeout(60):
            output = (await process.stdout.read()).decode() if process.stdout else ""
            status = await process.wait()
    finally:
        await _stop(process)
    lines = output.splitlines()
    assert status == 1, output
    assert lines[0] == WAITING, output
    assert lines[1].startswith("Gave up after 1 s waiting for the migration lock"), output
    assert "MIGRATION_LOCK_WAIT_SECONDS" in lines[1], output
    assert "Traceback" not in output, output


def test_migrate_gives_up_after_its_wait_limit_on_postgresql(tmp_path: Path) -> None:
    async def held() -> None:
        holder = await asyncpg.connect(_plain_url(url))
        try:
            await holder.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
            await _migrate_gives_up(tmp_path, url)
            tables = "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"
            assert await holder.fetchval(tables) == 0
        finally:
            await holder.close()

    with fresh_postgres() as url:
        asyncio.run(held())


async def test_migrate_gives_up_after_its_wait_limit_on_sqlite(tmp_path: Path) -> None:
    database = tmp_path / "data" / "app.db"
    database.parent.mkdir()
    lock = os.open(database.with_name("app.db.migrate-lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        await _migrate_gives_up(tmp_path, f"sqlite+aiosqlite:///{database}")
        assert not database.exists() or database.stat().st_size == 0
    finally:
        os.close(lock)
