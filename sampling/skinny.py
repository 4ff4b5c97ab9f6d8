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
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

SKINNY_ROWS = 32        # the most rows (batch x tokens) that take W @ x.T (results/drafting/skinny-cost)


class SkinnyLinear(nn.Linear):
    """``nn.Linear`` computing 2 to ``SKINNY_ROWS`` rows as ``(W @ x.T).T`` (module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        if not 2 <= rows <= SKINNY_ROWS:
            return F.linear(x, self.weight, self.bias)
        y = (self.weight @ x.reshape(rows, x.shape[-1]).T).T                  # [rows, out], column-major
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)                                     # autocast: F.linear's dtype
        return y.contiguous().view(*x.shape[:-1], self.out_features)          # [..., out], as F.linear lays it

    @classmethod
    def of(cls, linear: nn.Linear) -> SkinnyLinear:
        """A SkinnyLinear on ``linear``'s own parameters (no copy)."""
        out = cls(linear.in_features, linear.out_features, bias=False, device="meta")
        out.weight, out.bias = linear.weight, linear.bias
        return out.train(linear.training)


def skinny_linears(model: nn.Module) -> int:
    """Swap every plain ``nn.Linear`` of ``model`` for a ``SkinnyLinear`` on the same parameters, in
    place; returns how many were swapped (a subclass of nn.Linear, such as a quantized layer, is
    left as it is)."""
    names = [name for name, m in model.named_modules() if type(m) is nn.Linear]
    for name in names:
        model.set_submodule(name, SkinnyLinear.of(model.get_submodule(name)))
    return len(names)


def is_skinny(model: nn.Module) -> bool:
    """Whether ``skinny_linears`` was applied (its passes cost otherwise: ``sampling.control``)."""
    return any(isinstance(m, SkinnyLinear) for m in model.modules())
