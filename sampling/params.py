"""Sampling parameters and the laws they make: transformers' logits processors over a model's
logits, per row where rows differ, and the draws every part makes from those laws.

Names follow the papers: ``p`` is the target model's distribution, ``q`` the draft's.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from functools import cached_property

import torch
from transformers import (
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from .utils import to_device


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0         # 0 means greedy (argmax); > 0 divides the logits
    top_k: int = 0                   # keep the k most likely tokens; 0 switches the filter off
    top_p: float = 1.0               # keep the smallest set of tokens with mass >= top_p; 1.0 is off
    min_p: float = 0.0               # drop tokens below min_p x the top token's probability; 0 is off
    repetition_penalty: float = 1.0  # CTRL penalty on tokens already in the prefix (> 1 discourages); 1 is off

    def validate(self) -> None:
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be a finite number >= 0 (0 is greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 switches it off), got {self.top_k}")
        if not 0 <= self.min_p < 1:
            raise ValueError(f"min_p must be in [0, 1) (0 switches it off), got {self.min_p}")
        if not (self.repetition_penalty > 0 and math.isfinite(self.repetition_penalty)):
            raise ValueError(f"repetition_penalty must be a finite number > 0 (1 switches it off), "
                             f"got {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def uses_prefix(self) -> bool:
        """Whether the filtered law of a position depends on its prefix (the repetition penalty)."""
        return self.repetition_penalty != 1.0

    @cached_property
    def processors(self) -> LogitsProcessorList:
        """transformers' logits processors, in the order ``generate`` applies them: the repetition
        penalty, then (sampling only; none of them moves the argmax) temperature, top-k, top-p, min-p."""
        out = LogitsProcessorList()
        if self.uses_prefix:
            out.append(RepetitionPenaltyLogitsProcessor(float(self.repetition_penalty)))
        if self.greedy:
            return out
        if self.temperature != 1.0:
            out.append(TemperatureLogitsWarper(float(self.temperature)))
        if self.top_k > 0:
            out.append(TopKLogitsWarper(int(self.top_k)))
        if self.top_p < 1.0:
            out.append(TopPLogitsWarper(float(self.top_p)))
        if self.min_p > 0:
            out.append(MinPLogitsWarper(float(self.min_p)))
        return out

    def select(self, keep) -> SamplingParams:
        """The parameters of the rows ``keep`` of the batch: the same for every row."""
        return self

    def row(self, i: int) -> SamplingParams:
        """Row i's parameters."""
        return self

    def per_row(self, b: int) -> list[SamplingParams]:
        """The parameters of each of b rows."""
        return [self] * b


@dataclass(frozen=True)
class RowParams:
    """One ``SamplingParams`` per row of a batch (a server's requests with their own temperature,
    top-k, top-p, min-p); the repetition penalty is shared. It stands wherever a ``SamplingParams``
    does: ``norm_logits`` filters each group of rows with its own processors; ``greedy`` holds when
    every row is greedy (argmax shortcuts); otherwise a greedy row's law is one-hot and the sampling
    paths (multinomial, the accept/reject rule, tree walks) keep it exact. Build it with ``row_params``."""
    rows: tuple[SamplingParams, ...]    # one per row of the current batch

    def validate(self) -> None:
        for p in self.rows:
            p.validate()
        if len({p.repetition_penalty for p in self.rows}) > 1:
            raise ValueError(f"repetition_penalty must be the same for every row of a batch, got "
                             f"{sorted({p.repetition_penalty for p in self.rows})}")

    @property
    def greedy(self) -> bool:
        return all(p.greedy for p in self.rows)

    @property
    def uses_prefix(self) -> bool:
        return self.rows[0].uses_prefix

    @property
    def repetition_penalty(self) -> float:
        return self.rows[0].repetition_penalty

    def select(self, keep) -> SamplingParams | RowParams:
        return row_params([self.rows[i] for i in (keep.tolist() if torch.is_tensor(keep) else keep)])

    def row(self, i: int) -> SamplingParams:
        return self.rows[i]

    def per_row(self, b: int) -> list[SamplingParams]:
        return list(self.rows)

    @cached_property
    def _groups(self) -> list[tuple[SamplingParams, list[int]]]:
        out: dict[SamplingParams, list[int]] = {}
        for i, p in enumerate(self.rows):
            out.setdefault(p, []).append(i)
        return list(out.items())

    @cached_property
    def _index(self) -> dict:
        return {}                    # device -> groups with their row indices there

    def groups(self, device: torch.device) -> list[tuple[SamplingParams, torch.Tensor]]:
        """Each distinct parameter set and the rows that use it, as an index on ``device``; made
        once per batch composition (every pass of every model reads them)."""
        if device not in self._index:
            self._index[device] = [(p, to_device(idx, device)) for p, idx in self._groups]
        return self._index[device]


def row_params(rows: list[SamplingParams]) -> SamplingParams | RowParams:
    """Per-row parameters; a plain ``SamplingParams`` when every row has the same."""
    return rows[0] if len(set(rows)) == 1 else RowParams(tuple(rows))


def norm_logits(logits: torch.Tensor, params: SamplingParams | RowParams, seq: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, law: bool = True) -> torch.Tensor:
    """Filtered next-token probabilities [B, n, V] from the logits [B, n, V] of the last n
    positions of seq [B, S] (mask [B, S]); each position is filtered with its own prefix, as
    assisted generation does. seq and mask are needed only when ``params.uses_prefix``; masked
    slots (padding, BASS holes) are not part of a prefix.

    Greedy is a one-hot distribution on the argmax, so the same accept/reject rule serves
    greedy and sampled decoding alike, and rows with their own parameters (``RowParams``) share
    one batch. Computed in float32 (float64 stays float64). ``law=False``: when every row is greedy,
    the filtered logits themselves, whose argmax is all that a greedy consumer reads (``sample``,
    ``accept_reject``, ``tree_accept`` with ``greedy``): no one-hot is made (three kernels a pass).
    """
    if logits.dtype not in (torch.float32, torch.float64):
        logits = logits.float()
    if isinstance(params, RowParams):                 # each group of rows with its own filters
        out = torch.empty_like(logits)
        for p, i in params.groups(logits.device):
            out[i] = norm_logits(logits[i], p, None if seq is None else seq[i], None if mask is None else mask[i],
                                 law or not params.greedy)      # a mixed batch: every row a law
        return out
    procs = params.processors
    if procs:
        B, n, V = logits.shape
        if params.uses_prefix:
            assert seq is not None and mask is not None, "the repetition penalty needs the prefix"
            S = seq.shape[1]
            cols = []
            for j in range(n):                       # position S - n + j sees seq[:, :S - n + j + 1]
                prefix, pm = seq[:, :S - n + j + 1], mask[:, :S - n + j + 1]
                prefix = torch.where(pm.bool(), prefix, prefix[:, -1:])  # a masked slot repeats a real token
                cols.append(procs(prefix, logits[:, j]))
            logits = torch.stack(cols, 1)                                 # [B, n, V]
        else:
            logits = procs(None, logits.reshape(B * n, V)).view(B, n, V)
    if params.greedy and not law:                     # only the argmax is read
        return logits
    return one_hot_argmax(logits) if params.greedy else torch.softmax(logits, dim=-1)


def one_hot_argmax(logits: torch.Tensor) -> torch.Tensor:
    """The greedy law: one-hot on the argmax of the last dim, made in logits' dtype at once."""
    return torch.zeros_like(logits).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)


class RowDraws:
    """Each row's own random draws, for batches whose rows are separate requests (a server's), each
    with its own seed. A draw of a row comes from a generator seeded by the row's seed, the row's
    tokens so far (``positions``) and what is drawn (the key a call site gives: ``keyed``), so a
    seeded row draws the same values whatever shares its batch and however many values the other
    rows draw. ``limits`` (host list, ``limit`` on the device): the drafts each row may accept this
    step, its own draft length (the batch drafts the longest of them). ``failed``: rows whose draw
    could not be made (their law was not a law: NaN, infinities, no mass)."""

    def __init__(self, seeds: list[int], positions: list[int], device: torch.device, limits: list[int] | None = None):
        self.seeds, self.positions, self.device, self.limits = seeds, positions, torch.device(device), limits
        self.limit = None if limits is None else to_device(limits, self.device)     # [b]
        self.failed: set[int] = set()

    def keyed(self, key: tuple) -> RowGenerators:
        """One generator per row for the draw named ``key`` (a stage and an index)."""
        out = RowGenerators(self.failed)
        for seed, position in zip(self.seeds, self.positions):
            digest = hashlib.blake2b(repr((seed, position) + key).encode(), digest_size=8).digest()
            out.append(torch.Generator(self.device).manual_seed(int.from_bytes(digest, "little") >> 1))
        return out


class RowGenerators(list):
    """One ``torch.Generator`` per row (``RowDraws.keyed``); a row whose draw fails is added to ``failed``."""

    def __init__(self, failed: set[int]):
        super().__init__()
        self.failed = failed


def keyed(generator, *key):
    """The generator(s) of one draw site: a batch's ``torch.Generator`` as it is (its stream goes on);
    with ``RowDraws``, each row's own generator for this key (a list)."""
    return generator.keyed(key) if isinstance(generator, RowDraws) else generator


def uniform(shape: tuple, generator, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Uniforms in [0, 1) of ``shape`` (rows first), from one generator or one per row (``keyed``)."""
    if isinstance(generator, list):
        return torch.stack([torch.rand(shape[1:], generator=g, device=device, dtype=dtype) for g in generator])
    return torch.rand(shape, generator=generator, device=device, dtype=dtype)


def sample(probs: torch.Tensor, generator: torch.Generator | RowGenerators | None = None,
           greedy: bool = False) -> torch.Tensor:
    """One draw per row of probs [N, V] -> [N], from one generator or one per row (``keyed``: a row
    whose law is not a law fails alone, its draw 0). ``greedy``: the rows are one-hot or the greedy
    logits themselves (``norm_logits`` at temperature 0), so the draw is their argmax, without the
    cost of ``multinomial``."""
    if greedy:
        return probs.argmax(-1)
    if isinstance(generator, RowGenerators):
        out = torch.zeros(len(probs), 1, dtype=torch.long, device=probs.device)
        for i, g in enumerate(generator):
            try:
                out[i] = torch.multinomial(probs[i:i + 1], 1, generator=g)
            except RuntimeError:                          # NaN, infinities or no mass: this row's fault alone
                generator.failed.add(i)
        return out.squeeze(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def gumbel_keys(q: torch.Tensor, generator) -> torch.Tensor:
    """log q + Gumbel noise [N, ..., V]: the top k of these keys, in order, are k draws from q without
    replacement (each from q renormalised without the ones before); tokens with q = 0 come last."""
    u = uniform(q.shape, generator, q.device, q.dtype).clamp(min=torch.finfo(q.dtype).tiny)
    return q.log() - (-u.log()).log()
