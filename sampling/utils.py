"""Small helpers every part uses: facts about a model, moving host values to the device,
and a clock that waits for the device."""
from __future__ import annotations

import os
import time
from pathlib import Path

import torch


def vocab_size(model) -> int:
    """Rows of the model's output embedding (may exceed its tokenizer's vocabulary: padding)."""
    return model.get_output_embeddings().weight.shape[0]


def max_positions(model) -> int | None:
    """The longest sequence a model's position embeddings allow (None: no limit, e.g. ALiBi)."""
    return getattr(model.config, "max_position_embeddings", None)


def model_device(model) -> torch.device:
    """Where a model takes its inputs: its device, or for a model that accelerate split, the device
    its first layers run on (layers offloaded to the CPU or the disk run on that main device)."""
    device_map = getattr(model, "hf_device_map", None)
    if device_map:
        run_on = [d for d in device_map.values() if d not in ("cpu", "disk")]
        if not run_on:
            return torch.device("cpu")
        return torch.device(f"cuda:{run_on[0]}" if isinstance(run_on[0], int) else run_on[0])
    return next(model.parameters()).device


def spans_devices(model) -> bool:
    """Whether a model's layers run on more than one device (accelerate split it over GPUs; layers
    offloaded to the CPU or the disk run on the main device)."""
    return len({d for d in (getattr(model, "hf_device_map", None) or {}).values() if d not in ("cpu", "disk")}) > 1


def cache_dir() -> Path:
    """Where the toolkit keeps what it measures or compiles once per machine (the pass-cost table,
    inductor's compiled kernels): $BASS_CACHE_DIR, else ~/.cache/bass-pp."""
    return Path(os.environ.get("BASS_CACHE_DIR") or Path.home() / ".cache" / "bass-pp")


def now(device: torch.device) -> float:
    """The clock, read after the device has finished its queued work (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def to_device(data: list, device: torch.device, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """Host values (nested lists) as a tensor on ``device`` without making the host wait: on CUDA
    through pinned memory with ``non_blocking`` (a copy from pageable memory is followed by a
    stream synchronisation); PyTorch keeps the pinned block until the copy has run."""
    t = torch.tensor(data, dtype=dtype)
    if torch.device(device).type == "cuda":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)
