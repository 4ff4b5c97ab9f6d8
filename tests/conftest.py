import atexit
import os
import shutil
import sys
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ["BASS_CACHE_DIR"] = tempfile.mkdtemp(prefix="bass-tests-")   # pass costs: never the user's
atexit.register(shutil.rmtree, os.environ["BASS_CACHE_DIR"], True)
# inductor's kernels outlive a run (the compile tests start warm the next time), outside the repository
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(tempfile.gettempdir(), "torchinductor-bass-tests"))
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


@pytest.fixture(autouse=True)
def drafting_is_free(monkeypatch):
    """The controller (``sampling.control``) prices longer drafts cheaper, so it drafts what the
    schedule or tree says each step, as ``speculate="always"`` does, whatever this machine's pass
    costs: outputs stay those the tests pin. Its own tests (tests/test_control.py) give it real costs."""
    from sampling import control
    # a step of g costs 1 / (1 + g): each longer draft is cheaper, so the most allowed always wins, past
    # the controller's margin over AR too, whatever the acceptance
    monkeypatch.setattr(control.Controller, "step_ms", lambda self, g, batch, context=0: 1.0 / (1 + g))
