"""A cascade of drafts (seed 003): the smallest model drafts for the next one, which verifies its
tokens by speculative sampling, and so on up; the largest draft's tokens go to the target.

``CascadeDrafter`` is a drafter (``sampling.parts``) whose proposal is itself a speculative loop:
its inner drafter (a draft model, or a smaller cascade) proposes, its model verifies with the one
rule, until the level holds g tokens. Those tokens follow the level model's law exactly (that is
what speculative sampling guarantees), so the law they were drawn from, ``q`` for the level
above, is the level model's own distribution at each position, which its verify passes computed.
The target then verifies them like any draft: the output law stays the target's.
"""
from __future__ import annotations

import torch

from .kvcache_model import CacheSpec
from .parts import ChainVerifier, Draft, ModelDrafter
from .utils import SamplingParams
from .utils_bass import GammaSchedule, ScheduleParams


class CascadeDrafter:
    """Drafts with ``model`` verifying ``inner``'s proposals (one row: cascades run row by row, as
    google does). Each level has its own draft length, adapted by its own schedule."""

    def __init__(self, inner, model, params: SamplingParams, vocab: int | None, gamma: int,
                 schedule: ScheduleParams, cache: CacheSpec = CacheSpec()):
        self.inner = inner                                 # the level below: ModelDrafter or CascadeDrafter
        self.level = ChainVerifier(model, params, vocab, cache=cache, role="draft")
        self.schedule = GammaSchedule(gamma, schedule)

    @property
    def calls(self) -> int:
        """Forward passes of every model below the target."""
        return self.level.calls + self.inner.calls

    def prefill(self, input_ids: torch.Tensor, mask: torch.Tensor) -> None:
        self.level.prefill(input_ids, mask)
        self.inner.prefill(input_ids, mask)

    def select_rows(self, keep: torch.Tensor) -> None:
        self.level.select_rows(keep)
        self.inner.select_rows(keep)

    def propose(self, seq: torch.Tensor, mask: torch.Tensor, g: int, generator) -> Draft:
        """g tokens after seq [1, S] that follow the level model's law, and that law [1, g, V]."""
        tokens, qs, count = [], [], 0                                         # count: drafted so far
        live = torch.zeros(1, dtype=torch.bool, device=seq.device)           # the one row is never done here
        while count < g:
            k = min(self.schedule.gamma, g - count - 1)   # a step yields up to k + 1 tokens
            # 1. the level below drafts, 2. this level verifies: one pass, its probs at every position
            draft = self.inner.propose(seq, mask, k, generator)                  # [1, k]
            acc = self.level.verify(seq, mask, draft, generator)
            p = self.level.kv.probs[:, -(k + 1):]                                # [1, k + 1, V]
            n = acc.to_host(live)                                                # the level's one sync
            self.schedule.update(n, k)
            # 3. both caches keep what was accepted; the tokens and their law join the draft
            mask = self.level.commit(acc)                                        # [1, S + n]
            self.inner.commit(acc)
            new = torch.cat([acc.tokens, acc.next.unsqueeze(1)], dim=1)         # [1, n + 1], on the device
            seq = torch.cat([seq, new], dim=1)
            mask = torch.cat([mask, mask.new_ones(1, 1)], dim=1)
            tokens.append(new)
            count += n[0] + 1
            qs.append(p[:, :n[0] + 1])
        if not g:
            return Draft(tokens=seq[:, :0], q=None)
        return Draft(tokens=torch.cat(tokens, dim=1), q=torch.cat(qs, dim=1))   # [1, g], [1, g, V]

    def commit(self, acc) -> None:
        """The target accepted a prefix of the draft: every level keeps it (a slice of its cache)."""
        self.level.kv.rollback(acc.start + acc.tokens.shape[1])
        self.inner.commit(acc)


def cascade_drafter(drafts, params: SamplingParams, vocab: int | None, gamma: int, schedule: ScheduleParams,
                    cache: CacheSpec = CacheSpec()):
    """The drafter of models ``drafts`` [smallest, ..., largest draft]: each verifies the one before."""
    drafter = ModelDrafter(drafts[0], params, vocab, cache)
    for model in drafts[1:]:
        drafter = CascadeDrafter(drafter, model, params, vocab, gamma, schedule, cache)
    return drafter
