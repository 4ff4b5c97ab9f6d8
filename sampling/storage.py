"""Weights stored in int8: each matrix as int8 with one float16 scale per output row, every other
tensor in float16 (a quarter of float32's bytes); the embedded target and speculator heads use it."""
from __future__ import annotations

import torch

INT8_SCALE = ".int8_scale"        # suffix of the per-row scales of a matrix stored in int8


def quantize_int8(state: dict) -> dict:
    """Tensors to store: each matrix as int8 with one float16 scale per output row (max |w| / 127,
    a quarter of float32's bytes), every other tensor in float16. ``dequantize_int8`` inverts it."""
    out = {}
    for k, v in state.items():
        v = v.detach().float()
        if v.dim() == 2:
            scale = (v.abs().amax(1, keepdim=True) / 127).clamp(min=1e-12)                  # [rows, 1]
            out[k] = (v / scale).round().clamp(-127, 127).to(torch.int8).contiguous()
            out[k + INT8_SCALE] = scale.to(torch.float16).contiguous()
        else:
            out[k] = v.to(torch.float16).contiguous()
    return out


def dequantize_int8(stored: dict, dtype=torch.float32) -> dict:
    """The state dict of ``quantize_int8``'s tensors (or of plain ones), in ``dtype``."""
    return {k: (v.float() * stored[k + INT8_SCALE].float() if k + INT8_SCALE in stored else v).to(dtype)
            for k, v in stored.items() if not k.endswith(INT8_SCALE)}
