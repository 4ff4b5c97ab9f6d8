"""An OpenAI-compatible HTTP server over the samplers: concurrent requests batched into BASS.

    python serving.py                        # the embedded pair on http://127.0.0.1:8011
    curl http://127.0.0.1:8011/v1/completions -H 'Content-Type: application/json' \\
        -d '{"model": "bass-embedded", "prompt": "The quick brown fox", "max_tokens": 16, "temperature": 0}'

Endpoints: POST /v1/completions, POST /v1/chat/completions (the tokenizer's chat template, or a
plain "role: content" one), GET /v1/models, GET /health, GET /metrics (Prometheus). Request fields
as OpenAI's (model, prompt / messages, max_tokens, temperature, top_p, seed, stop, stream,
stream_options, n, user) and top_k; any other field, or one this server does not implement
(logprobs, echo, logit_bias, ...), is a 400 that names it. Responses carry ``usage`` and
``speculative`` (drafted, accepted, acceptance rate, tokens per target call of the request's row).
``stream``: server-sent events, one chunk per accepted block, then ``data: [DONE]``. Requests are
batched by ``sampling.app.scheduler``; each is answered as soon as its row finishes. Bad input is a
4xx with an OpenAI-style error body (400; 401 without the API key; 413 over the body limit; 415 for
a body that is not JSON; 429 with Retry-After when the queue is full), an unknown route a 404; every
request is logged, every 500 with its cause. SIGTERM (uvicorn's graceful shutdown) finishes the
requests in flight. docs/serving.md has the details.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import socket
import sys
import time
import uuid
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from sampling.app.scheduler import SERVE_MODES, QueueFull, Scheduler, SchedulerConfig, ServeRequest, warm_up
from sampling.modes import MODES_TABLE

MAX_N = 4                 # choices per request at most (each one a row of its own)
MAX_STOPS = 4             # stop strings per request at most (OpenAI's limit)
MIN_TEMPERATURE = 1e-5    # a temperature below this is greedy: dividing logits by less overflows them (vLLM's floor)
MAX_SEED = 2 ** 63 - 1 - MAX_N   # the n choices of a request take seed, seed + 1, ...
RETRY_AFTER_S = 1         # what a 429 tells the client to wait
COMMON = {"model", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stream", "stream_options", "n",
          "user"}
FIELDS = {"completions": COMMON | {"prompt"}, "chat": COMMON | {"messages", "max_completion_tokens"}}
# OpenAI fields this server does not implement, with the values that mean "not used" (accepted as such)
UNSUPPORTED = {"logprobs": (None, False, 0), "top_logprobs": (None, 0), "echo": (None, False),
               "logit_bias": (None, {}), "best_of": (None, 1), "suffix": (None, ""), "presence_penalty": (None, 0),
               "frequency_penalty": (None, 0), "tools": (None, []), "tool_choice": (None, "none"),
               "functions": (None, []), "response_format": (None, {"type": "text"}), "parallel_tool_calls": (None,)}
log = logging.getLogger("bass.server")


class BadRequest(Exception):
    """A 4xx: message, the offending parameter, an error code, the status."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None, status: int = 400,
                 headers: dict | None = None):
        super().__init__(message)
        self.param, self.code, self.status, self.headers = param, code, status, headers


class ClientGone(Exception):
    """The client closed its connection before its answer was ready."""


def error_body(message: str, kind: str, param=None, code=None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


@dataclass
class Limits:
    model_id: str             # the one model id served
    positions: int            # the target's positions: prompt + max_tokens must fit
    default_max_tokens: int   # when a request gives none
    max_body_bytes: int = 1 << 20        # a larger request body is a 413
    api_key: str | None = None           # requests to /v1/ must carry "Authorization: Bearer <key>"
    max_token_chars: int | None = None   # the longest token's text: a longer prompt is refused before tokenizing


class Metrics:
    """The server's Prometheus metrics (``GET /metrics``), names as vLLM's with the prefix ``bass:``."""

    def __init__(self, scheduler: Scheduler):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("bass:requests", "HTTP requests, by endpoint and status", ["endpoint", "status"],
                                registry=r)
        self.prompt_tokens = Counter("bass:prompt_tokens", "prompt tokens of answered requests", registry=r)
        self.generation_tokens = Counter("bass:generation_tokens", "tokens generated", registry=r)
        seconds = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
        self.ttft = Histogram("bass:time_to_first_token_seconds", "time to a request's first tokens",
                              buckets=seconds, registry=r)
        self.itl = Histogram("bass:inter_token_latency_seconds", "time between tokens of a request (a block of k "
                             "tokens after t seconds: k observations of t / k)", buckets=seconds, registry=r)
        self.latency = Histogram("bass:e2e_request_latency_seconds", "time from a request's arrival to its answer",
                                 buckets=seconds, registry=r)
        self.batch = Histogram("bass:batch_size", "rows decoded together, observed at each step's admission",
                               buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)
        Gauge("bass:num_requests_waiting", "requests in the queue", registry=r).set_function(lambda: scheduler.waiting)
        Gauge("bass:num_requests_running", "rows of the batch in flight", registry=r).set_function(
            lambda: scheduler.running)
        self.drafts = Counter("bass:spec_decode_num_drafts", "speculative steps (verify passes after the prefill) "
                              "of answered requests' rows", registry=r)
        self.draft_tokens = Counter("bass:spec_decode_num_draft_tokens", "tokens drafted for them", registry=r)
        self.accepted = Counter("bass:spec_decode_num_accepted_tokens", "drafted tokens the target accepted; mean "
                                "acceptance length = 1 + accepted / drafts", registry=r)
        self.speculative = MODES_TABLE[scheduler.cfg.mode].speculative

    def row(self, stats: dict) -> None:
        """A request's row answered: its tokens and its speculative counts."""
        self.generation_tokens.inc(stats["new_tokens"])
        if self.speculative:
            self.drafts.inc(max(0, stats["target_calls"] - 1))
            self.draft_tokens.inc(stats["drafted"])
            self.accepted.inc(stats["accepted"])


def _number(body: dict, name: str, kind, default, lo=None, hi=None, lo_open=False):
    v = body.get(name, default)
    if v is None:
        return default
    ok = isinstance(v, bool) is False and (isinstance(v, int) if kind is int else isinstance(v, (int, float)))
    if not ok:
        raise BadRequest(f"{name} must be {'an integer' if kind is int else 'a number'}, got {json.dumps(v)}", name)
    if (lo is not None and (v <= lo if lo_open else v < lo)) or (hi is not None and v > hi):
        rng = f"{'(' if lo_open else '['}{lo}, {hi if hi is not None else 'inf'}]"
        raise BadRequest(f"{name} must be in {rng}, got {v}", name)
    return kind(v)


def check_fields(body: dict, endpoint: str) -> None:
    """A 400 for a field this endpoint does not know, or one this server does not implement."""
    for name, value in body.items():
        if name in UNSUPPORTED:
            if value not in UNSUPPORTED[name]:
                raise BadRequest(f"{name} is not supported by this server (got {json.dumps(value)})", name,
                                 "unsupported_parameter")
        elif name not in FIELDS[endpoint]:
            raise BadRequest(f"unknown field {name!r}; this endpoint takes {', '.join(sorted(FIELDS[endpoint]))}",
                             name, "unknown_parameter")


def parse_common(body: dict, limits: Limits, endpoint: str = "completions") -> dict:
    """The sampling fields shared by both endpoints, checked."""
    check_fields(body, endpoint)
    model = body.get("model")
    if not isinstance(model, str):
        raise BadRequest("model is required and must be a string", "model")
    if model != limits.model_id:
        raise BadRequest(f"unknown model {model!r}; this server serves {limits.model_id!r}", "model",
                         "model_not_found")
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop
    if stop is not None and (not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop)
                             or len(stop) > MAX_STOPS):
        raise BadRequest(f"stop must be a non-empty string or a list of at most {MAX_STOPS} of them", "stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest("stream must be a boolean", "stream")
    options = body.get("stream_options")
    if options is not None and (not isinstance(options, dict) or set(options) - {"include_usage"}
                                or not isinstance(options.get("include_usage", False), bool) or not stream):
        raise BadRequest("stream_options takes {\"include_usage\": true|false}, with stream true", "stream_options")
    if not isinstance(body.get("user", ""), str):
        raise BadRequest("user must be a string", "user")
    if "max_completion_tokens" in body:
        if "max_tokens" in body and body["max_tokens"] != body["max_completion_tokens"]:
            raise BadRequest("give max_tokens or max_completion_tokens, not both", "max_completion_tokens")
        body = dict(body, max_tokens=body["max_completion_tokens"])
    temperature = _number(body, "temperature", float, 1.0, 0, 2)
    return dict(max_tokens=_number(body, "max_tokens", int, limits.default_max_tokens, 1, limits.positions),
                temperature=0.0 if temperature < MIN_TEMPERATURE else temperature,
                top_p=_number(body, "top_p", float, 1.0, 0, 1, lo_open=True),
                top_k=_number(body, "top_k", int, 0, 0),
                seed=_number(body, "seed", int, None, 0, MAX_SEED),
                n=_number(body, "n", int, 1, 1, MAX_N), stop=stop or [], stream=stream,
                usage=bool((options or {}).get("include_usage", False)), user=body.get("user", ""))


def chat_prompt(tokenizer, messages) -> str:
    """The chat as one prompt: the tokenizer's template when it has one, else "role: content" lines."""
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages):
        raise BadRequest("messages must be a non-empty list of {role, content} strings", "messages")
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"


class Completion:
    """One choice in flight: the worker's tokens arrive on an asyncio queue; text, stop strings,
    finish reason, timings and statistics are kept here."""

    def __init__(self, loop, tokenizer, ids: list[int], fields: dict, seed: int | None, metrics: Metrics):
        self.loop, self.tok, self.stop, self.metrics = loop, tokenizer, fields["stop"], metrics
        self.events: asyncio.Queue = asyncio.Queue()
        self.tokens: list[int] = []
        self.text, self.sent = "", 0
        self.finish_reason, self.stats, self.error = None, None, None
        self.t0 = self.last = time.perf_counter()
        self.ttft: float | None = None
        kw = {} if seed is None else dict(seed=seed)
        self.req = ServeRequest(ids=ids, max_tokens=fields["max_tokens"], temperature=fields["temperature"],
                                top_p=fields["top_p"], top_k=fields["top_k"], **kw,
                                on_tokens=lambda t: loop.call_soon_threadsafe(self.events.put_nowait, ("tokens", t)),
                                on_done=lambda s, e: loop.call_soon_threadsafe(self.events.put_nowait,
                                                                               ("done", (s, e))))

    def _timed(self, k: int) -> None:
        now = time.perf_counter()
        if self.ttft is None:
            self.ttft = now - self.t0
            self.metrics.ttft.observe(self.ttft)
        else:
            for _ in range(k):
                self.metrics.itl.observe((now - self.last) / k)
        self.last = now

    async def next_delta(self) -> str | None:
        """The text added since the last call (None: finished)."""
        while self.finish_reason is None:
            kind, value = await self.events.get()
            if kind == "tokens":
                if self.req.cancelled:
                    continue                               # a stop string ended it: the rest is dropped
                self._timed(len(value))
                self.tokens += value
                self.text = self.tok.decode(self.tokens, skip_special_tokens=True)
                cut = min((self.text.find(s) for s in self.stop if s in self.text), default=-1)
                if cut >= 0:                               # a stop string: end the row, keep the text before it
                    self.text, self.req.cancelled = self.text[:cut], True
                delta, self.sent = self.text[self.sent:], len(self.text)
                if delta:
                    return delta
            else:
                self.stats, self.error = value
                if self.stats is not None:
                    self.metrics.row(self.stats)
                eos = self.tok.eos_token_id
                self.finish_reason = "stop" if self.req.cancelled or (self.tokens and self.tokens[-1] == eos) \
                    else "length"
        return None

    async def drain(self) -> None:
        while await self.next_delta() is not None:
            pass


def speculative_stats(stats: dict | None) -> dict:
    if not stats:
        return {}
    drafted, accepted, calls = stats["drafted"], stats["accepted"], stats["target_calls"]
    return dict(drafted_tokens=drafted, accepted_tokens=accepted,
                acceptance_rate=accepted / drafted if drafted else None,
                tokens_per_target_call=stats["new_tokens"] / calls if calls else None, batch=stats["batch"])


def create_app(scheduler: Scheduler, tokenizer, limits: Limits) -> FastAPI:
    app = FastAPI(title="BASS++ server")
    metrics = Metrics(scheduler)
    scheduler.on_step = metrics.batch.observe

    def done(request: Request, status: int, prompt: int = 0, completion: int = 0, note: str = "") -> None:
        """A request's log line and its count, once."""
        if getattr(request.state, "logged", False):
            return
        request.state.logged = True
        endpoint = request.url.path
        metrics.requests.labels(endpoint, str(status)).inc()
        latency = time.perf_counter() - request.state.t0
        if status == 200 and prompt:
            metrics.prompt_tokens.inc(prompt)
            metrics.latency.observe(latency)
        user = getattr(request.state, "user", "")
        log.log(logging.ERROR if status >= 500 else logging.INFO, "%s %s %d %.3fs prompt=%d completion=%d%s%s",
                request.method, endpoint, status, latency, prompt, completion, f" user={user}" if user else "",
                f" ({note})" if note else "")

    class Gate:
        """Around every request: the API key, then the request's log line and count (a streamed
        completion's once its stream has ended), every 500 with its cause."""

        def __init__(self, inner):
            self.inner = inner

        async def __call__(self, scope, receive, send):
            if scope["type"] != "http":
                return await self.inner(scope, receive, send)
            request = Request(scope)
            request.state.t0 = time.perf_counter()
            if limits.api_key and scope["path"].startswith("/v1/"):
                given = request.headers.get("authorization", "")
                if not hmac.compare_digest(given.encode(), f"Bearer {limits.api_key}".encode()):
                    done(request, 401, note="no valid API key")
                    return await JSONResponse(error_body("a valid API key is required: Authorization: Bearer <key>",
                                                         "invalid_request_error", None, "invalid_api_key"),
                                              status_code=401)(scope, receive, send)
            status = [500]

            async def watched(message):
                if message["type"] == "http.response.start":
                    status[0] = message["status"]
                await send(message)
            try:
                await self.inner(scope, receive, watched)
            except Exception as e:                              # a 500 (sent by the handler below), its cause
                log.exception("%s %s failed", request.method, scope["path"])
                done(request, 500, note=f"{type(e).__name__}: {e}")
                raise
            done(request, status[0])

    app.add_middleware(Gate)

    @app.exception_handler(Exception)
    async def internal_error(request, exc):
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}: {exc}", "server_error"),
                            status_code=500)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        done(request, exc.status_code, note=str(exc.detail))
        return JSONResponse(error_body(str(exc.detail), kind), status_code=exc.status_code)

    @app.exception_handler(BadRequest)
    async def bad_request(request, exc):
        done(request, exc.status, note=str(exc))
        return JSONResponse(error_body(str(exc), "invalid_request_error", exc.param, exc.code),
                            status_code=exc.status, headers=exc.headers)

    @app.get("/health")
    async def health():
        return {"status": "ok", "waiting": scheduler.waiting, "running": scheduler.running,
                "batches": scheduler.batches}

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": limits.model_id, "object": "model", "created": 0,
                                            "owned_by": "bass++"}]}

    async def body_of(request: Request) -> dict:
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "application/json":
            raise BadRequest(f"the request body must be JSON (Content-Type: application/json), got "
                             f"{kind or 'no content type'}", code="unsupported_media_type", status=415)
        too_big = BadRequest(f"the request body is over this server's limit of {limits.max_body_bytes} bytes",
                             code="request_too_large", status=413)
        if int(request.headers.get("content-length") or 0) > limits.max_body_bytes:
            raise too_big
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limits.max_body_bytes:
                raise too_big
            chunks.append(chunk)

        def no_constant(name):
            raise BadRequest(f"the request body holds {name}, which is not a JSON number")
        try:
            body = json.loads(b"".join(chunks), parse_constant=no_constant)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise BadRequest("the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise BadRequest("the request body must be a JSON object")
        return body

    async def tokenize(prompt: str, param: str) -> list[int]:
        """The prompt's token ids, counted off the event loop; a prompt too long even at the longest
        token's length is refused before that."""
        if limits.max_token_chars and len(prompt) > limits.positions * limits.max_token_chars:
            raise BadRequest(f"the prompt's {len(prompt)} characters are more than the model's {limits.positions} "
                             f"positions can hold", param, "context_length_exceeded")
        ids = await asyncio.to_thread(lambda: tokenizer(prompt)["input_ids"])
        if not ids:
            raise BadRequest("the prompt is empty", param)
        return ids

    async def wait_all(request: Request, choices: list[Completion]) -> None:
        """Every choice's answer, watching the connection: a client that leaves stops its rows."""
        tasks = [asyncio.ensure_future(c.drain()) for c in choices]
        try:
            while True:
                _, pending = await asyncio.wait(tasks, timeout=0.2)
                if not pending:
                    return
                if await request.is_disconnected():
                    raise ClientGone
        finally:
            for t in tasks:
                t.cancel()
            for c in choices:
                if c.finish_reason is None:
                    c.req.cancelled = True

    async def complete(request: Request, prompt: str, fields: dict, chat: bool):
        request.state.user = fields["user"]
        ids = await tokenize(prompt, "messages" if chat else "prompt")
        if len(ids) + fields["max_tokens"] > limits.positions:
            raise BadRequest(f"the prompt's {len(ids)} tokens + max_tokens {fields['max_tokens']} exceed the "
                             f"model's {limits.positions} positions", "max_tokens", "context_length_exceeded")
        loop = asyncio.get_running_loop()
        seeds = [None if fields["seed"] is None else fields["seed"] + i for i in range(fields["n"])]
        choices = [Completion(loop, tokenizer, ids, fields, s, metrics) for s in seeds]
        try:
            for c in choices:
                scheduler.submit(c.req)
        except QueueFull as e:
            for c in choices:
                c.req.cancelled = True
            raise BadRequest(f"the server is busy ({e}); retry after {RETRY_AFTER_S} s", None, "rate_limit_exceeded",
                             429, {"Retry-After": str(RETRY_AFTER_S)}) from None
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        head = dict(id=rid, object="chat.completion" if chat else "text_completion", created=int(time.time()),
                    model=limits.model_id)
        if fields["stream"]:                               # logged when the stream ends
            return StreamingResponse(stream(request, choices, head, chat, len(ids), fields["usage"]),
                                     media_type="text/event-stream")
        try:
            await wait_all(request, choices)
        except ClientGone:
            done(request, 499, len(ids), sum(len(c.tokens) for c in choices), "the client left; its rows stopped")
            return Response(status_code=499)
        failed = [c.error for c in choices if c.error]
        completion = sum(len(c.tokens) for c in choices)
        if failed:
            log.error("%s failed: %s", rid, failed[0])
            done(request, 500, len(ids), completion, failed[0])
            return JSONResponse(error_body(failed[0], "server_error"), status_code=500)
        out = [dict(index=i, finish_reason=c.finish_reason, logprobs=None,
                    **({"message": {"role": "assistant", "content": c.text}} if chat else {"text": c.text}))
               for i, c in enumerate(choices)]
        done(request, 200, len(ids), completion)
        return dict(head, choices=out, usage=dict(prompt_tokens=len(ids), completion_tokens=completion,
                                                  total_tokens=len(ids) + completion),
                    speculative=[speculative_stats(c.stats) for c in choices])

    async def stream(request: Request, choices, head, chat: bool, prompt_tokens: int, usage: bool):
        obj = "chat.completion.chunk" if chat else "text_completion"
        status, note = 499, "the client left; its rows stopped"
        try:
            for i, c in enumerate(choices):
                if chat:
                    yield sse(dict(head, object=obj, choices=[dict(index=i, delta={"role": "assistant"},
                                                                   finish_reason=None)]))
                while (delta := await c.next_delta()) is not None:
                    if await request.is_disconnected():
                        raise asyncio.CancelledError
                    piece = {"delta": {"content": delta}} if chat else {"text": delta}
                    yield sse(dict(head, object=obj, choices=[dict(index=i, finish_reason=None, **piece)]))
                if c.error:
                    status, note = 500, c.error
                    log.error("%s failed: %s", head["id"], c.error)
                    yield sse(error_body(c.error, "server_error"))
                    break
                end = {"delta": {}} if chat else {"text": ""}
                yield sse(dict(head, object=obj, choices=[dict(index=i, finish_reason=c.finish_reason, **end)],
                               speculative=speculative_stats(c.stats)))
            else:
                status, note = 200, ""
            completion = sum(len(c.tokens) for c in choices)
            if usage:
                yield sse(dict(head, object=obj, choices=[], usage=dict(
                    prompt_tokens=prompt_tokens, completion_tokens=completion,
                    total_tokens=prompt_tokens + completion)))
            yield "data: [DONE]\n\n"
        finally:                                           # a client gone mid-stream frees its rows
            for c in choices:
                if c.finish_reason is None:
                    c.req.cancelled = True
            done(request, status, prompt_tokens, sum(len(c.tokens) for c in choices), note)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await body_of(request)
        fields = parse_common(body, limits, "completions")
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise BadRequest("prompt must be a non-empty string", "prompt")
        return await complete(request, prompt, fields, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await body_of(request)
        fields = parse_common(body, limits, "chat")
        return await complete(request, chat_prompt(tokenizer, body.get("messages")), fields, chat=True)

    return app


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, allow_nan=False)}\n\n"


def longest_token(tokenizer) -> int:
    """Characters of the vocabulary's longest token as text (a prompt of more than positions x this
    many characters cannot fit)."""
    return max(len(tokenizer.decode([i])) for i in range(len(tokenizer)))


def build(args):
    """Scheduler (started, warmed up), tokenizer and limits from the flags."""
    from sampling.app.cli import load_pair, presses_of
    from sampling.utils import max_positions
    target, draft, tok, vocab = load_pair(args, need_draft=bool(MODES_TABLE[args.serve_mode].drafters))
    cfg = SchedulerConfig(args.serve_mode, args.max_batch, args.max_wait_ms, args.queue_size, args.gamma,
                          args.continuous == "on")
    sched = Scheduler(target, draft, tok, cfg, vocab, kv_cache=args.kv_cache, press=presses_of(args)[0],
                      speculate=args.speculate)
    warm_up(sched, tok("warm up")["input_ids"])
    limits = Limits(args.model_id, max_positions(target) or 2048, args.max_tokens, args.max_body_bytes,
                    args.api_key, longest_token(tok))
    return sched.start(), tok, limits


def parse(argv=None):
    from sampling.app.cli import CACHES, Parser, add_model_args, add_press_args, add_speculate_arg
    d = SchedulerConfig()
    ap = Parser(description=__doc__.split("\n\n")[0])
    add_model_args(ap, placement=True)
    ap.add_argument("--host", default="127.0.0.1", help="address to listen on")
    ap.add_argument("--port", type=int, default=8011, help="port to listen on")
    ap.add_argument("--model_id", default="bass-embedded", help="the model name clients send")
    ap.add_argument("--serve_mode", default=d.mode, choices=SERVE_MODES,
                    help="bass: batched speculative; ar: batched AR; google: speculative, one request at a time")
    ap.add_argument("--max_batch", type=int, default=d.max_batch, help="requests decoded together at most")
    ap.add_argument("--max_wait_ms", type=float, default=d.max_wait_ms,
                    help="how long a first request waits for others to join its batch")
    ap.add_argument("--queue_size", type=int, default=d.queue_size, help="waiting requests at most (then 429)")
    ap.add_argument("--gamma", type=int, default=d.gamma, help="draft length (bass, google)")
    ap.add_argument("--continuous", default="on" if d.continuous else "off", choices=("on", "off"),
                    help="bass, ar: requests join a running batch between steps (continuous batching); off: "
                         "a batch runs to its end before the next starts")
    ap.add_argument("--max_tokens", type=int, default=16, help="max_tokens of a request that gives none")
    ap.add_argument("--max_body_bytes", type=int, default=1 << 20, help="largest request body accepted (then 413)")
    ap.add_argument("--api_key", "--api-key", default=os.environ.get("BASS_API_KEY"),
                    help="requests to /v1/ must carry 'Authorization: Bearer <key>' (default: $BASS_API_KEY; "
                         "unset: no key)")
    ap.add_argument("--log_level", default="info", choices=("debug", "info", "warning", "error"),
                    help="the server's log: a line per request at info, every 500 with its cause")
    ap.add_argument("--kv_cache", default="dynamic", choices=CACHES,
                    help="the KV cache (sampling.cache.backends)")
    add_speculate_arg(ap)
    add_press_args(ap)
    args = ap.parse_args(argv)
    SchedulerConfig(args.serve_mode, args.max_batch, args.max_wait_ms, args.queue_size, args.gamma).validate()
    if not 1 <= args.port <= 65535:
        raise ValueError(f"--port must be in [1, 65535], got {args.port}")
    if args.max_tokens < 1:
        raise ValueError(f"--max_tokens must be >= 1, got {args.max_tokens}")
    if args.max_body_bytes < 1024:
        raise ValueError(f"--max_body_bytes must be >= 1024, got {args.max_body_bytes}")
    if args.api_key is not None and not args.api_key.strip():
        raise ValueError("--api_key is empty; give a key, or leave it (and BASS_API_KEY) unset")
    return args


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, before anything is announced; a taken port is a one-line error."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror.lower() if e.strerror else e} "
                         f"(another server there? pick another --port)") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def main(argv=None) -> None:
    import uvicorn
    args = parse(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    print("loading models ...", file=sys.stderr, flush=True)
    sched, tok, limits = build(args)
    try:
        sock = bind(args.host, args.port)
    except ValueError:
        sched.stop()
        raise
    app = create_app(sched, tok, limits)
    print(f"serving {limits.model_id} ({args.serve_mode}, batches of up to {args.max_batch}"
          f"{', continuous' if sched.joining else ''}{', API key required' if limits.api_key else ''}) on "
          f"http://{args.host}:{args.port}", flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:               # SIGTERM or SIGINT: uvicorn has finished the requests in flight
        pass
    finally:
        print("shut down", flush=True)
        sched.stop()


if __name__ == "__main__":
    from sampling.app.cli import run
    run(main)
