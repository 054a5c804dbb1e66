# The two commands that matter: `make run` and `make test`. Everything installs into .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 8000
WORKERS ?= 1
FAKE_N8N_PORT ?= 5678
# Test files run in parallel on this many processes (pytest-xdist; each has its own database and Redis db). Three
# on two cores: many tests wait on live servers, timers and PostgreSQL, which left a core a quarter idle with two.
TEST_WORKERS ?= 3
# The browser tests' processes (each drives a Chromium).
BROWSER_WORKERS ?= 2
# Schemathesis reports each API operation as an item of the same test id, which pytest-xdist counts (and
# schedules) as one: its file runs on its own, without xdist, so every operation is run and reported.
SCHEMA_TESTS := tests/test_openapi.py
# The browser tests run in a phase of their own: two Chromiums beside the timing-sensitive stream tests made
# those late on a 2-core machine. The schema tests run beside them (a core was idle a quarter of the browser
# phase and half of the schema one's); their report follows the browser tests'.
BROWSER_TESTS := $(wildcard tests/test_web_*.py)
# Runs Python with Ctrl-C's default again: the shell starts a background command with SIGINT ignored, so the
# schema tests (beside the browser tests) would never see a Ctrl-C, and a kill skips their teardown (their
# database stays behind). With it, a Ctrl-C stops them as it stops the browser tests: `make test` waits for
# their teardown. (The PID is cleared once reaped, so no trap signals a process that reused it.)
INTERRUPTIBLE := -c 'import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); os.execv(sys.executable, [sys.executable, *sys.argv[1:]])'

# Local plain-http development defaults for `make run` only (the environment still wins).
run: export COOKIE_SECURE ?= false
run: export WEBHOOK_ALLOW_PRIVATE_NETWORKS ?= true
# n8n posts progress callbacks to this address (docs/CALLBACKS.md); without it there are no callbacks.
run: export PUBLIC_BASE_URL ?= http://$(HOST):$(PORT)

# The browser tests (tests/test_web_*.py) drive Debian's Chromium through Playwright (no browser download).
CHROMIUM ?= /usr/bin/chromium

.PHONY: run test fake-n8n lint fmt schema install install-dev bench bench-quick bench-history bench-usage bench-finish clean chromium vendor screenshots

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(VENV)/.runtime: requirements.txt | $(PY)
	$(PY) -m pip install -q -r requirements.txt
	touch $@

$(VENV)/.dev: requirements.txt requirements-dev.txt | $(PY)
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@ $(VENV)/.runtime

install: $(VENV)/.runtime
install-dev: $(VENV)/.dev

run: $(VENV)/.runtime
	@echo "Serving on http://$(HOST):$(PORT)  (docs: /docs). COOKIE_SECURE=$(COOKIE_SECURE): plain-http cookies for local development."
	$(PY) -m app.cli init
	$(PY) -m app.cli serve --host $(HOST) --port $(PORT) --workers $(WORKERS)

# Every test has a time limit (pytest-timeout, pyproject.toml), so a failure cannot hang the run.
test: $(VENV)/.dev chromium
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --ignore=$(SCHEMA_TESTS) $(addprefix --ignore=,$(BROWSER_TESTS))
	@log=$$(mktemp); trap 'rm -f $$log' EXIT; trap 'wait $$schema; exit 130' INT; trap 'kill $$schema 2>/dev/null; exit 143' TERM; \
	echo "$(PY) -m pytest $(SCHEMA_TESTS)  (beside the browser tests; its report follows theirs)"; \
	$(PY) $(INTERRUPTIBLE) -m pytest $(SCHEMA_TESTS) >$$log 2>&1 & schema=$$!; \
	echo "$(PY) -m pytest -n $(BROWSER_WORKERS) --dist loadfile $(BROWSER_TESTS)"; \
	$(PY) -m pytest -n $(BROWSER_WORKERS) --dist loadfile $(BROWSER_TESTS); browser=$$?; \
	wait $$schema; status=$$?; schema=; cat $$log; test $$browser = 0 && test $$status = 0
	PYTHON=$(CURDIR)/$(PY) bash test_streaming.sh --ci

# Installs Debian's chromium when it is missing (as root), else stops with the one command that does.
chromium:
	@test -x $(CHROMIUM) || { [ "$$(id -u)" = 0 ] && apt-get update -qq && apt-get install -y -qq chromium; } \
		|| { echo "Chromium is needed by the browser tests: sudo apt-get install -y chromium"; exit 1; }

# Re-vendor the browser client's pinned npm modules into app/web/vendor (needs npm; the result is committed).
vendor:
	bash tools/vendor_web.sh

# The PNGs of docs/screenshots (README), taken with the same Chromium against a throwaway server.
screenshots: $(VENV)/.dev chromium
	$(PY) -m bench.web_client screenshots

# A fake n8n replaying recordings/n8n, e.g. http://127.0.0.1:5678/webhook/agent-stream (tools/fake_n8n.py).
fake-n8n: $(VENV)/.runtime
	$(PY) -m tools.fake_n8n --host $(HOST) --port $(FAKE_N8N_PORT)

lint: $(VENV)/.dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

fmt: $(VENV)/.dev
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

schema: $(VENV)/.dev
	$(PY) -m tools.schema_sql

# Streaming benchmark (bench/README.md): PostgreSQL at 127.0.0.1:5432, loopback only; results in bench/results/.
bench: $(VENV)/.dev
	ulimit -n 65536 2>/dev/null || true; $(PY) -m bench.run $(if $(BEFORE),--before $(BEFORE))

bench-quick: $(VENV)/.dev
	ulimit -n 65536 2>/dev/null || true; $(PY) -m bench.run --quick $(if $(BEFORE),--before $(BEFORE))

# Send, open and list cost vs chat length (bench/bench_history.py), one worker, ~3 minutes.
bench-history: $(VENV)/.dev
	$(PY) -m bench.bench_history

# The usage reports on a million-row ledger (bench/bench_usage.py), its own throwaway database, ~3 minutes.
bench-usage: $(VENV)/.dev
	$(PY) -m bench.bench_usage

# The final write of an answer in-process (bench/bench_finish.py), its own throwaway database, ~30 seconds.
bench-finish: $(VENV)/.dev
	$(PY) -m bench.bench_finish

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
