"""The tree verifier: the target runs the pending token and the whole draft tree in one pass (tree
attention), and ``tree_accept`` walks it from the root."""
from __future__ import annotations

import torch

from ..cache.part import CachedPart
from ..cache.spec import CacheSpec
from ..contracts import Accepted, Draft, HostVerdict, Verified
from ..params import RowDraws, RowParams, SamplingParams
from ..tree_shapes import RowTrees
from .rules import finite_rows, tree_accept

NO_TREE_MASK = ("bloom",)    # model types whose attention cannot take a 4D mask (BLOOM: ALiBi from a 2D mask)


def check_tree_model(model, role: str) -> None:
    """ValueError (one line) unless the model takes a 4D attention mask, which tree attention needs."""
    kind = model.config.model_type
    if kind in NO_TREE_MASK:
        raise ValueError(f"mode 'tree' needs a model that takes a 4D attention mask; the {role} is {kind}, which "
                         f"does not (its ALiBi bias comes from a 2D mask)")


class TreeVerifier(CachedPart):
    """Keeps the longest path the target agrees with (greedy) or walks the tree as Sequoia does
    (siblings drawn without replacement, each tested in turn). ``hidden``: return the target's
    lm_head inputs with the verdict."""

    def __init__(self, model, params: SamplingParams | RowParams, vocab: int | None = None,
                 cache: CacheSpec = CacheSpec(), hidden: bool = False):
        check_tree_model(model, "target")
        super().__init__(model, params, vocab, cache, hidden=hidden)

    def prefill(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | None:
        self.kv.prefill(input_ids, mask)
        return self.kv.hidden[:, -1] if self.kv.keeps_hidden else None              # [b, D]

    def verify(self, seq: torch.Tensor, mask: torch.Tensor, draft: Draft, generator) -> Verified:
        """One target pass over the pending chain token and the tree's nodes after seq [b, S]."""
        tree, calls = draft.tree, self.kv.calls
        p_root = self.kv.probs[:, -1] if seq.shape[1] == self.kv.length else None    # [b, V]
        p_nodes = None
        if not tree.n and seq.shape[1] > self.kv.length:                 # no nodes (an AR step): AR's own pass
            p_root = self.kv.catch_up(seq, mask)                             # (a 2D mask, not the tree's 4D one)
        elif seq.shape[1] > self.kv.length or tree.n:
            on = tree.on(seq.device)                                         # the tree's tensors on the device
            p_chain, p_nodes = self.kv.forward_tree(seq, mask, draft.tokens, on.ancestors, on.depths)
            p_root = p_chain if p_chain is not None else p_root
        b = len(seq)
        slots = (mask.sum(), b * tree.n, b * (seq.shape[1] + tree.n))        # real before the nodes, nodes, all
        # a tree per row: its parents on the device (the greedy walk fetches them with the tokens, the
        # sampled one reads them there), and what the drafter asked back along the path
        links, bounds = (tree.parent, (tree.depth, tree.width)) if isinstance(tree, RowTrees) else (tree.children, None)
        own = isinstance(generator, RowDraws)                               # rows of their own: each its own depth
        n, nxt, nodes, host, carried = tree_accept(p_root, p_nodes, draft.q, draft.tokens, links, generator,
                                                   self.greedy, draft.carry, generator.limits if own else None, bounds)
        tokens = draft.tokens.gather(1, nodes) if tree.n else draft.tokens  # [b, depth]
        hidden = self.kv.hidden if self.kv.calls > calls else None          # [b, P + n, D]: a pass ran
        ok = finite_rows(p_root.unsqueeze(1), p_nodes, draft.q) if own else None   # rows of their own: checked
        return Verified(n, nxt, tokens, nodes, seq.shape[1], tree.n, slots, hidden=hidden,
                        host=HostVerdict(host, carried), ok=ok)

    def commit(self, acc: Accepted) -> torch.Tensor:
        """Keep the accepted path in the target cache; returns the mask [b, start + k]."""
        if self.kv.tree_len:
            self.kv.keep_tree(acc.nodes, acc.n)
        return self.kv.mask
