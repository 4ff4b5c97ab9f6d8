"""BASS-PAD: batched speculative sampling (Qiu et al. 2024, arXiv 2404.15778).

Every step the draft proposes g tokens for each live row, the target verifies all rows in one
forward pass, and each row accepts its own prefix by exact rejection sampling plus a correction
or bonus token. Rows then differ in length; ``BatchedKVCacheModel.realign`` pads them back into
line by masking the rejected slots. Finished rows (EOS or budget) either leave both caches
(``finished_rows="drop"``: one copy of each cache per step in which rows finish) or stay in the
batch with every new slot masked (``"mask"``: no copy, but their compute goes on until the batch ends).
"""
from __future__ import annotations

import time

import torch

from .batched_kvcache_model import BatchedKVCacheModel
from .utils import SamplingParams, accept_reject, sample
from .utils_bass import GammaSchedule, histogram


@torch.inference_mode()
def bass_sampling(target, draft, input_ids: torch.Tensor, mask: torch.Tensor, params: SamplingParams,
                  max_new_tokens: int, schedule: GammaSchedule, eos_token_id: int | None,
                  generator: torch.Generator | None, finished_rows: str):
    """Generate for a left-padded batch input_ids [B, T]; returns (tokens, stats)."""
    t0 = time.perf_counter()
    B = input_ids.shape[0]
    tgt, drf = BatchedKVCacheModel(target, params), BatchedKVCacheModel(draft, params)
    tgt.prefill(input_ids, mask)
    drf.prefill(input_ids, mask)
    seq, rows = input_ids, torch.arange(B)            # slot tokens [b, S]; original index of each row
    done = torch.zeros(B, dtype=torch.bool)           # [b] finished rows (only "mask" keeps them)
    out = [[] for _ in range(B)]
    row_steps, row_accepted, row_drafted = [0] * B, [0] * B, [0] * B
    accepted_lengths, padding, ttft, rows_verified = [], [], None, 0
    while not done.all():
        S = seq.shape[1]
        room = max_new_tokens - min(len(out[r]) for r in rows[~done].tolist())
        g = min(schedule.gamma, room - 1)             # drafts that can still be used by some row
        # 1. draft: g tokens for every live row
        for _ in range(g):
            x = sample(drf.catch_up(seq, mask), generator, params.greedy)    # [b]
            seq = torch.cat([seq, x.unsqueeze(1)], dim=1)
            mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
        q = drf.probs[:, drf.probs.shape[1] - g:]                            # [b, g, V]
        # 2. verify: all rows in one target pass
        tgt.catch_up(seq, mask)
        p = tgt.probs[:, -(g + 1):]                                          # [b, g + 1, V]
        padding.append(1.0 - mask.float().mean().item())
        rows_verified += len(rows)
        # 3. accept: each row its own prefix, then a correction or bonus token
        n, nxt = accept_reject(p, q, seq[:, S:], generator, greedy=params.greedy)  # [b], [b]
        done_d = done.to(n.device)                                           # [b] on the models' device
        n = n.masked_fill(done_d, 0)                                         # a finished row keeps nothing
        ttft = ttft if ttft is not None else time.perf_counter() - t0
        schedule.update(n[~done_d], g)
        # 4. realign (BASS-PAD): crop both caches to the longest row, mask the others' holes
        drafts = seq[:, S:]
        mask = tgt.realign(S, n, mask)                                       # [b, S + n_max]
        drf.rollback(mask.shape[1])
        seq = torch.cat([seq[:, :mask.shape[1]], nxt.unsqueeze(1)], dim=1)
        mask = torch.cat([mask, (~done_d).to(mask.dtype).unsqueeze(1)], dim=1)
        # 5. hand out the new tokens; rows that met EOS or the budget are finished
        for j, (r, n_j, nxt_j, drafts_j, done_j) in enumerate(zip(
                rows.tolist(), n.tolist(), nxt.tolist(), drafts.tolist(), done.tolist())):
            if done_j:
                continue
            new = (drafts_j[:n_j] + [nxt_j])[:max_new_tokens - len(out[r])]
            if eos_token_id is not None and eos_token_id in new:
                new = new[:new.index(eos_token_id) + 1]
            out[r] += new
            row_steps[r] += 1
            row_accepted[r] += n_j
            row_drafted[r] += g
            accepted_lengths.append(n_j)
            done[j] = len(out[r]) == max_new_tokens or new[-1] == eos_token_id
        if finished_rows == "drop" and done.any():   # finished rows leave both caches
            keep = (~done).nonzero().squeeze(1)
            rows, seq, mask, done = rows[keep], seq[keep], mask[keep], done[keep]
            if len(keep):
                tgt.select_rows(keep)
                drf.select_rows(keep)
    new_tokens = sum(map(len, out))
    drafted, accepted = sum(row_drafted), sum(row_accepted)
    stats = dict(new_tokens=new_tokens, target_calls=tgt.calls, draft_calls=drf.calls,
                 drafted=drafted, accepted=accepted,
                 acceptance_rate=accepted / drafted if drafted else 0.0,
                 mean_accepted_tokens=new_tokens / max(1, sum(row_steps) + B),  # + B: the prefill
                 wall_time_s=time.perf_counter() - t0, ttft_s=ttft or 0.0,
                 accepted_hist=histogram(accepted_lengths, max(schedule.trace + [0]) + 1),
                 gamma_trace=schedule.trace,
                 padding_fraction=sum(padding) / max(1, len(padding)),
                 rows_verified=rows_verified,          # rows in the verify passes, finished ones included
                 rows=[dict(new_tokens=len(out[r]), target_calls=row_steps[r] + 1,
                            drafted=row_drafted[r], accepted=row_accepted[r]) for r in range(B)])
    return out, stats
