"""Autoregressive baseline: one target forward pass per new token, batched, with the KV cache."""
from __future__ import annotations

import torch

from .cache.spec import CacheSpec
from .kvcache_model import KVCacheModel
from .params import RowParams, SamplingParams, sample
from .rows import Rows


@torch.inference_mode()
def autoregressive_sampling(target, input_ids: torch.Tensor, mask: torch.Tensor, params: SamplingParams | RowParams,
                            max_new_tokens: int | list[int], eos_token_id: int | None,
                            generator: torch.Generator | None, vocab: int | None = None, streamer=None,
                            cache: CacheSpec = CacheSpec()) -> tuple[list[list[int]], dict]:
    """Sample up to ``max_new_tokens`` for each row of a left-padded batch [B, T] (mask [B, T]).

    A row stops after its EOS and is dropped from the cache, so finished rows cost nothing.
    Returns (tokens: list[list[int]], stats: dict).
    """
    rows = Rows(input_ids.shape[0], max_new_tokens, eos_token_id, input_ids.device, streamer)
    model = KVCacheModel(target, params, vocab, cache)
    p = model.prefill(input_ids, mask)                                   # [B, V]
    seq = input_ids
    while True:
        x = sample(p, generator, model.params.greedy)                    # [b]
        rows.hand_out([[t] for t in x.tolist()])
        if rows.all_done:
            break
        seq = torch.cat([seq, x.unsqueeze(1)], dim=1)                    # [b, S + 1]
        mask = torch.cat([mask, mask.new_ones(len(seq), 1)], dim=1)
        seq, mask = rows.advance(seq, mask, [model])                     # finished rows leave; requests join
        p = model.catch_up(seq, mask)                                    # [b, V]
        model.rollback(model.length)                                     # nothing to undo: all final (a press)
    return rows.out, rows.finish(model.calls)
