"""OpenAI-compatible HTTP API over a `Chat`: POST /v1/chat/completions, GET /v1/models, GET /health.

Request handlers parse and preprocess (images, prompt) in the thread pool, then hand the prompt to the
`EngineWorker`, the single thread that owns the `Engine`, and wait for its events on an asyncio queue.
A client that goes away has its request aborted, which frees its slot at the next engine step.

Time limits: a request still running --request-timeout seconds after it arrived is aborted in the engine
and answered 504 (code "request_timeout"; streamed: an error event, then the stream ends). 504, not 408:
the client sent its request in time, the server did not answer in time. On SIGTERM/SIGINT `serve` stops
accepting connections, lets in-flight requests finish for up to --drain-timeout seconds, answers the
rest 503 (code "server_shutting_down") and exits with status 0.

Thinking (`chat_template_kwargs.enable_thinking`) comes back as `reasoning_content`, without the
<think>/</think> tags. As in the reference chat(), a reply that never closes </think> counts as the answer:
it is all `content`; streamed, its text first arrives as reasoning deltas and then once more as content.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import signal
import threading
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..chat import Chat
from ..generation import Engine, GenerationResult
from ..reasoning import ReasoningStream, strip_think_tags
from .errors import APIError
from .protocol import ChatRequest, parse_chat_request
from .settings import ServerSettings
from .worker import EngineWorker, QueueFull, ShuttingDown

log = logging.getLogger("ovis25.serve")
_DISCONNECT_POLL_S = 0.5  # how often a waiting non-streaming handler checks that its client is still there


def create_app(chat: Chat, settings: ServerSettings) -> FastAPI:
    engine = Engine(chat.model, chat.processor.tokenizer, max_batch_size=settings.max_batch,
                    max_len=settings.max_model_len)
    worker = EngineWorker(engine, settings.capacity)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        worker.start()
        try:
            yield
        finally:
            await run_in_threadpool(worker.stop)

    # No /docs or /openapi.json: every route but /health sits behind the API key.
    app = FastAPI(title="ovis25", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.worker = worker  # for serve()'s shutdown
    _install_error_handlers(app)

    def authorize(request: Request) -> None:
        if settings.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise APIError(401, "missing API key: send the header 'Authorization: Bearer <key>'", None,
                           "missing_api_key")
        if not hmac.compare_digest(token.strip().encode(), settings.api_key.encode()):
            raise APIError(401, "invalid API key", None, "invalid_api_key")

    def model_card() -> dict:
        return {"id": settings.model_name, "object": "model", "created": created, "owned_by": "ovis25"}

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "requests": worker.held}

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def list_models() -> dict:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}", dependencies=[Depends(authorize)])
    async def get_model(model_id: str) -> dict:
        if model_id != settings.model_name:
            raise APIError(404, f"The model {model_id!r} does not exist", "model", "model_not_found")
        return model_card()

    def prepare(body: object) -> tuple[ChatRequest, dict]:
        """Parse, read the media and build the prompt (blocking work, run in the thread pool)."""
        req = parse_chat_request(body, settings, chat.generation_config)
        req.load_media(settings)
        try:
            prompt = chat.processor(req.messages, enable_thinking=req.config.enable_thinking,
                                    min_pixels=req.min_pixels, max_pixels=req.max_pixels)
        except ValueError as e:
            raise APIError(400, str(e), "messages", "invalid_request") from e
        length = prompt["input_ids"].numel()
        if length >= settings.max_model_len:
            raise APIError(400, f"the prompt is {length} tokens; the server's --max-model-len={settings.max_model_len} "
                                "must leave room for at least one new token", "messages", "context_length_exceeded")
        return req, prompt

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat_completions(request: Request) -> Response:
        loop = asyncio.get_running_loop()
        wait = _Waiter(settings.request_timeout)  # the clock starts when the request arrives
        body = await _read_json(request, settings.max_body_bytes)
        req, prompt = await run_in_threadpool(prepare, body)
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        ids = [f"{completion_id}-{i}" for i in range(req.n)]
        try:
            worker.submit([(rid, prompt, config) for rid, config in zip(ids, req.choice_configs())],
                          lambda event: loop.call_soon_threadsafe(wait.events.put_nowait, event))
        except QueueFull as e:
            raise APIError(429, f"{e} (--max-batch={settings.max_batch}, --max-queue={settings.max_queue})",
                           None, "queue_full") from e
        except ShuttingDown as e:
            raise APIError(503, str(e), None, "server_shutting_down") from e
        head = {"id": completion_id, "created": int(time.time()), "model": settings.model_name}
        if req.stream:
            return StreamingResponse(_stream(worker, wait, ids, req, head), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        results = await _collect(worker, wait, ids, request)
        if results is None:  # the client went away; nobody reads this
            return Response(status_code=499)
        return JSONResponse({
            **head, "object": "chat.completion",
            "choices": [{"index": i, "message": _message(r), "finish_reason": r.finish_reason, "logprobs": None}
                        for i, r in enumerate(results)],
            "usage": _usage(results),
        })

    return app


def serve(chat: Chat, settings: ServerSettings, host: str = "127.0.0.1", port: int = 8000,
          log_level: str = "info") -> None:
    """Run the API with uvicorn until SIGTERM/SIGINT, then drain (see the module docstring) and return."""
    import uvicorn

    class DrainingServer(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):  # noqa: ANN202 (uvicorn's)
            # As uvicorn's, minus re-raising the signal once shut down: a drained exit is a normal exit (0).
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            originals = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in originals.items():
                    signal.signal(sig, handler)

        async def shutdown(self, sockets=None) -> None:  # noqa: ANN001 (uvicorn's)
            log.info("shutting down: %d request(s) in flight get up to %g s to finish (--drain-timeout)",
                     worker.held, settings.drain_timeout)
            late = asyncio.get_running_loop().call_later(
                settings.drain_timeout, worker.close,
                f"the server is shutting down and the request did not finish within --drain-timeout="
                f"{settings.drain_timeout:g} s")
            try:
                await super().shutdown(sockets)
            finally:
                late.cancel()

    app = create_app(chat, settings)
    worker = app.state.worker
    # uvicorn's own limit only backs ours up: at drain_timeout the requests left get their 503s, which
    # then need a moment to be sent.
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=settings.drain_timeout + 5)
    DrainingServer(config).run()


# ---- request and response helpers -------------------------------------------------------------------------

async def _read_json(request: Request, limit: int) -> object:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"the request body is {declared} bytes, more than the server's --max-body-bytes={limit}",
                       None, "request_too_large")
    chunks, total = [], 0
    async for chunk in request.stream():  # also bounds bodies sent without a Content-Length
        total += len(chunk)
        if total > limit:
            raise APIError(413, f"the request body is more than the server's --max-body-bytes={limit}",
                           None, "request_too_large")
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except RecursionError as e:
        raise APIError(400, "the request body is not valid JSON: nested too deeply", None, "invalid_json") from e
    except ValueError as e:  # also JSONDecodeError, UnicodeDecodeError and integers of over 4300 digits
        raise APIError(400, f"the request body is not valid JSON: {e}", None, "invalid_json") from e


class _Waiter:
    """A request's engine events, within its --request-timeout."""

    def __init__(self, timeout: float | None):
        self.events: asyncio.Queue = asyncio.Queue()
        self.timeout = timeout
        self.deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout

    async def next(self, poll: float | None = None) -> tuple[str | None, object]:
        """The next event; (None, None) after `poll` seconds without one; ("timeout", APIError) once the
        deadline has passed."""
        loop = asyncio.get_running_loop()
        wait, until_deadline = poll, False
        if self.deadline is not None:
            left = self.deadline - loop.time()
            if left <= 0:
                return self._timed_out()
            until_deadline = poll is None or left <= poll
            wait = left if until_deadline else poll
        try:
            return await asyncio.wait_for(self.events.get(), wait)
        except asyncio.TimeoutError:  # the deadline's own wait running out is the timeout, not a quiet poll
            return self._timed_out() if until_deadline else (None, None)

    def _timed_out(self) -> tuple[str, APIError]:
        return "timeout", APIError(504, f"the request did not finish within the server's --request-timeout="
                                        f"{self.timeout:g} s and was stopped", None, "request_timeout")


def _event_error(kind: str | None, payload: object) -> APIError | None:
    """The error an event ends a request with, if it does."""
    if kind == "timeout":
        return payload
    if kind == "shutdown":
        return APIError(503, payload, None, "server_shutting_down")
    if kind == "error":
        return APIError(500, payload, None, "generation_failed")
    return None


async def _collect(worker: EngineWorker, wait: _Waiter, ids: list[str],
                   request: Request) -> list[GenerationResult] | None:
    """Final results in choice order, or None when the client disconnected (its requests are aborted)."""
    results: dict[str, GenerationResult] = {}
    loop = asyncio.get_running_loop()
    check_at = loop.time() + _DISCONNECT_POLL_S
    try:
        while len(results) < len(ids):
            kind, payload = await wait.next(_DISCONNECT_POLL_S)
            error = _event_error(kind, payload)
            if error is not None:
                raise error
            if kind == "output" and payload.finished:
                results[payload.request_id] = payload.result
            if loop.time() >= check_at:  # events arrive at every token, so check on a clock
                if await request.is_disconnected():
                    return None
                check_at = loop.time() + _DISCONNECT_POLL_S
        return [results[i] for i in ids]
    finally:
        if len(results) < len(ids):
            worker.abort([i for i in ids if i not in results])


async def _stream(worker: EngineWorker, wait: _Waiter, ids: list[str], req: ChatRequest,
                  head: dict) -> AsyncIterator[str]:
    """Server-sent events: a role chunk, content/reasoning deltas, a finish chunk per choice, [DONE]."""
    index = {rid: i for i, rid in enumerate(ids)}
    reasoning = [ReasoningStream() for _ in ids]
    results: dict[str, GenerationResult] = {}

    def chunk(choices: list[dict], usage: dict | None = None) -> str:
        data = {**head, "object": "chat.completion.chunk", "choices": choices}
        if req.include_usage:
            data["usage"] = usage
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

    def choice(i: int, delta: dict, finish_reason: str | None = None) -> dict:
        return {"index": i, "delta": delta, "finish_reason": finish_reason, "logprobs": None}

    try:
        yield chunk([choice(i, {"role": "assistant", "content": ""}) for i in range(len(ids))])
        while len(results) < len(ids):
            kind, payload = await wait.next()
            error = _event_error(kind, payload)
            if error is not None:
                yield f"data: {json.dumps(error.body())}\n\n"
                break
            i = index[payload.request_id]
            thinking = (reasoning[i].finish(payload.result.thinking) if payload.finished
                        else reasoning[i].push(payload.thinking))
            delta = {key: value for key, value in (("reasoning_content", thinking), ("content", payload.text)) if value}
            if delta:
                yield chunk([choice(i, delta)])
            if payload.finished:
                results[payload.request_id] = payload.result
                yield chunk([choice(i, {}, payload.result.finish_reason)])
        else:
            if req.include_usage:
                yield chunk([], _usage([results[i] for i in ids]))
        yield "data: [DONE]\n\n"
    finally:  # also runs when the client disconnects and the response task is cancelled
        if len(results) < len(ids):
            worker.abort([i for i in ids if i not in results])


def _message(result: GenerationResult) -> dict:
    return {"role": "assistant", "content": result.text,
            "reasoning_content": strip_think_tags(result.thinking) or None}


def _usage(results: list[GenerationResult]) -> dict:
    prompt = results[0].usage["prompt_tokens"]  # one prompt, shared by the n choices
    completion = sum(r.usage["completion_tokens"] for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "completion_tokens_details": {"reasoning_tokens": sum(r.usage["thinking_tokens"] for r in results)}}


def _install_error_handlers(app: FastAPI) -> None:
    """Every error leaves in the OpenAI shape; never a traceback."""

    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> Response:
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return APIError(exc.status_code, str(exc.detail), None, code).response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> Response:
        return APIError(400, f"invalid request: {exc.errors()}", None, "invalid_request").response()

    @app.exception_handler(Exception)
    async def internal_error(_: Request, exc: Exception) -> Response:
        log.error("unhandled error: %s: %s", type(exc).__name__, exc)
        return APIError(500, "internal server error", None, "internal_error").response()
