"""Probability utilities shared by every sampler: filtering, sampling and the accept/reject rule.

Names follow the papers: ``p`` is the target model's distribution, ``q`` the draft's.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0   # 0 means greedy (argmax); > 0 divides the logits
    top_k: int = 0             # keep the k most likely tokens; 0 switches the filter off
    top_p: float = 1.0         # keep the smallest set of tokens with mass >= top_p; 1.0 is off

    def validate(self) -> None:
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 switches it off), got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def norm_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Filtered next-token probabilities [..., V] from logits [..., V].

    Greedy is a one-hot distribution on the argmax, so the same accept/reject rule serves
    greedy and sampled decoding alike. Computed in float32 (float64 stays float64).
    """
    if logits.dtype not in (torch.float32, torch.float64):
        logits = logits.float()
    if params.greedy:
        return F.one_hot(logits.argmax(-1), logits.shape[-1]).to(logits.dtype)
    logits = logits / params.temperature
    if params.top_k > 0:
        kth = torch.topk(logits, min(params.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        sorted_probs = torch.softmax(sorted_logits, -1)
        drop_sorted = sorted_probs.cumsum(-1) - sorted_probs >= params.top_p  # mass before it
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return torch.softmax(logits, dim=-1)


def sample(probs: torch.Tensor, generator: torch.Generator | None = None, greedy: bool = False) -> torch.Tensor:
    """One draw per row of probs [N, V] -> [N]. ``greedy``: the rows are one-hot (``norm_logits``
    at temperature 0), so the draw is their argmax, without the cost of ``multinomial``."""
    if greedy:
        return probs.argmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def max_fn(x: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    """norm(max(0, x)) over the last dim; rows with no positive mass (p == q) take ``fallback``."""
    x = x.clamp(min=0)
    total = x.sum(-1, keepdim=True)
    return torch.where(total > 0, x / total.clamp(min=torch.finfo(x.dtype).tiny), fallback)


def accept_reject(p: torch.Tensor, q: torch.Tensor, x: torch.Tensor,
                  generator: torch.Generator | None = None,
                  sequential: bool = False, greedy: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Speculative rejection sampling for a batch of rows (Leviathan et al. 2023, Chen et al. 2023).

    p: [B, g + 1, V] target probabilities at the g draft positions and the bonus position
    q: [B, g, V]     draft probabilities the draft tokens were sampled from
    x: [B, g]        draft tokens
    Returns n [B], how many drafts each row accepts, and next [B], the token that follows them:
    a draw from norm(max(0, p_n - q_n)) after a rejection, or from p_g when all g are accepted.
    ``sequential`` tests the drafts one by one as in Chen et al.'s Algorithm 2 (a uniform per
    draft, stopping at the first rejection); otherwise all g uniforms are drawn at once and n is
    the first rejection (Leviathan et al.). Both give the same law. ``greedy``: p and q are
    one-hot (temperature 0), so the next token is drawn by argmax (see ``sample``).
    """
    B, g = x.shape
    p_x = p[:, :g].gather(-1, x.unsqueeze(-1)).squeeze(-1)          # [B, g]
    q_x = q.gather(-1, x.unsqueeze(-1)).squeeze(-1)                 # [B, g]
    if sequential:
        n = torch.zeros(B, dtype=torch.long, device=x.device)
        live = torch.ones(B, dtype=torch.bool, device=x.device)
        for i in range(g):
            r = torch.rand(B, generator=generator, device=x.device, dtype=p.dtype)
            live &= r * q_x[:, i] < p_x[:, i]                       # accept with prob min(1, p/q)
            n += live
            if not live.any():
                break
    else:
        r = torch.rand(B, g, generator=generator, device=x.device, dtype=p.dtype)  # [B, g]
        accepted = r * q_x < p_x                                    # [B, g]
        n = accepted.long().cumprod(-1).sum(-1)                     # [B] first rejection
    q_ext = F.pad(q, (0, 0, 0, 1))                                  # [B, g + 1, V], zero bonus row
    idx = n.view(B, 1, 1).expand(B, 1, p.shape[-1])
    p_n = p.gather(1, idx).squeeze(1)                               # [B, V]
    q_n = q_ext.gather(1, idx).squeeze(1)                           # [B, V]
    return n, sample(max_fn(p_n - q_n, fallback=p_n), generator, greedy)
