"""The chain verifier: the target checks every row's chain of drafts in one pass."""
from __future__ import annotations

import torch

from ..cache.part import CachedPart
from ..cache.spec import CacheSpec
from ..contracts import Accepted, Draft, Verified
from ..params import RowDraws, RowParams, SamplingParams
from .rules import accept_reject, finite_rows


class ChainVerifier(CachedPart):
    """Each row accepts a prefix of its chain and one more token (``accept_reject``). ``sequential``:
    the acceptance test draws one uniform per draft (Chen et al.) instead of all at once (Leviathan
    et al.); both give the same law. ``hidden``: return the target's lm_head inputs with the verdict."""

    def __init__(self, model, params: SamplingParams | RowParams, vocab: int | None = None, sequential: bool = False,
                 cache: CacheSpec = CacheSpec(), role: str | None = None, hidden: bool = False):
        super().__init__(model, params, vocab, cache, role, hidden)
        self.sequential = sequential

    def prefill(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | None:
        self.kv.prefill(input_ids, mask)
        return self.kv.hidden[:, -1] if self.kv.keeps_hidden else None              # [b, D]

    def verify(self, seq: torch.Tensor, mask: torch.Tensor, draft: Draft, generator) -> Verified:
        """One target pass over the drafts after seq [b, S] (mask [b, S])."""
        g, S, calls = draft.tokens.shape[1], seq.shape[1], self.kv.calls
        full = torch.cat([mask, mask.new_ones(len(seq), g)], dim=1)                # [b, S + g]
        self.kv.catch_up(torch.cat([seq, draft.tokens], dim=1), full)
        p = self.kv.probs[:, -(g + 1):]                                            # [b, g + 1, V]
        own = isinstance(generator, RowDraws)                                      # rows of their own: each
        n, nxt = accept_reject(p, draft.q, draft.tokens, generator, sequential=self.sequential,   # its own
                               greedy=self.greedy, limit=generator.limit if own else None)        # draft length
        nodes = self.kv.slots(g, n.device).expand(len(n), -1)                      # [b, g]
        hidden = self.kv.hidden if self.kv.calls > calls else None                 # [b, P + g, D]: a pass ran
        return Verified(n, nxt, draft.tokens, nodes, S, generator.limits if own and generator.limits else g,
                        (mask.sum(), len(seq) * g, full.numel()), p=p, hidden=hidden,
                        ok=finite_rows(p, draft.q) if own else None)

    def commit(self, acc: Accepted) -> torch.Tensor:
        """Keep what each row accepted (BASS-PAD: crop to the longest row, mask the others' holes);
        returns the new mask [b, start + k]."""
        return self.kv.realign(acc.start, acc.n, acc.tokens.shape[1])
