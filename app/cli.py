"""Operator commands: `python -m app.cli init | migrate | serve | create-admin | reset-password | rebuild-usage |
rotate-encryption-key`."""

from __future__ import annotations

import argparse
import asyncio
import io
import re
import secrets
import sys
import uuid
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from alembic import command
from alembic.util import CommandError
from sqlalchemy import Connection, func, make_url, select
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import create_async_engine

from app.config import Settings, load_settings
from app.crypto import parse_keys
from app.db import Database, secure_sqlite_file
from app.fields import PASSWORD_MAX_LENGTH, PASSWORD_MIN_LENGTH, canonical_email, email_forms, normalize_email
from app.migration_lock import LockWaitExceeded, migration_lock
from app.migrations import alembic_config
from app.models import Team, User
from app.serve import serve
from app.services import key_rotation
from app.services import usage as usage_service
from app.services import users as users_service
from app.services.teams import create_team_with_admin, database_is_empty

ROOT = Path(__file__).resolve().parent.parent
TEAM_NAME_MAX = 100
#: A table the statement needs is missing: SQLite's and PostgreSQL's words for it.
_NOT_MIGRATED = re.compile(r"no such table|relation \S+ does not exist")


def out(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


async def migrate(settings: Settings) -> int:
    """Alembic's upgrade to the head: 0, or 1 with one line (not a traceback) saying why it failed.

    On a connection made here, in this event loop (migrations/env.py uses the one it is given, as it does its own
    otherwise), so an interrupt (Ctrl-C) stops the migration running, rolled back, before the lock is released.
    """
    engine = create_async_engine(settings.DATABASE_URL)
    try:
        async with engine.connect() as connection:
            await connection.run_sync(_upgrade, settings)
    except (DBAPIError, OSError) as exc:
        # One line naming the database, not a traceback (its password hidden): e.g. not created yet.
        out(f"Cannot migrate the database {database_problem(settings, exc)}")
        return 1
    except CommandError as exc:
        # Alembic's own refusal, e.g. a revision this release does not know: one line, not a traceback.
        reason = str(exc).splitlines()[0][:200]
        hint = " (was it migrated by a newer release of the service?)" if "Can't locate revision" in reason else ""
        out(f"Cannot migrate the database: {reason}{hint}")
        return 1
    finally:
        await engine.dispose()
    return 0


def _upgrade(connection: Connection, settings: Settings) -> None:
    config = alembic_config(settings.DATABASE_URL, configure_logging=True)
    config.attributes["connection"] = connection
    command.upgrade(config, "head")


def migrate_and_init(settings: Settings, *, init: bool) -> int:
    """`migrate`, and `init`'s first admin after it, under the database's migration lock (app.migration_lock):
    runs started at once (replicas each running `init`) take turns, so the later ones find the database at the
    head and initialised, and do nothing twice."""
    try:
        secure_sqlite_file(settings.DATABASE_URL)  # before the lock file beside it, or Alembic, creates the file
        return asyncio.run(_locked(settings, init=init))
    except LockWaitExceeded:
        out(
            f"Gave up after {settings.MIGRATION_LOCK_WAIT_SECONDS:g} s waiting for the migration lock "
            "(MIGRATION_LOCK_WAIT_SECONDS): another migrate or init of this database still holds it; nothing was "
            "changed (docs/OPERATIONS.md, Upgrades, shows who holds it)"
        )
        return 1
    except (DBAPIError, OSError) as exc:  # the lock's own connection (or file)
        out(f"Cannot migrate the database {database_problem(settings, exc)}")
        return 1


async def _locked(settings: Settings, *, init: bool) -> int:
    async with migration_lock(settings.DATABASE_URL, out, settings.MIGRATION_LOCK_WAIT_SECONDS or None):
        status = await migrate(settings)
        if status or not init:
            return status
        try:
            return await first_admin(settings) or 0
        except (DBAPIError, OSError) as exc:
            return database_failed(settings, "init", exc)


async def first_admin(settings: Settings) -> int | None:
    db = Database(settings)
    try:
        async with db.sessionmaker() as session:
            if not await database_is_empty(session):
                out("Database already has data: keeping it (no first admin created).")
                return None
            # The rules create-admin and the API apply; checked only now, as the settings are unused afterwards.
            given = settings.FIRST_ADMIN_PASSWORD
            for name, problem in (
                ("FIRST_TEAM_NAME", team_name_problem(settings.FIRST_TEAM_NAME)),
                ("FIRST_ADMIN_EMAIL", email_problem(settings.FIRST_ADMIN_EMAIL)),
                ("FIRST_ADMIN_PASSWORD", password_problem(given) if given else None),
            ):
                if problem:
                    out(f"{name}: {problem}")
                    return 2
            password = given or secrets.token_urlsafe(12)
            team, user = await create_team_with_admin(
                session=session,
                name=settings.FIRST_TEAM_NAME.strip(),
                admin_email=normalize_email(settings.FIRST_ADMIN_EMAIL),
                admin_password=password,
                admin_full_name="Administrator",
                settings=settings,
            )
            out("First team and admin created:")
            out(f"  team:     {team.name} (team_id {team.id})")
            out(f"  email:    {user.email}")
            if settings.FIRST_ADMIN_PASSWORD:
                out("  password: (from FIRST_ADMIN_PASSWORD)")
            else:
                out(f"  password: {password}   <- shown once; change it or set FIRST_ADMIN_PASSWORD")
        return None
    finally:
        await db.dispose()


async def create_admin(settings: Settings, team_name: str, email: str, password: str) -> None:
    db = Database(settings)
    try:
        async with db.sessionmaker() as session:
            team, user = await create_team_with_admin(
                session=session,
                name=team_name,
                admin_email=email,
                admin_password=password,
                admin_full_name=None,
                settings=settings,
            )
            out(f"Created team {team.name} ({team.id}) with admin {user.email} ({user.id})")
    finally:
        await db.dispose()


async def reset_password(settings: Settings, email: str, password: str, team_id: uuid.UUID | None) -> int:
    db = Database(settings)
    try:
        async with db.sessionmaker() as session:
            query = select(User).where(func.lower(User.email).in_(email_forms(email)))
            if team_id is not None:
                query = query.where(User.team_id == team_id)
            users = list((await session.execute(query.order_by(User.created_at))).scalars())
            if not users:
                out("No such user")
                return 1
            if len({user.team_id for user in users}) > 1:
                out("Email exists in several teams: pass --team-id")
                return 1
            if len(users) > 1:
                # Stored twice in one team before domains were folded (`a@bücher.de`, `a@xn--bcher-kva.de`):
                # the row spelled as typed, never a guess.
                typed = [user for user in users if canonical_email(user.email) == canonical_email(email)]
                if len(typed) != 1:
                    stored = ", ".join(user.email for user in users)
                    out(f"Email is stored in several forms in this team ({stored}): pass one as stored")
                    return 1
                users = typed
            user = await users_service.reset_password(
                session=session, settings=settings, user=users[0], new_password=password
            )
            team = await session.get(Team, user.team_id)
            out(f"Password reset for {user.email} in team {team.name if team else user.team_id}")
            return 0
    finally:
        await db.dispose()


async def rebuild_usage(settings: Settings) -> None:
    db = Database(settings)
    try:
        async with db.sessionmaker() as session:
            written = await usage_service.rebuild_rollups(session=session)
            out(f"Usage roll-up rebuilt from the ledger: {written} rows")
    finally:
        await db.dispose()


async def rotate_encryption_key(settings: Settings, batch_size: int) -> int:
    """Exit status 1 while a secret is not under the first key (unreadable, or rewritten throughout the run):
    the older keys must stay until it is."""
    keys = parse_keys(settings.ENCRYPTION_KEY)
    db = Database(settings)
    try:
        async with db.sessionmaker() as session:
            result = await key_rotation.rotate_secrets(
                session=session, current=keys[0], keys=settings.fernet, batch_size=batch_size
            )
    finally:
        await db.dispose()
    out(f"Stored secrets re-encrypted with key 1 of {len(keys)} in ENCRYPTION_KEY (batches of {batch_size}):")
    unreadable: list[str] = []
    for label, tally in (
        ("agents' webhook headers", result.agents),
        ("refresh-token successors", result.refresh_successors),
    ):
        changed = f", {tally.changed} changed during the run (run again)" if tally.changed else ""
        out(
            f"{label}: {tally.rotated} rotated, {tally.current} already current, "
            f"{tally.unreadable_count} unreadable{changed}"
        )
        unreadable += tally.unreadable
        if tally.unreadable_count > len(tally.unreadable):
            unreadable.append(f"... and {tally.unreadable_count - len(tally.unreadable)} more {label}")
    if unreadable:
        out("Unreadable with every key in ENCRYPTION_KEY (left as they are):")
        for name in unreadable:
            out(f"  {name}")
        out(
            "An admin saves such an agent's webhook headers again (PUT /api/agents/{id}); a refresh-token "
            "successor is only read in its reuse window, and its row is deleted a day after the token expires."
        )
    if result.complete:
        others = ": the other keys may be dropped from ENCRYPTION_KEY" if len(keys) > 1 else ""
        out(f"Every stored secret is under key 1{others}.")
        return 0
    return 1


def database_problem(settings: Settings, exc: BaseException) -> str:
    """The database (its password hidden) and the first line of the driver's reason, for a one-line error."""
    url = make_url(settings.DATABASE_URL).render_as_string(hide_password=True)
    reason = str(getattr(exc, "orig", None) or exc).splitlines()[0][:200]
    return f"{url}: {reason}"


def run_on_database(settings: Settings, name: str, work: Coroutine[Any, Any, int | None]) -> int:
    """Run a command's database work: its exit status (0 for None), or 1 with one line (not a traceback) when
    the database is unreachable or not migrated yet."""
    try:
        return asyncio.run(work) or 0
    except (DBAPIError, OSError) as exc:
        return database_failed(settings, name, exc)


def database_failed(settings: Settings, name: str, exc: BaseException) -> int:
    """Say in one line that a command's database work failed, and why: exit status 1."""
    problem = database_problem(settings, exc)
    hint = " (run `python -m app.cli migrate` first?)" if _NOT_MIGRATED.search(problem) else ""
    out(f"{name} failed: database {problem}{hint}")
    return 1


def password_problem(password: str) -> str | None:
    """The API's password rule, for operator commands."""
    if not PASSWORD_MIN_LENGTH <= len(password) <= PASSWORD_MAX_LENGTH:
        return f"Password must be {PASSWORD_MIN_LENGTH} to {PASSWORD_MAX_LENGTH} characters"
    return None


def team_name_problem(name: str) -> str | None:
    """The API's team name rule (surrounding spaces dropped), for operator commands."""
    if not 1 <= len(name.strip()) <= TEAM_NAME_MAX:
        return f"Team name must be 1 to {TEAM_NAME_MAX} characters"
    return None


def email_problem(email: str) -> str | None:
    """The API's email rule (syntax, no DNS), for operator commands."""
    try:
        normalize_email(email)
    except ValueError:
        return "Not a valid email address"
    return None


def never_fail_on_encoding() -> None:
    """Write what the terminal's encoding lacks (a team name, an internationalised domain on a Latin-1 or
    ASCII terminal) as `\\u…` escapes: a UnicodeEncodeError was raised after the command had committed."""
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors="backslashreplace")


def build_parser() -> argparse.ArgumentParser:
    """The commands and their options (the manual's command tables are checked against it: tests/test_docs.py)."""
    parser = argparse.ArgumentParser(prog="python -m app.cli")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("migrate", help="apply migrations (alembic upgrade head)")
    sub.add_parser("init", help="migrate, then create the first team and admin if the database is empty")
    p_serve = sub.add_parser("serve", help="run the server (uvicorn; TRUSTED_PROXIES decides the client address)")
    p_serve.add_argument("--host", default="127.0.0.1")
    p_serve.add_argument("--port", type=int, default=8000)
    p_serve.add_argument("--workers", type=int, default=1)
    p_admin = sub.add_parser("create-admin", help="create a team and its first admin")
    p_admin.add_argument("--team", required=True)
    p_admin.add_argument("--email", required=True)
    p_admin.add_argument("--password", required=True)
    p_reset = sub.add_parser("reset-password", help="set a user's password and revoke their tokens")
    p_reset.add_argument("--email", required=True)
    p_reset.add_argument("--password", required=True)
    p_reset.add_argument("--team-id")
    sub.add_parser(
        "rebuild-usage",
        help="empty the usage roll-up and sum the ledger into it again (safe while the service runs on PostgreSQL; "
        "answers ending meanwhile wait for it)",
    )
    p_rotate = sub.add_parser(
        "rotate-encryption-key",
        help="re-encrypt every stored secret with the first key of ENCRYPTION_KEY (safe while the service runs)",
    )
    p_rotate.add_argument("--batch-size", type=int, default=key_rotation.BATCH_SIZE, help="rows per transaction")
    return parser


def main(argv: list[str] | None = None) -> int:
    never_fail_on_encoding()
    args = build_parser().parse_args(argv)

    settings = load_settings()
    if args.cmd == "serve":
        serve(settings, host=args.host, port=args.port, workers=max(1, args.workers))
        return 0
    if args.cmd in ("migrate", "init"):
        return migrate_and_init(settings, init=args.cmd == "init")
    if args.cmd == "create-admin":
        problem = team_name_problem(args.team) or password_problem(args.password) or email_problem(args.email)
        if problem:
            out(problem)
            return 2
        team_name, email = args.team.strip(), normalize_email(args.email)
        return run_on_database(settings, args.cmd, create_admin(settings, team_name, email, args.password))
    if args.cmd == "reset-password":
        problem = password_problem(args.password)
        team_id = None
        try:
            team_id = None if args.team_id is None else uuid.UUID(args.team_id)
        except ValueError:
            problem = problem or "--team-id must be a team id (a UUID, as `init` and `create-admin` print it)"
        if problem:
            out(problem)
            return 2
        return run_on_database(settings, args.cmd, reset_password(settings, args.email, args.password, team_id))
    if args.cmd == "rebuild-usage":
        return run_on_database(settings, args.cmd, rebuild_usage(settings))
    if args.cmd == "rotate-encryption-key":
        if not 1 <= args.batch_size <= 10_000:
            out("--batch-size must be 1 to 10000")
            return 2
        return run_on_database(settings, args.cmd, rotate_encryption_key(settings, args.batch_size))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
