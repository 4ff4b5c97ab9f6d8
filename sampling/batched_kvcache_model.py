"""The KV-cache wrapper for batched speculative sampling (BASS-PAD).

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

    def realign(self, start: int, accepted: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Rows accepted ``accepted`` [b] of the drafts placed from slot ``start`` on.

        Crops the cache (and history) to ``start + max(accepted)`` slots and returns the mask of
        those slots [b, start + n_max] with every row's rejected slots masked out.
        """
        n_max = int(accepted.max())
        self.rollback(start + n_max)
        mask = mask[:, :start + n_max].clone()
        holes = torch.arange(n_max, device=mask.device) >= accepted.unsqueeze(1)  # [b, n_max]
        mask[:, start:][holes] = 0
        return mask
