"""Reading a generation's events again: the shared Redis log (Streams), and streams rebuilt from storage.

The owning instance keeps each generation's log in memory (`app.sse.Generation`, `GenerationRegistry.logs`).
With Redis, every event is also written to a Redis Stream under its own id (`<n>-0`), so a follower on any
instance replays and follows the same events with the same ids; the stream expires STREAM_LOG_TTL after the
generation's end. Redis is an accelerator: when it is unreachable the writer retries, followers fall back to
the stored message, and nothing that runs on this instance waits for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.client import PubSub

from app.config import Settings
from app.db import Database
from app.services.messages import final_state, get_public_messages
from app.sse import PING, Generation, frame

logger = logging.getLogger(__name__)

#: Published with an assistant message id: the instance running that generation stops it.
STOP_CHANNEL = "generations:stop"
#: Set (`{STOP_REQUEST}{assistant id}`, for a while) with every stop published: pub/sub delivers a message only
#: to the subscriptions alive when it is published, so an owner whose subscription was away (its connection
#: lost, or dropped silently and not found out yet) reads these keys when it subscribes again, and a generation's
#: first write to its log reads its own key (a stop published after its row was stored but before this instance
#: knew it ran it).
STOP_REQUEST = "stop-request:"
#: Published with `{"id": assistant message id, "body": callback, "reply": token}`: the instance running it
#: applies it, then pushes "1" (applied) or "0" (refused: its outcome was decided) to `{CALLBACK_REPLY}{token}`.
CALLBACK_CHANNEL = "generations:callback"
CALLBACK_REPLY = "callback-reply:"
#: How long the instance that received a callback waits for its owner to apply it (seconds, within
#: REPLY_TIMEOUT): n8n posts the next callback only once this one is answered, so answering before the owner
#: applied it let the next one, received by the owner itself, be applied first.
RELAY_WAIT = 3.0
#: Whoever sets `{CALLBACK_CLAIM}{token}` first decides a relayed callback's fate: the owner, before applying
#: it, or the receiving instance, once it stopped waiting (it then answers 503, and n8n's retry must not find
#: the callback applied late as well).
CALLBACK_CLAIM = "callback-claim:"
#: The receiving instance's claim (it gave up) is kept for the answer's longest life: an owner that hears the
#: relayed message late (its listener behind) must still find it, however late, while it runs the answer. The
#: owner's is kept CLAIM_TTL (below).
#: At most this share of the Redis client's connections (100 by default, shared with the rate limits, the
#: event logs, stops and follows) waits for relayed callbacks' replies at once: one each, and owners that do
#: not answer (one died with its answers still running) would take them all. Past it, a 503 at once.
RELAY_POOL_SHARE = 0.25
#: At most this share of them blocks in followers' reads (`XREAD BLOCK`, up to READ_BLOCK_MAX each): one per
#: follower, and 100 browser tabs following answers of another instance took them all. Past it, a follower
#: polls (`_PoolShare`). With the relays' share, a quarter is always left to the short commands.
FOLLOW_POOL_SHARE = 0.5
#: Set while a `/v1` completion takes callbacks (`{key}{callback id}`), with its longest life as expiry.
COMPLETION_KEY = "completion-callbacks:"
#: Polling the stored message while a stream is rebuilt from storage, and the Redis log while a follower
#: finds no share of the pool free to block in (seconds).
STORAGE_POLL = 0.5
#: How long the writer keeps retrying an unreachable Redis after the generation ended (seconds).
RETRY_AFTER_END = 30.0
#: While an answer streams, its events go to Redis at most this often (seconds), in one pipeline: one per
#: chunk cost ~0.13 ms of CPU each, more than the rest of the relay's work per chunk (docs/PERFORMANCE.md).
#: The first batch (the `start` event and the chat's pointer) and the terminal event are written at once; a
#: follower on another instance sees the text at most this much later than one on the generating instance.
MIRROR_INTERVAL = 0.1
#: How long any Redis reply may take before its connection counts as dead and is replaced (`connect`). A
#: follow's blocking read waits at most READ_BLOCK_MAX at a time, within it.
REPLY_TIMEOUT = 5.0
READ_BLOCK_MAX = 4.0
#: The stop and callback channels wait for a message this long at a time (seconds); after LISTEN_IDLE without
#: hearing Redis they ping it, and a connection whose pong has not come within PONG_WAIT is given up.
LISTEN_POLL = 1.0
LISTEN_IDLE = 10.0
PONG_WAIT = 5.0
#: A lost subscription is tried again after this pause (seconds); a new connection may take CONNECT_TIMEOUT.
RESUBSCRIBE_PAUSE = 1.0
CONNECT_TIMEOUT = 2.0
#: The one client's connections (redis-py's default count), and how long a command waits for one of them while
#: all are in use (a burst of short commands: every stream's writer batch at once on a loaded instance) before
#: it fails as a connection that could not be made would.
POOL_SIZE = 100
POOL_WAIT = CONNECT_TIMEOUT
#: How long the owner's claim on a relayed callback is kept (seconds): past the receiving instance's longest way
#: from its publish to its own claim, when Redis is slow or its connection lost (the publish, the wait for the
#: reply, a claim and, the owner's claim found, a second wait and a claim; each allowed a pool wait, a new
#: connection and a reply deadline: ~42 s), twice over. A claim gone before then let a receiving instance whose
#: wait failed claim a callback the owner had applied, answer 503, and n8n's retry apply it again.
CLAIM_TTL = 2 * math.ceil(2 * RELAY_WAIT + 4 * (POOL_WAIT + CONNECT_TIMEOUT + REPLY_TIMEOUT))


def resubscribed_within() -> float:
    """The longest a listener goes without a subscription when its connection dropped silently (the slowest
    case to find out): LISTEN_IDLE of silence, a ping, PONG_WAIT for its pong (each seen within a LISTEN_POLL),
    the pause and a new connection. A stop request's key outlives its publish by at least this much."""
    return LISTEN_IDLE + PONG_WAIT + 2 * LISTEN_POLL + RESUBSCRIBE_PAUSE + CONNECT_TIMEOUT


def connect(settings: Settings) -> Redis | None:
    """The one Redis client of an app instance (None without REDIS_URL).

    Every reply has a deadline (REPLY_TIMEOUT, set here rather than left to the client library's default): a
    connection dropped silently on the way (a NAT's or load balancer's idle timeout, a failover that drops
    packets instead of refusing them) fails and is replaced instead of hanging what waits on it. The short
    connect timeout lets the fallbacks answer at once while Redis is down.

    A command finding every connection in use waits for one (POOL_WAIT): redis-py's default pool refuses it at
    once ("Too many connections"): a burst of a few hundred commands in the same instant (a loaded instance's
    writer batches, its rate-limit counts) failed as if Redis were down, and the writers backed off while
    followers elsewhere fell back to storage, the rate limits to per-process counts.
    """
    if not settings.REDIS_URL:
        return None
    pool = BlockingConnectionPool.from_url(
        settings.REDIS_URL,
        max_connections=POOL_SIZE,
        timeout=POOL_WAIT,
        socket_connect_timeout=CONNECT_TIMEOUT,
        socket_timeout=REPLY_TIMEOUT,
    )
    return Redis.from_pool(pool)


def log_key(chat_id: uuid.UUID, assistant_id: str) -> str:
    """The Redis Stream of one generation; the chat is part of the name, so an id of another chat finds nothing."""
    return f"genlog:{chat_id}:{assistant_id}"


def chat_key(chat_id: uuid.UUID) -> str:
    """The chat's latest generation (its assistant message id), while its log exists."""
    return f"genchat:{chat_id}"


def terminal_of(message: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """The terminal event a stored, final message stands for (None while it is still `streaming`)."""
    status = message["status"]
    if status == "streaming":
        return None
    if status in ("complete", "cancelled"):
        return "done", {"message": message}
    error = message.get("error") or {}
    return "error", {
        "message": error.get("message") or "The answer was not completed",
        "code": error.get("code") or status,
    }


async def stored_message(db: Database, chat_id: uuid.UUID, message_id: str) -> dict[str, Any] | None:
    async with db.autocommit() as session:
        found = await get_public_messages(session, chat_id, [message_id])
    return found[0] if found else None


async def wait_until_final(db: Database, chat_id: uuid.UUID, message_id: str, within: float) -> dict[str, Any] | None:
    """The stored message once it is no longer `streaming` (None if it is not there or still streaming)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        message = await stored_message(db, chat_id, message_id)
        if message is None or message["status"] != "streaming" or loop.time() >= deadline:
            return message
        await asyncio.sleep(0.05)


async def _stored_terminal_id(db: Database, message_id: str) -> int | None:
    """The terminal event id the answer's final write stored (None: none did, e.g. it was interrupted)."""
    state = await final_state(db, message_id)
    return None if state is None else state.last_event_id


def rebuilt_ids(last_event_id: int | None, has_text: bool) -> tuple[int, int]:
    """The ids of a rebuilt stream's `message` and terminal events. With the stored terminal id the stream ends
    under the id it had (its text, one event, under the id before), so a client that skips the ids it has seen
    still gets the end; else (an answer no final write ended) 2 and 3."""
    if last_event_id is not None and last_event_id >= (4 if has_text else 3):
        return last_event_id - 1, last_event_id
    return 2, 3 if has_text else 2


async def rebuilt_stream(
    db: Database, chat_id: uuid.UUID, user_message: dict[str, Any] | None, assistant_id: str, ping: float
) -> AsyncIterator[bytes]:
    """A finished (or still running elsewhere) generation told again from storage: `start` (id 1), its text in
    one `message` event, and its terminal event under the id it had (`rebuilt_ids`). While it is still
    `streaming`, pings until it ends."""
    yield frame(1, "start", {"user_message": user_message, "assistant_message_id": assistant_id})
    loop = asyncio.get_running_loop()
    ping_at = loop.time() + ping
    while True:
        message = await stored_message(db, chat_id, assistant_id)
        if message is None:
            yield frame(2, "error", {"message": "The answer is no longer stored", "code": "not_found"})
            return
        terminal = terminal_of(message)
        if terminal is not None:
            text = message["content"]
            text_id, terminal_id = rebuilt_ids(await _stored_terminal_id(db, assistant_id), bool(text))
            chunks = [frame(text_id, "message", {"content": text})] if text else []
            chunks.append(frame(terminal_id, *terminal))
            yield b"".join(chunks)
            return
        await asyncio.sleep(STORAGE_POLL)
        if loop.time() >= ping_at:
            yield PING
            ping_at = loop.time() + ping


class _PoolShare:
    """A share of the Redis client's connections that one kind of long wait may hold at once. Each wait holds
    one connection of the client's one pool (it cannot be shared while it blocks); without a cap, enough of
    them took every connection, and all other Redis work of the instance (rate limits, event-log writers,
    stops) failed at once with 'Too many connections'. Counted here, in the one event loop: no lock."""

    __slots__ = ("most", "taken")

    def __init__(self, redis: Redis, share: float) -> None:
        self.most = max(1, int(redis.connection_pool.max_connections * share))
        self.taken = 0

    @contextlib.contextmanager
    def hold(self) -> Iterator[bool]:
        """One of the share for the block's life (True), or False, taking nothing, while all are held."""
        if self.taken >= self.most:
            yield False
            return
        self.taken += 1
        try:
            yield True
        finally:
            self.taken -= 1


class RedisEventLog:
    """The generations' events in Redis Streams (one per generation), and the stop channel between instances."""

    def __init__(self, redis: Redis, settings: Settings, db: Database) -> None:
        self.redis = redis
        self.settings = settings
        self.db = db
        self.writers: set[asyncio.Task[None]] = set()
        self._failing = False
        #: Relayed callbacks waiting for their owner's reply (`relay_callback`), followers blocking in a read.
        self.relays = _PoolShare(redis, RELAY_POOL_SHARE)
        self.follows = _PoolShare(redis, FOLLOW_POOL_SHARE)
        #: The stop listener's handler (`listen_for_stops`), also given a stop kept for a generation that this
        #: instance did not run yet when it was published (`_Mirror`'s first batch reads it).
        self.on_stop: Callable[[str], Awaitable[None]] | None = None

    # --- writing ---------------------------------------------------------------------------------
    def attach(self, generation: Generation) -> None:
        """Mirror every event of `generation` (from now on, and those already in its log) to Redis."""
        mirror = _Mirror(self, generation)
        generation.on_event = mirror.notify
        generation.shared_until = mirror.until
        mirror.notify(generation)

    def _report(self, failing: bool, exc: BaseException | None = None) -> None:
        """Log once when Redis becomes unreachable and once when it is back (not once per event)."""
        if failing and not self._failing:
            logger.warning("redis unreachable, generation logs kept locally (%s)", type(exc).__name__)
        elif not failing and self._failing:
            logger.warning("redis reachable again, generation logs shared again")
        self._failing = failing

    async def drain(self, within: float) -> None:
        """At shutdown: let the writers put the last events (the terminal ones) into Redis."""
        if self.writers:
            await asyncio.wait(list(self.writers), timeout=within)
        for task in list(self.writers):
            task.cancel()

    # --- reading ---------------------------------------------------------------------------------
    async def current(self, chat_id: uuid.UUID) -> str | None:
        value = await self.redis.get(chat_key(chat_id))
        return value.decode() if isinstance(value, bytes) else value

    async def follow(
        self, chat_id: uuid.UUID, assistant_id: str | None, after: int, ping: float
    ) -> AsyncIterator[bytes] | None:
        """The events after `after` of the chat's latest (or the named) generation from Redis, then the live
        ones; None when Redis has no such log or nothing comes after `after`."""
        if assistant_id is None:
            assistant_id = await self.current(chat_id)
            if assistant_id is None:
                return None
        key = log_key(chat_id, assistant_id)
        last = await _last_entry(self.redis, key)
        if last is None:
            return None
        if last[1].get(b"e") and last[0] <= after:
            return None  # the client has seen the terminal event already
        return self._frames(key, chat_id, assistant_id, after, ping)

    async def _frames(
        self, key: str, chat_id: uuid.UUID, assistant_id: str, after: int, ping: float
    ) -> AsyncIterator[bytes]:
        last = after
        loop = asyncio.get_running_loop()
        quiet_since = loop.time()
        while True:
            # Blocking reads shorter than the reply deadline: one waiting a whole ping interval (15 s) timed out
            # at the client's 5 s and was reported as Redis unreachable, every 5 s of a quiet answer.
            wait = min(quiet_since + ping - loop.time(), READ_BLOCK_MAX)
            try:
                answer = await self._read(key, last, wait)
            except Exception as exc:
                logger.warning("redis unreachable while following %s (%s)", assistant_id, type(exc).__name__)
                ended = await self._storage_ended(chat_id, assistant_id, last)
                if ended is not None:
                    yield ended
                    return
                await asyncio.sleep(STORAGE_POLL)
                quiet_since = loop.time()
                yield PING
                continue
            if not answer and loop.time() - quiet_since < ping:
                continue
            quiet_since = loop.time()
            if not answer:
                # Quiet for a ping interval: is the generation still alive? Its owner may have died, or Redis
                # may have lost the log; then the stored message (interrupted by recovery) ends the stream.
                ended = await self._storage_ended(chat_id, assistant_id, last)
                if ended is not None:
                    yield ended
                    return
                yield PING
                continue
            out: list[bytes] = []
            for event_id, fields in answer:
                last = event_id
                out.append(fields[b"f"])
                if fields.get(b"e"):
                    yield b"".join(out)
                    return
            yield b"".join(out)

    async def _read(self, key: str, after: int, wait: float) -> list[Entry]:
        """The events after `after`, blocking up to `wait` seconds for them while the followers' share of the
        pool has a connection free; else polling: a read that does not block, and when it found nothing, a
        pause of up to STORAGE_POLL before the next (the follower sees new events that much later)."""
        with self.follows.hold() as held:
            if held:
                return await _read_after(self.redis, key, after, max(1, int(wait * 1000)))
        answer = await _read_after(self.redis, key, after)
        if not answer:
            await asyncio.sleep(min(max(wait, 0.0), STORAGE_POLL))
        return answer

    async def _storage_ended(self, chat_id: uuid.UUID, assistant_id: str, last: int) -> bytes | None:
        """The terminal event from storage when the message is final (under the id its final write stored, else
        `last + 1`), else None."""
        message = await stored_message(self.db, chat_id, assistant_id)
        terminal = None if message is None else terminal_of(message)
        if message is None:
            terminal = ("error", {"message": "The answer is no longer stored", "code": "not_found"})
        if terminal is None:
            return None
        with contextlib.suppress(Exception):
            # The owner may still write its own terminal event: prefer it when it is already there. Every
            # event up to it, however many (not one XREAD's `count`: the stream would end cut, with no end).
            key = log_key(chat_id, assistant_id)
            answer = await _all_after(self.redis, key, last)
            if answer and answer[-1][1].get(b"e"):
                return b"".join(fields[b"f"] for _id, fields in answer)
            ended = await _last_entry(self.redis, key)
            if ended is not None and ended[1].get(b"e"):
                # A `Last-Event-ID` beyond this generation's end was an older answer's id: the generation is
                # given whole, as its owner gives it (app.sse.Generation.sse).
                return b"".join(fields[b"f"] for _id, fields in await _all_after(self.redis, key, 0))
        stored_id = None if message is None else await _stored_terminal_id(self.db, assistant_id)
        return frame(stored_id if stored_id is not None else last + 1, *terminal)

    # --- stop between instances -------------------------------------------------------------------
    async def publish_stop(self, assistant_id: str, lasting: float) -> bool:
        """Ask every instance to stop `assistant_id`; False when Redis is unreachable.

        The request is also kept `lasting` seconds under `{STOP_REQUEST}{assistant id}`, set before the publish
        in the same round trip: an owner that was not subscribed when it was published acts on it once it
        subscribes again (`stops_requested`, and why no stop falls between the two in `_listen`).
        """
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.set(STOP_REQUEST + assistant_id, "1", ex=max(1, math.ceil(lasting)))
                pipe.publish(STOP_CHANNEL, assistant_id)
                await pipe.execute()
        except Exception as exc:
            logger.warning("redis unreachable, stop not published (%s)", type(exc).__name__)
            return False
        return True

    async def stops_requested(self, assistant_ids: list[str]) -> list[str]:
        """Those of `assistant_ids` whose stop request is still kept (one MGET; raises when Redis fails)."""
        if not assistant_ids:
            return []
        found = await self.redis.mget([STOP_REQUEST + assistant_id for assistant_id in assistant_ids])
        return [assistant_id for assistant_id, value in zip(assistant_ids, found, strict=True) if value is not None]

    async def listen_for_stops(
        self, on_stop: Callable[[str], Awaitable[None]], on_subscribed: Callable[[], Awaitable[None]] | None = None
    ) -> None:
        """Subscribe to the stop channel for the life of the app, resubscribing after a Redis outage;
        `on_subscribed` runs after each subscription (the first too), to act on the stops published while
        there was none (`stops_requested`)."""
        self.on_stop = on_stop
        await self._listen(STOP_CHANNEL, "stop", on_stop, on_subscribed)

    # --- progress callbacks between instances ------------------------------------------------------
    async def relay_callback(self, assistant_id: str, body: dict[str, Any]) -> bool | None:
        """Hand a validated callback to the instance running `assistant_id` and wait until it applied it: True
        applied, False refused (its outcome was decided meanwhile), None when Redis is unreachable or no owner
        answered within RELAY_WAIT (none runs it any more, or its subscription is away: the message is lost), and
        at once, unsent, while the relays' share of the pool waits already."""
        with self.relays.hold() as held:
            return await self._relay(assistant_id, body) if held else None

    async def _relay(self, assistant_id: str, body: dict[str, Any]) -> bool | None:
        token = uuid.uuid4().hex
        reply = CALLBACK_REPLY + token
        try:
            await self.redis.publish(CALLBACK_CHANNEL, json.dumps({"id": assistant_id, "body": body, "reply": token}))
            answer = await self.redis.blpop([reply], timeout=RELAY_WAIT)
            if answer is None:
                if await self._give_up(token):
                    return None  # the owner will not apply it now: it is n8n's to send again
                # The owner claimed it just now, and applies it at once: its answer is on the way.
                answer = await self.redis.blpop([reply], timeout=RELAY_WAIT)
        except Exception as exc:
            logger.warning("redis unreachable, callback not relayed (%s)", type(exc).__name__)
            # Published, perhaps applied, its reply lost with the connection (a silently dropped one fails
            # only at the reply deadline): claimed now, on a new connection, the owner will not apply it
            # late; claimed by the owner already, it was applied, and a 503 would have n8n send it twice.
            try:
                return None if await self._give_up(token) else True
            except Exception:
                return None  # Redis cannot be reached from here: its fate cannot be known
        return answer is None or bool(answer[1] == b"1")

    async def _claim(self, token: str, by: str, lasting: int) -> bool:
        """Claim a relayed callback (`by`: "1" the owner, "0" the receiving instance): True for the first claim,
        False when the other side claimed it already (raises when Redis fails)."""
        return bool(await self.redis.set(CALLBACK_CLAIM + token, by, nx=True, ex=lasting))

    async def _give_up(self, token: str) -> bool:
        """The receiving instance's claim on a relayed callback: True when the owner has not claimed it (and now
        never will, however late it hears it), False when it did (it applied it)."""
        s = self.settings
        return await self._claim(token, "0", math.ceil(max(s.N8N_TOTAL_TIMEOUT, s.CALLBACK_TOTAL_TIMEOUT)))

    async def claim_callback(self, token: str) -> bool:
        """The owner's claim on a relayed callback, before applying it: False when the instance that received it
        gave up waiting (or Redis is unreachable: it cannot be told either), and it must not be applied."""
        try:
            return await self._claim(token, "1", CLAIM_TTL)
        except Exception as exc:
            logger.warning("redis unreachable, relayed callback dropped (%s)", type(exc).__name__)
            return False

    async def answer_callback(self, token: str, applied: bool) -> None:
        """The owner's word on a relayed callback to the instance waiting for it (`relay_callback`)."""
        key = CALLBACK_REPLY + token
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.lpush(key, "1" if applied else "0")
                pipe.expire(key, math.ceil(RELAY_WAIT) + 1)
                await pipe.execute()
        except Exception as exc:
            logger.warning("redis unreachable, relayed callback not answered (%s)", type(exc).__name__)

    async def mark_callback_target(self, callback_id: str, seconds: float) -> bool:
        """Say that a `/v1` completion (no stored row says it runs) takes callbacks for `callback_id` on some
        instance, so another instance receiving one relays it; False when Redis is unreachable."""
        try:
            await self.redis.set(COMPLETION_KEY + callback_id, "1", ex=max(1, math.ceil(seconds)))
        except Exception as exc:
            logger.warning("redis unreachable, completion callbacks only on this instance (%s)", type(exc).__name__)
            return False
        return True

    async def unmark_callback_target(self, callback_id: str) -> None:
        with contextlib.suppress(Exception):
            await self.redis.delete(COMPLETION_KEY + callback_id)

    async def is_callback_target(self, callback_id: str) -> bool | None:
        """Whether a completion somewhere takes callbacks for `callback_id`; None when Redis is unreachable
        (nothing can be relayed then either)."""
        try:
            return bool(await self.redis.exists(COMPLETION_KEY + callback_id))
        except Exception as exc:
            logger.warning("redis unreachable, callback not relayed (%s)", type(exc).__name__)
            return None

    async def listen_for_callbacks(
        self, on_callback: Callable[[str, dict[str, Any], str | None], Awaitable[None]]
    ) -> None:
        """Subscribe to the callback channel for the life of the app (as the stop channel)."""

        async def relayed(data: str) -> None:
            try:
                message = json.loads(data)
                assistant_id, body, reply = str(message["id"]), message["body"], message.get("reply")
            except (ValueError, KeyError, TypeError, AttributeError):
                logger.warning("ignored a malformed relayed callback")
                return
            await on_callback(assistant_id, body, reply if isinstance(reply, str) else None)

        await self._listen(CALLBACK_CHANNEL, "callback", relayed)

    async def _listen(
        self,
        channel: str,
        what: str,
        handle: Callable[[str], Awaitable[None]],
        on_subscribed: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """Subscribe to `channel` and hand each message to `handle`, subscribing again after a lost connection.

        A subscription hears nothing while no one publishes, so a connection dropped silently on the way would
        look the same, and the stops of other instances would be lost without a word: after LISTEN_IDLE of
        silence it pings Redis, and a pong that does not come within PONG_WAIT ends the connection.

        What is published while there is no subscription (from the connection's loss, or its silent drop,
        until Redis has confirmed the next SUBSCRIBE) is lost: `on_subscribed` runs once Redis has confirmed
        each subscription, before any message is handled, to read what the publishers also kept in keys. No
        message falls between the two: Redis runs commands one at a time, a publisher sets its key before it
        publishes (`publish_stop`, in that order on one connection), and the key is read only after the
        SUBSCRIBE has run (its confirmation awaited, not just sent). A message published after the SUBSCRIBE
        ran is delivered on the subscription; one published before it had its key set before it too, so
        before the read, which finds it (while the key lives). It may come both ways: acting on it is
        idempotent. Any failure here (the read's too) counts as a lost connection and is tried again in full.
        The client is given no retries (`connect`), so a lost connection's error always reaches this loop,
        which subscribes on a new connection and reads: never a subscription renewed only inside the client.
        """
        failing = False
        loop = asyncio.get_running_loop()
        while True:
            _end_if_cancelled()
            pubsub = self.redis.pubsub()
            try:
                await pubsub.subscribe(channel)
                await _subscription_confirmed(pubsub)
                if on_subscribed is not None:
                    await on_subscribed()
                _end_if_cancelled()
                if failing:
                    logger.warning("redis %s channel subscribed again", what)
                    failing = False
                heard, pinged = loop.time(), None
                while True:
                    message = await pubsub.get_message(timeout=LISTEN_POLL)
                    _end_if_cancelled()
                    now = loop.time()
                    if message is not None:
                        heard, pinged = now, None
                        if message.get("type") == "message":
                            data = message["data"]
                            await handle(data.decode() if isinstance(data, bytes) else str(data))
                    elif pinged is not None and now - pinged > PONG_WAIT:
                        raise TimeoutError("no pong")
                    elif pinged is None and now - heard > LISTEN_IDLE:
                        await pubsub.ping()
                        pinged = now
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not failing:
                    logger.warning(
                        "redis %s channel lost, %s works on this instance only (%s)", what, what, type(exc).__name__
                    )
                    failing = True
                await asyncio.sleep(RESUBSCRIBE_PAUSE)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]


def _end_if_cancelled() -> None:
    """Raise CancelledError when the task was cancelled and still carries the request: a cancel landing while
    redis-py opens a connection on uvloop can be swallowed below us, and a listener polling on after it held
    up the shutdown for ever (`app.cli serve` on a port in use hung after "Waiting for application shutdown").
    Inside `asyncio.timeout`, a timeout's own cancel raised here becomes its TimeoutError, as it should."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def _subscription_confirmed(pubsub: PubSub) -> None:
    """Until Redis confirms the subscription: `subscribe` only sends the command, and its reply is the first
    message to read (within REPLY_TIMEOUT, else TimeoutError: a lost connection)."""
    async with asyncio.timeout(REPLY_TIMEOUT):
        while True:
            message = await pubsub.get_message(timeout=LISTEN_POLL)
            _end_if_cancelled()
            if message is not None and message.get("type") == "subscribe":
                return


def _event_id(entry_id: Any) -> int:
    text = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
    return int(text.split("-", 1)[0])


Entry = tuple[int, dict[bytes, bytes]]


def _entries(rows: Any) -> list[Entry]:
    """XRANGE / XREVRANGE rows as (event id, fields)."""
    return [(_event_id(entry_id), fields) for entry_id, fields in rows or []]


async def _last_entry(redis: Redis, key: str) -> Entry | None:
    entries = _entries(await redis.xrevrange(key, count=1))
    return entries[0] if entries else None


async def _all_after(redis: Redis, key: str, after: int) -> list[Entry]:
    """Every event after id `after` (a generation's log is bounded by the answer size cap)."""
    return _entries(await redis.xrange(key, min=f"{after + 1}-0"))


async def _read_after(redis: Redis, key: str, after: int, block_ms: int | None = None) -> list[Entry]:
    answer: Any = await redis.xread({key: f"{after}-0"}, count=1000, block=block_ms)
    return _entries(answer[0][1]) if answer else []  # XREAD answers [[key, rows]] for the one key


#: EXPIRE KEYS[1] ARGV[2] while KEYS[1] holds ARGV[1].
EXPIRE_IF_OURS = (
    "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('expire', KEYS[1], ARGV[2]) end return 0"
)
#: SET KEYS[1] ARGV[1] EX ARGV[2], unless KEYS[1] names another answer that has not ended: a pointer with more
#: than the end's TTL (ARGV[2]) left was set by a running answer (an ended one's expires within that TTL).
SET_UNLESS_ANOTHER_RUNS = (
    "local held = redis.call('get', KEYS[1]) "
    "if held and held ~= ARGV[1] and redis.call('ttl', KEYS[1]) > tonumber(ARGV[2]) then return 0 end "
    "return redis.call('set', KEYS[1], ARGV[1], 'EX', ARGV[2])"
)


class _Mirror:
    """Writes one generation's new events to its Redis Stream, in batches, from one task at a time.

    Events are written with their own ids (`XADD key <n>-0`) in a MULTI/EXEC, so a batch is all or nothing;
    after a failure the writer asks Redis how far it got (before any other batch, until Redis answers) and goes on
    from there.
    """

    __slots__ = ("gave_up", "generation", "key", "log", "task", "waiting", "written")

    def __init__(self, log: RedisEventLog, generation: Generation) -> None:
        self.log = log
        self.generation = generation
        self.key = log_key(generation.new.chat_id, generation.new.assistant_id)
        self.written = 0
        self.gave_up = False
        self.task: asyncio.Task[None] | None = None
        #: `until` callers: (events awaited, their future).
        self.waiting: list[tuple[int, asyncio.Future[None]]] = []

    async def until(self, count: int) -> None:
        """Until Redis holds the first `count` events, or at once while it cannot be written (then nothing
        waits on it: followers elsewhere fall back to the stored message)."""
        if self.written >= count or self.gave_up or self.log._failing:
            return
        waiter = asyncio.get_running_loop().create_future()
        self.waiting.append((count, waiter))
        await waiter

    def _release(self, everyone: bool = False) -> None:
        if not self.waiting:
            return
        keep = []
        for count, waiter in self.waiting:
            if everyone or count <= self.written:
                if not waiter.done():
                    waiter.set_result(None)
            else:
                keep.append((count, waiter))
        self.waiting = keep

    def notify(self, _generation: Generation) -> None:
        if self.task is None and not self.gave_up:
            self.task = asyncio.get_running_loop().create_task(self._run())
            self.log.writers.add(self.task)
            self.task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self.log.writers.discard(task)
        self.task = None
        if task.cancelled() or self.gave_up:
            self._release(everyone=True)
        elif self.written < len(self.generation.frames):
            self.notify(self.generation)  # events that came during the last batch's final await

    async def _run(self) -> None:
        generation = self.generation
        redis = self.log.redis
        ttl = int(self.log.settings.STREAM_LOG_TTL)
        # While it runs, the chat's pointer outlives any answer; after the end both expire after the TTL.
        # (A callback-mode generation may run up to CALLBACK_TOTAL_TIMEOUT.)
        settings = self.log.settings
        running_ttl = int(max(settings.N8N_TOTAL_TIMEOUT, settings.CALLBACK_TOTAL_TIMEOUT)) + ttl
        chat = chat_key(generation.new.chat_id)
        loop = asyncio.get_running_loop()
        delay = 0.2
        ended_at: float | None = None
        unsure = False  # after a failure: how far Redis got is read before the next batch
        while self.written < len(generation.frames):
            frames = generation.frames
            available = len(frames)
            ending = generation.terminal is not None and available == len(generation.frames)
            first = False
            try:
                if unsure:
                    # The failed batch may have been applied, or Redis may have come back empty (restarted): a
                    # count kept from before would leave a hole at the start of the log, or write twice.
                    last = await _last_entry(redis, self.key)
                    self.written = last[0] if last is not None else 0
                    unsure = False
                    continue
                async with redis.pipeline(transaction=True) as pipe:
                    if self.written == 0 and ending:
                        # The whole answer at once, ended already (quickly, or late: its writer retried while
                        # the chat's next answer may have started, whose pointer must stay).
                        pipe.eval(SET_UNLESS_ANOTHER_RUNS, 1, chat, generation.new.assistant_id, ttl)
                    elif self.written == 0:
                        pipe.set(chat, generation.new.assistant_id, ex=running_ttl)
                        # A stop from another instance that read this answer's row before this one registered
                        # it was published to no one who ran it; it was kept first, so read here, in the
                        # same round trip, after the registration: one of the two finds every stop.
                        pipe.exists(STOP_REQUEST + generation.new.assistant_id)
                        first = True
                    for n in range(self.written, available):
                        fields: dict[str, bytes] = {"f": frames[n]}
                        if ending and n == available - 1:
                            fields["e"] = b"1"
                        pipe.xadd(self.key, fields, id=f"{n + 1}-0")  # type: ignore[arg-type]
                    if ending:
                        pipe.expire(self.key, ttl)
                        # Only while the pointer is still this answer's: a last batch that comes late (its
                        # writer retried) may find the chat's next answer there, which must keep its own.
                        pipe.eval(EXPIRE_IF_OURS, 1, chat, generation.new.assistant_id, ttl)
                    else:
                        pipe.expire(self.key, running_ttl)
                    results = await pipe.execute()
                self.written = available
                if first and results[1] and self.log.on_stop is not None:
                    await self.log.on_stop(generation.new.assistant_id)
                self._release()
                self.log._report(False)
                delay = 0.2
                if generation.terminal is None:
                    # Let events gather (or the end come, which is written at once) before the next batch.
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(generation.ended(), MIRROR_INTERVAL)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.log._report(True, exc)
                self._release(everyone=True)
                if generation.terminal is not None:
                    ended_at = ended_at if ended_at is not None else loop.time()
                    if loop.time() - ended_at > RETRY_AFTER_END:
                        self.gave_up = True
                        return
                unsure = True
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
