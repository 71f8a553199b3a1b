"""The engine on a background thread, for servers: submit and abort from any thread or event loop,
receive each request's outputs on an asyncio queue.

One thread owns the LLMEngine and runs its steps; everything else talks to it through a command
queue, so the engine itself needs no locks. A request's slot and blocks are freed by the engine thread
as soon as its abort is processed, before the next step.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass

from .engine import LLMEngine
from .request import RequestOutput
from .sampling_params import SamplingParams


class EngineStopped(RuntimeError):
    pass


@dataclass
class _Submit:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue
    accepted: "asyncio.Future[None]"


class AsyncEngine:
    def __init__(self, engine: LLMEngine, max_waiting: int | None = None):
        self.engine = engine
        self.max_waiting = max_waiting
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stop = threading.Event()
        self._wake = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="hylm-engine", daemon=True)
        self._thread.start()

    # ---- called from the event loop -----------------------------------------------------------------
    async def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams
                       ) -> AsyncIterator[RequestOutput]:
        """Yield the request's outputs as steps produce them. Raises ValueError (bad request) before the
        first output; if the consumer stops early (client gone), the request is aborted."""
        if self._stop.is_set() or self.error is not None:
            raise EngineStopped("the engine is not running")
        loop = asyncio.get_running_loop()
        out: asyncio.Queue = asyncio.Queue()
        accepted = loop.create_future()
        self._send(_Submit(request_id, prompt_ids, params, loop, out, accepted))
        finished = False
        try:
            try:
                await accepted  # raises what add_request raised
            except BaseException:
                finished = accepted.done() and accepted.exception() is not None  # refused: nothing to abort
                raise
            while True:
                item = await out.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._send(("abort", request_id))

    def finish(self, request_id: str, reason: str, stop_reason=None) -> None:
        self._send(("finish", request_id, reason, stop_reason))

    def num_waiting(self) -> int:
        return len(self.engine.scheduler.waiting)

    def shutdown(self, timeout: float = 30.0, abort: bool = False) -> None:
        """Stop accepting work; finish (or abort) in-flight requests, then stop the thread."""
        self._send(("shutdown", abort))
        self._thread.join(timeout)

    # ---- engine thread -----------------------------------------------------------------------------
    def _send(self, cmd) -> None:
        self._commands.put(cmd)
        self._wake.set()

    def _run(self) -> None:
        draining = False
        try:
            while True:
                while True:
                    try:
                        cmd = self._commands.get_nowait()
                    except queue.Empty:
                        break
                    draining = self._handle(cmd) or draining
                if self.engine.has_unfinished():
                    for out in self.engine.step():
                        self._deliver(out.request_id, out)
                elif draining:
                    break
                else:
                    self._wake.wait(0.05)
                    self._wake.clear()
        except BaseException as e:  # noqa: BLE001 - a crashed engine fails every open stream, loudly
            self.error = e
            for rid in list(self._streams):
                self._deliver(rid, EngineStopped(f"engine failed: {e!r}"))
        finally:
            self._stop.set()

    def _handle(self, cmd) -> bool:
        if isinstance(cmd, _Submit):
            try:
                if self._stop.is_set():
                    raise EngineStopped("the server is shutting down")
                if self.max_waiting is not None and len(self.engine.scheduler.waiting) >= self.max_waiting:
                    raise QueueFull(f"the waiting queue is full ({self.max_waiting} requests)")
                self.engine.add_request(cmd.prompt_ids, cmd.params, cmd.request_id)
            except Exception as e:  # noqa: BLE001 - reported to the submitter
                cmd.loop.call_soon_threadsafe(_set_exception, cmd.accepted, e)
                return False
            self._streams[cmd.request_id] = (cmd.loop, cmd.out)
            cmd.loop.call_soon_threadsafe(_set_result, cmd.accepted)
        elif cmd[0] == "abort":
            self.engine.abort(cmd[1])
            self._streams.pop(cmd[1], None)
        elif cmd[0] == "finish":
            req = self.engine.requests.get(cmd[1])
            self.engine.finish(cmd[1], cmd[2], cmd[3])
            if req is not None:  # tell the stream it is over
                self._deliver(cmd[1], RequestOutput(req.request_id, [], req.output_ids, len(req.prompt_ids), True,
                                                    req.finish_reason, req.stop_reason))
            self._streams.pop(cmd[1], None)
        elif cmd[0] == "shutdown":
            if cmd[1]:
                for rid in list(self.engine.requests):
                    self.engine.abort(rid)
                    self._deliver(rid, EngineStopped("the server is shutting down"))
            return True
        return False

    def _deliver(self, request_id: str, item) -> None:
        target = self._streams.get(request_id)
        if target is None:
            return
        loop, out = target
        if isinstance(item, BaseException) or item.finished:
            self._streams.pop(request_id, None)
        try:
            loop.call_soon_threadsafe(out.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self.engine.abort(request_id)


class QueueFull(RuntimeError):
    """Too many requests are waiting; the server answers 503 with Retry-After."""


def _set_result(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)


def _set_exception(fut: asyncio.Future, e: BaseException) -> None:
    if not fut.done():
        fut.set_exception(e)
