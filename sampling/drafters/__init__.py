"""Drafters: what proposes the tokens the target verifies (``sampling.contracts.Drafter``).

``model``: a draft model's chain; ``tree``: a draft model's static or dynamic tree; ``heads``:
speculator heads on the target's hidden state (MLP speculator, Medusa); ``ngram``: prompt lookup,
no model; ``cascade``: drafts verifying drafts. ``build_drafter`` makes a generation's drafter
from what ``generate(draft_model=...)`` was given.
"""
from __future__ import annotations

from ..cache.spec import CacheSpec
from ..contracts import Drafter, DrafterSource
from ..params import RowParams, SamplingParams
from ..tree_shapes import DynamicTree
from ..utils_bass import ScheduleParams
from .cascade import cascade_drafter
from .model import ModelDrafter
from .tree import DynamicTreeDrafter, TreeDrafter


def build_drafter(draft, params: SamplingParams | RowParams, vocab: int | None, cache: CacheSpec, tree=None,
                  cascade_gamma: int | None = None, schedule: ScheduleParams | None = None) -> Drafter:
    """The drafter of one generation: for a list of draft models, smallest first, their cascade
    (each lower level drafting ``cascade_gamma`` tokens a step under its own ``schedule``); for a
    drafter source (``NgramDrafter``, a ``Speculator``), the drafter it makes; for a draft model, its
    chain, or with ``tree`` (a parsed static or dynamic tree) its tree."""
    if isinstance(draft, (list, tuple)):
        return cascade_drafter(draft, params, vocab, cascade_gamma, schedule, cache)
    if isinstance(draft, DrafterSource):
        return draft.drafter(params, vocab, tree)
    if tree is None:
        return ModelDrafter(draft, params, vocab, cache)
    return (DynamicTreeDrafter if isinstance(tree, DynamicTree) else TreeDrafter)(draft, params, vocab, tree, cache)
