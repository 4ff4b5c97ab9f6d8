"""Where a wrapper's keys and values live: five backends behind one contract (``CacheBackend``),
chosen by ``make_backend`` from a ``CacheSpec``; the same tokens from every one.

* ``DynamicBackend``: transformers' ``DynamicCache``. Every pass concatenates the new keys to the
  old ones (a copy of the whole cache per layer and step); truncating slices.
* ``SlotBackend`` (static, eager, one device): preallocated for the prompt plus the generation's
  room and addressed by position: a pass writes its keys in place and truncating moves the write
  position (nothing is copied). The model attends over the filled slots only (``SlotLayer`` hands
  it a view), and every layer's keys and values are views of one buffer (``SlotCache``): a tree's
  accepted path moves into place in one gather and one copy, where a per-layer cache takes two per
  layer and tensor.
* ``LeanBackend`` (a draft's eager passes on the CPU, whatever the cache kind): ``SlotBackend``'s
  slots, each pass through the model's own modules in a loop of the toolkit's (below).
* ``LayerSlotsBackend`` (static, eager, a model split over devices): the same slots, each layer's
  on the device where the layer runs.
* ``CompiledBackend`` (static, ``CacheSpec.compile``): transformers' ``StaticCache`` with the
  decode passes under ``torch.compile(mode="reduce-overhead")``, CUDA graphs on a GPU: every
  decode pass has the same shapes, the whole buffer with the unused slots masked, and the write
  position lives on the device.

A draft model of 2.8M parameters costs what its Python costs: transformers' ``LlamaForCausalLM``
call builds a mask, the rotary embedding and its output objects on every pass, about 1 ms of a
4 to 5 ms one-token pass of the embedded draft on this project's CPU (results/drafting/one-row).
``LeanBackend`` keeps the model's own modules (embedding, rotary embedding, decoder layers, final
norm, lm_head: the same weights and kernels, so the same logits) and calls them in a loop of its
own: the mask is built only where a pass needs one (a one-token pass of rows without padding needs
none) and the keys and values go to ``SlotCache``'s slots. It serves Llama-architecture models on
the CPU (``lean_fits``: on a GPU, where a mask would be built for every pass and SDPA would take
another kernel than transformers' call does, it is neither measured nor bit-exact, so it is not
used); any pass that asks for the hidden states takes transformers' call on the same slots.
``CacheSpec.for_role`` gives it to drafts.

Every backend's tensors may be written in place (a tree's path moved into place, a press's kept
slots), followed by ``truncate``.
"""
from __future__ import annotations

import os
import weakref
from typing import Protocol

import torch
import torch.nn.functional as F
from transformers import DynamicCache, StaticCache
from transformers.cache_utils import Cache, DynamicLayer, StaticLayer

from ..utils import cache_dir, spans_devices
from .spec import CacheSpec, slot_width

HIDDEN, NONE = {"output_hidden_states": -1}, {}   # a pass's arguments that return the last hidden states (the
                                                 # lm_head's input: ``[:, -keep:]`` of them are its kept positions)


class CacheBackend(Protocol):
    """The keys and values of one wrapper's model (``sampling.kvcache_model.KVCacheModel``)."""

    cache: Cache                     # what the model's forward takes as past_key_values
    filled: int                      # slots written so far (a host count: reading it never waits on the device)

    def forward(self, model, input_ids: torch.Tensor, mask: torch.Tensor, position_ids: torch.Tensor, keep: int,
                hidden: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One pass of ``model`` over input_ids [B, n] after the filled slots (mask [B, filled + n] or
        additive [B, 1, n, filled + n]), its keys and values written after them; returns the logits of
        the last ``keep`` tokens [B, keep, V] and, with ``hidden``, their lm_head inputs [B, keep, D]."""

    def reserve(self, slots: int) -> None:
        """Room for ``slots`` slots (a static backend grows by a copy; a dynamic one needs none)."""

    def truncate(self, slots: int) -> None:
        """Keep the first ``slots`` slots (no-op when it holds fewer)."""

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep the batch rows ``rows`` [b']."""

    def layers(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each layer's keys and values [B, H, >= filled, D], writable in place."""

    def tensors(self) -> list[torch.Tensor]:
        """The fewest tensors [..., B, H, >= filled, D] that hold every layer's keys and values,
        writable in place (one buffer for ``SlotBackend``)."""

    def join(self, other: CacheBackend, pad: int, start: int = 0) -> None:
        """Continuous batching: the rows of ``other`` join, prefilled over the batch's slots from slot
        ``start`` on (the slots before it, padding in every new row, stay empty), after this one's
        slots move right by ``pad``. ValueError where the backend cannot."""

    def drop_leading(self, n: int) -> None:
        """Continuous batching: forget the first ``n`` slots, padding in every row (the batch's
        longest rows have left), so that a batch rows keep joining stays as wide as its rows."""


class DynamicBackend:
    """transformers' ``DynamicCache``."""

    def __init__(self, model):
        self.cache = DynamicCache(config=model.config)
        self.filled = 0

    def forward(self, model, input_ids, mask, position_ids, keep, hidden):
        out = model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, past_key_values=self.cache,
                    use_cache=True, logits_to_keep=keep, **(HIDDEN if hidden else NONE))
        self.filled += input_ids.shape[1]
        return out.logits, out.hidden_states[-1][:, -keep:] if hidden else None

    def reserve(self, slots: int) -> None:
        pass

    def truncate(self, slots: int) -> None:
        if slots < self.filled:
            self.cache.crop(slots - self.filled)
            self.filled = slots

    def select_rows(self, rows: torch.Tensor) -> None:
        self.cache.batch_select_indices(rows)

    def layers(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(layer.keys, layer.values) for layer in self.cache.layers]

    def tensors(self) -> list[torch.Tensor]:
        return [t for kv in self.layers() for t in kv]

    def join(self, other: DynamicBackend, pad: int, start: int = 0) -> None:
        if any(type(layer) is not DynamicLayer for layer in self.cache.layers):
            raise ValueError(f"rows join a running batch with full-attention cache layers only, not "
                             f"{type(self.cache.layers[0]).__name__}")
        for layer, new in zip(self.cache.layers, other.cache.layers):
            for name in ("keys", "values"):
                old, add = getattr(layer, name), getattr(new, name)  # [b, H, L - pad, D], [n, H, L - start, D]
                both = old.new_zeros(len(old) + len(add), old.shape[1], old.shape[2] + pad, old.shape[3])
                both[:len(old), :, pad:], both[len(old):, :, start:] = old, add      # one copy of each
                setattr(layer, name, both)
        self.filled += pad

    def drop_leading(self, n: int) -> None:
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[:, :, n:], layer.values[:, :, n:]   # [b, H, L - n, D]
        self.filled -= n


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


class _Static:
    """What the static backends share: slots addressed by position, grown by a copy when a pass would
    overflow them, rows kept per layer."""

    cache: Cache
    filled = 0
    compiled = False

    def forward(self, model, input_ids, mask, position_ids, keep, hidden):
        self.reserve(self.filled + input_ids.shape[1])
        out = model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, past_key_values=self.cache,
                    use_cache=True, logits_to_keep=keep, **(HIDDEN if hidden else NONE))
        self.filled += input_ids.shape[1]
        return out.logits, out.hidden_states[-1][:, -keep:] if hidden else None

    @property
    def width(self) -> int:
        return self.cache.layers[0].max_cache_len

    def reserve(self, slots: int) -> None:
        """Grow the slots so that ``slots`` fit (a copy; ``CacheSpec.room`` sets the length at first)."""
        if slots <= self.width or not self.cache.layers[0].is_initialized:
            return
        self.grow(slot_width(max(slots, 2 * self.width), self.compiled))

    def grow(self, width: int) -> None:
        for layer in self.cache.layers:
            layer.max_cache_len = width
            for name in ("keys", "values"):
                t = getattr(layer, name)                                  # [B, heads, old width, head_dim]
                setattr(layer, name, F.pad(t, (0, 0, 0, width - t.shape[2])))

    def truncate(self, slots: int) -> None:
        if slots < self.filled:
            for layer in self.cache.layers:
                layer.filled = slots
            self.filled = slots

    def select_rows(self, rows: torch.Tensor) -> None:
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[rows], layer.values[rows]
            layer.batch_size = len(rows)

    def layers(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(layer.keys, layer.values) for layer in self.cache.layers]

    def tensors(self) -> list[torch.Tensor]:
        return [t for kv in self.layers() for t in kv]

    def join(self, other, pad: int, start: int = 0) -> None:
        raise ValueError("rows join a running batch with the dynamic cache and no press only")

    def drop_leading(self, n: int) -> None:
        raise ValueError("rows join a running batch with the dynamic cache and no press only")


class LayerSlotsBackend(_Static):
    """Static slots per layer, each where its layer runs (a model split over GPUs by ``--device_map``)."""

    def __init__(self, model, width: int):
        layers = model.config.get_text_config(decoder=True).num_hidden_layers
        self.cache = Cache(layers=[SlotLayer(max_cache_len=width) for _ in range(layers)])


class SlotBackend(_Static):
    """Static slots in one buffer (``SlotCache``): a model on one device."""

    def __init__(self, model, width: int):
        self.cache = SlotCache(model.config.get_text_config(decoder=True).num_hidden_layers, width)

    def grow(self, width: int) -> None:
        self.cache.set(F.pad(self.cache.kv, (0, 0, 0, width - self.cache.kv.shape[4])))

    def select_rows(self, rows: torch.Tensor) -> None:
        self.cache.set(self.cache.kv[:, :, rows])

    def tensors(self) -> list[torch.Tensor]:
        return [self.cache.kv] if self.cache.kv is not None else super().tensors()

    def join(self, other: SlotBackend, pad: int, start: int = 0) -> None:
        if not isinstance(other, SlotBackend) or self.cache.kv is None or other.cache.kv is None:
            raise ValueError("rows join a running batch of slots from slots of the same kind, both written")
        kv, add = self.cache.kv, other.cache.kv       # [layers, 2, b, H, W, D], [layers, 2, n, H, W', D]
        filled = self.filled + pad
        if other.filled != filled - start:
            raise ValueError(f"the new rows fill slots {start} to {start + other.filled}; the batch's end at {filled}")
        both = kv.new_zeros(*kv.shape[:2], kv.shape[2] + add.shape[2], kv.shape[3],
                            slot_width(max(filled, self.width)), kv.shape[5])
        both[:, :, :kv.shape[2], :, pad:filled] = kv[:, :, :, :, :self.filled]      # one copy of each
        both[:, :, kv.shape[2]:, :, start:filled] = add[:, :, :, :, :other.filled]
        self.cache.set(both)
        self._fill(filled)

    def drop_leading(self, n: int) -> None:
        self.cache.set(self.cache.kv[:, :, :, :, n:])   # a view, no copy: n slots less room until the buffer grows
        self._fill(self.filled - n)

    def _fill(self, slots: int) -> None:
        self.filled = slots
        for layer in self.cache.layers:
            layer.filled = slots


LEAN_TYPES = ("llama",)                 # model types whose decoder layers the loop calls (their forward's contract)
LEAN_ATTENTION = ("sdpa", "eager")      # attention that reads an additive 4D mask as given
HOST = torch.device("cpu")


def lean_fits(model) -> bool:
    """Whether ``LeanBackend`` runs ``model``'s passes: a Llama-architecture causal LM with SDPA or
    eager attention, whole on the CPU (module docstring)."""
    cfg = model.config
    body = getattr(model, "model", None)
    return (cfg.model_type in LEAN_TYPES and getattr(cfg, "_attn_implementation", None) in LEAN_ATTENTION
            and not getattr(model, "hf_device_map", None) and next(model.parameters()).device.type == "cpu"
            and all(hasattr(body, name) for name in ("embed_tokens", "rotary_emb", "layers", "norm"))
            and hasattr(model, "lm_head"))


def additive_mask(mask: torch.Tensor, filled: int, n: int, dtype: torch.dtype) -> torch.Tensor | None:
    """The additive mask [B, 1, n, filled + n] of a pass of n tokens after ``filled`` slots from the
    0/1 mask of every slot [B, filled + n]: new token i sees the unmasked slots up to its own, as
    transformers' mask does (a query that sees none, left padding, spreads over every slot at the
    dtype's lowest value: finite, and no real token reads it). None where nothing is hidden: one
    new token per row and no masked slot, asked only of a mask on the host (``torch.device("cpu")``):
    reading a device's mask back would make the host wait."""
    if n == 1 and mask.device == HOST and bool(mask.all()):
        return None
    keys = torch.arange(filled + n, device=mask.device)
    own = filled + torch.arange(n, device=mask.device)[:, None]                       # [n, 1]
    seen = mask[:, None, None, :].bool() & (keys <= own)                              # [B, 1, n, filled + n]
    return torch.zeros(seen.shape, dtype=dtype, device=mask.device).masked_fill_(~seen, torch.finfo(dtype).min)


class LeanBackend(SlotBackend):
    """Static slots in one buffer (``SlotBackend``), each pass through the model's modules in a loop
    of the toolkit's own (module docstring)."""

    def forward(self, model, input_ids, mask, position_ids, keep, hidden):
        if hidden:                                  # the lm_head inputs: transformers' call returns them
            return super().forward(model, input_ids, mask, position_ids, keep, hidden)
        n = input_ids.shape[1]
        self.reserve(self.filled + n)
        body = model.model
        x = body.embed_tokens(input_ids)                                              # [B, n, D]
        rotary = body.rotary_emb(x, position_ids)                                     # cos, sin [B, n, head_dim]
        if mask.dim() == 2:
            mask = additive_mask(mask, self.filled, n, x.dtype)                       # [B, 1, n, filled + n] or None
        for layer in body.layers:                   # each writes its keys and values after the filled slots
            x = layer(x, attention_mask=mask, position_ids=position_ids, past_key_values=self.cache,
                      use_cache=True, position_embeddings=rotary)
        self.filled += n
        return model.lm_head(body.norm(x[:, -keep:])), None                           # [B, keep, V]


_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()   # model -> its compiled forward


def compiled_forward(model):
    """``model.forward`` under ``torch.compile(mode="reduce-overhead")``, one per model (each new
    shape compiles once; on CUDA each is then replayed as a CUDA graph). Target and draft share one
    code object (``forward`` of their class), so the recompile limit is raised to hold every shape
    of both (1 token, a catch-up, gamma + 1, a tree; each cache growth is a new shape). Graphs are
    guarded on the modules' hooks (snapkv's query capture, transformers' own capture of hidden
    states): by default torch reuses a graph compiled without a hook for a model that has one."""
    if model not in _COMPILED:
        # inductor's compiled kernels on disk, where a second process finds them (a warm start)
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir() / "inductor"))
        torch._dynamo.config.skip_nnmodule_hook_guards = False
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        _COMPILED[model] = torch.compile(model.forward, mode="reduce-overhead", dynamic=False)
    return _COMPILED[model]


class CompiledBackend(_Static):
    """transformers' ``StaticCache``, decode passes compiled (the prefill stays eager): every pass
    attends over the whole buffer, the unused slots masked. A decode pass of n tokens runs as one of
    ``bucket(n)`` (a power of two), the extra tokens after the real ones, so the graphs are one per
    bucket, batch size and buffer width (itself a power of two), not one per token count: a catch-up
    after AR steps, a verify of any length, a tree's level."""

    compiled = True

    def __init__(self, model, width: int, pad_passes: bool = True):
        self.cache = StaticCache(config=model.config, max_cache_len=width)
        self.pad_passes = pad_passes          # False: passes run as they come (snapkv reads a pass's last queries)

    def forward(self, model, input_ids, mask, position_ids, keep, hidden):
        n = input_ids.shape[1]
        extra = bucket(n) - n if self.filled and n and self.pad_passes else 0   # decode passes; prefill: eager
        self.reserve(self.filled + n + extra)
        if extra:
            input_ids, mask, position_ids = padded_pass(input_ids, mask, position_ids, extra)
        fill = 0 if mask.dim() == 2 else torch.finfo(mask.dtype).min
        mask = F.pad(mask, (0, self.width - mask.shape[-1]), value=fill)
        forward = model
        if self.filled:
            forward = compiled_forward(model)
            torch.compiler.cudagraph_mark_step_begin()                    # earlier graph outputs may be reused
            # fresh row-major copies: a slice of the growing sequence has a new stride every step, and
            # the compiler guards on strides (it recompiled every pass until its limit, then ran eager)
            input_ids, position_ids = (t.clone(memory_format=torch.contiguous_format)
                                       for t in (input_ids, position_ids))
        out = forward(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, past_key_values=self.cache,
                      use_cache=True, logits_to_keep=keep + extra, **(HIDDEN if hidden else NONE))
        logits = out.logits[:, :keep]                                     # [B, keep, V] the real tokens'
        states = out.hidden_states[-1][:, -keep - extra:][:, :keep] if hidden else None
        if forward is not model:                                          # a graph's outputs are reused: copies
            logits, states = logits.clone(), None if states is None else states.clone()
        if extra:                                                         # the extra tokens' slots are free again
            for layer in self.cache.layers:
                layer.cumulative_length.fill_(self.filled + n)
        self.filled += n
        return logits, states

    def grow(self, width: int) -> None:
        super().grow(width)
        self._mark_static()

    def truncate(self, slots: int) -> None:
        if slots < self.filled:
            for layer in self.cache.layers:
                layer.cumulative_length.fill_(slots)
            self.filled = slots

    def select_rows(self, rows: torch.Tensor) -> None:
        super().select_rows(rows)
        self._mark_static()

    def _mark_static(self) -> None:
        # new buffers (grown, rows selected): tell the compiler their addresses are fixed
        for layer in self.cache.layers:
            for t in (layer.keys, layer.values, layer.cumulative_length):
                torch._dynamo.mark_static_address(t)


def bucket(n: int) -> int:
    """The tokens a compiled decode pass of ``n`` runs as: the next power of two."""
    return 1 << (n - 1).bit_length()


def padded_pass(input_ids: torch.Tensor, mask: torch.Tensor, position_ids: torch.Tensor, extra: int):
    """A pass of n tokens as one of n + ``extra``: the last token repeated after the real ones, at its
    position (so never past the model's last position). No real token attends to them (they come
    later, and a 2D mask [B, L] masks their slots); each extra one attends to the real tokens before
    it (2D) or to itself alone (an additive 4D mask [B, 1, n, L], a tree's), so every row of the
    pass stays finite."""
    B, n = input_ids.shape
    input_ids = torch.cat([input_ids, input_ids[:, -1:].expand(B, extra)], 1)              # [B, n + extra]
    position_ids = torch.cat([position_ids, position_ids[:, -1:].expand(B, extra)], 1)    # [B, n + extra]
    if mask.dim() == 2:
        return input_ids, F.pad(mask, (0, extra), value=0), position_ids                # [B, L + extra]
    L, low = mask.shape[-1], torch.finfo(mask.dtype).min
    out = mask.new_full((B, 1, n + extra, L + extra), low)                              # [B, 1, n + extra, L + extra]
    out[:, :, :n, :L] = mask
    out[:, :, n:, L:] = mask.new_full((extra, extra), low).fill_diagonal_(0)      # each extra one: itself
    return input_ids, out, position_ids


def backend_class(spec: CacheSpec, model) -> type:
    """Which backend ``make_backend`` gives ``model`` under ``spec`` (its passes cost accordingly:
    ``sampling.control.machine_key``)."""
    if spec.compile:
        return CompiledBackend
    if spec.lean and lean_fits(model):
        return LeanBackend
    if spec.kind == "dynamic":
        return DynamicBackend
    return LayerSlotsBackend if spans_devices(model) else SlotBackend


def make_backend(spec: CacheSpec, model, prompt_len: int, pad_passes: bool = True) -> CacheBackend:
    """The backend a spec asks for (``backend_class``), sized for a prompt of ``prompt_len`` slots plus
    ``spec.room``; ``pad_passes`` (compiled): decode passes run as their bucket (``CompiledBackend``)."""
    cls = backend_class(spec, model)
    if cls is DynamicBackend:
        return DynamicBackend(model)
    width = slot_width(prompt_len + spec.room, spec.compile)
    return CompiledBackend(model, width, pad_passes) if cls is CompiledBackend else cls(model, width)
