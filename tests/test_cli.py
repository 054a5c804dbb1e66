"""`python -m app.cli init`: migrate, first admin once, data reused on the next run."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import asyncpg

from tests.conftest import ROOT, _plain_url, fresh_postgres, run_migrations


def _cli(tmp_path: Path, *args: str, encoding: str = "utf-8", **env: str) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if k not in {"DATABASE_URL", "JWT_SECRET", "FIRST_ADMIN_PASSWORD"}}
    full_env.update({"DATA_DIR": str(tmp_path / "data"), "BCRYPT_ROUNDS": "4", **env})
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args],
        cwd=ROOT,
        env=full_env,
        capture_output=True,
        encoding=encoding,
        timeout=60,
    )


def test_init_creates_first_admin_once(tmp_path: Path) -> None:
    first = _cli(tmp_path, "init")
    assert first.returncode == 0, first.stderr
    assert "First team and admin created" in first.stdout
    assert "admin@example.com" in first.stdout
    assert "password:" in first.stdout
    assert (tmp_path / "data" / "app.db").exists()
    second = _cli(tmp_path, "init")
    assert second.returncode == 0, second.stderr
    assert "already has data" in second.stdout


def test_init_with_password_from_env_does_not_print_it(tmp_path: Path) -> None:
    result = _cli(tmp_path, "init", FIRST_ADMIN_PASSWORD="from-env-password-123")
    assert result.returncode == 0, result.stderr
    assert "from-env-password-123" not in result.stdout


def test_reset_password_of_unknown_user_fails(tmp_path: Path) -> None:
    assert _cli(tmp_path, "init").returncode == 0
    result = _cli(tmp_path, "reset-password", "--email", "nobody@example.com", "--password", "long-enough-pw")
    assert result.returncode == 1
    ok = _cli(tmp_path, "reset-password", "--email", "ADMIN@example.com", "--password", "long-enough-pw")
    assert ok.returncode == 0, ok.stdout + ok.stderr


def test_rebuild_usage_on_the_embedded_database(tmp_path: Path) -> None:
    assert _cli(tmp_path, "init").returncode == 0
    result = _cli(tmp_path, "rebuild-usage")
    assert result.returncode == 0, result.stderr
    assert "Usage roll-up rebuilt from the ledger: 0 rows" in result.stdout


def test_migrating_a_database_that_does_not_exist_says_so_in_one_line(tmp_path: Path) -> None:
    """It was a SQLAlchemy traceback (the README's example names a database to create first)."""
    url = "postgresql+asyncpg://postgres:not-shown@127.0.0.1:5432/no_such_database_here"
    result = _cli(tmp_path, "migrate", DATABASE_URL=url)
    assert result.returncode == 1
    assert result.stdout.strip() == (
        "Cannot migrate the database postgresql+asyncpg://postgres:***@127.0.0.1:5432/no_such_database_here: "
        'database "no_such_database_here" does not exist'
    )
    assert "not-shown" not in result.stdout + result.stderr
    assert "Traceback" not in result.stderr


def test_reset_password_with_a_team_id_that_is_not_an_id_says_so_in_one_line(tmp_path: Path) -> None:
    """It was a SQLAlchemy traceback (the id is bound as a UUID)."""
    assert _cli(tmp_path, "init").returncode == 0
    result = _cli(
        tmp_path, "reset-password", "--email", "admin@example.com", "--password", "long-enough-pw", "--team-id", "acme"
    )
    assert result.returncode == 2
    assert result.stdout.strip() == "--team-id must be a team id (a UUID, as `init` and `create-admin` print it)"
    assert "Traceback" not in result.stderr


def test_create_admin_refuses_a_team_name_the_api_would_refuse(tmp_path: Path) -> None:
    """An empty (or blank) name made a team without a name; one over 100 characters was a traceback on
    PostgreSQL (the column holds 100)."""
    for name in ("", "   ", "x" * 101):
        args = ("--team", name, "--email", "a@example.com", "--password", "long-enough-pw")
        result = _cli(tmp_path, "create-admin", *args)
        assert result.returncode == 2, result.stdout + result.stderr
        assert result.stdout.strip() == "Team name must be 1 to 100 characters"
    ok = _cli(tmp_path, "init")
    assert ok.returncode == 0, ok.stderr


def test_commands_on_a_database_not_migrated_or_unreachable_say_so_in_one_line(tmp_path: Path) -> None:
    """create-admin, reset-password and rebuild-usage were SQLAlchemy (or socket) tracebacks."""
    commands = [
        ("create-admin", "--team", "T", "--email", "a@example.com", "--password", "long-enough-pw"),
        ("reset-password", "--email", "a@example.com", "--password", "long-enough-pw"),
        ("rebuild-usage",),
        ("rotate-encryption-key",),
    ]
    for args in commands:
        result = _cli(tmp_path, *args)  # DATA_DIR's SQLite file, never migrated
        assert result.returncode == 1, result.stdout + result.stderr
        assert "Traceback" not in result.stderr
        line = result.stdout.strip()
        assert line.startswith(f"{args[0]} failed: database sqlite+aiosqlite:///"), line
        assert line.endswith("(run `python -m app.cli migrate` first?)"), line
        assert "\n" not in line
    url = "postgresql+asyncpg://postgres:not-shown@127.0.0.1:9/relay"  # nothing listens on port 9
    result = _cli(tmp_path, "rebuild-usage", DATABASE_URL=url)
    assert result.returncode == 1
    assert result.stdout.strip().startswith(
        "rebuild-usage failed: database postgresql+asyncpg://postgres:***@127.0.0.1:9/relay: "
    ), result.stdout
    assert "not-shown" not in result.stdout + result.stderr
    assert "Traceback" not in result.stderr


def test_migrating_a_database_a_newer_release_migrated_says_so_in_one_line(tmp_path: Path) -> None:
    """A database at a revision this code does not know (migrated by a newer release, then the code rolled back)
    made `migrate` and `init` end in Alembic's traceback."""
    assert _cli(tmp_path, "init").returncode == 0
    with sqlite3.connect(tmp_path / "data" / "app.db") as conn:
        conn.execute("UPDATE alembic_version SET version_num = '9999'")
    for command in ("migrate", "init"):
        result = _cli(tmp_path, command)
        assert result.returncode == 1, command
        assert result.stdout.strip().splitlines()[-1] == (
            "Cannot migrate the database: Can't locate revision identified by '9999' "
            "(was it migrated by a newer release of the service?)"
        )
        assert "Traceback" not in result.stderr


def test_init_refuses_a_first_admin_the_api_would_refuse(tmp_path: Path) -> None:
    """create-admin checked its team name, email and password, but init took FIRST_TEAM_NAME, FIRST_ADMIN_EMAIL and
    FIRST_ADMIN_PASSWORD as given: a blank team name, an email the API refuses everywhere else, a password shorter
    than the API allows. Nothing is created; once the database has data the settings are not used, so they are
    not checked."""
    cases = [
        ({"FIRST_TEAM_NAME": "  "}, "FIRST_TEAM_NAME: Team name must be 1 to 100 characters"),
        ({"FIRST_ADMIN_EMAIL": "not-an-email"}, "FIRST_ADMIN_EMAIL: Not a valid email address"),
        ({"FIRST_ADMIN_PASSWORD": "short"}, "FIRST_ADMIN_PASSWORD: Password must be 8 to 1024 characters"),
    ]
    for env, message in cases:
        result = _cli(tmp_path, "init", **env)
        assert result.returncode == 2, result.stdout + result.stderr
        assert result.stdout.strip().splitlines()[-1] == message
        assert "short" not in result.stdout.replace("FIRST_ADMIN_PASSWORD", "")
    ok = _cli(tmp_path, "init", FIRST_ADMIN_EMAIL=" Admin@Example.COM ")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "email:    admin@example.com" in ok.stdout
    again = _cli(tmp_path, "init", FIRST_ADMIN_PASSWORD="short")
    assert again.returncode == 0
    assert "already has data" in again.stdout


def test_init_stores_the_first_admins_idn_domain_in_unicode(tmp_path: Path) -> None:
    """`admin@xn--bcher-kva.de` and `admin@bücher.de` are one mailbox, stored with the domain in Unicode (as the
    API stores it), and reset-password finds it in either spelling."""
    result = _cli(tmp_path, "init", FIRST_ADMIN_EMAIL="Admin@XN--BCHER-KVA.de")
    assert result.returncode == 0, result.stderr
    assert "email:    admin@b\u00fccher.de" in result.stdout
    with sqlite3.connect(tmp_path / "data" / "app.db") as db:
        assert db.execute("SELECT email FROM users").fetchall() == [("admin@b\u00fccher.de",)]
    for email in ("admin@xn--bcher-kva.de", "ADMIN@B\u00dcCHER.DE"):
        reset = _cli(tmp_path, "reset-password", "--email", email, "--password", "long-enough-pw")
        assert reset.returncode == 0, reset.stdout + reset.stderr


def test_output_never_fails_on_a_terminal_that_cannot_encode_it(tmp_path: Path) -> None:
    """`żółw.pl` has letters Latin-1 lacks: printing the admin after the commit raised UnicodeEncodeError (exit 1,
    a traceback, the team made all the same). Now what the terminal cannot show is written as `\\u…` escapes."""
    latin1 = {"PYTHONIOENCODING": "latin-1", "encoding": "latin-1"}
    assert _cli(tmp_path, "migrate").returncode == 0
    created = _cli(
        tmp_path, "create-admin", "--team", "Żółw", "--email", "Admin@\u017c\u00f3\u0142w.pl", "--password",
        "long-enough-pw", **latin1,
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    assert "Traceback" not in created.stderr
    assert "Created team \\u017b\u00f3\\u0142w (" in created.stdout
    assert "with admin admin@\\u017c\u00f3\\u0142w.pl (" in created.stdout
    reset = _cli(tmp_path, "reset-password", "--email", "admin@\u017c\u00f3\u0142w.pl", "--password", "another-pw-1",
                 **latin1)  # fmt: skip
    assert reset.returncode == 0, reset.stderr
    assert reset.stdout == "Password reset for admin@\\u017c\u00f3\\u0142w.pl in team \\u017b\u00f3\\u0142w\n"
    with sqlite3.connect(tmp_path / "data" / "app.db") as db:
        assert db.execute("SELECT email FROM users").fetchall() == [("admin@\u017c\u00f3\u0142w.pl",)]


def test_init_whose_first_admin_the_database_refuses_says_so_in_one_line(tmp_path: Path) -> None:
    """`init` migrates, then makes the first admin; a database error in that second step (here a trigger refuses
    the team) is one line naming the database, exit 1, as every command's database error is: not a traceback."""
    with fresh_postgres() as url:
        run_migrations(url)
        asyncio.run(
            _execute_on(
                url,
                "CREATE FUNCTION refuse_team() RETURNS trigger LANGUAGE plpgsql AS"
                " $$ BEGIN RAISE EXCEPTION 'no new team'; END $$",
                "CREATE TRIGGER refuse_team BEFORE INSERT ON teams FOR EACH ROW EXECUTE FUNCTION refuse_team()",
            )
        )
        result = _cli(tmp_path, "init", DATABASE_URL=url)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    line = result.stdout.strip().splitlines()[-1]
    assert line.startswith("init failed: database postgresql+asyncpg://"), result.stdout
    assert line.endswith("no new team"), line


async def _execute_on(url: str, *statements: str) -> None:
    conn = await asyncpg.connect(_plain_url(url))
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()
