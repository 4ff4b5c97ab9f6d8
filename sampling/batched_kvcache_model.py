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

from .kvcache_model import KVCacheModel, position_ids
from .utils import norm_logits


class BatchedKVCacheModel(KVCacheModel):
    """KVCacheModel whose rows may accept different numbers of drafts."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._slots: dict[int, torch.Tensor] = {}       # n -> arange(n) on the models' device

    def realign(self, start: int, accepted: torch.Tensor, mask: torch.Tensor, n_max: int) -> torch.Tensor:
        """Rows accepted ``accepted`` [b] of the drafts placed from slot ``start`` on; n_max = max(accepted)
        (the caller has it on the host already).

        Crops the cache (and history) to ``start + n_max`` slots and returns the mask of those slots
        [b, start + n_max] with every row's rejected slots masked out.
        """
        self.rollback(start + n_max)
        return torch.cat([mask[:, :start], self.kept(n_max, accepted, mask)], dim=1)   # the drafts' slots were all real

    def slots(self, n: int, device: torch.device) -> torch.Tensor:
        """arange(n) on the device, made once per n (a kernel fewer each step)."""
        if n not in self._slots:
            self._slots[n] = torch.arange(n, device=device)
        return self._slots[n]

    def kept(self, n: int, accepted: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The mask [b, n] (mask's dtype) of n accepted-draft slots: a row's first ``accepted`` [b]
        are real, the rest holes (no host sync, unlike indexing with a boolean mask)."""
        return (self.slots(n, accepted.device) < accepted.unsqueeze(1)).to(mask.dtype)

    # --- trees: tree slots sit after the chain until keep_tree copies the accepted path into place ---

    tree_len = 0                       # tree slots in the cache after the chain's self.length
    tree_tokens: torch.Tensor | None = None   # [b, tree_len] their tokens

    @torch.inference_mode()
    def forward_tree(self, seq: torch.Tensor, mask: torch.Tensor, tokens: torch.Tensor, allow: torch.Tensor,
                     depth: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """One forward pass over the chain tokens of seq [b, S] the cache lacks, then tree nodes
        tokens [b, n]. allow [n, T + n] or, a tree per row, [b, n, T + n]: which tree slots each new
        node sees (the T already cached after the chain, then the n new ones, itself included);
        depth [n] or [b, n]: each node's depth below the chain's last token. Returns the probs after the chain's last token [b, V] (None when
        the cache held the whole chain) and after each node [b, n, V]."""
        L, T, n, b = self.length, self.tree_len, tokens.shape[1], len(seq)
        P = seq.shape[1] - L                                              # pending chain tokens
        assert P == 0 or T == 0, "feed the chain before growing a tree"
        if T == 0:
            self._evict_over_budget(mask)                                 # a press: before the tree's first pass
        C = L - self.dropped                                              # the chain's slots (a press evicts some)
        dev = seq.device
        allow4 = torch.zeros(b, P + n, C + P + T + n, dtype=torch.bool, device=dev)
        allow4[:, :, :C + P] = self.slot_mask(mask).unsqueeze(1)          # the chain, holes and padding masked
        if P:
            allow4[:, :P, C:C + P] &= torch.ones(P, P, dtype=torch.bool, device=dev).tril()   # pending: causal
        allow4[:, P:, C + P:] = allow.to(dev)                             # nodes: their ancestors and themselves
        dtype = next(self.model.parameters()).dtype
        mask4 = torch.full(allow4.shape, torch.finfo(dtype).min, dtype=dtype, device=dev).masked_fill_(allow4, 0)
        chain_pos = position_ids(mask)                                    # [b, L + P]; the last: real tokens - 1
        depth = depth.to(dev) if depth.dim() == 2 else depth.to(dev).unsqueeze(0)     # [b or 1, n]
        pos = torch.cat([chain_pos[:, L:], (chain_pos[:, -1:] + depth).expand(b, n)], dim=1)  # [b, P + n]
        logits = self._run(torch.cat([seq[:, L:], tokens], dim=1), mask4.unsqueeze(1), pos, P + n)  # [b, P + n, V]
        p_chain = None
        if P:
            p_chain = norm_logits(logits[:, :P], self.params, seq, mask, law=False)[:, -1]   # [b, V]
        self.mask = mask
        self._hist = None
        past = self.tree_tokens if T else tokens[:, :0]
        all_tokens = torch.cat([past, tokens], dim=1)                     # [b, T + n]
        if not n:                                                         # no nodes this pass (no room left)
            p_nodes = logits[:, P:]                                       # [b, 0, V]
        elif self.params.uses_prefix:                                     # each node: chain + its ancestors
            allow_host = allow.cpu()                                      # one transfer, then host indexing
            groups = [slice(None)] if allow.dim() == 2 else [slice(i, i + 1) for i in range(b)]
            rows = []
            for r in groups:                                              # all rows at once, or a tree per row
                al, nodes = allow_host if allow.dim() == 2 else allow_host[r][0], []
                for j in range(n):
                    anc = al[j].nonzero().squeeze(1).to(dev)              # tree slots, in order
                    pre = torch.cat([seq[r], all_tokens[r][:, anc]], dim=1)
                    pm = torch.cat([mask[r], mask[r].new_ones(len(pre), len(anc))], dim=1)
                    nodes.append(norm_logits(logits[r, P + j:P + j + 1], self.params, pre, pm, law=False))
                rows.append(torch.cat(nodes, 1))
            p_nodes = torch.cat(rows, 0)
        else:
            p_nodes = norm_logits(logits[:, P:], self.params, law=False)  # [b, n, V]
        self.tree_len, self.tree_tokens = T + n, all_tokens
        return p_chain, p_nodes

    @torch.inference_mode()
    def keep_tree(self, nodes: torch.Tensor, accepted: torch.Tensor) -> None:
        """Copy the KV entries of each row's accepted nodes [b, k] (tree slots) to the slots right
        after the chain and drop the rest of the tree; slots past a row's ``accepted`` [b] are holes.
        The chain and the kept path are final (a press may evict among them)."""
        C, k = self.length - self.dropped, nodes.shape[1]                 # C: the chain's slots
        for t in self.kv_tensors() if k else ():                         # nothing kept: no copies
            idx = nodes[:, None, :, None].expand(t.shape[:-2] + (k, t.shape[-1]))   # [..., b, heads, k, head_dim]
            t[..., C:C + k, :] = t[..., C:self.filled, :].gather(-2, idx)  # gather copies first: safe in place
        self.truncate(C + k)                                              # the rest of the tree is dropped
        self.mask = torch.cat([self.mask, self.kept(k, accepted, self.mask)], dim=1)
        self.tree_len, self.tree_tokens, self._hist = 0, None, None
        self.final = self.length
