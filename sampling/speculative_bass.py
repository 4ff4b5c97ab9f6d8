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

from .parts import ChainVerifier, ModelDrafter
from .rows import Rows
from .utils import SamplingParams
from .utils_bass import GammaSchedule


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
        S = seq.shape[1]
        g = min(schedule.gamma, rows.room() - 1)      # drafts that can still be used by some row
        # 1. draft: g tokens for every live row, with the law they were drawn from
        draft = drafter.propose(seq, mask, g, generator)                      # tokens [b, g], q [b, g, V]
        seq = torch.cat([seq, draft.tokens], dim=1)                           # [b, S + g]
        mask = torch.cat([mask, mask.new_ones(len(seq), g)], dim=1)
        # 2. verify and 3. accept: all rows in one target pass, each its own prefix + one token
        n, nxt = verifier.verify(seq, mask, draft, generator)                 # [b], [b]
        padding.append(1.0 - mask.float().mean().item())
        rows_verified += len(seq)
        done = rows.done_mask()                                               # [b]
        n = n.masked_fill(done, 0)                                            # a finished row keeps nothing
        schedule.update(n[~done], g)
        # 4. realign (BASS-PAD): crop both caches to the longest row, mask the others' holes
        drafts = draft.tokens.tolist()
        mask = verifier.commit(S, n, mask)                                    # [b, S + n_max]
        drafter.commit(mask.shape[1])
        seq = torch.cat([seq[:, :mask.shape[1]], nxt.unsqueeze(1)], dim=1)
        mask = torch.cat([mask, (~done).to(mask.dtype).unsqueeze(1)], dim=1)
        # 5. hand out the new tokens; rows that met EOS or the budget are finished
        n_list = n.tolist()
        rows.hand_out([d[:n_j] + [x] for d, n_j, x in zip(drafts, n_list, nxt.tolist())], n_list, g)
        if finished_rows == "drop":                   # finished rows leave both caches
            keep = rows.drop_finished()
            if keep is not None and len(keep):
                seq, mask = seq[keep], mask[keep]
                verifier.select_rows(keep)
                drafter.select_rows(keep)
    stats = rows.stats(verifier.calls, drafter.calls, schedule.trace)
    stats.update(padding_fraction=sum(padding) / max(1, len(padding)),
                 rows_verified=rows_verified)         # rows in the verify passes, finished ones included
    return rows.out, stats


def bass_sampling(target, draft, input_ids: torch.Tensor, mask: torch.Tensor, params: SamplingParams,
                  max_new_tokens: int, schedule: GammaSchedule, eos_token_id: int | None,
                  generator: torch.Generator | None, finished_rows: str = "drop", sequential: bool = False,
                  vocab: int | None = None, streamer=None):
    """The speculative loop with a draft model and a chain verifier: BASS on a batch, google /
    deepmind (``sequential``) on one row. Returns (tokens, stats)."""
    rows = Rows(input_ids.shape[0], max_new_tokens, eos_token_id, input_ids.device, streamer)
    return speculative_decode(ModelDrafter(draft, params, vocab), ChainVerifier(target, params, vocab, sequential),
                              input_ids, mask, schedule, rows, finished_rows, generator)
