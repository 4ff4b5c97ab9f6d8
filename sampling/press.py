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
* ``hybrid``: seed 003's "hybrid conservative": the sinks and a recent ``window`` kept, the rest of
  the budget filled with the middle tokens of smallest key norm.

How much is kept: at prefill ``ratio`` of the prompt's slots is evicted; with a ``budget`` the
committed part of the cache is evicted down to ``budget`` slots before any pass that finds it
larger (drafts in flight and the pass's own tokens come on top, and are never evicted: a rejected
draft is rolled back past them, never into the compressed part). The selection is per layer and
per row, one set of tokens for all heads of a layer (``kvpress`` selects per head); every row keeps
the same number of slots, padding and BASS-PAD holes evicted first. No key is re-rotated: keys are
cached after their rotary embedding, and the wrapper feeds new tokens their true positions from the
full mask, so a compressed cache is the same model attending over fewer tokens (StreamingLLM's own
re-rotation to cache positions is for running past the trained context, which this toolkit does not).

Compressing the draft's cache only changes what is proposed, so the output law stays the target's;
compressing the target's cache changes the model (``benchmark.perplexity`` measures by how much).
"""
from __future__ import annotations

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
    def from_label(cls, label: str) -> "PressSpec":
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
