"""A cascade of drafts: the smallest model drafts for the next one, which verifies its tokens by
speculative sampling, and so on up; the largest draft's tokens go to the target.

``CascadeDrafter`` is a drafter (``sampling.contracts.Drafter``) whose proposal is itself the
decode loop's step (``sampling.decode.step``): its inner drafter (a draft model, or a smaller
cascade) proposes and its model verifies with the one rule, until the level holds g tokens. Those
tokens follow the level model's law exactly (that is what speculative sampling guarantees), so the
law they were drawn from, ``q`` for the level above, is the level model's own distribution at each
position, which its verify passes computed. The target then verifies them like any draft: the
output law stays the target's.
"""
from __future__ import annotations

import torch

from ..cache.spec import CacheSpec
from ..contracts import Accepted, Draft, StepWork
from ..decode import step
from ..params import RowParams, SamplingParams
from ..rows import Live
from ..utils_bass import GammaSchedule, ScheduleParams
from ..verify.chain import ChainVerifier
from .model import ModelDrafter


class CascadeDrafter:
    """Drafts with ``model`` verifying ``inner``'s proposals (one row: cascades run row by row, as
    google does). Each level has its own draft length, adapted by its own schedule."""

    reads_target = False
    max_draft = None

    def __init__(self, inner, model, params: SamplingParams | RowParams, vocab: int | None, gamma: int,
                 schedule: ScheduleParams, cache: CacheSpec = CacheSpec()):
        self.inner = inner                                 # the level below: ModelDrafter or CascadeDrafter
        self.level = ChainVerifier(model, params, vocab, cache=cache, role="draft")
        self.schedule = GammaSchedule(gamma, schedule)

    @property
    def calls(self) -> int:
        """Forward passes of every model below the target."""
        return self.level.calls + self.inner.calls

    def prefill(self, input_ids: torch.Tensor, mask: torch.Tensor, hidden: torch.Tensor | None = None) -> None:
        self.level.prefill(input_ids, mask)
        self.inner.prefill(input_ids, mask, None)

    def select_rows(self, keep: torch.Tensor) -> None:
        self.level.select_rows(keep)
        self.inner.select_rows(keep)

    def propose(self, seq: torch.Tensor, mask: torch.Tensor, g: int, generator) -> Draft:
        """g tokens after seq [1, S] that follow the level model's law, and that law [1, g, V]."""
        tokens, qs, count = [], [], 0                                         # count: drafted so far
        live = Live.all(1, seq.device)                                       # the one row is never done here
        while count < g:
            k = min(self.schedule.gamma, g - count - 1)   # a step yields up to k + 1 tokens
            # the level below drafts k, this level verifies them: the decode loop's own step
            acc, seq, mask = step(self.inner, self.level, seq, mask, k, generator, live)
            self.schedule.update(acc.counts, k)
            n = acc.counts[0]
            tokens.append(seq[:, -(n + 1):])                                  # [1, n + 1]: accepted, then next
            qs.append(acc.verified.p[:, :n + 1])                              # [1, n + 1, V] this level's law there
            count += n + 1
        if not g:
            return Draft(tokens=seq[:, :0], q=None)
        return Draft(tokens=torch.cat(tokens, dim=1), q=torch.cat(qs, dim=1))   # [1, g], [1, g, V]

    def work(self, g: int) -> StepWork:
        """Priced as g one-token passes of this level's model (its own verify passes take about
        that; the levels below it are not priced) and a target verify pass of g + 1."""
        return StepWork((1,) * g, g + 1)

    def commit(self, acc: Accepted) -> None:
        """The target accepted a prefix of the draft: every level keeps it (a slice of its cache)."""
        self.level.kv.rollback(acc.start + acc.tokens.shape[1])
        self.inner.commit(acc)


def cascade_drafter(drafts, params: SamplingParams | RowParams, vocab: int | None, gamma: int,
                    schedule: ScheduleParams, cache: CacheSpec = CacheSpec()):
    """The drafter of models ``drafts`` [smallest, ..., largest draft]: each verifies the one before."""
    drafter = ModelDrafter(drafts[0], params, vocab, cache)
    for model in drafts[1:]:
        drafter = CascadeDrafter(drafter, model, params, vocab, gamma, schedule, cache)
    return drafter
