"""Settings: defaults, validation messages that name the variable, production guards, private data files."""

from __future__ import annotations

import asyncio
import os
import stat
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.fernet import Fernet, InvalidToken
from sqlalchemy import text

from app.config import ConfigError, Settings, _persistent_secret, load_settings
from app.db import Database, secure_sqlite_file
from tests.conftest import ROOT


def test_defaults_use_embedded_sqlite(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DATABASE_URL", raising=False)
    settings = load_settings(DATA_DIR=tmp_path)
    assert settings.DATABASE_URL == f"sqlite+aiosqlite:///{tmp_path / 'app.db'}"
    assert settings.ACCESS_TOKEN_EXPIRE_MINUTES == 60
    assert settings.REFRESH_TOKEN_EXPIRE_DAYS == 7
    assert settings.COOKIE_SECURE is True


def test_development_secrets_are_generated_once_and_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("JWT_SECRET", raising=False)
    first = load_settings(DATA_DIR=tmp_path)
    second = load_settings(DATA_DIR=tmp_path)
    assert len(first.JWT_SECRET) >= 32
    assert first.JWT_SECRET == second.JWT_SECRET
    assert first.ENCRYPTION_KEY == second.ENCRYPTION_KEY
    assert (tmp_path / "jwt_secret").stat().st_mode & 0o077 == 0


def test_invalid_value_names_the_variable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ACCESS_TOKEN_EXPIRE_MINUTES", "soon")
    with pytest.raises(ConfigError) as excinfo:
        load_settings(DATA_DIR=tmp_path)
    assert "ACCESS_TOKEN_EXPIRE_MINUTES" in str(excinfo.value)


def test_a_refused_value_reads_as_the_services_sentence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The line an operator reads names the variable and says what is wrong, without pydantic's "Value error, "
    prefix: `CORS_ORIGINS: '*' is not allowed; ...`, as docs/OPERATIONS.md quotes ENCRYPTION_KEY's."""
    monkeypatch.setenv("CORS_ORIGINS", "*")
    with pytest.raises(ConfigError) as excinfo:
        load_settings(DATA_DIR=tmp_path)
    assert str(excinfo.value) == (
        "Invalid configuration:\n  CORS_ORIGINS: '*' is not allowed; list the SPA origins explicitly"
    )
    monkeypatch.delenv("CORS_ORIGINS")
    with pytest.raises(ConfigError) as excinfo:
        load_settings(DATA_DIR=tmp_path, ENCRYPTION_KEY="not-a-key")
    assert str(excinfo.value).endswith(
        "\n  ENCRYPTION_KEY: the key is not a Fernet key (url-safe base64 of 32 bytes)"
    ), str(excinfo.value)


def test_stream_log_ttl_is_at_least_a_minute(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Followers that lost their connection just before the end must still find the rest."""
    monkeypatch.setenv("STREAM_LOG_TTL", "59")
    with pytest.raises(ConfigError) as excinfo:
        load_settings(DATA_DIR=tmp_path)
    assert "STREAM_LOG_TTL" in str(excinfo.value)
    monkeypatch.setenv("STREAM_LOG_TTL", "60")
    assert load_settings(DATA_DIR=tmp_path).STREAM_LOG_TTL == 60


@pytest.mark.parametrize("days", ["-1", "36501"])
def test_error_log_retention_out_of_range_is_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, days: str
) -> None:
    """A negative retention would silently keep every row for ever (only 0 means that); 100 years is the most."""
    monkeypatch.setenv("ERROR_LOG_RETENTION_DAYS", days)
    with pytest.raises(ConfigError) as excinfo:
        load_settings(DATA_DIR=tmp_path)
    assert "ERROR_LOG_RETENTION_DAYS" in str(excinfo.value)


def test_invalid_secret_is_not_echoed(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as excinfo:
        load_settings(DATA_DIR=tmp_path, ENCRYPTION_KEY="not-a-fernet-key-SECRET")
    assert "ENCRYPTION_KEY" in str(excinfo.value)
    assert "not-a-fernet-key-SECRET" not in str(excinfo.value)


def test_encryption_key_lists_several_keys_the_first_encrypting(tmp_path: Path) -> None:
    """A rotation lists the new key first and the old one after it (spaces around a comma are fine): what the
    old key wrote stays readable, and what is written now only the new key needs."""
    old, new = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    written_before = load_settings(DATA_DIR=tmp_path, ENCRYPTION_KEY=old).fernet.encrypt(b"before")
    both = load_settings(DATA_DIR=tmp_path, ENCRYPTION_KEY=f" {new} , {old} ")
    assert both.fernet.decrypt(written_before) == b"before"
    written_now = both.fernet.encrypt(b"now")
    assert load_settings(DATA_DIR=tmp_path, ENCRYPTION_KEY=new).fernet.decrypt(written_now) == b"now"
    with pytest.raises(InvalidToken):
        load_settings(DATA_DIR=tmp_path, ENCRYPTION_KEY=old).fernet.decrypt(written_now)


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ("{good},not-a-fernet-key-SECRET", "ENCRYPTION_KEY: key 2 of 2 is not a Fernet key"),
        ("not-a-fernet-key-SECRET,{good},{good}", "ENCRYPTION_KEY: key 1 of 3 is not a Fernet key"),
        ("{good},", "ENCRYPTION_KEY: key 2 of 2 is empty"),
        ("{good},,{good}", "ENCRYPTION_KEY: key 2 of 3 is empty"),
        ("not-a-fernet-key-SECRET", "ENCRYPTION_KEY: the key is not a Fernet key"),
    ],
)
def test_invalid_key_in_the_list_is_named_by_position_never_echoed(tmp_path: Path, keys: str, message: str) -> None:
    """An empty entry is refused, not skipped: `NEW,$OLD` with OLD unset would drop the key of every stored
    secret. No key, good or bad, is in the message."""
    good = Fernet.generate_key().decode()
    with pytest.raises(ConfigError) as excinfo:
        load_settings(DATA_DIR=tmp_path, ENCRYPTION_KEY=keys.format(good=good))
    assert message in str(excinfo.value)
    assert "SECRET" not in str(excinfo.value)
    assert good not in str(excinfo.value)


def test_generated_development_key_encrypts_and_is_kept(tmp_path: Path) -> None:
    """No ENCRYPTION_KEY outside production: one key is generated into DATA_DIR, and a restart reads what the
    previous process wrote."""
    written = load_settings(DATA_DIR=tmp_path).fernet.encrypt(b"kept")
    assert (tmp_path / "encryption_key").stat().st_mode & 0o077 == 0
    assert load_settings(DATA_DIR=tmp_path).fernet.decrypt(written) == b"kept"


def test_keys_are_built_once_per_settings_object(tmp_path: Path) -> None:
    """Every send decrypts with them; a copy with another ENCRYPTION_KEY gets its own."""
    old, new = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    settings = load_settings(DATA_DIR=tmp_path, ENCRYPTION_KEY=old)
    assert settings.fernet is settings.fernet
    copy = settings.model_copy(update={"ENCRYPTION_KEY": new})
    assert copy.fernet is not settings.fernet
    assert load_settings(DATA_DIR=tmp_path, ENCRYPTION_KEY=new).fernet.decrypt(copy.fernet.encrypt(b"x")) == b"x"
    assert settings.fernet.decrypt(settings.fernet.encrypt(b"y")) == b"y"


def test_production_refuses_missing_secrets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("JWT_SECRET", raising=False)
    monkeypatch.delenv("ENCRYPTION_KEY", raising=False)
    with pytest.raises(ConfigError) as excinfo:
        load_settings(APP_ENV="production", DATA_DIR=tmp_path)
    assert "JWT_SECRET" in str(excinfo.value)
    assert not (tmp_path / "jwt_secret").exists()


def test_production_refuses_insecure_cookies(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="COOKIE_SECURE"):
        load_settings(
            APP_ENV="production",
            DATA_DIR=tmp_path,
            JWT_SECRET="s" * 40,
            ENCRYPTION_KEY="0" * 43 + "=",
            COOKIE_SECURE=False,
        )


def test_comma_separated_lists(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CORS_ORIGINS", "http://a.test, http://b.test")
    monkeypatch.setenv("TRUSTED_PROXIES", "10.0.0.1,10.0.0.0/8")
    settings = load_settings(DATA_DIR=tmp_path)
    assert settings.CORS_ORIGINS == ["http://a.test", "http://b.test"]
    assert settings.TRUSTED_PROXIES == ["10.0.0.1", "10.0.0.0/8"]


def test_wildcard_cors_origin_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CORS_ORIGINS", "*")
    with pytest.raises(ConfigError, match="CORS_ORIGINS"):
        load_settings(DATA_DIR=tmp_path)


@pytest.mark.parametrize("origins", ["null", "https://spa.test,NULL"])
def test_null_cors_origin_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, origins: str) -> None:
    """Any site can send `Origin: null` (a sandboxed iframe): listed, it would pass CORS and the Origin check."""
    monkeypatch.setenv("CORS_ORIGINS", origins)
    with pytest.raises(ConfigError, match="CORS_ORIGINS"):
        load_settings(DATA_DIR=tmp_path)


def test_env_example_lists_every_setting() -> None:
    from app.config import Settings

    text = (Path(__file__).resolve().parent.parent / ".env.example").read_text()
    listed = {line.split("=", 1)[0].lstrip("# ").strip() for line in text.splitlines() if "=" in line}
    missing = set(Settings.model_fields) - listed
    assert not missing, f".env.example lacks {sorted(missing)}"


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def open_umask() -> Iterator[None]:
    """The common 022: files anyone may read unless the code asks for less."""
    previous = os.umask(0o022)
    yield
    os.umask(previous)


@pytest.mark.usefixtures("open_umask")
async def test_init_creates_data_dir_and_sqlite_files_private(tmp_path: Path) -> None:
    data = tmp_path / "data"
    env = {name: value for name, value in os.environ.items() if name not in Settings.model_fields}
    env.update(DATA_DIR=str(data), BCRYPT_ROUNDS="4", FIRST_ADMIN_PASSWORD="first-admin-password")
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "app.cli", "init", cwd=ROOT, env=env, stdout=asyncio.subprocess.DEVNULL
    )
    assert await asyncio.wait_for(process.wait(), 120) == 0
    assert mode(data) == 0o700
    for name in ("app.db", "jwt_secret", "encryption_key"):
        assert mode(data / name) == 0o600, name
    # The app's engine (WAL) adds -wal and -shm: SQLite gives them the database file's mode.
    db = Database(load_settings(DATA_DIR=data))
    try:
        async with db.sessionmaker() as session:
            await session.execute(text("UPDATE teams SET name = name"))
            await session.commit()
            assert mode(data / "app.db-wal") == 0o600
            assert mode(data / "app.db-shm") == 0o600
    finally:
        await db.dispose()


@pytest.mark.usefixtures("open_umask")
def test_sqlite_files_of_an_older_version_are_narrowed(tmp_path: Path) -> None:
    tmp_path.chmod(0o755)
    for name in ("app.db", "app.db-wal", "app.db-journal"):
        (tmp_path / name).touch(mode=0o644)
    secure_sqlite_file(f"sqlite+aiosqlite:///{tmp_path / 'app.db'}")
    assert [mode(tmp_path / name) for name in ("app.db", "app.db-wal", "app.db-journal")] == [0o600] * 3
    assert not (tmp_path / "app.db-shm").exists()
    assert mode(tmp_path) == 0o755  # an existing directory may be shared on purpose; only our files change


def test_secure_sqlite_file_leaves_other_databases_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    secure_sqlite_file("postgresql+asyncpg://postgres@127.0.0.1/x")
    secure_sqlite_file("sqlite+aiosqlite:///:memory:")
    secure_sqlite_file("sqlite+aiosqlite://")
    assert list(tmp_path.iterdir()) == []


def test_secret_made_meanwhile_by_another_worker_is_the_one_used(tmp_path: Path) -> None:
    path = tmp_path / "jwt_secret"

    def make() -> str:
        path.write_text("made-by-the-other-worker")  # between our exists() check and our create
        return "ours"

    assert _persistent_secret(path, make) == "made-by-the-other-worker"
    assert path.read_text() == "made-by-the-other-worker"


def test_sqlite_file_we_may_not_chmod_is_used_as_it_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "app.db").touch(mode=0o644)

    def refuse(_path: Path, _mode: int) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(Path, "chmod", refuse)
    secure_sqlite_file(f"sqlite+aiosqlite:///{tmp_path / 'app.db'}")
    assert "could not make" in caplog.text
    assert mode(tmp_path / "app.db") == 0o644


@pytest.mark.settings(RATE_LIMIT_ENABLED=False, MESSAGE_MAX_CHARS=123)
def test_settings_marker_overrides_the_settings_fixture(settings: Settings) -> None:
    """`@pytest.mark.settings(...)` (tests/conftest.py): how a test or a module changes its app's settings."""
    assert settings.RATE_LIMIT_ENABLED is False
    assert settings.MESSAGE_MAX_CHARS == 123
    assert settings.BCRYPT_ROUNDS == 4  # the other test values stay
