"""The decoding modes, one table: the loop that decodes each, what may draft for it, how it verifies,
which of ``generate``'s options it reads. ``generate``, the command-line tools, the benchmarks'
runner and cost model and the server all read it, and every refusal about a mode and what drafts
for it is written here once.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

from .autoregressive_sampling import autoregressive_sampling
from .cache.spec import CacheSpec
from .contracts import DrafterSource
from .speculative_bass import bass_sampling, tree_sampling
from .speculative_sampling import speculative_sampling
from .verify.tree import check_tree_model

DRAFTER_KINDS = {                               # what may draft (generate's draft_model), described
    "model": "a draft model",
    "ngram": "the n-gram drafter (NgramDrafter)",
    "heads": "speculator heads (a Speculator)",
    "cascade": "a list of draft models, smallest first",
}
JOINING_DRAFTERS = ("model", "ngram")           # rows may join a running batch they draft for
FINISHED_ROWS = ("drop", "mask")                # batched speculative modes: what becomes of a finished row


def _ar(target, draft, input_ids, mask, *args, **kwargs):
    """Mode ar's loop: the target alone (it reads no draft)."""
    return autoregressive_sampling(target, input_ids, mask, *args, **kwargs)


@dataclass(frozen=True)
class Mode:
    """One decoding mode."""
    name: str
    summary: str                                # one line: what it is
    loop: Callable                              # loop(target, draft, input_ids, mask, params, max_new_tokens,
                                                #      eos_token_id, generator, vocab=, streamer=, cache=, **options)
    drafters: tuple[str, ...]                   # the kinds of drafter it takes (DRAFTER_KINDS); (): none
    verifier: str | None                        # "chain" (accept_reject), "tree" (tree_accept); None: no drafts
    one_row: bool                               # each row decoded alone (always batch 1 in a benchmark)
    options: tuple[str, ...]                    # generate's options its loop reads beyond sampling and the cache
    joins: bool = False                         # requests may join a running batch (continuous batching)
    serves: bool = False                        # the server offers it (--serve_mode)

    @property
    def speculative(self) -> bool:
        return self.verifier is not None

    def check_drafter(self, kind: str | None) -> None:
        """ValueError (one line) unless a drafter of ``kind`` (DRAFTER_KINDS; None: none) may draft
        for this mode; a mode without drafts takes none and ignores what it is given."""
        if not self.drafters or kind in self.drafters:
            return
        if kind is None:
            raise ValueError(f"mode {self.name!r} needs a draft model")
        if self.name == "cascade":
            raise ValueError(f"mode 'cascade' takes draft_model=[smallest, ..., largest draft] (2 models or more), "
                             f"not {DRAFTER_KINDS[kind]}")
        if kind == "cascade":
            raise ValueError(f"a list of drafts is a cascade: use mode 'cascade', not {self.name!r}")
        takes = [m.name for m in MODES_TABLE.values() if kind in m.drafters]
        raise ValueError(f"mode {self.name!r} needs {' or '.join(DRAFTER_KINDS[k] for k in self.drafters)}; "
                         f"{DRAFTER_KINDS[kind]} drafts for {', '.join(takes[:-1])} and {takes[-1]} only")

    def compiles(self, compile: bool | str) -> bool | str:
        """What ``generate``'s ``compile`` compiles in this mode, for tools that run several modes with
        one setting: "draft" where the mode has drafts (a mode without one compiles nothing)."""
        return compile if compile != "draft" or self.drafters else False

    def check_models(self, target, drafts: list) -> None:
        """ValueError (one line) when the target or a draft model cannot run this mode's passes."""
        if self.verifier == "tree":
            check_tree_model(target, "target")
            for d in drafts:
                check_tree_model(d, "draft")

    def check_admission(self, kind: str | None, cache: CacheSpec, finished_rows: str) -> None:
        """ValueError (one line) unless requests may join a running batch of this mode with this
        drafter and cache: the batched chain loops, a draft model or the n-gram drafter, the dynamic
        cache without a press, finished rows dropped."""
        why = [f"mode {self.name} ({' or '.join(m.name for m in MODES_TABLE.values() if m.joins)})"
               if not self.joins else "",
               f"the {cache.kind} cache (dynamic)" if cache.kind != "dynamic" else "",
               "a compiled draft (its cache is static)" if cache.compile == "draft" and kind == "model" else "",
               "a press" if cache.press.active else "",
               f"finished_rows={finished_rows} (drop)" if finished_rows != "drop" else "",
               "this drafter (a draft model or NgramDrafter)" if self.joins and self.drafters
               and kind not in JOINING_DRAFTERS else ""]
        why = [w for w in why if w]
        if why:
            raise ValueError(f"rows cannot join a running batch with {', '.join(why)}")


_SPEC = ("model", "ngram", "heads")
MODES_TABLE: dict[str, Mode] = {m.name: m for m in (
    Mode("ar", "the target alone, batched, one pass per token", _ar, (), None, False, (), joins=True, serves=True),
    Mode("google", "speculative sampling (Leviathan et al.), one row at a time",
         functools.partial(speculative_sampling, sequential=False), _SPEC, "chain", True,
         ("gamma", "schedule", "speculate"), serves=True),
    Mode("deepmind", "speculative sampling (Chen et al.: a uniform per draft), one row at a time",
         functools.partial(speculative_sampling, sequential=True), _SPEC, "chain", True,
         ("gamma", "schedule", "speculate")),
    Mode("bass", "batched speculative sampling (BASS-PAD), every row at once",
         bass_sampling, _SPEC, "chain", False, ("gamma", "schedule", "finished_rows", "speculate"), joins=True,
         serves=True),
    Mode("tree", "a draft tree verified in one pass (tree attention), every row at once",
         tree_sampling, ("model", "heads"), "tree", False, ("tree", "finished_rows", "speculate")),
    Mode("cascade", "drafts verifying drafts up to the target, one row at a time",
         functools.partial(speculative_sampling, sequential=False), ("cascade",), "chain", True,
         ("gamma", "schedule", "cascade_gamma", "speculate")),
)}
MODES = tuple(MODES_TABLE)


def get_mode(name: str) -> Mode:
    """The mode of that name; ValueError naming the choices."""
    if name not in MODES_TABLE:
        raise ValueError(f"unknown mode {name!r}; choose one of {', '.join(MODES)}")
    return MODES_TABLE[name]


def drafter_kind(draft) -> str | None:
    """The kind (DRAFTER_KINDS) of what ``generate`` was given as ``draft_model``; None for nothing."""
    if draft is None:
        return None
    if isinstance(draft, (list, tuple)):
        return "cascade"
    if isinstance(draft, DrafterSource):
        return draft.kind
    return "model"
