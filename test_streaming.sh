#!/usr/bin/env bash
# Try the message stream end to end with curl.
#
#   ./test_streaming.sh          interactive: asks for the server, your email and password, lets you pick an
#                                agent and a chat, then prints the answer's tokens as they arrive.
#   ./test_streaming.sh --ci     scripted: starts the fake n8n and the app (temporary SQLite database, free
#                                ports), signs up a team, creates agents and a chat, streams answers and checks
#                                the events and the stored messages. Exits non-zero on the first mismatch.
#
# Needs bash, curl and python3 (jq is used when present; NO_JQ=1 forces python). API: /docs of the server.
# --ci knobs: CI_DATABASE_URL (default: a temporary SQLite file), APP_FACTORY (default main:create_app),
# PYTHON (default .venv/bin/python), CURL_MAX (seconds per request, default 60).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
[[ -x "$PY" ]] || PY="$(command -v python3)"
CURL_MAX="${CURL_MAX:-60}"
TOKEN=""
PIDS=()

# --- helpers -------------------------------------------------------------------------------------

die() { echo "FAIL: $*" >&2; exit 1; }
ok() { echo "ok   $*"; }

# json PATH: read JSON on stdin, print the value at a jq-style path (.a.b[0].c); objects/arrays as JSON.
json() {
  if [[ -z "${NO_JQ:-}" ]] && command -v jq >/dev/null 2>&1; then
    jq -r "$1 | if type == \"object\" or type == \"array\" then tojson else . end // empty"
  else
    "$PY" -c '
import json, re, sys
value = json.load(sys.stdin)
for key, index in re.findall(r"\.([A-Za-z_][A-Za-z0-9_]*)|\[(\d+)\]", sys.argv[1]):
    if value is None:
        break
    value = value.get(key) if key else (value[int(index)] if int(index) < len(value) else None)
if value is None:
    sys.exit(0)
print(json.dumps(value) if isinstance(value, (dict, list)) else ("true" if value is True else "false" if value is False else value))
' "$1"
  fi
}

# api METHOD PATH [BODY]: JSON request; sets BODY (the answer) and STATUS (the HTTP code).
api() {
  local method="$1" path="$2" body="${3:-}" out
  local args=(-sS --max-time "$CURL_MAX" -X "$method" -H "Accept: application/json" -w '\n%{http_code}')
  [[ -n "$TOKEN" ]] && args+=(-H "Authorization: Bearer $TOKEN")
  [[ -n "$body" ]] && args+=(-H "Content-Type: application/json" --data-binary "$body")
  out="$(curl "${args[@]}" "$SERVER$path")" || die "$method $path: curl failed"
  STATUS="${out##*$'\n'}"
  BODY="${out%$'\n'*}"
}

# stream CHAT_ID CONTENT: POST the message, print the raw SSE body (curl -N: no buffering).
stream() {
  local body
  body="$(CONTENT="$2" "$PY" -c 'import json, os; print(json.dumps({"content": os.environ["CONTENT"]}))')"
  curl -sS -N --max-time "$CURL_MAX" -X POST -H "Authorization: Bearer $TOKEN" -H "Content-Type: application/json" \
    -H "Accept: text/event-stream" -D "${STREAM_HEADERS:-/dev/null}" --data-binary "$body" "$SERVER/api/chats/$1/messages"
}

# stream_head: "STATUS MEDIA-TYPE" of the last stream's answer (--ci keeps its headers in $STREAM_HEADERS).
stream_head() {
  tr -d '\r' <"$STREAM_HEADERS" | awk 'NR == 1 { code = $2 } tolower($1) == "content-type:" { split($2, t, ";"); type = t[1] }
    END { print code, type }'
}

# sse_check TYPES TEXT [CODE MESSAGE] < sse: assert the stream exactly and print a summary.
# TYPES is the expected sequence of event types with consecutive `message` events counted once
# ("start status message done"); TEXT the concatenated message chunks; a `done` stream must store TEXT with
# status complete, an `error` stream must end with exactly CODE and MESSAGE. Ids must run 1..n.
sse_check() {
  "$PY" -c '
import json, sys
types_wanted = sys.argv[1].split()
text_wanted = sys.argv[2]
code_wanted = sys.argv[3] if len(sys.argv) > 3 else None
message_wanted = sys.argv[4] if len(sys.argv) > 4 else None
events, ids = [], []
for block in sys.stdin.read().split("\n\n"):
    data = [l[5:].lstrip(" ") for l in block.split("\n") if l.startswith("data:")]
    if not data:
        continue
    ids += [l[3:].strip() for l in block.split("\n") if l.startswith("id:")]
    events.append(json.loads("\n".join(data)))
types = [e["type"] for e in events]
collapsed = [t for i, t in enumerate(types) if not (t == "message" and i and types[i - 1] == "message")]
problems = []
if ids != [str(i) for i in range(1, len(events) + 1)]:
    problems.append(f"ids {ids}")
if collapsed != types_wanted:
    problems.append(f"event types {collapsed}, wanted {types_wanted}")
text = "".join(e["data"]["content"] for e in events if e["type"] == "message")
if text != text_wanted:
    problems.append(f"text {text!r}, wanted {text_wanted!r}")
last = events[-1]["data"] if events else {}
if types_wanted[-1] == "done":
    stored = last.get("message") or {}
    got = (stored.get("status"), stored.get("content"))
    if got != ("complete", text_wanted):
        problems.append(f"done event stores {got}")
else:
    got = (last.get("code"), last.get("message"))
    if got != (code_wanted, message_wanted):
        problems.append(f"error {got}, wanted {(code_wanted, message_wanted)}")
if problems:
    print("; ".join(problems))
    sys.exit(1)
print(json.dumps({"events": len(events), "text": text, "terminal": last.get("code") or "done"}))
' "$@"
}

# count PATH: the length of the JSON array at PATH on stdin.
count() {
  json "$1" | "$PY" -c 'import json, sys; print(len(json.load(sys.stdin)))'
}

# expect WHAT ACTUAL WANTED: die unless the two strings are equal.
expect() {
  [[ "$2" == "$3" ]] || die "$1: got '$2', wanted '$3'"
}

# --- interactive mode ----------------------------------------------------------------------------

print_tokens() {
  # Print message chunks as they arrive; report the terminal event.
  "$PY" -u -c '
import json, sys
for line in sys.stdin:
    if not line.startswith("data:"):
        continue
    event = json.loads(line[5:])
    kind, data = event["type"], event["data"]
    if kind == "message":
        sys.stdout.write(data["content"]); sys.stdout.flush()
    elif kind == "status":
        sys.stderr.write("[" + data.get("description", "") + "]\n")
    elif kind == "done":
        print("\n[done: %s]" % data["message"]["status"])
    elif kind == "error":
        print("\n[error %s: %s]" % (data["code"], data["message"]))
'
}

interactive() {
  read -r -p "Server [http://127.0.0.1:8000]: " SERVER
  SERVER="${SERVER:-http://127.0.0.1:8000}"
  read -r -p "Email: " email
  read -r -s -p "Password: " password; echo
  read -r -p "Team id (empty if your email is in one team only): " team
  local body
  body="$(E="$email" P="$password" T="$team" "$PY" -c '
import json, os
body = {"email": os.environ["E"], "password": os.environ["P"]}
if os.environ["T"]:
    body["team_id"] = os.environ["T"]
print(json.dumps(body))')"
  local login
  api POST /api/auth/login "$body"
  login="$BODY"
  [[ "$STATUS" == 200 ]] || die "login: HTTP $STATUS $login"
  TOKEN="$(json .access_token <<<"$login")"

  local agents
  api GET /api/agents
  agents="$BODY"
  [[ "$STATUS" == 200 ]] || die "agents: HTTP $STATUS"
  "$PY" -c '
import json, sys
for i, agent in enumerate(json.load(sys.stdin), 1):
    print("  %d) %s  (%s)" % (i, agent["name"], agent["id"]))' <<<"$agents"
  read -r -p "Agent number: " n
  local agent_id
  agent_id="$(json ".[$((n - 1))].id" <<<"$agents")"
  [[ -n "$agent_id" ]] || die "no such agent"

  local chats
  api GET "/api/chats?limit=20"
  chats="$BODY"
  AGENT="$agent_id" "$PY" -c '
import json, os, sys
for i, c in enumerate([c for c in json.load(sys.stdin) if c["agent_id"] == os.environ["AGENT"]], 1):
    print("  %d) %s  (%s)" % (i, c.get("title") or "(untitled)", c["id"]))' <<<"$chats"
  read -r -p "Chat number (empty = new chat): " n
  local chat_id=""
  if [[ -n "$n" ]]; then
    chat_id="$(AGENT="$agent_id" N="$n" "$PY" -c '
import json, os, sys
mine = [c for c in json.load(sys.stdin) if c["agent_id"] == os.environ["AGENT"]]
print(mine[int(os.environ["N"]) - 1]["id"])' <<<"$chats")"
  else
    api POST /api/chats "{\"agent_id\": \"$agent_id\"}"
    chat_id="$(json .id <<<"$BODY")"
  fi
  echo "Chat $chat_id. Type a message (empty line to quit)."
  while read -r -p "> " message && [[ -n "$message" ]]; do
    stream "$chat_id" "$message" | print_tokens
  done
}

# --- CI mode -------------------------------------------------------------------------------------

cleanup() {
  local pid
  for pid in "${PIDS[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
  for pid in "${PIDS[@]}"; do
    wait "$pid" 2>/dev/null || true
  done
  [[ -n "${WORK:-}" && -d "$WORK" ]] && rm -rf "$WORK"
}

free_port() { "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# wait_http URL PID LOG: wait until URL answers; fail at once, with the log, when PID exits first.
wait_http() {
  local url="$1" pid="$2" log="$3" i
  for i in $(seq 1 200); do
    curl -s -o /dev/null --max-time 1 "$url" && return 0
    kill -0 "$pid" 2>/dev/null || die "$url: the process exited: $(tail -n 5 "$log")"
    sleep 0.1
  done
  die "$url did not come up: $(tail -n 5 "$log")"
}

ci() {
  WORK="$(mktemp -d)"
  trap cleanup EXIT INT TERM
  local fake_port app_port
  fake_port="$(free_port)"
  app_port="$(free_port)"
  FAKE="http://127.0.0.1:$fake_port"
  SERVER="http://127.0.0.1:$app_port"
  STREAM_HEADERS="$WORK/stream.headers"

  (cd "$ROOT" && exec "$PY" -m tools.fake_n8n --port "$fake_port" --speed 0 --linger 1) >"$WORK/fake.log" 2>&1 &
  local fake_pid=$!
  PIDS+=("$fake_pid")
  export APP_ENV=development DATA_DIR="$WORK/data" DATABASE_URL="${CI_DATABASE_URL:-sqlite+aiosqlite:///$WORK/ci.db}"
  export COOKIE_SECURE=false WEBHOOK_ALLOW_PRIVATE_NETWORKS=true RATE_LIMIT_ENABLED=false TEAM_SIGNUP_ENABLED=true
  export REDIS_URL="" LOG_LEVEL=WARNING N8N_READ_TIMEOUT=5 N8N_FIRST_BYTE_TIMEOUT=5
  (cd "$ROOT" && "$PY" -m app.cli migrate) >"$WORK/migrate.log" 2>&1 || die "migrations failed: $(cat "$WORK/migrate.log")"
  (cd "$ROOT" && exec "$PY" -m uvicorn --factory "${APP_FACTORY:-main:create_app}" --host 127.0.0.1 --port "$app_port" \
    --timeout-graceful-shutdown 5) >"$WORK/app.log" 2>&1 &
  local app_pid=$!
  PIDS+=("$app_pid")
  wait_http "$FAKE/__requests" "$fake_pid" "$WORK/fake.log"
  wait_http "$SERVER/health" "$app_pid" "$WORK/app.log"
  ok "fake n8n on $FAKE, app on $SERVER"

  local email="ci-$RANDOM$RANDOM@example.com" password="Ci-password-$RANDOM-long"
  local signup
  api POST /api/teams "{\"name\": \"CI team\", \"admin_email\": \"$email\", \"admin_password\": \"$password\"}"
  signup="$BODY"
  [[ "$STATUS" == 201 ]] || die "POST /api/teams: HTTP $STATUS $signup"
  local team_id
  team_id="$(json .team.id <<<"$signup")"
  [[ -n "$team_id" ]] || die "sign-up answered no team id: $signup"
  ok "team $team_id signed up"

  local login
  api POST /api/auth/login "{\"email\": \"$email\", \"password\": \"$password\"}"
  login="$BODY"
  [[ "$STATUS" == 200 ]] || die "POST /api/auth/login: HTTP $STATUS $login"
  TOKEN="$(json .access_token <<<"$login")"
  [[ -n "$TOKEN" ]] || die "login answered no access_token"
  ok "logged in"

  local agent agent_id
  api POST /api/agents "{\"name\": \"CI agent\", \"webhook_url\": \"$FAKE/webhook/agent-stream\", \
\"webhook_headers\": {\"X-CI-Secret\": \"ci-secret-value\"}, \"system_prompt\": \"be brief\", \"config\": {\"model\": \"gpt-4\"}}"
  agent="$BODY"
  [[ "$STATUS" == 201 ]] || die "POST /api/agents: HTTP $STATUS $agent"
  agent_id="$(json .id <<<"$agent")"
  [[ "$agent" != *ci-secret-value* ]] || die "the agent answer leaks its webhook header value"
  ok "agent $agent_id"

  local chat chat_id
  api POST /api/chats "{\"agent_id\": \"$agent_id\"}"
  chat="$BODY"
  [[ "$STATUS" == 201 ]] || die "POST /api/chats: HTTP $STATUS $chat"
  chat_id="$(json .id <<<"$chat")"
  ok "chat $chat_id"

  # 1. A streamed answer: events, stored message, what n8n received.
  local sse summary
  sse="$(stream "$chat_id" "hello there")" || die "stream 1: curl failed"
  expect "stream 1 answer" "$(stream_head)" "200 text/event-stream"
  summary="$(sse_check "start status message done" "Echo: hello there" <<<"$sse")" || die "stream 1: $summary"
  ok "stream 1 $summary"
  local stored
  api GET "/api/chats/$chat_id"
  stored="$BODY"
  [[ "$STATUS" == 200 ]] || die "GET /api/chats/$chat_id: HTTP $STATUS"
  expect "stored message count" "$(count .messages <<<"$stored")" 2
  expect "stored user message" "$(json .messages[0].content <<<"$stored")" "hello there"
  expect "stored answer" "$(json .messages[1].content <<<"$stored")" "Echo: hello there"
  expect "stored status" "$(json .messages[1].status <<<"$stored")" complete
  [[ "$stored" != *_worker* ]] || die "internal keys leak in GET /api/chats/{id}"
  local received
  received="$(curl -sS --max-time 5 "$FAKE/__requests")"
  expect "requests n8n received" "$(count . <<<"$received")" 1
  expect "n8n path" "$(json .[0].path <<<"$received")" /webhook/agent-stream
  expect "n8n chatInput" "$(json .[0].json.chatInput <<<"$received")" "hello there"
  expect "n8n sessionId" "$(json .[0].json.sessionId <<<"$received")" "$chat_id"
  [[ "$received" == *'"X-CI-Secret": "ci-secret-value"'* ]] || die "n8n did not get the agent header"
  ok "stored answer and n8n payload"

  # 2. A second message carries the history.
  sse="$(stream "$chat_id" "second question")" || die "stream 2: curl failed"
  expect "stream 2 answer" "$(stream_head)" "200 text/event-stream"
  summary="$(sse_check "start status message done" "Echo: second question" <<<"$sse")" || die "stream 2: $summary"
  received="$(curl -sS --max-time 5 "$FAKE/__requests")"
  expect "requests n8n received" "$(count . <<<"$received")" 2
  expect "history sent to n8n" "$(json .[1].json.messages[1].content <<<"$received")" "Echo: hello there"
  expect "n8n chatInput (2)" "$(json .[1].json.chatInput <<<"$received")" "second question"
  ok "stream 2 with history $summary"

  # 3. An in-band n8n error (the recorded stream_llm_error): one error event, stored with status error,
  # one error log row. A fake that had lost that recording would answer 400: another message, caught here.
  sse="$(stream "$chat_id" "__llm_error__")" || die "stream 3: curl failed"
  expect "stream 3 answer" "$(stream_head)" "200 text/event-stream"
  summary="$(sse_check "start status error" "" upstream_error "The agent reported an error" <<<"$sse")" \
    || die "stream 3: $summary"
  api GET "/api/chats/$chat_id"
  stored="$BODY"
  expect "GET /api/chats/$chat_id (3)" "$STATUS" 200
  expect "stored message count (3)" "$(count .messages <<<"$stored")" 6
  expect "stored error content" "$(json .messages[5].content <<<"$stored")" ""
  expect "stored error status" "$(json .messages[5].status <<<"$stored")" error
  local logs
  api GET "/api/error-logs"
  logs="$BODY"
  expect "GET /api/error-logs" "$STATUS" 200
  expect "error log rows" "$(count . <<<"$logs")" 1
  expect "error log code" "$(json .[0].code <<<"$logs")" upstream_error
  expect "error log message" "$(json .[0].message <<<"$logs")" "The agent reported an error"
  expect "error log upstream status" "$(json .[0].upstream_status <<<"$logs")" 200
  ok "in-band error $summary"

  # 4. Unknown webhook (the recorded 404 "not registered") through a second agent.
  api POST /api/agents "{\"name\": \"Missing\", \"webhook_url\": \"$FAKE/webhook/does-not-exist\"}"
  agent="$BODY"
  expect "POST /api/agents (2)" "$STATUS" 201
  api POST /api/chats "{\"agent_id\": \"$(json .id <<<"$agent")\"}"
  chat="$BODY"
  expect "POST /api/chats (2)" "$STATUS" 201
  sse="$(stream "$(json .id <<<"$chat")" "anyone there?")" || die "stream 4: curl failed"
  expect "stream 4 answer" "$(stream_head)" "200 text/event-stream"
  summary="$(sse_check "start status error" "" upstream_error \
    "The agent's n8n webhook is not registered (is the workflow active?)" <<<"$sse")" || die "stream 4: $summary"
  [[ "$sse" != *"hint"* ]] || die "n8n's raw 404 body reached the client"
  received="$(curl -sS --max-time 5 "$FAKE/__requests")"
  expect "path of the 4th n8n request" "$(json .[3].path <<<"$received")" /webhook/does-not-exist
  api GET "/api/error-logs"
  logs="$BODY"
  expect "error log rows (4)" "$(count . <<<"$logs")" 2
  expect "error log upstream status (4)" "$(json .[0].upstream_status <<<"$logs")" 404
  ok "webhook not registered $summary"

  # 5. Pre-stream errors are plain JSON.
  local answer
  api POST "/api/chats/$chat_id/messages" '{"content": "   "}'
  answer="$BODY"
  expect "blank content: $answer" "$STATUS" 422
  [[ -n "$(json .detail <<<"$answer")" ]] || die "blank content: no detail in $answer"
  api POST "/api/chats/00000000-0000-4000-8000-000000000000/messages" '{"content": "hi"}'
  answer="$BODY"
  expect "unknown chat: $answer" "$STATUS" 404
  [[ -n "$(json .detail <<<"$answer")" ]] || die "unknown chat: no detail in $answer"
  ok "422 and 404 before the stream"
  echo "all streaming checks passed"
}

case "${1:-}" in
  --ci) ci ;;
  "") interactive ;;
  -h | --help) sed -n '2,12p' "$0" ;;
  *) echo "usage: $0 [--ci]" >&2; exit 2 ;;
esac
