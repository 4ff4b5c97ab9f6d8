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
from ..utils import fetch, to_device


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


def inverse_cdf(r: torch.Tensor, u: float) -> int:
    """The token x with cdf(x - 1) <= u * total < cdf(x) under the unnormalised law r [V] (u in
    [0, 1)): a draw from r / r.sum() by one uniform; tokens with r = 0 are never drawn."""
    cdf = r.cumsum(0)
    x = int(torch.searchsorted(cdf, u * cdf[-1], right=True))
    if x >= len(r) or r[x] <= 0:                    # u * total rounded up to the total: the last token drawable
        x = int((r > 0).nonzero()[-1])
    return x


def tree_accept(p_root: torch.Tensor, p: torch.Tensor | None, q: torch.Tensor | None, tokens: torch.Tensor,
                children: dict[int, list[int]] | list | torch.Tensor, generator: torch.Generator | None = None,
                greedy: bool = False, carry: torch.Tensor | None = None, limit: list[int] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[list[int]], list[list[int]] | None]:
    """Walk a draft tree from the root, row by row (Sequoia's verification of siblings drawn
    without replacement).

    p_root: [b, V] target probs after the prefix; p: [b, n, V] after each node; q: [b, n, V] the law
    of each node's parent, which its children were drawn from without replacement, in order;
    tokens: [b, n]; children: node -> its children (-1 is the root), one dict for every row or a
    list of one per row, or each row's tree as its nodes' parents [b, n] on the device (-1: the
    root), fetched with the tokens; carry: [b, n] integers a node (a drafter's, on the device)
    whose values along the accepted path the caller needs on the host, fetched with them.
    Sampling: at a node with target law r and draft law q, each child x in turn is accepted with
    probability min(1, r(x) / q(x)); a rejection replaces r by norm(max(0, r - q)) and then q by
    q without x, renormalised; a child with q(x) = 0 (the draft had fewer tokens than children) is
    skipped. When every child is rejected the next token is drawn from r; at a leaf it is drawn
    from the leaf's p (the bonus). That keeps the target's law exactly (Sequoia, Chen et al. 2024,
    on sampling without replacement; tests/test_tree.py checks it by chi-square). Greedy: the child
    equal to the target's argmax, else the argmax itself.
    The walk runs on the host over what one transfer brings (a GPU's host waits once a step, not
    once per child): greedy, the argmaxes; sampled, the laws and n + 1 uniforms per row drawn up
    front, the final draw by inverse CDF.
    ``limit`` (per row, on the host): a row's own depth, as if its tree had been cut there (its
    deeper nodes are not tested; a node at that depth is a leaf).
    Returns n [b] accepted nodes, next [b], path [b, max(n)] the accepted nodes (padded with 0), the
    same on the host: per row [n, next, *the path's tokens] (``Accepted.host``), and per row the
    carried values of the path's nodes (None without ``carry``).
    """
    b, n = tokens.shape
    ints = [tokens] + [children] * torch.is_tensor(children) + [carry] * (carry is not None)   # [b, n] each
    if greedy:                      # every position's argmax too: the walk is then on host lists
        ints += [p_root.argmax(-1, keepdim=True)] + ([p.argmax(-1)] if p is not None else [])   # [b, 1], [b, n]
        host = torch.cat(ints, 1).tolist()                          # the walk's one device-to-host transfer
    else:                           # the laws, the walk's uniforms and the integers in one transfer
        u = uniform((b, n + 1), keyed(generator, "walk"), p_root.device, p_root.dtype)          # [b, n + 1]
        laws = torch.cat([p_root.unsqueeze(1)] + ([p, q] if n else []), 1)          # [b, 1 + 2n, V]
        law, uniforms, host = fetch(laws, u, torch.cat(ints, 1))
        host = host.tolist()

    toks = [h[:n] for h in host]                    # each row: tokens, [parents], [carried], [argmaxes]
    if torch.is_tensor(children):
        kids_of = [children_of(h[n:2 * n]) for h in host]
    else:
        kids_of = children if isinstance(children, list) else [children] * b
    at = n * (1 + torch.is_tensor(children) + (carry is not None))  # where the argmaxes begin
    carried = [h[at - n:at] for h in host] if carry is not None else None
    host = [h[at:] for h in host]
    if greedy:
        best_root, best = [h[0] for h in host], [h[1:] for h in host]
    ns, nexts, paths = [], [], []
    for i in range(b):
        u, steps, children = -1, [], kids_of[i]
        deepest = n if limit is None else limit[i]  # a row's own depth: deeper nodes count as absent
        if greedy:
            a = best_root[i]
            while len(steps) < deepest and (c := next((c for c in children[u] if toks[i][c] == a), None)) is not None:
                u, a, steps = c, best[i][c], steps + [c]
            nexts.append(a)
        else:                       # on the host: row i's laws and its n + 1 uniforms, one per test and the draw
            r, uni, k = law[i, 0], uniforms[i].tolist(), 0
            while True:
                kids = children[u] if len(steps) < deepest else []
                q_u = law[i, 1 + n + kids[0]].clone() if kids else None
                for c in kids:
                    x = toks[i][c]
                    if q_u[x] <= 0:                 # drawn after the draft's support ran out
                        continue
                    k += 1
                    if uni[k - 1] * q_u[x] < r[x]:
                        u, steps = c, steps + [c]
                        break
                    r = max_fn(r - q_u, fallback=r)
                    q_u[x] = 0
                    q_u = q_u / q_u.sum().clamp(min=torch.finfo(q_u.dtype).tiny)
                else:                               # every child rejected (or a leaf): draw from r
                    nexts.append(inverse_cdf(r, uni[k]))
                    break
                r = law[i, 1 + u]
        ns.append(len(steps))
        paths.append(steps)
    if carry is not None:                            # the path's values, before the padding
        carried = [[c[x] for x in s] for c, s in zip(carried, paths)]
    depth = max(ns)
    paths = [s + [0] * (depth - len(s)) for s in paths]
    out = to_device([[k, x] + s for k, x, s in zip(ns, nexts, paths)], tokens.device).view(b, 2 + depth)  # one copy
    host = [[k, x] + [toks[i][c] for c in s] for i, (k, x, s) in enumerate(zip(ns, nexts, paths))]
    return out[:, 0], out[:, 1], out[:, 2:], host, carried
