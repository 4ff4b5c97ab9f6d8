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

from .batched_kvcache_model import BatchedKVCacheModel
from .kvcache_model import CacheSpec
from .utils import SamplingParams, accept_reject, sample


@dataclass
class Draft:
    tokens: torch.Tensor             # [b, g] proposed tokens (a chain; a tree: its nodes in level order)
    q: torch.Tensor | None           # [b, g, V] the law each was drawn from; None: deterministic drafts (greedy too)
    tree: object = None              # a tree's TreeShape (sampling.tree); None: a chain


@dataclass
class Accepted:
    n: torch.Tensor                  # [b] drafts each row accepted
    next: torch.Tensor               # [b] the correction or bonus token after them
    tokens: torch.Tensor             # [b, n_max] the accepted drafts (a row's slots past its n are holes)
    nodes: torch.Tensor              # [b, n_max] which draft position (chain) or node (tree) each came from
    start: int                       # the slot the drafts begin at; the new length is start + n_max
    host: list[list[int]] | None = None   # per row [n, next, *tokens] when the verifier decided on the host
    taken: list[list[int]] | None = None  # per row, once on the host (to_host): its accepted drafts + next
    carried: list[list[int]] | None = None  # per row, a dynamic tree's fed slots of its accepted nodes (the walk's)

    def to_host(self, done: torch.Tensor, done_rows: list[bool] | None = None) -> list[int]:
        """Finished rows (done [b], and as host values ``done_rows``) keep nothing; tokens and nodes
        are trimmed to the longest row. Returns n as a list and keeps what each row took in
        ``taken``: the step's one device-to-host transfer, or none when the verifier has them on
        the host already (a tree's walk)."""
        self.n = self.n.masked_fill(done, 0)
        if self.host is None:
            host = torch.cat([self.n.unsqueeze(1), self.next.unsqueeze(1), self.tokens], 1).tolist()   # [b, 2 + g]
        else:
            host = [[0 if d else h[0]] + h[1:] for h, d in zip(self.host, done_rows)]
        n, nxt, drafts = [h[0] for h in host], [h[1] for h in host], [h[2:] for h in host]
        self.taken = [d[:k] + [x] for d, k, x in zip(drafts, n, nxt)]
        n_max = max(n)
        self.tokens, self.nodes = self.tokens[:, :n_max], self.nodes[:, :n_max]
        return n


def is_drafter(obj) -> bool:
    """A ready drafter source (``NgramDrafter``, ``Speculator``: ``obj.drafter(params, vocab, tree)``
    makes the drafter of one generation) rather than a model to wrap in a ModelDrafter."""
    return callable(getattr(obj, "drafter", None))


class CachedPart:
    """What every drafter and verifier built on a model shares: the model's cache and its counts.
    ``role`` ("draft" or "target", the class's by default): which press setting applies to it."""

    role = "target"

    def __init__(self, model, params: SamplingParams, vocab: int | None = None, cache: CacheSpec = CacheSpec(),
                 role: str | None = None):
        self.kv = BatchedKVCacheModel(model, params, vocab, cache, role or self.role)

    @property
    def greedy(self) -> bool:
        """Every current row is greedy: read from the cache's parameters, which follow the rows that
        leave (``select_rows``) and join (``admit``), so the argmax shortcuts agree with what the
        cache keeps (greedy: the logits, ``norm_logits(law=False)``; else laws)."""
        return self.kv.params.greedy

    @property
    def calls(self) -> int:
        return self.kv.calls

    def prefill(self, input_ids: torch.Tensor, mask: torch.Tensor) -> None:
        self.kv.prefill(input_ids, mask)

    def select_rows(self, keep: torch.Tensor) -> None:
        self.kv.select_rows(keep)

    def admit(self, ids: torch.Tensor, mask: torch.Tensor, pad: int, params: list[SamplingParams]) -> None:
        """New rows join between steps (``KVCacheModel.admit``)."""
        self.kv.admit(ids, mask, pad, params)


class ModelDrafter(CachedPart):
    """A draft model with its own KV cache: g tokens per row, one cached step each."""

    role = "draft"

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
        return Draft(tokens=torch.stack(xs, 1),                               # [b, g]
                     q=None if self.greedy else torch.stack(qs, 1))           # [b, g, V]; greedy: never read

    def commit(self, acc: Accepted) -> None:
        """Keep the accepted slots of the cache: the chain's prefix up to the longest row."""
        self.kv.rollback(acc.start + acc.tokens.shape[1])


class ChainVerifier(CachedPart):
    """The target checks each row's chain of drafts in one pass. ``sequential``: the acceptance test
    draws one uniform per draft (Chen et al.) instead of all at once (Leviathan et al.)."""

    def __init__(self, model, params: SamplingParams, vocab: int | None = None, sequential: bool = False,
                 cache: CacheSpec = CacheSpec(), role: str | None = None):
        super().__init__(model, params, vocab, cache, role)
        self.sequential = sequential

    def verify(self, seq: torch.Tensor, mask: torch.Tensor, draft: Draft, generator) -> Accepted:
        """One target pass over the drafts after seq [b, S] (mask [b, S]); each row accepts a prefix
        of its chain and one more token."""
        g, S = draft.tokens.shape[1], seq.shape[1]
        self.mask = torch.cat([mask, mask.new_ones(len(seq), g)], dim=1)      # [b, S + g]
        self.kv.catch_up(torch.cat([seq, draft.tokens], dim=1), self.mask)
        self.padding = (mask.sum(), len(seq) * g, self.mask.numel())         # real slots: a device count + g per row
        p = self.kv.probs[:, -(g + 1):]                                      # [b, g + 1, V]
        n, nxt = accept_reject(p, draft.q, draft.tokens, generator, sequential=self.sequential, greedy=self.greedy)
        nodes = self.kv.slots(g, n.device).expand(len(n), -1)                # [b, g]
        return Accepted(n, nxt, draft.tokens, nodes, S)

    def commit(self, acc: Accepted) -> torch.Tensor:
        """Keep what each row accepted (BASS-PAD: crop to the longest row, mask the others' holes);
        returns the new mask [b, start + n_max]."""
        return self.kv.realign(acc.start, acc.n, self.mask, acc.tokens.shape[1])
