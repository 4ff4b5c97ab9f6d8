"""One KV-cache wrapper for every sampler: prefill, catch-up, rollback.

The wrapper owns a model's cache (a backend, ``sampling.cache.backends``: dynamic, or static
slots in one of four forms), the attention mask of the cached positions and the filtered
next-token probabilities of the positions fed by the last forward pass, plus the one before them
(its *history*). That is all a speculative step reads (the target's ``gamma + 1`` verified
positions), so the history stays ``[B, <= gamma + 2, V]`` however long the sequence grows; a
draft's loop keeps the ``q`` of its own drafts. ``rollback`` trims the cache, the mask and the
history together, so they never disagree. Built with ``hidden=True`` it also keeps the last pass's
lm_head inputs (``hidden``), which speculator heads draft from.

A press (``CacheSpec.press``, ``sampling.cache.press``) may evict cached tokens: then the cache
holds fewer slots than the sequence has positions. Callers keep passing the mask of the whole
sequence; the press keeps the mask of the slots it evicted into and positions come from the whole
mask, so every token keeps its true position. Only positions a ``rollback`` has made final are
evicted, so a rollback never reaches into the compressed part.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .cache.backends import CacheBackend, make_backend
from .cache.press import Press
from .cache.spec import CacheSpec
from .params import RowParams, SamplingParams, norm_logits, one_hot_argmax, row_params


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    """Positions of a left-padded batch from its mask [B, T]: real tokens count from 0; a masked
    slot (padding, a hole) takes the count of real tokens before it (never attended: any position
    would do; this one costs two kernels)."""
    m = mask.long()
    return m.cumsum(-1) - m


class KVCacheModel:
    """A causal LM with its cache. All rows share one cache length (left padding).

    ``vocab`` restricts every distribution to the first ``vocab`` token ids: a draft and a target
    that share a tokenizer may pad their embedding matrices to different sizes. ``cache`` picks
    the backend and the press (``CacheSpec``); ``role`` ("target" or "draft"): which press setting
    applies; ``hidden``: keep the last pass's lm_head inputs (``hidden``).
    """

    def __init__(self, model, params: SamplingParams | RowParams, vocab: int | None = None,
                 cache: CacheSpec = CacheSpec(), role: str = "target", hidden: bool = False):
        self.model = model
        self.params = params
        self.vocab = vocab
        self.spec = cache.for_role(role)             # compile="draft": a draft's own static, compiled cache
        self.role = role
        self.keeps_hidden = hidden
        self.press = Press(cache.press, model) if cache.press.applies_to(role) else None
        self.backend: CacheBackend | None = None
        self.mask: torch.Tensor | None = None    # [B, L] mask of the L cached positions (holes 0)
        self.hidden: torch.Tensor | None = None  # [B, keep, D] the last pass's lm_head inputs (keeps_hidden)
        self._hist: torch.Tensor | None = None   # [B, H, V]: next-token probs of the last H positions
        self.calls = 0                           # forward passes run

    @property
    def probs(self) -> torch.Tensor:
        """[B, H, V] history: next-token probs of the positions the last forward pass fed and the
        position before them, less what ``rollback`` trimmed. Greedy (every row): the filtered
        logits instead, whose argmax is the token (``norm_logits(law=False)``)."""
        if self._hist is None or self._hist.shape[1] == 0:
            raise RuntimeError("no history: rolled back past the last forward pass")
        return self._hist

    @property
    def length(self) -> int:
        """How many positions the cache holds."""
        return 0 if self.mask is None else self.mask.shape[1]

    @property
    def filled(self) -> int:
        """How many slots the cache holds (fewer than ``length`` after a press; more with a tree's)."""
        return 0 if self.deferred else self.backend.filled

    @property
    def dropped(self) -> int:
        """Positions a press evicted (the same count in every row)."""
        return 0 if self.press is None else self.press.dropped

    @property
    def cache(self):
        """The transformers cache the model passes read and write."""
        return self.backend.cache

    def slot_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """The mask of the cache's slots (and any new ones) from the mask of the whole sequence."""
        return mask if self.press is None else self.press.slot_mask(mask)

    def _run(self, input_ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, keep: int) -> torch.Tensor:
        """The one model call: input_ids, pos [B, n] after the cache's slots; mask [B, filled + n] or
        additive [B, 1, n, filled + n]. Returns the logits of the last ``keep`` tokens [B, keep, V]."""
        if self.press is None:
            logits, self.hidden = self.backend.forward(self.model, input_ids, mask, pos, keep, self.keeps_hidden)
        else:
            with self.press.capturing():                                  # snapkv: this pass's queries
                logits, self.hidden = self.backend.forward(self.model, input_ids, mask, pos, keep, self.keeps_hidden)
        self.calls += 1
        return logits if self.vocab is None else logits[..., :self.vocab]   # [B, keep, V]

    def before_pass(self, mask: torch.Tensor) -> None:
        """A press evicts before a pass when the final part of the cache is over its budget."""
        if self.press is not None:
            self.press.before_pass(self.backend, mask)

    def _forward(self, seq: torch.Tensor, mask: torch.Tensor, n: int, keep: int) -> None:
        # seq, mask: [B, L + n] cached and new positions; feeds the last n, keeps the last keep probs
        assert mask.shape[1] == self.length + n == seq.shape[1], "mask must cover cached + new tokens"
        slots = mask
        if self.press is not None:                                        # it may evict first; its slots' mask
            self.press.before_pass(self.backend, mask)
            slots = self.press.slot_mask(mask)
        logits = self._run(seq[:, -n:], slots, position_ids(mask)[:, -n:], keep)   # [B, keep, V]
        self.mask = mask
        new = norm_logits(logits, self.params, seq, mask, law=False)      # [B, keep, V] (greedy: logits)
        prev = self._hist[:, -1:] if self._hist is not None else new[:, :0]
        self._hist = torch.cat([prev, new], dim=1)                        # [B, <= keep + 1, V]

    @torch.inference_mode()
    def prefill(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Run the prompt [B, T]; returns the next-token probs [B, V]."""
        # a press that reads a pass's last queries (snapkv) needs passes without extra tokens after them
        pad = self.press is None or self.press.capture is None
        self.backend = make_backend(self.spec, self.model, input_ids.shape[1], pad_passes=pad)
        self.mask = mask[:, :0]
        self._hist = None
        if self.press is not None:
            self.press.reset()
        self._forward(input_ids, mask, input_ids.shape[1], keep=1)
        if self.press is not None:
            self.press.commit(self.length)
            self.press_final(self.press.spec.prefill_keep(self.filled), mask)
        return self._hist[:, -1]

    def defer(self, input_ids: torch.Tensor, mask: torch.Tensor) -> None:
        """Stand for a prefill of input_ids [B, T] (mask [B, T]) without running it: the cache stays
        empty, rows still leave and join, and the first ``catch_up`` prefills the whole sequence."""
        self.backend, self._hist = None, None
        self.mask = mask[:, :0]                  # [B, 0]: the rows, no cached position

    @property
    def deferred(self) -> bool:
        """Prefilled nothing yet (``defer``)."""
        return self.backend is None

    @torch.inference_mode()
    def catch_up(self, seq: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Feed the tokens of seq [B, T] the cache has not seen yet (mask [B, T] covers all of seq);
        a deferred cache is prefilled with all of them.

        Returns the distribution of the token after seq [B, V].
        """
        if self.deferred:
            return self.prefill(seq, mask)
        n = seq.shape[1] - self.length
        if n > 0:
            self._forward(seq, mask, n, keep=n)
        return self.probs[:, -1]

    @torch.inference_mode()
    def truncate(self, slots: int) -> None:
        """Keep the cache's first ``slots`` slots: a slice of a dynamic cache, a new write position
        in a static one (nothing copied)."""
        self.backend.truncate(slots)

    @torch.inference_mode()
    def rollback(self, length: int) -> None:
        """Keep the first ``length`` cached positions (no-op if it holds fewer); trim mask and history.
        They are final: a press may evict among them before the next pass."""
        if self.deferred:
            return
        if self.press is not None:
            self.press.commit(min(length, self.length))
        k = self.length - length
        if k > 0:
            self.truncate(length - self.dropped)
            self.mask = self.mask[:, :length]
            if self._hist is not None:
                self._hist = self._hist[:, :max(0, self._hist.shape[1] - k)]

    @torch.inference_mode()
    def press_final(self, keep: int, mask: torch.Tensor) -> None:
        """Press the final positions down to ``keep`` slots now (``sampling.cache.press.Press.evict``)."""
        self.press.evict(self.backend, keep, mask)

    @torch.inference_mode()
    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only the given batch rows (finished rows stop costing compute)."""
        if not self.deferred:
            self.backend.select_rows(rows)
        self.mask = self.mask[rows]
        self.params = self.params.select(rows)   # per-row parameters follow their rows
        if self.press is not None:
            self.press.select_rows(rows)
        if self._hist is not None:
            self._hist = self._hist[rows]

    @torch.inference_mode()
    def admit(self, ids: torch.Tensor, mask: torch.Tensor, pad: int, params: list[SamplingParams]) -> None:
        """New rows join the batch between steps (continuous batching). The cached rows' slots move
        right by ``pad`` empty (masked) slots; ids, mask [n, W] are the new rows' tokens aligned with
        the batch's sequence after that shift (W = its new width). Their first ``length`` slots enter
        the cache in one prefill of the new rows; the rest stay pending, as the batch's own do.
        Positions come from the mask, so no row's positions change. ``params``: the new rows'."""
        if self.spec.kind != "dynamic" or self.press is not None:
            raise ValueError("rows join a running batch with the dynamic cache and no press only")
        b, L = len(self.mask), self.length + pad
        joined = row_params(self.params.per_row(b) + list(params))
        if self.deferred:                               # nothing cached: the new rows are prefilled with the rest
            self.params, self.mask = joined, self.mask.new_zeros(b + len(ids), 0)
            return
        # the new rows are right-aligned: the prefill runs from the first slot any of them uses, not
        # over the batch's whole width (a short prompt beside long rows costs its own length)
        start = max(0, min(L - 1, ids.shape[1] - int(mask.sum(1).max())))
        new = KVCacheModel(self.model, row_params(params), self.vocab, self.spec, self.role)
        new.prefill(ids[:, start:L], mask[:, start:L])
        self.backend.join(new.backend, pad, start)
        w = min(1, self._hist.shape[1])                 # the next pass reads the last position's law at most
        old_hist, new_hist = (h._hist[:, h._hist.shape[1] - w:] if joined.greedy or not h.params.greedy
                              else one_hot_argmax(h._hist[:, h._hist.shape[1] - w:]) for h in (self, new))
        self._hist = torch.cat([old_hist, new_hist])    # greedy logits become laws in a batch that samples
        self.mask = torch.cat([F.pad(self.mask, (pad, 0)), F.pad(new.mask, (start, 0))])
        self.params = joined
        self.calls += 1

    @torch.inference_mode()
    def drop_leading(self, n: int) -> None:
        """Forget the first ``n`` cached slots, padding in every row (continuous batching: the rows that
        made the batch that wide have left). Positions come from the mask, so none changes."""
        if self.deferred:
            return                                      # nothing cached yet: the first catch_up starts later
        if n > self.length:
            raise ValueError(f"cannot drop {n} leading slots of a cache that holds {self.length}")
        self.backend.drop_leading(n)
        self.mask = self.mask[:, n:]

    def kv_tensors(self) -> list[torch.Tensor]:
        """The cache's tensors [..., B, heads, slots, head_dim], writable in place (``CacheBackend.tensors``)."""
        return self.backend.tensors()
