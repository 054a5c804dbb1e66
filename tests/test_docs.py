"""Swagger UI and ReDoc work without internet: every asset comes from the service itself. The manual (README and
docs/) names only settings and routes that exist, and its links reach their pages and headings."""

from __future__ import annotations

import argparse
import ast
import re
import subprocess
from pathlib import Path

import httpx
import pytest

from app.cli import build_parser
from app.config import Settings
from app.middleware import DOCS_CSP
from main import create_app
from tests.conftest import ROOT, make_settings

#: Every URL a docs page makes the browser fetch: src/href attributes, the OpenAPI and redirect URLs.
ASSET_RE = re.compile(r"""(?:src|href|spec-url)="([^"]+)"|url: '([^']+)'|oauth2RedirectUrl: [^']*'([^']+)'""")
CONTENT_TYPES = {".js": ("text/javascript", "application/javascript"), ".css": ("text/css",), ".png": ("image/png",)}


def page_urls(html: str) -> list[str]:
    return [next(group for group in match.groups() if group) for match in ASSET_RE.finditer(html)]


@pytest.mark.parametrize(("page", "expected"), [("/docs", 5), ("/redoc", 3)])
async def test_docs_page_loads_only_same_origin_assets(client: httpx.AsyncClient, page: str, expected: int) -> None:
    response = await client.get(page)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert "://" not in response.text  # no CDN, no Google Fonts, no external favicon
    urls = page_urls(response.text)
    assert len(urls) == expected
    for url in urls:
        assert re.match(r"/[^/]", url), url  # a path on this origin, not //host
        answer = await client.get(url)
        assert answer.status_code == 200, url
        suffix = url[url.rfind(".") :]
        if suffix in CONTENT_TYPES:
            assert answer.headers["content-type"].split(";")[0] in CONTENT_TYPES[suffix], url
            assert len(answer.content) > 1000, url
        elif url == "/openapi.json":
            assert answer.json()["info"]["title"] == "n8n Chat Relay"
        else:
            assert answer.headers["content-type"].startswith("text/html"), url


async def test_swagger_ui_keeps_authorization_and_the_oauth2_redirect(client: httpx.AsyncClient) -> None:
    html = (await client.get("/docs")).text
    assert '"persistAuthorization": true' in html
    assert "oauth2RedirectUrl: window.location.origin + '/docs/oauth2-redirect'" in html
    redirect = await client.get("/docs/oauth2-redirect")
    assert redirect.status_code == 200
    assert "swaggerUIRedirectOauth2" in redirect.text


async def test_docs_routes_are_not_in_the_schema(client: httpx.AsyncClient) -> None:
    paths = (await client.get("/openapi.json")).json()["paths"]
    assert not [path for path in paths if path.startswith(("/docs", "/redoc"))]


async def test_docs_csp_names_no_other_host(client: httpx.AsyncClient) -> None:
    for page in ("/docs", "/redoc", "/docs/oauth2-redirect"):
        assert (await client.get(page)).headers["content-security-policy"] == DOCS_CSP
    assert "http" not in DOCS_CSP
    assert "script-src 'self' 'unsafe-inline';" in DOCS_CSP


async def test_missing_docs_asset_is_json_404(client: httpx.AsyncClient) -> None:
    response = await client.get("/docs/assets/nope.js")
    assert response.status_code == 404
    assert response.json() == {"detail": "Not Found"}
    traversal = await client.get("/docs/assets/..%2F__init__.py")
    assert traversal.status_code == 404


# --- the manual's names: settings, routes, links ------------------------------------------------------

#: The manual: the README and every page of docs/.
MANUAL = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
#: A name in the style of a setting (`N8N_READ_TIMEOUT`), not part of a longer word, path or `$VARIABLE`.
SETTING_LIKE = re.compile(r"(?<![\w$./-])[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+\b")
#: Names of that style the manual may use that are no setting and defined nowhere here: uvicorn's, Linux's, the
#: socket option the write-stall limit sets, typing's.
OTHER_PROGRAMS = {"FORWARDED_ALLOW_IPS", "SCHED_IDLE", "SO_LINGER", "TYPE_CHECKING"}
#: `GET /api/...`, `GET/POST /api/chats`, `POST /api/agents/{agent id}/n8n-chat`: a route with its method(s).
ROUTE = re.compile(
    r"\b((?:GET|POST|PUT|PATCH|DELETE|HEAD)(?:/(?:GET|POST|PUT|PATCH|DELETE|HEAD))*) "
    r"(/(?:api|v1|health|ready|metrics)(?:[\w.…-]|/|\{[^}\n]*\}|<[^>\n]*>)*)"
)
#: A path in backticks under /api or /v1 without a method (`/api/agents/<agent id>/n8n-chat`).
BARE_PATH = re.compile(r"`(/(?:api|v1)(?:/[^`\s?]*)?)")


def backticked(text: str) -> list[str]:
    """The inline code spans of a Markdown text (fenced blocks excluded: they hold shell and JSON)."""
    prose = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    return re.findall(r"`([^`\n]+)`", prose)


def defined_names() -> set[str]:
    """Every setting, and every upper-case name the code defines or reads from the environment."""
    sources = [path for part in ("app", "tools", "bench", "tests") for path in (ROOT / part).rglob("*.py")]
    code = "\n".join(path.read_text() for path in sources)
    constants = re.findall(r"^\s*([A-Z][A-Z0-9_]+)\s*(?::[^=\n]+)?=", code, re.M)  # NAME = ... / NAME: T = ...
    quoted = re.findall(r"""["']([A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+)["']""", code)  # an environment variable's name
    make = re.findall(r"^([A-Z][A-Z0-9_]+)\s*[?:]?=", (ROOT / "Makefile").read_text(), re.M)
    return set(Settings.model_fields) | set(constants) | set(quoted) | set(make) | OTHER_PROGRAMS


def test_every_setting_the_manual_names_exists() -> None:
    """A renamed or misspelt setting in the manual (`N8N_TIMEOUT` for `N8N_READ_TIMEOUT`) is set by readers and
    silently ignored by the service (unknown environment variables are no error)."""
    known = defined_names()
    unknown = {
        f"{path.name}: {name}"
        for path in MANUAL
        for span in backticked(path.read_text())
        for name in SETTING_LIKE.findall(span)
        if name not in known
    }
    assert not unknown, sorted(unknown)


def test_env_example_sets_only_settings() -> None:
    """The other direction of tests/test_config.py's check: a line of .env.example naming no setting (a stale name)
    would be copied into .env and do nothing."""
    text = (ROOT / ".env.example").read_text()
    named = re.findall(r"^#? ?([A-Z][A-Z0-9_]*)=", text, re.M)
    assert named
    assert not sorted(set(named) - set(Settings.model_fields))


def _segments(path: str) -> list[str]:
    """A path's segments, every `{id}`, `{agent id}` or `<agent id>` placeholder the same."""
    path = re.sub(r"\{[^}]*\}|<[^>]*>", "{}", path)
    return [segment for segment in path.strip("/").split("/") if segment]


def _starts(documented: list[str], route: list[str], *, whole: bool) -> bool:
    if len(documented) > len(route) or (whole and len(documented) != len(route)):
        return False
    return all(d == r or (d == "{}" and r.startswith("{")) for d, r in zip(documented, route, strict=False))


def schema_routes(tmp_path: Path) -> list[tuple[str, list[str]]]:
    """(method, segments) of every operation of the OpenAPI document: an app that never touches a database."""
    app = create_app(make_settings("postgresql+asyncpg://postgres@127.0.0.1:5432/unused", tmp_path))
    return [(method.upper(), _segments(path)) for path, ops in app.openapi()["paths"].items() for method in ops]


def test_every_route_the_manual_names_exists(tmp_path: Path) -> None:
    """`METHOD /path` in the manual is an operation of the service with that method; `…` ends a path's prefix
    (`/api/chats/{id}/files…`); a path in backticks without a method is (the start of) a route's path."""
    routes = schema_routes(tmp_path)
    missing: set[str] = set()
    for path in MANUAL:
        text = path.read_text()
        for methods, route in ROUTE.findall(text):
            prefix = route.endswith("…")
            segments = _segments(route.rstrip("…").split("?")[0])
            for method in methods.split("/"):
                if not any(m == method and _starts(segments, r, whole=not prefix) for m, r in routes):
                    missing.add(f"{path.name}: {method} {route}")
        for span in backticked(text):
            match = BARE_PATH.match(f"`{span}")
            if match and not any(_starts(_segments(match[1].rstrip("…*")), r, whole=False) for _, r in routes):
                missing.add(f"{path.name}: {span}")
    assert not missing, sorted(missing)


def github_anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives a page's headings: lower case, punctuation dropped, spaces as `-`, `-1` on repeats."""
    anchors: set[str] = set()
    seen: dict[str, int] = {}
    prose = re.sub(r"^```.*?^```", "", markdown, flags=re.M | re.S)
    for heading in re.findall(r"^#{1,6} (.+)$", prose, re.M):
        anchor = re.sub(r"[^\w\- ]", "", heading.replace("`", "").strip().lower()).replace(" ", "-")
        anchors.add(f"{anchor}-{seen[anchor]}" if anchor in seen else anchor)
        seen[anchor] = seen.get(anchor, 0) + 1
    return anchors


def test_the_manuals_links_reach_a_file_and_heading() -> None:
    broken: list[str] = []
    for page in MANUAL:
        prose = re.sub(r"`[^`\n]*`", "", re.sub(r"^```.*?^```", "", page.read_text(), flags=re.M | re.S))
        for target in re.findall(r"\]\(([^)\s]+)\)", prose):
            if re.match(r"[a-z]+:", target):
                continue  # https:, mailto:
            file, _, anchor = target.partition("#")
            linked = (page.parent / file).resolve() if file else page
            if not linked.exists():
                broken.append(f"{page.name}: {target}")
            elif anchor and linked.suffix == ".md" and anchor not in github_anchors(linked.read_text()):
                broken.append(f"{page.name}: {target}")
    assert not broken


def test_readme_starts_with_make_run_and_make_test() -> None:
    first_block = (ROOT / "README.md").read_text().split("```", 2)[1]
    assert [line.split()[:2] for line in first_block.strip().splitlines()] == [["make", "run"], ["make", "test"]]


# --- the settings' defaults, ranges and choices in .env.example (the settings' reference) --------------

#: Settings whose line in .env.example is not their built-in default, and what their comment says instead.
EXAMPLE_OVERRIDES = {"WEBHOOK_ALLOW_PRIVATE_NETWORKS": "Built-in default: false"}


def env_example() -> dict[str, tuple[str, str, bool]]:
    """Each setting of .env.example: (its value, the comment lines above it or above the run of settings it is
    in, whether the line itself is commented out as an example)."""
    entries: dict[str, tuple[str, str, bool]] = {}
    comment: list[str] = []
    previous_was_setting = False
    for line in (ROOT / ".env.example").read_text().splitlines():
        setting = re.match(r"^(#? ?)([A-Z][A-Z0-9_]*)=(.*)$", line)
        if setting:
            entries[setting[2]] = (setting[3], "\n".join(comment), bool(setting[1]))
            previous_was_setting = True
        elif line.startswith("#"):
            comment = [*([] if previous_was_setting else comment), line.lstrip("# ")]
            previous_was_setting = False
        else:
            comment, previous_was_setting = [], False
    return entries


def default_text(name: str) -> str:
    default = Settings.model_fields[name].default
    if isinstance(default, bool):
        return str(default).lower()
    if isinstance(default, list):
        return ",".join(default)
    if isinstance(default, float) and default.is_integer():
        return str(int(default))
    if isinstance(default, Path):
        return f"./{default}"
    return "" if default is None else str(default)


def range_text(name: str) -> str | None:
    """The range of a bounded setting as .env.example states it: `(1-1000)`, `(>= 1024)`, `(> 0)`."""
    bounds = {
        kind: getattr(item, kind)
        for item in Settings.model_fields[name].metadata
        for kind in ("ge", "gt", "le")
        if hasattr(item, kind)
    }
    plain = {kind: int(value) if float(value).is_integer() else value for kind, value in bounds.items()}
    if "ge" in plain and "le" in plain:
        return f"{plain['ge']}-{plain['le']}"
    if "ge" in plain:
        return f">= {plain['ge']}"
    if "gt" in plain:
        return f"> {plain['gt']}"
    return None


def test_env_example_gives_every_settings_default() -> None:
    """.env.example is the settings' reference (the README says so): each line holds the built-in default, so a
    default changed in app/config.py and not there is caught."""
    entries = env_example()
    wrong = []
    for name in Settings.model_fields:
        value, comment, example = entries[name]
        if name in EXAMPLE_OVERRIDES:
            if EXAMPLE_OVERRIDES[name] not in comment or EXAMPLE_OVERRIDES[name].split(": ")[1] != default_text(name):
                wrong.append(f"{name}: the comment must say {EXAMPLE_OVERRIDES[name]!r}, the real default")
        elif example:  # `# PUBLIC_BASE_URL=https://...`: an example of a setting that is unset by default
            if default_text(name):
                wrong.append(f"{name}: commented out, but its default is {default_text(name)!r}")
        elif value != default_text(name):
            wrong.append(f"{name}={value}, default {default_text(name)!r}")
    assert not wrong, wrong


def test_env_example_gives_every_settings_range_and_choices() -> None:
    """A bounded setting's comment states its range as the service checks it, and a setting with a fixed set
    of values lists them (`strict | lax | none`): an operator learns the limits before start-up refuses them."""
    entries = env_example()
    missing = []
    for name, field in Settings.model_fields.items():
        comment = entries[name][1]
        bound = range_text(name)
        if bound and not re.search(rf"\({re.escape(bound)}(?![\d.])", comment):
            missing.append(f"{name}: ({bound})")
        choices = getattr(field.annotation, "__args__", ()) if "Literal" in str(field.annotation) else ()
        if choices and " | ".join(choices) not in comment:
            missing.append(f"{name}: {' | '.join(choices)}")
    assert not missing, missing


def test_operations_lists_every_setting_with_its_built_in_default() -> None:
    """docs/OPERATIONS.md's Settings table has one row per setting of app/config.py, with its built-in default (not
    the value `make run` or .env.example picks): a setting added, renamed or given a new default shows up here."""
    section = (ROOT / "docs" / "OPERATIONS.md").read_text().split("\n## Settings\n", 1)
    assert len(section) == 2, "docs/OPERATIONS.md has no ## Settings section"
    rows = dict(re.findall(r"^\| `([A-Z][A-Z0-9_]+)` \| (`[^`]*`|unset) \|", section[1].split("\n## ", 1)[0], re.M))
    wrong = sorted(set(Settings.model_fields) ^ set(rows))
    wrong += [
        f"{name}: {rows[name]}, default {default_text(name)!r}"
        for name in sorted(set(Settings.model_fields) & set(rows))
        if ("" if rows[name] == "unset" else rows[name][1:-1]) != default_text(name) or rows[name] == "``"
    ]
    assert not wrong, wrong


#: `STREAM_WRITE_TIMEOUT` (60 s), `FILE_MAX_BYTES` (default 10 MiB), `AGENT_TEST_TIMEOUT`, 15 s, a table's
#: | `N8N_READ_TIMEOUT` | 120 s |: a default stated beside the setting's name.
PROSE_DEFAULT = re.compile(
    r"`([A-Z][A-Z0-9_]+)`(?:,| \(| \| )\s*(?:default\s+)?(\d{1,3}(?:,\d{3})+|\d+(?:\.\d+)?)"
    r"(?:\s?(KiB|MiB|MB|million|px|s|seconds?|minutes?|hours?|days?)\b)?(?=[);,:]|\s)"
)
UNITS = {"KiB": 1024, "MiB": 1024 * 1024, "MB": 1_000_000, "million": 1_000_000, "px": 1, "s": 1}
SECONDS = {"second": 1, "minute": 60, "hour": 3600, "day": 86400}


def stated_default(name: str, number: str, unit: str) -> float:
    """A default as the manual states it, in the setting's own unit (the one its name ends with, else seconds or
    bytes): `(10 minutes)` of CALLBACK_SILENCE_TIMEOUT is 600."""
    value = float(number.replace(",", ""))
    if unit.rstrip("s") in SECONDS:
        own = next((SECONDS[u] for u in SECONDS if name.endswith(f"_{u.upper()}S")), 1)
        return value * SECONDS[unit.rstrip("s")] / own
    return value * UNITS.get(unit, 1)


def numeric_values() -> dict[str, float]:
    """Every setting's numeric default, and every constant of app/ set to a plain number in one place only
    (`STORAGE_POLL = 0.5`)."""
    found: dict[str, set[float]] = {}
    for path in (ROOT / "app").rglob("*.py"):
        assignments = re.findall(
            r"^([A-Z][A-Z0-9_]+)(?:: [^=\n]+)? = (\d[\d_]*(?:\.\d+)?)\s*(?:#.*)?$", path.read_text(), re.M
        )
        for name, value in assignments:
            found.setdefault(name, set()).add(float(value.replace("_", "")))
    values = {name: next(iter(numbers)) for name, numbers in found.items() if len(numbers) == 1}
    for name, field in Settings.model_fields.items():
        if isinstance(field.default, int | float) and not isinstance(field.default, bool):
            values[name] = float(field.default)
    return values


def test_the_manuals_stated_defaults_are_the_settings() -> None:
    """A default the prose states beside a setting's name is its default in app/config.py (and a size in MB is
    a size in MB, not MiB); so is a value stated beside a constant of the code (`STORAGE_POLL` (0.5 s))."""
    values = numeric_values()
    wrong = set()
    for page in MANUAL:
        for name, number, unit in PROSE_DEFAULT.findall(page.read_text()):
            if name in values and stated_default(name, number, unit) != values[name]:
                wrong.add(f"{page.name}: {name} ({number} {unit}), in the code {values[name]:g}")
        for name, limit in re.findall(r"^\| `(RATE_LIMIT_\w+)`.* \| (\d+/\w+) \|$", page.read_text(), re.M):
            if Settings.model_fields[name].default != limit:
                wrong.add(f"{page.name}: {name} {limit}, default {Settings.model_fields[name].default}")
    assert not wrong, sorted(wrong)


# --- every route, make target and command is in the manual, and the manual names no other --------------


def test_every_route_is_in_the_api_reference(tmp_path: Path) -> None:
    """The other direction of test_every_route_the_manual_names_exists: each operation of the OpenAPI document
    has its row (`METHOD /path`) in docs/API_REFERENCE.md, so a new route cannot ship undocumented."""
    text = (ROOT / "docs" / "API_REFERENCE.md").read_text()
    documented = [
        (method, _segments(route.split("?")[0]))
        for methods, route in ROUTE.findall(text)
        if not route.endswith("…")
        for method in methods.split("/")
    ]
    missing = [
        f"{method} /{'/'.join(route)}"
        for method, route in schema_routes(tmp_path)
        if not any(m == method and _starts(d, route, whole=True) for m, d in documented)
    ]
    assert not missing, missing


def make_targets() -> set[str]:
    return set(re.findall(r"^([a-z][\w-]*):(?!=)", (ROOT / "Makefile").read_text(), re.M))


#: A make command: `make bench-quick`, `TEST_WORKERS=1 make test`, a line of a code block.
MAKE_COMMAND = re.compile(r"^\s*(?:[A-Z_]+=\S* )*make ([a-z][\w-]*)", re.M)


def test_every_make_target_the_manual_names_exists_and_the_readme_lists_each() -> None:
    """`make X` in the manual (a code span or a line of a code block) is a target of the Makefile, and each target
    of the Makefile is named in the README."""
    targets = make_targets()
    assert {"run", "test", "lint"} <= targets
    unknown = set()
    for page in MANUAL:
        text = page.read_text()
        blocks = re.findall(r"^```.*?^```", text, re.M | re.S)
        for code in [*backticked(text), *blocks]:
            unknown |= {f"{page.name}: make {target}" for target in MAKE_COMMAND.findall(code) if target not in targets}
    assert not unknown, sorted(unknown)
    readme = (ROOT / "README.md").read_text()
    unlisted = sorted(target for target in targets if f"`make {target}" not in readme)
    assert not unlisted, unlisted


def cli_commands() -> dict[str, set[str]]:
    """Each subcommand of `python -m app.cli` with its options."""
    parser = build_parser()
    sub = next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction))
    return {
        name: {option for action in command._actions for option in action.option_strings}
        for name, command in sub.choices.items()
    }


def test_every_cli_command_the_manual_names_exists_and_the_readme_lists_each() -> None:
    """`app.cli NAME --option` in the manual is a subcommand with that option, and each subcommand has its row
    in the README's command table (`.venv/bin/python -m app.cli NAME`)."""
    commands = cli_commands()
    assert {"serve", "migrate", "init"} <= set(commands)
    wrong = set()
    for page in MANUAL:
        for name, rest in re.findall(r"app\.cli ([a-z][a-z-]*)((?: \[?--?[a-z][^`|)\n]*)?)", page.read_text()):
            if name not in commands:
                wrong.add(f"{page.name}: app.cli {name}")
                continue
            wrong |= {
                f"{page.name}: app.cli {name} {opt}"
                for opt in re.findall(r"--[a-z][\w-]*", rest)
                if opt not in commands[name]
            }
    assert not wrong, sorted(wrong)
    readme = (ROOT / "README.md").read_text()
    unlisted = sorted(name for name in commands if f"`.venv/bin/python -m app.cli {name}" not in readme)
    assert not unlisted, unlisted


#: The objects of docs/API_REFERENCE.md (its `### Name` headings): the schema whose keys each lists, and the keys
#: documented elsewhere (a Chat is a ChatSummary plus its own table).
OBJECT_SCHEMAS = {
    "Team": ("TeamRead", set()),
    "User": ("UserRead", set()),
    "Agent": ("AgentAdminRead", set()),
    "ChatSummary": ("ChatSummary", set()),
    "Chat": (
        "ChatRead",
        {"id", "agent_id", "title", "archived", "pinned", "message_count", "created_at", "updated_at"},
    ),
    "Message": ("MessageRead", set()),
    "File": ("FileRead", set()),
    "ErrorLog": ("ErrorLogRead", set()),
    "Invite": ("InviteCreatedRead", set()),
    "The connection test": ("AgentTestResult", set()),
}


def documented_keys(section: str) -> set[str]:
    """The keys of a section's key tables (`| key | type | notes |`): the first column's names (`id`, `team_id`)."""
    tables = re.findall(r"^\| key \|.*\n((?:\|.*\n)+)", section, re.M)
    rows = [row for table in tables for row in re.findall(r"^\| ((?:`\w+`(?:, )?)+) \|", table, re.M)]
    return {key for row in rows for key in re.findall(r"`(\w+)`", row)}


def test_every_object_lists_the_keys_of_its_schema(tmp_path: Path) -> None:
    """An object's table in docs/API_REFERENCE.md names exactly the keys the service returns: a key added to or
    dropped from a response schema shows up here."""
    app = create_app(make_settings("postgresql+asyncpg://postgres@127.0.0.1:5432/unused", tmp_path))
    schemas = app.openapi()["components"]["schemas"]
    text = (ROOT / "docs" / "API_REFERENCE.md").read_text()
    wrong = []
    for heading, (schema, elsewhere) in OBJECT_SCHEMAS.items():
        section = re.search(rf"^### {re.escape(heading)}\n(.*?)(?=^#)", text, re.M | re.S)
        assert section, heading
        expected = set(schemas[schema]["properties"]) - elsewhere
        documented = documented_keys(section[1])
        if documented != expected:
            wrong.append(
                f"{heading}: missing {sorted(expected - documented)}, not returned {sorted(documented - expected)}"
            )
    assert not wrong, wrong


def cells(row: str) -> int:
    """The cells of a Markdown table row; a `|` escaped or inside a code span is text."""
    return re.sub(r"``.*?``|`[^`]*`", "", row.replace("\\|", "")).count("|") - 1


def test_the_manuals_tables_are_whole() -> None:
    """Each table has its header, a delimiter row of as many cells, and rows of as many cells, one after the
    other: a row left after a paragraph, or a delimiter with a cell too many, renders as plain text."""
    broken = []
    for page in MANUAL:
        text = re.sub(r"^```.*?^```", lambda block: "\n" * block[0].count("\n"), page.read_text(), flags=re.M | re.S)
        lines = text.splitlines()
        start = 0
        while start < len(lines):
            if not lines[start].startswith("|"):
                start += 1
                continue
            end = start
            while end < len(lines) and lines[end].startswith("|"):
                end += 1
            table = lines[start:end]
            if len(table) < 2 or not re.fullmatch(r"\|(?:\s*:?-+:?\s*\|)+\s*", table[1]):
                broken.append(f"{page.name}:{start + 1}: no header and delimiter row")
            else:
                broken += [
                    f"{page.name}:{start + number + 1}: {cells(row)} cells, the header has {cells(table[0])}"
                    for number, row in enumerate(table)
                    if cells(row) != cells(table[0])
                ]
            start = end
    assert not broken, broken


def test_every_repository_path_the_manual_names_exists() -> None:
    """`app/services/retention.py`, `tools/fake_n8n.py`, `recordings/n8n/`: a module moved or renamed leaves no
    stale path in the manual (README's layout table included). A pattern (`profile-*`, `<rev>`, `YYYY`) is no
    path; `app/services/blobs.collect_blobs` names a function of that module."""
    missing = set()
    for page in MANUAL:
        for span in backticked(page.read_text()):
            for path in re.findall(
                r"(?<![\w/.-])((?:app|tools|tests|bench|migrations|docs|recordings|\.ci)/[\w./-]*)", span
            ):
                path = path.rstrip(".,:")
                if re.search(r"[*<]|YYYY", span) and not (ROOT / path).exists():
                    continue
                module = re.fullmatch(r"(.+)\.\w+", path)
                if not (ROOT / path).exists() and not (module and (ROOT / f"{module[1]}.py").exists()):
                    missing.add(f"{page.name}: {path}")
    assert not missing, sorted(missing)


def code_strings() -> list[str]:
    """Every string literal of app/, an f-string's fields as `{}` (adjacent literals are one string)."""
    strings = []
    for path in (ROOT / "app").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.JoinedStr):
                strings.append(
                    "".join(part.value if isinstance(part, ast.Constant) else "{}" for part in node.values)  # type: ignore[misc]
                )
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                strings.append(node.value)
    return strings


def said_by_the_code(text: str, corpus: str, templates: list[re.Pattern[str]]) -> bool:
    """A documented error text is one of the code's: `N`, `n` and `…` stand for what the code fills in, and a
    field of the code's (`{limit}`, `{}`) for the documented example (`.html`, `line`, `32000`). `corpus` holds
    the code's strings, each between NULs (a text is a whole string); `templates`, those with fields as patterns."""
    documented = re.escape(text).replace("…", "[^\x00]*")
    documented = re.sub(r"\\?\b[Nn]\b", "[^\x00]+", documented)
    return bool(re.search(f"\x00{documented}\x00", corpus)) or any(template.fullmatch(text) for template in templates)


def test_the_error_tables_quote_the_codes_texts() -> None:
    """The error texts of docs/API_REFERENCE.md's error tables (`| status | detail | when |`, the stream's
    `| code | message shown | cause |`) are texts the code gives, so a reworded error cannot leave a stale one."""
    strings = code_strings()
    corpus = "\x00" + "\x00".join(strings) + "\x00"
    #: Strings with fields, as patterns; only those with some words of their own (not `{}: {}`).
    templates = [
        re.compile(re.sub(r"\\\{[^}]*\\\}", ".+", re.escape(string)))
        for string in set(strings)
        if "{" in string and len(re.sub(r"\{[^}]*\}", "", string)) >= 20
    ]
    text = (ROOT / "docs" / "API_REFERENCE.md").read_text()
    tables = re.findall(r"^\| (?:status \| detail|code \| message shown) \|.*\n\|[-|]+\n((?:\|.*\n)+)", text, re.M)
    assert len(tables) >= 3
    stale = []
    for table in tables:
        for row in table.splitlines():
            second = re.split(r"(?<!\\)\|", row)[2]
            texts = re.findall(r"``(.+?)``|`([^`]+)`", second)
            stale += [
                quoted
                for pair in texts
                for quoted in pair
                if quoted and quoted[0] not in "[{" and not said_by_the_code(quoted.strip(), corpus, templates)
            ]
    assert not stale, stale


def test_the_readme_indexes_every_page_of_docs() -> None:
    """Each page of docs/ has its row in the README's Documentation table: a new page is found from the README."""
    readme = (ROOT / "README.md").read_text()
    index = readme.split("## Documentation", 1)[1].split("\n## ", 1)[0]
    linked = set(re.findall(r"^\| \[[^]]*\]\(docs/([\w.-]+\.md)\)", index, re.M))
    assert linked == {page.name for page in (ROOT / "docs").glob("*.md")}


def test_the_streaming_scripts_help_names_every_knob_it_reads() -> None:
    """`bash test_streaming.sh --help` prints its header: every environment variable the script reads with a
    default (`${CI_DATABASE_URL:-...}`) is named there, so `--help` alone tells how to point `--ci` elsewhere."""
    script = ROOT / "test_streaming.sh"
    own = {"STREAM_HEADERS", "WORK", "SERVER"}  # set by the script itself
    read = set(re.findall(r"\$\{([A-Z][A-Z0-9_]*):-", script.read_text())) - own
    assert {"CI_DATABASE_URL", "PYTHON", "CURL_MAX"} <= read
    shown = subprocess.run(["bash", str(script), "--help"], capture_output=True, text=True, check=True).stdout
    assert not sorted(name for name in read if name not in shown)
