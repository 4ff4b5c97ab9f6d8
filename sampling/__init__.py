"""BASS++ sampling: autoregressive, speculative (Google, DeepMind), batched (BASS) and tree decoding
with draft models, speculator heads, n-gram lookup or a cascade of drafts, exact in the target's law.

The layout: ``generate`` (the entry point) dispatches on the table of modes (``modes``) to a loop
(``autoregressive_sampling``, ``speculative_sampling``, ``speculative_bass``), which runs the decode
step (``decode``) over a drafter (``drafters/``) and a verifier (``verify/``), each owning a KV cache
(``kvcache_model`` over ``cache/``); the contracts between them are in ``contracts``. Application
code (flags, model loading, prompt batching, the server's scheduler) is in ``sampling.app``.
"""
from .app.batching import generate_many, pad_left
from .app.models import load_model, load_tokenizer
from .cache.press import PRESSES, PressSpec
from .drafters.heads import Speculator, load_speculator, new_speculator
from .drafters.ngram import NgramDrafter
from .generate import DEFAULTS, GenerationResult, check_args, generate
from .modes import MODES
from .params import SamplingParams, norm_logits
from .utils_bass import SCHEDULES, ScheduleParams
from .verify.rules import accept_reject

__all__ = ["DEFAULTS", "MODES", "PRESSES", "SCHEDULES", "GenerationResult", "NgramDrafter", "PressSpec",
           "SamplingParams", "ScheduleParams", "Speculator", "accept_reject", "check_args", "generate",
           "generate_many", "load_model", "load_speculator", "load_tokenizer", "new_speculator", "norm_logits",
           "pad_left"]
