"""What every drafter and verifier built on a model shares: the model's cache and its counts."""
from __future__ import annotations

import torch

from ..params import RowParams, SamplingParams
from .spec import CacheSpec
from .tree import TreeKVCacheModel


class CachedPart:
    """A drafter or verifier that owns a model and its KV cache (``TreeKVCacheModel``: a chain's
    realignment and a tree's slots). ``role`` ("draft" or "target", the class's by default): which
    press setting applies to its cache; ``hidden``: the cache keeps the lm_head inputs of each pass."""

    role = "target"

    def __init__(self, model, params: SamplingParams | RowParams, vocab: int | None = None,
                 cache: CacheSpec = CacheSpec(), role: str | None = None, hidden: bool = False):
        self.kv = TreeKVCacheModel(model, params, vocab, cache, role or self.role, hidden)

    @property
    def greedy(self) -> bool:
        """Every current row is greedy: read from the cache's parameters, which follow the rows that
        leave (``select_rows``) and join (``admit``), so the argmax shortcuts agree with what the
        cache keeps (greedy: the logits, ``norm_logits(law=False)``; else laws)."""
        return self.kv.params.greedy

    @property
    def calls(self) -> int:
        """Forward passes of its model so far."""
        return self.kv.calls

    def select_rows(self, keep: torch.Tensor) -> None:
        """Keep only the rows ``keep`` (finished rows leave the batch)."""
        self.kv.select_rows(keep)

    def admit(self, ids: torch.Tensor, mask: torch.Tensor, pad: int, params: list[SamplingParams]) -> None:
        """New rows join between steps (``KVCacheModel.admit``)."""
        self.kv.admit(ids, mask, pad, params)

    def drop_leading(self, n: int) -> None:
        """The batch's first ``n`` slots, padding in every row, go (``KVCacheModel.drop_leading``)."""
        self.kv.drop_leading(n)
