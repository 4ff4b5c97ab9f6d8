"""Linear layers for passes of a few tokens on a CPU: what a verify pass and a tree's draft levels feed.

A pass of 2 to a few dozen tokens multiplies a skinny activation x [n, in] by the weight W [out,
in]. On this project's CPU (float32, 2 threads) ``F.linear`` takes a path for it that costs up to
3x what streaming W once costs, more than a one-token pass (a matrix-vector product), while
``W @ x.T`` for the same n streams W at about the one-token speed (``benchmark.studies.skinny_cost``,
results/drafting/skinny-cost: the embedded target's 4-token pass 25.0 ms against 39.1). Both
compute the same products; only the summation order inside a dot product may differ, as it
does between any two kernels (a one-token pass and a many-token pass already differ so).

``skinny_linears(model)`` swaps each ``nn.Linear`` for a ``SkinnyLinear`` that shares its
parameters (tied weights stay tied) and takes ``W @ x.T`` for 2 to ``SKINNY_ROWS`` rows,
``F.linear`` otherwise. ``sampling.app.models.load_model`` applies it to float32 models on the CPU.

A draft model's one-row products (batch 1, one token: every pass of a chain) may take a bfloat16
copy of its weights (``skinny_linears(model, one_row=torch.bfloat16)``): such a pass streams half
the bytes, and a draft as small as the embedded one then stays in the CPU's cache between passes
(its 11 MB in float32 do not). On this project's CPU, without native bfloat16, that product costs
0.58x the float32 one for the draft's 15 matrices, and 1.0x to 4x more for 2 rows and more
(results/drafting/one-row). A draft's numerics only move which tokens it proposes; the output law
is the target's whatever the draft computes, so only drafts get the copy, never a target. The
copy is a snapshot of the weight, for inference: heads being trained get none (``new_speculator``).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

SKINNY_ROWS = 32        # the most rows (batch x tokens) that take W @ x.T (results/drafting/skinny-cost)
ONE_ROW = torch.bfloat16   # a draft's one-row products on the CPU (module docstring; results/drafting/one-row)


class SkinnyLinear(nn.Linear):
    """``nn.Linear`` computing 2 to ``SKINNY_ROWS`` rows as ``(W @ x.T).T`` and, with a ``one_row``
    copy of the weight (a draft's), one row through that copy (module docstring)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("one_row", None, persistent=False)   # [out, in] copy of the weight; None: none

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        if (rows == 1 and self.one_row is not None and self.weight.dtype == torch.float32 and x.device.type == "cpu"
                and not torch.is_autocast_enabled("cpu")):                    # autocast picks its own dtype
            y = F.linear(x.to(self.one_row.dtype), self.one_row).to(x.dtype)   # [..., out]
            return y if self.bias is None else y + self.bias
        if not 2 <= rows <= SKINNY_ROWS:
            return F.linear(x, self.weight, self.bias)
        y = (self.weight @ x.reshape(rows, x.shape[-1]).T).T                  # [rows, out], column-major
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)                                     # autocast: F.linear's dtype
        return y.contiguous().view(*x.shape[:-1], self.out_features)          # [..., out], as F.linear lays it

    @classmethod
    def of(cls, linear: nn.Linear, one_row: torch.dtype | None = None) -> SkinnyLinear:
        """A SkinnyLinear on ``linear``'s own parameters (no copy) and, with ``one_row``, a copy of
        its weight in that dtype for one-row products."""
        out = cls(linear.in_features, linear.out_features, bias=False, device="meta")
        out.weight, out.bias = linear.weight, linear.bias
        out.one_row = None if one_row is None else linear.weight.detach().to(one_row)
        return out.train(linear.training)


def skinny_linears(model: nn.Module, one_row: torch.dtype | None = None) -> int:
    """Swap every plain ``nn.Linear`` of ``model`` for a ``SkinnyLinear`` on the same parameters, in
    place, each with a ``one_row`` copy of its weight if asked (a draft's: module docstring);
    returns how many were swapped (a subclass of nn.Linear, such as a quantized layer, is left as
    it is)."""
    names = [name for name, m in model.named_modules() if type(m) is nn.Linear]
    for name in names:
        model.set_submodule(name, SkinnyLinear.of(model.get_submodule(name), one_row))
    return len(names)


def linear_path(model: nn.Module) -> str:
    """How ``model``'s linear layers compute (their passes cost accordingly: ``sampling.control``):
    "" (as loaded), "|skinny", or "|skinny|one-row-bfloat16" (with a draft's one-row copies)."""
    skinny = [m for m in model.modules() if isinstance(m, SkinnyLinear)]
    if not skinny:
        return ""
    copies = {str(m.one_row.dtype)[6:] for m in skinny if m.one_row is not None}
    return "|skinny" + "".join(f"|one-row-{d}" for d in sorted(copies))


def is_skinny(model: nn.Module) -> bool:
    """Whether ``skinny_linears`` was applied."""
    return bool(linear_path(model))
