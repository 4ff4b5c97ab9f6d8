"""KV-cache compression ("presses") on the toolkit's caches: which cached tokens to evict.

Four rules, each a score per cached token (the highest are kept), in the spirit of NVIDIA's
``kvpress`` (whose 0.5.5 release needs transformers < 5.3, so they are written here on
transformers' own cache classes):

* ``streaming``: StreamingLLM (Xiao et al. 2023, "Efficient Streaming Language Models with
  Attention Sinks"): the first ``sinks`` tokens and the most recent ones.
* ``knorm``: the keys of smallest L2 norm (Devoto et al. 2024, "A Simple and Effective L2
  Norm-Based Strategy for KV Cache Compression").
* ``snapkv``: SnapKV (Li et al. 2024): the tokens the last ``window`` queries attend to most
  (average over heads and queries, smoothed by a 1-D average pool of width 5); the window is kept.
* ``hybrid``: a "hybrid conservative" press: the sinks and a recent ``window`` kept, the rest of
  the budget filled with the middle tokens of smallest key norm.

How much is kept: at prefill ``ratio`` of the prompt's slots is evicted; with a ``budget`` the
committed part of the cache is evicted down to ``budget`` slots before any pass that finds it
larger (drafts in flight and the pass's own tokens come on top, and are never evicted: a rejected
draft is rolled back past them, never into the compressed part). A position is committed once a
rollback has kept it: in the speculative modes after each step's verification (so eviction runs at
most once a step), in AR after each token. The selection is per layer and
per row, one set of tokens for all heads of a layer (``kvpress`` selects per head); every row keeps
the same number of slots, padding and BASS-PAD holes evicted first. No key is re-rotated: keys are
cached after their rotary embedding, and the wrapper feeds new tokens their true positions from the
full mask, so a compressed cache is the same model attending over fewer tokens (StreamingLLM's own
re-rotation to cache positions is for running past the trained context, which this toolkit does not).
Under a budget that holds for the keys and values the model reads; what it evicts, though, depends
on when eviction runs (per step or per token, above) and, for snapkv, on the queries of the last
pass, which in a speculative mode include those of drafts that were then rejected: a pressed target
is a different model in each mode and with each drafter, not one fixed compressed model.

Compressing the draft's cache only changes what is proposed, so the output law stays the target's;
compressing the target's cache changes the model (``benchmark.perplexity`` measures by how much).
``Press`` applies a ``PressSpec`` to one wrapper's cache (``sampling.kvcache_model``), whatever its
backend (``sampling.cache.backends``).
"""
from __future__ import annotations

import contextlib
import math
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

PRESSES = ("none", "streaming", "knorm", "snapkv", "hybrid")
PRESS_ON = ("draft", "target", "both")
POOL = 5                           # snapkv: width of the average pool over the scores (SnapKV's kernel)
SINK, RECENT = 2e30, 1e30          # scores above any attention or norm score: kept first, then recent


@dataclass(frozen=True)
class PressSpec:
    """Which press, how much, on which model's cache."""
    kind: str = "none"             # none | streaming | knorm | snapkv | hybrid
    ratio: float = 0.0             # fraction of the prompt's slots evicted after prefill, in [0, 1)
    budget: int | None = None      # most committed slots kept while decoding (None: no decode-time eviction)
    on: str = "draft"              # draft | target | both: whose cache (the draft's keeps the output law)
    sinks: int = 4                 # streaming, hybrid: first tokens always kept (attention sinks)
    window: int = 64               # hybrid: recent tokens kept; snapkv: observation window (queries) kept

    def validate(self) -> None:
        if self.kind not in PRESSES:
            raise ValueError(f"unknown press {self.kind!r}; choose one of {', '.join(PRESSES)}")
        if self.on not in PRESS_ON:
            raise ValueError(f"press_on must be one of {', '.join(PRESS_ON)}, got {self.on!r}")
        if not 0.0 <= self.ratio < 1.0:
            raise ValueError(f"press ratio must be in [0, 1), got {self.ratio}")
        if self.sinks < 0 or self.window < 1:
            raise ValueError(f"press sinks must be >= 0 and window >= 1, got {self.sinks} and {self.window}")
        if self.budget is not None and self.budget <= self.sinks:
            raise ValueError(f"press budget must be above the {self.sinks} sinks, got {self.budget}")
        if self.kind == "none" and (self.ratio or self.budget is not None):
            raise ValueError("a press ratio or budget needs a press (streaming, knorm, snapkv or hybrid)")

    @property
    def active(self) -> bool:
        return self.kind != "none" and (self.ratio > 0 or self.budget is not None)

    def applies_to(self, role: str) -> bool:
        """Whether the cache of a model in ``role`` ("draft" or "target") is pressed."""
        return self.active and self.on in (role, "both")

    def label(self) -> str:
        """"kind:ratio:budget:on:sinks:window" ("" when it evicts nothing): a sweep's configuration key."""
        if not self.active:
            return ""
        return f"{self.kind}:{self.ratio:g}:{'' if self.budget is None else self.budget}:{self.on}:{self.sinks}:" \
               f"{self.window}"

    @classmethod
    def from_label(cls, label: str) -> PressSpec:
        if not label:
            return cls()
        kind, ratio, budget, on, sinks, window = label.split(":")
        return cls(kind, float(ratio), int(budget) if budget else None, on, int(sinks), int(window))

    def prefill_keep(self, slots: int) -> int:
        """Slots kept of a prompt of ``slots`` slots."""
        keep = slots - int(slots * self.ratio)
        return max(1, min(keep, self.budget) if self.budget is not None else keep)


def scores(spec: PressSpec, keys: torch.Tensor, mask: torch.Tensor, queries: torch.Tensor | None = None,
           ) -> torch.Tensor:
    """How much each cached slot is worth keeping [B, S] (higher: kept first), from one layer's
    keys [B, H_kv, S, D] and the slots' mask [B, S] (0: padding or a hole, never kept before a real
    token); ``queries`` [B, H, w, D] (snapkv): the observation window's, after their rotary."""
    real = mask.bool()
    rank = (mask.long().cumsum(-1) - 1).float()                      # [B, S] index among the row's real tokens
    n_real = mask.long().sum(-1, keepdim=True).float()               # [B, 1]
    if spec.kind == "streaming":
        s = rank.clone()                                             # the most recent first
    elif spec.kind in ("knorm", "hybrid"):
        s = -keys.float().norm(dim=-1).mean(1)                       # [B, S] small norm first
    elif spec.kind == "snapkv":
        s = window_attention(keys, mask, queries, spec.window)       # [B, S]
    else:
        raise ValueError(f"no scores for press {spec.kind!r}")
    if spec.kind in ("hybrid", "snapkv"):                            # the recent window (snapkv: its queries)
        s = torch.where(rank >= n_real - spec.window, RECENT + rank, s)
    if spec.kind in ("streaming", "hybrid"):
        s = torch.where(rank < spec.sinks, torch.full_like(s, SINK), s)
    return s.masked_fill(~real, -math.inf)


def window_attention(keys: torch.Tensor, mask: torch.Tensor, queries: torch.Tensor | None, window: int):
    """SnapKV's score: the attention the window's queries [B, H, w, D] pay each slot, averaged over
    heads and queries and pooled; the window's own slots are left out of the softmax."""
    if queries is None:
        raise RuntimeError("snapkv needs the last pass's queries (the press hooks were not installed)")
    B, H, w, D = queries.shape
    k = keys.repeat_interleave(H // keys.shape[1], dim=1).to(queries.dtype)   # [B, H, S, D]
    logits = queries @ k.transpose(-1, -2) / math.sqrt(D)                     # [B, H, w, S]
    rank = mask.long().cumsum(-1) - 1
    n_real = mask.long().sum(-1, keepdim=True)
    visible = mask.bool() & (rank < n_real - window)                          # [B, S] outside the window
    logits = logits.float().masked_fill(~visible[:, None, None], -math.inf)
    att = torch.softmax(logits, dim=-1).nan_to_num(0.0).mean(dim=(1, 2))      # [B, S]
    return F.avg_pool1d(att.unsqueeze(1), POOL, stride=1, padding=POOL // 2, count_include_pad=False).squeeze(1)


def select(s: torch.Tensor, mask: torch.Tensor, keep: int) -> torch.Tensor:
    """The ``keep`` slots with the highest scores s [B, S], per row, in slot order with the kept
    padding first (so every layer's kept mask is the same: each row keeps the same count of real
    tokens in every layer) [B, keep]."""
    idx = s.topk(keep, dim=-1).indices                                        # [B, keep]
    S = s.shape[-1]
    order = mask.gather(1, idx).long() * (S + 1) + idx                        # padding first, then slot order
    return idx.gather(1, order.argsort(dim=-1))


class QueryCapture:
    """Forward pre-hooks on every attention module that keep the last ``window`` rows of its input
    and rotary embeddings, from which ``queries`` rebuilds the rotated queries (snapkv). For
    Llama-style attention (``q_proj``, ``head_dim``, ``position_embeddings``, the module's
    ``apply_rotary_pos_emb``); others get a clear error."""

    def __init__(self, model, window: int):
        self.window = window
        self.attn = [m for m in model.modules() if hasattr(m, "q_proj") and hasattr(m, "head_dim")]
        if not self.attn:
            raise ValueError(f"press snapkv needs Llama-style attention (q_proj and rotary embeddings); "
                             f"{type(model).__name__} has none")
        self.seen: dict[int, tuple] = {}
        self.handles = []

    def __enter__(self):
        for i, m in enumerate(self.attn):
            self.handles.append(m.register_forward_pre_hook(self._hook(i), with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles = []

    def _hook(self, i: int):
        def hook(module, args, kwargs):
            h = kwargs.get("hidden_states", args[0] if args else None)
            cos, sin = kwargs.get("position_embeddings", args[1] if len(args) > 1 else None)
            w = min(self.window, h.shape[1])
            self.seen[i] = (h[:, -w:], cos[:, -w:], sin[:, -w:])
        return hook

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep the given batch rows of what was seen (finished rows left the cache)."""
        self.seen = {i: tuple(t[rows] for t in v) for i, v in self.seen.items()}

    def queries(self, layer: int) -> torch.Tensor | None:
        """Rotated queries [B, H, w, D] of the last pass's last ``window`` tokens at ``layer``."""
        if layer not in self.seen:
            return None
        m, (h, cos, sin) = self.attn[layer], self.seen[layer]
        q = m.q_proj(h).view(*h.shape[:2], -1, m.head_dim).transpose(1, 2)     # [B, H, w, D]
        if hasattr(m, "q_norm"):
            q = m.q_norm(q)
        rotate = sys.modules[type(m).__module__].apply_rotary_pos_emb
        return rotate(q, q, cos, sin)[0]


class Press:
    """A press at work on one wrapper's cache: the positions made final (which it may evict), those
    it has pressed and the slots they went to, and the queries snapkv scores with. Every row keeps
    the same number of slots, so one count of evicted positions holds for the whole batch."""

    def __init__(self, spec: PressSpec, model):
        self.spec = spec
        self.capture = QueryCapture(model, spec.window) if spec.kind == "snapkv" else None
        self.evictions = 0                               # times it ran
        self.reset()

    def reset(self) -> None:
        """A new prompt: nothing final, nothing pressed."""
        self.final = 0                                   # positions made final by a rollback
        self.frozen = 0                                  # positions before this went through the press ...
        self.frozen_mask: torch.Tensor | None = None     # [B, frozen - dropped] ... into these slots

    @property
    def dropped(self) -> int:
        """Positions evicted (the same count in every row)."""
        return 0 if self.frozen_mask is None else self.frozen - self.frozen_mask.shape[1]

    def capturing(self):
        """The context of a model pass: snapkv keeps the pass's last queries."""
        return self.capture if self.capture is not None else contextlib.nullcontext()

    def slot_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """The mask of the cache's slots (and any new ones) from the mask of the whole sequence
        [B, L (+ n)]: the pressed slots' own mask, then the positions after them."""
        if self.frozen_mask is None:
            return mask
        return torch.cat([self.frozen_mask, mask[:, self.frozen:]], dim=1)

    def commit(self, final: int) -> None:
        """Positions before ``final`` are final (a rollback kept them); a rollback never reaches into
        the pressed part."""
        if final < self.frozen:
            raise RuntimeError(f"rollback to {final} reaches into the compressed part (before {self.frozen})")
        self.final = final

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep the given batch rows (finished rows left the cache)."""
        if self.frozen_mask is not None:
            self.frozen_mask = self.frozen_mask[rows]
        if self.capture is not None:
            self.capture.select_rows(rows)

    def before_pass(self, backend, mask: torch.Tensor) -> None:
        """Before a pass: if the final part of the cache holds more than the budget, press it."""
        if self.spec.budget is not None and self.final - self.dropped > self.spec.budget:
            self.evict(backend, self.spec.budget, mask)

    @torch.inference_mode()
    def evict(self, backend, keep: int, mask: torch.Tensor) -> None:
        """Evict among the final positions down to ``keep`` slots, by the scores, layer by layer; the
        slots after them (drafts in flight) move down behind the kept ones. ``backend``: the
        wrapper's (``sampling.cache.backends``); mask: of the whole sequence [B, >= final]."""
        C = self.final - self.dropped                                     # final slots
        if keep >= C:
            return
        smask = self.slot_mask(mask)[:, :C]                               # [B, C]
        U = backend.filled - C                                            # slots in flight after them
        kept_mask = None
        for i, (keys, values) in enumerate(backend.layers()):
            q = self.capture.queries(i) if self.capture is not None else None
            idx = select(scores(self.spec, keys[:, :, :C], smask, q), smask, keep)   # [B, keep]
            if kept_mask is None:
                kept_mask = smask.gather(1, idx)                          # the same in every layer
            for t in (keys, values):                                      # [B, H, >= C + U, D], written in place
                g = t[:, :, :C].gather(2, idx[:, None, :, None].expand(-1, t.shape[1], -1, t.shape[3]))
                tail = t[:, :, C:C + U].clone()
                t[:, :, :keep].copy_(g)
                t[:, :, keep:keep + U].copy_(tail)
        backend.truncate(keep + U)
        self.frozen_mask, self.frozen = kept_mask, self.final             # dropped: C - keep more
        self.evictions += 1
