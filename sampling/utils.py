"""Probability utilities shared by every sampler: filtering, sampling and the accept/reject rule.

Names follow the papers: ``p`` is the target model's distribution, ``q`` the draft's.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F
from transformers import (LogitsProcessorList, MinPLogitsWarper, RepetitionPenaltyLogitsProcessor,
                          TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0         # 0 means greedy (argmax); > 0 divides the logits
    top_k: int = 0                   # keep the k most likely tokens; 0 switches the filter off
    top_p: float = 1.0               # keep the smallest set of tokens with mass >= top_p; 1.0 is off
    min_p: float = 0.0               # drop tokens below min_p x the top token's probability; 0 is off
    repetition_penalty: float = 1.0  # CTRL penalty on tokens already in the prefix (> 1 discourages); 1 is off

    def validate(self) -> None:
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be a finite number >= 0 (0 is greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 switches it off), got {self.top_k}")
        if not 0 <= self.min_p < 1:
            raise ValueError(f"min_p must be in [0, 1) (0 switches it off), got {self.min_p}")
        if not (self.repetition_penalty > 0 and math.isfinite(self.repetition_penalty)):
            raise ValueError(f"repetition_penalty must be a finite number > 0 (1 switches it off), "
                             f"got {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def uses_prefix(self) -> bool:
        """Whether the filtered law of a position depends on its prefix (the repetition penalty)."""
        return self.repetition_penalty != 1.0

    @cached_property
    def processors(self) -> LogitsProcessorList:
        """transformers' logits processors, in the order ``generate`` applies them: the repetition
        penalty, then (sampling only; none of them moves the argmax) temperature, top-k, top-p, min-p."""
        out = LogitsProcessorList()
        if self.uses_prefix:
            out.append(RepetitionPenaltyLogitsProcessor(float(self.repetition_penalty)))
        if self.greedy:
            return out
        if self.temperature != 1.0:
            out.append(TemperatureLogitsWarper(float(self.temperature)))
        if self.top_k > 0:
            out.append(TopKLogitsWarper(int(self.top_k)))
        if self.top_p < 1.0:
            out.append(TopPLogitsWarper(float(self.top_p)))
        if self.min_p > 0:
            out.append(MinPLogitsWarper(float(self.min_p)))
        return out


    def select(self, keep) -> "SamplingParams":
        """The parameters of the rows ``keep`` of the batch: the same for every row."""
        return self

    def row(self, i: int) -> "SamplingParams":
        """Row i's parameters."""
        return self

    def per_row(self, b: int) -> list["SamplingParams"]:
        """The parameters of each of b rows."""
        return [self] * b


@dataclass(frozen=True)
class RowParams:
    """One ``SamplingParams`` per row of a batch (a server's requests with their own temperature,
    top-k, top-p, min-p); the repetition penalty is shared. It stands wherever a ``SamplingParams``
    does: ``norm_logits`` filters each group of rows with its own processors; ``greedy`` holds when
    every row is greedy (argmax shortcuts); otherwise a greedy row's law is one-hot and the sampling
    paths (multinomial, the accept/reject rule, tree walks) keep it exact. Build it with ``row_params``."""
    rows: tuple[SamplingParams, ...]    # one per row of the current batch

    def validate(self) -> None:
        for p in self.rows:
            p.validate()
        if len({p.repetition_penalty for p in self.rows}) > 1:
            raise ValueError(f"repetition_penalty must be the same for every row of a batch, got "
                             f"{sorted({p.repetition_penalty for p in self.rows})}")

    @property
    def greedy(self) -> bool:
        return all(p.greedy for p in self.rows)

    @property
    def uses_prefix(self) -> bool:
        return self.rows[0].uses_prefix

    @property
    def repetition_penalty(self) -> float:
        return self.rows[0].repetition_penalty

    def select(self, keep) -> "SamplingParams | RowParams":
        return row_params([self.rows[i] for i in (keep.tolist() if torch.is_tensor(keep) else keep)])

    def row(self, i: int) -> SamplingParams:
        return self.rows[i]

    def per_row(self, b: int) -> list[SamplingParams]:
        return list(self.rows)

    @cached_property
    def _groups(self) -> list[tuple[SamplingParams, list[int]]]:
        out: dict[SamplingParams, list[int]] = {}
        for i, p in enumerate(self.rows):
            out.setdefault(p, []).append(i)
        return list(out.items())

    @cached_property
    def _index(self) -> dict:
        return {}                    # device -> groups with their row indices there

    def groups(self, device: torch.device) -> list[tuple[SamplingParams, torch.Tensor]]:
        """Each distinct parameter set and the rows that use it, as an index on ``device``; made
        once per batch composition (every pass of every model reads them)."""
        if device not in self._index:
            self._index[device] = [(p, to_device(idx, device)) for p, idx in self._groups]
        return self._index[device]


def to_device(data: list, device: torch.device, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """Host values (nested lists) as a tensor on ``device`` without making the host wait: on CUDA
    through pinned memory with ``non_blocking`` (a copy from pageable memory is followed by a
    stream synchronisation); PyTorch keeps the pinned block until the copy has run."""
    t = torch.tensor(data, dtype=dtype)
    if torch.device(device).type == "cuda":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def row_params(rows: list[SamplingParams]) -> "SamplingParams | RowParams":
    """Per-row parameters; a plain ``SamplingParams`` when every row has the same."""
    return rows[0] if len(set(rows)) == 1 else RowParams(tuple(rows))


def norm_logits(logits: torch.Tensor, params: SamplingParams | RowParams, seq: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, law: bool = True) -> torch.Tensor:
    """Filtered next-token probabilities [B, n, V] from the logits [B, n, V] of the last n
    positions of seq [B, S] (mask [B, S]); each position is filtered with its own prefix, as
    assisted generation does. seq and mask are needed only when ``params.uses_prefix``; masked
    slots (padding, BASS holes) are not part of a prefix.

    Greedy is a one-hot distribution on the argmax, so the same accept/reject rule serves
    greedy and sampled decoding alike, and rows with their own parameters (``RowParams``) share
    one batch. Computed in float32 (float64 stays float64). ``law=False``: when every row is greedy,
    the filtered logits themselves, whose argmax is all that a greedy consumer reads (``sample``,
    ``accept_reject``, ``tree_accept`` with ``greedy``): no one-hot is made (three kernels a pass).
    """
    if logits.dtype not in (torch.float32, torch.float64):
        logits = logits.float()
    if isinstance(params, RowParams):                 # each group of rows with its own filters
        out = torch.empty_like(logits)
        for p, i in params.groups(logits.device):
            out[i] = norm_logits(logits[i], p, None if seq is None else seq[i], None if mask is None else mask[i],
                                 law or not params.greedy)      # a mixed batch: every row a law
        return out
    procs = params.processors
    if procs:
        B, n, V = logits.shape
        if params.uses_prefix:
            assert seq is not None and mask is not None, "the repetition penalty needs the prefix"
            S = seq.shape[1]
            cols = []
            for j in range(n):                       # position S - n + j sees seq[:, :S - n + j + 1]
                prefix, pm = seq[:, :S - n + j + 1], mask[:, :S - n + j + 1]
                prefix = torch.where(pm.bool(), prefix, prefix[:, -1:])  # a masked slot repeats a real token
                cols.append(procs(prefix, logits[:, j]))
            logits = torch.stack(cols, 1)                                 # [B, n, V]
        else:
            logits = procs(None, logits.reshape(B * n, V)).view(B, n, V)
    if params.greedy and not law:                     # only the argmax is read
        return logits
    return one_hot_argmax(logits) if params.greedy else torch.softmax(logits, dim=-1)


def one_hot_argmax(logits: torch.Tensor) -> torch.Tensor:
    """The greedy law: one-hot on the argmax of the last dim, made in logits' dtype at once."""
    return torch.zeros_like(logits).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)


def sample(probs: torch.Tensor, generator: torch.Generator | None = None, greedy: bool = False) -> torch.Tensor:
    """One draw per row of probs [N, V] -> [N]. ``greedy``: the rows are one-hot or the greedy
    logits themselves (``norm_logits`` at temperature 0), so the draw is their argmax, without the
    cost of ``multinomial``."""
    if greedy:
        return probs.argmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def max_fn(x: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    """norm(max(0, x)) over the last dim; rows with no positive mass (p == q) take ``fallback``."""
    x = x.clamp(min=0)
    total = x.sum(-1, keepdim=True)
    return torch.where(total > 0, x / total.clamp(min=torch.finfo(x.dtype).tiny), fallback)


def accept_reject(p: torch.Tensor, q: torch.Tensor | None, x: torch.Tensor,
                  generator: torch.Generator | None = None,
                  sequential: bool = False, greedy: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
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
    comparing tokens, with no uniform drawn.
    """
    B, g = x.shape
    if greedy:
        t = p.argmax(-1)                                            # [B, g + 1] the target's tokens
        n = (x == t[:, :g]).long().cumprod(-1).sum(-1)              # [B] first disagreement
        return n, t.gather(1, n.unsqueeze(1)).squeeze(1)            # the target's token after the prefix
    if q is None:
        q = F.one_hot(x, p.shape[-1]).to(p.dtype)                   # [B, g, V]
    p_x = p[:, :g].gather(-1, x.unsqueeze(-1)).squeeze(-1)          # [B, g]
    q_x = q.gather(-1, x.unsqueeze(-1)).squeeze(-1)                 # [B, g]
    if sequential:
        n = torch.zeros(B, dtype=torch.long, device=x.device)
        live = torch.ones(B, dtype=torch.bool, device=x.device)
        for i in range(g):
            r = torch.rand(B, generator=generator, device=x.device, dtype=p.dtype)
            live &= r * q_x[:, i] < p_x[:, i]                       # accept with prob min(1, p/q)
            n += live
    else:
        r = torch.rand(B, g, generator=generator, device=x.device, dtype=p.dtype)  # [B, g]
        accepted = r * q_x < p_x                                    # [B, g]
        n = accepted.long().cumprod(-1).sum(-1)                     # [B] first rejection
    q_ext = F.pad(q, (0, 0, 0, 1))                                  # [B, g + 1, V], zero bonus row
    idx = n.view(B, 1, 1).expand(B, 1, p.shape[-1])
    p_n = p.gather(1, idx).squeeze(1)                               # [B, V]
    q_n = q_ext.gather(1, idx).squeeze(1)                           # [B, V]
    return n, sample(max_fn(p_n - q_n, fallback=p_n), generator)


def children_of(parent: list[int]) -> dict[int, list[int]]:
    """Each node's children in order (-1 is the root; leaves have none), from each node's parent."""
    out = {-1: []}
    for i, u in enumerate(parent):
        out.setdefault(u, []).append(i)
        out.setdefault(i, [])
    return out


def fetch(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Device tensors of one batch ([b, ...] each, any dtypes) on the host in one transfer (the host
    waits once, not once a tensor): each row's bytes side by side, every part padded to 8 bytes so
    that it views back as its dtype and shape without a copy."""
    b = len(tensors[0])
    parts = [t.contiguous().view(b, -1).view(torch.uint8) for t in tensors]           # [b, bytes] each
    parts = [F.pad(x, (0, -x.shape[1] % 8)) for x in parts]
    host, at, out = torch.cat(parts, 1).cpu(), 0, []                                 # the one transfer
    for t, x in zip(tensors, parts):
        out.append(host[:, at:at + t[0].numel() * t.element_size()].view(t.dtype).view(t.shape))
        at += x.shape[1]
    return out


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
                greedy: bool = False, carry: torch.Tensor | None = None
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
    Returns n [b] accepted nodes, next [b], path [b, max(n)] the accepted nodes (padded with 0), the
    same on the host: per row [n, next, *the path's tokens] (``Accepted.host``), and per row the
    carried values of the path's nodes (None without ``carry``).
    """
    b, n = tokens.shape
    ints = [tokens] + [children] * torch.is_tensor(children) + [carry] * (carry is not None)   # [b, n] each
    if greedy:                      # every position's argmax too: the walk is then on host lists
        ints += [p_root.argmax(-1, keepdim=True)] + [p.argmax(-1)] * (p is not None)   # [b, 1], [b, n]
        host = torch.cat(ints, 1).tolist()                          # the walk's one device-to-host transfer
    else:                           # the laws, the walk's uniforms and the integers in one transfer
        u = torch.rand(b, n + 1, generator=generator, device=p_root.device, dtype=p_root.dtype)   # [b, n + 1]
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
        if greedy:
            a = best_root[i]
            while (c := next((c for c in children[u] if toks[i][c] == a), None)) is not None:
                u, a, steps = c, best[i][c], steps + [c]
            nexts.append(a)
        else:                       # on the host: row i's laws and its n + 1 uniforms, one per test and the draw
            r, uni, k = law[i, 0], uniforms[i].tolist(), 0
            while True:
                kids = children[u]
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
