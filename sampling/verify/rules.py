"""The exactness rules every verifier applies (Leviathan et al. 2023, Chen et al. 2023, Sequoia):
accept each draft with probability min(1, p / q), after a rejection draw from the residual
norm(max(0, p - q)), after a fully accepted chain from p itself; a tree is walked node by node with
its siblings drawn without replacement. Pure functions of tensors, shared by every mode.

Names follow the papers: ``p`` is the target model's distribution, ``q`` the draft's.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..params import RowDraws, keyed, sample, uniform
from ..tree_shapes import children_of
from ..utils import to_device


def max_fn(x: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    """norm(max(0, x)) over the last dim; rows with no positive mass (p == q) take ``fallback``."""
    x = x.clamp(min=0)
    total = x.sum(-1, keepdim=True)
    return torch.where(total > 0, x / total.clamp(min=torch.finfo(x.dtype).tiny), fallback)


def accept_reject(p: torch.Tensor, q: torch.Tensor | None, x: torch.Tensor,
                  generator: torch.Generator | RowDraws | None = None, sequential: bool = False,
                  greedy: bool = False, limit: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Speculative rejection sampling for a batch of rows (Leviathan et al. 2023, Chen et al. 2023).

    p: [B, g + 1, V] target probabilities at the g draft positions and the bonus position
    q: [B, g, V]     draft probabilities the draft tokens were sampled from (None: each draft
                     was certain, q one-hot on it: deterministic drafters)
    x: [B, g]        draft tokens
    Returns n [B], how many drafts each row accepts, and next [B], the token that follows them:
    a draw from norm(max(0, p_n - q_n)) after a rejection, or from p_g when all g are accepted.
    ``sequential`` tests the drafts one by one as in Chen et al.'s Algorithm 2 (a uniform per
    draft; a row stops at its first rejection; the loop does not stop early when every row has,
    which would read the device on the host once per draft); otherwise all g uniforms are drawn
    at once and n is the first rejection (Leviathan et al.). Both give the same law.
    ``greedy``: every row of p is one-hot on the target's argmax t (temperature 0; or p is the
    target's logits, ``norm_logits(law=False)``, and only t is read); whatever q is,
    a draft is then accepted exactly when it is t (p_x / q_x is 0, or >= 1) and the residual
    max(0, p_n - q_n) is one-hot on t (or empty, and its fallback p_n is), so the rule reduces to
    comparing tokens, with no uniform drawn. ``limit`` [B]: a row's own draft length (its drafts
    past it are not tested, and after ``limit`` accepted drafts its next token is p's bonus), as if
    it had drafted only that many; ``generator``: one for the batch, or each row's (``RowDraws``).
    """
    B, g = x.shape
    if greedy:
        t = p.argmax(-1)                                            # [B, g + 1] the target's tokens
        n = (x == t[:, :g]).long().cumprod(-1).sum(-1)              # [B] first disagreement
        if limit is not None:
            n = torch.minimum(n, limit)
        return n, t.gather(1, n.unsqueeze(1)).squeeze(1)            # the target's token after the prefix
    if not g:                                                       # a plain AR step: q_n is the zero bonus row,
        return x.new_zeros(B), sample(max_fn(p[:, 0], fallback=p[:, 0]), keyed(generator, "residual"))  # the law p
    if q is None:
        q = F.one_hot(x, p.shape[-1]).to(p.dtype)                   # [B, g, V]
    p_x = p[:, :g].gather(-1, x.unsqueeze(-1)).squeeze(-1)          # [B, g]
    q_x = q.gather(-1, x.unsqueeze(-1)).squeeze(-1)                 # [B, g]
    if sequential:
        n = torch.zeros(B, dtype=torch.long, device=x.device)
        live = torch.ones(B, dtype=torch.bool, device=x.device)
        for i in range(g):
            r = uniform((B,), keyed(generator, "accept", i), x.device, p.dtype)
            live &= r * q_x[:, i] < p_x[:, i]                       # accept with prob min(1, p/q)
            if limit is not None:
                live &= i < limit
            n += live
    else:
        r = uniform((B, g), keyed(generator, "accept"), x.device, p.dtype)   # [B, g]
        accepted = r * q_x < p_x                                    # [B, g]
        if limit is not None:
            accepted &= torch.arange(g, device=x.device) < limit.unsqueeze(1)
        n = accepted.long().cumprod(-1).sum(-1)                     # [B] first rejection
    q_ext = F.pad(q, (0, 0, 0, 1))                                  # [B, g + 1, V], zero bonus row
    idx = n.view(B, 1, 1).expand(B, 1, p.shape[-1])
    p_n = p.gather(1, idx).squeeze(1)                               # [B, V]
    q_n = q_ext.gather(1, idx).squeeze(1)                           # [B, V]
    if limit is not None:                                           # a row that used its own drafts: p's bonus
        q_n = q_n * (n < limit).unsqueeze(1).to(q_n.dtype)
    return n, sample(max_fn(p_n - q_n, fallback=p_n), keyed(generator, "residual"))


def finite_rows(*laws: torch.Tensor | None) -> torch.Tensor:
    """[b] bool: every value of each row of the laws given ([b, ...] each; None skipped) is finite."""
    ok = None
    for law in laws:
        if law is not None:
            row = torch.isfinite(law).flatten(1).all(-1)
            ok = row if ok is None else ok & row
    return ok


def inverse_cdf(r: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """[b] the token x of each row with cdf(x - 1) <= u * total < cdf(x) under the unnormalised laws
    r [b, V] (u [b] in [0, 1)): a draw from r / r.sum() by one uniform; tokens with r = 0 are never
    drawn (u * total rounded up to the total draws the last token with mass)."""
    cdf = r.cumsum(-1)                                              # [b, V]
    x = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1), right=True).squeeze(1)   # [b]
    last = r.shape[1] - 1 - (r > 0).flip(-1).long().argmax(-1)     # [b] the last token with mass
    off = (x > last) | (r.gather(1, x.clamp(max=last.max()).unsqueeze(1)).squeeze(1) <= 0)
    return torch.where(off, last, x)


def children_table(children: dict[int, list[int]] | list | torch.Tensor, b: int, n: int, device: torch.device,
                   bounds: tuple[int, int] | None = None) -> tuple[torch.Tensor, int]:
    """[b, n + 1, K] each node's children in order (row u + 1 for node u, row 0 for the root),
    padded with -1, and the trees' depth, from one dict for every row, a list of one per row, or
    parents [b, n] (-1: the root) on the device, siblings in node order, whose depth and most
    children under one node (K) are ``bounds`` (not read from the device; default n and n)."""
    if torch.is_tensor(children):                                   # on the device: each node's rank
        depth, K = bounds or (n, n)
        at = torch.arange(n, device=device)
        earlier = at.unsqueeze(1) > at                              # [n, n] j < i
        rank = ((children.unsqueeze(2) == children.unsqueeze(1)) & earlier).sum(-1)   # [b, n]
        table = torch.full((b, (n + 1) * K), -1, dtype=torch.long, device=device)
        table.scatter_(1, (children + 1) * K + rank, at.expand(b, n))
        return table.view(b, n + 1, K), depth
    rows = children if isinstance(children, list) else [children]
    K = max((len(v) for kids in rows for v in kids.values()), default=0)
    table = [[kids.get(u, []) + [-1] * (K - len(kids.get(u, []))) for u in range(-1, n)] for kids in rows]
    depth = 0
    for kids in rows:
        level, d = [-1], 0
        while level := [c for u in level for c in kids.get(u, [])]:
            d += 1
        depth = max(depth, d)
    return to_device(table, device).view(len(rows), n + 1, K).expand(b, n + 1, K), depth


def walk_sampled(p_root: torch.Tensor, p: torch.Tensor | None, q: torch.Tensor | None, tokens: torch.Tensor,
                 kids: torch.Tensor, depth_max: int, u: torch.Tensor, limit: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The sampled walk of ``tree_accept`` for every row at once, on the laws' device: level by
    level, each child slot in turn (a row without that child waits). kids [b, n + 1, K] and the
    trees' depth from ``children_table``; u [b, n + 1] uniforms, one per test and the final draw;
    limit [b] each row's own depth. Returns n [b], next [b], path [b, n] (padded with 0).
    On an accelerator the loops run to their bounds (depth + 1 levels of K children) without
    reading the device; on the CPU, where a read costs nothing, a level tests only as many children
    as a walking row has there, stops testing them once every walking row has accepted one, and the
    walk stops when no row walks."""
    b, n = tokens.shape
    dev = tokens.device
    reads = dev == torch.device("cpu")                              # the host's own memory
    V = p_root.shape[-1]
    node = torch.zeros(b, 1, dtype=torch.long, device=dev)          # [b, 1] row of kids: 0 the root, c + 1 node c
    r = last = p_root                                               # [b, V] the target's law where each row is
    walking = torch.ones(b, 1, dtype=torch.bool, device=dev)
    used = torch.zeros(b, 1, dtype=torch.long, device=dev)          # [b, 1] uniforms used
    depth = torch.zeros(b, 1, dtype=torch.long, device=dev)
    path = torch.zeros(b, n, dtype=torch.long, device=dev)
    K, limit = kids.shape[2], limit.view(b, 1)
    for _ in range(depth_max + 1):
        here = kids.gather(1, node.unsqueeze(2).expand(b, 1, K)).squeeze(1)     # [b, K] the children to test
        here = here.masked_fill(depth >= limit, -1)                 # at its own depth a row is at a leaf
        width = K
        if reads:
            still, width = torch.stack([walking.any().long(), ((here >= 0) & walking).sum(-1).max()]).tolist()
            if not still:
                break
        moved, to = torch.zeros_like(walking), node
        if width:                                                   # the law the children were drawn from
            q_u = q.gather(1, here[:, :1].clamp(min=0).unsqueeze(2).expand(b, 1, V)).squeeze(1)   # [b, V]
        for j in range(width):
            if reads and j and not bool((walking & ~moved).any()):  # every row has moved on or stopped
                break
            c = here[:, j:j + 1]                                    # [b, 1] the j-th child (-1: none)
            x = tokens.gather(1, c.clamp(min=0))                    # [b, 1]
            q_x = q_u.gather(1, x)
            test = walking & ~moved & (c >= 0) & (q_x > 0)          # q_x = 0: drawn after the draft's support ran out
            ok = test & (u.gather(1, used) * q_x < r.gather(1, x))  # accept with probability min(1, r(x) / q(x))
            used = used + test
            moved, to = moved | ok, torch.where(ok, c + 1, to)
            no = test & ~ok                                         # rejected: r <- norm(max(0, r - q)), q minus x
            if reads and not bool(no.any()):                        # (on the CPU: skipped when no row was)
                continue
            r = torch.where(no, max_fn(r - q_u, fallback=r), r)
            q_u = torch.where(no, q_u.scatter(1, x, 0.0), q_u)
            q_u = torch.where(no, q_u / q_u.sum(-1, keepdim=True).clamp(min=torch.finfo(q_u.dtype).tiny), q_u)
        last = torch.where(walking & ~moved, r, last)               # every child rejected, or a leaf: draw from r
        if width:                                                   # the rows that moved go down to their child
            at = depth.clamp(max=n - 1)
            path.scatter_(1, at, torch.where(moved, to - 1, path.gather(1, at)))
            r = torch.where(moved, p.gather(1, (to - 1).clamp(min=0).unsqueeze(2).expand(b, 1, V)).squeeze(1), r)
        walking, node, depth = moved, to, depth + moved
    nxt = inverse_cdf(last, u.gather(1, used).squeeze(1))           # [b] each row's draw, by its last uniform
    return depth.squeeze(1), nxt, path


def tree_accept(p_root: torch.Tensor, p: torch.Tensor | None, q: torch.Tensor | None, tokens: torch.Tensor,
                children: dict[int, list[int]] | list | torch.Tensor, generator: torch.Generator | None = None,
                greedy: bool = False, carry: torch.Tensor | None = None, limit: list[int] | None = None,
                bounds: tuple[int, int] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[list[int]], list[list[int]] | None]:
    """Walk a draft tree from the root (Sequoia's verification of siblings drawn
    without replacement).

    p_root: [b, V] target probs after the prefix; p: [b, n, V] after each node; q: [b, n, V] the law
    of each node's parent, which its children were drawn from without replacement, in order;
    tokens: [b, n]; children: node -> its children (-1 is the root), one dict for every row or a
    list of one per row, or each row's tree as its nodes' parents [b, n] on the device (-1: the
    root; greedy: fetched with the tokens, sampled: read by the walk on the device); carry: [b, n]
    integers a node (a drafter's, on the device) whose values along the accepted path the caller
    needs on the host, fetched with them.
    Sampling: at a node with target law r and draft law q, each child x in turn is accepted with
    probability min(1, r(x) / q(x)); a rejection replaces r by norm(max(0, r - q)) and then q by
    q without x, renormalised; a child with q(x) = 0 (the draft had fewer tokens than children) is
    skipped. When every child is rejected the next token is drawn from r; at a leaf it is drawn
    from the leaf's p (the bonus). That keeps the target's law exactly (Sequoia, Chen et al. 2024,
    on sampling without replacement; tests/test_tree.py checks it by chi-square). Greedy: the child
    equal to the target's argmax, else the argmax itself.
    Greedy, the walk runs on the host over the argmaxes one transfer brings; sampled, every row at
    once on the laws' device (``walk_sampled``: n + 1 uniforms per row drawn up front, the final draw
    by inverse CDF), and one transfer brings the result (a GPU's host never reads the laws).
    ``limit`` (per row, on the host): a row's own depth, as if its tree had been cut there (its
    deeper nodes are not tested; a node at that depth is a leaf). ``bounds``: trees given as parents,
    their depth and the most children under one node (the sampled walk's loop bounds).
    Returns n [b] accepted nodes, next [b], path [b, max(n)] the accepted nodes (padded with 0), the
    same on the host: per row [n, next, *the path's tokens] (``Accepted.host``), and per row the
    carried values of the path's nodes (None without ``carry``).
    """
    b, n = tokens.shape
    if not greedy:                  # every row at once on the laws' device; the host reads the result
        u = uniform((b, n + 1), keyed(generator, "walk"), p_root.device, p_root.dtype)          # [b, n + 1]
        deepest = to_device([n] * b if limit is None else limit, tokens.device)                 # [b]
        kids, depth = children_table(children, b, n, tokens.device, bounds)                      # [b, n + 1, K]
        k, nxt, path = walk_sampled(p_root, p, q, tokens, kids, depth, u, deepest)
        got = [k.unsqueeze(1), nxt.unsqueeze(1), tokens.gather(1, path)]                        # [b, 2 + n]
        host = torch.cat(got + ([carry.gather(1, path).long()] if carry is not None else []), 1).tolist()
        carried = [h[2 + n:2 + n + h[0]] for h in host] if carry is not None else None
        depth = max(h[0] for h in host)
        return k, nxt, path[:, :depth], [h[:2 + depth] for h in host], carried
    ints = [tokens] + [children] * torch.is_tensor(children) + [carry] * (carry is not None)   # [b, n] each
    ints += [p_root.argmax(-1, keepdim=True)] + ([p.argmax(-1)] if p is not None else [])   # [b, 1], [b, n]
    host = torch.cat(ints, 1).tolist()                              # the walk's one device-to-host transfer
    toks = [h[:n] for h in host]                    # each row: tokens, [parents], [carried], argmaxes
    if torch.is_tensor(children):
        kids_of = [children_of(h[n:2 * n]) for h in host]
    else:
        kids_of = children if isinstance(children, list) else [children] * b
    at = n * (1 + torch.is_tensor(children) + (carry is not None))  # where the argmaxes begin
    carried = [h[at - n:at] for h in host] if carry is not None else None
    best_root, best = [h[at] for h in host], [h[at + 1:] for h in host]
    ns, nexts, paths = [], [], []
    for i in range(b):              # greedy: the child equal to the target's argmax, while there is one
        u, steps, children, a = -1, [], kids_of[i], best_root[i]
        deepest = n if limit is None else limit[i]  # a row's own depth: deeper nodes count as absent
        while len(steps) < deepest and (c := next((c for c in children[u] if toks[i][c] == a), None)) is not None:
            u, a, steps = c, best[i][c], steps + [c]
        nexts.append(a)
        ns.append(len(steps))
        paths.append(steps)
    if carry is not None:                            # the path's values, before the padding
        carried = [[c[x] for x in s] for c, s in zip(carried, paths)]
    depth = max(ns)
    paths = [s + [0] * (depth - len(s)) for s in paths]
    out = to_device([[k, x] + s for k, x, s in zip(ns, nexts, paths)], tokens.device).view(b, 2 + depth)  # one copy
    host = [[k, x] + [toks[i][c] for c in s] for i, (k, x, s) in enumerate(zip(ns, nexts, paths))]
    return out[:, 0], out[:, 1], out[:, 2:], host, carried
