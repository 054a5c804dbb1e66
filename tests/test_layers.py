"""The layering the house style names: services and the leaves (config, db, errors, security) import no
FastAPI or Starlette, so they run (and are tested) without the web framework."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT

PROBE = """
import importlib, pkgutil, sys
import app.services
for name in ("app.config", "app.db", "app.errors", "app.security"):
    importlib.import_module(name)
for module in pkgutil.iter_modules(app.services.__path__):
    importlib.import_module("app.services." + module.name)
print(" ".join(sorted(m for m in sys.modules if m.split(".")[0] in ("fastapi", "starlette") or m == "app.auth")))
"""


def test_services_and_leaves_import_no_web_framework() -> None:
    """A fresh interpreter (this one has FastAPI loaded) imports every service and leaf module."""
    result = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.split() == []
