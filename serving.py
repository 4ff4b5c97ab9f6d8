"""An OpenAI-compatible HTTP server over the samplers: concurrent requests batched into BASS.

    python serving.py                        # the embedded pair on http://127.0.0.1:8011
    curl http://127.0.0.1:8011/v1/completions -H 'Content-Type: application/json' \\
        -d '{"model": "bass-embedded", "prompt": "The quick brown fox", "max_tokens": 16, "temperature": 0}'

Endpoints: POST /v1/completions, POST /v1/chat/completions (the tokenizer's chat template, or a
plain "role: content" one), GET /v1/models, GET /health. Request fields as OpenAI's (model,
prompt / messages, max_tokens, temperature, top_p, seed, stop, stream, n) and top_k; responses
carry ``usage`` and ``speculative`` (drafted, accepted, acceptance rate, tokens per target call of
the request's row). ``stream``: server-sent events, one chunk per accepted block, then
``data: [DONE]``. Requests are batched by ``sampling.scheduler`` (``--serve_mode bass|ar|google``,
``--max_batch``, ``--max_wait_ms``, ``--queue_size``); bad input is a 400 with an OpenAI-style error
body, a full queue a 429, an unknown route a 404. SIGTERM (uvicorn's graceful shutdown) finishes the
requests in flight.
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from sampling.app.scheduler import SERVE_MODES, QueueFull, Scheduler, SchedulerConfig, ServeRequest, warm_up

MAX_N = 4                 # choices per request at most (each one a row of its own)
MAX_STOPS = 4             # stop strings per request at most (OpenAI's limit)


class BadRequest(Exception):
    """A 400: message and the offending parameter."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None, status: int = 400):
        super().__init__(message)
        self.param, self.code, self.status = param, code, status


def error_body(message: str, kind: str, param=None, code=None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


@dataclass
class Limits:
    model_id: str             # the one model id served
    positions: int            # the target's positions: prompt + max_tokens must fit
    default_max_tokens: int   # when a request gives none


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


def parse_common(body: dict, limits: Limits) -> dict:
    """The sampling fields shared by both endpoints, checked."""
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
    return dict(max_tokens=_number(body, "max_tokens", int, limits.default_max_tokens, 1, limits.positions),
                temperature=_number(body, "temperature", float, 1.0, 0, 2),
                top_p=_number(body, "top_p", float, 1.0, 0, 1, lo_open=True),
                top_k=_number(body, "top_k", int, 0, 0),
                seed=_number(body, "seed", int, None),
                n=_number(body, "n", int, 1, 1, MAX_N), stop=stop or [], stream=stream)


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
    finish reason and statistics are kept here."""

    def __init__(self, loop, tokenizer, ids: list[int], fields: dict, seed: int | None):
        self.loop, self.tok, self.stop = loop, tokenizer, fields["stop"]
        self.events: asyncio.Queue = asyncio.Queue()
        self.tokens: list[int] = []
        self.text, self.sent = "", 0
        self.finish_reason, self.stats, self.error = None, None, None
        self.req = ServeRequest(ids=ids, max_tokens=fields["max_tokens"], temperature=fields["temperature"],
                                top_p=fields["top_p"], top_k=fields["top_k"], seed=seed,
                                on_tokens=lambda t: loop.call_soon_threadsafe(self.events.put_nowait, ("tokens", t)),
                                on_done=lambda s, e: loop.call_soon_threadsafe(self.events.put_nowait,
                                                                               ("done", (s, e))))

    async def next_delta(self) -> str | None:
        """The text added since the last call (None: finished)."""
        while self.finish_reason is None:
            kind, value = await self.events.get()
            if kind == "tokens":
                if self.req.cancelled:
                    continue                               # a stop string ended it: the rest is dropped
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
                eos = self.tok.eos_token_id
                self.finish_reason = "stop" if self.req.cancelled or (self.tokens and self.tokens[-1] == eos) \
                    else "length"
        return None


def speculative_stats(stats: dict | None) -> dict:
    if not stats:
        return {}
    drafted, accepted, calls = stats["drafted"], stats["accepted"], stats["target_calls"]
    return dict(drafted_tokens=drafted, accepted_tokens=accepted,
                acceptance_rate=accepted / drafted if drafted else None,
                tokens_per_target_call=stats["new_tokens"] / calls if calls else None, batch=stats["batch"])


def create_app(scheduler: Scheduler, tokenizer, limits: Limits) -> FastAPI:
    app = FastAPI(title="BASS++ server")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(exc.detail), kind), status_code=exc.status_code)

    @app.exception_handler(BadRequest)
    async def bad_request(request, exc):
        return JSONResponse(error_body(str(exc), "invalid_request_error", exc.param, exc.code),
                            status_code=exc.status)

    @app.get("/health")
    async def health():
        return {"status": "ok", "queued": scheduler.queue.qsize(), "batches": scheduler.batches}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": limits.model_id, "object": "model", "created": 0,
                                            "owned_by": "bass++"}]}

    async def body_of(request: Request) -> dict:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise BadRequest("the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise BadRequest("the request body must be a JSON object")
        return body

    async def complete(request: Request, prompt: str, fields: dict, chat: bool):
        ids = tokenizer(prompt)["input_ids"]
        if not ids:
            raise BadRequest("the prompt is empty", "messages" if chat else "prompt")
        if len(ids) + fields["max_tokens"] > limits.positions:
            raise BadRequest(f"the prompt's {len(ids)} tokens + max_tokens {fields['max_tokens']} exceed the "
                             f"model's {limits.positions} positions", "max_tokens", "context_length_exceeded")
        loop = asyncio.get_running_loop()
        seeds = [None if fields["seed"] is None else fields["seed"] + i for i in range(fields["n"])]
        choices = [Completion(loop, tokenizer, ids, fields, s) for s in seeds]
        try:
            for c in choices:
                scheduler.submit(c.req)
        except QueueFull as e:
            for c in choices:
                c.req.cancelled = True
            raise BadRequest(f"the server is busy ({e}); retry later", None, "rate_limit_exceeded", 429) from None
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        head = dict(id=rid, object="chat.completion" if chat else "text_completion", created=int(time.time()),
                    model=limits.model_id)
        if fields["stream"]:
            return StreamingResponse(stream(request, choices, head, chat, len(ids)), media_type="text/event-stream")
        try:
            for c in choices:
                while await c.next_delta() is not None:
                    pass
        except asyncio.CancelledError:                      # the client left: free the rows
            for c in choices:
                c.req.cancelled = True
            raise
        failed = [c.error for c in choices if c.error]
        if failed:
            return JSONResponse(error_body(failed[0], "server_error"), status_code=500)
        out = [dict(index=i, finish_reason=c.finish_reason, logprobs=None,
                    **({"message": {"role": "assistant", "content": c.text}} if chat else {"text": c.text}))
               for i, c in enumerate(choices)]
        completion = sum(len(c.tokens) for c in choices)
        return dict(head, choices=out, usage=dict(prompt_tokens=len(ids), completion_tokens=completion,
                                                  total_tokens=len(ids) + completion),
                    speculative=[speculative_stats(c.stats) for c in choices])

    async def stream(request: Request, choices, head, chat: bool, prompt_tokens: int):
        obj = "chat.completion.chunk" if chat else "text_completion"
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
                    yield sse(error_body(c.error, "server_error"))
                    break
                end = {"delta": {}} if chat else {"text": ""}
                yield sse(dict(head, object=obj, choices=[dict(index=i, finish_reason=c.finish_reason, **end)],
                               speculative=speculative_stats(c.stats)))
            completion = sum(len(c.tokens) for c in choices)
            yield sse(dict(head, object=obj, choices=[], usage=dict(
                prompt_tokens=prompt_tokens, completion_tokens=completion, total_tokens=prompt_tokens + completion)))
            yield "data: [DONE]\n\n"
        finally:                                           # a client gone mid-stream frees its rows
            for c in choices:
                if c.finish_reason is None:
                    c.req.cancelled = True

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await body_of(request)
        fields = parse_common(body, limits)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise BadRequest("prompt must be a non-empty string", "prompt")
        return await complete(request, prompt, fields, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await body_of(request)
        fields = parse_common(body, limits)
        return await complete(request, chat_prompt(tokenizer, body.get("messages")), fields, chat=True)

    return app


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def build(args):
    """Scheduler (started, warmed up), tokenizer and limits from the flags."""
    from sampling.app.cli import load_pair, presses_of
    from sampling.utils import max_positions
    target, draft, tok, vocab = load_pair(args, need_draft=args.serve_mode != "ar")
    cfg = SchedulerConfig(args.serve_mode, args.max_batch, args.max_wait_ms, args.queue_size, args.gamma,
                          args.continuous == "on")
    sched = Scheduler(target, draft, tok, cfg, vocab, kv_cache=args.kv_cache, press=presses_of(args)[0])
    warm_up(sched, tok("warm up")["input_ids"])
    limits = Limits(args.model_id, max_positions(target) or 2048, args.max_tokens)
    return sched.start(), tok, limits


def parse(argv=None):
    from sampling.app.cli import CACHES, Parser, add_model_args, add_press_args
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
    ap.add_argument("--kv_cache", default="dynamic", choices=CACHES, help="the KV cache (sampling.kvcache_model)")
    add_press_args(ap)
    args = ap.parse_args(argv)
    SchedulerConfig(args.serve_mode, args.max_batch, args.max_wait_ms, args.queue_size, args.gamma).validate()
    if not 1 <= args.port <= 65535:
        raise ValueError(f"--port must be in [1, 65535], got {args.port}")
    if args.max_tokens < 1:
        raise ValueError(f"--max_tokens must be >= 1, got {args.max_tokens}")
    return args


def main(argv=None) -> None:
    import uvicorn
    args = parse(argv)
    sched, tok, limits = build(args)
    app = create_app(sched, tok, limits)
    print(f"serving {limits.model_id} ({args.serve_mode}, batches of up to {args.max_batch}"
          f"{', continuous' if sched.joining else ''}) on "
          f"http://{args.host}:{args.port}", flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    except KeyboardInterrupt:               # SIGTERM or SIGINT: uvicorn has finished the requests in flight
        print("shut down", flush=True)
    finally:
        sched.stop()


if __name__ == "__main__":
    from sampling.app.cli import run
    run(main)
