"""STREAM_WRITE_TIMEOUT: a connection whose client stopped reading is reset instead of held for good.

uvicorn (0.54) has no write timeout. When a client stops reading without closing (a phone asleep, a NAT that
forgot the connection), the kernel's send buffer fills (megabytes), then the transport's own (64 KiB); uvicorn
pauses, and the response's next `send` awaits a drain that never comes: the connection, the response's
coroutine and every buffered byte stay until the process ends, long after the generation itself ended.
Ending the response from the app does not help: uvicorn then `close()`s the transport, and asyncio's (and
uvloop's) `close` still waits for the buffer to drain.

So the limit is kept where the stall is seen, in the connection's asyncio protocol (uvicorn's HTTP protocol
class with `WriteStallLimit` mixed in). The transport's `pause_writing` arms one timer and notes how many bytes
the client has yet to take (the transport's buffer plus the kernel's unacknowledged send queue); `resume_writing`
cancels it. Nothing runs per chunk, and nothing at all for a client that keeps up. When the timer fires and the
client took some bytes meanwhile, it is re-armed: the kernel wakes a paused writer only once a third of its send
buffer (up to 4 MiB) is free, so a slow client that reads steadily may leave the transport paused far longer
than the limit. When it took none, the connection is aborted with SO_LINGER 0: a reset, so the kernel drops its
buffer too (a plain close would keep it in FIN_WAIT1, still unread) and a client that wakes up learns at once
that it must reconnect. A client that stops reading is therefore cut off one to two limits after the later of
its last byte and the moment its buffers filled. The response then sees a disconnect, as for any client that
left; the generation runs on its own task (app.generations), so the answer is stored whole and another request
can follow it (`GET /api/chats/{id}/stream`).
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import socket
import struct
import termios
from typing import Any, cast

logger = logging.getLogger("app")

#: SO_LINGER on, 0 s: `close` resets the connection and drops what the kernel still holds for it.
_RESET_ON_CLOSE = struct.pack("ii", 1, 0)
#: Linux's SIOCOUTQ: the bytes of a TCP socket's send queue the peer has not acknowledged.
_OUTQ = getattr(termios, "TIOCOUTQ", None)


class WriteStallLimit(asyncio.Protocol):
    """Mixed in before uvicorn's HTTP protocol class (`with_write_stall_limit`); `write_timeout` is set there."""

    write_timeout: float = 0.0
    #: uvloop's transports are not `asyncio.Transport` subclasses (no isinstance check): they have its methods.
    _stall_transport: asyncio.Transport | None = None
    _stall_timer: asyncio.TimerHandle | None = None
    #: What the client had yet to take when the timer was (re-)armed.
    _stall_unsent: int = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._stall_transport = cast(asyncio.Transport, transport)
        super().connection_made(transport)

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._stall_timer is None:
            self._stall_unsent = self._unsent()
            self._stall_timer = asyncio.get_running_loop().call_later(self.write_timeout, self._check_stall)

    def resume_writing(self) -> None:
        self._cancel_stall_timer()
        super().resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_stall_timer()
        super().connection_lost(exc)

    def _cancel_stall_timer(self) -> None:
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None

    def _unsent(self) -> int:
        """Bytes written that the client has not taken: the transport's buffer and the kernel's send queue.
        While writing is paused nothing is added to them, so they only shrink as the client reads."""
        transport = self._stall_transport
        if transport is None:
            return 0
        unsent = transport.get_write_buffer_size()
        sock: Any = transport.get_extra_info("socket")
        if _OUTQ is not None and sock is not None:
            try:
                unsent += struct.unpack("i", fcntl.ioctl(sock.fileno(), _OUTQ, b"\0\0\0\0"))[0]
            except (OSError, ValueError):  # closed meanwhile: the buffer alone tells
                pass
        return unsent

    def _check_stall(self) -> None:
        """`write_timeout` s paused: re-arm if the client took anything meanwhile, else reset the connection."""
        self._stall_timer = None
        transport = self._stall_transport
        if transport is None:
            return
        unsent = self._unsent()
        if unsent < self._stall_unsent:
            self._stall_unsent = unsent
            self._stall_timer = asyncio.get_running_loop().call_later(self.write_timeout, self._check_stall)
            return
        sock: Any = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET_ON_CLOSE)
            except OSError:  # already shut down by the peer: the abort alone ends it
                pass
        logger.info(
            "write stall: the client took nothing for %g s (%d bytes waiting); connection reset",
            self.write_timeout,
            unsent,
        )
        transport.abort()  # uvicorn sees the connection lost: the response ends as for a client that left


def with_write_stall_limit(protocol: type[asyncio.Protocol], timeout: float) -> type[asyncio.Protocol]:
    """`protocol` (uvicorn's HTTP protocol class) whose connections are reset after `timeout` seconds paused;
    `protocol` itself when `timeout` is 0 (no limit). A class already limited gets the new timeout."""
    if timeout <= 0:
        return protocol
    bases = (protocol,) if issubclass(protocol, WriteStallLimit) else (WriteStallLimit, protocol)
    name = protocol.__name__.removesuffix("WithWriteStallLimit") + "WithWriteStallLimit"
    return cast(type[asyncio.Protocol], type(name, bases, {"write_timeout": timeout}))
