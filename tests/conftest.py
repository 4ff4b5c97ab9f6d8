import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)     # tiny models: one thread is as fast and leaves a core free


@pytest.fixture(autouse=True)
def float32_by_default(monkeypatch):
    """Exactness is tested in float32: ``--dtype auto`` would pick bfloat16 on a CPU with native
    bfloat16 (``sampling.app.models.native_bf16``); subprocesses get ``--dtype float32``."""
    from sampling.app import models
    monkeypatch.setattr(models, "native_bf16", lambda: False)
