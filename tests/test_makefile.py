"""`make test`'s phase of the browser tests with the schema tests beside them, run with a stand-in `pytest` (a
package on PYTHONPATH that sleeps), never the real suites: its exit status and what a Ctrl-C leaves behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT

#: The stand-in for `python -m pytest`: the schema run or a browser run by its arguments, each noting its start
#: and, when interrupted, its teardown (the real schema run drops its database there).
STUB = """
import os, signal, sys, time
role = "schema" if any(arg.endswith("test_openapi.py") for arg in sys.argv) else "browser"
out = os.environ["STUB_DIR"]
open(os.path.join(out, role + ".started"), "w").close()
try:
    time.sleep(float(os.environ.get("STUB_SECONDS", "0.2")))
except KeyboardInterrupt:
    time.sleep(0.3)  # a teardown that takes a moment
    open(os.path.join(out, role + ".teardown"), "w").close()
    sys.exit(2)
sys.exit(int(os.environ.get("STUB_" + role.upper() + "_RC", "0")))
"""


def _phase() -> str:
    """The recipe's shell command for the browser and schema phase, as make runs it (`make -n`)."""
    printed = subprocess.run(
        ["make", "-n", "test", f"PY={sys.executable}"], cwd=ROOT, capture_output=True, text=True, timeout=30
    ).stdout.splitlines()
    start = next(i for i, line in enumerate(printed) if "mktemp" in line)
    end = next(i for i, line in enumerate(printed) if i >= start and "test $browser" in line)
    return "\n".join(printed[start : end + 1])


def _start(tmp_path: Path, **env: str) -> subprocess.Popen[bytes]:
    stub = tmp_path / "stub" / "pytest"
    stub.mkdir(parents=True, exist_ok=True)
    (stub / "__init__.py").write_text("")
    (stub / "__main__.py").write_text(STUB)
    environ = {**os.environ, "PYTHONPATH": str(tmp_path / "stub"), "STUB_DIR": str(tmp_path), **env}
    return subprocess.Popen(
        ["/bin/sh", "-c", _phase()],
        cwd=tmp_path,
        env=environ,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group, as a terminal's foreground job
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # as a shell in a terminal has it
    )


@pytest.mark.parametrize(("browser", "schema", "passes"), [("0", "0", True), ("1", "0", False), ("0", "1", False)])
def test_the_phase_fails_when_either_run_fails(tmp_path: Path, browser: str, schema: str, passes: bool) -> None:
    process = _start(tmp_path, STUB_BROWSER_RC=browser, STUB_SCHEMA_RC=schema)
    assert (process.wait(timeout=30) == 0) is passes


def test_ctrl_c_lets_the_schema_run_tear_down_and_leaves_no_process(tmp_path: Path) -> None:
    """A Ctrl-C (SIGINT to the foreground process group) while the browser tests run: the schema run beside
    them gets it too and tears down (it drops its database there) before `make test` ends, rather than being
    killed mid-run (it was started with SIGINT ignored, as a shell starts a background command, then killed:
    its database stayed behind)."""
    process = _start(tmp_path, STUB_SECONDS="30")
    deadline = time.monotonic() + 20
    while not ((tmp_path / "schema.started").exists() and (tmp_path / "browser.started").exists()):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGINT)
    assert process.wait(timeout=20) != 0
    assert (tmp_path / "browser.teardown").exists()
    assert (tmp_path / "schema.teardown").exists()
    with pytest.raises(ProcessLookupError):
        os.killpg(process.pid, 0)  # no process of the phase is left
