"""Loading models and tokenizers: the embedded default pair, local folders or hub ids."""
from __future__ import annotations

import functools
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch

REPO = Path(__file__).resolve().parent.parent
DEFAULT_TARGET = REPO / "models" / "target"
DEFAULT_DRAFT = REPO / "models" / "draft"
DEFAULT_SPECULATOR = REPO / "models" / "speculator"     # <kind>/ under it: mlp, medusa
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but no CUDA device is available; use --device cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
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


def load_model(name: str | None, role: str = "target", device: str = "auto", dtype: str = "auto"):
    """A causal LM in eval mode. BLOOM gets eager attention (its SDPA path mishandles padding)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    src = _source(name, DEFAULT_TARGET if role == "target" else DEFAULT_DRAFT, role)
    dev = resolve_device(device)
    config = _pretrained(AutoConfig, src, f"{role} model")
    extra = {"attn_implementation": "eager"} if config.model_type == "bloom" else {}
    model = _pretrained(AutoModelForCausalLM, src, f"{role} model", config=config,
                        dtype=resolve_dtype(dtype, dev), **extra)
    return model.to(dev).eval()


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
    from .generate import vocab_size
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


def speculator_path(path: str | None, kind: str) -> str:
    """The heads' folder: ``path`` as given, or the embedded default of that kind."""
    return str(DEFAULT_SPECULATOR / kind) if path is None else path
