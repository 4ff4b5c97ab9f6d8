"""The KV-cache wrapper for batched speculative sampling (BASS-PAD): rows that accept different
numbers of drafts stay aligned.

After a verification every row has accepted its own number of drafts. BASS-PAD keeps the rows
aligned by padding; of the two ways to do it this wrapper masks the holes rather than shifting rows:

* shift: move each shorter row's keys/values right by (n_max - n_i) and mask the leading slots.
  Every step then moves the whole cache (layers x B x heads x length x head_dim) in memory.
* mask the holes (chosen): one ``crop`` to the longest accepted row, then the rejected slots of the
  other rows become holes with mask 0. Nothing moves; positions come from ``mask.cumsum`` so every
  token keeps its true position (RoPE, learned positions and ALiBi alike). The price is attention
  over the masked slots, at most gamma per row and step, which ``padding_fraction`` reports; for
  the short generations this toolkit targets it is far cheaper than moving the cache.
"""
from __future__ import annotations

import torch

from .kvcache_model import KVCacheModel


class BatchedKVCacheModel(KVCacheModel):
    """KVCacheModel whose rows may accept different numbers of drafts."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._slots: dict[int, torch.Tensor] = {}       # n -> arange(n) on the models' device

    def realign(self, start: int, accepted: torch.Tensor, n_max: int) -> torch.Tensor:
        """Rows accepted ``accepted`` [b] of the drafts fed from slot ``start`` on; n_max = max(accepted)
        (the caller has it on the host already). Crops the cache (and history) to ``start + n_max``
        slots; its mask, returned [b, start + n_max], has every row's rejected slots masked out."""
        mask = self.mask
        self.rollback(start + n_max)
        self.mask = torch.cat([mask[:, :start], self.kept(n_max, accepted, mask)], dim=1)   # the drafts were real
        return self.mask

    def slots(self, n: int, device: torch.device) -> torch.Tensor:
        """arange(n) on the device, made once per n (a kernel fewer each step)."""
        if n not in self._slots:
            self._slots[n] = torch.arange(n, device=device)
        return self._slots[n]

    def kept(self, n: int, accepted: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The mask [b, n] (mask's dtype) of n accepted-draft slots: a row's first ``accepted`` [b]
        are real, the rest holes (no host sync, unlike indexing with a boolean mask)."""
        return (self.slots(n, accepted.device) < accepted.unsqueeze(1)).to(mask.dtype)
