"""Draft trees verified with tree attention in one target pass (SpecInfer, Medusa, Sequoia).

A static tree is given by its branching factors per depth: ``(4, 2, 1)`` puts four candidates for
the next token, two under each of those, then one under each: 4 + 8 + 8 = 20 nodes, depth 3.
``(1, 1, 1, 1)`` is the chain of gamma 4. Nodes are numbered level by level, the children of one
parent next to each other.

The draft builds the tree with one forward pass per level (the nodes of a level together, each
seeing the prefix and its ancestors through a 4D mask); the target runs the pending token and the
whole tree in one pass; ``tree_accept`` walks it from the root. Afterwards both caches keep only
the accepted path, copied into place (``BatchedKVCacheModel.keep_tree``), with BASS's hole masking
where rows accepted paths of different lengths.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from functools import cached_property

import torch

from .parts import Accepted, CachedPart, Draft
from .utils import SamplingParams, tree_accept

NO_TREE_MASK = ("bloom",)    # model types whose attention cannot take a 4D mask (BLOOM: ALiBi from a 2D mask)
MAX_NODES = 256


@dataclass(frozen=True)
class TreeShape:
    branching: tuple[int, ...]    # children per node at each depth

    @staticmethod
    def parse(tree) -> "TreeShape":
        """A TreeShape from "4,2,1", (4, 2, 1) or a TreeShape; ValueError naming the bad value."""
        if isinstance(tree, TreeShape):
            shape = tree
        else:
            try:
                parts = tree.split(",") if isinstance(tree, str) else list(tree)
                shape = TreeShape(tuple(int(str(p).strip()) for p in parts))
            except (TypeError, ValueError):
                raise ValueError(f"tree must be branching factors per depth such as 4,2,1,1, got {tree!r}") from None
        if not shape.branching or min(shape.branching) < 1:
            raise ValueError(f"tree needs at least one depth and every branching factor >= 1, got {tree!r}")
        if shape.n > MAX_NODES:
            raise ValueError(f"tree {tree!r} has {shape.n} nodes; at most {MAX_NODES} are allowed")
        return shape

    def __str__(self) -> str:
        return ",".join(map(str, self.branching))

    @property
    def depth(self) -> int:
        return len(self.branching)

    def truncated(self, depth: int) -> "TreeShape":
        """The first ``depth`` levels (a step the budget cuts short); the same object each time, so
        its structure is built once, not every step."""
        return self if depth >= self.depth else _shape(self.branching[:max(0, depth)])

    @cached_property
    def levels(self) -> list[range]:
        """Node indices of each level."""
        out, start, width = [], 0, 1
        for k in self.branching:
            width *= k
            out.append(range(start, start + width))
            start += width
        return out

    @property
    def n(self) -> int:
        return self.levels[-1].stop if self.branching else 0

    @cached_property
    def parent(self) -> list[int]:
        """Parent of each node (-1: the root, i.e. the last token of the prefix)."""
        out = []
        for d, (lvl, k) in enumerate(zip(self.levels, self.branching)):
            out += [-1 if d == 0 else self.levels[d - 1][i // k] for i in range(len(lvl))]
        return out

    @cached_property
    def depths(self) -> torch.Tensor:
        """[n] depth of each node below the root (1: a child of the prefix's last token)."""
        return torch.tensor([d + 1 for d, lvl in enumerate(self.levels) for _ in lvl], dtype=torch.long)

    @cached_property
    def ancestors(self) -> torch.Tensor:
        """[n, n] bool: node j is node i or one of its ancestors."""
        anc = torch.zeros(self.n, self.n, dtype=torch.bool)
        for i in range(self.n):
            j = i
            while j >= 0:
                anc[i, j] = True
                j = self.parent[j]
        return anc

    @cached_property
    def children(self) -> dict[int, list[int]]:
        """Children of each node, the root (-1) included; leaves have none."""
        out = {-1: []}
        for i, p in enumerate(self.parent):
            out.setdefault(p, []).append(i)
            out.setdefault(i, [])
        return out


@functools.lru_cache(maxsize=None)
def _shape(branching: tuple[int, ...]) -> TreeShape:
    return TreeShape(branching)


def check_tree_model(model, role: str) -> None:
    kind = model.config.model_type
    if kind in NO_TREE_MASK:
        raise ValueError(f"mode 'tree' needs a model that takes a 4D attention mask; the {role} is {kind}, which "
                         f"does not (its ALiBi bias comes from a 2D mask)")


def gumbel_keys(q: torch.Tensor, generator) -> torch.Tensor:
    """log q + Gumbel noise [N, V]: the top k of these keys, in order, are k draws from q without
    replacement (each from q renormalised without the ones before); tokens with q = 0 come last."""
    u = torch.rand(q.shape, generator=generator, device=q.device, dtype=q.dtype).clamp(min=torch.finfo(q.dtype).tiny)
    return q.log() - (-u.log()).log()


class TreeDrafter(CachedPart):
    """The draft model drafts a static tree, one forward pass per level. Sampling: the children of
    a node are drawn from its q without replacement (Sequoia); greedy: they are the k most likely
    tokens of the draft at temperature 1 (other filters as given). Siblings differ either way."""

    def __init__(self, model, params: SamplingParams, vocab: int | None, shape: TreeShape):
        check_tree_model(model, "draft")
        rank = SamplingParams(temperature=1.0, repetition_penalty=params.repetition_penalty) if params.greedy else params
        super().__init__(model, rank, vocab)
        self.greedy = params.greedy
        self.shape = shape
        self.cached = 0                                  # levels of this step's tree in the draft cache

    def propose(self, seq: torch.Tensor, mask: torch.Tensor, g: int, generator) -> Draft:
        tree = self.shape.truncated(g)
        self.cached = 0
        if not tree.n:
            return Draft(seq[:, :0], None, tree)
        dists = self.kv.catch_up(seq, mask).unsqueeze(1)                     # [b, 1, V] the root's q
        tokens, qs = [], []
        for d, k in enumerate(tree.branching):
            b, m, V = dists.shape
            flat = dists.reshape(b * m, V)
            kids = (flat if self.greedy else gumbel_keys(flat, generator)).topk(k, dim=-1).indices.view(b, m * k)
            tokens.append(kids)                                              # [b, m * k]
            qs.append(dists.repeat_interleave(k, dim=1))                     # [b, m * k, V]
            if d + 1 < tree.depth:                                           # the last level is not fed
                lvl = tree.levels[d]
                dists = self.kv.forward_tree(seq, mask, kids, tree.ancestors[lvl.start:lvl.stop, :lvl.stop],
                                             tree.depths[lvl.start:lvl.stop])[1]   # [b, m * k, V]
                self.cached += 1
        return Draft(torch.cat(tokens, 1), None if self.greedy else torch.cat(qs, 1), tree)

    def commit(self, acc) -> None:
        """Keep the accepted path's nodes that went through the draft (all but the last level)."""
        if self.kv.tree_len:
            keep = min(acc.nodes.shape[1], self.cached)
            self.kv.keep_tree(acc.nodes[:, :keep], acc.n.clamp(max=keep))


class TreeVerifier(CachedPart):
    """The target runs the pending token and the whole tree in one pass; ``tree_accept`` keeps the
    longest path it agrees with (greedy) or walks it as Sequoia does (siblings without replacement)."""

    def __init__(self, model, params: SamplingParams, vocab: int | None = None):
        check_tree_model(model, "target")
        super().__init__(model, params, vocab)

    def verify(self, seq: torch.Tensor, mask: torch.Tensor, draft: Draft, generator):
        tree = draft.tree
        p_root = self.kv.probs[:, -1] if seq.shape[1] == self.kv.length else None    # [b, V]
        if seq.shape[1] > self.kv.length or tree.n:
            p_chain, p_nodes = self.kv.forward_tree(seq, mask, draft.tokens, tree.ancestors, tree.depths)
            p_root = p_chain if p_chain is not None else p_root
        else:
            p_nodes = None
        b = len(seq)
        self.padding = 1.0 - (mask.sum().item() + b * tree.n) / (b * (seq.shape[1] + tree.n))
        n, nxt, nodes = tree_accept(p_root, p_nodes, draft.q, draft.tokens, tree.children, generator, self.greedy)
        tokens = draft.tokens.gather(1, nodes) if tree.n else draft.tokens  # [b, depth]
        return Accepted(n, nxt, tokens, nodes, seq.shape[1])

    def commit(self, acc) -> torch.Tensor:
        """Keep the accepted path in the target cache; returns the mask [b, start + n_max]."""
        if self.kv.tree_len:
            self.kv.keep_tree(acc.nodes, acc.n)
        return self.kv.mask
