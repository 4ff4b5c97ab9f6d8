"""Request batching for a server: concurrent requests decoded together (BASS, AR, or one at a time).

A worker thread owns the models. ``Scheduler.submit`` puts a request in a bounded queue (full:
``QueueFull`` at once, the server answers 429). The worker waits for a first request, collects
more for up to ``max_wait_ms`` or until ``max_batch``, groups them by what one ``generate`` call
must share (the seed of its random generator) and decodes each group as one batch: prompts of any
length, each row its own budget, temperature, top-p and top-k (``sampling.params.RowParams``). With
``continuous`` (bass and ar), requests that arrive while a batch runs join it between two steps,
up to ``max_batch`` live rows (continuous batching: ``sampling.rows.admit_rows``), instead of
waiting for the whole batch to end. Every row's tokens reach its request as they are accepted (a row
streamer); a request that is cancelled (its client left, or a stop string was met) stops its row,
which leaves the batch at that step without disturbing the others.
"""
from __future__ import annotations

import queue
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


class QueueFull(Exception):
    """The scheduler's queue holds ``queue_size`` requests already."""


@dataclass
class ServeRequest:
    """One completion to decode and where its tokens go."""
    ids: list[int]                       # prompt token ids
    max_tokens: int                      # budget of new tokens
    temperature: float = 1.0             # 0: greedy
    top_p: float = 1.0                   # 1: off
    top_k: int = 0                       # 0: off
    seed: int | None = None              # None: a fresh seed
    on_tokens: object = None             # callable(tokens: list[int]), called from the worker thread
    on_done: object = None               # callable(stats: dict | None, error: str | None), from the worker
    cancelled: bool = False              # set by the server: the row stops at the next step
    submitted: float = field(default_factory=time.perf_counter)

    def group(self) -> tuple:
        """What requests must share to be decoded by one generate() call."""
        return (self.seed,)


class _Rows:
    """The row streamer of one batch (``sampling.rows.Rows``): row r is requests[r]."""

    def __init__(self, requests: list[ServeRequest]):
        self.requests = requests

    def put_row(self, row: int, tokens: list[int]) -> None:
        if tokens and self.requests[row].on_tokens is not None:
            self.requests[row].on_tokens(tokens)

    def stopped(self, row: int) -> bool:
        return self.requests[row].cancelled

    def end(self) -> None:
        pass


class _JoiningRows(_Rows):
    """The row streamer of a batch that admits waiting requests between steps (continuous batching):
    those of its group, while fewer than ``max_batch`` rows are live. Row B + k is requests[B + k]."""

    def __init__(self, requests: list[ServeRequest], scheduler: Scheduler):
        super().__init__(requests)
        self.scheduler = scheduler

    def admit(self, live: int) -> list[NewRow]:
        out = []
        while live + len(out) < self.scheduler.cfg.max_batch and not self.scheduler._stop.is_set():
            r = self.scheduler._take(self.requests[0].group())
            if r is None:
                break
            self.requests.append(r)
            out.append(NewRow(r.ids, r.max_tokens, SamplingParams(temperature=r.temperature, top_k=r.top_k,
                                                                  top_p=r.top_p)))
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
        self.held: list[ServeRequest] = []               # taken from the queue, waiting for a batch of their group
        self.joining = cfg.continuous and MODES_TABLE[cfg.mode].joins
        if self.joining:                                 # a bad setting fails at start, not per batch
            try:
                MODES_TABLE[cfg.mode].check_admission(
                    drafter_kind(draft), CacheSpec(generate_kw.get("kv_cache", "dynamic"),
                                                   press=generate_kw.get("press") or PressSpec()), "drop")
            except ValueError as e:
                raise ValueError(f"{e}; serve with continuous batching off (--continuous off)") from None

    def start(self) -> Scheduler:
        self._thread.start()
        return self

    def stop(self, timeout: float = 60.0) -> None:
        """Finish the batch in flight, then end the worker (requests still queued are refused)."""
        self._stop.set()
        self._thread.join(timeout)
        while not self.queue.empty():
            self.held.append(self.queue.get_nowait())
        for r in self.held:
            if r.on_done is not None:
                r.on_done(None, "the server is shutting down")
        self.held = []

    def submit(self, req: ServeRequest) -> None:
        try:
            self.queue.put_nowait(req)
        except queue.Full:
            raise QueueFull(f"{self.cfg.queue_size} requests are waiting already") from None

    def _take(self, group: tuple) -> ServeRequest | None:
        """A waiting request of the group, at once or None (the worker's; others found are held)."""
        for i, r in enumerate(self.held):
            if r.group() == group:
                return self.held.pop(i)
        while True:
            try:
                r = self.queue.get_nowait()
            except queue.Empty:
                return None
            if not _live(r):
                continue
            if r.group() == group:
                return r
            self.held.append(r)

    def _collect(self) -> list[ServeRequest]:
        if self.held:
            first = self.held.pop(0)
        else:
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
        return batch

    def _work(self) -> None:
        while not self._stop.is_set():
            groups: dict[tuple, list[ServeRequest]] = {}
            for r in filter(_live, self._collect()):
                groups.setdefault(r.group(), []).append(r)
            for reqs in groups.values():
                self._decode(reqs)

    def _decode(self, reqs: list[ServeRequest]) -> None:
        ids, mask = pad_left([r.ids for r in reqs], self.tok.pad_token_id, self.device)
        rows = _JoiningRows(reqs, self) if self.joining else _Rows(reqs)
        reqs = rows.requests                              # grows as requests join
        try:
            draft = self.draft if MODES_TABLE[self.cfg.mode].drafters else None
            res = generate(self.target, ids, mask, draft_model=draft, mode=self.cfg.mode,
                           max_new_tokens=[r.max_tokens for r in reqs], gamma=self.cfg.gamma,
                           temperature=[r.temperature for r in reqs], top_p=[r.top_p for r in reqs],
                           top_k=[r.top_k for r in reqs], seed=reqs[0].seed,
                           eos_token_id=self.tok.eos_token_id, vocab_size=self.vocab, streamer=rows,
                           **self.generate_kw)
        except Exception as e:                            # a bad batch must not end the worker
            for r in reqs:
                if r.on_done is not None:
                    r.on_done(None, f"{type(e).__name__}: {e}")
            return
        self.batches += 1
        self.rows += len(reqs)
        for r, toks, row in zip(reqs, res.tokens, res.stats["rows"]):
            if r.on_done is not None:
                r.on_done(dict(row, tokens=toks, batch=len(reqs)), None)


def _live(r: ServeRequest) -> bool:
    """Whether a waiting request still wants its answer (a cancelled one is told it is dropped)."""
    if r.cancelled and r.on_done is not None:           # its client left while it waited
        r.on_done(None, "cancelled")
    return not r.cancelled


@torch.inference_mode()
def warm_up(scheduler: Scheduler, prompt_ids: list[int], max_tokens: int = 4) -> None:
    """One untimed batch through the worker's own path (first-shape costs paid before serving)."""
    scheduler._decode([ServeRequest(ids=prompt_ids, max_tokens=max_tokens, temperature=0.0)])
