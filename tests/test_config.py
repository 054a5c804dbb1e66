"""Settings: defaults, validation messages that name the variable, production guards."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.config import ConfigError, load_settings


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


def test_invalid_secret_is_not_echoed(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as excinfo:
        load_settings(DATA_DIR=tmp_path, ENCRYPTION_KEY="not-a-fernet-key-SECRET")
    assert "ENCRYPTION_KEY" in str(excinfo.value)
    assert "not-a-fernet-key-SECRET" not in str(excinfo.value)


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


def test_env_example_lists_every_setting() -> None:
    from app.config import Settings

    text = (Path(__file__).resolve().parent.parent / ".env.example").read_text()
    listed = {line.split("=", 1)[0].lstrip("# ").strip() for line in text.splitlines() if "=" in line}
    missing = set(Settings.model_fields) - listed
    assert not missing, f".env.example lacks {sorted(missing)}"
