"""Speculative sampling, one loop for every speculative mode: ``speculative_decode`` drives a
drafter and a verifier (``sampling.parts``) and never knows which ones.

BASS-PAD (Qiu et al. 2024, arXiv 2404.15778) runs it on a whole batch; Leviathan et al. 2023
("google") and Chen et al. 2023 ("deepmind") are the same loop run on one sequence at a time
(``sampling.generate`` calls it per row), the two differing only in how the acceptance test draws
its uniforms (``accept_reject(sequential=)``). The output law is the target's, exactly.

Every step the draft proposes g tokens for each live row, the target verifies all rows in one
forward pass, and each row accepts its own prefix by exact rejection sampling plus a correction
or bonus token. Rows then differ in length; ``BatchedKVCacheModel.realign`` pads them back into
line by masking the rejected slots. Finished rows (EOS or budget) either leave both caches
(``finished_rows="drop"``: one copy of each cache per step in which rows finish) or stay in the
batch with every new slot masked (``"mask"``: no copy, but their compute goes on until the batch ends).
"""
from __future__ import annotations

import torch

from .cascade import cascade_drafter
from .kvcache_model import CacheSpec
from .parts import ChainVerifier, ModelDrafter, is_drafter
from .rows import Rows, admit_rows
from .tree import DynamicTree, DynamicTreeDrafter, TreeDrafter, TreeVerifier
from .utils import SamplingParams
from .utils_bass import GammaSchedule, ScheduleParams


@torch.inference_mode()
def speculative_decode(drafter, verifier, input_ids: torch.Tensor, mask: torch.Tensor, schedule: GammaSchedule,
                       rows: Rows, finished_rows: str = "drop", generator: torch.Generator | None = None):
    """Generate for a left-padded batch input_ids [B, T] with a drafter and a verifier (``parts``);
    returns (tokens, stats).

    The budget is never overshot: a step drafts only as many tokens as the least advanced row can
    still use, and an EOS inside an accepted block ends the row there.
    """
    verifier.prefill(input_ids, mask)
    drafter.prefill(input_ids, mask)
    seq = input_ids                                   # slot tokens [b, S]
    padding, rows_verified = [], 0
    while not rows.all_done:
        g = min(schedule.gamma, rows.room() - 1,      # drafts that can still be used by some row,
                getattr(drafter, "max_draft", schedule.gamma))   # and that the drafter can make
        # 1. draft: g tokens for every live row, with the law they were drawn from
        draft = drafter.propose(seq, mask, g, generator)                      # tokens [b, g], q [b, g, V]
                                                                              # (a tree: its n nodes)
        # 2. verify and 3. accept: all rows in one target pass, each its own prefix + one token
        acc = verifier.verify(seq, mask, draft, generator)                    # n [b], next [b]
        padding.append(verifier.padding)              # (real slots on the device, + real on the host, all slots)
        rows_verified += len(seq)
        done = rows.done_mask()                                               # [b]
        n_list = acc.to_host(done, rows.done)                                 # the step's one sync
        schedule.update([a for a, d in zip(n_list, rows.done) if not d], g)
        # 4. realign (BASS-PAD): both caches keep the accepted slots, the others' holes are masked
        mask = verifier.commit(acc)                                           # [b, S + n_max], S: the old length
        drafter.commit(acc)
        seq = torch.cat([seq, acc.tokens, acc.next.unsqueeze(1)], dim=1)     # [b, S + n_max + 1]
        mask = torch.cat([mask, rows.live_column().to(mask.dtype)], dim=1)
        # 5. hand out the new tokens; rows that met EOS or the budget are finished
        rows.hand_out(acc.taken, n_list, draft.tokens.shape[1])
        if finished_rows == "drop":                   # finished rows leave both caches
            keep = rows.drop_finished()
            if keep is not None and len(keep):
                seq, mask = seq[keep], mask[keep]
                verifier.select_rows(keep)
                drafter.select_rows(keep)
            seq, mask = admit_rows(rows, seq, mask, [verifier, drafter])   # requests joining (a server)
    stats = rows.finish(verifier.calls, drafter.calls, schedule.trace)
    real = torch.stack([r for r, _, _ in padding]).tolist() if padding else []    # one read, at the end
    stats.update(padding_fraction=sum(1 - (r + a) / n for r, (_, a, n) in zip(real, padding)) / max(1, len(real)),
                 rows_verified=rows_verified)         # rows in the verify passes, finished ones included
    return rows.out, stats


def bass_sampling(target, draft, input_ids: torch.Tensor, mask: torch.Tensor, params: SamplingParams,
                  max_new_tokens: int, schedule: GammaSchedule, eos_token_id: int | None,
                  generator: torch.Generator | None, finished_rows: str = "drop", sequential: bool = False,
                  vocab: int | None = None, streamer=None, cache: CacheSpec = CacheSpec(),
                  cascade_gamma: int | None = None):
    """The speculative loop with a draft model (or a ready drafter, ``parts.is_drafter``, or a list
    of draft models: a cascade, ``sampling.cascade``) and a chain verifier: BASS on a batch, google /
    deepmind (``sequential``) / cascade on one row. Returns (tokens, stats)."""
    rows = Rows(input_ids.shape[0], max_new_tokens, eos_token_id, input_ids.device, streamer)
    if isinstance(draft, (list, tuple)):
        drafter = cascade_drafter(draft, params, vocab, cascade_gamma or schedule.gamma, schedule.params, cache)
    elif is_drafter(draft):
        drafter = draft.drafter(params, vocab)
    else:
        drafter = ModelDrafter(draft, params, vocab, cache)
    return speculative_decode(drafter, ChainVerifier(target, params, vocab, sequential, cache),
                              input_ids, mask, schedule, rows, finished_rows, generator)


def tree_sampling(target, draft, input_ids: torch.Tensor, mask: torch.Tensor, params: SamplingParams,
                  max_new_tokens: int, tree, eos_token_id: int | None, generator: torch.Generator | None,
                  finished_rows: str = "drop", vocab: int | None = None, streamer=None,
                  cache: CacheSpec = CacheSpec()):
    """The speculative loop with a draft tree (``sampling.tree``), batched like BASS."""
    rows = Rows(input_ids.shape[0], max_new_tokens, eos_token_id, input_ids.device, streamer)
    verifier = TreeVerifier(target, params, vocab, cache)           # checks the target's architecture first
    if is_drafter(draft):                                           # speculator heads: top-k per head
        drafter = draft.drafter(params, vocab, tree)
    else:
        drafter = (DynamicTreeDrafter if isinstance(tree, DynamicTree) else TreeDrafter)(draft, params, vocab, tree,
                                                                                          cache)
    return speculative_decode(drafter, verifier, input_ids, mask, GammaSchedule(tree.depth, ScheduleParams()), rows,
                              finished_rows, generator)
