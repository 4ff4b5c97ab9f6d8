"""The shapes of draft trees (SpecInfer, Medusa, Sequoia, EAGLE-2): static trees, dynamic trees, and
the index tensors that tree attention and the tree walk read.

A static tree is given by its branching factors per depth: ``(4, 2, 1)`` puts four candidates for
the next token, two under each of those, then one under each: 4 + 8 + 8 = 20 nodes, depth 3.
``(1, 1, 1, 1)`` is the chain of gamma 4. Nodes are numbered level by level, the children of one
parent next to each other.

The draft builds the tree with one forward pass per level (``sampling.drafters.tree``); the target
runs the pending token and the whole tree in one pass and ``tree_accept`` walks it from the root
(``sampling.verify``); both caches then keep only the accepted path (``sampling.cache.tree``).

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

from .utils import to_device

MAX_NODES = 256


@dataclass(frozen=True)
class TreeShape:
    paths: tuple[tuple[int, ...], ...]   # each node as its sibling ranks from the root, in level order

    @staticmethod
    def from_branching(branching) -> TreeShape:
        """The tree with ``branching[d]`` children under every node of depth d."""
        paths, level = [], [()]
        for k in branching:
            level = [p + (j,) for p in level for j in range(k)]
            paths += level
        return _shape(tuple(paths))

    @staticmethod
    def parse(tree) -> TreeShape:
        """A TreeShape from branching factors ("4,2,1", (4, 2, 1)) or rank paths (Medusa's and
        Sequoia's "choices": "paths:0,1,0.0" or [(0,), (1,), (0, 0)], a node's j-th child being the
        j-th candidate drawn under it); ValueError naming the bad value."""
        if isinstance(tree, TreeShape):
            return tree
        if isinstance(tree, str) and tree.strip().startswith("paths:"):
            try:
                paths = [tuple(int(r) for r in p.split(".")) for p in tree.strip()[6:].split(",") if p.strip()]
            except ValueError:
                raise ValueError(f"tree paths are dot-separated sibling ranks such as paths:0,1,0.0, "
                                 f"got {tree!r}") from None
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
    def of_paths(paths: list[tuple[int, ...]], given) -> TreeShape:
        have = set(paths)
        if not paths or len(have) != len(paths) or len(paths) > MAX_NODES:
            raise ValueError(f"tree paths must be 1 to {MAX_NODES} distinct nodes, got {given!r}")
        for p in paths:
            orphan = len(p) > 1 and p[:-1] not in have                    # its parent is missing
            if not p or min(p) < 0 or orphan or (p[-1] and p[:-1] + (p[-1] - 1,) not in have):
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

    def truncated(self, depth: int) -> TreeShape:
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

    @cached_property
    def pass_widths(self) -> tuple[int, ...]:
        """Rows of each draft pass that drafts this tree: the root's (1), then one per level but the
        last, as wide as the level it drafts from (``Drafter.work``); () for an empty tree."""
        return (1,) + tuple(len(self.levels[d]) for d in range(self.depth - 1)) if self.n else ()

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

    def on(self, device) -> ShapeOnDevice:
        """The shape's index tensors on ``device``, copied there once per shape and device (without
        making the host wait: ``to_device``) and kept, so that a step never copies host data to the
        device: on a GPU a plain ``.to(device)`` of a host tensor is followed by a stream
        synchronisation."""
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


@functools.cache
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
    def parse(tree: str) -> DynamicTree:
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
    width: int                      # the most children under one node (K)

    def on(self, device) -> RowTrees:
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


def children_of(parent: list[int]) -> dict[int, list[int]]:
    """Each node's children in order (-1 is the root; leaves have none), from each node's parent."""
    out = {-1: []}
    for i, u in enumerate(parent):
        out.setdefault(u, []).append(i)
        out.setdefault(i, [])
    return out
