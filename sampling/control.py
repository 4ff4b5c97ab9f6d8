"""Speculation that aims never to be slower than AR (results/drafting: reached at batch 1 to 32,
greedy, on the project's CPU in bfloat16; not by the n-gram chain sampled): each step, the draft
length (0: a plain AR step) whose expected tokens per unit of cost are the most, from pass costs
measured ahead and the acceptance seen so far.

A step that drafts g tokens costs the target's verify pass over ``b`` rows of ``verify(g)``
tokens and the draft's passes (``Drafter.work``: a draft model's, or speculator heads' stages),
priced by each one's pass-cost table (``CostTable``: ms against the rows of a pass and the tokens
of each row, measured at a few batch sizes, since on a CPU b rows of k tokens cost more than one row
of b x k; plus a cost per cached slot of every row: the cache's copy and the attention over it,
which at a large batch of long rows outweigh the new tokens). It yields, per row, 1 + sum over
levels l <= g of prod_{j <= l} beta_j tokens, beta_j the rate at which a row that reached level
j - 1 also accepted level j (Leviathan et al.'s alpha when every beta is alike), counted over the
steps so far (each step's counts decayed, so the rate follows the text). An AR step yields 1 token
for the target's one-token pass. The controller takes the g with the most tokens per ms, a draft
only where it expects more than ``MARGIN`` times AR's: a guard against the few per cent a table
errs by between its points and as the machine drifts.

Decisions read no clock: the tables are measured once per machine, model, dtype, device, thread
count and cache, and kept in ``pass-costs.json`` under ``cache_dir()`` (``$BASS_CACHE_DIR``, by
default ``~/.cache/bass-pp``), so a seeded run makes the same choices, and so the same tokens,
every time on that machine. docs/speculate.md says more.
"""
from __future__ import annotations

import functools
import json
import os
import platform
import statistics
import tempfile
from dataclasses import dataclass, field

import torch

from .cache.backends import backend_class
from .cache.spec import CacheSpec
from .contracts import Drafter, DrafterSource, PricedPass
from .kvcache_model import KVCacheModel
from .params import SamplingParams
from .skinny import SKINNY_ROWS, linear_path
from .utils import cache_dir, max_positions, model_device, now, vocab_size

SPECULATE = ("auto", "always")      # auto: the controller; always: every step drafts what the schedule says
ROWS = (1, 2, 4, 8, 16, 32)           # batch rows measured (between: interpolated; beyond: extended)
PER_ROW = (1, 2, 4, 8, 16, 32, 64, 128)  # tokens per row measured, up to MOST_TOKENS in a pass (beyond:
MOST_TOKENS = 256                    # extended from the last two), with both sides of the skinny path's
                                     # last row, where a pass's cost jumps (sampling.skinny)
TABLE_FORMAT = 3                     # a kept table of another format is measured again: bump it with the grids
MARGIN = 1.05                        # a step drafts only where it expects this many times AR's tokens per ms
CONTEXT = 64                         # cached positions before a timed pass
FAR = 1024                           # ... and before the pass that prices a cached slot (the model's limit if lower)
PROBE_AFTER = 16                     # AR steps before a probe (one draft) sees the acceptance again; doubles
                                     # after each probe that does not bring drafting back


def through(xs: tuple[float, ...], ys: tuple[float, ...], x: float) -> float:
    """y at ``x`` on the line through the measured points (xs ascending): flat before the first, along
    the last segment beyond the last, never falling there (the last two points may differ by noise
    alone). Between points a measured fall is kept: a float32 pass of 2 tokens on the skinny path
    costs less than one of 1 token (``sampling.skinny``)."""
    if x <= xs[0] or len(xs) == 1:
        return ys[0]
    k = segment(xs, x)
    slope = (ys[k] - ys[k - 1]) / (xs[k] - xs[k - 1])
    if x > xs[k]:                                                         # beyond the last point
        return ys[k] + max(0.0, slope) * (x - xs[k])
    return ys[k - 1] + slope * (x - xs[k - 1])


def segment(xs: tuple[float, ...], x: float) -> int:
    """The index k of the segment xs[k - 1] .. xs[k] that prices ``x`` (the last beyond them)."""
    return next((i for i in range(1, len(xs)) if x <= xs[i]), len(xs) - 1)


@dataclass(frozen=True)
class CostCurve:
    """ms of a pass against the tokens of each row, at one number of rows: through the measured
    points (``through``)."""
    tokens: tuple[int, ...]
    ms: tuple[float, ...]

    def __call__(self, n: float) -> float:
        return through(self.tokens, self.ms, n)


@dataclass(frozen=True)
class CostTable:
    """ms of one model's cached pass of ``rows`` rows of ``k`` tokens each, after ``context`` cached
    positions per row: a ``CostCurve`` over k at each measured number of rows (after CONTEXT
    positions), through them in the rows (``through``); plus ``per_slot`` ms for each cached slot
    beyond those CONTEXT (rows x positions: the cache's copy and the attention read every slot). A
    table of one row count (a drafter source's pass, measured as one row) prices r rows of k tokens
    as one row of r x k."""
    rows: tuple[int, ...]
    curves: tuple[CostCurve, ...]
    per_slot: float = 0.0

    def __call__(self, rows: int, k: float, context: float = CONTEXT) -> float:
        extra = self.per_slot * rows * max(0.0, context - CONTEXT)
        rs, curves = self.rows, self.curves
        if len(rs) == 1:
            return curves[0](rows * k / rs[0]) + extra
        i = segment(rs, rows)                                             # only its two curves are read
        return through(rs[i - 1:i + 1], (curves[i - 1](k), curves[i](k)), rows) + extra


def machine_key(model, cache: CacheSpec) -> str:
    """What a pass's cost depends on besides its tokens: the model (class, size, layers), its dtype
    and device, the thread count, the CPU or GPU, the cache backend its passes run on
    (``sampling.cache.backends.backend_class``: eager, lean or compiled), and its linear layers'
    paths (``sampling.skinny.linear_path``)."""
    p = next(model.parameters())
    cfg = model.config
    device = torch.cuda.get_device_name(p.device) if p.device.type == "cuda" else cpu_name()
    size = sum(t.numel() for t in model.parameters())
    return (f"{type(model).__name__}|{size}|{getattr(cfg, 'num_hidden_layers', '?')}|{str(p.dtype)[6:]}|"
            f"{p.device.type}|{device}|threads={torch.get_num_threads()}|{backend_class(cache, model).__name__}"
            f"{linear_path(model)}")


@functools.cache
def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), platform.processor())
    except OSError:
        return platform.processor() or platform.machine()


def time_rounds(timed, points: int, reps: int, reduce=statistics.median) -> list[float]:
    """The ``reduce`` (median) over rounds of ``timed(j)``, the ms of point j: two warm-up rounds,
    then ``reps`` rounds with the points in rotating order (drift slows all alike)."""
    times: list[list[float]] = [[] for _ in range(points)]
    for rep in range(reps + 2):
        for i in range(points):
            j = (i + rep) % points
            ms = timed(j)
            if rep >= 2:
                times[j].append(ms)
    return [reduce(t) for t in times]


@torch.inference_mode()
def time_passes(points: list[tuple[KVCacheModel, int]], reps: int, generator: torch.Generator,
                reduce=statistics.median) -> list[float]:
    """ms of each (wrapper, tokens) pass after the positions the wrapper holds (``cached_wrapper``),
    over rounds (``time_rounds``); each pass is rolled back."""
    contexts = [kv.length for kv, _ in points]

    def timed(j: int) -> float:
        (kv, n), context = points[j], contexts[j]
        device = model_device(kv.model)
        shape = (kv.mask.shape[0], context + n)                           # [b, context + n]
        seq = torch.randint(0, vocab_size(kv.model), shape, generator=generator).to(device)
        t0 = now(device)
        kv.catch_up(seq, torch.ones_like(seq))
        t1 = now(device)
        kv.rollback(context)
        return 1000 * (t1 - t0)
    return time_rounds(timed, len(points), reps, reduce)


def cached_wrapper(model, batch: int, context: int, cache: CacheSpec, generator: torch.Generator) -> KVCacheModel:
    """A wrapper of ``model`` whose cache holds ``context`` positions of a random prompt per row."""
    kv = KVCacheModel(model, SamplingParams(temperature=1.0), cache=cache)
    prompt = torch.randint(0, vocab_size(model), (batch, context), generator=generator).to(model_device(model))
    kv.prefill(prompt, torch.ones_like(prompt))
    return kv


def per_row_grid(rows: int, limit: int | None = None) -> tuple[int, ...]:
    """The tokens per row a table measures at ``rows`` rows: PER_ROW's up to MOST_TOKENS a pass (1 and
    2 always), both sides of the skinny path's last row, and none past the model's ``limit`` of
    positions after CONTEXT."""
    ks = {k for k in PER_ROW if rows * k <= MOST_TOKENS} | {1, 2}
    ks |= {SKINNY_ROWS // rows, SKINNY_ROWS // rows + 1} - {0}
    return tuple(sorted(k for k in ks if limit is None or CONTEXT + k <= limit)) or (1,)


def measure_curve(model, cache: CacheSpec, reps: int = 9) -> CostCurve:
    """``model``'s pass cost at one row of each of ``per_row_grid(1)``'s tokens after CONTEXT cached
    ones, the fastest of its rounds (as ``measure_table``)."""
    return measure_table(model, cache, rows=(1,), reps=reps).curves[0]


def measure_table(model, cache: CacheSpec, rows: tuple[int, ...] = ROWS, reps: int = 5) -> CostTable:
    """``model``'s pass costs at each number of ``rows`` and its ``per_row_grid`` after CONTEXT cached
    positions, and the cost of a cached slot: a one-token pass after FAR cached positions against
    one after CONTEXT. Eager on the cache's kind (compiling a graph for every point would cost
    minutes on a CPU: compiled passes are priced at their eager cost)."""
    if rows[0] != 1:
        raise ValueError(f"a cost table's rows start at 1 (its slot cost is a one-row pass's), got {rows}")
    limit = max_positions(model)
    far = max(CONTEXT, min(FAR, limit or FAR) - 1)
    gen = torch.Generator().manual_seed(0)
    grids = [per_row_grid(b, limit) for b in rows]
    points = []
    for b, ks in zip(rows, grids):
        kv = cached_wrapper(model, b, CONTEXT, CacheSpec(cache.kind, room=max(ks), lean=cache.lean), gen)
        points += [(kv, k) for k in ks]
    kv_far = cached_wrapper(model, 1, far, CacheSpec(cache.kind, room=1, lean=cache.lean), gen)
    # the fastest of the rounds: the table is kept for good, and another process busy on the same
    # cores only ever slows a pass (a median taken on a busy machine priced drafting out of reach)
    ms = time_passes(points + [(kv_far, 1)], reps, gen, reduce=min)
    per_slot = max(0.0, (ms[-1] - ms[0]) / (far - CONTEXT)) if far > CONTEXT else 0.0   # ms[0]: 1 row, 1 token
    curves, at = [], 0
    for ks in grids:
        curves.append(CostCurve(ks, tuple(ms[at:at + len(ks)])))
        at += len(ks)
    return CostTable(tuple(rows), tuple(curves), per_slot)


@torch.inference_mode()
def measure_source_table(priced: PricedPass, reps: int = 5) -> CostTable:
    """A drafter source's pass (``DrafterSource.priced_pass``) at one row of each of
    ``per_row_grid(1)``'s tokens, the fastest of its rounds (as ``measure_table``); it keeps no
    cache, so no slot is priced."""
    grid = per_row_grid(1)

    def timed(j: int) -> float:
        t0 = now(priced.device)
        priced.run(grid[j])
        return 1000 * (now(priced.device) - t0)
    return CostTable((1,), (CostCurve(grid, tuple(time_rounds(timed, len(grid), reps, reduce=min))),))


def source_key(priced: PricedPass) -> str:
    """``machine_key`` of a drafter source's pass: its name, device, CPU or GPU and thread count."""
    d = priced.device
    device = torch.cuda.get_device_name(d) if d.type == "cuda" else cpu_name()
    return f"{priced.name}|{d.type}|{device}|threads={torch.get_num_threads()}"


_TABLES: dict[str, CostTable] = {}      # this process's, read from or added to the file


def pass_costs(model, cache: CacheSpec) -> CostTable:
    """``model``'s cost table on this machine: from pass-costs.json, or measured now (10 to 30 s on
    a CPU, once per machine) and added to it."""
    return kept_table(machine_key(model, cache), lambda: measure_table(model, cache))


def kept_table(key: str, measure) -> CostTable:
    """The cost table kept under ``key`` in pass-costs.json, or ``measure()`` now and added to it."""
    if key in _TABLES:
        return _TABLES[key]
    path = cache_dir() / "pass-costs.json"
    table = json.loads(path.read_text()) if path.exists() else {}
    if table.get(key, {}).get("format") != TABLE_FORMAT:                  # new, or measured on other grids
        costs = measure()
        table = json.loads(path.read_text()) if path.exists() else {}     # another process may have written
        table[key] = dict(rows=list(costs.rows), tokens=[list(c.tokens) for c in costs.curves],
                          ms=[list(c.ms) for c in costs.curves], per_slot=costs.per_slot, format=TABLE_FORMAT)
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
            json.dump(table, f, indent=1, sort_keys=True)
        os.replace(f.name, path)                                          # whole, never half-written
        table = json.loads(path.read_text())      # what the file keeps (a process measuring beside this one may
                                                  # have written last), so that every later run reads the same
    e = table[key]
    curves = tuple(CostCurve(tuple(ks), tuple(float(v) for v in ms)) for ks, ms in zip(e["tokens"], e["ms"]))
    _TABLES[key] = CostTable(tuple(e["rows"]), curves, float(e["per_slot"]))
    return _TABLES[key]


class Always:
    """Every step drafts what the schedule allows (``speculate="always"``)."""

    def choose(self, most: int, batch: int, context: int = CONTEXT) -> int:
        return most

    def observe(self, counts: list[int], limits: list[int]) -> None:
        pass


@dataclass
class Controller:
    """The draft length of each step from pass costs and the acceptance so far (module docstring).

    ``target``, ``draft``: the cost tables of the target's passes and the draft's (``draft`` None:
    the drafter runs no pass worth pricing); ``drafter``: its ``work(g)`` says what a step of g costs. The
    acceptance per level starts from ``prior`` (as if ``weight`` rows had been seen at that rate);
    each step's counts decay by ``decay``, and so does the prior's weight, so that drafts never
    accepted bring the rate to 0, not to a floor the prior would hold (where a verify pass costs
    about an AR step, a floor of a few per cent keeps a useless drafter drafting).
    """
    target: CostTable
    draft: CostTable | None
    drafter: Drafter
    prior: float = 0.8
    weight: float = 2.0
    decay: float = 0.95
    tried: list[float] = field(default_factory=list)    # per level l >= 1 (index l - 1): rows that could accept it
    passed: list[float] = field(default_factory=list)   # ... and did
    prior_weight: float = field(init=False)             # the prior's weight now: ``weight`` at first, decaying
    ar_steps: int = 0                                   # AR steps chosen since the last draft
    probe_after: int = PROBE_AFTER                      # AR steps before the next probe (doubles after a failed one)

    def __post_init__(self):
        self.prior_weight = self.weight

    def rates(self, depth: int, assume: float | None = None) -> list[float]:
        """beta_1 .. beta_depth: each level's rate, pulled toward the level above's (the first toward
        ``prior``), so a level seldom reached borrows from the one it follows; ``assume``: that rate
        at every level instead of what was seen."""
        if assume is not None:
            return [assume] * depth
        out, above = [], self.prior
        pull = self.prior_weight                                          # the first level: toward the prior
        for i in range(depth):
            tried, passed = (self.tried[i], self.passed[i]) if i < len(self.tried) else (0.0, 0.0)
            above = (passed + pull * above) / (tried + pull) if tried + pull > 0 else above
            out.append(above)
            pull = self.weight                                            # deeper ones: the level above
        return out

    def step_ms(self, g: int, batch: int, context: int = CONTEXT) -> float:
        """Predicted ms of a step drafting g for ``batch`` rows of ``context`` cached positions."""
        w = self.drafter.work(g)
        ms = self.target(batch, w.verify, context)
        if self.draft is not None:
            ms += sum(self.draft(batch, t, context) for t in w.draft)
        return ms

    def best(self, most: int, batch: int, context: int = CONTEXT, assume: float | None = None,
             costs: list[float] | None = None) -> tuple[int, float]:
        """The g in [0, most] with the most expected tokens per ms, a g > 0 only where that is more than
        ``MARGIN`` times AR's, and that rate. ``costs``: ``step_ms`` of g = 0 .. most, if priced already."""
        costs = costs or [self.step_ms(g, batch, context) for g in range(most + 1)]
        ar = 1.0 / costs[0]
        best_g, best = 0, ar * MARGIN
        expected, run = 1.0, 1.0
        for g, beta in enumerate(self.rates(most, assume), start=1):
            run *= beta
            expected += run                                               # tokens a row expects from g drafts
            rate = expected / costs[g]
            if rate > best:
                best_g, best = g, rate
        return best_g, best if best_g else ar

    def choose(self, most: int, batch: int, context: int = CONTEXT) -> int:
        """The draft length of this step for ``batch`` rows of ``context`` cached positions, at most
        ``most``."""
        if most <= 0:
            return most
        costs = [self.step_ms(g, batch, context) for g in range(most + 1)]      # priced once for both questions
        if not self.best(most, batch, context, assume=1.0, costs=costs)[0]:
            return 0             # no draft pays here even if every one were accepted: AR (nothing to learn)
        if not self.tried:       # nothing seen yet: draft in full once, so the rates come from this text
            return most
        g, _ = self.best(most, batch, context, costs=costs)
        if g:
            self.ar_steps, self.probe_after = 0, PROBE_AFTER
            return g
        # AR because the drafts were rejected (drafting could pay here): now and then one draft, so the
        # acceptance is seen again (the text may have changed); each probe that fails waits twice as long
        self.ar_steps += 1
        if self.ar_steps >= self.probe_after:
            self.ar_steps, self.probe_after = 0, 2 * self.probe_after
            return 1
        return 0

    def observe(self, counts: list[int], limits: list[int]) -> None:
        """Drafts each live row accepted (``counts``) out of its own draft length (``limits``)."""
        depth = max(limits, default=0)
        if not depth:
            return
        grow = depth - len(self.tried)
        self.tried += [0.0] * grow
        self.passed += [0.0] * grow
        self.tried = [t * self.decay for t in self.tried]
        self.passed = [p * self.decay for p in self.passed]
        self.prior_weight *= self.decay
        for n, lim in zip(counts, limits):
            for level in range(min(n + 1, lim)):                          # levels 1 .. min(n + 1, lim) tried
                self.tried[level] += 1
                self.passed[level] += level < n


def draft_models(draft) -> list:
    """The draft models whose passes a step pays: a draft model; a cascade's largest (its lower
    levels' passes are not priced); none for heads or n-grams."""
    if draft is None or isinstance(draft, DrafterSource):
        return []
    return [draft[-1]] if isinstance(draft, (list, tuple)) else [draft]


def cost_tables(target, draft, cache: CacheSpec) -> tuple[CostTable, CostTable | None]:
    """The target's cost table and the draft passes' (a draft model's, or a drafter source's own
    pass: speculator heads' stages; None: nothing to price, an n-gram lookup), measured now where
    this machine's table lacks them: a tool calls it before it times anything."""
    target_table = pass_costs(target, cache.for_role("target"))
    models = draft_models(draft)
    if models:
        return target_table, pass_costs(models[0], cache.for_role("draft"))
    priced = draft.priced_pass() if isinstance(draft, DrafterSource) else None
    if priced is None:
        return target_table, None
    return target_table, kept_table(source_key(priced), lambda: measure_source_table(priced))


def make_controller(speculate: str, target, draft, drafter: Drafter, cache: CacheSpec):
    """The controller of one generation: ``Always`` or a ``Controller`` on this machine's pass costs."""
    if speculate == "always":
        return Always()
    if not callable(getattr(drafter, "work", None)):
        raise ValueError(f"{type(drafter).__name__} has no work(g) (sampling.contracts.Drafter), so the controller "
                         f"cannot price its steps: give it one, or pass speculate='always'")
    return Controller(*cost_tables(target, draft, cache), drafter)


def check_speculate(speculate: str) -> None:
    if speculate not in SPECULATE:
        raise ValueError(f"unknown speculate {speculate!r}; choose one of {', '.join(SPECULATE)}")
