"""Generation over many prompts in batches, with sorted batching (BASS++)."""
from __future__ import annotations

import torch

from .generate import GenerationResult, generate, sum_hists
from .models import model_device


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
    return GenerationResult(tokens, merge_stats(per_batch)), per_batch


def merge_stats(per_batch: list[dict]) -> dict:
    """Overall stats of several batches run one after another."""
    out = {k: sum(s[k] for s in per_batch) for k in
           ("new_tokens", "target_calls", "draft_calls", "drafted", "accepted", "wall_time_s")}
    row_calls = sum(s["new_tokens"] / max(s["mean_accepted_tokens"], 1e-9) for s in per_batch)
    out.update(acceptance_rate=out["accepted"] / out["drafted"] if out["drafted"] else 0.0,
               mean_accepted_tokens=out["new_tokens"] / max(row_calls, 1e-9),
               ttft_s=sum(s["ttft_s"] for s in per_batch) / len(per_batch),
               ttft_tokens=sum(s["ttft_tokens"] for s in per_batch),   # every batch's first hand-out
               tokens_per_s=out["new_tokens"] / max(out["wall_time_s"], 1e-9),
               prompt_padding_fraction=sum(s["prompt_padding_fraction"] for s in per_batch) / len(per_batch))
    if any("padding_fraction" in s for s in per_batch):
        out["padding_fraction"] = sum(s.get("padding_fraction", 0.0) for s in per_batch) / len(per_batch)
    if any("rows_verified" in s for s in per_batch):
        out["rows_verified"] = sum(s.get("rows_verified", 0) for s in per_batch)
    if any("gamma_trace" in s for s in per_batch):
        out["gamma_trace"] = [g for s in per_batch for g in s.get("gamma_trace", [])]
    if any("accepted_hist" in s for s in per_batch):
        out["accepted_hist"] = sum_hists([s.get("accepted_hist", []) for s in per_batch])
    if all("rows" in s and "indices" in s for s in per_batch):     # per-row stats in the caller's order
        rows = {i: r for s in per_batch for i, r in zip(s["indices"], s["rows"])}
        out["rows"] = [rows[i] for i in sorted(rows)]
    return out
