"""Loading models and tokenizers: the embedded default pair, local folders or hub ids."""
from __future__ import annotations

import atexit
import functools
import os
import shutil
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch

from ..skinny import ONE_ROW, skinny_linears
from ..storage import dequantize_int8, quantize_int8
from ..utils import vocab_size

REPO = Path(__file__).resolve().parents[2]
DEFAULT_TARGET = REPO / "models" / "target"
DEFAULT_DRAFT = REPO / "models" / "draft"
DEFAULT_SPECULATOR = REPO / "models" / "speculator"     # <kind>/ under it: mlp, medusa
DEFAULT_CASCADE = (REPO / "models" / "draft_small", DEFAULT_DRAFT)   # mode cascade: smallest first
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
WEIGHTS = "model.safetensors"
INT8_WEIGHTS = "model.int8.safetensors"   # a name from_pretrained does not read (it would cast int8 to float)


def is_int8_folder(src) -> bool:
    """A model folder whose weights ``save_int8`` wrote (from_pretrained cannot read them)."""
    return os.path.isfile(os.path.join(str(src), INT8_WEIGHTS))


def save_int8(model, path: str) -> None:
    """The model's config and its weights through ``quantize_int8`` (tied weights stored once) in
    ``INT8_WEIGHTS``, replacing any float weights of the folder; ``load_model`` dequantizes them.
    The file is written whole or not at all."""
    from safetensors.torch import save_file
    os.makedirs(path, exist_ok=True)
    model.config.save_pretrained(path)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(path)
    state, seen = {}, set()
    for k, v in model.state_dict().items():
        if v.data_ptr() in seen:                      # a tied copy (lm_head = embeddings)
            continue
        seen.add(v.data_ptr())
        state[k] = v
    tmp = os.path.join(path, INT8_WEIGHTS + ".tmp")
    save_file(quantize_int8(state), tmp, metadata={"format": "pt", "storage": "int8 per-row scales"})
    os.replace(tmp, os.path.join(path, INT8_WEIGHTS))
    if os.path.exists(os.path.join(path, WEIGHTS)):
        os.remove(os.path.join(path, WEIGHTS))       # two weight files would disagree


def _load_int8(src: str, config, dtype, role: str):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = model.load_state_dict(dequantize_int8(load_file(os.path.join(src, INT8_WEIGHTS)), dtype),
                                                strict=False)
    model.tie_weights()
    tied = {k for k, v in model.state_dict().items()
            if any(v.data_ptr() == w.data_ptr() for j, w in model.state_dict().items() if j != k)}
    if unexpected or set(missing) - tied:
        raise ValueError(f"cannot load {role} {src!r}: its int8 weights do not fit its config "
                         f"(missing {sorted(set(missing) - tied)[:3]}, unexpected {sorted(unexpected)[:3]})")
    return model


DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")   # accelerate's big-model placements


@dataclass(frozen=True)
class Placement:
    """Where a model's layers go: all on one device (``device_map`` None), or spread by accelerate's
    big-model inference over the GPUs, the CPU and the disk, within ``max_memory``."""
    device_map: str | None = None       # auto | balanced | balanced_low_0 | sequential (DEVICE_MAPS); None: one device
    max_memory: str | None = None       # per device, "0=20GiB,1=20GiB,cpu=64GiB"; None: what each device has
    offload_folder: str | None = None   # where layers beyond max_memory go; None: a temporary folder

    def validate(self) -> None:
        if self.device_map is not None and self.device_map not in DEVICE_MAPS:
            raise ValueError(f"unknown --device_map {self.device_map!r}; choose one of {', '.join(DEVICE_MAPS)}")
        if self.device_map is None and (self.max_memory or self.offload_folder):
            raise ValueError("--max_memory and --offload_folder place a split model; give --device_map too")
        self.memory()

    def memory(self) -> dict | None:
        """--max_memory as accelerate takes it: {0: "20GiB", "cpu": "64GiB"}."""
        if not self.max_memory:
            return None
        from accelerate.utils import convert_file_size_to_int
        out = {}
        for item in self.max_memory.split(","):
            key, sep, size = item.partition("=")
            key, size = key.strip(), size.strip()
            if not sep or not (key.isdigit() or key in ("cpu", "mps")):
                raise ValueError(f"--max_memory {self.max_memory!r}: give device=size items, the device a GPU "
                                 f"index or cpu, e.g. 0=20GiB,cpu=64GiB")
            try:
                if convert_file_size_to_int(size) <= 0:
                    raise ValueError
            except ValueError:
                raise ValueError(f"--max_memory: size {size!r} of {key} is not a positive size such as 500MB or "
                                 f"2GiB") from None
            out[int(key) if key.isdigit() else key] = size
        return out

    def folder(self) -> str:
        """The offload folder (a temporary one, removed at exit, when none was given)."""
        if self.offload_folder:
            os.makedirs(self.offload_folder, exist_ok=True)
            return self.offload_folder
        path = tempfile.mkdtemp(prefix="bass-offload-")
        atexit.register(shutil.rmtree, path, ignore_errors=True)
        return path


def dispatch(model, placement: Placement, dtype: torch.dtype):
    """A model loaded whole on the CPU, spread over the devices as ``placement`` says (accelerate's
    ``infer_auto_device_map`` within the balanced or given memory, then ``dispatch_model``)."""
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import get_balanced_memory
    no_split = model._no_split_modules or []
    memory = placement.memory()
    if placement.device_map != "sequential":
        memory = get_balanced_memory(model, max_memory=memory, no_split_module_classes=no_split, dtype=dtype,
                                     low_zero=placement.device_map == "balanced_low_0")
    device_map = infer_auto_device_map(model, max_memory=memory, no_split_module_classes=no_split, dtype=dtype)
    return dispatch_model(model, device_map, offload_dir=placement.folder() if "disk" in device_map.values() else None)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but no CUDA device is available; use --device cpu")
    return torch.device(device)


def native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (the ``avx512_bf16`` or ``amx_bf16`` flag of
    /proc/cpuinfo). Without it torch emulates bfloat16 through float32 and a bfloat16 pass costs
    more than a float32 one (measured: results/drafting/README.md)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((set(ln.split(":", 1)[1].split()) for ln in f if ln.startswith("flags")), set())
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto``: float16 on CUDA; on a CPU bfloat16 where it is native (``native_bf16``), else float32."""
    if dtype == "auto":
        if device.type == "cuda":
            return torch.float16
        return torch.bfloat16 if device.type == "cpu" and native_bf16() else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose auto or one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _source(name: str | None, default: Path, role: str) -> str:
    """A local folder (checked) or a hub id; None means the embedded default."""
    if name is None:
        if not (default / "config.json").exists():
            raise ValueError(f"the embedded default {role} is missing at {default}; train it with "
                             f"`python -m training.train_default_pair` or name a model")
        return str(default)
    if os.path.isdir(name):
        if not os.path.exists(os.path.join(name, "config.json")):
            raise ValueError(f"{role} model folder {name} has no config.json")
        return name
    if name.startswith((".", "/", "~")) or name.count("/") > 1:   # a path, not "org/model"
        raise ValueError(f"{role} model path does not exist: {name}")
    return name                                          # a hub id such as "gpt2" or "org/model"


@functools.lru_cache(maxsize=1)
def hub_reachable() -> bool:
    """Whether the Hugging Face hub can be reached: False at once when HF_HUB_OFFLINE is set or a
    first connection fails (instead of transformers' 30 to 50 s of retries)."""
    from huggingface_hub import constants
    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=3).close()
        return True
    except OSError:
        return False


def _pretrained(cls, src: str, role: str, **kwargs):
    """cls.from_pretrained(src), from the local cache alone when the hub is out of reach."""
    local = os.path.isdir(src)
    offline = not local and not hub_reachable()
    try:
        return cls.from_pretrained(src, local_files_only=offline, **kwargs)
    except OSError as e:
        if offline:
            raise ValueError(f"cannot load {role} {src!r}: the hub is out of reach (offline or HF_HUB_OFFLINE)"
                             f" and it is not in the local cache; name a local folder") from None
        raise ValueError(f"cannot load {role} {src!r}: {str(e).splitlines()[0]}") from None


def load_model(name: str | None, role: str = "target", device: str = "auto", dtype: str = "auto",
               placement: Placement | None = None):
    """A causal LM in eval mode. BLOOM gets eager attention (its SDPA path mishandles padding).
    A float32 model on the CPU gets ``SkinnyLinear`` layers (``cpu_linears``, ``sampling.skinny``), a
    draft's with bfloat16 copies for its one-row products: a model loaded as a draft is for drafting
    (as a target its one-row passes would not be float32's), and the copies are snapshots of the
    weights as loaded.
    A folder written by ``save_int8`` is dequantized to the dtype asked for. ``placement`` with a
    device_map: the layers spread over devices and offloaded by accelerate (``Placement``); the
    model's inputs then go to ``sampling.utils.model_device(model)``."""
    from transformers import AutoConfig, AutoModelForCausalLM
    src = _source(name, DEFAULT_TARGET if role == "target" else DEFAULT_DRAFT, role)
    dev = resolve_device(device)
    split = placement is not None and placement.device_map is not None
    if split:
        placement.validate()
    config = _pretrained(AutoConfig, src, f"{role} model")
    extra = {"attn_implementation": "eager"} if config.model_type == "bloom" else {}
    dtype = resolve_dtype(dtype, dev)
    if is_int8_folder(src):
        config._attn_implementation = extra.get("attn_implementation", config._attn_implementation)
        model = _load_int8(src, config, dtype, f"{role} model")
        return (dispatch(model, placement, dtype) if split else cpu_linears(model.to(dev), role)).eval()
    if split:                          # loaded straight onto its devices, never whole in memory
        extra.update(device_map=placement.device_map, max_memory=placement.memory(),
                     offload_folder=placement.folder())
    model = _pretrained(AutoModelForCausalLM, src, f"{role} model", config=config, dtype=dtype, **extra)
    return (model if split else cpu_linears(model.to(dev), role)).eval()


def cpu_linears(model, role: str = "target"):
    """A float32 model on the CPU takes ``W @ x.T`` for passes of a few tokens and, a draft, its
    one-row products in bfloat16 (``sampling.skinny``: both measured faster there); any other
    model is returned as it is."""
    p = next(model.parameters())
    if p.device.type == "cpu" and p.dtype == torch.float32:
        skinny_linears(model, ONE_ROW if role == "draft" else None)
    return model


def load_tokenizer(name: str | None, role: str = "target"):
    """A model's tokenizer, left-padding, with a pad token (EOS if it has none)."""
    from transformers import AutoTokenizer
    src = _source(name, DEFAULT_TARGET if role == "target" else DEFAULT_DRAFT, role)
    tok = _pretrained(AutoTokenizer, src, f"{role} tokenizer")
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def shared_vocab(target_tok, draft_tok, target, draft) -> int | None:
    """Check that draft and target share a tokenizer (the same token -> id map); returns the
    vocabulary to restrict both to (``generate(vocab_size=)``): None when their output embeddings
    have the same size, else the tokenizer's size (real pairs pad embeddings differently)."""
    t, d = target_tok.get_vocab(), draft_tok.get_vocab()
    if t != d:
        diff = sorted(set(t.items()) ^ set(d.items()), key=lambda kv: kv[1])[:1]
        raise ValueError(f"the draft's tokenizer ({len(d)} tokens) differs from the target's ({len(t)} tokens),"
                         f" e.g. at {diff[0][0]!r}: speculative decoding needs one vocabulary")
    sizes = vocab_size(target), vocab_size(draft)
    if sizes[0] == sizes[1]:
        return None
    if len(t) > min(sizes):
        raise ValueError(f"the tokenizer has {len(t)} tokens but an output embedding only {min(sizes)} rows")
    return len(t)


def load_cascade(names: str | None, target_tok, target, device: str, dtype: str,
                 placement: Placement | None = None) -> tuple[list, int | None]:
    """The drafts of mode cascade, smallest first, from a comma list of folders or hub ids (None:
    the embedded ``DEFAULT_CASCADE``), each tokenizer checked against the target's; returns them
    and the vocabulary to restrict every model to (``shared_vocab``)."""
    srcs = [str(p) for p in DEFAULT_CASCADE] if names is None else [n.strip() for n in names.split(",") if n.strip()]
    if len(srcs) < 2:
        raise ValueError(f"--cascade takes 2 or more draft models, smallest first, got {names!r}")
    drafts, vocabs = [], set()
    for src in srcs:
        drafts.append(load_model(src, "draft", device, dtype, placement))
        vocabs.add(shared_vocab(target_tok, load_tokenizer(src, "draft"), target, drafts[-1]))
    vocab = min((v for v in vocabs if v is not None), default=None)
    return drafts, vocab


def speculator_path(path: str | None, kind: str) -> str:
    """The heads' folder: ``path`` as given, or the embedded default of that kind."""
    return str(DEFAULT_SPECULATOR / kind) if path is None else path
