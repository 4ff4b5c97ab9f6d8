"""The decode loop of every speculative mode: draft, verify, accept, commit, schedule.

``speculative_decode`` drives a drafter and a verifier (``sampling.contracts``) over a left-padded
batch and never knows which ones; ``step`` is one iteration, which a cascade also runs for its
lower levels (``sampling.drafters.cascade``). BASS-PAD (Qiu et al. 2024) is this loop on a whole
batch; Leviathan et al. 2023 and Chen et al. 2023 run it on one sequence at a time
(``sampling.speculative_sampling``). Each row accepts its own prefix by exact rejection sampling,
so rows differ in length: both caches keep the longest row's slots and mask the others' (holes),
so the batch stays aligned. The output law is the target's, exactly.
"""
from __future__ import annotations

import torch

from .contracts import Accepted, Drafter, Verifier
from .control import Always
from .rows import Live, Rows
from .utils_bass import GammaSchedule


def step(drafter: Drafter, verifier: Verifier, seq: torch.Tensor, mask: torch.Tensor, g: int, generator,
         live: Live) -> tuple[Accepted, torch.Tensor, torch.Tensor]:
    """One iteration for every row of seq [b, S] (mask [b, S]): what each row accepted, and the
    sequence and its mask with the accepted tokens and the next one appended [b, S + k + 1]."""
    # 1. draft: g tokens (or a tree of g levels) for every row, with the law they were drawn from
    draft = drafter.propose(seq, mask, g, generator)                      # tokens [b, n], q [b, n, V]
    # 2. verify: one target pass over every row's draft; 3. accept: each keeps a prefix and one more token
    acc = verifier.verify(seq, mask, draft, generator).settle(live.done, live.rows)   # the step's one read
    # 4. commit: both caches keep the accepted slots; a shorter row's are masked (BASS-PAD's holes)
    mask = verifier.commit(acc)                                           # [b, S + k]
    drafter.commit(acc)
    seq = torch.cat([seq, acc.tokens, acc.next.unsqueeze(1)], dim=1)     # [b, S + k + 1]
    mask = torch.cat([mask, live.column.to(mask.dtype)], dim=1)           # a finished row's next slot: masked
    return acc, seq, mask


@torch.inference_mode()
def speculative_decode(drafter: Drafter, verifier: Verifier, input_ids: torch.Tensor, mask: torch.Tensor,
                       schedule: GammaSchedule, rows: Rows, finished_rows: str = "drop",
                       generator: torch.Generator | None = None, control=None) -> tuple[list[list[int]], dict]:
    """Generate for a left-padded batch input_ids [B, T] (mask [B, T]); returns (tokens, stats).

    The budget is never overshot: a step drafts only as many tokens as the row with the most room
    can still use, and an EOS inside an accepted block ends the row there. ``finished_rows``:
    "drop" a finished row from both caches (requests may then join between steps), or keep it
    in the batch with every new slot masked ("mask"). ``control`` (``sampling.control``): picks
    each step's draft length up to what the schedule and the drafter allow, 0 for a plain AR step
    (None: always what they allow).
    """
    control = control or Always()
    hidden = verifier.prefill(input_ids, mask)                            # [B, D] when the drafter reads the target
    drafter.prefill(input_ids, mask, hidden)
    seq, padding, rows_verified = input_ids, [], 0
    rows.speculative = True
    while not rows.all_done:
        most = min(schedule.gamma, drafter.max_draft or schedule.gamma)   # drafts the drafter can make,
        most = control.choose(min(most, rows.room() - 1), len(seq), seq.shape[1])   # worth making for these rows
        limits = None if rows.seeds is None else [max(0, min(most, room - 1)) for room in rows.rooms()]
        g = most if limits is None else max(limits)                       # some row can still use
        draws = rows.draws(generator, limits)                             # rows of their own: each its own
        acc, seq, mask = step(drafter, verifier, seq, mask, g, draws, rows.live())
        # 5. schedule: the next draft length, from what each live row accepted
        live = [not d for d in rows.done]
        schedule.update([a for a, k in zip(acc.counts, live) if k], g)
        control.observe([a for a, k in zip(acc.counts, live) if k],
                        [lim for lim, k in zip(limits or [g] * len(live), live) if k])
        v = acc.verified
        padding.append(v.slots)                                           # real: a device count + the drafts
        rows_verified += len(acc.counts)
        # 6. hand out each row's new tokens; rows that met EOS or their budget are finished (a row of
        # its own whose laws were not finite fails alone)
        rows.fail_rows(draws, acc.failed)
        rows.hand_out(acc.taken, acc.counts, v.drafted)
        if finished_rows == "drop":                                       # they leave; requests join (a server)
            seq, mask = rows.advance(seq, mask, [verifier, drafter])
    stats = rows.finish(verifier.calls, drafter.calls, schedule.trace)
    real = torch.stack([r for r, _, _ in padding]).tolist() if padding else []    # one read, at the end
    stats.update(padding_fraction=sum(1 - (r + a) / n for r, (_, a, n) in zip(real, padding)) / max(1, len(real)),
                 rows_verified=rows_verified)         # rows in the verify passes, finished ones included
    return rows.out, stats
