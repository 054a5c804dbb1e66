"""The n8n answer parser: every format, every way the bytes can be cut; no network (recordings read from disk)."""

from __future__ import annotations

import json

import pytest

from app.n8n_parser import BodyParser, clean_text
from tools.fake_n8n import load_captures

CAPTURES = load_captures()
MB = 1024 * 1024


def parse(pieces: list[bytes], *, max_line: int = MB, max_total: int = 10 * MB) -> tuple[str, BodyParser]:
    parser = BodyParser(max_line_bytes=max_line, max_response_bytes=max_total)
    out: list[str] = []
    for piece in pieces:
        out += parser.feed(piece)
        if parser.finished:
            break
    out += parser.finish()
    return "".join(out), parser


def every_cut(body: bytes) -> list[list[bytes]]:
    """The body cut at every position into two reads, plus one byte per read."""
    return [[body[:i], body[i:]] for i in range(len(body) + 1)] + [[body[i : i + 1] for i in range(len(body))]]


# --- parser: n8n NDJSON --------------------------------------------------------------------------


def test_parse_ndjson_capture_concatenates_items() -> None:
    text, parser = parse(CAPTURES["stream_ok"].pieces)
    assert text == "Echo: hello there"
    assert parser.mode == "ndjson"
    assert parser.failure is None
    assert parser.chunks == 3


@pytest.mark.parametrize("cut", range(3))
def test_parse_ndjson_any_cut_gives_same_text(cut: int) -> None:
    body = "".join(
        json.dumps({"type": t, "content": c}) + "\n"
        for t, c in [("begin", None), ("item", "Écho:"), ("item", " ünïcode ✓"), ("item", " 🎉"), ("end", None)]
    ).encode()
    cases = every_cut(body)
    for pieces in cases[cut::3]:
        text, parser = parse(pieces)
        assert text == "Écho: ünïcode ✓ 🎉"
        assert parser.failure is None


def test_parse_ndjson_crlf_and_many_lines_per_read() -> None:
    body = b"".join(p.replace(b"\n", b"\r\n") for p in CAPTURES["stream_ok"].pieces)
    assert parse([body])[0] == "Echo: hello there"


def test_parse_ndjson_several_blocks_and_null_content() -> None:
    lines = [
        {"type": "begin", "metadata": {"runIndex": 0}},
        {"type": "item", "content": "one"},
        {"type": "end"},
        {"type": "begin", "metadata": {"runIndex": 1}},
        {"type": "item", "content": None},
        {"type": "item", "content": " two"},
        {"type": "end"},
    ]
    text, parser = parse([b"\n".join(json.dumps(line).encode() for line in lines) + b"\n"])
    assert text == "one two"
    assert parser.failure is None


def test_parse_ndjson_last_line_without_newline() -> None:
    assert parse([b'{"type":"item","content":"a"}\n{"type":"item","content":"b"}'])[0] == "ab"


@pytest.mark.parametrize("name", ["stream_llm_error", "chat_stream_llm_error", "chat_stream_no_session"])
def test_parse_in_band_error(name: str) -> None:
    text, parser = parse(CAPTURES[name].pieces)
    assert text == ""
    assert parser.failure is not None
    assert parser.failure.code == "upstream_error"
    assert parser.failure.message == "The agent reported an error"
    assert "Fake upstream failure" in str(parser.failure.detail) or "No session" in str(parser.failure.detail)


def test_parse_in_band_error_with_null_content_keeps_text_before() -> None:
    body = b'{"type":"item","content":"partial"}\n' + CAPTURES["stream_code_error"].body
    text, parser = parse([body])
    assert text == "partial"
    assert parser.failure is not None
    assert parser.failure.code == "upstream_error"
    assert parser.failure.detail["n8n_error"] is None
    assert parser.failure.detail["node"] == "Code"


def test_parse_malformed_line_is_bad_upstream_response() -> None:
    text, parser = parse([b'{"type":"item","content":"ok"}\n{"type":"item","content": oops\n'])
    assert text == "ok"
    assert parser.failure is not None
    assert parser.failure.code == "bad_upstream_response"


def test_parse_line_over_cap_is_bad_upstream_response() -> None:
    line = b'{"type":"item","content":"' + b"x" * 5000 + b'"}\n'
    text, parser = parse([b'{"type":"item","content":"a"}\n', line[:3000], line[3000:]], max_line=4096)
    assert text == "a"
    assert parser.failure is not None
    assert parser.failure.code == "bad_upstream_response"
    assert "line" in parser.failure.message


def test_parse_answer_over_cap_is_bad_upstream_response() -> None:
    lines = [b'{"type":"item","content":"' + b"y" * 900 + b'"}\n'] * 10
    _text, parser = parse(lines, max_total=4096)
    assert parser.failure is not None
    assert parser.failure.code == "bad_upstream_response"
    assert "answer" in parser.failure.message


@pytest.mark.parametrize("body", [b"", b"   \r\n\n", b'{"type":"begin"}\n{"type":"end"}\n'])
def test_parse_empty_answer_is_empty_response(body: bytes) -> None:
    _text, parser = parse([body] if body else [])
    assert parser.failure is not None
    assert parser.failure.code == "empty_response"


# --- parser: SSE ---------------------------------------------------------------------------------


def test_parse_sse_openai_deltas_and_done() -> None:
    body = (
        b": keep-alive\n\n"
        b'data: {"choices":[{"delta":{"role":"assistant"}}]}\n\n'
        b'data: {"choices":[{"delta":{"content":"Hel"}}]}\r\n\r\n'
        b'data: {"choices":[{"delta":{"content":"lo"}}]}\n\n'
        b"data: [DONE]\n\n"
        b'data: {"choices":[{"delta":{"content":"ignored"}}]}\n\n'
    )
    for pieces in every_cut(body)[::7]:
        text, parser = parse(pieces)
        assert text == "Hello"
        assert parser.mode == "sse"
        assert parser.failure is None


def test_parse_sse_starting_with_a_field_whose_name_is_cut_by_the_first_read() -> None:
    """The format is judged on the first bytes: a first read of `d`, `da`, `dat` or `data` is not text yet."""
    body = b'data: {"choices":[{"delta":{"content":"Hel"}}]}\n\ndata: {"choices":[{"delta":{"content":"lo"}}]}\n\n'
    for first in (body, b"event: message\n" + body, b"id: 1\n" + body, b"retry: 5\n" + body):
        for cut in range(1, 8):
            text, parser = parse([first[:cut], first[cut:]])
            assert (text, parser.mode, parser.failure) == ("Hello", "sse", None), (first[:cut], cut)
    # A plain-text answer that merely starts like a field name is still text, once more bytes show it.
    assert parse([b"da", b"ily report"])[0] == "daily report"


def test_parse_sse_with_n8n_objects_and_plain_fields() -> None:
    body = (
        b'event: message\ndata: {"type":"item","content":"a"}\n\n'
        b'data: {"text":"b"}\n\ndata: {"delta":"c"}\n\ndata: {"content":"d"}\n\ndata: plain e\n\n'
        b'data: {"type":"item","content":"f"}'
    )
    assert parse([body])[0] == "abcdplain ef"


def test_parse_sse_error_event() -> None:
    text, parser = parse([b'data: {"content":"x"}\n\ndata: {"type":"error","content":"boom"}\n\n'])
    assert text == "x"
    assert parser.failure is not None
    assert parser.failure.code == "upstream_error"


# --- parser: whole-body JSON and plain text ------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'{"output":"Echo: hello there"}', "Echo: hello there"),
        (b'{"text":"t"}', "t"),
        (b'{"message":"m"}', "m"),
        (b'{"content":"c"}', "c"),
        (b'{"output": null, "text": "fallback"}', "fallback"),
        (b'  {\n  "output": "pretty"\n}\n', "pretty"),
        (b'[{"output":"first"}]', "first"),
        (b'[{"output":"first"},{"text":"second"}]', "first\n\nsecond"),
        (b'"just a string"', "just a string"),
        (b"plain text answer \xc3\xa9", "plain text answer é"),
        (b'{"type":"item","content":"single line no newline"}', "single line no newline"),
    ],
)
def test_parse_whole_body(body: bytes, expected: str) -> None:
    for pieces in every_cut(body)[::5]:
        text, parser = parse(pieces)
        assert parser.failure is None
        assert text == expected


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b'{"data":[]}', "bad_upstream_response"),
        (b'{"output": "x"', "bad_upstream_response"),
        (b"[1, 2]", "bad_upstream_response"),
        (b"\xff\xfe not utf-8", "bad_upstream_response"),
        (b"[]", "empty_response"),
        (b'{"output": ""}', "empty_response"),
    ],
)
def test_parse_whole_body_failures(body: bytes, code: str) -> None:
    _text, parser = parse([body])
    assert parser.failure is not None
    assert parser.failure.code == code


def test_parse_whole_body_over_cap() -> None:
    _text, parser = parse([b'{"output":"' + b"z" * 5000 + b'"}'], max_total=4096)
    assert parser.failure is not None
    assert parser.failure.code == "bad_upstream_response"


def test_parse_ndjson_and_sse_lines_in_a_declared_charset() -> None:
    ndjson = '{"type":"item","content":"Café"}\n{"type":"item","content":" crème"}\n'.encode("latin-1")
    parser = BodyParser(max_line_bytes=MB, max_response_bytes=10 * MB)
    parser.use_charset("latin-1")
    out = parser.feed(ndjson) + parser.finish()
    assert ("".join(out), parser.mode, parser.failure) == ("Café crème", "ndjson", None)
    sse = 'data: {"content": "né"}\n\ndata: [DONE]\n\n'.encode("cp1252")
    parser = BodyParser(max_line_bytes=MB, max_response_bytes=10 * MB)
    parser.use_charset("windows-1252")
    assert "".join(parser.feed(sse) + parser.finish()) == "né"


def test_parse_bytes_undefined_in_the_declared_charset_are_bad_upstream_response() -> None:
    parser = BodyParser(max_line_bytes=MB, max_response_bytes=10 * MB)
    parser.use_charset("windows-1252")
    parser.feed(b"caf\x81")
    parser.finish()
    assert parser.failure is not None
    assert parser.failure.code == "bad_upstream_response"


# --- parser: odd bodies seen behind proxies --------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [b'\xef\xbb\xbf{"output": "Echo: hi"}', b'\xef\xbb\xbf{"type":"item","content":"Echo: hi"}\n'],
)
def test_parse_body_with_utf8_bom(body: bytes) -> None:
    for pieces in every_cut(body):
        text, parser = parse(pieces)
        assert (text, parser.failure) == ("Echo: hi", None)


@pytest.mark.parametrize("page", [b"<!DOCTYPE html><html><body>Sign in</body></html>", b"\n  <html><p>502</p></html>"])
def test_parse_html_page_is_bad_upstream_response(page: bytes) -> None:
    text, parser = parse([page])
    assert text == ""
    assert parser.failure is not None
    assert parser.failure.code == "bad_upstream_response"


def test_parse_deeply_nested_json_is_bad_upstream_response() -> None:
    _text, parser = parse([b"[" * 100_000 + b"]" * 100_000])
    assert parser.failure is not None
    assert parser.failure.code == "bad_upstream_response"


# --- parser: review of 2026-12-07 -----------------------------------------------------------------

NESTED = b"[" * 5000 + b"]" * 5000


@pytest.mark.parametrize("body", [b"42", b"true", b"null", b"-3.5", b" 7 \n"])
def test_a_text_answer_that_is_also_a_json_scalar_is_the_answer(body: bytes) -> None:
    """`42` read as JSON held no text, and the answer was refused ("has no text")."""
    for pieces in every_cut(body):
        text, parser = parse(pieces)
        assert (text, parser.failure) == (body.decode(), None)


def test_an_sse_token_that_is_also_a_json_scalar_is_text() -> None:
    """`data:  42` read as JSON was dropped from the answer."""
    text, parser = parse([b"data: The\n\ndata:  answer\n\ndata:  is\n\ndata:  42\n\ndata: true\n\n"])
    assert (text, parser.failure) == ("The answer is 42true", None)


@pytest.mark.parametrize(
    "body",
    [
        b'{"type":"begin"}\n{"type":"item","content":"Hi"}\n{"type":"item","content":"x","m":' + NESTED + b"}\n",
        b'{"a":' + NESTED + b"}\n",
    ],
    ids=["ndjson", "first-line"],
)
def test_a_deeply_nested_line_is_bad_upstream_response_and_keeps_the_text_before(body: bytes) -> None:
    """RecursionError escaped the parser: the read's text was lost and the stream ended `internal_error`."""
    parser = BodyParser(max_line_bytes=MB, max_response_bytes=10 * MB)
    out = parser.feed(body)
    out += parser.finish()
    assert parser.failure is not None
    assert parser.failure.code == "bad_upstream_response"
    assert "".join(out) in ("Hi", "")


def test_a_deeply_nested_sse_data_is_text_like_any_data_that_is_no_json() -> None:
    text, parser = parse([b"data: Hi\n\ndata: " + NESTED + b"\n\n"])
    assert (text, parser.failure) == ("Hi" + NESTED.decode(), None)


def _block(text: str, usage: dict[str, int]) -> bytes:
    item = json.dumps({"type": "item", "content": text}).encode()
    end = json.dumps({"type": "end", "metadata": {"usage": usage}}).encode()
    return b'{"type":"begin","metadata":{}}\n' + item + b"\n" + end + b"\n"


def test_the_usage_of_every_streamed_block_adds_up() -> None:
    """Two streaming nodes, each ending its block with its usage: only the last one counted."""
    body = _block("a", {"input_tokens": 1, "output_tokens": 2}) + _block("b", {"input_tokens": 10, "output_tokens": 20})
    text, parser = parse([body])
    assert (text, parser.usage) == ("ab", (11, 22))
    huge = {"input_tokens": 2**31 - 1, "output_tokens": 5}
    _text, parser = parse([_block("a", huge) + _block("b", huge)])
    assert parser.usage == (2**31 - 1, 10)  # held where the ledger's column ends


def test_the_usage_of_an_all_items_array_adds_up() -> None:
    body = json.dumps(
        [
            {"output": "hi", "usage": {"input_tokens": 3, "output_tokens": 4}},
            {"output": "yo", "usage": {"prompt_tokens": 1, "completion_tokens": 1}},
        ]
    ).encode()
    text, parser = parse([body])
    assert (text, parser.usage) == ("hi\n\nyo", (4, 5))


def test_a_surrogate_pair_cut_between_two_items_is_one_character() -> None:
    """Node writes a string cut inside a surrogate pair as two escaped halves, in two items: each chunk was
    cleaned on its own and the character became two U+FFFD."""
    body = b'{"type":"begin"}\n{"type":"item","content":"Party \\ud83c"}\n{"type":"item","content":"\\udf89!"}\n'
    for pieces in every_cut(body + b'{"type":"end"}\n'):
        parser = BodyParser(max_line_bytes=MB, max_response_bytes=10 * MB)
        chunks: list[str] = []
        for piece in pieces:
            chunks += parser.feed(piece)
        chunks += parser.finish()
        assert all(clean_text(c) == c for c in chunks)  # no chunk holds a half
        assert "".join(chunks) == "Party \U0001f389!"
    # A half that never gets its other half is given at the end, for the caller's cleaning to replace.
    text, _parser = parse([b'{"type":"item","content":"cut \\ud83c"}\n'])
    assert text == "cut \ud83c"
