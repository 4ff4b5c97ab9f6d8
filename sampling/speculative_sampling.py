"""Speculative sampling on one sequence at a time: Leviathan et al. 2023 ("google") and Chen et al.
2023 ("deepmind"), and the cascade of drafts, each row of a batch decoded alone by the decode loop
(``sampling.decode``). The two papers describe the same algorithm with the same output law; they
differ only in how the acceptance test draws its uniforms (``accept_reject(sequential=)``).
"""
from __future__ import annotations

import torch

from .cache.spec import CacheSpec
from .control import make_controller
from .decode import speculative_decode
from .drafters import build_drafter
from .params import RowParams, SamplingParams
from .rows import Rows, merge_stats
from .utils import now
from .utils_bass import GammaSchedule, ScheduleParams
from .verify.chain import ChainVerifier


def speculative_sampling(target, draft, input_ids: torch.Tensor, mask: torch.Tensor,
                         params: SamplingParams | RowParams, max_new_tokens: int | list[int],
                         eos_token_id: int | None, generator: torch.Generator | list[int] | None, *, gamma: int,
                         schedule: ScheduleParams, sequential: bool = False, cascade_gamma: int | None = None,
                         vocab: int | None = None, streamer=None, cache: CacheSpec = CacheSpec(),
                         speculate: str = "auto") -> tuple[list[list[int]], dict]:
    """Each row of a left-padded batch [B, T] alone, padding stripped: a drafter (a draft model, a
    drafter source, or a list of draft models: a cascade whose lower levels draft ``cascade_gamma``)
    and a chain verifier (``sequential``: Chen et al.'s uniforms, one per draft). ``generator``: one
    for the batch, or one seed per row (rows that are separate requests: each its own generator, and
    a fault of one row fails it alone, the next rows go on); ``speculate``: "auto" lets the controller
    shorten a step's chain, to none (``sampling.control``). Returns (tokens, stats), the stats of the
    rows merged as one generation's."""
    t0, tokens, per_row, failed = now(input_ids.device), [], [], {}
    budgets = [max_new_tokens] * len(input_ids) if isinstance(max_new_tokens, int) else max_new_tokens
    own = isinstance(generator, list)
    for i, (ids, m) in enumerate(zip(input_ids, mask)):
        ids = ids[m.bool()].unsqueeze(0)                                  # [1, T_i], no padding
        p = params.row(i)
        rows = Rows(1, budgets[i], eos_token_id, ids.device, OneRow(streamer, i) if hasattr(streamer, "put_row")
                    else streamer)
        drafter = build_drafter(draft, p, vocab, cache, cascade_gamma=cascade_gamma or gamma, schedule=schedule)
        verifier = ChainVerifier(target, p, vocab, sequential, cache, hidden=drafter.reads_target)
        gen = torch.Generator(ids.device).manual_seed(generator[i]) if own else generator
        try:
            out, stats = speculative_decode(drafter, verifier, ids, torch.ones_like(ids),
                                            GammaSchedule(gamma, schedule), rows, generator=gen,
                                            control=make_controller(speculate, target, draft, drafter, cache))
        except Exception as e:                                            # noqa: BLE001 (a row's own fault)
            if not own:
                raise
            rows.fail(0, f"{type(e).__name__}: {e}")                      # this row alone; the next go on
            out, stats, failed[i] = rows.out, rows.finish(verifier.calls, drafter.calls, []), rows.failed[0]
        tokens.append(out[0])
        per_row.append(stats)
    stats = merge_stats(per_row, one_generation=True, wall_time_s=now(input_ids.device) - t0)
    if failed:
        stats["failed"] = failed
    return tokens, stats


class OneRow:
    """Row ``i`` of a row streamer, for the loops that decode one row at a time (its row 0); the
    end of the whole generation is the caller's, not each row's."""

    def __init__(self, streamer, i: int):
        self.streamer, self.i = streamer, i

    def put_row(self, row: int, tokens: list[int]) -> None:
        self.streamer.put_row(self.i, tokens)

    def stopped(self, row: int) -> bool:
        return self.streamer.stopped(self.i)

    def end_row(self, row: int, stats: dict | None, error: str | None) -> None:
        if hasattr(self.streamer, "end_row"):
            self.streamer.end_row(self.i, stats, error)

    def end(self) -> None:
        pass
