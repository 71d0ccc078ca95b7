"""A lean closed-loop HTTP/1.1 load generator for the inference benchmark.

Each connection keeps one request in flight: it writes a prepared request,
reads the answer (status line, ``content-length``, body) and writes the next
one at once. It is an ``asyncio.Protocol`` on uvloop with no coroutine or
parser object per request, so that the client, which shares the machine
with the server, costs as little as it can; ``client_cpu`` in each result
says how much it did cost. It runs in the benchmark's main process, never in
the server's.

Throughput counts answers that complete inside the measured window (after a
warm-up); latency is from writing a request to having read its whole answer.
Any answer other than 200 is an error and fails the phase.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import uvloop

from benchmarks.loadgen import latency_summary_ms


@dataclass
class Result:
    concurrency: int
    seconds: float
    requests: int
    throughput_rps: float
    errors: int
    first_error: str
    # Cores this process used during the window.
    client_cpu: float
    latencies_s: list[float] = field(repr=False, default_factory=list)

    @property
    def latency_ms(self) -> dict[str, float]:
        return latency_summary_ms(self.latencies_s)


class _Window:
    def __init__(self, start: float, end: float) -> None:
        self.start = start
        self.end = end
        self.latencies: list[float] = []
        self.errors = 0
        self.first_error = ""


class _Connection(asyncio.Protocol):
    def __init__(self, payload: bytes, window: _Window, finished: asyncio.Future[None]) -> None:
        self.payload = payload
        self.window = window
        self.finished = finished
        self.buffer = bytearray()
        self.needed = -1
        self.sent_at = 0.0
        self.status_ok = True
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._send()

    def _send(self) -> None:
        assert self.transport is not None
        self.sent_at = time.perf_counter()
        self.transport.write(self.payload)

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        if self.needed < 0:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(buffer[:end]).lower()
            length = 0
            # After a line break: inference-header-content-length ends the same way.
            at = head.find(b"\r\ncontent-length:")
            if at >= 0:
                eol = head.find(b"\r\n", at + 2)
                length = int(head[at + 17:eol if eol >= 0 else len(head)])
            self.needed = end + 4 + length
            self.status_ok = head.startswith(b"http/1.1 200")
        if len(buffer) < self.needed:
            return
        now = time.perf_counter()
        window = self.window
        if not self.status_ok:
            window.errors += 1
            if not window.first_error:
                window.first_error = bytes(buffer[:self.needed]).decode(errors="replace")[-500:]
        elif window.start <= now <= window.end:
            window.latencies.append(now - self.sent_at)
        del buffer[:self.needed]
        self.needed = -1
        if now < window.end:
            self._send()
            return
        assert self.transport is not None
        self.transport.close()
        if not self.finished.done():
            self.finished.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.finished.done():
            if time.perf_counter() < self.window.end:
                self.window.errors += 1
                self.window.first_error = self.window.first_error or f"connection lost: {exc!r}"
            self.finished.set_result(None)


async def _run(port: int, payload: bytes, concurrency: int, warmup: float, seconds: float,
               on_window: Callable[[], None] | None) -> Result:
    loop = asyncio.get_running_loop()
    start = time.perf_counter() + warmup
    window = _Window(start, start + seconds)
    finished: list[asyncio.Future[None]] = []
    for _ in range(concurrency):
        done: asyncio.Future[None] = loop.create_future()
        finished.append(done)
        await loop.create_connection(lambda d=done: _Connection(payload, window, d), "127.0.0.1", port)  # type: ignore[misc]
    await asyncio.sleep(max(0.0, start - time.perf_counter()))
    cpu0 = time.process_time()
    if on_window:
        on_window()
    await asyncio.sleep(max(0.0, window.end - time.perf_counter()))
    cpu1 = time.process_time()
    if on_window:
        on_window()
    await asyncio.wait_for(asyncio.gather(*finished), timeout=60)
    return Result(
        concurrency=concurrency, seconds=seconds, requests=len(window.latencies),
        throughput_rps=round(len(window.latencies) / seconds, 1), errors=window.errors,
        first_error=window.first_error, client_cpu=round((cpu1 - cpu0) / seconds, 3), latencies_s=window.latencies,
    )


def closed_loop(port: int, payload: bytes, *, concurrency: int, warmup: float, seconds: float,
                on_window: Callable[[], None] | None = None) -> Result:
    """``concurrency`` connections, each with one request in flight, for ``warmup`` + ``seconds``.

    ``on_window`` is called as the measured window opens and as it closes
    (to read the server's CPU time at the same moments).
    """
    return uvloop.run(_run(port, payload, concurrency, warmup, seconds, on_window))


def request_bytes(path: str, body: bytes, headers: dict[str, str]) -> bytes:
    head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return head.encode() + b"\r\n" + body
