"""AsyncLLMEngine: the engine on a background thread, for the HTTP server.

The engine is not thread-safe, so one thread owns it: requests and aborts reach it
through a command queue, and each request's outputs go back to the event loop that
asked, through an asyncio queue. A caller that stops iterating (a client that
disconnects) aborts its request, and its blocks return to the pool on the engine's
next turn.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable
from typing import Any

from kvsqueeze.engine.llm_engine import LLMEngine
from kvsqueeze.engine.output import RequestOutput
from kvsqueeze.engine.sampling_params import SamplingParams
from kvsqueeze.policy import Policy


class RequestStream:
    """One request's outputs as they come. `aclose()` before the end aborts it, and its
    blocks return to the pool on the engine's next turn."""

    def __init__(self, engine: AsyncLLMEngine, seq_id: int, outputs: asyncio.Queue) -> None:
        self.engine, self.seq_id, self.outputs = engine, seq_id, outputs
        self.finished = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        item = await self.outputs.get()
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        self.finished = item.finished
        return item

    async def aclose(self) -> None:
        if not self.finished:
            self.finished = True
            self.engine.abort(self.seq_id)


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._commands: queue.Queue[Callable[[], None]] = queue.Queue()
        self._streams: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stop = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="kvsqueeze-engine", daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        self._stop.set()
        self._commands.put(lambda: None)
        self._thread.join(timeout=30)

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run fn on the engine thread and wait for its result (for short queries like stats)."""
        done: queue.Queue = queue.Queue(maxsize=1)

        def run() -> None:
            try:
                done.put((True, fn()))
            except BaseException as exc:  # handed back to the caller
                done.put((False, exc))

        self._commands.put(run)
        ok, value = done.get()
        if not ok:
            raise value
        return value

    async def add(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        policy: Policy | None = None,
        max_kv_tokens: int | None = None,
        prefix: list[int] | None = None,
    ) -> RequestStream:
        """Queue a request (bad input raises here, before anything streams) and return
        its outputs as an async iterator; closing it early aborts the request."""
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue = asyncio.Queue()

        def add() -> int:
            seq = self.engine.add_request(prompt_token_ids, params, policy, max_kv_tokens, prefix)
            self._streams[seq.seq_id] = (loop, outputs)
            return seq.seq_id

        seq_id = await loop.run_in_executor(None, self.call, add)
        return RequestStream(self, seq_id, outputs)

    def abort(self, seq_id: int) -> None:
        self._commands.put(lambda: self._abort(seq_id))

    def _abort(self, seq_id: int) -> None:
        self._streams.pop(seq_id, None)
        self.engine.abort(seq_id)

    def _loop(self) -> None:
        while not self._stop.is_set():
            block = not self.engine.has_unfinished()
            try:
                while True:
                    self._commands.get(block=block, timeout=0.5 if block else None)()
                    block = False
            except queue.Empty:
                pass
            if not self.engine.has_unfinished():
                continue
            try:
                results = self.engine.step()
            except BaseException as exc:  # the engine is broken: fail every open request, keep the thread
                self.error = exc
                for loop, stream in self._streams.values():
                    loop.call_soon_threadsafe(stream.put_nowait, exc)
                self._streams.clear()
                self.engine.abort_all()
                continue
            for out in results:
                target = self._streams.get(out.request_id)
                if target is None:
                    continue
                loop, stream = target
                loop.call_soon_threadsafe(stream.put_nowait, out)
                if out.finished:
                    del self._streams[out.request_id]
