"""The OpenAI-compatible API: the team's agents as models, Chat Completions streamed or not.

Errors on these paths have OpenAI's shape (app.error_handlers); the generation itself is
app.services.completions (the chat stream's n8n client, limits and parser).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Header, Path
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, field_validator

from app.auth import CurrentCaller
from app.config import Settings
from app.db import Database
from app.deps import DatabaseDep, GenerationsDep, SettingsDep, ShortSessionDep
from app.error_handlers import CLIENT_RETRY_AFTER_MAX, NO_RETRY, openai_error
from app.errors import Unprocessable
from app.fields import SendableJson, StorableText
from app.n8n_parser import StreamFailure
from app.routers.responses import openai_error_doc
from app.services import completions as completions_service
from app.services.completions import Completion
from app.sse import PING, SSE_HEADERS, line_safe
from app.streaming import GenerationRegistry

router = APIRouter(prefix="/v1", tags=["openai"])

#: What OpenAI's official SDKs send on every call besides `Authorization` and `Content-Type`: the JavaScript one
#: from a browser page too (`dangerouslyAllowBrowser`), whose CORS preflight fails unless each is allowed (main.py).
#: Named one by one, not `*`: the `x-stainless-*` family (the Python client adds -async and -read-timeout;
#: -helper-method comes from `chat.completions.stream()`), the organization and project when set, and the
#: `User-Agent` it sets, which Firefox and Safari send (Chromium drops it). None of them is read here.
SDK_HEADERS = (
    "OpenAI-Organization",
    "OpenAI-Project",
    "User-Agent",
    "X-Stainless-Arch",
    "X-Stainless-Async",
    "X-Stainless-Helper-Method",
    "X-Stainless-Lang",
    "X-Stainless-OS",
    "X-Stainless-Package-Version",
    "X-Stainless-Read-Timeout",
    "X-Stainless-Retry-Count",
    "X-Stainless-Runtime",
    "X-Stainless-Runtime-Version",
    "X-Stainless-Timeout",
)

R401_V1 = openai_error_doc(
    "Missing, invalid, expired or revoked API key or token",
    "authentication_error",
    "invalid_api_key",
    "Could not validate credentials",
)


#: OpenAI's own words (it answers 400; an invalid body is a 422 on this API, as every other one).
STREAM_OPTIONS_WITHOUT_STREAM = "The 'stream_options' parameter is only allowed when 'stream' is enabled"


R404_MODEL = openai_error_doc(
    "No active agent with this slug in your team",
    "invalid_request_error",
    "model_not_found",
    "The model 'support' does not exist or you do not have access to it",
)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: StrictBool | None = Field(
        None, description="A last chunk with empty `choices` and the usage; the others carry `usage: null`."
    )


class ChatCompletionRequest(BaseModel):
    """OpenAI's request; fields this service does not use (temperature, tools...) are accepted and ignored, but
    the sampling ones must lie in OpenAI's ranges (a client's bug is told, not hidden), and what would change the
    answer's shape (`n` > 1, `logprobs`) is refused: the client would read what is not there."""

    model_config = ConfigDict(extra="ignore")

    # Looked up in the database: NUL or a lone surrogate would fail there (a 500), so they are a 422 here.
    model: Annotated[
        str, Field(min_length=1, max_length=64, description="The agent's slug (see /v1/models)."), StorableText
    ]
    # Sent on to n8n (and their text into the error log): a lone surrogate could not be encoded (a 500).
    messages: Annotated[list[dict[str, Any]], Field(min_length=1, max_length=1000), SendableJson]
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = Field(None, description="Only with `stream: true` (422 otherwise).")
    n: int | None = Field(None, ge=1, le=1, description="One answer per call: only 1 (or leaving it out).")
    logprobs: StrictBool | None = Field(None, description="Not available: only `false` (or leaving it out).")
    top_logprobs: int | None = Field(None, ge=0, le=0, description="Not available: only 0 (or leaving it out).")
    temperature: float | None = Field(None, ge=0, le=2, description="Accepted (0-2) and not used.")
    top_p: float | None = Field(None, ge=0, le=1, description="Accepted (0-1) and not used.")
    presence_penalty: float | None = Field(None, ge=-2, le=2, description="Accepted (-2 to 2) and not used.")
    frequency_penalty: float | None = Field(None, ge=-2, le=2, description="Accepted (-2 to 2) and not used.")
    max_tokens: int | None = Field(None, ge=1, description="Accepted (at least 1) and not used.")
    max_completion_tokens: int | None = Field(None, ge=1, description="Accepted (at least 1) and not used.")

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, value: bool | None) -> bool | None:
        if value:
            raise ValueError("only false is accepted: the agent's answer has no log probabilities")
        return value


class ModelRead(BaseModel):
    id: str
    object: str = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelRead]


@router.get(
    "/models",
    response_model=ModelList,
    summary="The team's active agents as OpenAI models (id = agent slug)",
    responses={401: R401_V1},
)
async def list_models(user: CurrentCaller, session: ShortSessionDep) -> ModelList:
    models = await completions_service.list_models(session=session, user=user)
    owner = f"team-{user.team_id}"
    return ModelList(
        data=[ModelRead(id=slug, created=int(created.timestamp()), owned_by=owner) for slug, created in models]
    )


@router.get(
    "/models/{model}",
    response_model=ModelRead,
    summary="One of the team's active agents as an OpenAI model (the SDK's models.retrieve)",
    responses={
        401: R401_V1,
        404: R404_MODEL,
        422: openai_error_doc(
            "A model name longer than 64 characters, or with NUL or a lone surrogate",
            "invalid_request_error",
            "invalid_request",
            "model: String should have at most 64 characters",
        ),
    },
)
async def read_model(
    model: Annotated[str, Path(max_length=64), StorableText], user: CurrentCaller, session: ShortSessionDep
) -> ModelRead:
    found = await completions_service.list_models(session=session, user=user, slug=model)
    if not found:
        raise completions_service.model_not_found(model)
    [(slug, created)] = found
    return ModelRead(id=slug, created=int(created.timestamp()), owned_by=f"team-{user.team_id}")


#: Non-streaming failures: a timeout is a 504, a server stop 503, any other failure of the agent a 502.
def _failure_status(failure: StreamFailure) -> int:
    return {"upstream_timeout": 504, "interrupted": 503}.get(failure.code, 502)


def _failure_response(failure: StreamFailure) -> JSONResponse:
    """A failed completion in OpenAI's shape. n8n's 429 or 503 with a usable Retry-After (its or a proxy's rate
    limit or unavailability) keeps its status (429 is OpenAI's `rate_limit_error`) with that Retry-After: n8n
    refused the request, so the official clients may wait and send it again (not past the longest wait they
    honour: then `x-should-retry: false`). Any other failure means the workflow may have run: they must not
    send it again on their own (they retry a 5xx by default, running the workflow, and its side effects, up to
    three times)."""
    wait = failure.retry_after
    if failure.upstream_status in (429, 503) and wait is not None:
        headers = {"Retry-After": str(wait), **(NO_RETRY if wait > CLIENT_RETRY_AFTER_MAX else {})}
        return openai_error(failure.upstream_status, failure.message, code=failure.code, headers=headers)
    return openai_error(_failure_status(failure), failure.message, code=failure.code, headers=NO_RETRY)


def _usage(completion: Completion) -> dict[str, int] | None:
    if completion.usage is None:
        return None
    prompt, answer = completion.usage
    return {"prompt_tokens": prompt, "completion_tokens": answer, "total_tokens": prompt + answer}


def _chunk(
    completion: Completion,
    delta: dict[str, Any] | None,
    finish_reason: str | None,
    *,
    usage: bool = False,
    **extra: Any,
) -> bytes:
    """One `chat.completion.chunk`; `usage` (stream_options.include_usage): the chunk carries `usage: null`, and
    a chunk without `delta` is the last one, with empty `choices` and the usage."""
    choices: list[dict[str, Any]] = []
    if delta is not None:
        choices.append({"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason, **extra})
    body: dict[str, Any] = {
        "id": completion.id,
        "object": "chat.completion.chunk",
        "created": completion.created,
        "model": completion.model,
        "choices": choices,
    }
    if usage:
        body["usage"] = None if delta is not None else _usage(completion)
    return b"data: " + line_safe(json.dumps(body, ensure_ascii=False, separators=(",", ":"))).encode() + b"\n\n"


@router.post(
    "/chat/completions",
    summary="OpenAI Chat Completions against an agent (stream true or false)",
    description="`model` is the agent's slug; the last user message is the agent's `chatInput`, system messages "
    "are put before the agent's system prompt. Nothing is stored but the usage row. `X-Session-Id` keeps n8n's "
    "memory between calls (per user); without it every call is a new session.",
    responses={
        200: {
            "description": "A `chat.completion`, or with `stream: true` `chat.completion.chunk` events then "
            "`data: [DONE]`; a failure mid-stream ends with a chunk whose finish_reason is `error`.",
            "content": {"application/json": {}, "text/event-stream": {}},
        },
        400: openai_error_doc(
            "The body cannot be parsed; or the agent answers by callback and the server has no "
            "PUBLIC_BASE_URL for its workflow to post to (code model_not_supported)",
            "invalid_request_error",
            None,
            "There was an error parsing the body",
        ),
        401: R401_V1,
        403: openai_error_doc(
            "Cookie-authenticated write from an origin that is not allowed",
            "permission_error",
            None,
            "Origin not allowed",
        ),
        413: openai_error_doc(
            "The body is larger than MAX_REQUEST_BODY_BYTES", "invalid_request_error", None, "Request body too large"
        ),
        404: R404_MODEL,
        422: openai_error_doc(
            "Invalid request, e.g. the last message is not a user message with text, a message's content is "
            "not text (an image part, a system message without text: `param` names it), or `stream_options` "
            "without `stream: true`",
            "invalid_request_error",
            "invalid_request",
            f"messages: {completions_service.NO_USER_MESSAGE}",
        ),
        429: openai_error_doc(
            "Daily quota reached, or too many failed key attempts; or the agent's n8n (or a proxy in front of "
            "it) answered 429 with a Retry-After (code upstream_error); see Retry-After",
            "rate_limit_error",
            "rate_limit_exceeded",
            "Daily message quota reached; it resets at midnight UTC",
        ),
        502: openai_error_doc(
            "The agent failed (code: upstream_error, upstream_unreachable, bad_upstream_response, ...); "
            "`x-should-retry: false`, as on 503 interrupted and 504: the workflow ran",
            "server_error",
            "upstream_unreachable",
            "The agent could not be reached",
        ),
        503: openai_error_doc(
            "The server is shutting down: refused before it starts (code service_unavailable), or stopped "
            "after the shutdown's grace period (code interrupted); or the agent's n8n (or a proxy in front of "
            "it) answered 503 with a Retry-After (code upstream_error; see Retry-After)",
            "server_error",
            "service_unavailable",
            "The server is shutting down; try again",
        ),
        504: openai_error_doc(
            "The agent took too long", "server_error", "upstream_timeout", "The agent did not answer in time"
        ),
    },
)
async def chat_completions(
    body: ChatCompletionRequest,
    user: CurrentCaller,
    session: ShortSessionDep,
    settings: SettingsDep,
    db: DatabaseDep,
    registry: GenerationsDep,
    x_session_id: Annotated[str | None, Header()] = None,
) -> Any:
    if body.stream_options is not None and not body.stream:
        # Not ignored: the caller asked for something (the usage chunk) that a non-streamed answer cannot have.
        raise Unprocessable(STREAM_OPTIONS_WITHOUT_STREAM, loc=("body", "stream_options"))
    registry.check_accepting()
    completion = await completions_service.prepare_completion(
        session=session,
        settings=settings,
        user=user,
        model=body.model,
        messages=body.messages,
        session_header=x_session_id,
    )
    run = Run(registry, completion, db, settings)
    if body.stream:
        usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(_stream(run, usage=usage), media_type="text/event-stream", headers=SSE_HEADERS)
    failure = await run.start()
    if failure is not None:
        return _failure_response(failure)
    return JSONResponse(
        {
            "id": completion.id,
            "object": "chat.completion",
            "created": completion.created,
            "model": completion.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "".join(completion.chunks), "refusal": None},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": _usage(completion),
        }
    )


@dataclass(slots=True)
class Run:
    """One completion to run as a task of the GenerationRegistry, so the shutdown drains it."""

    registry: GenerationRegistry
    completion: Completion
    db: Database
    settings: Settings

    def start(self, on_chunks: Callable[[list[str]], None] | None = None) -> asyncio.Task[StreamFailure | None]:
        task = self._launch(on_chunks)
        task.add_done_callback(self._ended)
        return task

    def _ended(self, task: asyncio.Task[StreamFailure | None]) -> None:
        """A task cancelled before its first step (its stream closed as it began: the client left, or sending
        the first chunk failed) never ran `run_completion`: its quota claim would have no usage row. A new task
        runs it once more, which calls no one and records `cancelled`, as for a client that left mid-stream
        (`interrupted` if the registry is interrupting then: the cancel is taken for the shutdown's, as mid-stream).
        One check per ended task, nothing per request; once only (`_launch(cut=True)` adds no callback)."""
        if task.cancelled() and not self.completion.started:
            self._launch(None, cut=True)

    def _launch(
        self, on_chunks: Callable[[list[str]], None] | None, *, cut: bool = False
    ) -> asyncio.Task[StreamFailure | None]:
        registry = self.registry
        completion = self.completion
        call_agent: Callable[..., Awaitable[None]] = registry.streamer.run
        if completion.callback_id is not None:  # n8n may post to its callback URL: text, usage, the end
            call_agent = functools.partial(
                registry.call_completion, completion.callback_id, callback_mode=completion.callback_mode
            )
        run = completions_service.run_completion(
            call_agent=call_agent,
            db=self.db,
            settings=self.settings,
            completion=self.completion,
            on_chunks=on_chunks,
            interrupted=lambda: registry.interrupting,
            cut=cut,
        )
        return registry.track(asyncio.create_task(run, name=f"completion-{self.completion.id}"))


async def _stream(run: Run, *, usage: bool) -> AsyncIterator[bytes]:
    """The run as chunks: the role first, then each batch of text, then the finish reason (then, with `usage`,
    the usage chunk) and [DONE]; a
    `: ping` comment after STREAM_PING_INTERVAL without a write (an agent may think for minutes before its
    first byte, longer than a proxy keeps a silent connection; SSE clients, OpenAI's included, skip comments).

    A client that goes away cancels the call to n8n (its usage row says `cancelled`), even before the task took
    its first step (`Run._ended`)."""
    completion = run.completion
    ping = run.settings.STREAM_PING_INTERVAL
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[list[str] | None] = asyncio.Queue()
    # One timer per quiet interval, not one timeout per batch (as app.sse.Generation.sse): when it fires it
    # queues `ping_due`, and the loop pings if nothing went out since `ping_at`, else re-arms for it.
    ping_due: list[str] = []
    timer: asyncio.TimerHandle | None = None
    task = run.start(on_chunks=queue.put_nowait)
    task.add_done_callback(lambda _task: queue.put_nowait(None))
    try:
        yield _chunk(completion, {"role": "assistant", "content": ""}, None, usage=usage)
        ping_at = loop.time() + ping
        timer = loop.call_at(ping_at, queue.put_nowait, ping_due)
        while (batch := await queue.get()) is not None:
            if batch is ping_due:
                if loop.time() + 0.001 >= ping_at:  # a timer may fire within the clock's resolution of its time
                    yield PING
                    ping_at = loop.time() + ping
                timer = loop.call_at(ping_at, queue.put_nowait, ping_due)
                continue
            text = "".join(batch)
            if text:
                yield _chunk(completion, {"content": text}, None, usage=usage)
                ping_at = loop.time() + ping
        failure = task.result()
        if failure is None:
            yield _chunk(completion, {}, "stop", usage=usage)
        else:
            error: dict[str, Any] = {"message": failure.message, "type": "server_error", "code": failure.code}
            if failure.retry_after is not None:  # n8n's Retry-After, as the chat stream's error event has it
                error["retry_after"] = failure.retry_after
            yield _chunk(completion, {}, "error", usage=usage, error=error)
        if usage:
            yield _chunk(completion, None, None, usage=True)
        yield b"data: [DONE]\n\n"
    finally:
        if timer is not None:
            timer.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
