"""The parts a speculative loop is made of: a drafter proposes, a verifier checks.

A drafter (today the draft model; later speculator heads, an n-gram table, a cascade) proposes
``g`` tokens for every live row and the law they were drawn from; a verifier (today a chain; later
a tree) runs the target once over them and decides, with the one rule ``accept_reject``, how many
each row keeps and which token follows. Both keep their own cache and roll it back to what was
accepted. The contract follows transformers' ``CandidateGenerator``: the loop never knows which
part it drives.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .batched_kvcache_model import BatchedKVCacheModel
from .utils import SamplingParams, accept_reject, sample


@dataclass
class Draft:
    tokens: torch.Tensor             # [b, g] proposed tokens
    q: torch.Tensor | None           # [b, g, V] the law each was drawn from; None: deterministic drafts


class ModelDrafter:
    """A draft model with its own KV cache: g tokens per row, one cached step each."""

    def __init__(self, model, params: SamplingParams, vocab: int | None = None):
        self.kv = BatchedKVCacheModel(model, params, vocab)
        self.greedy = params.greedy

    @property
    def calls(self) -> int:
        return self.kv.calls

    def prefill(self, input_ids: torch.Tensor, mask: torch.Tensor) -> None:
        self.kv.prefill(input_ids, mask)

    def propose(self, seq: torch.Tensor, mask: torch.Tensor, g: int, generator) -> Draft:
        """g drafts after seq [b, S] (mask [b, S]) for every row."""
        qs, xs = [], []
        for _ in range(g):
            qs.append(self.kv.catch_up(seq, mask))                            # [b, V]
            xs.append(sample(qs[-1], generator, self.greedy))                 # [b]
            seq = torch.cat([seq, xs[-1].unsqueeze(1)], dim=1)
            mask = torch.cat([mask, mask.new_ones(len(seq), 1)], dim=1)
        if not g:
            return Draft(tokens=seq[:, :0], q=None)
        return Draft(tokens=torch.stack(xs, 1), q=torch.stack(qs, 1))          # [b, g], [b, g, V]

    def commit(self, length: int) -> None:
        """Keep the first ``length`` slots of the cache (the accepted ones)."""
        self.kv.rollback(length)

    def select_rows(self, keep: torch.Tensor) -> None:
        self.kv.select_rows(keep)


class ChainVerifier:
    """The target checks each row's chain of drafts in one pass. ``sequential``: the acceptance test
    draws one uniform per draft (Chen et al.) instead of all at once (Leviathan et al.)."""

    def __init__(self, model, params: SamplingParams, vocab: int | None = None, sequential: bool = False):
        self.kv = BatchedKVCacheModel(model, params, vocab)
        self.greedy, self.sequential = params.greedy, sequential

    @property
    def calls(self) -> int:
        return self.kv.calls

    def prefill(self, input_ids: torch.Tensor, mask: torch.Tensor) -> None:
        self.kv.prefill(input_ids, mask)

    def verify(self, seq: torch.Tensor, mask: torch.Tensor, draft: Draft, generator):
        """seq [b, S + g] ends with the drafts. Returns n [b], the drafts each row accepts, and
        next [b], the correction or bonus token after them."""
        g = draft.tokens.shape[1]
        self.kv.catch_up(seq, mask)
        p = self.kv.probs[:, -(g + 1):]                                      # [b, g + 1, V]
        q = draft.q if draft.q is not None else F.one_hot(draft.tokens, p.shape[-1]).to(p.dtype)  # [b, g, V]
        return accept_reject(p, q, draft.tokens, generator, sequential=self.sequential, greedy=self.greedy)

    def commit(self, start: int, accepted: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Keep what each row accepted of the drafts placed from slot ``start`` on (BASS-PAD:
        crop to the longest row, mask the others' holes); returns the new mask."""
        return self.kv.realign(start, accepted, mask)

    def select_rows(self, keep: torch.Tensor) -> None:
        self.kv.select_rows(keep)
