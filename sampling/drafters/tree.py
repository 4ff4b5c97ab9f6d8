"""A draft model drafting trees: a static tree level by level (Sequoia's siblings without
replacement when sampling), or a dynamic tree per row (EAGLE-2), each level one draft pass with tree
attention (``sampling.cache.tree``)."""
from __future__ import annotations

import torch

from ..cache.part import CachedPart
from ..cache.spec import CacheSpec
from ..contracts import Accepted, Draft, StepWork
from ..params import RowParams, SamplingParams, gumbel_keys, keyed
from ..tree_shapes import RowTrees, TreeShape, _shape
from ..utils import to_device
from ..verify.tree import check_tree_model


def draft_levels(tree: TreeShape, root: torch.Tensor, on, greedy: bool, generator, expand
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A static tree drafted level by level from the root's law root [b, 1, V]: each node's children
    are the top-k of its law (greedy) or k draws from it without replacement (sampling), so siblings
    differ either way. ``on``: the tree's index tensors on the device (``TreeShape.on``);
    ``expand(d, kids, up)`` returns the laws after the nodes kids [b, w] of level d [b, w, V] (``up``:
    each node's parent within the level above, None for the identity). Returns the tokens [b, n] in
    level order and, sampling, the law each was drawn from [b, n, V]."""
    tokens, qs, dists = [], [], root
    for d, (k, up, pick) in enumerate(on.picks):
        b, m = dists.shape[:2]
        keys = dists if greedy else gumbel_keys(dists, keyed(generator, "level", d))       # [b, m, V]
        top = keys.topk(k, dim=-1).indices.view(b, m * k)
        kids = top if pick is None else top[:, pick]                         # [b, w] each node's rank under its parent
        tokens.append(kids)                                                  # [b, w], w nodes in the level
        if not greedy:
            qs.append(dists if up is None else dists[:, up])                 # [b, w, V] the parents' laws
        if d + 1 < tree.depth:                                               # the last level is not fed
            dists = expand(d, kids, up)
    return torch.cat(tokens, 1), None if greedy else torch.cat(qs, 1)


class TreeDrafter(CachedPart):
    """The draft model drafts a static tree, one forward pass per level. Sampling: the children of
    a node are drawn from its q without replacement (Sequoia); greedy: they are the k most likely
    tokens of the draft at temperature 1 (other filters as given). Siblings differ either way."""

    role = "draft"
    reads_target = False
    max_draft = None

    def __init__(self, model, params: SamplingParams | RowParams, vocab: int | None, shape: TreeShape,
                 cache: CacheSpec = CacheSpec()):
        check_tree_model(model, "draft")
        rank = SamplingParams(temperature=1.0, repetition_penalty=params.repetition_penalty) \
            if params.greedy else params
        super().__init__(model, rank, vocab, cache)
        self._greedy = params.greedy                    # the caller's, not the ranking cache's
        self.shape = shape
        self.cached = 0                                  # levels of this step's tree in the draft cache

    @property
    def greedy(self) -> bool:
        return self._greedy

    def prefill(self, input_ids: torch.Tensor, mask: torch.Tensor, hidden: torch.Tensor | None = None) -> None:
        """Deferred to the first tree (``KVCacheModel.defer``), as a chain's."""
        self.kv.defer(input_ids, mask)

    def propose(self, seq: torch.Tensor, mask: torch.Tensor, g: int, generator) -> Draft:
        """The tree cut to g levels after seq [b, S] (mask [b, S]), one draft pass per level but the last."""
        tree = self.shape.truncated(g)
        self.cached = 0
        if not tree.n:
            return Draft(seq[:, :0], None, tree)
        on = tree.on(seq.device)                                             # its index tensors, on the device

        def expand(d: int, kids: torch.Tensor, up) -> torch.Tensor:          # level d's nodes through the draft
            lvl = tree.levels[d]
            self.cached += 1
            return self.kv.forward_tree(seq, mask, kids, on.ancestors[lvl.start:lvl.stop, :lvl.stop],
                                        on.depths[lvl.start:lvl.stop])[1]   # [b, m * k, V]

        root = self.kv.catch_up(seq, mask).unsqueeze(1)                      # [b, 1, V] the root's q
        tokens, q = draft_levels(tree, root, on, self.greedy, generator, expand)
        return Draft(tokens, q, tree)

    def work(self, g: int) -> StepWork:
        """The root's pass and one per level but the last, as wide as the level; a verify pass of
        the tree's nodes + 1."""
        tree = self.shape.truncated(g)
        return StepWork(tree.pass_widths, tree.n + 1)

    def commit(self, acc: Accepted) -> None:
        """Keep the accepted path's nodes that went through the draft (all but the last level)."""
        if self.kv.tree_len:
            keep = min(acc.nodes.shape[1], self.cached)
            self.kv.keep_tree(acc.nodes[:, :keep], acc.n.clamp(max=keep))


class DynamicTreeDrafter(TreeDrafter):
    """The draft model grows a dynamic tree per row (EAGLE-2), one forward pass per level.

    Every candidate child has a score, the log of the cumulative draft probability along its path;
    each level the K best candidates are expanded (fed to the draft, K children each), and at the
    end the N best of all candidates are kept. A candidate's score is its parent's plus the log of
    the j-th largest probability of the parent's q, j its rank among its siblings: under greedy the
    children are the K most likely tokens, so that is their own probability; under sampling they
    are K draws without replacement and the scores depend on no draw, so whether a node keeps its
    j-th child is decided before that child is drawn (tree_accept's rule stays exact). Ties keep
    the candidate made first, so a kept node's parent and elder siblings are kept too.
    ``sharpen`` S ranks by q ** S renormalised instead (the draws still come from q): a draft whose
    q is flatter than its agreement with the target (``benchmark.studies.tree_fit`` measures both
    and prints the S that matches them) otherwise makes trees too wide and too shallow.
    """

    def propose(self, seq: torch.Tensor, mask: torch.Tensor, g: int, generator) -> Draft:
        spec = self.shape
        depth = min(spec.depth, g)
        self.cached = 0
        if depth <= 0:
            return Draft(seq[:, :0], None, _shape(()))
        b, dev, K = len(seq), seq.device, spec.k
        dists = self.kv.catch_up(seq, mask).unsqueeze(1)                     # [b, 1, V] the root's q
        f_score = torch.zeros(b, 1, device=dev)                              # [b, m] frontier scores
        f_pool = torch.full((b, 1), -1, device=dev)                          # [b, m] frontier in the pool
        f_cache = f_pool                                                     # [b, m] frontier in the cache
        # what every level reuses, made once: the pool's sizes are known on the host (the root's K
        # children, then K x K a level), so is each candidate's level
        sizes = [K] + [K * K] * (depth - 1)                                  # candidates made per level
        fed = torch.full((b, sum(sizes)), -1, device=dev)                    # [b, P] a candidate's slot in the cache
        levels = to_device([d + 1 for d, s in enumerate(sizes) for _ in range(s)], dev)   # [P]
        anc = torch.zeros(b, K * (depth - 1) + 1, K * (depth - 1), dtype=torch.bool, device=dev)  # fed nodes' ancestry
        eye, ar_k = torch.eye(K, dtype=torch.bool, device=dev).expand(b, K, K), torch.arange(K, device=dev)
        toks, scores, parents, qs = [], [], [], []
        for d in range(depth):
            m, V = dists.shape[1], dists.shape[2]
            flat = dists.reshape(b * m, V)
            rank = flat if spec.sharpen == 1 else (flat.log() * spec.sharpen).softmax(-1)
            top = rank.topk(K, dim=-1)                                       # the K largest, sorted
            kids = top.indices if self.greedy else \
                gumbel_keys(dists, keyed(generator, "level", d)).reshape(b * m, V).topk(K, dim=-1).indices
            base = sum(t.shape[1] for t in toks)
            toks.append(kids.view(b, m * K))                                 # [b, m * K]
            score = f_score.unsqueeze(-1) + top.values.view(b, m, K).clamp(max=1).log()
            scores.append(score.view(b, m * K))                              # [b, m * K]
            parents.append(f_pool.unsqueeze(2).expand(b, m, K).reshape(b, m * K))   # [b, m * K]
            if not self.greedy:
                qs.append(dists.unsqueeze(2).expand(b, m, K, V).reshape(b, m * K, V))   # [b, m * K, V] the parents' q
            if d + 1 == depth:                                               # the last level is not fed
                break
            # expand the K best candidates of this level: one draft pass with their ancestry
            order = torch.sort(-scores[-1], dim=1, stable=True).indices[:, :K]   # [b, K]
            T = K * d                                                        # nodes fed so far
            up = f_cache.unsqueeze(2).expand(b, m, K).reshape(b, m * K).gather(1, order)   # [b, K] parents' slots
            rows = anc[:, :T + 1, :T]                                        # [b, T + 1, T]; row T (root's): empty
            allow = torch.cat([rows.gather(1, (up % (T + 1)).unsqueeze(-1).expand(b, K, T)), eye], 2)  # [b, K, T + K]
            f_tok, f_score, f_pool = toks[-1].gather(1, order), scores[-1].gather(1, order), base + order
            f_cache = T + ar_k.expand(b, K)
            fed[:, base:base + m * K].scatter_(1, order, f_cache)
            anc[:, T:T + K, :T + K] = allow                                  # [b, T + K, T + K] filled
            dists = self.kv.forward_tree(seq, mask, f_tok, allow, levels[base:base + 1].expand(K))[1]
            self.cached += 1
        # keep the N best candidates, in the order they were made (parents before children)
        score, P = torch.cat(scores, 1), sum(t.shape[1] for t in toks)       # [b, P]
        n = min(spec.n, P)
        keep = torch.sort(-score, dim=1, stable=True).indices[:, :n].sort(dim=1).values  # [b, n]
        new_index = torch.full((b, P + 1), -1, device=dev)
        new_index.scatter_(1, keep, torch.arange(n, device=dev).expand(b, n))
        parent = new_index.gather(1, torch.cat(parents, 1).gather(1, keep) % (P + 1))   # [b, n], -1: root
        tree = RowTrees(n, depth, parent, levels[:P].expand(b, -1).gather(1, keep), fed[:, :P].gather(1, keep), K)
        q = None if self.greedy else torch.cat(qs, 1).gather(1, keep.unsqueeze(-1).expand(b, n, qs[0].shape[-1]))
        self._tree = tree
        return Draft(torch.cat(toks, 1).gather(1, keep), q, tree, carry=tree.fed)   # tokens [b, n], q [b, n, V]

    def work(self, g: int) -> StepWork:
        """The root's pass and one of K nodes per level but the last; a verify pass of the N best
        candidates (or all those drafted, when fewer) + 1."""
        depth = min(self.shape.depth, g)
        if depth <= 0:
            return StepWork((), 1)
        return StepWork((1,) + (self.shape.k,) * (depth - 1), min(self.shape.n, self.shape.pool(depth)) + 1)

    def commit(self, acc: Accepted) -> None:
        """Keep the accepted path's nodes that went through the draft, as far as every row's path
        has them (a row's last node may not have been fed; it is fed with the next step)."""
        if self.kv.tree_len:
            slots = self._tree.fed.gather(1, acc.nodes) if acc.nodes.shape[1] else acc.nodes   # [b, n_max]
            # on the host (the walk brought the path's slots, Draft.carry): the columns every row's path has fed
            keep = min([next((j for j, s in enumerate(fed[:len(t) - 1]) if s < 0), slots.shape[1])
                        for fed, t in zip(acc.carried, acc.taken)])
            self.kv.keep_tree(slots[:, :keep].clamp(min=0), acc.n.clamp(max=keep))


