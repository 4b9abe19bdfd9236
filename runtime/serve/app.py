"""The FastAPI application: OpenAI-compatible endpoints over one Engine.

Errors are OpenAI's JSON ({"error": {message, type, param, code}}): 400 bad parameters (pydantic validation
included: FastAPI's default 422 is mapped to 400; body.py for the body itself), 401 bad API key, 404 unknown
model, 413 body or prompt too long, 500 a generation that failed in the engine (the sequence alone: others
go on), 503 loading / queue full (Retry-After) / state that does not fit the memory plan / engine stopped.
Any other unexpected error is a 500 naming itself, which the tests treat as a bug.

Prompt tokenisation and grammar compilation run on a worker thread (starlette's thread pool), so a large
prompt or schema does not stall the event loop that feeds every open stream.
"""

from __future__ import annotations

import asyncio
import json
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from ..errors import InputError
from . import body as B
from .chat_prompt import build
from .engine import EngineStopped, GenParams, NoMemory, QueueFull, Sequence
from .handlers import ChatJob, CompletionJob
from .protocol import APIError, ChatRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest


class ServerState:
    """What the endpoints share; `engine` is None while the model loads."""

    def __init__(self, model_name: str, api_key: str | None = None, max_body: int = 8 << 20):
        self.model_name, self.api_key, self.max_body = model_name, api_key, max_body
        self.engine = self.grammars = self.tokenizer = self.runtime = None
        self.load_error: str | None = None
        self.created = int(time.time())


def _err(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def create_app(S: ServerState) -> FastAPI:
    app = FastAPI(title="dsv4rt", docs_url=None, redoc_url=None)

    @app.exception_handler(RequestValidationError)
    async def _validation(request, exc: RequestValidationError):
        errs = exc.errors()
        first = errs[0] if errs else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        return _err(APIError(400, f"{where or 'body'}: {first.get('msg', 'invalid request')}", param=where or None))

    @app.exception_handler(APIError)
    async def _api(request, exc: APIError):
        return _err(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc: StarletteHTTPException):
        # routing's own answers (an unknown path, a wrong method) in OpenAI's error JSON too
        what = {404: f"no route {request.url.path}; see /v1/models, /v1/chat/completions, /v1/completions",
                405: f"{request.method} is not allowed on {request.url.path}"}.get(exc.status_code, str(exc.detail))
        return _err(APIError(exc.status_code, what, "invalid_request_error", headers=dict(exc.headers or {})))

    @app.exception_handler(Exception)
    async def _bug(request, exc: Exception):
        return _err(APIError(500, f"internal error ({type(exc).__name__}: {exc})"[:300], "server_error"))

    @app.middleware("http")
    async def _guard(request: Request, call_next):
        path = request.url.path
        if S.api_key and path.startswith("/v1"):
            if request.headers.get("authorization", "") != f"Bearer {S.api_key}":
                return _err(APIError(401, "invalid API key; pass it as 'Authorization: Bearer KEY'",
                                     "authentication_error", code="invalid_api_key"))
        size = request.headers.get("content-length")   # (a chunked body is counted as it is read: body.py)
        if size is not None and size.isdigit() and int(size) > S.max_body:
            return _err(B.too_large(int(size), S.max_body))
        if S.engine is None and path not in ("/health", "/metrics"):
            msg = S.load_error or "the model is still loading; retry shortly"
            return _err(APIError(503, msg, "server_error", headers={"Retry-After": "5"}))
        return await call_next(request)

    def check_model(name: str | None) -> None:
        if name is not None and name != S.model_name:
            raise APIError(404, f"model {name!r} does not exist; this server serves {S.model_name!r}",
                           param="model", code="model_not_found")

    async def body(request: Request, model):
        return await B.parse(request, model, S.max_body)

    @app.get("/health")
    async def health():
        if S.engine is None:
            return _err(APIError(503, S.load_error or "loading", "server_error", headers={"Retry-After": "5"}))
        if S.engine.error and not S.engine.thread.is_alive():
            return _err(APIError(503, f"engine stopped: {S.engine.error}", "server_error"))
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        if S.engine is None:
            return PlainTextResponse("", status_code=503)
        return PlainTextResponse(S.engine.metrics.render(), media_type="text/plain; version=0.0.4")

    def model_card() -> dict:
        return {"id": S.model_name, "object": "model", "created": S.created, "owned_by": "dsv4rt",
                "max_model_len": S.engine.cfg.max_position}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        check_model(model_id)
        return model_card()

    @app.post("/tokenize")
    async def tokenize(request: Request):
        req = await body(request, TokenizeRequest)
        check_model(req.model)
        if req.messages is not None and req.prompt is not None:
            raise APIError(400, "give prompt or messages, not both", param="prompt")
        if req.messages is not None:           # exactly the ids /v1/chat/completions would feed for these fields
            ids = (await run_in_threadpool(build, S, req)).ids
        elif req.prompt is not None:
            ids = await run_in_threadpool(S.tokenizer.encode, req.prompt, add_bos=req.add_special_tokens)
        else:
            raise APIError(400, "give prompt or messages", param="prompt")
        return {"tokens": ids, "count": len(ids), "max_model_len": S.engine.cfg.max_position}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        req = await body(request, DetokenizeRequest)
        check_model(req.model)
        bad = [t for t in req.tokens if not 0 <= t < S.engine.cfg.vocab_size]
        if bad:
            raise APIError(400, f"token id {bad[0]} is out of range [0, {S.engine.cfg.vocab_size})", param="tokens")
        return {"prompt": S.tokenizer.decode(req.tokens)}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        req = await body(request, ChatRequest)
        check_model(req.model)
        return await run_job(request, await run_in_threadpool(ChatJob, S, req), req)

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = await body(request, CompletionRequest)
        check_model(req.model)
        return await run_job(request, await run_in_threadpool(CompletionJob, S, req), req)

    async def run_job(request: Request, job, req):
        if req.stream_options is not None and not req.stream:
            raise APIError(400, "stream_options is only allowed with stream=true", param="stream_options")
        if S.engine.spec and getattr(job, "grammar", None) is not None:
            raise APIError(400, "structured output (response_format, tool_choice required / named) is not decoded "
                                "speculatively; send it to a server started without --speculative",
                           param="response_format" if req.response_format else "tool_choice")
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        seqs = []
        try:
            for i in range(req.n):
                seed = None if req.seed is None else req.seed + i
                params = GenParams(job.max_tokens, req.temperature, req.top_p, seed, job.logprobs,
                                   ignore_eos=req.ignore_eos)
                seqs.append(S.engine.submit(Sequence(job.prompt, params, job.output(loop, queue, i))))
        except QueueFull as e:
            for s in seqs:
                S.engine.cancel(s)
            raise APIError(503, str(e), "server_error", headers={"Retry-After": "1"}) from None
        except (NoMemory, EngineStopped) as e:
            raise APIError(503, str(e), "server_error", headers={"Retry-After": "5"}) from None
        except InputError as e:
            raise APIError(413, str(e), code="context_length_exceeded") from None

        def cancel_all():
            for s in seqs:
                if s.status != "done":
                    S.engine.cancel(s)

        if req.stream:
            async def sse():
                try:
                    async for chunk in job.stream(queue, seqs):
                        yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
                    yield "data: [DONE]\n\n"
                finally:
                    cancel_all()                   # a client that went away: freed within one engine step
            return StreamingResponse(sse(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        waiter = asyncio.ensure_future(job.collect(queue, seqs))
        try:
            while not waiter.done():
                await asyncio.wait([waiter], timeout=0.25)
                if not waiter.done() and await request.is_disconnected():
                    waiter.cancel()
                    cancel_all()
                    return JSONResponse({}, status_code=499)
            if S.engine.fatal:                  # a lost peer rank ended the sequences: not an answer
                raise APIError(503, f"the engine stopped: {S.engine.error}", "server_error")
            failed = job.failure(seqs)          # a choice's generation failed: a 5xx, not a 200 with "error"
            if failed is not None:
                raise failed
            return waiter.result()
        finally:
            cancel_all()

    app.state.server = S
    return app

