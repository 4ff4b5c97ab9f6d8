"""Autoregressive baseline: one target forward pass per new token, batched, with the KV cache."""
from __future__ import annotations

import torch

from .cache.spec import CacheSpec
from .kvcache_model import KVCacheModel
from .params import RowParams, SamplingParams, keyed, sample
from .rows import Rows
from .verify.rules import finite_rows


@torch.inference_mode()
def autoregressive_sampling(target, input_ids: torch.Tensor, mask: torch.Tensor, params: SamplingParams | RowParams,
                            max_new_tokens: int | list[int], eos_token_id: int | None,
                            generator: torch.Generator | list[int] | None, vocab: int | None = None, streamer=None,
                            cache: CacheSpec = CacheSpec()) -> tuple[list[list[int]], dict]:
    """Sample up to ``max_new_tokens`` for each row of a left-padded batch [B, T] (mask [B, T]);
    ``generator``: one for the batch, or one seed per row (each row draws its own, ``Rows``).

    A row stops after its EOS and is dropped from the cache, so finished rows cost nothing.
    Returns (tokens: list[list[int]], stats: dict).
    """
    seeds = generator if isinstance(generator, list) else None
    rows = Rows(input_ids.shape[0], max_new_tokens, eos_token_id, input_ids.device, streamer, seeds)
    model = KVCacheModel(target, params, vocab, cache)
    p = model.prefill(input_ids, mask)                                   # [B, V]
    seq = input_ids
    while True:
        draws = rows.draws(None if seeds else generator)
        x = sample(p, keyed(draws, "token"), model.params.greedy)        # [b]
        if seeds is None:
            rows.hand_out([[t] for t in x.tolist()])
        else:                                                            # rows of their own: checked, alone
            host = torch.stack([x, ~finite_rows(p)], 1).tolist()         # [b, 2], one read
            rows.fail_rows(draws, [bool(f) for _, f in host])
            rows.hand_out([[t] for t, _ in host])
        if rows.all_done:
            break
        seq = torch.cat([seq, x.unsqueeze(1)], dim=1)                    # [b, S + 1]
        mask = torch.cat([mask, mask.new_ones(len(seq), 1)], dim=1)
        seq, mask = rows.advance(seq, mask, [model])                     # finished rows leave; requests join
        p = model.catch_up(seq, mask)                                    # [b, V]
        model.rollback(model.length)                                     # nothing to undo: all final (a press)
    return rows.out, rows.finish(model.calls)
