"""Tree attention in the cache: a draft tree's nodes are fed after the chain in one pass, each
seeing the prefix and its ancestors through a 4D mask (positions: the prefix's length plus the
node's depth), and afterwards the accepted path's keys and values are copied into place and the
rest of the tree dropped (Medusa, EAGLE), with BASS-PAD's holes where rows accepted paths of
different lengths. The draft model drafts level by level into its cache, the target verifies the
whole tree in one pass (``sampling.drafters.tree``, ``sampling.verify.tree``).
"""
from __future__ import annotations

import torch

from ..batched_kvcache_model import BatchedKVCacheModel
from ..kvcache_model import position_ids
from ..params import norm_logits


class TreeKVCacheModel(BatchedKVCacheModel):
    """A batched wrapper whose cache may hold a tree's slots after the chain until ``keep_tree``
    copies the accepted path into place."""

    tree_len = 0                       # tree slots in the cache after the chain's self.length
    tree_tokens: torch.Tensor | None = None   # [b, tree_len] their tokens

    @torch.inference_mode()
    def forward_tree(self, seq: torch.Tensor, mask: torch.Tensor, tokens: torch.Tensor, allow: torch.Tensor,
                     depth: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """One forward pass over the chain tokens of seq [b, S] the cache lacks, then tree nodes
        tokens [b, n]. allow [n, T + n] or, a tree per row, [b, n, T + n]: which tree slots each new
        node sees (the T already cached after the chain, then the n new ones, itself included);
        depth [n] or [b, n]: each node's depth below the chain's last token. Returns the probs after
        the chain's last token [b, V] (None when the cache held the whole chain) and after each node
        [b, n, V]."""
        L, T, n, b = self.length, self.tree_len, tokens.shape[1], len(seq)
        P = seq.shape[1] - L                                              # pending chain tokens
        assert P == 0 or T == 0, "feed the chain before growing a tree"
        if T == 0:
            self.before_pass(mask)                                        # a press: before the tree's first pass
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
        if self.press is not None:
            self.press.commit(self.length)
