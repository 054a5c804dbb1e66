"""The repository stands alone and keeps its rules: nothing points outside it, the test configuration cannot
hang, imports are declared, services take no request bodies."""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import inspect
import pkgutil
import re
import subprocess
import sys
import tomllib
import typing
from pathlib import Path

import app.services
from app.fields import InputModel

ROOT = Path(__file__).resolve().parent.parent

#: What a file must not mention. Written as regular expressions that this file's own text does not match
#: (so nothing needs excluding), each spelled here in pieces:
#: - `..` + `/shared`: the team's reference folder beside a checkout, which a user's clone does not have;
#: - `shared/` + `n8n` or `API`: the same folder however it is reached (through a variable, a home folder,
#:   or named bare as a source); a bare "shared" is an ordinary word, so it is not matched alone;
#: - `/work` + `/`: the absolute path of the machines the project was built on.
OUTSIDE = re.compile(r"\.\./shared|shared/(?:n8n|API)|/wor[k]/")


def tracked_files() -> list[Path]:
    result = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=False, timeout=30)
    assert result.returncode == 0, f"git ls-files failed: {result.stderr.decode(errors='replace')}"
    return [ROOT / name for name in result.stdout.decode().split("\0") if name]


def is_binary(data: bytes) -> bool:
    """Git's own test: a NUL byte in the first 8000 bytes."""
    return b"\0" in data[:8000]


def outside_references(paths: list[Path], base: Path = ROOT) -> list[str]:
    hits = []
    for path in paths:
        if not path.is_file():  # deleted in the work tree, not yet in the index
            continue
        data = path.read_bytes()
        if is_binary(data):
            continue
        for number, line in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
            for match in OUTSIDE.finditer(line):
                hits.append(f"{path.relative_to(base)}:{number}: {match.group(0)}")
    return hits


def test_no_tracked_file_refers_outside_the_repository() -> None:
    files = tracked_files()
    assert len(files) > 50
    hits = outside_references(files)
    assert hits == [], "files refer to paths outside the repository:\n" + "\n".join(hits)


def test_outside_references_are_found_and_binary_files_skipped(tmp_path: Path) -> None:
    s = "/"  # the sample paths are joined at run time, so this file holds none of them
    text = tmp_path / "notes.md"
    text.write_text(
        f"ok: shared memory, recordings{s}n8n, {s}workers{s}\nsee ..{s}shared{s}API.md\n"
        f"$ROOT{s}x{s}shared{s}n8n{s}captures\nat {s}work{s}main{s}app\n"
    )
    binary = tmp_path / "blob.bin"
    binary.write_bytes(f"\0..{s}shared".encode())
    assert outside_references([text, binary], tmp_path) == [
        f"notes.md:2: ..{s}shared",
        f"notes.md:3: shared{s}n8n",
        f"notes.md:4: {s}work{s}",
    ]


def test_no_outside_pattern_matches_this_file_by_construction() -> None:
    assert outside_references([Path(__file__)]) == []


def run_pytest(tmp_path: Path, source: str, *options: str) -> subprocess.CompletedProcess[str]:
    """Run the project's pytest configuration on one throwaway test file."""
    (tmp_path / "test_probe.py").write_text(source)
    command = [sys.executable, "-m", "pytest", "-c", str(ROOT / "pyproject.toml"), "--rootdir", str(tmp_path)]
    command += ["-p", "no:cacheprovider", *options, str(tmp_path / "test_probe.py")]
    return subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False)


def test_empty_parametrization_fails_collection(tmp_path: Path) -> None:
    result = run_pytest(
        tmp_path,
        "import pytest\n\n@pytest.mark.parametrize('name', [])\ndef test_nothing(name):\n    pass\n",
    )
    assert result.returncode == 2, result.stdout
    assert "Empty parameter set" in result.stdout
    assert "skipped" not in result.stdout.splitlines()[-1]


def test_every_test_has_a_time_limit() -> None:
    options = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert 0 < float(options["timeout"]) <= 120


def test_a_hanging_test_is_stopped_by_the_timeout(tmp_path: Path) -> None:
    result = run_pytest(
        tmp_path,
        "import asyncio, time\n\ndef test_hangs():\n    time.sleep(30)\n\n"
        "async def test_hangs_async():\n    await asyncio.sleep(30)\n",
        "-o",
        "timeout=1",
    )
    assert result.returncode == 1, result.stdout
    assert "2 failed" in result.stdout.splitlines()[-1]
    for name in ("test_hangs", "test_hangs_async"):
        assert re.search(rf"FAILED \S*test_probe.py::{name} - Failed: Timeout \(>1.0s\)", result.stdout), result.stdout


def _requirement_names(path: Path) -> set[str]:
    """Distribution names pinned in a requirements file (and the files it includes), normalized."""
    names: set[str] = set()
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line.startswith("-r "):
            names |= _requirement_names(path.parent / line[3:].strip())
        elif line:
            names.add(re.sub(r"[-_.]+", "-", re.split(r"[\[=<>~!]", line, maxsplit=1)[0]).lower())
    return names


def _imported_top_levels(paths: list[Path]) -> set[str]:
    found: set[str] = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    return found


def test_every_imported_package_is_pinned_in_requirements() -> None:
    """What the service imports is declared, not merely installed as someone else's dependency."""
    sources = [ROOT / "main.py", *sorted((ROOT / "app").rglob("*.py")), *sorted((ROOT / "tools").rglob("*.py"))]
    first_party = {"app", "tools", "main", "migrations"}
    third_party = _imported_top_levels(sources) - set(sys.stdlib_module_names) - first_party
    distributions = importlib.metadata.packages_distributions()
    pinned = _requirement_names(ROOT / "requirements.txt")
    undeclared = {
        name
        for name in third_party
        if not {re.sub(r"[-_.]+", "-", d).lower() for d in distributions.get(name, [name])} & pinned
    }
    assert not undeclared, f"imported but not in requirements.txt: {sorted(undeclared)}"


def test_services_never_take_a_request_body() -> None:
    """One way for what services take (docs/CONVENTIONS.md): fields or `changes`, never an input model."""
    taking_bodies = []
    for module_info in pkgutil.iter_modules(app.services.__path__):
        module = importlib.import_module(f"app.services.{module_info.name}")
        for name, function in inspect.getmembers(module, inspect.isfunction):
            if function.__module__ != module.__name__:
                continue
            hints = typing.get_type_hints(function)
            for parameter, hint in hints.items():
                if inspect.isclass(hint) and issubclass(hint, InputModel):
                    taking_bodies.append(f"{module.__name__}.{name}({parameter}: {hint.__name__})")
    assert not taking_bodies
