"""Draft trees verified with tree attention in one target pass (SpecInfer, Medusa, Sequoia, EAGLE-2).

A static tree is given by its branching factors per depth: ``(4, 2, 1)`` puts four candidates for
the next token, two under each of those, then one under each: 4 + 8 + 8 = 20 nodes, depth 3.
``(1, 1, 1, 1)`` is the chain of gamma 4. Nodes are numbered level by level, the children of one
parent next to each other.

The draft builds the tree with one forward pass per level (the nodes of a level together, each
seeing the prefix and its ancestors through a 4D mask); the target runs the pending token and the
whole tree in one pass; ``tree_accept`` walks it from the root. Afterwards both caches keep only
the accepted path, copied into place (``BatchedKVCacheModel.keep_tree``), with BASS's hole masking
where rows accepted paths of different lengths.

A dynamic tree (EAGLE-2, Li et al. 2024, arXiv 2406.16858), ``"dynamic:N:D:K"``, is grown anew every
step and for every row: D levels, one draft pass each over the K nodes of the level with the
highest cumulative draft probability (the product of q along the path), K children each; then the
N best nodes of all levels are kept. ``parse_tree`` reads either kind.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from functools import cached_property

import torch

from .kvcache_model import CacheSpec
from .parts import Accepted, CachedPart, Draft
from .utils import SamplingParams, children_of, to_device, tree_accept

NO_TREE_MASK = ("bloom",)    # model types whose attention cannot take a 4D mask (BLOOM: ALiBi from a 2D mask)
MAX_NODES = 256


@dataclass(frozen=True)
class TreeShape:
    paths: tuple[tuple[int, ...], ...]   # each node as its sibling ranks from the root, in level order

    @staticmethod
    def from_branching(branching) -> "TreeShape":
        """The tree with ``branching[d]`` children under every node of depth d."""
        paths, level = [], [()]
        for k in branching:
            level = [p + (j,) for p in level for j in range(k)]
            paths += level
        return _shape(tuple(paths))

    @staticmethod
    def parse(tree) -> "TreeShape":
        """A TreeShape from branching factors ("4,2,1", (4, 2, 1)) or rank paths (Medusa's and
        Sequoia's "choices": "paths:0,1,0.0" or [(0,), (1,), (0, 0)], a node's j-th child being the
        j-th candidate drawn under it); ValueError naming the bad value."""
        if isinstance(tree, TreeShape):
            return tree
        if isinstance(tree, str) and tree.strip().startswith("paths:"):
            try:
                paths = [tuple(int(r) for r in p.split(".")) for p in tree.strip()[6:].split(",") if p.strip()]
            except ValueError:
                raise ValueError(f"tree paths are dot-separated sibling ranks such as paths:0,1,0.0, got {tree!r}") from None
            return TreeShape.of_paths(paths, tree)
        if isinstance(tree, (list, tuple)) and tree and all(isinstance(p, (list, tuple)) for p in tree):
            return TreeShape.of_paths([tuple(p) for p in tree], tree)
        try:
            parts = tree.split(",") if isinstance(tree, str) else list(tree)
            branching = tuple(int(str(p).strip()) for p in parts)
        except (TypeError, ValueError):
            raise ValueError(f"tree must be branching factors per depth such as 4,2,1,1, got {tree!r}") from None
        if not branching or min(branching) < 1:
            raise ValueError(f"tree needs at least one depth and every branching factor >= 1, got {tree!r}")
        n = sum(math.prod(branching[:d + 1]) for d in range(len(branching)))
        if n > MAX_NODES:
            raise ValueError(f"tree {tree!r} has {n} nodes; at most {MAX_NODES} are allowed")
        return TreeShape.from_branching(branching)

    @staticmethod
    def of_paths(paths: list[tuple[int, ...]], given) -> "TreeShape":
        have = set(paths)
        if not paths or len(have) != len(paths) or len(paths) > MAX_NODES:
            raise ValueError(f"tree paths must be 1 to {MAX_NODES} distinct nodes, got {given!r}")
        for p in paths:
            if not p or min(p) < 0 or (len(p) > 1 and p[:-1] not in have) or (p[-1] and p[:-1] + (p[-1] - 1,) not in have):
                raise ValueError(f"tree paths: node {'.'.join(map(str, p))} needs its parent and its elder siblings "
                                 f"(ranks >= 0), got {given!r}")
        return _shape(tuple(sorted(paths, key=lambda p: (len(p), p))))

    @cached_property
    def branching(self) -> tuple[int, ...] | None:
        """Children per node at each depth when every node of a depth has as many; else None."""
        out, level = [], 1
        for lvl in self.levels:
            k, rem = divmod(len(lvl), level)
            if rem or TreeShape.from_branching(tuple(out) + (k,)).paths != self.paths[:lvl.stop]:
                return None
            out.append(k)
            level = len(lvl)
        return tuple(out)

    def __str__(self) -> str:
        if self.branching is not None:
            return ",".join(map(str, self.branching))
        return "paths:" + ",".join(".".join(map(str, p)) for p in self.paths)

    @property
    def depth(self) -> int:
        return len(self.paths[-1]) if self.paths else 0

    def truncated(self, depth: int) -> "TreeShape":
        """The first ``depth`` levels (a step the budget cuts short); the same object each time, so
        its structure is built once, not every step."""
        return self if depth >= self.depth else _shape(tuple(p for p in self.paths if len(p) <= max(0, depth)))

    @cached_property
    def levels(self) -> list[range]:
        """Node indices of each level."""
        out, start = [], 0
        for d in range(1, self.depth + 1):
            stop = start + sum(len(p) == d for p in self.paths[start:])
            out.append(range(start, stop))
            start = stop
        return out

    @property
    def n(self) -> int:
        return len(self.paths)

    @property
    def cache_slots(self) -> int:
        """Slots a step may add to a cache beyond the chain: its nodes."""
        return self.n

    @cached_property
    def parent(self) -> list[int]:
        """Parent of each node (-1: the root, i.e. the last token of the prefix)."""
        index = {p: i for i, p in enumerate(self.paths)}
        return [index[p[:-1]] if len(p) > 1 else -1 for p in self.paths]

    @cached_property
    def pick_lists(self) -> list[tuple[int, list[int], list[int]]]:
        """Per level: the most children any node of the level above has (k), and for each node of
        the level, the index of its parent within that level above and of itself in the parents'
        top-k candidates laid out [parents x k]."""
        out = []
        for d, lvl in enumerate(self.levels):
            above = self.levels[d - 1].start if d else -1
            up = [self.parent[i] - above if d else 0 for i in lvl]
            k = max(self.paths[i][-1] for i in lvl) + 1
            out.append((k, up, [u * k + self.paths[i][-1] for u, i in zip(up, lvl)]))
        return out

    def on(self, device) -> "ShapeOnDevice":
        """The shape's index tensors on ``device``, copied there once per shape and device (without
        making the host wait: ``to_device``) and kept, so that a step never copies host data to the
        device: on a GPU a plain ``.to(device)`` of a host tensor is followed by a stream
        synchronisation (the H200 counted 8 per step of the heads' chain, 10 of their tree)."""
        device = torch.device(device)
        if device not in self._on_device:
            self._on_device[device] = ShapeOnDevice(self, device)
        return self._on_device[device]

    @cached_property
    def _on_device(self) -> dict:
        return {}

    @cached_property
    def depth_list(self) -> list[int]:
        """Depth of each node below the root (1: a child of the prefix's last token)."""
        return [len(p) for p in self.paths]

    @cached_property
    def depths(self) -> torch.Tensor:
        """[n] ``depth_list`` as a tensor."""
        return torch.tensor(self.depth_list, dtype=torch.long)

    @cached_property
    def ancestor_lists(self) -> list[list[bool]]:
        """[n][n]: node j is node i or one of its ancestors."""
        anc = [[False] * self.n for _ in range(self.n)]
        for i in range(self.n):
            j = i
            while j >= 0:
                anc[i][j] = True
                j = self.parent[j]
        return anc

    @cached_property
    def ancestors(self) -> torch.Tensor:
        """[n, n] bool: node j is node i or one of its ancestors."""
        return torch.tensor(self.ancestor_lists, dtype=torch.bool).view(self.n, self.n)

    @cached_property
    def children(self) -> dict[int, list[int]]:
        """Children of each node, the root (-1) included, in rank order; leaves have none."""
        return children_of(self.parent)


class ShapeOnDevice:
    """A static tree's index tensors on one device (``TreeShape.on``): ``picks`` per level (k, up,
    pick) as ``TreeShape.pick_lists``, with up or pick None where it is the identity (nothing to
    gather: every level of a chain); ``ancestors`` [n, n] and ``depths`` [n]."""

    def __init__(self, shape: TreeShape, device: torch.device):
        self.picks = []                                               # made from host lists: nothing is read
        for d, (k, up, pick) in enumerate(shape.pick_lists):
            m = len(shape.levels[d - 1]) if d else 1                  # nodes of the level above
            self.picks.append((k, None if up == list(range(m)) else to_device(up, device),
                               None if pick == list(range(m * k)) else to_device(pick, device)))
        self.ancestors = to_device(shape.ancestor_lists, device, torch.bool).view(shape.n, shape.n)   # [n, n]
        self.depths = to_device(shape.depth_list, device)                                            # [n]


@functools.lru_cache(maxsize=None)
def _shape(paths: tuple[tuple[int, ...], ...]) -> TreeShape:
    return TreeShape(paths)


@dataclass(frozen=True)
class DynamicTree:
    n: int             # draft tokens kept per step and row (N)
    depth: int         # levels drafted, one draft pass each (D)
    k: int             # nodes expanded per level, and children drawn under each (K)
    sharpen: float = 1.0   # candidates are ranked by q ** sharpen, renormalised (1: q itself, as EAGLE-2)

    DEFAULT_DEPTH, DEFAULT_K = 5, 4

    @property
    def cache_slots(self) -> int:
        """Slots a step may add to a cache beyond the chain: the kept nodes, and the draft's levels of K."""
        return self.n + self.depth * self.k

    @staticmethod
    def parse(tree: str) -> "DynamicTree":
        """"dynamic:N[:D[:K[:S]]]"; ValueError naming the bad value."""
        parts = tree.split(":")[1:]
        try:
            nums = [int(x) for x in parts[:3]] + [float(x) for x in parts[3:]]
        except ValueError:
            nums = []
        if not 1 <= len(nums) <= 4:
            raise ValueError(f"a dynamic tree is dynamic:N[:D[:K[:S]]] with integers N, D, K and a number S, "
                             f"got {tree!r}")
        n = nums[0]
        d = nums[1] if len(nums) > 1 else min(n, DynamicTree.DEFAULT_DEPTH)
        k = nums[2] if len(nums) > 2 else min(n, DynamicTree.DEFAULT_K)
        sharpen = nums[3] if len(nums) > 3 else 1.0
        if not (1 <= n <= MAX_NODES and 1 <= d <= n and 1 <= k <= n and 0 < sharpen <= 100):
            raise ValueError(f"dynamic tree {tree!r}: need 1 <= N <= {MAX_NODES} draft tokens, 1 <= D <= N levels, "
                             f"1 <= K <= N children and 0 < S <= 100")
        shape = DynamicTree(n, d, k, sharpen)
        if shape.pool(d) < n:
            raise ValueError(f"dynamic tree {tree!r}: D={d} levels of K={k} hold {shape.pool(d)} candidates, "
                             f"fewer than N={n}; raise D or K")
        return shape

    def __str__(self) -> str:
        return f"dynamic:{self.n}:{self.depth}:{self.k}" + (f":{self.sharpen:g}" if self.sharpen != 1 else "")

    def pool(self, depth: int) -> int:
        """Candidates drafted in ``depth`` levels: K at the first, K x K below it."""
        return self.k + max(0, depth - 1) * self.k * self.k


def parse_tree(tree):
    """A static TreeShape ("4,2,1", (4, 2, 1), "paths:0,1,0.0") or a DynamicTree ("dynamic:N[:D[:K[:S]]]")."""
    if isinstance(tree, (TreeShape, DynamicTree)):
        return tree
    if isinstance(tree, str) and tree.strip().startswith("dynamic"):
        return DynamicTree.parse(tree.strip())
    return TreeShape.parse(tree)


@dataclass
class RowTrees:
    """One step's dynamic trees, one per row, each of ``n`` nodes in level order (parents first,
    siblings in the order they were drawn)."""
    n: int                          # nodes per row
    depth: int                      # levels
    parent: torch.Tensor            # [b, n] each node's parent (-1: the root)
    depths: torch.Tensor            # [b, n] depth below the root, 1 for the root's children
    fed: torch.Tensor               # [b, n] the node's slot in the draft's tree cache, -1: not fed

    def on(self, device) -> "RowTrees":
        """Itself: made on the device already (as ``TreeShape.on``)."""
        return self

    @cached_property
    def ancestors(self) -> torch.Tensor:
        """[b, n, n] bool: node j is node i or one of its ancestors."""
        b, n = self.parent.shape
        hop = torch.zeros(b, n, n + 1, device=self.parent.device)
        hop.scatter_(2, (self.parent % (n + 1)).unsqueeze(-1), 1.0)      # the root (-1) goes to column n
        hop = hop[..., :n]                                               # [b, n, n] one step up
        anc = reach = torch.eye(n, device=self.parent.device).expand(b, n, n)
        for _ in range(self.depth - 1):
            reach = reach @ hop
            anc = anc + reach
        return anc > 0


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

    role = "draft"

    def __init__(self, model, params: SamplingParams, vocab: int | None, shape: TreeShape,
                 cache: CacheSpec = CacheSpec()):
        check_tree_model(model, "draft")
        rank = SamplingParams(temperature=1.0, repetition_penalty=params.repetition_penalty) if params.greedy else params
        super().__init__(model, rank, vocab, cache)
        self._greedy = params.greedy                    # the caller's, not the ranking cache's
        self.shape = shape
        self.cached = 0                                  # levels of this step's tree in the draft cache

    @property
    def greedy(self) -> bool:
        return self._greedy

    def propose(self, seq: torch.Tensor, mask: torch.Tensor, g: int, generator) -> Draft:
        tree = self.shape.truncated(g)
        self.cached = 0
        if not tree.n:
            return Draft(seq[:, :0], None, tree)
        dists = self.kv.catch_up(seq, mask).unsqueeze(1)                     # [b, 1, V] the root's q
        on = tree.on(seq.device)                                             # its index tensors, on the device
        tokens, qs = [], []
        for d, (k, up, pick) in enumerate(on.picks):
            b, m = dists.shape[:2]
            top = (dists if self.greedy else gumbel_keys(dists, generator)).topk(k, dim=-1).indices.view(b, m * k)
            kids = top if pick is None else top[:, pick]                     # [b, w] each node's rank under its parent
            tokens.append(kids)                                              # [b, w], w nodes in the level
            if not self.greedy:
                qs.append(dists if up is None else dists[:, up])             # [b, w, V] the parents' laws
            if d + 1 < tree.depth:                                           # the last level is not fed
                lvl = tree.levels[d]
                dists = self.kv.forward_tree(seq, mask, kids, on.ancestors[lvl.start:lvl.stop, :lvl.stop],
                                             on.depths[lvl.start:lvl.stop])[1]   # [b, m * k, V]
                self.cached += 1
        return Draft(torch.cat(tokens, 1), None if self.greedy else torch.cat(qs, 1), tree)

    def commit(self, acc) -> None:
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
    q is flatter than its agreement with the target (``benchmark.tree_fit`` measures both and
    prints the S that matches them) otherwise makes trees too wide and too shallow.
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
            kids = top.indices if self.greedy else gumbel_keys(flat, generator).topk(K, dim=-1).indices
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
            rows = anc[:, :T + 1, :T]                                        # [b, T + 1, T]; row T (the root's) is empty
            allow = torch.cat([rows.gather(1, (up % (T + 1)).unsqueeze(-1).expand(b, K, T)), eye], 2)   # [b, K, T + K]
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
        tree = RowTrees(n, depth, parent, levels[:P].expand(b, -1).gather(1, keep), fed[:, :P].gather(1, keep))
        q = None if self.greedy else torch.cat(qs, 1).gather(1, keep.unsqueeze(-1).expand(b, n, qs[0].shape[-1]))
        self._tree = tree
        return Draft(torch.cat(toks, 1).gather(1, keep), q, tree)            # tokens [b, n], q [b, n, V]

    def commit(self, acc) -> None:
        """Keep the accepted path's nodes that went through the draft, as far as every row's path
        has them (a row's last node may not have been fed; it is fed with the next step)."""
        if self.kv.tree_len:
            slots = self._tree.fed.gather(1, acc.nodes) if acc.nodes.shape[1] else acc.nodes   # [b, n_max]
            # on the host (the walk brought the path's slots): the columns every row's path has fed
            keep = min([next((j for j, s in enumerate(fed[:len(t) - 1]) if s < 0), slots.shape[1])
                        for fed, t in zip(acc.carried, acc.taken)])
            self.kv.keep_tree(slots[:, :keep].clamp(min=0), acc.n.clamp(max=keep))


class TreeVerifier(CachedPart):
    """The target runs the pending token and the whole tree in one pass; ``tree_accept`` keeps the
    longest path it agrees with (greedy) or walks it as Sequoia does (siblings without replacement)."""

    def __init__(self, model, params: SamplingParams, vocab: int | None = None, cache: CacheSpec = CacheSpec()):
        check_tree_model(model, "target")
        super().__init__(model, params, vocab, cache)

    def verify(self, seq: torch.Tensor, mask: torch.Tensor, draft: Draft, generator):
        tree = draft.tree
        p_root = self.kv.probs[:, -1] if seq.shape[1] == self.kv.length else None    # [b, V]
        if seq.shape[1] > self.kv.length or tree.n:
            on = tree.on(seq.device)                                         # the tree's tensors on the device
            p_chain, p_nodes = self.kv.forward_tree(seq, mask, draft.tokens, on.ancestors, on.depths)
            p_root = p_chain if p_chain is not None else p_root
        else:
            p_nodes = None
        b = len(seq)
        self.padding = (mask.sum(), b * tree.n, b * (seq.shape[1] + tree.n))   # real slots: device count + nodes
        # a tree per row: its parents on the device, read by the walk with the tokens (one transfer)
        # and which nodes the dynamic drafter fed, which its commit needs on the host
        links, fed = (tree.parent, tree.fed) if isinstance(tree, RowTrees) else (tree.children, None)
        n, nxt, nodes, host, fed = tree_accept(p_root, p_nodes, draft.q, draft.tokens, links, generator, self.greedy, fed)
        tokens = draft.tokens.gather(1, nodes) if tree.n else draft.tokens  # [b, depth]
        return Accepted(n, nxt, tokens, nodes, seq.shape[1], host, carried=fed)

    def commit(self, acc) -> torch.Tensor:
        """Keep the accepted path in the target cache; returns the mask [b, start + n_max]."""
        if self.kv.tree_len:
            self.kv.keep_tree(acc.nodes, acc.n)
        return self.kv.mask
