"""How a wrapper keeps its keys and values: which cache, compiled or not, how much room, which press."""
from __future__ import annotations

from dataclasses import dataclass, replace

from .press import PressSpec

CACHES = ("dynamic", "static")
COMPILES = (False, True, "draft")   # off; every model's decode passes (static cache); the draft models' only
SLOT_BLOCK = 64          # a static cache's length is rounded up to this, so prompts of similar lengths share shapes


@dataclass(frozen=True)
class CacheSpec:
    """How a wrapper keeps its keys and values (``sampling.cache.backends``)."""
    kind: str = "dynamic"     # dynamic | static
    compile: bool | str = False   # True (static only): decode passes through torch.compile(mode="reduce-overhead");
                                  # "draft": the draft models' only, each on a static cache of its own
                                  # whatever ``kind`` is (the target's stays as ``kind`` says, eager)
    room: int = 0             # static: slots after the prompt (new tokens + drafts); more grow the buffer (a copy)
    lean: bool | None = None  # passes through the toolkit's own layer loop on static slots where the model allows
                              # (sampling.cache.backends.LeanBackend: transformers' logits bit for bit on the CPU);
                              # None: by role (for_role): a draft's eager passes, not a target's
    press: PressSpec = PressSpec()   # KV-cache compression and whose cache it applies to (sampling.cache.press)

    def validate(self) -> None:
        self.press.validate()
        if self.kind not in CACHES:
            raise ValueError(f"unknown kv cache {self.kind!r}; choose one of {', '.join(CACHES)}")
        if self.compile not in COMPILES:
            raise ValueError(f"compile must be False, True or 'draft', got {self.compile!r}")
        if self.compile is True and self.kind != "static":
            raise ValueError("compile needs the static kv cache (kv_cache='static'): a dynamic cache changes "
                             "shape every step")

    def for_role(self, role: str) -> CacheSpec:
        """The spec of one model's cache: with ``compile="draft"``, a draft model's is static and
        compiled, the target's not compiled; ``lean`` unset: a draft's eager passes are lean (a
        draft's passes only move what it proposes, never the output law). A spec already for a
        role stays as it is."""
        spec = self
        if self.compile == "draft":
            spec = replace(self, kind="static", compile=True) if role == "draft" else replace(self, compile=False)
        if spec.lean is None:
            spec = replace(spec, lean=role == "draft" and spec.compile is not True)
        return spec


def slot_width(slots: int, compiled: bool = False) -> int:
    """A static cache's length for ``slots`` slots, rounded up to SLOT_BLOCK; compiled, to a power of
    two (each width is a new set of graphs: prompts of 40 to 700 tokens then share 4 widths, not 12,
    for attention over at most twice the slots a pass needs, masked)."""
    width = -(-slots // SLOT_BLOCK) * SLOT_BLOCK
    return max(SLOT_BLOCK, 1 << (width - 1).bit_length()) if compiled else width
