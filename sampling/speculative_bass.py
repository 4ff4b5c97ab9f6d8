"""BASS-PAD (Qiu et al. 2024, arXiv 2404.15778): batched speculative sampling, every row of a
left-padded batch decoded together by the decode loop (``sampling.decode``), with a chain of drafts
(``bass_sampling``) or a draft tree (``tree_sampling``: tree attention, ``sampling.verify.tree``).
Rows accept different numbers of drafts; both caches keep the longest row's slots and mask the
others' (``BatchedKVCacheModel.realign``).
Finished rows either leave both caches (``finished_rows="drop"``: one copy of each cache per step in
which rows finish) or stay in the batch with every new slot masked (``"mask"``: no copy, but their
compute goes on until the batch ends).
"""
from __future__ import annotations

import torch

from .cache.spec import CacheSpec
from .control import make_controller
from .decode import speculative_decode
from .drafters import build_drafter
from .params import RowParams, SamplingParams
from .rows import Rows
from .utils_bass import GammaSchedule, ScheduleParams
from .verify.chain import ChainVerifier
from .verify.tree import TreeVerifier


def bass_sampling(target, draft, input_ids: torch.Tensor, mask: torch.Tensor, params: SamplingParams | RowParams,
                  max_new_tokens: int | list[int], eos_token_id: int | None,
                  generator: torch.Generator | list[int] | None, *,
                  gamma: int, schedule: ScheduleParams, finished_rows: str = "drop", vocab: int | None = None,
                  streamer=None, cache: CacheSpec = CacheSpec(), speculate: str = "auto"
                  ) -> tuple[list[list[int]], dict]:
    """The whole batch at once, a chain of ``gamma`` drafts a step under ``schedule`` from a draft
    model or a drafter source; ``generator``: one for the batch, or one seed per row (each row draws
    its own and drafts its own length: ``sampling.rows.Rows``); ``speculate``: "auto" lets the
    controller shorten a step's chain, to none (``sampling.control``). Returns (tokens, stats)."""
    seeds = generator if isinstance(generator, list) else None           # one per row: each row its own draws
    rows = Rows(input_ids.shape[0], max_new_tokens, eos_token_id, input_ids.device, streamer, seeds)
    drafter = build_drafter(draft, params, vocab, cache)
    verifier = ChainVerifier(target, params, vocab, cache=cache, hidden=drafter.reads_target)
    return speculative_decode(drafter, verifier, input_ids, mask, GammaSchedule(gamma, schedule), rows,
                              finished_rows, generator, make_controller(speculate, target, draft, drafter, cache))


def tree_sampling(target, draft, input_ids: torch.Tensor, mask: torch.Tensor, params: SamplingParams | RowParams,
                  max_new_tokens: int | list[int], eos_token_id: int | None,
                  generator: torch.Generator | list[int] | None, *,
                  tree, finished_rows: str = "drop", vocab: int | None = None, streamer=None,
                  cache: CacheSpec = CacheSpec(), speculate: str = "auto") -> tuple[list[list[int]], dict]:
    """The whole batch at once, a draft tree a step (``tree``: a parsed static or dynamic tree, of a
    draft model or speculator heads) verified with tree attention; ``generator``: one for the
    batch, or one seed per row; ``speculate``: "auto" lets the controller cut a step's tree to fewer
    levels, to none (``sampling.control``). Returns (tokens, stats)."""
    seeds = generator if isinstance(generator, list) else None           # one per row: each row its own draws
    rows = Rows(input_ids.shape[0], max_new_tokens, eos_token_id, input_ids.device, streamer, seeds)
    drafter = build_drafter(draft, params, vocab, cache, tree)
    verifier = TreeVerifier(target, params, vocab, cache, hidden=drafter.reads_target)
    control = make_controller(speculate, target, draft, drafter, cache)
    return speculative_decode(drafter, verifier, input_ids, mask, GammaSchedule(tree.depth, ScheduleParams()), rows,
                              finished_rows, generator, control)          # a tree drafts its depth a step
