"""One KV-cache wrapper for every sampler: prefill, catch-up, rollback.

The wrapper owns a transformers cache, the attention mask of the cached positions and the filtered
next-token probabilities of the positions fed by the last forward pass, plus the one before them
(its *history*). That is all a speculative step reads (the target's ``gamma + 1`` verified
positions), so the history stays ``[B, <= gamma + 2, V]`` however long the sequence grows; a
draft's loop keeps the ``q`` of its own drafts. ``rollback`` trims the cache, the mask and the
history together, so they never disagree.

Two caches (``CacheSpec.kind``), the same tokens from both:

* ``dynamic``: transformers' ``DynamicCache``. Every pass concatenates the new keys to the old
  ones (a copy of the whole cache per layer and step); rollback slices.
* ``static``: preallocated for the prompt plus the generation's room and addressed by position:
  a pass writes its keys in place and rollback is a change of the write position (nothing is
  copied). Eager, the model attends over the filled slots only (``SlotLayer`` hands it a view),
  and every layer's keys and values are views of one buffer (``SlotCache``: a tree's accepted path
  moves into place in one gather and one copy, where the dynamic cache takes two per layer and tensor);
  compiled (``CacheSpec.compile``: ``torch.compile(mode="reduce-overhead")``, CUDA graphs on a
  GPU) it is transformers' ``StaticCache``: every decode pass has the same shapes, the whole
  buffer with the unused slots masked, and the write position lives on the device.

A press (``CacheSpec.press``, ``sampling.press``) may evict cached tokens: then the cache holds
fewer slots than the sequence has positions. Callers keep passing the mask of the whole sequence;
the wrapper keeps the mask of the slots it evicted into (``slot_mask``) and takes positions from
the whole mask, so every token keeps its true position. Only positions a ``rollback`` has made
final are evicted, so a rollback never reaches into the compressed part.
"""
from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache, StaticCache
from transformers.cache_utils import Cache, DynamicLayer, StaticLayer

from .models import spans_devices
from .press import PressSpec, QueryCapture, scores, select
from .utils import RowParams, SamplingParams, norm_logits, one_hot_argmax, row_params

CACHES = ("dynamic", "static")
SLOT_BLOCK = 64          # a static cache's length is rounded up to this, so prompts of similar lengths share shapes


@dataclass(frozen=True)
class CacheSpec:
    """How a wrapper keeps its keys and values (see the module's docstring)."""
    kind: str = "dynamic"     # dynamic | static
    compile: bool = False     # static only: decode passes through torch.compile(mode="reduce-overhead")
    room: int = 0             # static: slots after the prompt (new tokens + drafts); more grow the buffer (a copy)
    press: PressSpec = PressSpec()   # KV-cache compression and whose cache it applies to (sampling.press)

    def validate(self) -> None:
        self.press.validate()
        if self.kind not in CACHES:
            raise ValueError(f"unknown kv cache {self.kind!r}; choose one of {', '.join(CACHES)}")
        if self.compile and self.kind != "static":
            raise ValueError("compile needs the static kv cache (kv_cache='static'): a dynamic cache changes "
                             "shape every step")


def slot_width(slots: int, compiled: bool = False) -> int:
    """A static cache's length for ``slots`` slots, rounded up to SLOT_BLOCK; compiled, to a power of
    two (each width is a new set of graphs: prompts of 40 to 700 tokens then share 4 widths, not 12,
    for attention over at most twice the slots a pass needs, masked)."""
    width = -(-slots // SLOT_BLOCK) * SLOT_BLOCK
    return max(SLOT_BLOCK, 1 << (width - 1).bit_length()) if compiled else width


class SlotLayer(StaticLayer):
    """A preallocated layer for eager passes: new keys are copied into the slots after the filled
    ones and the model gets a view of the filled slots (no attention over empty ones). ``filled``
    is a host count, so neither the write nor the mask needs the device."""

    filled = 0

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        f, n = self.filled, key_states.shape[-2]
        self.keys[:, :, f:f + n].copy_(key_states)
        self.values[:, :, f:f + n].copy_(value_states)
        self.filled = f + n
        return self.keys[:, :, :f + n], self.values[:, :, :f + n]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.filled + query_length, 0

    def get_seq_length(self) -> int:
        return self.filled


class SlotCache(Cache):
    """The eager static cache: ``SlotLayer``s whose keys and values are views of one buffer ``kv``
    [layers, 2, B, H, W, D] (made at the first write, from that layer's shapes), so what every layer
    undergoes at once (a tree's accepted path moved into place, rows kept, the buffer grown) is one
    operation on ``kv``, not one per layer and tensor."""

    def __init__(self, layers: int, width: int):
        super().__init__(layers=[SlotLayer(max_cache_len=width) for _ in range(layers)])
        self.kv: torch.Tensor | None = None

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if self.kv is None:
            b, h, _, d = key_states.shape
            self.set(key_states.new_zeros(len(self.layers), 2, b, h, self.layers[0].max_cache_len, d))
        h, d = self.kv.shape[3], self.kv.shape[5]
        if (key_states.shape[1], key_states.shape[3], value_states.shape[3]) != (h, d, d):   # else copy_ broadcasts
            raise ValueError(f"the static cache needs every layer's keys and values alike; layer {layer_idx} has "
                             f"{tuple(key_states.shape)} and {tuple(value_states.shape)}, layer 0 {h} heads of "
                             f"{d}: use kv_cache='dynamic'")
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def set(self, kv: torch.Tensor) -> None:
        """Make ``kv`` [layers, 2, B, H, W, D] the buffer: every layer's keys and values its views."""
        self.kv = kv
        for i, layer in enumerate(self.layers):
            layer.keys, layer.values = kv[i, 0], kv[i, 1]                 # [B, H, W, D] each
            layer.batch_size, layer.num_heads, layer.max_cache_len, layer.k_head_dim = kv.shape[2:]
            layer.v_head_dim, layer.dtype, layer.device = kv.shape[-1], kv.dtype, kv.device
            layer.is_initialized = True


_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()   # model -> its compiled forward


def compiled_forward(model):
    """``model.forward`` under ``torch.compile(mode="reduce-overhead")``, one per model (each new
    shape compiles once; on CUDA each is then replayed as a CUDA graph). Target and draft share one
    code object (``forward`` of their class), so the recompile limit is raised to hold every shape
    of both (1 token, a catch-up, gamma + 1, a tree; each cache growth is a new shape). Graphs are
    guarded on the modules' hooks: by default torch reuses a graph compiled without a hook for a
    model that has one (speculator heads read the target's hidden state through a hook on its
    lm_head; a graph from a model without it left them drafting from a stale state)."""
    if model not in _COMPILED:
        torch._dynamo.config.skip_nnmodule_hook_guards = False
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        _COMPILED[model] = torch.compile(model.forward, mode="reduce-overhead", dynamic=False)
    return _COMPILED[model]


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
    the cache (``CacheSpec``).
    """

    def __init__(self, model, params: SamplingParams | RowParams, vocab: int | None = None, cache: CacheSpec = CacheSpec(),
                 role: str = "target"):
        self.model = model
        self.params = params
        self.vocab = vocab
        self.spec = cache
        self.press = cache.press if cache.press.applies_to(role) else None   # role: "target" or "draft"
        self.cache: Cache | None = None
        self.filled = 0                          # slots the cache holds (the chain's, then any tree's)
        self.mask: torch.Tensor | None = None    # [B, L] mask of the L cached positions
        self._hist: torch.Tensor | None = None   # [B, H, V]: next-token probs of the last H positions
        self.calls = 0                           # forward passes run
        self.final = 0                           # positions made final by a rollback: a press may evict them
        self.frozen = 0                          # positions before this went through the press ...
        self.frozen_mask: torch.Tensor | None = None   # [B, frozen - dropped] ... into these slots
        self.evictions = 0                       # times the press ran
        self._capture = QueryCapture(model, self.press.window) if self.press and self.press.kind == "snapkv" \
            else None

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
    def static(self) -> bool:
        return self.spec.kind == "static"

    def _run(self, input_ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, keep: int) -> torch.Tensor:
        """The one model call: input_ids, pos [B, n] after the cache's slots; mask [B, filled + n] or
        additive [B, 1, n, filled + n]. Returns the logits of the last ``keep`` tokens [B, keep, V]."""
        n, forward = input_ids.shape[1], self.model
        if self.static:
            self._reserve(self.filled + n)
        if self.spec.compile:                                             # the whole buffer, unused slots masked
            width = self.cache.layers[0].max_cache_len
            fill = 0 if mask.dim() == 2 else torch.finfo(mask.dtype).min
            mask = F.pad(mask, (0, width - mask.shape[-1]), value=fill)
            if self.filled:                                               # decode passes; prefill stays eager
                forward = compiled_forward(self.model)
                torch.compiler.cudagraph_mark_step_begin()                # earlier graph outputs may be reused
                # fresh row-major copies: a slice of the growing sequence has a new stride every step, and
                # the compiler guards on strides (it recompiled every pass until its limit, then ran eager)
                input_ids, pos = (t.clone(memory_format=torch.contiguous_format) for t in (input_ids, pos))
        with self._capture or contextlib.nullcontext():                   # snapkv: this pass's queries
            out = forward(input_ids=input_ids, attention_mask=mask, position_ids=pos, past_key_values=self.cache,
                          use_cache=True, logits_to_keep=keep)
        logits = out.logits.clone() if forward is not self.model else out.logits   # a graph's output is reused
        self.calls += 1
        self.filled += n
        return logits if self.vocab is None else logits[..., :self.vocab]   # [B, keep, V]

    def _reserve(self, slots: int) -> None:
        """Grow a static cache that would overflow (a copy; its length is set by ``CacheSpec.room``)."""
        layer = self.cache.layers[0]
        if slots <= layer.max_cache_len or not layer.is_initialized:
            return
        width = slot_width(max(slots, 2 * layer.max_cache_len), self.spec.compile)
        if isinstance(self.cache, SlotCache):
            self.cache.set(F.pad(self.cache.kv, (0, 0, 0, width - self.cache.kv.shape[4])))
            return
        for layer in self.cache.layers:
            layer.max_cache_len = width
            for name in ("keys", "values"):
                t = getattr(layer, name)                                  # [B, heads, old width, head_dim]
                setattr(layer, name, F.pad(t, (0, 0, 0, width - t.shape[2])))
        self._mark_static()

    def _mark_static(self) -> None:
        # new static buffers (grown, rows selected): tell the compiler their addresses are fixed
        if self.spec.compile:
            for layer in self.cache.layers:
                for t in (layer.keys, layer.values, layer.cumulative_length):
                    torch._dynamo.mark_static_address(t)

    def _forward(self, seq: torch.Tensor, mask: torch.Tensor, n: int, keep: int) -> None:
        # seq, mask: [B, L + n] cached and new positions; feeds the last n, keeps the last keep probs
        assert mask.shape[1] == self.length + n == seq.shape[1], "mask must cover cached + new tokens"
        self._evict_over_budget(mask)
        logits = self._run(seq[:, -n:], self.slot_mask(mask), position_ids(mask)[:, -n:], keep)   # [B, keep, V]
        self.mask = mask
        new = norm_logits(logits, self.params, seq, mask, law=False)      # [B, keep, V] (greedy: logits)
        prev = self._hist[:, -1:] if self._hist is not None else new[:, :0]
        self._hist = torch.cat([prev, new], dim=1)                        # [B, <= keep + 1, V]

    @torch.inference_mode()
    def prefill(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Run the prompt [B, T]; returns the next-token probs [B, V]."""
        if self.static:
            width = slot_width(input_ids.shape[1] + self.spec.room, self.spec.compile)
            if self.spec.compile:
                self.cache = StaticCache(config=self.model.config, max_cache_len=width)
            else:
                layers = self.model.config.get_text_config(decoder=True).num_hidden_layers
                # a model split over GPUs (--device_map) keeps each layer's slots where the layer runs
                self.cache = Cache(layers=[SlotLayer(max_cache_len=width) for _ in range(layers)]) \
                    if spans_devices(self.model) else SlotCache(layers, width)
        else:
            self.cache = DynamicCache(config=self.model.config)
        self.filled = self.final = self.frozen = 0
        self.frozen_mask = None
        self.mask = mask[:, :0]
        self._hist = None
        self._forward(input_ids, mask, input_ids.shape[1], keep=1)
        self.final = self.length
        if self.press is not None:
            self.press_final(self.press.prefill_keep(self.filled), mask)
        return self._hist[:, -1]

    @torch.inference_mode()
    def fill_random(self, batch: int, length: int, generator: torch.Generator | None = None) -> None:
        """A cache of ``length`` random keys and values per row, as if a prompt had been run (for
        timing passes against a cache length without paying the prefill: benchmark.cost_model)."""
        cfg = self.model.config.get_text_config(decoder=True)
        heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        p = next(self.model.parameters())
        self.prefill(torch.zeros(batch, 1, dtype=torch.long, device=p.device),
                     torch.ones(batch, 1, dtype=torch.long, device=p.device))   # builds the cache
        self.truncate(0)
        if self.static:
            self._reserve(length)
        kv = torch.randn(batch, heads, length, dim, generator=generator, dtype=p.dtype).to(p.device)
        for i in range(len(self.cache.layers)):
            self.cache.update(kv, kv, i)
        self.filled, self.mask, self._hist = length, torch.ones(batch, length, dtype=torch.long, device=p.device), None

    @torch.inference_mode()
    def catch_up(self, seq: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Feed the tokens of seq [B, T] the cache has not seen yet (mask [B, T] covers all of seq).

        Returns the distribution of the token after seq [B, V].
        """
        n = seq.shape[1] - self.length
        if n > 0:
            self._forward(seq, mask, n, keep=n)
        return self.probs[:, -1]

    @torch.inference_mode()
    def truncate(self, slots: int) -> None:
        """Keep the cache's first ``slots`` slots: a slice of a dynamic cache, a new write position
        in a static one (nothing copied)."""
        if slots < self.filled:
            if self.static:
                for layer in self.cache.layers:
                    if isinstance(layer, SlotLayer):
                        layer.filled = slots
                    else:
                        layer.cumulative_length.fill_(slots)
            else:
                self.cache.crop(slots - self.filled)
            self.filled = slots

    @torch.inference_mode()
    def rollback(self, length: int) -> None:
        """Keep the first ``length`` cached positions (no-op if it holds fewer); trim mask and history.
        They are final: a press may evict among them before the next pass."""
        if length < self.frozen:
            raise RuntimeError(f"rollback to {length} reaches into the compressed part (before {self.frozen})")
        self.final = min(length, self.length)
        k = self.length - length
        if k > 0:
            self.truncate(length - self.dropped)
            self.mask = self.mask[:, :length]
            if self._hist is not None:
                self._hist = self._hist[:, :max(0, self._hist.shape[1] - k)]

    @torch.inference_mode()
    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only the given batch rows (finished rows stop costing compute)."""
        if isinstance(self.cache, SlotCache):
            self.cache.set(self.cache.kv[:, :, rows])
        elif self.static:
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[rows], layer.values[rows]
                layer.batch_size = len(rows)
            self._mark_static()
        else:
            self.cache.batch_select_indices(rows)
        self.mask = self.mask[rows]
        self.params = self.params.select(rows)   # per-row parameters follow their rows
        if self.frozen_mask is not None:
            self.frozen_mask = self.frozen_mask[rows]
        if self._capture is not None:
            self._capture.select_rows(rows)
        if self._hist is not None:
            self._hist = self._hist[rows]

    @torch.inference_mode()
    def admit(self, ids: torch.Tensor, mask: torch.Tensor, pad: int, params: list[SamplingParams]) -> None:
        """New rows join the batch between steps (continuous batching). The cached rows' slots move
        right by ``pad`` empty (masked) slots; ids, mask [n, W] are the new rows' tokens aligned with
        the batch's sequence after that shift (W = its new width). Their first ``length`` slots enter
        the cache in one prefill of the new rows; the rest stay pending, as the batch's own do.
        Positions come from the mask, so no row's positions change. ``params``: the new rows'."""
        if self.static or self.press is not None:
            raise ValueError("rows join a running batch with the dynamic cache and no press only")
        if any(type(layer) is not DynamicLayer for layer in self.cache.layers):
            raise ValueError(f"rows join a running batch with full-attention cache layers only, not "
                             f"{type(self.cache.layers[0]).__name__}")
        b, L = len(self.mask), self.length + pad
        new = KVCacheModel(self.model, row_params(params), self.vocab, self.spec)
        new.prefill(ids[:, :L], mask[:, :L])
        for layer, other in zip(self.cache.layers, new.cache.layers):
            for name in ("keys", "values"):
                old, add = getattr(layer, name), getattr(other, name)      # [b, H, L - pad, D], [n, H, L, D]
                both = old.new_zeros(b + len(add), old.shape[1], L, old.shape[3])   # one copy of each
                both[:b, :, pad:], both[b:] = old, add
                setattr(layer, name, both)
        w = min(1, self._hist.shape[1])                 # the next pass reads the last position's law at most
        joined = row_params(self.params.per_row(b) + list(params))
        old_hist, new_hist = (h._hist[:, h._hist.shape[1] - w:] if joined.greedy or not h.params.greedy
                              else one_hot_argmax(h._hist[:, h._hist.shape[1] - w:]) for h in (self, new))
        self._hist = torch.cat([old_hist, new_hist])    # greedy logits become laws in a batch that samples
        self.mask = torch.cat([F.pad(self.mask, (pad, 0)), new.mask])
        self.filled, self.final = self.filled + pad, self.final + pad
        self.params = joined
        self.calls += 1

    def kv_tensors(self) -> list[torch.Tensor]:
        """The cache's tensors [..., B, heads, slots, head_dim]: the static cache's one buffer (every
        layer's keys and values), else each layer's keys and values."""
        if isinstance(self.cache, SlotCache) and self.cache.kv is not None:
            return [self.cache.kv]
        return [t for layer in self.cache.layers for t in (layer.keys, layer.values)]

    # --- presses (sampling.press): evict final positions, keep the rest in order after them ---

    @property
    def dropped(self) -> int:
        """Positions evicted (the same count in every row)."""
        return 0 if self.frozen_mask is None else self.frozen - self.frozen_mask.shape[1]

    def slot_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """The mask of the cache's slots (and any new ones) from the mask of the whole sequence
        [B, L (+ n)]: the evicted-into slots' own mask, then the positions after them."""
        if self.frozen_mask is None:
            return mask
        return torch.cat([self.frozen_mask, mask[:, self.frozen:]], dim=1)

    def _evict_over_budget(self, mask: torch.Tensor) -> None:
        """Before a pass: if the final part of the cache holds more than the press's budget, press it."""
        budget = self.press.budget if self.press is not None else None
        if budget is not None and self.final - self.dropped > budget:
            self.press_final(budget, mask)

    @torch.inference_mode()
    def press_final(self, keep: int, mask: torch.Tensor) -> None:
        """Evict among the final positions down to ``keep`` slots, by the press's scores, layer by
        layer; the slots after them (drafts in flight) move down behind the kept ones. mask: of the
        whole sequence [B, >= final] (holes included)."""
        C = self.final - self.dropped                                     # final slots
        if keep >= C:
            return
        smask = self.slot_mask(mask)[:, :C]                               # [B, C]
        U = self.filled - C                                               # slots in flight after them
        kept_mask = None
        for i, layer in enumerate(self.cache.layers):
            q = self._capture.queries(i) if self._capture is not None else None
            keys = layer.keys[:, :, :C]                                   # [B, H, C, D]
            idx = select(scores(self.press, keys, smask, q), smask, keep)  # [B, keep]
            if kept_mask is None:
                kept_mask = smask.gather(1, idx)                          # the same in every layer
            for name in ("keys", "values"):
                t = getattr(layer, name)                                  # [B, H, >= C + U, D]
                g = t[:, :, :C].gather(2, idx[:, None, :, None].expand(-1, t.shape[1], -1, t.shape[3]))
                if self.static:
                    tail = t[:, :, C:C + U].clone()
                    t[:, :, :keep].copy_(g)
                    t[:, :, keep:keep + U].copy_(tail)
                else:
                    setattr(layer, name, torch.cat([g, t[:, :, C:]], dim=2))
        if self.static:
            for layer in self.cache.layers:
                if isinstance(layer, SlotLayer):
                    layer.filled = keep + U
                else:
                    layer.cumulative_length.fill_(keep + U)
        self.filled = keep + U
        self.frozen_mask, self.frozen = kept_mask, self.final               # dropped: C - keep more
        self.evictions += 1
