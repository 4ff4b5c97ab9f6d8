"""Generation over many prompts in batches, with sorted batching (BASS++)."""
from __future__ import annotations

import torch

from ..generate import GenerationResult, generate
from ..rows import merge_stats
from ..utils import model_device


def pad_left(prompts: list[list[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids [B, T] and mask [B, T] of token lists, left-padded."""
    T = max(map(len, prompts))
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), T), dtype=torch.long)
    for i, p in enumerate(prompts):
        if p:
            ids[i, T - len(p):] = torch.tensor(p)
            mask[i, T - len(p):] = 1
    return ids.to(device), mask.to(device)


def batch_order(prompts: list[list[int]], batch_size: int, sort_batch: bool) -> list[list[int]]:
    """Indices of the prompts in each batch; sorted batching groups similar lengths together."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i])) if sort_batch \
        else list(range(len(prompts)))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def generate_many(target_model, prompts: list[list[int]], *, batch_size: int, pad_id: int,
                  sort_batch: bool = False, **kwargs) -> tuple[GenerationResult, list[dict]]:
    """Run ``generate`` over all prompts in batches of ``batch_size``.

    Returns the result in the caller's order (counts summed, timings summed, rates recomputed)
    and each batch's own stats, with ``prompt_padding_fraction`` (pad share of the prompt batch).
    """
    if batch_size <= 0:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    device = model_device(target_model)
    tokens: list[list[int] | None] = [None] * len(prompts)
    per_batch = []
    for idx in batch_order(prompts, batch_size, sort_batch):
        ids, mask = pad_left([prompts[i] for i in idx], pad_id, device)
        res = generate(target_model, ids, mask, **kwargs)
        for i, row in zip(idx, res.tokens):
            tokens[i] = row
        res.stats["prompt_padding_fraction"] = 1.0 - mask.float().mean().item()
        res.stats["indices"] = idx
        per_batch.append(res.stats)
    merged = merge_stats(per_batch)                   # batches one after another: separate generations
    merged["tokens_per_s"] = merged["new_tokens"] / max(merged["wall_time_s"], 1e-9)
    rows = {i: r for s in per_batch for i, r in zip(s["indices"], s["rows"])}
    merged["rows"] = [rows[i] for i in sorted(rows)]  # per-row stats in the caller's order
    return GenerationResult(tokens, merged), per_batch
