"""BASS++ sampling: autoregressive, speculative (Google, DeepMind) and batched (BASS) decoding."""
from .batching import generate_many, pad_left
from .generate import DEFAULTS, MODES, GenerationResult, check_args, generate
from .ngram import NgramDrafter
from .press import PRESSES, PressSpec
from .speculator import Speculator, load_speculator, new_speculator
from .utils import SamplingParams, accept_reject, norm_logits
from .utils_bass import SCHEDULES, ScheduleParams

__all__ = ["DEFAULTS", "MODES", "PRESSES", "SCHEDULES", "GenerationResult", "NgramDrafter", "PressSpec", "SamplingParams", "ScheduleParams", "Speculator",
           "accept_reject", "check_args", "generate", "generate_many", "load_speculator", "new_speculator",
           "norm_logits", "pad_left"]
