"""The OpenAI-compatible HTTP API (FastAPI): /v1/models, /v1/completions, /v1/chat/completions
(streamed as server-sent events, ``data: [DONE]`` last), /health, /metrics (Prometheus text),
/edge/status (what ``edge ps`` shows) and /edge/admin/memory-budget. Errors are OpenAI-shaped
(``{"error": {"message", "type", "param", "code"}}``); the openai client raises its typed errors
from them (400 BadRequestError, 401 AuthenticationError, 429 RateLimitError)."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from edge.errors import EdgeError
from edge.serve.metrics import ServerMetrics
from edge.serve.protocol import BudgetRequest, ChatRequest, CompletionRequest
from edge.serve.settings import ServeSettings
from edge.serve.worker import Admission, Busy, Clock, check_budget_change, stream_in_thread

log = logging.getLogger("edge.serve")


def error(status: int, message: str, *, kind: str = "invalid_request_error", code: str | None = None,
          param: str | None = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status, headers=headers)


class State:
    """What the app holds: settings, the loaded models (filled in by the loader thread), admission."""

    def __init__(self, settings: ServeSettings, load):
        self.settings, self._load = settings, load
        self.models: list = []
        self.admission: Admission | None = None
        self.load_error: str | None = None
        self.started = time.time()
        self.last_decode_tok_s: float | None = None

    def load_models(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            models = [self._load(self.settings) for _ in range(self.settings.concurrency)]
        except (EdgeError, OSError) as e:
            self.load_error = str(e)
            log.error("loading the model failed: %s", e)
            return
        loop.call_soon_threadsafe(self._ready, models)

    def _ready(self, models: list) -> None:
        self.admission = Admission(models, self.settings.queue_size)
        self.models[:] = models

    def gauges(self) -> tuple[int, int]:
        a = self.admission
        return (a.running, a.waiting) if a else (0, 0)


def create_app(settings: ServeSettings, load) -> FastAPI:
    """The app for ``settings``; ``load(settings)`` returns one loaded Model (called once per slot,
    in a background thread: /health answers 503 until every slot is loaded)."""
    state = State(settings, load)
    metrics = ServerMetrics(state.gauges, state.models)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loader = threading.Thread(target=state.load_models, args=(asyncio.get_running_loop(),), daemon=True)
        loader.start()
        yield
        for m in state.models:
            m.close()

    app = FastAPI(title="edge", lifespan=lifespan)
    app.state.edge = state

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return error(400, f"{where or 'request'}: {first.get('msg', 'invalid request')}", param=where)

    async def authorized(request: Request) -> None:
        key = settings.api_key
        if key and request.headers.get("authorization", "") != f"Bearer {key}":
            raise _Refused(error(401, "invalid or missing API key (send Authorization: Bearer KEY)",
                                 code="invalid_api_key"))

    @app.exception_handler(_Refused)
    async def refused(request: Request, exc: _Refused):
        return exc.response

    def ready() -> Admission:
        if state.admission is None:
            raise _Refused(error(503, state.load_error or "the model is still loading", kind="server_error",
                                 headers={"Retry-After": "1"}))
        return state.admission

    @app.get("/health")
    async def health():
        if state.load_error:
            return JSONResponse({"status": "error", "error": state.load_error}, status_code=503)
        if state.admission is None:
            return JSONResponse({"status": "loading"}, status_code=503, headers={"Retry-After": "1"})
        return {"status": "ok"}

    @app.get("/metrics", dependencies=[Depends(authorized)])
    async def prometheus():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def models():
        ready()
        m = state.models[0]
        return {"object": "list", "data": [{"id": m.name, "object": "model", "created": int(state.started),
                                            "owned_by": "edge"}]}

    @app.get("/edge/status", dependencies=[Depends(authorized)])
    async def status():
        adm = ready()
        m = state.models[0]
        t = m.metrics()
        hits, misses = t.get("cache_hits"), t.get("cache_misses")
        return {"model": m.name, "backend": m.backend_name, "source": str(m.source),
                "resident_bytes": t.get("resident_bytes"), "memory_budget_bytes": t.get("memory_budget_bytes"),
                "context": m.backend.n_ctx, "slots": adm.concurrency, "running": adm.running, "waiting": adm.waiting,
                "decode_tok_s": state.last_decode_tok_s,
                "hit_rate": hits / (hits + misses) if hits is not None and hits + misses else None}

    @app.post("/edge/admin/memory-budget", dependencies=[Depends(authorized)])
    async def memory_budget(body: BudgetRequest):
        ready()
        if not settings.api_key:
            return error(403, "the admin endpoint needs the server started with --api-key", code="admin_disabled")
        try:
            done = [await asyncio.to_thread(check_budget_change, m, body.memory_budget) for m in state.models]
        except EdgeError as e:
            return error(400, str(e), param="memory_budget")
        return {"resized": done}

    @app.post("/v1/completions", dependencies=[Depends(authorized)])
    async def completions(body: CompletionRequest, request: Request):
        kw = dict(max_tokens=body.max_tokens, logprobs=body.logprobs)
        return await generate(request, body, lambda m, **k: m.create_completion(body.prompt, **kw, **k))

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)])
    async def chat(body: ChatRequest, request: Request):
        kw = dict(max_tokens=body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens,
                  logprobs=body.logprobs, top_logprobs=body.top_logprobs or 0)
        return await generate(request, body, lambda m, **k: m.create_chat_completion(body.messages, **kw, **k))

    async def generate(request: Request, body, call):
        why = body.unsupported()
        if why:
            return error(400, why)
        adm = ready()
        clock = Clock()
        try:
            model = await adm.acquire(settings.request_timeout)
        except Busy as e:
            metrics.requests.labels("rejected").inc()
            return error(429, f"server busy: {adm.concurrency} generating and {adm.waiting} waiting (queue "
                              f"{adm.queue_size}); retry after {e.retry_after} s", kind="rate_limit_exceeded",
                         code="queue_full", headers={"Retry-After": str(e.retry_after)})
        except asyncio.TimeoutError:
            metrics.requests.labels("timeout").inc()
            return error(504, f"waited {settings.request_timeout:.0f} s for a generation slot", kind="timeout")
        cancel = threading.Event()
        usage: dict[str, Any] = {}
        outcome = ["ok"]  # ok, cancelled, timeout or error: the requests counter's label
        kw = dict(temperature=body.temperature, top_p=body.top_p, seed=body.seed, stop=body.stop, stream=True,
                  stream_options={"include_usage": True}, cancel=cancel)

        def on_chunk(chunk: dict) -> None:  # in the generation thread
            if chunk.get("usage"):
                usage.update(chunk["usage"])
            elif any(_has_text(c) for c in chunk["choices"]):
                clock.token()
            if any(c.get("finish_reason") == "cancelled" for c in chunk["choices"]) and outcome[0] == "ok":
                outcome[0] = "cancelled"

        def finish() -> None:  # on the event loop, once the generation thread let go of the model
            seconds = time.perf_counter() - clock.start
            adm.release(model, seconds)
            metrics.requests.labels(outcome[0]).inc()
            metrics.e2e.observe(seconds)
            metrics.prompt_tokens.inc(usage.get("prompt_tokens", 0))
            metrics.generation_tokens.inc(usage.get("completion_tokens", 0))
            if clock.first is not None:
                metrics.ttft.observe(clock.first - clock.start)
            for gap in clock.gaps:
                metrics.itl.observe(gap)
            if clock.gaps:
                state.last_decode_tok_s = len(clock.gaps) / sum(clock.gaps)

        chunks = stream_in_thread(lambda: call(model, **kw), cancel, on_chunk, finish)
        deadline = asyncio.get_running_loop().time() + settings.request_timeout
        if body.stream:
            return StreamingResponse(_sse(chunks, body, cancel, deadline, outcome), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        watcher = asyncio.create_task(_watch(request, cancel, deadline))
        try:
            got = [c async for c in chunks]
        except EdgeError as e:
            outcome[0] = "error"
            return error(400, str(e))
        finally:
            watcher.cancel()
        if asyncio.get_running_loop().time() > deadline:
            return error(504, f"the request took longer than {settings.request_timeout:.0f} s", kind="timeout")
        return _assemble(got, usage)

    return app


class _Refused(Exception):
    def __init__(self, response: JSONResponse):
        self.response = response


def _has_text(choice: dict) -> bool:
    return bool(choice.get("text") or (choice.get("delta") or {}).get("content"))


async def _watch(request: Request, cancel: threading.Event, deadline: float) -> None:
    """Set ``cancel`` when the client goes away or the deadline passes (a non-streamed request)."""
    loop = asyncio.get_running_loop()
    while not cancel.is_set():
        if await request.is_disconnected() or loop.time() > deadline:
            cancel.set()
            return
        await asyncio.sleep(0.1)


async def _sse(chunks, body, cancel: threading.Event, deadline: float, outcome: list[str]):
    """Server-sent events: ``data: <chunk JSON>`` per chunk, the usage chunk only when asked, then
    ``data: [DONE]``. A client that disconnects cancels this generator (starlette watches the
    connection): closing ``chunks`` sets ``cancel`` and the generation stops before its next token."""
    want_usage = bool(body.stream_options and body.stream_options.include_usage)
    try:
        async for chunk in chunks:
            if chunk.get("usage") and not want_usage:
                continue
            if asyncio.get_running_loop().time() > deadline:
                cancel.set()
                outcome[0] = "timeout"
                yield _event({"error": {"message": "the request timed out", "type": "timeout", "param": None,
                                        "code": None}})
                break
            yield _event(chunk)
        yield "data: [DONE]\n\n"
    except EdgeError as e:
        outcome[0] = "error"
        yield _event({"error": {"message": str(e), "type": "invalid_request_error", "param": None, "code": None}})
        yield "data: [DONE]\n\n"
    finally:
        cancel.set()  # no await here: a cancelled task's every await raises again


def _event(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _assemble(chunks: list[dict], usage: dict) -> dict:
    """One whole response from a stream's chunks (the SDK streamed them so the request could be cancelled)."""
    first = next(c for c in chunks if c["choices"])
    completion = first["object"] == "text_completion"
    text, reason, lps = [], None, []
    for c in chunks:
        for ch in c["choices"]:
            text.append(ch["text"] if completion else (ch["delta"].get("content") or ""))
            reason = ch.get("finish_reason") or reason
            if ch.get("logprobs"):
                lps.append(ch["logprobs"])
    head = {k: first[k] for k in ("id", "created", "model")}
    logprobs = _merge_logprobs(lps, completion) if lps else None
    if completion:
        choice = {"text": "".join(text), "index": 0, "logprobs": logprobs, "finish_reason": reason}
        return head | {"object": "text_completion", "choices": [choice], "usage": usage}
    choice = {"index": 0, "message": {"role": "assistant", "content": "".join(text)}, "logprobs": logprobs,
              "finish_reason": reason}
    return head | {"object": "chat.completion", "choices": [choice], "usage": usage}


def _merge_logprobs(parts: list[dict], completion: bool) -> dict:
    if not completion:
        return {"content": [item for p in parts for item in p["content"]]}
    return {key: [v for p in parts for v in p[key]] for key in ("tokens", "token_logprobs", "top_logprobs")}
