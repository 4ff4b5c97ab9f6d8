"""Request batching for a server: concurrent requests decoded together, each answered when it finishes.

A worker thread owns the models. ``Scheduler.submit`` puts a request in one bounded first-in,
first-out queue (full: ``QueueFull`` at once, and the server answers 429). The worker takes the
oldest request, waits up to ``max_wait_ms`` for more (up to ``max_batch``) and decodes them in one
``generate`` call; with ``continuous`` (modes that let rows join: ar and bass), requests that
arrive while it runs join it between two steps, oldest first, up to ``max_batch`` live rows.

Every request is a row of its own: it draws its own values from its own seed (a request without
one is given a random seed) and drafts its own length, so its output does not depend on what
shares its batch. Its tokens reach it as they are accepted, and its answer goes out as soon as its
row finishes (EOS, budget, a stop string), while the batch goes on. A request whose client left
stops its row at the next step. A row whose laws stop being finite fails alone; an exception that
ends a batch resumes each of its unfinished rows alone (its prompt and the tokens it has), so that
a fault of one request fails that request alone.
"""
from __future__ import annotations

import logging
import queue
import random
import threading
import time
from dataclasses import dataclass, field

import torch

from ..cache.press import PressSpec
from ..cache.spec import CacheSpec
from ..generate import generate
from ..modes import MODES_TABLE, drafter_kind
from ..params import SamplingParams
from ..rows import NewRow
from ..utils import model_device
from .batching import pad_left

SERVE_MODES = tuple(m.name for m in MODES_TABLE.values() if m.serves)   # ar, google, bass
log = logging.getLogger("bass.scheduler")


class QueueFull(Exception):
    """The scheduler's queue holds ``queue_size`` requests already."""


def new_seed() -> int:
    """A seed for a request that gave none (its draws are then its own, not reproducible)."""
    return random.SystemRandom().randrange(2 ** 62)


@dataclass
class ServeRequest:
    """One completion to decode and where its tokens go."""
    ids: list[int]                       # prompt token ids
    max_tokens: int                      # budget of new tokens
    temperature: float = 1.0             # 0: greedy
    top_p: float = 1.0                   # 1: off
    top_k: int = 0                       # 0: off
    seed: int = field(default_factory=new_seed)   # its own draws' seed
    on_tokens: object = None             # callable(tokens: list[int]), called from the worker thread
    on_done: object = None               # callable(stats: dict | None, error: str | None), from the worker
    cancelled: bool = False              # set by the server: the row stops at the next step
    parent: ServeRequest | None = None   # the request this one resumes (a failed batch's row, alone)
    submitted: float = field(default_factory=time.perf_counter)
    tokens: list[int] = field(default_factory=list)   # what it has received so far
    finished: bool = False               # answered (on_done called)

    def params(self) -> SamplingParams:
        return SamplingParams(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)

    @property
    def stopping(self) -> bool:
        """Its client left (or a stop string ended it)."""
        return self.cancelled or (self.parent is not None and self.parent.stopping)

    def done(self, stats: dict | None, error: str | None) -> None:
        """Answer it, once."""
        if not self.finished:
            self.finished = True
            if self.on_done is not None:
                self.on_done(stats, error)


class _Rows:
    """The row streamer of one batch (``sampling.rows.Rows``): row r is requests[r]; each row is
    answered as soon as it is finished."""

    def __init__(self, requests: list[ServeRequest], scheduler: Scheduler):
        self.requests, self.scheduler = requests, scheduler

    def put_row(self, row: int, tokens: list[int]) -> None:
        r = self.requests[row]
        if tokens:
            r.tokens += tokens
            if r.on_tokens is not None:
                r.on_tokens(tokens)

    def stopped(self, row: int) -> bool:
        return self.requests[row].stopping

    def end_row(self, row: int, stats: dict | None, error: str | None) -> None:
        r = self.requests[row]
        self.scheduler.running -= 1
        r.done(None if stats is None else dict(stats, tokens=list(r.tokens), batch=len(self.requests)), error)

    def end(self) -> None:
        pass


class _JoiningRows(_Rows):
    """The row streamer of a batch that waiting requests join between steps (continuous batching)."""

    def admit(self, live: int) -> list[NewRow]:
        """Requests that join between two steps, oldest first, while fewer than ``max_batch`` rows run."""
        out, s = [], self.scheduler
        while live + len(out) < s.cfg.max_batch and not s._stop.is_set():
            r = s._take()
            if r is None:
                break
            self.requests.append(r)
            out.append(NewRow(r.ids, r.max_tokens, r.params(), r.seed))
        s.running = live + len(out)
        if s.on_step is not None:                         # between two steps: the rows about to run
            s.on_step(s.running)
        return out


@dataclass
class SchedulerConfig:
    mode: str = "bass"              # bass | ar | google (SERVE_MODES)
    max_batch: int = 8              # requests decoded together at most
    max_wait_ms: float = 10.0       # how long a first request waits for others to join its batch
    queue_size: int = 64            # requests waiting at most; more are refused (QueueFull)
    gamma: int = 4                  # draft length (bass, google)
    continuous: bool = True         # bass, ar: requests join a running batch between steps (results/serving)

    def validate(self) -> None:
        if self.mode not in SERVE_MODES:
            raise ValueError(f"unknown serving mode {self.mode!r}; choose one of {', '.join(SERVE_MODES)}")
        if self.max_batch < 1 or self.queue_size < 1 or self.gamma < 1:
            raise ValueError(f"max_batch, queue_size and gamma must be >= 1, got {self.max_batch}, "
                             f"{self.queue_size}, {self.gamma}")
        if self.max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {self.max_wait_ms}")


class Scheduler:
    """The worker thread and its queue (see the module's docstring)."""

    def __init__(self, target, draft, tokenizer, cfg: SchedulerConfig, vocab: int | None = None, **generate_kw):
        cfg.validate()
        self.target, self.draft, self.tok, self.cfg, self.vocab = target, draft, tokenizer, cfg, vocab
        self.generate_kw = generate_kw                   # the server's fixed settings (kv_cache, press, ...)
        self.queue: queue.Queue[ServeRequest] = queue.Queue(maxsize=cfg.queue_size)
        self.device = model_device(target)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, name="bass-scheduler", daemon=True)
        self.batches = 0                                 # generate() calls made
        self.rows = 0                                    # requests decoded
        self.running = 0                                 # rows of the batch in flight
        self.on_step = None                              # callable(rows) between two steps (metrics), or None
        self.joining = cfg.continuous and MODES_TABLE[cfg.mode].joins
        if self.joining:                                 # a bad setting fails at start, not per batch
            try:
                MODES_TABLE[cfg.mode].check_admission(
                    drafter_kind(draft), CacheSpec(generate_kw.get("kv_cache", "dynamic"),
                                                   press=generate_kw.get("press") or PressSpec()), "drop")
            except ValueError as e:
                raise ValueError(f"{e}; serve with continuous batching off (--continuous off)") from None

    @property
    def waiting(self) -> int:
        """Requests in the queue."""
        return self.queue.qsize()

    def start(self) -> Scheduler:
        self._thread.start()
        return self

    def stop(self, timeout: float = 60.0) -> None:
        """Finish the batch in flight, then end the worker (requests still queued are refused)."""
        self._stop.set()
        self._thread.join(timeout)
        while not self.queue.empty():
            self.queue.get_nowait().done(None, "the server is shutting down")

    def submit(self, req: ServeRequest) -> None:
        try:
            self.queue.put_nowait(req)
        except queue.Full:
            raise QueueFull(f"{self.cfg.queue_size} requests are waiting already") from None

    def _take(self) -> ServeRequest | None:
        """The oldest waiting request that still wants its answer, at once, or None."""
        while True:
            try:
                r = self.queue.get_nowait()
            except queue.Empty:
                return None
            if _live(r):
                return r

    def _collect(self) -> list[ServeRequest]:
        try:
            first = self.queue.get(timeout=0.1)
        except queue.Empty:
            return []
        batch, deadline = [first], time.perf_counter() + self.cfg.max_wait_ms / 1000
        while len(batch) < self.cfg.max_batch:
            left = deadline - time.perf_counter()
            try:
                batch.append(self.queue.get(timeout=max(left, 0)) if left > 0 else self.queue.get_nowait())
            except queue.Empty:
                break
        return [r for r in batch if _live(r)]

    def _work(self) -> None:
        while not self._stop.is_set():
            reqs = self._collect()
            if reqs:
                self._decode(reqs, joining=self.joining)

    def _decode(self, reqs: list[ServeRequest], joining: bool = False) -> None:
        """Decode requests as one batch; each is answered when its row finishes. An exception that
        ends the batch resumes each unfinished request alone (``_resume``)."""
        ids, mask = pad_left([r.ids for r in reqs], self.tok.pad_token_id, self.device)
        rows = (_JoiningRows if joining else _Rows)(reqs, self)
        reqs = rows.requests                              # grows as requests join
        self.running = len(reqs)
        if self.on_step is not None:
            self.on_step(self.running)
        try:
            draft = self.draft if MODES_TABLE[self.cfg.mode].drafters else None
            generate(self.target, ids, mask, draft_model=draft, mode=self.cfg.mode,
                     max_new_tokens=[r.max_tokens for r in reqs], gamma=self.cfg.gamma,
                     temperature=[r.temperature for r in reqs], top_p=[r.top_p for r in reqs],
                     top_k=[r.top_k for r in reqs], seed=[r.seed for r in reqs],
                     eos_token_id=self.tok.eos_token_id, vocab_size=self.vocab, streamer=rows,
                     **self.generate_kw)
        except Exception as e:                            # a bad batch must not end the worker, nor its rows
            unfinished = [r for r in reqs if not r.finished]
            if len(reqs) == 1:
                log.exception("request failed: %s", e)
                for r in unfinished:
                    r.done(None, f"{type(e).__name__}: {e}")
            else:
                log.warning("a batch of %d rows failed (%s: %s); its %d unfinished rows resume alone",
                            len(reqs), type(e).__name__, e, len(unfinished))
                for r in unfinished:
                    self._resume(r)
        finally:
            self.running = 0
        self.batches += 1
        self.rows += len(reqs)

    def _resume(self, r: ServeRequest) -> None:
        """A request of a failed batch, decoded alone from where it stood (its prompt and the tokens
        it has; its draws from then on are new ones): if it fails alone, the fault was its own."""
        if r.stopping:
            r.done(None, "cancelled")
            return
        left = r.max_tokens - len(r.tokens)
        if left <= 0:
            r.done(dict(new_tokens=len(r.tokens), target_calls=0, drafted=0, accepted=0, tokens=list(r.tokens),
                        batch=1), None)
            return
        alone = ServeRequest(ids=r.ids + r.tokens, max_tokens=left, temperature=r.temperature, top_p=r.top_p,
                             top_k=r.top_k, seed=r.seed, on_tokens=r.on_tokens, parent=r)
        alone.on_done = lambda stats, error: r.done(
            None if stats is None else dict(stats, tokens=r.tokens + stats["tokens"]), error)
        self._decode([alone])


def _live(r: ServeRequest) -> bool:
    """Whether a waiting request still wants its answer (a cancelled one is told it is dropped)."""
    if r.stopping:                                       # its client left while it waited
        r.done(None, "cancelled")
    return not r.stopping


@torch.inference_mode()
def warm_up(scheduler: Scheduler, prompt_ids: list[int], max_tokens: int = 4) -> None:
    """One untimed batch through the worker's own path (first-shape costs paid before serving)."""
    scheduler._decode([ServeRequest(ids=prompt_ids, max_tokens=max_tokens, temperature=0.0)])
