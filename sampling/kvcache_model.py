"""One KV-cache wrapper for every sampler: prefill, catch-up, rollback.

The wrapper owns a transformers ``DynamicCache``, the attention mask of the cached positions and
the filtered next-token probabilities of every position fed after the prompt (its *history*).
``rollback`` trims the cache, the mask and the history together, so they never disagree. The
history lives in a buffer that doubles when full, so appending a step copies that step only.
"""
from __future__ import annotations

import torch
from transformers import DynamicCache

from .utils import SamplingParams, norm_logits


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    """Positions of a left-padded batch from its mask [B, T]: real tokens count from 0."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


class KVCacheModel:
    """A causal LM with its cache. All rows share one cache length (left padding)."""

    def __init__(self, model, params: SamplingParams):
        self.model = model
        self.params = params
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None    # [B, L] mask of the L cached positions
        self._buf: torch.Tensor | None = None    # [B, capacity, V]: the history in its first H slots
        self._h = 0                              # H, the history's length
        self.calls = 0                           # forward passes run

    @property
    def probs(self) -> torch.Tensor:
        """[B, H, V] history: next-token probs of the last H positions (the prompt's last, then
        every position fed after it). A view of the buffer: read it before the next catch_up."""
        return self._buf[:, :self._h]

    def _append(self, new: torch.Tensor) -> None:
        """Add new [B, n, V] to the history."""
        h = self._h + new.shape[1]
        if self._buf is None or h > self._buf.shape[1]:              # grow: double the capacity
            buf = new.new_empty(new.shape[0], max(h, 2 * self._h, 16), new.shape[2])
            if self._h:
                buf[:, :self._h] = self.probs
            self._buf = buf
        self._buf[:, self._h:h] = new
        self._h = h

    @property
    def length(self) -> int:
        """How many positions the cache holds."""
        return 0 if self.mask is None else self.mask.shape[1]

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, keep: int) -> torch.Tensor:
        # ids: [B, n] new tokens; mask: [B, L + n] covering cached and new positions
        assert mask.shape[1] == self.length + ids.shape[1], "mask must cover cached + new tokens"
        pos = position_ids(mask)[:, -ids.shape[1]:]                      # [B, n]
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos,
                         past_key_values=self.cache, use_cache=True, logits_to_keep=keep)
        self.calls += 1
        self.mask = mask
        return norm_logits(out.logits, self.params)                      # [B, keep, V]

    @torch.inference_mode()
    def prefill(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Run the prompt [B, T]; the history starts with the next-token probs [B, V] it returns."""
        self.cache = DynamicCache(config=self.model.config)
        self.mask = mask[:, :0]
        self._buf, self._h = None, 0
        self._append(self._forward(input_ids, mask, keep=1))             # [B, 1, V]
        return self.probs[:, -1]

    @torch.inference_mode()
    def catch_up(self, seq: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Feed the tokens of seq [B, T] the cache has not seen yet (mask [B, T] covers all of seq).

        Appends their next-token probabilities to the history and returns the history's last
        entry [B, V]: the distribution of the token after seq.
        """
        n = seq.shape[1] - self.length
        if n > 0:
            self._append(self._forward(seq[:, -n:], mask, keep=n))       # [B, n, V]
        return self.probs[:, -1]

    def rollback(self, length: int) -> None:
        """Keep the first ``length`` cached positions (no-op if it holds fewer); trim mask and history."""
        k = self.length - length
        if k > 0:
            self.cache.crop(-k)
            self.mask = self.mask[:, :length]
            self._h -= k

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only the given batch rows (finished rows stop costing compute)."""
        self.cache.batch_select_indices(rows)
        self.mask = self.mask[rows]
        self._buf = self._buf[rows, :self._h]     # a copy: capacity back to H, grows again on append
