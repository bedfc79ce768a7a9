"""Bridges from the synchronous archive to streamed HTTP responses.

A generator that reads the database or blobs runs on one executor thread from start
to end (a database cursor must stay on the thread that opened it); its items cross
to the event loop through a small bounded queue, so memory holds a few chunks
whatever the size of the study, and a slow client slows the reader down.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, BinaryIO, TypeVar

from aiohttp import web

from web.keys import stream_executor_key

log = logging.getLogger(__name__)

T = TypeVar("T")
_DONE = object()
QUEUE_DEPTH = 4


class _Stopped(Exception):
    """The consumer went away (client disconnected): stop producing."""


class _Producer:
    """Runs the generator on its thread, handing items over to the loop's queue."""

    def __init__(self, loop: asyncio.AbstractEventLoop, gen: Iterator[Any]) -> None:
        self.loop = loop
        self.gen = gen
        self.queue: asyncio.Queue[Any] = asyncio.Queue(QUEUE_DEPTH)
        self.stop = threading.Event()

    def put(self, item: Any) -> None:
        # blocks this thread until the loop has room: back-pressure from the client
        fut = asyncio.run_coroutine_threadsafe(self.queue.put(item), self.loop)
        while True:
            try:
                fut.result(timeout=1.0)
                return
            except TimeoutError:
                if self.stop.is_set():
                    fut.cancel()
                    raise _Stopped from None

    def run(self) -> None:
        try:
            for item in self.gen:
                self.put(item)
                if self.stop.is_set():
                    return
            self.put(_DONE)
        except _Stopped:
            return
        except Exception as e:  # handed to the consumer, which re-raises it
            with contextlib.suppress(Exception):
                self.put(e)
        finally:
            close = getattr(self.gen, "close", None)
            if close is not None:
                close()  # releases the database connection the generator holds


async def iterate_sync(request: web.Request, gen_fn: Callable[..., Iterator[T]],
                       *args: Any) -> AsyncIterator[T]:
    """Yield the items of ``gen_fn(*args)``, produced on an executor thread."""
    loop = asyncio.get_running_loop()
    producer = _Producer(loop, gen_fn(*args))
    task = loop.run_in_executor(request.app[stream_executor_key], producer.run)
    try:
        while True:
            item = await producer.queue.get()
            if item is _DONE:
                break
            if isinstance(item, Exception):
                raise item
            yield item
    finally:
        producer.stop.set()
        while not producer.queue.empty():  # unblock a producer waiting on a full queue
            producer.queue.get_nowait()
        with contextlib.suppress(Exception):
            await task


class Chunks:
    """Builds the chunks of a streamed body of about *size* bytes each.

    Small pieces (part headers, file meta) are copied in; files are read straight into
    the chunk being built (``readinto``): the bytes are copied once from the kernel,
    and each chunk crosses from the reader thread to the event loop once.
    """

    def __init__(self, size: int = 1 << 20) -> None:
        self.size = size
        self._new()

    def _new(self) -> None:
        self.buf = bytearray(self.size)
        self.pos = 0

    def _take(self) -> bytearray:
        out = self.buf
        del out[self.pos:]  # shrinks in place
        self._new()
        return out

    def add(self, data: bytes) -> Iterator[bytearray]:
        view = memoryview(data)
        while view:
            n = min(len(view), self.size - self.pos)
            self.buf[self.pos:self.pos + n] = view[:n]
            self.pos += n
            view = view[n:]
            if self.pos == self.size:
                yield self._take()

    def read_from(self, f: BinaryIO) -> Iterator[bytearray]:
        while True:
            with memoryview(self.buf) as whole, whole[self.pos:] as room:
                n = f.readinto(room)
            if not n:
                return
            self.pos += n
            if self.pos == self.size:
                yield self._take()

    def rest(self) -> Iterator[bytearray]:
        if self.pos:
            yield self._take()


async def send_stream(request: web.Request, resp: web.StreamResponse,
                      chunks: AsyncIterator[bytes]) -> web.StreamResponse:
    """Send *chunks* as the body of *resp* (not yet prepared).

    The first chunk is produced before the status line goes out, so an error in the
    first part (an instance that cannot be decoded) is still a proper HTTP error. A
    later failure cannot change the status any more: the connection is cut, so the
    client sees an incomplete body rather than a complete-looking one. A client
    hanging up is not an error.
    """
    it = aiter(chunks)
    try:
        first = await anext(it)
    except StopAsyncIteration:
        first = b""
    await resp.prepare(request)
    try:
        await write(resp, first)
        async for chunk in it:
            await write(resp, chunk)
        await resp.write_eof()
    except (ConnectionError, TimeoutError) as e:
        log.info("HTTP %s %s: the client went away mid-response (%s)",
                 request.method, request.path, type(e).__name__)
        if request.transport is not None:
            request.transport.close()
    except Exception as e:
        log.warning("HTTP %s %s: response cut after its start: %s", request.method,
                    request.path, e)
        if request.transport is not None:
            request.transport.close()
    return resp


# objects decoded whole (rendering, decoded frames): at most this many at once, so a
# burst of thumbnails of large multi-frame objects cannot take all the memory
decode_slots = threading.BoundedSemaphore(2)

WRITE_TIMEOUT = 120.0  # a client that reads nothing for this long is dropped


async def write(resp: web.StreamResponse, data: bytes | bytearray) -> None:
    """One write that a stalled client cannot hold up for ever."""
    await asyncio.wait_for(resp.write(data), WRITE_TIMEOUT)


def boundary() -> str:
    return uuid.uuid4().hex


def part_head(bnd: str, content_type: str, location: str | None = None) -> bytes:
    head = f"--{bnd}\r\nContent-Type: {content_type}\r\n"
    if location:
        head += f"Content-Location: {location}\r\n"
    return (head + "\r\n").encode()


def closing(bnd: str) -> bytes:
    return f"--{bnd}--\r\n".encode()
