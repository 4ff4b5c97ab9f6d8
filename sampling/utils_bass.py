"""Draft-length schedules of BASS (Qiu et al. 2024): the draft length of the next step from how
many drafts each row accepted; constant, BASS's own rule, or additive-increase / multiplicative-decrease."""
from __future__ import annotations

import math
from dataclasses import dataclass

SCHEDULES = ("constant", "bass", "aimd")


@dataclass
class ScheduleParams:
    kind: str = "constant"   # "constant" | "bass" | "aimd"
    delta: int = 2           # bass: growth after a step where every row accepted every draft (Δ1)
    mod: int = 10            # bass: shrink by ceil(gamma / mod) (+ s) after a rejection (m)
    gamma_max: int = 32      # bass, aimd: upper bound of the draft length
    gamma_min: int = 1       # aimd: lower bound after halving

    def validate(self) -> None:
        if self.kind not in SCHEDULES:
            raise ValueError(f"unknown gamma schedule {self.kind!r}; choose one of {', '.join(SCHEDULES)}")
        if self.delta < 1 or self.mod < 1 or self.gamma_min < 1 or self.gamma_max < self.gamma_min:
            raise ValueError(f"schedule constants out of range: delta {self.delta} >= 1, mod {self.mod} >= 1,"
                             f" 1 <= gamma_min {self.gamma_min} <= gamma_max {self.gamma_max}")


class GammaSchedule:
    """The draft length of the next step, updated from how many drafts each row accepted."""

    def __init__(self, gamma: int, params: ScheduleParams):
        self.params = params
        self.gamma = gamma if params.kind == "constant" else min(gamma, params.gamma_max)
        self.s = 0               # bass: 0 after a fully accepted step, 1 after a rejection
        self.trace: list[int] = []

    def update(self, accepted: list[int], drafted: int) -> None:
        """accepted: drafts each live row accepted out of ``drafted`` (host integers)."""
        self.trace.append(drafted)
        k, g = self.params, self.gamma
        if k.kind == "constant" or drafted < g:      # a step shortened by the budget says nothing
            return
        full = all(a == drafted for a in accepted)
        if k.kind == "bass":
            if full:
                self.gamma, self.s = min(g + k.delta, k.gamma_max), 0
            else:
                self.gamma = max(1, max(accepted, default=0), g - math.ceil(g / k.mod) - self.s)
                self.s = 1
        else:                                         # aimd
            self.gamma = min(g + 1, k.gamma_max) if full else max(k.gamma_min, g // 2)

