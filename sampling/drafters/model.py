"""A draft model's chain: g tokens per row, one cached forward pass each."""
from __future__ import annotations

import torch

from ..cache.part import CachedPart
from ..contracts import Accepted, Draft, StepWork
from ..params import keyed, sample


class ModelDrafter(CachedPart):
    """A draft model with its own KV cache."""

    role = "draft"
    reads_target = False
    max_draft = None

    def prefill(self, input_ids: torch.Tensor, mask: torch.Tensor, hidden: torch.Tensor | None = None) -> None:
        """Deferred to the first draft (``KVCacheModel.defer``): a generation whose steps are all AR
        never runs the draft model."""
        self.kv.defer(input_ids, mask)

    def propose(self, seq: torch.Tensor, mask: torch.Tensor, g: int, generator) -> Draft:
        """g drafts after seq [b, S] (mask [b, S]) for every row."""
        qs, xs = [], []
        for j in range(g):
            qs.append(self.kv.catch_up(seq, mask))                            # [b, V]
            xs.append(sample(qs[-1], keyed(generator, "draft", j), self.greedy))   # [b]
            seq = torch.cat([seq, xs[-1].unsqueeze(1)], dim=1)
            mask = torch.cat([mask, mask.new_ones(len(seq), 1)], dim=1)
        if not g:
            return Draft(tokens=seq[:, :0], q=None)
        return Draft(tokens=torch.stack(xs, 1),                               # [b, g]
                     q=None if self.greedy else torch.stack(qs, 1))           # [b, g, V]; greedy: never read

    def work(self, g: int) -> StepWork:
        """g one-token draft passes, a verify pass of g + 1."""
        return StepWork((1,) * g, g + 1)

    def commit(self, acc: Accepted) -> None:
        """Keep the accepted slots of the cache: the chain's prefix up to the longest row (the loop's
        mask, with the other rows' holes, comes with the next pass)."""
        self.kv.rollback(acc.start + acc.tokens.shape[1])
