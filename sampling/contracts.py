"""The contracts of the decode loop (``sampling.decode``): what a drafter proposes, what a verifier
decides, what each row keeps, and the members every drafter and verifier has.

The loop never knows which parts it drives: a draft model's chain or tree, speculator heads, an
n-gram table or a cascade of drafts; a chain or a tree verifier. Data goes one way, in returned
values: a drafter's ``Draft`` to the verifier, the verifier's ``Verified`` to the loop, which
settles it into ``Accepted`` (the step's one device-to-host read) and hands that to both parts'
``commit``. A drafter that needs the target's own hidden states says so (``reads_target``), and
the verifier returns them with its verdict, as transformers' ``CandidateGenerator`` is handed the
target's outputs (``requires_model_outputs``).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from .params import RowParams, SamplingParams


@dataclass(frozen=True)
class Draft:
    """What a drafter proposes for every live row in one step."""
    tokens: torch.Tensor             # [b, n] a chain of n = g tokens, or a tree's n nodes in level order
    q: torch.Tensor | None           # [b, n, V] the law each was drawn from; None: deterministic (or greedy) drafts
    tree: object = None              # the tree the nodes form (sampling.tree_shapes); None: a chain
    carry: torch.Tensor | None = None  # [b, n] integers the drafter wants back on the host along each row's
                                       # accepted path (a dynamic tree's fed slots); they ride the verdict's transfer


@dataclass(frozen=True)
class HostVerdict:
    """A verdict already on the host, when the verifier decided there (a tree's walk)."""
    rows: list[list[int]]            # per row [n, next, *its accepted tokens]
    carried: list[list[int]] | None  # per row, Draft.carry along its accepted path (None: nothing asked)


@dataclass(frozen=True)
class Verified:
    """What one verify pass decided for every row, on the device."""
    n: torch.Tensor                  # [b] drafts each row accepts
    next: torch.Tensor               # [b] the correction or bonus token after them
    tokens: torch.Tensor             # [b, k] the accepted drafts (a row's slots past its n are holes)
    nodes: torch.Tensor              # [b, k] the draft position (chain) or node (tree) each came from
    start: int                       # the slot the drafts begin at
    drafted: int | list[int]         # drafts proposed to each row (a chain's g, a tree's nodes; or each row's own)
    slots: tuple                     # (real slots before the drafts: a device count, drafts fed, all slots fed)
    p: torch.Tensor | None = None    # [b, g + 1, V] the target's laws at the drafts and after them (a chain)
    hidden: torch.Tensor | None = None   # [b, P + n, D] the target's lm_head inputs in the pass (P pending tokens,
                                         # then the drafts), when the drafter reads the target; None: not asked
    host: HostVerdict | None = None  # the verdict on the host already (a tree's walk): settling reads nothing
    ok: torch.Tensor | None = None   # [b] bool: the row's laws were finite (checked for rows that draw their own
                                     # values, ``RowDraws``: a row that fails the check fails alone)

    def settle(self, done: torch.Tensor, done_rows: list[bool]) -> Accepted:
        """What each row keeps: finished rows (``done`` [b] on the device, ``done_rows`` on the host)
        nothing; tokens and nodes trimmed to the longest row. The step's one device-to-host transfer,
        or none when the verdict is on the host already."""
        n = self.n.masked_fill(done, 0)
        failed = None
        if self.host is None:
            parts = [n.unsqueeze(1), self.next.unsqueeze(1), self.tokens]
            if self.ok is not None:
                parts.append((~self.ok).long().unsqueeze(1))
            rows = torch.cat(parts, 1).tolist()                                          # [b, 2 + k (+ 1)]
            if self.ok is not None:
                rows, failed = [h[:-1] for h in rows], [bool(h[-1]) for h in rows]
        else:
            rows = [[0 if d else h[0]] + h[1:] for h, d in zip(self.host.rows, done_rows)]
            if self.ok is not None:
                failed = (~self.ok).tolist()
        counts = [h[0] for h in rows]
        taken = [h[2:2 + k] + [h[1]] for h, k in zip(rows, counts)]
        k = max(counts)
        return Accepted(self, n, self.tokens[:, :k], self.nodes[:, :k], counts, taken,
                        self.host.carried if self.host is not None else None, failed)


@dataclass(frozen=True)
class Accepted:
    """What each row keeps of a step: what both parts commit and the loop hands out."""
    verified: Verified               # the verify pass it settles (its laws, the target's hidden states, slots)
    n: torch.Tensor                  # [b] drafts kept (0 for finished rows)
    tokens: torch.Tensor             # [b, k] the kept drafts, k the longest row's count (shorter rows: holes)
    nodes: torch.Tensor              # [b, k] the draft position or node each came from
    counts: list[int]                # n on the host
    taken: list[list[int]]           # per row on the host: its kept drafts, then the next token
    carried: list[list[int]] | None  # per row on the host: Draft.carry along its accepted path
    failed: list[bool] | None = None  # per row on the host: its laws were not finite (Verified.ok)

    @property
    def start(self) -> int:
        """The slot the drafts began at; the caches keep ``start + k`` slots."""
        return self.verified.start

    @property
    def next(self) -> torch.Tensor:
        """[b] the token each row takes after its kept drafts."""
        return self.verified.next


@dataclass(frozen=True)
class StepWork:
    """The model passes one step costs per row, for the controller to price (``sampling.control``)."""
    draft: tuple[int, ...]           # tokens per row of each draft pass (a draft model's, or a source's
                                     # ``priced_pass``); (): none priced
    verify: int                      # tokens per row of the target's verify pass (drafts or nodes, + 1)


class Drafter(Protocol):
    """Proposes draft tokens for every live row and keeps its own state in step with the target's."""

    calls: int                       # forward passes of draft models so far (0 for a drafter without a model)
    reads_target: bool               # needs the target's hidden states (Verified.hidden, prefill's hidden)
    max_draft: int | None            # the most tokens it can draft in one step (None: any number)

    def prefill(self, input_ids: torch.Tensor, mask: torch.Tensor, hidden: torch.Tensor | None) -> None:
        """Read the prompts [b, T] (left-padded, mask [b, T]); ``hidden`` [b, D]: the target's lm_head
        input at each prompt's last token when ``reads_target``, else None. A drafter may defer the
        work to its first ``propose`` with g > 0, which sees every token since (a draft model's cache)."""

    def propose(self, seq: torch.Tensor, mask: torch.Tensor, g: int, generator: torch.Generator | None) -> Draft:
        """Draft after seq [b, S] (mask [b, S]): a chain of g tokens, or a tree of at most g levels."""

    def commit(self, acc: Accepted) -> None:
        """Keep in its own state what each row accepted, and nothing of the rest."""

    def work(self, g: int) -> StepWork:
        """The passes a step that drafts ``g`` (a chain's length, a tree's levels) costs each row."""

    def select_rows(self, keep: torch.Tensor) -> None:
        """Keep only the rows ``keep`` [b'] (finished rows leave the batch)."""


@runtime_checkable
class JoiningDrafter(Protocol):
    """A drafter that rows may join between steps (continuous batching)."""

    def admit(self, ids: torch.Tensor, mask: torch.Tensor, pad: int, params: list[SamplingParams]) -> None:
        """New rows ids, mask [n, W] join; the batch's slots move right by ``pad`` (``rows.admit_rows``)."""

    def drop_leading(self, n: int) -> None:
        """The batch's first ``n`` slots, padding in every row, go; every slot moves left by ``n``
        (``rows.drop_leading_padding``)."""


@dataclass(frozen=True)
class PricedPass:
    """A drafter source's own draft pass, for the controller to time once per machine (``sampling.control``)."""
    name: str                        # what its cost depends on besides the machine (kind, size, dtype)
    device: torch.device             # where it runs (the clock waits for it)
    run: Callable[[int], object]     # one pass for one row of n tokens, on inputs of its own


@runtime_checkable
class DrafterSource(Protocol):
    """Something that is not a model but makes a drafter for each generation (``NgramDrafter``,
    ``Speculator``): what ``generate(draft_model=...)`` takes besides a draft model or a list of them."""

    kind: str                        # "ngram" or "heads" (sampling.modes.DRAFTER_KINDS)

    def drafter(self, params: SamplingParams | RowParams, vocab: int | None, tree=None) -> Drafter:
        """A fresh drafter for one generation: sampling parameters, the vocabulary to restrict laws
        to (None: the whole output embedding), and the tree to draft (None: chains)."""

    def check_target(self, target) -> None:
        """ValueError (one line) unless it may draft for ``target``."""

    def priced_pass(self) -> PricedPass | None:
        """Its drafters' pass (``Drafter.work`` counts them in ``StepWork.draft``), for the controller
        to price; None: they run none worth pricing (an n-gram lookup)."""


class Verifier(Protocol):
    """Runs the target once over every row's draft and decides, by the one accept/reject rule, what
    each row keeps and which token follows."""

    calls: int                       # target forward passes so far, the prefill included

    def prefill(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | None:
        """Run the target over the prompts; returns the target's lm_head input at each row's last
        token [b, D] when asked for hidden states (the drafter reads the target), else None."""

    def verify(self, seq: torch.Tensor, mask: torch.Tensor, draft: Draft,
               generator: torch.Generator | None) -> Verified:
        """One target pass over the drafts after seq [b, S] (mask [b, S]) and the verdict."""

    def commit(self, acc: Accepted) -> torch.Tensor:
        """Keep the accepted slots in the target's cache; returns the mask [b, start + k] of the
        sequence with the rejected slots masked (BASS-PAD's holes)."""

    def select_rows(self, keep: torch.Tensor) -> None:
        """Keep only the rows ``keep`` [b'] (finished rows leave the batch)."""
