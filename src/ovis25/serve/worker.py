"""The one thread that owns the Engine and runs continuous batching for all HTTP requests.

Handlers `submit` prompts with a sink (a callable that receives events on the worker thread) and `abort`
them; both only put a message in the inbox, so they never wait for the model. Between two engine steps
the worker takes in new requests and aborts, so requests join and leave the running batch at any step.
Events: ("output", RequestOutput) for every step of a request, ("error", message) when it failed,
("shutdown", message) when the server stopped it on its way down.
"""
from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Sequence

from ..generation import Engine, GenerationConfig

log = logging.getLogger("ovis25.serve")

Sink = Callable[[tuple[str, object]], None]


class QueueFull(Exception):
    pass


class ShuttingDown(Exception):
    pass


class EngineWorker:
    def __init__(self, engine: Engine, capacity: int):
        self.engine = engine
        self.capacity = capacity  # requests held at once (running + waiting); more -> QueueFull
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._held = 0  # submitted and not yet finished, failed or aborted
        self._closing: str | None = None  # set by close(): why new requests are refused
        self._sinks: dict[str, Sink] = {}  # worker thread only
        self._thread = threading.Thread(target=self._run, name="ovis25-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        if self._thread.is_alive():
            self._inbox.put(("stop",))
            self._thread.join(timeout)

    def close(self, message: str) -> None:
        """Refuse new requests and stop the ones held, each with a ("shutdown", message) event."""
        with self._lock:
            self._closing = message
        self._inbox.put(("close", message))

    @property
    def held(self) -> int:
        return self._held

    def submit(self, jobs: Sequence[tuple[str, dict, GenerationConfig]], sink: Sink) -> None:
        """Queue (request_id, prompt, config) jobs as one unit; raises QueueFull instead of waiting."""
        with self._lock:
            if self._closing is not None:
                raise ShuttingDown(self._closing)
            if self._held + len(jobs) > self.capacity:
                raise QueueFull(f"the server is busy: {self._held} requests are running or waiting "
                                f"(capacity {self.capacity}); retry later")
            self._held += len(jobs)
        self._inbox.put(("add", list(jobs), sink))

    def abort(self, request_ids: Sequence[str]) -> None:
        self._inbox.put(("abort", list(request_ids)))

    # -- worker thread --

    def _run(self) -> None:
        while True:
            try:
                message = self._inbox.get(block=not self.engine.has_unfinished())
                while True:
                    if message[0] == "stop":
                        self._fail_all(("shutdown", "the server is shutting down"))
                        return
                    if message[0] == "close":
                        self._fail_all(("shutdown", message[1]))
                    else:
                        self._handle(message)
                    message = self._inbox.get_nowait()
            except queue.Empty:
                pass
            if self.engine.has_unfinished():
                self._step()

    def _handle(self, message: tuple) -> None:
        if message[0] == "add":
            _, jobs, sink = message
            for request_id, prompt, config in jobs:
                try:
                    self.engine.add_request(prompt["input_ids"], prompt.get("pixel_values"), prompt.get("grid_thws"),
                                            config, request_id=request_id)
                except Exception as e:  # a bad request must not take the worker thread down
                    if not isinstance(e, ValueError):
                        log.exception("add_request failed")
                    self._release()
                    self._deliver(sink, ("error", str(e)))
                else:
                    self._sinks[request_id] = sink
        else:  # abort
            for request_id in message[1]:
                if self._sinks.pop(request_id, None) is not None:
                    self.engine.abort(request_id)
                    self._release()

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as e:  # keep serving: fail the requests in flight, not the server
            log.exception("engine step failed")
            self._fail_all(("error", f"generation failed: {type(e).__name__}: {e}"))
            return
        for out in outputs:
            sink = self._sinks.get(out.request_id)
            if sink is None:
                continue
            if out.finished:
                del self._sinks[out.request_id]
                self._release()
            if not self._deliver(sink, ("output", out)) and not out.finished:
                self._handle(("abort", [out.request_id]))  # nobody is listening any more

    def _fail_all(self, event: tuple[str, str]) -> None:
        for request_id, sink in list(self._sinks.items()):
            self._handle(("abort", [request_id]))
            self._deliver(sink, event)

    def _release(self) -> None:
        with self._lock:
            self._held -= 1

    @staticmethod
    def _deliver(sink: Sink, event: tuple[str, object]) -> bool:
        try:
            sink(event)
            return True
        except RuntimeError:  # the handler's event loop is closed
            return False
