"""What the command-line tools share: flags, one-line errors, the model pair."""
from __future__ import annotations

import argparse
import signal
import sys

from ..cache.press import PRESSES, PressSpec
from ..cache.spec import CACHES, CacheSpec
from ..control import SPECULATE
from ..generate import DEFAULTS
from ..modes import FINISHED_ROWS, get_mode
from ..params import SamplingParams
from ..utils_bass import SCHEDULES, ScheduleParams


class _ShowDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """-h appends each flag's default, unless its help already says it or there is none."""

    def _get_help_string(self, action):
        if "default" in (action.help or "") or action.default in (None, False, argparse.SUPPRESS):
            return action.help
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (``error: ...``, exit code 2) and whose -h shows defaults."""

    def __init__(self, **kwargs):
        super().__init__(formatter_class=_ShowDefaults, **kwargs)

    def error(self, message):
        sys.stderr.write(f"error: {message}\n")
        sys.exit(2)


DRAFT_KINDS = {"model": "model", "ngram": "ngram", "mlp": "heads", "medusa": "heads"}   # --draft -> its kind
DRAFTS = tuple(DRAFT_KINDS)     # the draft model, prompt lookup, speculator heads of two kinds (sampling.modes)


def needs_draft(mode: str) -> bool:
    """Whether a mode drafts with what --draft names (mode cascade drafts with --cascade's models,
    mode ar with nothing)."""
    return get_mode(mode).drafters not in ((), ("cascade",))


def takes_draft(mode: str, draft: str) -> bool:
    """Whether --draft ``draft`` can draft for ``mode`` (the table of modes, ``sampling.modes``)."""
    return not needs_draft(mode) or DRAFT_KINDS[draft] in get_mode(mode).drafters


def check_mode_draft(mode: str, draft: str) -> None:
    """The one-line refusal of a mode that --draft cannot draft for (``sampling.modes.Mode.check_drafter``)."""
    if not takes_draft(mode, draft):
        get_mode(mode).check_drafter(DRAFT_KINDS[draft])


def add_model_args(ap: argparse.ArgumentParser, many_drafts: bool = False, drafters: bool = True,
                   placement: bool = False) -> None:
    """The model flags; ``drafters``: also --draft and --speculator (tools that study the draft
    model alone leave them out), ``many_drafts``: --draft takes a comma list, ``placement``: also
    --device_map, --max_memory and --offload_folder (``placement_of``; the tools that load through
    ``load_pair``)."""
    ap.add_argument("--target_model_name", default=None,
                    help="target model: local folder or hub id (default: the embedded models/target)")
    ap.add_argument("--approx_model_name", default=None,
                    help="draft model: local folder or hub id (default: the embedded models/draft)")
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                    help="where to run (auto: cuda if available)")
    ap.add_argument("--dtype", default="auto", choices=("auto", "float32", "float16", "bfloat16"),
                    help="model dtype (auto: float16 on CUDA; on a CPU bfloat16 where the CPU has it natively, "
                         "avx512_bf16 or amx_bf16, else float32)")
    if placement:
        from .models import DEVICE_MAPS
        ap.add_argument("--device_map", default=None, choices=DEVICE_MAPS,
                        help="split target and draft over the GPUs, the CPU and the disk with accelerate's "
                             "big-model inference (default: each whole on --device)")
        ap.add_argument("--max_memory", default=None,
                        help="with --device_map: memory per device, e.g. 0=20GiB,1=20GiB,cpu=64GiB; layers beyond "
                             "it go to --offload_folder (default: what each device has)")
        ap.add_argument("--offload_folder", default=None,
                        help="with --device_map: where layers beyond --max_memory are offloaded (default: a "
                             "temporary folder)")
    if not drafters:
        return
    ap.add_argument("--draft", default=DEFAULTS.draft,
                    help=("comma list of drafters, each " if many_drafts else "what drafts: ") +
                    "model (the draft model), ngram (prompt lookup, no model), mlp (IBM's MLP speculator "
                    "heads on the target) or medusa (Medusa heads)")
    ap.add_argument("--speculator", default=None,
                    help="folder of the mlp or medusa heads (default: the embedded models/speculator/<kind>)")
    ap.add_argument("--cascade", default=None,
                    help="mode cascade: comma list of draft models, smallest first, each verifying the one before "
                         "(default: the embedded models/draft_small,models/draft)")


def add_sampling_args(ap: argparse.ArgumentParser, gamma_flag: str = "--gamma",
                      schedule_constants: bool = True) -> None:
    ap.add_argument("--max_tokens", type=int, default=DEFAULTS.max_new_tokens,
                    help="new tokens per prompt")
    ap.add_argument(gamma_flag, dest="gamma", type=int, default=None,
                    help=f"draft length; the start of the adaptive schedules (default "
                         f"{DEFAULTS.gamma} for constant, {DEFAULTS.gamma_init} for bass/aimd)")
    ap.add_argument("--gamma_schedule", default=DEFAULTS.gamma_schedule, choices=SCHEDULES,
                    help="draft length schedule: constant, bass (Qiu et al.) or aimd")
    sp = ScheduleParams()
    if not schedule_constants:                      # the defaults of ScheduleParams then apply
        ap.set_defaults(gamma_max=sp.gamma_max, gamma_delta=sp.delta, gamma_mod=sp.mod,
                        gamma_min=sp.gamma_min)
    else:
        add_schedule_args(ap, sp)
    ap.add_argument("--temperature", type=float, default=DEFAULTS.temperature,
                    help="softmax temperature; 0 is greedy")
    ap.add_argument("--top_k", type=int, default=DEFAULTS.top_k, help="top-k filter (0: off)")
    ap.add_argument("--top_p", type=float, default=DEFAULTS.top_p, help="nucleus filter in (0, 1] (1: off)")
    ap.add_argument("--min_p", type=float, default=DEFAULTS.min_p,
                    help="drop tokens below min_p x the top token's probability, in [0, 1) (0: off)")
    ap.add_argument("--repetition_penalty", type=float, default=DEFAULTS.repetition_penalty,
                    help="CTRL penalty on tokens already in the prefix, > 0 (1: off)")
    ap.add_argument("--seed", type=int, default=None, help="random seed (default: not reproducible)")
    ap.add_argument("--sort_batch", action="store_true",
                    help="group prompts of similar length into the same batch (output keeps input order)")
    ap.add_argument("--tree", default=None,
                    help=f"(default {DEFAULTS.tree} with a draft model, {DEFAULTS.heads_tree} with heads) mode tree: "
                         "branching factors per depth, e.g. 4,2,1,1 (1,1,1,1 is the chain of gamma 4); rank paths, "
                         "e.g. paths:0,1,0.0 (any static tree, as benchmark.studies.tree_fit writes them); or "
                         "dynamic:N[:D[:K[:S]]], EAGLE-2's tree of N draft tokens over D levels, K children per "
                         "expanded node, ranked by q**S (D, K, S default 5, 4, 1)")
    ap.add_argument("--finished_rows", default=DEFAULTS.finished_rows, choices=FINISHED_ROWS,
                    help="bass: drop a finished row from both caches, or keep it in the batch masked")
    ap.add_argument("--cascade_gamma", type=int, default=None,
                    help="mode cascade: draft length of every level below the target (default: --gamma)")
    add_speculate_arg(ap)
    add_cache_args(ap)
    add_press_args(ap)


def add_speculate_arg(ap: argparse.ArgumentParser, many: bool = False) -> None:
    """--speculate (a comma list when ``many``: a sweep compares them side by side)."""
    ap.add_argument("--speculate", default=DEFAULTS.speculate, **({} if many else dict(choices=SPECULATE)),
                    help=("comma list: " if many else "") + "auto: each step drafts as many tokens (tree levels) as "
                         "this machine's pass costs and the acceptance so far say pay, none (an AR step) where "
                         "drafting would not; always: what --gamma, the schedule or the tree says "
                         "(docs/speculate.md)")


def add_cache_args(ap: argparse.ArgumentParser, many: bool = False) -> None:
    """--kv_cache (a comma list when ``many``: a sweep compares them side by side) and --compile."""
    ap.add_argument("--kv_cache", default=DEFAULTS.kv_cache,
                    **({} if many else dict(choices=CACHES)),
                    help=("comma list of " if many else "") + "KV caches: dynamic (grows by concatenation) or "
                         "static (preallocated, rollback by position; needed by --compile)")
    ap.add_argument("--compile", nargs="?", const="all", default=DEFAULTS.compile, choices=tuple(COMPILE_FLAG),
                    action=CompileFlag,
                    help="--compile (all) with the static cache: every model's decode passes through "
                         "torch.compile(mode='reduce-overhead'), CUDA graphs on a GPU; --compile draft: the draft "
                         "models' only, each on a static cache of its own, beside any target cache. Each new shape "
                         "compiles once (tokens per pass bucketed to powers of two), kept on disk for the next "
                         "process: for many generations, not one (docs/caches.md)")


COMPILE_FLAG = {"all": True, "draft": "draft"}       # --compile's values: generate's compile


class CompileFlag(argparse.Action):
    """--compile alone is "all"; the namespace holds generate's value (True or "draft"; False when absent)."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, COMPILE_FLAG[values])


def check_at_least_one(args, *names: str) -> None:
    """The one-line error for the first of these integer flags below 1."""
    for name in names:
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")


def add_press_args(ap: argparse.ArgumentParser, many: bool = False) -> None:
    """The KV-cache press flags (``sampling.press``); with ``many`` --press and --press_on take comma lists."""
    s = PressSpec()
    ap.add_argument("--press", default=s.kind,
                    help=("comma list of " if many else "") + f"KV-cache presses: {', '.join(PRESSES)} (none: off)")
    ap.add_argument("--press_ratio", type=float, default=s.ratio,
                    help="fraction of the prompt's cached tokens a press evicts after prefill, in [0, 1)")
    ap.add_argument("--press_budget", type=int, default=s.budget,
                    help="most cached tokens a press keeps while decoding (evicts down to it before a pass; "
                         "default: no eviction while decoding)")
    ap.add_argument("--press_on", default=s.on,
                    help=("comma list: " if many else "") + "whose cache is pressed: draft (the output law stays "
                         "the target's), target (changes the model) or both")
    ap.add_argument("--press_sinks", type=int, default=s.sinks, help="streaming, hybrid: first tokens always kept")
    ap.add_argument("--press_window", type=int, default=s.window,
                    help="hybrid: recent tokens kept; snapkv: the observation window (its queries score the rest)")


def presses_of(args, many: bool = False) -> list[PressSpec]:
    """The press flags as checked PressSpecs: one, or (``many``) a sweep's, each --press with each
    --press_on (none once, without ratio or budget)."""
    kinds = [k.strip() for k in args.press.split(",") if k.strip()] or [args.press]
    ons = [o.strip() for o in args.press_on.split(",") if o.strip()] or [args.press_on]
    if not many and (len(kinds) > 1 or len(ons) > 1):
        raise ValueError(f"--press {args.press!r} --press_on {args.press_on!r}: one press and one model here "
                         "(run_experiment sweeps comma lists)")
    out = []
    for kind in kinds:
        for on in ons[:1] if kind == "none" and len(kinds) > 1 else ons:
            only = kind == "none" and len(kinds) > 1          # a sweep's baseline takes no ratio or budget
            spec = PressSpec(kind, 0.0 if only else args.press_ratio, None if only else args.press_budget, on,
                             args.press_sinks, args.press_window)
            spec.validate()
            out.append(spec)
    return list(dict.fromkeys(out))


def add_schedule_args(ap: argparse.ArgumentParser, sp: ScheduleParams) -> None:
    ap.add_argument("--gamma_max", type=int, default=sp.gamma_max, help="bass/aimd: largest gamma")
    ap.add_argument("--gamma_delta", type=int, default=sp.delta, help="bass: growth after a full accept")
    ap.add_argument("--gamma_mod", type=int, default=sp.mod, help="bass: shrink by ceil(gamma/mod)")
    ap.add_argument("--gamma_min", type=int, default=sp.gamma_min, help="aimd: smallest gamma")


def schedule_of(args) -> ScheduleParams:
    return ScheduleParams(kind=args.gamma_schedule, delta=args.gamma_delta, mod=args.gamma_mod,
                          gamma_max=args.gamma_max, gamma_min=args.gamma_min)


def params_of(args) -> SamplingParams:
    return SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                          min_p=args.min_p, repetition_penalty=args.repetition_penalty)


def generate_kwargs(args, tokenizer, vocab_size: int | None) -> dict:
    """The keyword arguments of ``sampling.generate`` that the sampling flags set."""
    return dict(max_new_tokens=args.max_tokens, gamma=args.gamma, temperature=args.temperature,
                top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                repetition_penalty=args.repetition_penalty, seed=args.seed,
                eos_token_id=tokenizer.eos_token_id, schedule=schedule_of(args),
                finished_rows=args.finished_rows, vocab_size=vocab_size, tree=args.tree,
                kv_cache=args.kv_cache, compile=args.compile, cascade_gamma=args.cascade_gamma,
                press=presses_of(args)[0], speculate=args.speculate)


def parse_caches(text: str, compile: bool | str) -> list[str]:
    """--kv_cache as a comma list; one-line errors for an unknown cache or --compile (all) without static."""
    kinds = [k.strip() for k in text.split(",") if k.strip()]
    for k in kinds or [text]:
        CacheSpec(k).validate()
    if compile is True and "static" not in kinds:
        CacheSpec(kinds[0], compile=True).validate()     # the one-line error of compile without static
    return kinds


def parse_drafts(text: str, many: bool = False) -> list[str]:
    """The --draft value(s), checked: one of DRAFTS, or (``many``) a comma list of them."""
    drafts = list(dict.fromkeys(d.strip().lower() for d in text.split(",") if d.strip()))
    bad = [d for d in drafts if d not in DRAFTS]
    if bad or not drafts or (len(drafts) > 1 and not many):
        raise ValueError(f"--draft {text!r}: choose {'a comma list of ' if many else 'one of '}{', '.join(DRAFTS)}")
    return drafts


def check_speculator_flag(path: str | None, drafts: list[str]) -> None:
    """--speculator names the heads of --draft mlp or medusa; with neither it would do nothing."""
    if path is not None and not {"mlp", "medusa"} & set(drafts):
        raise ValueError(f"--speculator {path} is given but --draft is {','.join(drafts)}; it needs mlp or medusa")
    if path is not None and {"mlp", "medusa"} <= set(drafts):
        raise ValueError("--speculator names one folder of heads; give --draft mlp or medusa, not both")


def load_pair(args, need_draft: bool = True, drafts: list[str] | None = None):
    """(target, drafter or None, tokenizer, vocab_size) from the model flags: the draft model
    (``--draft model``, its tokenizer checked against the target's before anything runs,
    ``shared_vocab``), an n-gram drafter or speculator heads bound to the target. ``drafts``: load
    several (run_experiment); the second item is then a dict name -> drafter."""
    from .models import load_model, load_tokenizer, shared_vocab
    tokenizer = load_tokenizer(args.target_model_name)
    placement = placement_of(args)
    target = load_model(args.target_model_name, "target", args.device, args.dtype, placement)
    if not need_draft:
        return target, None, tokenizer, None
    names = drafts or parse_drafts(args.draft)
    out, vocab = {}, None
    for name in names:
        if name == "model":
            out[name] = load_model(args.approx_model_name, "draft", args.device, args.dtype, placement)
            vocab = shared_vocab(tokenizer, load_tokenizer(args.approx_model_name, "draft"), target, out[name])
        elif name == "ngram":
            from ..drafters.ngram import NgramDrafter
            out[name] = NgramDrafter()
        else:
            from ..drafters.heads import load_speculator
            from .models import speculator_path
            spec = load_speculator(speculator_path(args.speculator, name), target)
            if spec.heads.cfg.kind != name:
                raise ValueError(f"--speculator {args.speculator} holds {spec.heads.cfg.kind} heads, not {name}")
            out[name] = spec
    return target, (out if drafts else out[names[0]]), tokenizer, vocab


def placement_of(args):
    """The placement flags (``add_model_args(placement=True)``), checked; None for a tool without them."""
    from .models import Placement
    if not hasattr(args, "device_map"):
        return None
    placement = Placement(args.device_map, args.max_memory, args.offload_folder)
    placement.validate()
    if placement.device_map is not None and getattr(args, "compile", False):
        raise ValueError("--compile with --device_map: compiled passes need every layer on one device")
    return placement


def _sigterm(signum, frame):
    raise KeyboardInterrupt


def run(main_fn) -> None:
    """Call main_fn(); turn bad input into ``error: ...`` on stderr and a non-zero exit, and
    SIGINT or SIGTERM into ``error: interrupted`` (exit 130)."""
    from transformers.utils import logging
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    previous = signal.signal(signal.SIGTERM, _sigterm)
    try:
        main_fn()
    except (ValueError, FileNotFoundError) as e:
        sys.stderr.write(f"error: {e}\n")
        sys.exit(2)
    except KeyboardInterrupt as e:                   # args: what to do next (run_experiment: --resume)
        sys.stderr.write("error: interrupted" + (f"; {e}" if e.args else "") + "\n")
        sys.exit(130)
    finally:
        signal.signal(signal.SIGTERM, previous)
