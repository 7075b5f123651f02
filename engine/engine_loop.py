"""Runs an `LLMEngine` on its own thread so workers can serve many callers at once.

All engine state (scheduler, block manager, sequences) is touched only by the loop thread:
callers hand it work with `submit(fn)`, which runs `fn(engine)` between two steps and
returns a `Future`. Outputs of each step go to `on_outputs`, called on the loop thread.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from pdserve.engine.llm_engine import LLMEngine, RequestOutput

log = logging.getLogger("pdserve.engine")


class RecentIds:
    """Request ids seen in the last `seconds` (not thread-safe: guard it, or touch it from
    the loop thread only). Workers remember an abort that found nothing here — its request
    may still be on its way, a call overtaken by the abort — and refuse that request when it
    comes, instead of running a whole request nobody wants."""

    def __init__(self, seconds: float = 60.0):
        self.seconds = seconds
        self._at: dict[str, float] = {}  # insertion order is time order: oldest first

    def add(self, request_id: str) -> None:
        now = time.monotonic()
        self._at.pop(request_id, None)
        self._at[request_id] = now
        for old in list(itertools.takewhile(lambda r: now - self._at[r] >= self.seconds,
                                            self._at)):
            del self._at[old]

    def pop(self, request_id: str) -> bool:
        """True (and forgotten) if `request_id` was seen."""
        return self._at.pop(request_id, None) is not None

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._at


class EngineLoop:
    """A single thread that alternates between queued calls and engine steps."""

    def __init__(
        self,
        engine: LLMEngine,
        on_outputs: Callable[[list[RequestOutput]], None],
        on_idle: Callable[[LLMEngine], None] | None = None,
        idle_interval: float = 0.5,
    ):
        self.engine = engine
        self._on_outputs = on_outputs
        self._on_idle = on_idle
        self._idle_interval = idle_interval
        self._calls: queue.SimpleQueue[tuple[Callable, Future]] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self.step_errors = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._calls.put((lambda e: None, Future()))  # wake the thread
        self._thread.join(timeout)

    def wake(self) -> None:
        """Run one loop iteration soon even if idle: e.g. a KV transfer ended, so blocks
        its request held can be freed (`LLMEngine.release_finished_transfers`)."""
        self._calls.put((lambda e: None, Future()))

    def submit(self, fn: Callable[[LLMEngine], Any]) -> Future:
        """Run `fn(engine)` on the loop thread before the next step."""
        fut: Future = Future()
        self._calls.put((fn, fut))
        return fut

    def call(self, fn: Callable[[LLMEngine], Any], timeout: float | None = 60.0) -> Any:
        """`submit` and wait for the result (re-raising the call's exception)."""
        return self.submit(fn).result(timeout)

    def _drain_calls(self, block: bool) -> None:
        try:
            fn, fut = self._calls.get(block=block, timeout=self._idle_interval if block else None)
        except queue.Empty:
            if self._on_idle:
                self._on_idle(self.engine)
            return
        while True:
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn(self.engine))
                except BaseException as e:  # the caller sees it; the loop keeps going
                    fut.set_exception(e)
            try:
                fn, fut = self._calls.get_nowait()
            except queue.Empty:
                return

    def _run(self) -> None:
        while not self._stop.is_set():
            self._drain_calls(block=not self.engine.has_unfinished())
            self.engine.release_finished_transfers()
            if self._stop.is_set() or not self.engine.has_unfinished():
                continue
            try:
                outputs = self.engine.step()
            except Exception:
                # A failed step must not kill the worker; the batch's requests are aborted
                # so their callers get an answer and their blocks come back.
                self.step_errors += 1
                log.exception("engine step failed; aborting the running batch")
                outputs = self._abort_all()
            if outputs:
                self._on_outputs(outputs)
            if self._on_idle and self.engine.stats.get("steps", 0) % 64 == 0:
                self._on_idle(self.engine)

    def _abort_all(self) -> list[RequestOutput]:
        eng = self.engine
        out = []
        for seq in list(eng.scheduler.running):
            eng.abort(seq.request_id)
            out.append(RequestOutput(seq.request_id, [], "", finished=True, finish_reason="abort",
                                     prompt_tokens=seq.num_prompt_tokens,
                                     completion_tokens=seq.num_output_tokens))
        return out
