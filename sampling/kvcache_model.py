"""One KV-cache wrapper for every sampler: prefill, catch-up, rollback.

The wrapper owns a transformers ``DynamicCache``, the attention mask of the cached positions and
the filtered next-token probabilities of the positions fed by the last forward pass, plus the one
before them (its *history*). That is all a speculative step reads (the target's ``gamma + 1``
verified positions), so the history stays ``[B, <= gamma + 2, V]`` however long the sequence
grows; a draft's loop keeps the ``q`` of its own drafts. ``rollback`` trims the cache, the mask
and the history together, so they never disagree.
"""
from __future__ import annotations

import torch
from transformers import DynamicCache

from .utils import SamplingParams, norm_logits


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    """Positions of a left-padded batch from its mask [B, T]: real tokens count from 0."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


class KVCacheModel:
    """A causal LM with its cache. All rows share one cache length (left padding).

    ``vocab`` restricts every distribution to the first ``vocab`` token ids: a draft and a target
    that share a tokenizer may pad their embedding matrices to different sizes.
    """

    def __init__(self, model, params: SamplingParams, vocab: int | None = None):
        self.model = model
        self.params = params
        self.vocab = vocab
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None    # [B, L] mask of the L cached positions
        self._hist: torch.Tensor | None = None   # [B, H, V]: next-token probs of the last H positions
        self.calls = 0                           # forward passes run

    @property
    def probs(self) -> torch.Tensor:
        """[B, H, V] history: next-token probs of the positions the last forward pass fed and the
        position before them, less what ``rollback`` trimmed."""
        if self._hist is None or self._hist.shape[1] == 0:
            raise RuntimeError("no history: rolled back past the last forward pass")
        return self._hist

    @property
    def length(self) -> int:
        """How many positions the cache holds."""
        return 0 if self.mask is None else self.mask.shape[1]

    def _forward(self, seq: torch.Tensor, mask: torch.Tensor, n: int, keep: int) -> None:
        # seq, mask: [B, L + n] cached and new positions; feeds the last n, keeps the last keep probs
        assert mask.shape[1] == self.length + n == seq.shape[1], "mask must cover cached + new tokens"
        pos = position_ids(mask)[:, -n:]                                  # [B, n]
        out = self.model(input_ids=seq[:, -n:], attention_mask=mask, position_ids=pos,
                         past_key_values=self.cache, use_cache=True, logits_to_keep=keep)
        self.calls += 1
        self.mask = mask
        logits = out.logits if self.vocab is None else out.logits[..., :self.vocab]   # [B, keep, V]
        new = norm_logits(logits, self.params, seq, mask)                 # [B, keep, V]
        prev = self._hist[:, -1:] if self._hist is not None else new[:, :0]
        self._hist = torch.cat([prev, new], dim=1)                        # [B, <= keep + 1, V]

    @torch.inference_mode()
    def prefill(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Run the prompt [B, T]; returns the next-token probs [B, V]."""
        self.cache = DynamicCache(config=self.model.config)
        self.mask = mask[:, :0]
        self._hist = None
        self._forward(input_ids, mask, input_ids.shape[1], keep=1)
        return self._hist[:, -1]

    @torch.inference_mode()
    def catch_up(self, seq: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Feed the tokens of seq [B, T] the cache has not seen yet (mask [B, T] covers all of seq).

        Returns the distribution of the token after seq [B, V].
        """
        n = seq.shape[1] - self.length
        if n > 0:
            self._forward(seq, mask, n, keep=n)
        return self.probs[:, -1]

    def rollback(self, length: int) -> None:
        """Keep the first ``length`` cached positions (no-op if it holds fewer); trim mask and history."""
        k = self.length - length
        if k > 0:
            self.cache.crop(-k)
            self.mask = self.mask[:, :length]
            if self._hist is not None:
                self._hist = self._hist[:, :max(0, self._hist.shape[1] - k)]

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only the given batch rows (finished rows stop costing compute)."""
        self.cache.batch_select_indices(rows)
        self.mask = self.mask[rows]
        if self._hist is not None:
            self._hist = self._hist[rows]
