"""Strict JSON: what every JSON file and line the toolkit writes goes through (never a bare NaN or
Infinity, which Python's strict parser and most non-Python readers reject)."""
from __future__ import annotations

import json
import math


def strict(obj):
    """``obj`` with every non-finite float (NaN, inf) as None, tuples as lists and numpy / torch
    scalars as Python numbers: what strict JSON can hold."""
    if isinstance(obj, dict):
        return {str(k): strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", 1) == 0:
        obj = obj.item()                                  # a numpy or torch scalar
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def dumps(obj, **kwargs) -> str:
    """Strict JSON text (``strict``; never a bare NaN or Infinity, which strict parsers reject);
    anything else JSON cannot hold is written as its str()."""
    return json.dumps(strict(obj), allow_nan=False, default=str, **kwargs)
