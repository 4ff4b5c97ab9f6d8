"""Loading models and tokenizers: the embedded default pair, local folders or hub ids."""
from __future__ import annotations

import os
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
DEFAULT_TARGET = REPO / "models" / "target"
DEFAULT_DRAFT = REPO / "models" / "draft"
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


def load_model(name: str | None, role: str = "target", device: str = "auto", dtype: str = "auto"):
    """A causal LM in eval mode. BLOOM gets eager attention (its SDPA path mishandles padding)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    src = _source(name, DEFAULT_TARGET if role == "target" else DEFAULT_DRAFT, role)
    dev = resolve_device(device)
    try:
        config = AutoConfig.from_pretrained(src)
        extra = {"attn_implementation": "eager"} if config.model_type == "bloom" else {}
        model = AutoModelForCausalLM.from_pretrained(src, dtype=resolve_dtype(dtype, dev), **extra)
    except OSError as e:
        raise ValueError(f"cannot load {role} model {name!r}: {str(e).splitlines()[0]}") from None
    return model.to(dev).eval()


def load_tokenizer(name: str | None):
    """The target's tokenizer, left-padding, with a pad token (EOS if it has none)."""
    from transformers import AutoTokenizer
    src = _source(name, DEFAULT_TARGET, "target")
    try:
        tok = AutoTokenizer.from_pretrained(src)
    except OSError as e:
        raise ValueError(f"cannot load tokenizer of {name!r}: {str(e).splitlines()[0]}") from None
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok
