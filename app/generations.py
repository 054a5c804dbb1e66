"""The generation registry: this worker's running answers as tasks, its heartbeat and recovery, and shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import signal
import uuid
from collections import OrderedDict
from collections.abc import AsyncGenerator, Callable, Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

from app import metrics
from app.callbacks import CallbackInbox, outlived_in_callback_mode
from app.config import Settings
from app.crypto import DecryptionError, decrypt_headers
from app.db import Database
from app.errors import NotFound, ServiceUnavailable
from app.eventlog import (
    RedisEventLog,
    rebuilt_stream,
    resubscribed_within,
    stored_message,
    terminal_of,
    wait_until_final,
)
from app.n8n_parser import EMPTY_ANSWER, StreamFailure, clean_text
from app.services import chats as chats_service
from app.services import files as files_service
from app.services import idempotency, retention
from app.services import messages as message_service
from app.services import workers as worker_service
from app.services.chats import CHAT_NOT_FOUND
from app.sse import Generation
from app.upstream import Attachment, StreamStats

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from redis.asyncio import Redis
    from sqlalchemy.ext.asyncio import AsyncSession

    from app.streaming import N8nStreamer

logger = logging.getLogger(__name__)
T = TypeVar("T")

CALLBACK_NOT_ACCEPTED = "No running generation has this callback URL"
CALLBACK_UNRELAYED = "The callback cannot be relayed right now; try again"
STOP_UNREACHABLE = "The instance running this answer cannot be reached right now; try again"
CALLBACK_WITHOUT_URL = (
    "The agent answers by callback, which this server cannot receive; ask an admin to set PUBLIC_BASE_URL "
    "or switch the agent to stream mode"
)

WAITING = {"description": "Waiting for the agent", "done": False}
#: How many (user, chat) webhooks `GenerationRegistry.warm_for` remembers (~200 bytes each).
WEBHOOK_MEMORY = 10_000
#: The longest a checkpoint waits for the shared log (Redis) to hold its events (seconds; it writes them every
#: `eventlog.MIRROR_INTERVAL`).
SHARED_LOG_WAIT = 1.0
#: The final write, when it fails, is tried again after these pauses (seconds), within FINAL_WRITE_PATIENCE
#: of the first try; then the stream ends with `storage_error` (and recovery marks the answer `interrupted`).
FINAL_WRITE_RETRY_DELAYS = (0.2, 0.5, 1.0, 2.0, 3.0)
FINAL_WRITE_PATIENCE = 10.0
#: At shutdown, streams this instance relays from elsewhere (a follower or a retry of another instance's answer,
#: read from Redis or storage) end this long after the grace (seconds): enough for an owner told to stop at the
#: same moment (the other workers of one server) to write its terminal event, well within the server's own
#: graceful-shutdown timeout (the grace + 5 s).
RELAYED_MARGIN = 2.0
#: How long a deleted chat's answer not registered yet is remembered (seconds): far longer than the moment
#: between a send's commit and its `start`; a deletion of an answer running elsewhere is kept as long, unused.
DELETED_EARLY_KEPT = 60.0


class GenerationRegistry:
    """The running generations of this worker, its liveness heartbeat, start-up recovery and shutdown.

    A generation is an asyncio task owned by the registry: it calls n8n, appends each parsed chunk to an
    in-memory list and wakes the SSE readers, checkpoints the partial text at most every
    STREAM_CHECKPOINT_INTERVAL seconds, and writes the final message exactly once, shielded from
    cancellation. The SSE response only reads the generation's event list, so a client that goes away does
    not stop the generation, and per chunk there is no database work and no re-encoding of the whole answer.
    """

    def __init__(self, *, settings: Settings, db: Database, streamer: N8nStreamer, redis: Redis | None = None) -> None:
        self.settings = settings
        self.db = db
        #: The shared event logs and the stop channel, with several instances (None: this process only).
        self.shared = RedisEventLog(redis, settings, db) if redis is not None else None
        self._stop_listener: asyncio.Task[None] | None = None
        self._callback_listener: asyncio.Task[None] | None = None
        self._stopping: set[asyncio.Task[dict[str, Any] | None]] = set()
        self.worker_id = uuid.uuid4()
        self.streamer = streamer
        self.running: dict[str, Generation] = {}
        #: `/v1` completions of this instance that take callbacks, by callback id (`call_completion`).
        self.completion_inboxes: dict[str, CallbackInbox] = {}
        #: Every generation whose events can still be followed: running ones, and ended ones for STREAM_LOG_TTL.
        self.logs: dict[str, Generation] = {}
        #: The latest generation of each chat that has one in `logs`.
        self.by_chat: dict[uuid.UUID, str] = {}
        #: Generations that keep no chat (the OpenAI-compatible API's completions), drained like the others.
        self.detached: set[asyncio.Task[Any]] = set()
        #: Set when the drain's grace is over: the cancels that follow mean "interrupted by the shutdown".
        self.interrupting = False
        self._heartbeat: asyncio.Task[None] | None = None
        #: The retention sweep under way (`sweep_retention`), on its own task: never the heartbeat's wait.
        self.sweeping: asyncio.Task[None] | None = None
        #: Sweeps this worker started: the unused-blob pass runs on one in retention.UNUSED_BLOBS_EVERY.
        self.sweeps = 0
        self._closing = False
        self._give_up_at = 0.0  # the loop time at which the shutdown's grace runs out (`begin_shutdown`)
        self._draining: asyncio.Task[None] | None = None
        #: Set RELAYED_MARGIN after the shutdown's grace: streams of other instances' answers end (`_relayed`).
        self._leaving = asyncio.Event()
        self.recovered = False
        #: Answers whose chat was deleted before this instance registered them (the deletion read the answer's
        #: row between its start statement's commit and `start`): they start stopped. Loop time of the deletion.
        self._deleted_early: dict[str, float] = {}
        #: The webhook each (user, chat)'s latest answered generation called, least recent first (bounded): the
        #: next send in that chat opens its n8n connection while its statement runs (`warm_for`).
        self._webhooks: OrderedDict[tuple[uuid.UUID, uuid.UUID], str] = OrderedDict()

    # --- lifecycle ------------------------------------------------------------------------------
    async def startup(self) -> None:
        """Open the shared n8n client, register this worker, mark dead workers' streams, start the heartbeat.

        A database that is not reachable or not migrated yet does not stop start-up (`/ready` reports
        it); registration and recovery are retried on every heartbeat until they succeed.
        """
        self.streamer.session()
        self.install_signal_hook()
        await self._register_and_recover()
        self._heartbeat = asyncio.create_task(self._beat(), name="worker-heartbeat")
        if self.shared is not None:
            self._stop_listener = asyncio.create_task(
                self.shared.listen_for_stops(self._stop_requested, self._stops_missed), name="generation-stop-listener"
            )
            self._callback_listener = asyncio.create_task(
                self.shared.listen_for_callbacks(self._relayed_callback), name="generation-callback-listener"
            )

    async def _register_and_recover(self) -> None:
        try:
            async with self.db.sessionmaker() as session:
                await worker_service.heartbeat(session=session, worker_id=self.worker_id)
                recovered = await worker_service.recover_interrupted(
                    session=session,
                    settings=self.settings,
                    worker_id=self.worker_id,
                    running=frozenset(self.running),
                )
                await idempotency.prune(session=session)
        except Exception as exc:
            logger.warning("worker registration and recovery postponed (%s)", type(exc).__name__)
            return
        self.recovered = True
        if recovered:
            logger.warning("marked %d message(s) of stopped workers as interrupted", recovered)
        if not self._closing and (self.sweeping is None or self.sweeping.done()):
            self.sweeping = asyncio.create_task(self.sweep_retention(), name="retention-sweep")

    async def sweep_retention(self) -> None:
        """Delete rows past their retention (app.services.retention), started with the periodic recovery (one
        sweep at a time per worker). On a task of its own: a batch waiting on the database (a table lock, a
        backlog's scan) held up the heartbeat, and past STALE_HEARTBEATS intervals other workers took this one's
        live answers for a dead worker's. A failure waits for the next recovery. The unused-blob pass, a
        backstop examining up to 10,000 blobs, runs on the first sweep and then on every UNUSED_BLOBS_EVERY-th."""
        unused_blobs = self.sweeps % retention.UNUSED_BLOBS_EVERY == 0
        self.sweeps += 1
        try:
            async with self.db.sessionmaker() as session:
                await retention.sweep(session=session, settings=self.settings, unused_blobs=unused_blobs)
        except Exception as exc:
            logger.warning("retention sweep postponed (%s)", type(exc).__name__)

    async def _beat(self) -> None:
        """Heartbeat; every few beats also recover streams of workers that died since (a worker restarted
        quickly after a crash would otherwise leave its chats blocked by a `streaming` message)."""
        beats = 0
        while True:
            await asyncio.sleep(self.settings.WORKER_HEARTBEAT_INTERVAL)
            beats += 1
            if not self.recovered or beats % worker_service.STALE_HEARTBEATS == 0:
                await self._register_and_recover()
                continue
            try:
                async with self.db.sessionmaker() as session:
                    await worker_service.heartbeat(session=session, worker_id=self.worker_id)
            except Exception as exc:
                logger.warning("worker heartbeat failed (%s)", type(exc).__name__)

    def install_signal_hook(self) -> None:
        """Start the grace period when the server is told to stop, not when the application shutdown runs.

        uvicorn first waits for open connections (SSE clients included) and only then runs the lifespan
        shutdown; a generation still running then would be cut without a terminal event. Chaining the
        server's SIGTERM/SIGINT handler lets the grace period run while clients are still connected, so they
        receive the `done`, or the `interrupted` error once the grace is over, before their connection ends.
        """
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous = signal.getsignal(sig)
            owner = getattr(previous, "__self__", None)
            if not callable(previous) or not type(owner).__module__.startswith("uvicorn"):
                continue  # only uvicorn's own handler is chained (not pytest's, not an ignored signal)

            def handler(signum: int, frame: Any, previous: Callable[[int, Any], Any] = previous) -> None:
                with contextlib.suppress(RuntimeError):  # the loop is already closed
                    loop.call_soon_threadsafe(self.begin_shutdown)
                previous(signum, frame)

            try:
                signal.signal(sig, handler)
            except ValueError:  # not the main thread (e.g. uvicorn run in a test thread)
                return

    def begin_shutdown(self) -> asyncio.Task[None]:
        """Refuse new generations; give running ones SHUTDOWN_GRACE_SECONDS, then store them interrupted."""
        self._closing = True
        if self._draining is None:
            loop = asyncio.get_running_loop()
            self._give_up_at = loop.time() + self.settings.SHUTDOWN_GRACE_SECONDS
            self._draining = loop.create_task(self._drain(), name="generations-drain")
            loop.call_at(self._give_up_at + RELAYED_MARGIN, self._leaving.set)
        return self._draining

    async def _drain(self) -> None:
        """Wait up to the grace for every running generation, then interrupt what is left. Looked at again
        after each wait: a send whose check passed just before the shutdown began starts its generation
        while this runs, and must be drained (or interrupted, with its terminal event) like the others. One
        that starts after this had returned runs it again (`_drain_late`), and `shutdown` runs it once more."""
        loop = asyncio.get_running_loop()
        give_up_at = self._give_up_at
        while True:
            tasks = [g.task for g in self.running.values() if g.task is not None]
            pending = {task for task in [*tasks, *self.detached] if not task.done()}
            if not pending:
                return
            remaining = give_up_at - loop.time()
            if remaining > 0:
                await asyncio.wait(pending, timeout=remaining)
                continue
            self.interrupting = True
            for task in pending:
                # Not one whose task has not taken its first step: a cancel now would end it before its body
                # (its final write, its usage row, its terminal event) runs. A generation's `_run` and a
                # completion's `run_completion` see `interrupting` as they start, call no one, and end so.
                if inspect.getcoroutinestate(task.get_coro()) != inspect.CORO_CREATED:  # type: ignore[arg-type]
                    task.cancel()
            logger.warning("interrupting %d running generation(s) at shutdown", len(pending))
            await asyncio.gather(*pending, return_exceptions=True)

    async def shutdown(self) -> None:
        """Drain generations (if the signal hook did not start it already), stop the heartbeat, unregister."""
        await self.begin_shutdown()
        # A send past its check may have started a generation after the drain found none left (the server
        # waited for that send's connection, not for a generation its client left): drained within the same
        # grace, else interrupted, before the HTTP client it needs is closed.
        await self._drain()
        if self.shared is not None:
            await self.shared.drain(within=2.0)
        for listener in (self._stop_listener, self._callback_listener):
            if listener is not None:
                listener.cancel()
                await asyncio.gather(listener, return_exceptions=True)
        self._stop_listener = self._callback_listener = None
        if self.sweeping is not None:  # its deletes are bounded and committed per batch: the next start goes on
            self.sweeping.cancel()
            await asyncio.gather(self.sweeping, return_exceptions=True)
            self.sweeping = None
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            await asyncio.gather(self._heartbeat, return_exceptions=True)
            self._heartbeat = None
            try:
                async with self.db.sessionmaker() as session:
                    await worker_service.unregister_worker(session=session, worker_id=self.worker_id)
            except Exception as exc:
                logger.warning("could not unregister worker (%s)", type(exc).__name__)
        await self.streamer.close()

    # --- generations ----------------------------------------------------------------------------
    @property
    def accepting(self) -> bool:
        return not self._closing

    def warm_for(self, user_id: uuid.UUID, chat_id: uuid.UUID) -> None:
        """Open a connection to the webhook this user's chat called last (N8nStreamer.warm), if known: the
        connect then overlaps the send's database statement. Only the chat's own user's sends ever warm it."""
        url = self._webhooks.get((user_id, chat_id))
        if url is not None:
            self.streamer.warm(url)

    def _remember_webhook(self, new: message_service.NewGeneration) -> None:
        key = (new.user_id, new.chat_id)
        self._webhooks[key] = new.webhook_url
        self._webhooks.move_to_end(key)
        if len(self._webhooks) > WEBHOOK_MEMORY:
            self._webhooks.popitem(last=False)

    def check_accepting(self) -> None:
        """New generations are refused once shutdown began (they would only be interrupted)."""
        if self._closing:
            raise ServiceUnavailable("The server is shutting down; try again")

    def track(self, task: asyncio.Task[T]) -> asyncio.Task[T]:
        """A generation that stores no chat (a `/v1` completion): the shutdown drains it like the others, and
        cancels it once the grace is over (`interrupting` tells that cancel from a client that left)."""
        self.detached.add(task)
        task.add_done_callback(self.detached.discard)
        metrics.generation_started(task)  # an open stream until it ends, as a chat's generation
        self._drain_late()
        return task

    def _drain_late(self) -> None:
        """A generation (or completion) started once the shutdown began (its send was past its check): when the
        drain already returned, having found nothing to wait for, it runs again, within the same grace. Else
        nothing would end this one when the grace runs out: the server waits for its open connection (longer
        than the grace) before the application shutdown drains again, and then cuts the stream, with no
        terminal event."""
        if self._closing and self._draining is not None and self._draining.done():
            self._draining = asyncio.get_running_loop().create_task(self._drain(), name="generations-drain")

    def start(self, new: message_service.NewGeneration) -> Generation:
        generation = Generation(new=new)
        if self._deleted_early and self._deleted_early.pop(new.assistant_id, None) is not None:
            generation.stopping = True  # `_run` calls no one; the final write finds no row: `chat_deleted`
        if new.callbacks:
            generation.inbox = CallbackInbox(self.settings, asyncio.get_running_loop().time())
        question = new.take_user_message()
        generation.add_event("start", {"user_message": question, "assistant_message_id": new.assistant_id})
        generation.add_event("status", WAITING)
        key = new.assistant_id
        self.running[key] = generation
        self.logs[key] = generation
        self.by_chat[new.chat_id] = key
        if self.shared is not None:
            self.shared.attach(generation)
        self._launch(generation)
        return generation

    def _launch(self, generation: Generation, *, cut: bool = False) -> None:
        """The generation's task (`_run`); `cut`: its first task was cancelled before it started (`_ended`)."""
        task = asyncio.create_task(self._run(generation, cut=cut), name=f"generation-{generation.new.assistant_id}")
        generation.task = task
        metrics.generation_started(task)  # metrics hook (app.metrics): an open stream until the task ends
        task.add_done_callback(lambda t: self._ended(generation, t, relaunched=cut))
        self._drain_late()

    def _ended(self, generation: Generation, task: asyncio.Task[None], *, relaunched: bool = False) -> None:
        """The task is over: its log stays followable for STREAM_LOG_TTL, without the text kept for storage.

        A task cancelled before its first step never ran its coroutine: nothing of `_run` (its final write, its
        terminal event) ran, its readers got keep-alives only and its row stayed `streaming` until recovery. The
        registry's own stop and drain never do that; whatever did, a new task runs `_run` once more, which calls
        no one and ends `interrupted` (`cancelled` after a stop). A check per ended task, nothing per send. Once
        only: whatever cancels every task it meets (a loop being closed) must not meet a new one for ever."""
        if task.cancelled() and not generation.finishing and not relaunched:
            self._launch(generation, cut=True)
            return
        key = generation.new.assistant_id
        self.running.pop(key, None)
        generation.release()
        asyncio.get_running_loop().call_later(self.settings.STREAM_LOG_TTL, self._forget, generation)

    def _forget(self, generation: Generation) -> None:
        new = generation.new
        if self.logs.get(new.assistant_id) is generation:
            del self.logs[new.assistant_id]
        if self.by_chat.get(new.chat_id) == new.assistant_id:
            del self.by_chat[new.chat_id]

    def find(self, chat_id: uuid.UUID, assistant_id: str | None) -> Generation | None:
        """The chat's current generation on this instance (or the one named), running or recently ended."""
        key = assistant_id if assistant_id is not None else self.by_chat.get(chat_id)
        generation = self.logs.get(key) if key is not None else None
        if generation is None or generation.new.chat_id != chat_id:
            return None
        return generation

    def running_in(self, chat_id: uuid.UUID) -> Generation | None:
        generation = self.find(chat_id, None)
        return generation if generation is not None and generation.terminal is None else None

    async def follow(self, chat_id: uuid.UUID, assistant_id: str | None, after: int) -> AsyncIterator[bytes] | None:
        """The SSE bytes after event `after` of the chat's current (or the named) generation, live up to its
        terminal event: from this instance's log, else from the shared one. None: nothing to follow."""
        ping = self.settings.STREAM_PING_INTERVAL
        if assistant_id is None and self.shared is not None and self.running_in(chat_id) is None:
            # The chat's latest generation may have started on another instance since ours ended.
            try:
                assistant_id = await self.shared.current(chat_id)
            except Exception as exc:
                logger.warning("redis unreachable, following on this instance only (%s)", type(exc).__name__)
        local = self.find(chat_id, assistant_id)
        if local is not None:
            if local.terminal is not None and after >= local.last_id:
                return None
            return local.sse(ping, after)
        if self.shared is None:
            return None
        try:
            frames = await self.shared.follow(chat_id, assistant_id, after, ping)
        except Exception as exc:
            logger.warning("redis unreachable, following on this instance only (%s)", type(exc).__name__)
            return None
        return None if frames is None else self._relayed(frames)

    async def replay(self, recorded: idempotency.Recorded, *, session: AsyncSession) -> AsyncIterator[bytes]:
        """A retried send's answer: the same stream again, every event with its id (from this instance's log,
        else the shared one), else rebuilt from what is stored once the live events are gone."""
        ping = self.settings.STREAM_PING_INTERVAL
        chat_id, assistant_id = recorded.chat_id, recorded.assistant_message_id
        # Read first: a chat deleted since is a 404 at once, not its events again while they are kept.
        found = await message_service.get_public_messages(session, chat_id, [recorded.user_message_id])
        if not found:
            raise NotFound(CHAT_NOT_FOUND)
        local = self.find(chat_id, assistant_id)
        if local is not None:
            return local.sse(ping)
        if self.shared is not None:
            try:
                frames = await self.shared.follow(chat_id, assistant_id, 0, ping)
            except Exception as exc:
                logger.warning("redis unreachable, retry answered from storage (%s)", type(exc).__name__)
                frames = None
            if frames is not None:
                return self._relayed(frames)
        return self._relayed(rebuilt_stream(self.db, chat_id, found[0], assistant_id, ping))

    async def _relayed(self, frames: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        """`frames` of an answer this instance does not run, until this instance leaves (`_leaving`).

        The drain ends this instance's own answers, not another's, and the server waits for every open
        response before it stops: such a stream held it until its graceful-shutdown timeout (for ever without
        one: a callback-mode answer may run an hour), which then cut it mid-response. Ended cleanly instead,
        without a terminal event (the answer goes on elsewhere), the client follows it again after the last
        id it got, on an instance that stays.
        """
        leaving = asyncio.ensure_future(self._leaving.wait())
        step: asyncio.Future[bytes] | None = None
        try:
            while True:
                step = asyncio.ensure_future(anext(frames))
                await asyncio.wait({step, leaving}, return_when=asyncio.FIRST_COMPLETED)
                if not step.done():
                    return
                try:
                    chunk = step.result()
                except StopAsyncIteration:
                    return
                step = None
                yield chunk
        finally:
            leaving.cancel()
            if step is not None and not step.done():
                step.cancel()
                await asyncio.gather(step, return_exceptions=True)
            if isinstance(frames, AsyncGenerator):
                await frames.aclose()

    async def stop_chat(self, chat_id: uuid.UUID) -> dict[str, Any] | None:
        """Stop the chat's running generation, on this instance or (through Redis) on the one running it.

        The stored message once it ended as `cancelled`; None when nothing was running to be stopped. Raises
        ServiceUnavailable when it runs on another instance that the stop cannot reach.
        """
        local = self.running_in(chat_id)
        if local is not None:
            stored = await self.stop(local)
            return stored if stored is not None and stored["status"] == "cancelled" else None
        if self.shared is None:
            return None
        async with self.db.autocommit() as session:
            running = await chats_service.streaming_message_id(session, chat_id)
        if running is None:
            return None
        # An answer runs elsewhere; a stop that cannot reach it (Redis down, or no instance acted on it in time:
        # its owner died, or has not subscribed again yet after losing its connection) is no "nothing runs" 409.
        unreachable = ServiceUnavailable(STOP_UNREACHABLE, headers={"Retry-After": "5"})
        within = self.settings.SHUTDOWN_GRACE_SECONDS + 5.0
        # Kept until an owner whose subscription was away (however it was lost) has subscribed again, even past
        # this wait: a stop that comes after its 503 still stops what was asked to stop.
        if not await self.shared.publish_stop(running, lasting=within + resubscribed_within()):
            raise unreachable
        stored = await wait_until_final(self.db, chat_id, running, within)
        if stored is not None and stored["status"] == "streaming":
            raise unreachable
        return stored if stored is not None and stored["status"] == "cancelled" else None

    async def chat_deleted(self, assistant_id: str | None) -> None:
        """A deleted chat's running answer (read before the deletion) is stopped here or, through Redis, where it
        runs, as a stop would: n8n's request is closed, and its streams end `chat_deleted` (there is no message
        to store). Not waited for: the deletion is done."""
        if assistant_id is None:
            return
        if assistant_id in self.running:
            await self._stop_requested(assistant_id)
            return
        # Not running here (yet): perhaps its send, on this instance, has stored its rows but not registered it.
        now = asyncio.get_running_loop().time()
        for early, at in list(self._deleted_early.items()):
            if now - at > DELETED_EARLY_KEPT:
                del self._deleted_early[early]
        self._deleted_early[assistant_id] = now
        if self.shared is not None:
            # Kept for the answer's longest life: whenever its owner subscribes again, nothing of it is wanted.
            s = self.settings
            await self.shared.publish_stop(assistant_id, lasting=max(s.N8N_TOTAL_TIMEOUT, s.CALLBACK_TOTAL_TIMEOUT))

    async def _stop_requested(self, assistant_id: str) -> None:
        """Another instance asked to stop a generation: this one stops it if it runs it."""
        generation = self.running.get(assistant_id)
        if generation is not None:
            task = asyncio.create_task(self.stop(generation), name=f"stop-{assistant_id}")
            self._stopping.add(task)
            task.add_done_callback(self._stopping.discard)

    async def _stops_missed(self) -> None:
        """The stop channel is subscribed (again): stop the generations of this instance whose stop was published
        while it was not (their stop requests are still kept). Runs only then, never on a send."""
        if self.shared is not None and self.running:
            for assistant_id in await self.shared.stops_requested(list(self.running)):
                await self._stop_requested(assistant_id)

    # --- progress callbacks (app.callbacks) -------------------------------------------------------
    def deliver(self, assistant_id: str, body: dict[str, Any]) -> bool:
        """Apply one validated callback to a generation (or `/v1` completion) of this instance; False when it
        is not running here (or its outcome is already decided: the first terminal won)."""
        generation = self.running.get(assistant_id)
        if generation is None:
            completion = self.completion_inboxes.get(assistant_id)
            if completion is None or not completion.open:
                return False
            # A completion has no place for steps (OpenAI's chunks carry text only): they are not relayed.
            _apply_callback(completion, body, None)
            return True
        inbox = generation.inbox
        if inbox is None or not inbox.open or generation.finishing:
            return False
        _apply_callback(inbox, body, generation.add_event)
        return True

    async def callback(self, assistant_id: str, body: dict[str, Any]) -> bool:
        """A callback for `assistant_id`: applied here, or relayed (Redis) to the instance running it.

        False when no instance runs it. Raises ServiceUnavailable when it runs elsewhere and Redis is down.
        """
        if assistant_id in self.running or assistant_id in self.completion_inboxes:
            return self.deliver(assistant_id, body)
        if self.shared is None:
            return False
        completion = await self.shared.is_callback_target(assistant_id)  # a `/v1` completion elsewhere?
        if completion is None:  # Redis is unreachable: neither known nor relayable (n8n may retry a 503)
            raise ServiceUnavailable(CALLBACK_UNRELAYED)
        if not completion and not await self._streaming(assistant_id):
            return False
        # Answered once the owner applied it: n8n posts the next callback only then, and it may reach the owner
        # directly (a `done` overtaking the relayed text it follows).
        applied = await self.shared.relay_callback(assistant_id, body)
        if applied is None:
            # No owner answered: its generation ended meanwhile (404, as any later post), or it (or Redis) cannot
            # be reached now; n8n's Retry On Fail sends it again.
            if completion:
                gone = await self.shared.is_callback_target(assistant_id) is False
            else:
                gone = not await self._streaming(assistant_id)
            if gone:
                return False
            raise ServiceUnavailable(CALLBACK_UNRELAYED, headers={"Retry-After": "5"})
        return applied

    async def _streaming(self, assistant_id: str) -> bool:
        async with self.db.autocommit() as session:
            return await message_service.is_streaming(session, assistant_id)

    async def _relayed_callback(self, assistant_id: str, body: dict[str, Any], reply: str | None) -> None:
        """Another instance received a callback: this one applies it if it runs that generation, and tells the
        instance waiting to answer n8n whether it did (the others stay silent)."""
        if assistant_id not in self.running and assistant_id not in self.completion_inboxes:
            return
        if reply is None or self.shared is None:  # relayed by an instance that waits for no answer
            self.deliver(assistant_id, body)
            return
        if not await self.shared.claim_callback(reply):
            return  # too late: it was answered 503, and n8n sends it again
        await self.shared.answer_callback(reply, self.deliver(assistant_id, body))

    async def stop(self, generation: Generation) -> dict[str, Any] | None:
        """Stop a generation of this instance; the stored message once it ended (status `cancelled` unless
        the natural end got there first: exactly one final write happens either way)."""
        task = generation.task
        if not generation.finishing and task is not None and not task.done():
            generation.stopping = True
            if generation.new.assistant_started is not None:
                task.cancel()
            # Else the task has not taken its first step: a cancel now would end it before its body (and its
            # final write) runs. `_run` sees `stopping` as it starts, calls no one and stores `cancelled`.
        await generation.ended()
        return generation.stored

    async def _run(self, generation: Generation, *, cut: bool = False) -> None:
        new = generation.new
        s = self.settings
        loop = asyncio.get_running_loop()
        started = loop.time()
        stats = StreamStats()
        checkpoint = _Checkpointer(self, generation)

        def on_chunks(chunks: list[str]) -> None:
            generation.add_chunks([clean_text(c) for c in chunks])
            checkpoint.touch()

        failure: StreamFailure | None = None
        cancelled = stopped = False
        if generation.inbox is not None:
            generation.inbox.on_text = on_chunks
        new.stamp_assistant()
        try:
            try:
                headers = decrypt_headers(new.webhook_headers_encrypted, s.fernet)
            except DecryptionError:
                raise StreamFailure(
                    "agent_misconfigured",
                    "The agent's settings cannot be read; ask an admin to save its webhook headers again",
                    detail={"reason": "webhook headers cannot be decrypted with the configured key"},
                ) from None
            if new.response_mode == "callback" and generation.inbox is None:
                # Saved while PUBLIC_BASE_URL was set, run by a server without it: the workflow has nowhere to
                # post its answer, and its immediate acknowledgement is no answer. n8n is not called.
                raise StreamFailure(
                    "agent_misconfigured",
                    CALLBACK_WITHOUT_URL,
                    detail={"reason": "response_mode callback without PUBLIC_BASE_URL"},
                )
            if generation.stopping:  # stopped before it started (see `stop`)
                stopped = True
            elif self.interrupting or cut:
                # Started after the shutdown's grace ran out (see `_drain`), or again for a task cancelled before
                # its first step (see `_ended`): call no one, end as a cancelled one does.
                cancelled = True
                failure = StreamFailure("interrupted", "The server stopped before the answer was complete")
            else:
                await self._call(generation, headers, on_chunks, stats)
        except StreamFailure as exc:
            failure = exc
        except asyncio.CancelledError:
            if generation.stopping:
                # A stop, not a shutdown: the task goes on to store the partial answer as `cancelled`.
                stopped = True
                current = asyncio.current_task()
                if current is not None:
                    current.uncancel()
            else:
                cancelled = True
                failure = StreamFailure(
                    "interrupted",
                    "The server stopped before the answer was complete",
                    upstream_status=stats.upstream_status,
                )
        except Exception as exc:
            logger.exception("generation %s failed", new.assistant_id)
            failure = StreamFailure(
                "internal_error", "The answer could not be completed", detail={"error": type(exc).__name__}
            )
        if stats.upstream_status is not None:  # n8n answered: worth connecting to ahead of the next send
            self._remember_webhook(new)
        # From here on a stop no longer cancels the task: the outcome decided above is the one stored.
        generation.finishing = True
        inbox = generation.inbox
        if inbox is not None:
            inbox.closed = True
        duration_ms = round((loop.time() - started) * 1000, 1)
        metadata = {
            "chunks": len(generation.chunks),
            "duration_ms": duration_ms,
            "ttfb_ms": stats.ttfb_ms,
            "ttfc_ms": stats.ttfc_ms,
            "upstream_status": stats.upstream_status,
            "format": stats.format,
            "tokens_in": None if stats.usage is None else stats.usage[0],
            "tokens_out": None if stats.usage is None else stats.usage[1],
        }
        if inbox is not None:
            # Callbacks: the steps, and token usage reported by the workflow (it wins over the webhook's).
            metadata.update(inbox.metadata())
            if inbox.usage is not None:
                metadata["tokens_in"], metadata["tokens_out"] = inbox.usage
            if new.response_mode == "callback":
                metadata["response_mode"] = "callback"
        outcome = "cancelled" if stopped else "interrupted" if cancelled else "complete" if failure is None else "error"
        await _shielded(self._finish(generation, failure, metadata, checkpoint, outcome=outcome))
        if cancelled:
            raise asyncio.CancelledError

    async def _call(
        self,
        generation: Generation,
        headers: dict[str, str],
        on_chunks: Callable[[list[str]], None],
        stats: StreamStats,
    ) -> None:
        """Call the webhook and wait for the answer's end; raise StreamFailure for a failed one.

        Without callbacks the webhook's answer is the whole story. With them, the first terminal wins: a
        `done`/`error` callback ends the generation even while the webhook still streams (its request is then
        closed), and in callback mode the webhook's answer only counts when it is an error that means the
        workflow did not run; the answer then ends by callback, or by callback mode's own timeouts.
        """
        new = generation.new
        inbox = generation.inbox
        callback_mode = new.response_mode == "callback" and inbox is not None

        def ignore(_chunks: list[str]) -> None:
            return None

        payload = new.take_payload()
        attachments = await self._file_bytes(new, payload)
        call = self.streamer.run(
            url=new.webhook_url,
            headers=headers,
            payload=payload,
            on_chunks=ignore if callback_mode else on_chunks if inbox is None else inbox.counting(on_chunks),
            stats=stats,
            attachments=attachments,
        )
        if inbox is None:
            await call  # in this task: a task of its own per stream cost memory and CPU for nothing
            return
        await self._with_callbacks(call, inbox, callback_mode=callback_mode, stats=stats)

    async def call_completion(
        self,
        callback_id: str,
        *,
        callback_mode: bool,
        url: str,
        headers: dict[str, str],
        payload: dict[str, Any],
        on_chunks: Callable[[list[str]], None],
        stats: StreamStats,
    ) -> None:
        """A `/v1` completion whose n8n request carries a callback URL (`callback_id`): its callbacks append
        text, report usage and end it, as for a chat's generation (`_call`); raise StreamFailure for a
        failed one. Another instance receiving its callbacks relays them here (a Redis key says it runs)."""
        inbox = CallbackInbox(self.settings, asyncio.get_running_loop().time())
        inbox.on_text = on_chunks
        s = self.settings
        lifetime = (s.CALLBACK_TOTAL_TIMEOUT if callback_mode else s.N8N_TOTAL_TIMEOUT) + 60
        marked = False

        def ignore(_chunks: list[str]) -> None:
            return None

        try:
            self.completion_inboxes[callback_id] = inbox
            if self.shared is not None:
                marked = await self.shared.mark_callback_target(callback_id, lifetime)
            call = self.streamer.run(
                url=url,
                headers=headers,
                payload=payload,
                on_chunks=ignore if callback_mode else inbox.counting(on_chunks),
                stats=stats,
            )
            await self._with_callbacks(call, inbox, callback_mode=callback_mode, stats=stats)
        finally:
            inbox.closed = True
            self.completion_inboxes.pop(callback_id, None)
            if inbox.usage is not None:
                stats.usage = inbox.usage
            if marked and self.shared is not None:
                await self.shared.unmark_callback_target(callback_id)

    async def _with_callbacks(
        self, call: Coroutine[Any, Any, None], inbox: CallbackInbox, *, callback_mode: bool, stats: StreamStats
    ) -> None:
        """The webhook's call and the callbacks together: the first terminal wins (`_call`)."""
        webhook = asyncio.ensure_future(call)
        ended = asyncio.ensure_future(inbox.ended.wait())
        try:
            if callback_mode:
                await self._await_callbacks(webhook, ended, inbox)
            else:
                await asyncio.wait({webhook, ended}, return_when=asyncio.FIRST_COMPLETED)
                if not inbox.ended.is_set():
                    inbox.closed = True
                    webhook.result()  # the webhook's answer ended first: it is the outcome
                    return
            inbox.closed = True
            if inbox.too_large is not None:
                limit = inbox.max_text_bytes
                raise StreamFailure(
                    "bad_upstream_response",
                    "The agent's answer exceeded the answer size limit",
                    upstream_status=stats.upstream_status,
                    detail={"reason": f"answer > {limit}", "via": inbox.too_large},
                )
            if inbox.error is not None:
                raise StreamFailure(
                    "upstream_error", inbox.error, upstream_status=stats.upstream_status, detail={"via": "callback"}
                )
            if inbox.text_bytes == 0:
                # `done` with no text by either path: an empty answer, as a streamed one without text is.
                raise StreamFailure(
                    "empty_response", EMPTY_ANSWER, upstream_status=stats.upstream_status, detail={"via": "callback"}
                )
        finally:
            for task in (webhook, ended):
                task.cancel()
            await asyncio.gather(webhook, ended, return_exceptions=True)

    async def _file_bytes(self, new: message_service.NewGeneration, payload: dict[str, Any]) -> list[Attachment] | None:
        """Inline and multipart delivery read the files' bytes now (a short session), not while the request ran:
        `base64` puts them in the JSON body's `files[].data`, `multipart` returns them as the request's parts."""
        if not new.file_ids or new.file_delivery == "url":
            return None
        async with self.db.sessionmaker() as session:
            data = await files_service.load_bytes(session, new.chat_id, new.file_ids)
        entries: list[dict[str, Any]] = payload.get("files", [])
        if new.file_delivery == "base64":
            files_service.inline(entries, data)
            return None
        return [Attachment(e["filename"], e["mimeType"], data[e["id"]]) for e in entries]

    async def _await_callbacks(
        self, webhook: asyncio.Future[None], ended: asyncio.Future[Any], inbox: CallbackInbox
    ) -> None:
        """Callback mode: until `done`/`error` arrives, a fatal webhook failure, or a callback-mode timeout."""
        s = self.settings
        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + s.CALLBACK_TOTAL_TIMEOUT
        while not inbox.ended.is_set():
            now = loop.time()
            silent_until = inbox.last_at + s.CALLBACK_SILENCE_TIMEOUT
            if now >= give_up_at:
                inbox.closed = True
                raise StreamFailure(
                    "upstream_timeout",
                    "The agent's answer took too long",
                    detail={"timeout": "callback_total", "seconds": s.CALLBACK_TOTAL_TIMEOUT},
                )
            if now >= silent_until:
                inbox.closed = True
                raise StreamFailure(
                    "upstream_timeout",
                    "The agent stopped reporting progress",
                    detail={"timeout": "callback_silence", "seconds": s.CALLBACK_SILENCE_TIMEOUT},
                )
            waiting: set[asyncio.Future[Any]] = {ended}
            if not webhook.done():
                waiting.add(webhook)
            await asyncio.wait(
                waiting, timeout=min(silent_until, give_up_at) - now, return_when=asyncio.FIRST_COMPLETED
            )
            if webhook.done() and not webhook.cancelled() and not inbox.ended.is_set():
                exc = webhook.exception()
                if exc is not None and not outlived_in_callback_mode(exc):
                    inbox.closed = True
                    raise exc

    async def _finish(
        self,
        generation: Generation,
        failure: StreamFailure | None,
        metadata: dict[str, Any],
        checkpoint: _Checkpointer,
        *,
        outcome: str,
    ) -> None:
        """The single final write, then the terminal event (so a reload after `done` shows the message).

        `outcome` is the stored status: `complete`, `cancelled` (stopped: `done` with the partial text),
        `error` or `interrupted` (`failure` says why).
        """
        await checkpoint.close()
        new = generation.new
        error = None if failure is None else {"message": failure.message, "code": failure.code}
        content = "".join(generation.chunks)
        kept = {k: v for k, v in metadata.items() if v is not None}
        # The message, its usage ledger row and, on failure, its error_logs row: one statement on PostgreSQL (one
        # round trip, no transaction around it), one transaction on SQLite (app.services.messages.finish_message).
        written = await self._write_final(
            new,
            content=content,
            status=outcome,
            error=error,
            metadata=kept,
            failure=failure,
            # The terminal event's id (nothing is added to the log from `finishing` on but it).
            last_event_id=len(generation.frames) + 1,
        )
        if written is None:
            generation.finish("error", {"message": "The answer could not be stored", "code": "storage_error"})
            return
        stored, ours, present = written
        generation.stored = stored if present else None
        if ours:  # Metrics hook (app.metrics): the outcome, timings and error code of the stored answer.
            # Not when another writer ended it: recovery counted it, as it wrote its ledger row.
            metrics.generation_finished(
                outcome=stored["status"],
                agent_id=new.agent_id,
                error_code=None if stored["error"] is None else stored["error"].get("code"),
                metadata=metadata,
                pool_in_use=self.db.pool_in_use(),
            )
        if not present:  # its chat was deleted: the usage is counted, no message is (no `done` naming one)
            generation.finish("error", message_service.CHAT_DELETED)
        elif not ours:  # another writer ended it first (recovery, while this one could not reach the database)
            kind, data = terminal_of(stored) or ("error", message_service.INTERRUPTED)
            generation.finish(kind, data)
        elif error is None:
            generation.finish("done", {"message": stored})
        elif failure is not None and failure.retry_after is not None:
            # The wait n8n asked for is the event's only (the stored error is `message` and `code`): it is
            # relative to now, and would be stale in a message read later.
            generation.refused_with = failure.upstream_status
            generation.finish("error", {**error, "retry_after": failure.retry_after})
        else:
            generation.finish("error", error)

    async def _write_final(
        self,
        new: message_service.NewGeneration,
        *,
        content: str,
        status: str,
        error: dict[str, str] | None,
        metadata: dict[str, Any],
        failure: StreamFailure | None,
        last_event_id: int,
    ) -> tuple[dict[str, Any], bool, bool] | None:
        """The final write, tried again while the database is briefly away (a failover, a restart, dropped
        connections): (the stored message, whether this write stored it, whether its row was there: False when
        its chat was deleted), or None once it gave up.

        Sending it again is safe: it writes nothing once the row is final (`finish_message` answers None). That
        row then holds this write (a try whose connection died under it had committed: its terminal event id
        tells) or another writer's (recovery marked it `interrupted` while this instance could not reach the
        database): the first final state wins, as everywhere. No new try once the shutdown began (it must
        end within its grace).
        """
        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + FINAL_WRITE_PATIENCE
        delays = iter(FINAL_WRITE_RETRY_DELAYS)
        while True:
            try:
                stored = await message_service.finish_message(
                    db=self.db,
                    new=new,
                    content=content,
                    status=status,
                    error=error,
                    metadata=metadata,
                    failure_detail=None if failure is None else {**failure.detail},
                    upstream_status=None if failure is None else failure.upstream_status,
                    last_event_id=last_event_id,
                )
                if stored is not None:
                    return stored.message, True, stored.kept
                # The row was final already: an earlier try had committed, or another writer ended it.
                state = await message_service.final_state(self.db, new.assistant_id)
                found = None
                if state is not None and state.last_event_id != last_event_id:
                    found = await stored_message(self.db, new.chat_id, new.assistant_id)
                if found is not None:
                    return found, False, True
                # Ours (its row since gone with its chat when `state` is None).
                view = message_service.final_view(new, content=content, status=status, error=error, metadata=metadata)
                return view, True, state is not None
            except Exception as exc:
                delay = next(delays, None)
                if delay is None or loop.time() + delay > give_up_at or self._closing:
                    logger.error("final write of %s failed", new.assistant_id, exc_info=exc)
                    return None
                logger.warning(
                    "final write of %s failed (%s), trying again in %.1f s", new.assistant_id, type(exc).__name__, delay
                )
            await asyncio.sleep(delay)


def _apply_callback(inbox: CallbackInbox, body: dict[str, Any], on_step: Callable[[str, Any], Any] | None) -> None:
    """One validated callback into an open inbox: a step (handed to `on_step`, a generation's `add_event`),
    text, usage, or the end."""
    inbox.last_at = asyncio.get_running_loop().time()
    kind = body["type"]
    if kind in ("status", "tool"):
        if on_step is not None:
            data = inbox.step(body)
            if data is not None:
                on_step(kind, data)
    elif kind == "message":
        kept = inbox.within_cap([body["content"]], "callback")
        if kept and inbox.on_text is not None:
            inbox.on_text(kept)
    elif kind == "usage":
        inbox.add_usage(body["input_tokens"], body["output_tokens"])
    else:
        inbox.end(body.get("message") if kind == "error" else None)


class _Checkpointer:
    """Saves a generation's partial text at most every STREAM_CHECKPOINT_INTERVAL seconds, off the read loop.

    New text arms one timer for the next allowed instant; the write runs as its own task, so reading from
    n8n never waits for the database. Text that arrives during a write arms the timer again afterwards.
    """

    __slots__ = (
        "closed",
        "generation",
        "interval",
        "loop",
        "next_at",
        "registry",
        "saved",
        "sharing",
        "task",
        "timer",
    )

    def __init__(self, registry: GenerationRegistry, generation: Generation) -> None:
        self.registry = registry
        self.generation = generation
        self.loop = asyncio.get_running_loop()
        self.interval = registry.settings.STREAM_CHECKPOINT_INTERVAL
        self.next_at = self.loop.time() + self.interval
        self.saved = 0
        self.timer: asyncio.TimerHandle | None = None
        self.task: asyncio.Task[None] | None = None
        self.closed = False
        #: The write in flight is still waiting for the shared log (nothing sent to the database yet).
        self.sharing = False

    def touch(self) -> None:
        if self.timer is None and self.task is None and not self.closed:
            self.timer = self.loop.call_at(self.next_at, self._fire)

    def _fire(self) -> None:
        self.timer = None
        if self.closed:
            return
        self.next_at = self.loop.time() + self.interval
        # Set before the task's first step: `close` may come first, and cancels a write not yet in the database.
        self.sharing = self.generation.shared_until is not None
        self.task = asyncio.create_task(self._write())

    async def _write(self) -> None:
        generation = self.generation
        chunks = generation.chunks
        count, events = len(chunks), len(generation.frames)
        new = generation.new
        try:
            if self.sharing and generation.shared_until is not None:
                # The shared log first: a crash then leaves the stored text no further than what followers on
                # other instances can read (their stream ends at the stored message). Bounded: a slow Redis
                # delays checkpoints by SHARED_LOG_WAIT at most.
                try:
                    async with asyncio.timeout(SHARED_LOG_WAIT):
                        await generation.shared_until(events)
                except TimeoutError:
                    pass
                finally:
                    self.sharing = False
            async with self.registry.db.autocommit() as session:
                await message_service.checkpoint_message(session=session, new=new, content="".join(chunks[:count]))
            self.saved = count
        except Exception:
            logger.exception("checkpoint of %s failed", new.assistant_id)
        finally:
            self.task = None
        if len(chunks) > self.saved:
            self.touch()

    async def close(self) -> None:
        """Before the final write: no new checkpoint, and wait for one in flight."""
        self.closed = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.task is not None:
            if self.sharing:
                self.task.cancel()  # not in the database yet: the final write stores all of it anyway
            await asyncio.gather(self.task, return_exceptions=True)
            self.task = None  # (a task cancelled before its first step never ran its own `finally`)


async def _shielded(coro: Coroutine[Any, Any, None]) -> None:
    """Run `coro` to completion even if the caller is cancelled meanwhile (the cancel is re-raised after)."""
    task = asyncio.ensure_future(coro)
    cancelled = False
    while not task.done():
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            cancelled = True
    task.result()
    if cancelled:
        raise asyncio.CancelledError
