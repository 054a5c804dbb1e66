"""The layering the house style names: services and the leaves (config, db, errors, security) import no
FastAPI or Starlette, so they run (and are tested) without the web framework."""

from __future__ import annotations

import re
import subprocess
import sys

from fastapi import FastAPI
from fastapi.routing import APIRoute

from main import ROUTERS, STREAMING_ROUTERS
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


def _example(path: str) -> str:
    """A path the route's pattern matches, each parameter a plain segment."""
    return re.sub(r"\{[^}]+\}", "x1", path)


def test_streaming_routes_are_matched_first_and_shadow_no_other(app: FastAPI) -> None:
    """FastAPI matches the included routers in order, checking each route it passes (~0.2 ms of CPU for a `/v1`
    completion from the end of the list), so the routers a stream's requests use come first. Moving them is safe
    only while no path of theirs can match another router's, or the other way round."""
    included = [route.original_router for route in app.router.routes if hasattr(route, "original_router")]
    assert included[: len(STREAMING_ROUTERS)] == list(STREAMING_ROUTERS)
    assert sorted(map(id, included)) == sorted(map(id, ROUTERS))  # each once (routers are not hashable)
    streaming = [route for router in STREAMING_ROUTERS for route in router.routes if isinstance(route, APIRoute)]
    others = [route for router in ROUTERS if router not in STREAMING_ROUTERS for route in router.routes]
    for first in streaming:
        for other in others:
            assert isinstance(other, APIRoute)
            assert not other.path_regex.match(_example(first.path)), (first.path, other.path)
            assert not first.path_regex.match(_example(other.path)), (first.path, other.path)
