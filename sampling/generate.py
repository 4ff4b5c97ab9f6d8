"""``sampling.generate``: the one entry point to every decoding mode (``sampling.modes``), with the
checks of its arguments and the defaults every tool reads."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .cache.press import PressSpec
from .cache.spec import CacheSpec
from .control import check_speculate
from .modes import DRAFTER_KINDS, FINISHED_ROWS, MODES, Mode, drafter_kind, get_mode
from .params import RowParams, SamplingParams, row_params
from .tree_shapes import MAX_NODES, parse_tree
from .utils import max_positions, vocab_size
from .utils_bass import ScheduleParams

__all__ = ["DEFAULTS", "FINISHED_ROWS", "MODES", "Defaults", "GenerationResult", "check_args", "check_inputs",
           "default_gamma", "default_main_mode", "default_tree", "generate", "left_align", "resolve_schedule"]


@dataclass(frozen=True)
class Defaults:
    """The one home of every generation default (the CLIs and the benchmarks read theirs from here)."""
    mode: str = "google"          # generate(): ar | google | deepmind | bass | tree
    main_mode: str = "google"     # main.py, greedy with the draft model, float32: the fastest lossless configuration
                                  # at batch 1 on the embedded pair (results/drafting: the chain 1.68x and 1.67x
                                  # AR, the tree 1.55x and 1.58x, in two processes on the earlier CPU; 1.66x
                                  # against 1.58x on today's)
    main_mode_bfloat16: str = "tree"   # ... in bfloat16 (--dtype auto on a CPU with it natively): there the verify
                                       # pass costs 1.09 target steps, not 0.82, and the tree's 3.4 tokens a pass
                                       # win (results/drafting/native-bfloat16: 1.53x, 1.51x against 1.41x, 1.37x)
    main_chain_mode: str = "google"   # main.py otherwise: sampling (the draft model's chain beats its tree there),
                                      # heads (their trees lose to their chain), n-gram (chains only)
    draft: str = "model"          # what drafts (the CLIs): model | ngram | mlp | medusa (sampling.app.cli.DRAFTS)
    tree: str = "dynamic:16:5:4:3"   # tree, draft model: the fastest at batch 1 on Dolly, embedded pair (results/trees)
    heads_tree: str = "4,2,2,1"   # tree, speculator heads (static trees only): top-k per head (results/heads)
    max_new_tokens: int = 20      # new tokens per row
    gamma: int = 4                # draft length of the constant schedule
    gamma_init: int = 7           # starting draft length of the adaptive schedules (BASS paper)
    temperature: float = 1.0      # 0 is greedy
    top_k: int = 0                # 0: off
    top_p: float = 1.0            # 1.0: off
    min_p: float = 0.0            # 0: off
    repetition_penalty: float = 1.0   # 1.0: off
    gamma_schedule: str = "constant"  # constant | bass | aimd
    finished_rows: str = "drop"       # bass, tree: drop finished rows from both caches, or keep them masked
    kv_cache: str = "dynamic"     # dynamic | static (sampling.cache.backends; results/static)
    compile: bool | str = False   # True: decode passes through torch.compile (static cache; CUDA graphs on a
                                  # GPU); "draft": the draft models' only (each on a static cache of its own)
    speculate: str = "auto"       # auto: each step's draft length (0: an AR step) from pass costs and acceptance
                                  # (sampling.control, docs/speculate.md); always: what the schedule or tree says


DEFAULTS = Defaults()


def default_main_mode(temperature: float, draft: str = "model", dtype: torch.dtype | None = None) -> str:
    """main.py's mode when none is asked: the fastest measured on the embedded pair at this
    temperature (0: greedy) with this drafter (``DEFAULTS.draft``'s kinds) in this dtype (the
    models'): greedy with the draft model ``main_mode_bfloat16`` in bfloat16, ``main_mode`` in any
    other; ``main_chain_mode`` otherwise (results/drafting)."""
    if temperature == 0 and draft == "model":
        return DEFAULTS.main_mode_bfloat16 if dtype == torch.bfloat16 else DEFAULTS.main_mode
    return DEFAULTS.main_chain_mode


def default_tree(draft) -> str:
    """The tree of mode "tree" when none is given: heads draft static trees (cut to as many levels
    as they have heads), a draft model dynamic ones."""
    if drafter_kind(draft) == "heads":
        return str(parse_tree(DEFAULTS.heads_tree).truncated(getattr(draft, "n_heads", MAX_NODES)))
    return DEFAULTS.tree


def default_gamma(gamma_schedule: str) -> int:
    """The draft length a schedule starts from when none is given."""
    return DEFAULTS.gamma if gamma_schedule == "constant" else DEFAULTS.gamma_init


def resolve_schedule(gamma_schedule: str | None, schedule: ScheduleParams | None) -> ScheduleParams:
    """One schedule from ``gamma_schedule`` (the kind) and ``schedule`` (kind and constants); they
    may not disagree."""
    if schedule is None:
        return ScheduleParams(kind=gamma_schedule or DEFAULTS.gamma_schedule)
    if gamma_schedule is not None and gamma_schedule != schedule.kind:
        raise ValueError(f"gamma_schedule {gamma_schedule!r} disagrees with schedule.kind {schedule.kind!r}; "
                         f"give one of them")
    return schedule


@dataclass
class GenerationResult:
    tokens: list[list[int]]                     # new tokens of each row, EOS kept, nothing after it
    stats: dict = field(default_factory=dict)   # counts, rates and timings (see README)


def check_args(mode: str, max_new_tokens: int, gamma: int, params: SamplingParams | RowParams,
               schedule: ScheduleParams, finished_rows: str = DEFAULTS.finished_rows) -> None:
    """Checks that need no model: raise ValueError naming the bad value and the allowed range."""
    get_mode(mode)
    if finished_rows not in FINISHED_ROWS:
        raise ValueError(f"unknown finished_rows {finished_rows!r}; choose one of {', '.join(FINISHED_ROWS)}")
    params.validate()
    schedule.validate()
    if gamma <= 0:
        raise ValueError(f"gamma must be >= 1, got {gamma}")
    budgets = [max_new_tokens] if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if not budgets or min(budgets) <= 0:
        raise ValueError(f"max_new_tokens must be >= 1 (or a list of them, one per row), got {max_new_tokens}")



def left_align(input_ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """A batch [B, T] whose rows are padded on the left, on the right or not at all, as the
    left-padded batch every loop decodes (a left-padded one comes back as it is), and its longest
    prompt; ValueError when a row is empty or its real tokens are not contiguous. One read of the
    device."""
    m = mask.bool()
    T = m.shape[1]
    ar = torch.arange(T, device=m.device)
    lengths = m.sum(-1)                                               # [B]
    first = torch.where(m, ar, T).amin(-1)                            # [B] each row's first real slot
    last = torch.where(m, ar, -1).amax(-1)                            # [B] and its last
    shift = T - 1 - last                                              # [B] each row's right padding
    facts = torch.stack([lengths.max(), (lengths == 0).any(), ((last - first + 1 != lengths) & (lengths > 0)).any(),
                         (shift > 0).any()]).tolist()                 # the one read
    longest, empty, gaps, right = facts
    if empty:
        raise ValueError("empty prompt: every row needs at least one token")
    if gaps:
        raise ValueError("attention_mask: each row's real tokens must be contiguous (a left- or right-padded batch)")
    if not right:
        return input_ids, mask, longest
    src = (ar.unsqueeze(0) - shift.unsqueeze(1)).clamp(min=0)         # [B, T] slot j takes old slot j - shift
    keep = ar.unsqueeze(0) >= shift.unsqueeze(1)
    return input_ids.gather(1, src), mask.gather(1, src) * keep.to(mask.dtype), longest


def check_inputs(target, draft, prompt: int, mode: Mode, max_new_tokens: int, vocab: int | None) -> int | None:
    """Checks of the models against the batch (its longest prompt: ``prompt`` tokens), one-line
    ValueErrors (``mode``'s own in ``sampling.modes``). Returns the vocabulary every distribution is
    restricted to (None: the target's whole output embedding)."""
    longest = prompt + max_new_tokens                 # drafts never pass this position
    kind = drafter_kind(draft) if mode.drafters else None
    mode.check_drafter(kind)
    if kind == "cascade" and (len(draft) < 2 or any(drafter_kind(d) != "model" for d in draft)):
        raise ValueError(f"mode 'cascade' takes 2 or more draft models, smallest first; got {len(draft)} "
                         f"item(s) of types {', '.join(type(d).__name__ for d in draft)}")
    models = list(draft) if kind == "cascade" else [draft] if kind == "model" else []
    if kind in ("ngram", "heads"):                    # a drafter source: no positions or embeddings to check
        draft.check_target(target)
    mode.check_models(target, models)
    for name, model in [("target", target)] + [("draft", d) for d in models]:
        limit = max_positions(model)
        if limit is not None and longest > limit:
            raise ValueError(f"prompt of {prompt} tokens + {max_new_tokens} new tokens exceeds"
                             f" the {name} model's maximum of {limit} positions")
    sizes = [vocab_size(m) for m in [target] + models]
    if vocab is not None:
        if not 1 <= vocab <= min(sizes):
            raise ValueError(f"vocab_size must be in [1, {min(sizes)}] (the models' output embeddings), got {vocab}")
        return vocab
    if len(set(sizes)) > 1:
        raise ValueError(f"draft output embedding ({sizes[1]} rows) differs from the target's ({sizes[0]}): "
                         f"pass vocab_size, the size of the tokenizer both share (sampling.app.models.shared_vocab "
                         f"checks that they do)")
    return None


def generate(target_model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
             draft_model=None, mode: str = DEFAULTS.mode, max_new_tokens: int | list[int] = DEFAULTS.max_new_tokens,
             gamma: int | None = None, temperature: float | list[float] = DEFAULTS.temperature,
             top_k: int | list[int] = DEFAULTS.top_k, top_p: float | list[float] = DEFAULTS.top_p,
             min_p: float | list[float] = DEFAULTS.min_p,
             repetition_penalty: float = DEFAULTS.repetition_penalty,
             eos_token_id: int | None = None, seed: int | list[int] | None = None,
             gamma_schedule: str | None = None, schedule: ScheduleParams | None = None,
             finished_rows: str = DEFAULTS.finished_rows, vocab_size: int | None = None,
             streamer=None, tree=None, kv_cache: str = DEFAULTS.kv_cache,
             compile: bool | str = DEFAULTS.compile, cascade_gamma: int | None = None,
             press: PressSpec | None = None, speculate: str = DEFAULTS.speculate) -> GenerationResult:
    """Generate new tokens for a padded batch input_ids [B, T] (mask [B, T]; left or right padding).

    mode (``sampling.modes``): "ar" (target alone), "google" (Leviathan et al.), "deepmind" (Chen et
    al.), "bass" (batched speculative sampling), "tree" (a draft tree, tree attention) or "cascade".
    temperature 0 is greedy; top_k, top_p, min_p and repetition_penalty are transformers' logits
    processors, applied to target and draft alike, each verified position with its own prefix.
    ``gamma`` is the draft length, the starting one for the adaptive schedules "bass" and "aimd";
    None picks ``default_gamma``. The schedule is ``gamma_schedule`` (a kind) or ``schedule`` (a
    kind and its constants), not both unless they agree. ``finished_rows`` (bass, tree): "drop" a
    finished row from both caches or keep it "mask"ed. ``tree`` (mode "tree"): branching factors
    per depth, "4,2,1,1" or (4, 2, 1, 1), rank paths "paths:0,1,0.0", or a dynamic tree
    "dynamic:N[:D[:K[:S]]]" (EAGLE-2: N draft tokens, D levels, K children per expanded node,
    ranked by q ** S; ``sampling.tree_shapes``); None: ``default_tree``. ``draft_model``: a model,
    or for google, deepmind and bass a drafter source such as ``sampling.NgramDrafter()`` (prompt
    lookup, no model) or speculator heads (``sampling.load_speculator``), which also draft trees;
    mode "ar" reads none. ``vocab_size``: restrict every distribution to the first ids, for a pair
    that shares a tokenizer but pads its embeddings to different sizes. ``streamer`` (batch 1): a
    transformers streamer (``TextStreamer``) that is given the tokens as they are accepted.
    ``kv_cache``: "dynamic" or "static" (preallocated, rollback by position;
    ``sampling.cache.backends``), ``compile`` (True, static only): decode passes through
    ``torch.compile(mode="reduce-overhead")``, CUDA graphs on a GPU; "draft": the draft models'
    passes only, each on a static cache of its own beside the target's ``kv_cache``. Each new shape
    compiles once (tokens per pass bucketed to powers of two; inductor's kernels kept under
    ``$BASS_CACHE_DIR/inductor`` for the next process), so it pays over many generations, not one.
    Mode "cascade": ``draft_model=[smallest, ...,
    largest draft]``, each model verifying the one below it by speculative sampling, row by row;
    ``gamma`` is the target's draft length, ``cascade_gamma`` (None: gamma) every lower level's,
    each adapted by its own schedule. ``max_new_tokens``: one budget, or one per row (a server's
    requests); so may ``temperature``, ``top_k``, ``top_p`` and ``min_p`` be
    (``sampling.params.RowParams``: greedy and sampled rows share the batch, each keeping its own
    law), and ``seed``: one seed per row makes each row draw its own values (``sampling.params.RowDraws``)
    and draft its own length, so that a row's output does not depend on what shares its batch (a
    dynamic tree aside, docs/serving.md; and with ``speculate="auto"``, whose draft lengths follow
    the batch's pass costs, a sampled row's draws do: docs/speculate.md); a row whose laws stop
    being finite then fails alone
    (``stats["failed"]``). ``streamer`` may also be a row streamer (``put_row(row, tokens)``, ``stopped(row)``,
    ``end()``; ``sampling.rows.Rows``), for any batch: each row's tokens as they are accepted, and a
    row it stops leaves the batch; with ``admit(live) -> list[NewRow]`` it also hands in requests
    that join the running batch between steps (continuous batching; modes ar and bass, the dynamic
    cache, no press: ``Mode.check_admission``). ``press`` (``sampling.cache.press.PressSpec``):
    KV-cache compression of the draft's cache (the output law stays the target's), the target's (a
    different model) or both; None: none. ``speculate`` (speculative modes): "auto" picks each step's
    draft length, or how many of the tree's levels to draft, from this machine's pass costs and the
    acceptance so far, down to 0 (a plain AR step) where drafting would not pay; "always" drafts
    what ``gamma``, the schedule or the tree says (``sampling.control``). The output law is the
    target's either way.
    """
    schedule = resolve_schedule(gamma_schedule, schedule)
    if gamma is None:
        gamma = default_gamma(schedule.kind)
    if input_ids.dim() != 2 or input_ids.shape[0] == 0:
        raise ValueError(f"input_ids must be a [B, T] tensor with B >= 1, got shape {tuple(input_ids.shape)}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    B = input_ids.shape[0]
    per_row = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    for name, v in per_row.items():
        if isinstance(v, (list, tuple)) and len(v) != B:
            raise ValueError(f"{name}: {len(v)} values for a batch of {B} rows (give one, or one per row)")
    each = {k: v if isinstance(v, (list, tuple)) else [v] * B for k, v in per_row.items() if k != "max_new_tokens"}
    params = row_params([SamplingParams(temperature=t, top_k=k, top_p=p, min_p=m, repetition_penalty=repetition_penalty)
                         for t, k, p, m in zip(each["temperature"], each["top_k"], each["top_p"], each["min_p"])])
    check_args(mode, max_new_tokens, gamma, params, schedule, finished_rows)
    check_speculate(speculate)
    kind = drafter_kind(draft_model)
    if compile == "draft" and (not get_mode(mode).drafters or kind in ("ngram", "heads")):
        what = f"{DRAFTER_KINDS[kind]} has none" if get_mode(mode).drafters else f"mode {mode!r} has no draft"
        raise ValueError(f"compile='draft' compiles a draft model's passes; {what} (compile=True compiles the "
                         f"target's too, with kv_cache='static')")
    if cascade_gamma is not None and cascade_gamma <= 0:
        raise ValueError(f"cascade_gamma must be >= 1, got {cascade_gamma}")
    spec = get_mode(mode)
    shape = parse_tree(tree if tree is not None else default_tree(draft_model)) if "tree" in spec.options else None
    most = max_new_tokens if isinstance(max_new_tokens, int) else max(max_new_tokens)
    cache = CacheSpec(kv_cache, compile, room=most + 1 + (shape.cache_slots if shape else 0),
                      press=press or PressSpec())
    cache.validate()
    attention_mask = attention_mask.to(input_ids.device)
    input_ids, attention_mask, prompt = left_align(input_ids, attention_mask)
    vocab = check_inputs(target_model, draft_model, prompt, spec, most, vocab_size)
    if streamer is not None and input_ids.shape[0] != 1 and not hasattr(streamer, "put_row"):
        raise ValueError(f"a streamer takes one sequence; got a batch of {input_ids.shape[0]} (a row streamer, "
                         f"with put_row, takes any)")
    if hasattr(streamer, "admit"):
        spec.check_admission(drafter_kind(draft_model), cache, finished_rows)
    seeds = seed if isinstance(seed, (list, tuple)) else [seed]
    if isinstance(seed, (list, tuple)) and len(seed) != B:
        raise ValueError(f"seed: {len(seed)} values for a batch of {B} rows (give one, or one per row)")
    for s in seeds:
        if (s is not None or len(seeds) > 1) and (isinstance(s, bool) or not isinstance(s, int)
                                                  or not 0 <= s < 2 ** 63):
            raise ValueError(f"seed must be an integer in [0, 2**63 - 1] (or a list of them, one per row), got {s!r}")
    if isinstance(seed, (list, tuple)):                 # each row its own draws
        generator = list(seed)
    else:                                               # one generator for the batch
        generator = torch.Generator(device=input_ids.device)
        if seed is None:
            generator.seed()
        else:
            generator.manual_seed(seed)
    options = dict(gamma=gamma, schedule=schedule, tree=shape, finished_rows=finished_rows,
                   cascade_gamma=cascade_gamma, speculate=speculate)
    tokens, stats = spec.loop(target_model, draft_model, input_ids, attention_mask, params, max_new_tokens,
                              eos_token_id, generator, vocab=vocab, streamer=streamer, cache=cache,
                              **{k: options[k] for k in spec.options})
    return GenerationResult(tokens, stats)
