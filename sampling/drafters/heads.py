"""Speculator heads: drafting from the target's own last hidden state, no draft model.

Two kinds of heads read the hidden state h_t that the target's output embedding (lm_head) turns
into the law of token t + 1, and draft the tokens after it:

* ``mlp``: IBM's multi-stage MLP speculator (Wertheimer et al. 2024, arXiv 2404.19124).
  Stage j takes the previous stage's state and the embedding of the token drafted before it:
  ``s_j = gelu(LN_j(a W_j s_{j-1} + b U_j E(x_j)))`` with ``s_0 = h_t``, so each draft is
  conditioned on the ones before it. E is the target's input embedding and the logits of stage j
  are the target's lm_head applied to LN_j's output: only W_j, U_j and LN_j are the speculator's.
* ``medusa``: Medusa heads (Cai et al. 2024, arXiv 2401.10774): head j is
  ``lm_head(h_t + silu(W_j h_t + c_j))``, independent of the tokens drafted before it.

Stage 0 of both is the target's lm_head itself on h_t (the law of the token right after the
prompt, used once, after the prefill; on the CPU in float32, through the heads' bfloat16 copy of
it for one-row products, ``Speculator``). The heads give q; the verifier's one accept/reject rule
keeps the target's law. ``load_speculator(path, target)`` returns a ``Speculator``, which
``generate(..., draft_model=speculator)`` accepts in google, deepmind, bass and tree modes (a
static tree: the children of a node are the top-k, or k draws without replacement, of its law).

The drafter says it reads the target (``reads_target``); the verifier then asks the target's
passes for their last hidden states (transformers' ``output_hidden_states``) and returns those of
the positions it fed with its verdict (``Verified.hidden``), the lm_head's inputs exactly.
"""
from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..contracts import Accepted, Draft, PricedPass, StepWork
from ..params import RowParams, SamplingParams, norm_logits
from ..skinny import ONE_ROW, SkinnyLinear, linear_path, skinny_linears
from ..storage import dequantize_int8, quantize_int8
from ..tree_shapes import DynamicTree, TreeShape, parse_tree
from .tree import draft_levels

KINDS = ("mlp", "medusa")
WEIGHTS, CONFIG = "model.safetensors", "config.json"


@dataclass
class SpeculatorConfig:
    kind: str                  # "mlp" (multi-stage, each stage sees the token before) | "medusa" (independent heads)
    n_heads: int               # stages or heads: tokens drafted per step after the one the target gives
    hidden: int                # the target's hidden size at its lm_head's input
    embed: int                 # the target's input-embedding size
    vocab: int                 # rows of the target's lm_head
    target_type: str           # the target's model_type
    fingerprint: list          # statistics of the target's lm_head weight: which target the heads read

    def validate(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"speculator kind {self.kind!r} unknown; choose one of {', '.join(KINDS)}")
        if not 1 <= self.n_heads <= 16:
            raise ValueError(f"speculator n_heads must be in [1, 16], got {self.n_heads}")


def target_dims(target) -> dict:
    """What a speculator must match in its target: sizes, type and a fingerprint of the lm_head."""
    w = target.get_output_embeddings().weight.detach()
    V, D = w.shape
    w = w.double()
    fp = [w.abs().mean(), w[:V // 2].abs().mean(), w[:, :D // 2].abs().mean(), w[0].abs().mean()]
    return dict(hidden=D, embed=target.get_input_embeddings().embedding_dim, vocab=V,
                target_type=target.config.model_type, fingerprint=[round(float(x), 6) for x in fp])


class SpeculatorHeads(nn.Module):
    """The trainable part: W_j, U_j, LN_j per stage (mlp) or W_j, c_j per head (medusa). The
    target's embedding and lm_head are passed in, never owned (nor saved)."""

    def __init__(self, cfg: SpeculatorConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        D, E, K = cfg.hidden, cfg.embed, cfg.n_heads
        if cfg.kind == "mlp":
            self.state_proj = nn.ModuleList(nn.Linear(D, D, bias=False) for _ in range(K))
            self.emb_proj = nn.ModuleList(nn.Linear(E, D, bias=False) for _ in range(K))
            self.ln = nn.ModuleList(nn.LayerNorm(D) for _ in range(K))
            self.a = 0.5 ** (0.5 / K)                    # state weight (IBM's), b: the embedding's
            self.b = math.sqrt(1 - self.a ** 2)
        else:
            self.res = nn.ModuleList(nn.Linear(D, D) for _ in range(K))
            for lin in self.res:                         # each head starts as the target's own lm_head
                nn.init.zeros_(lin.weight)
                nn.init.zeros_(lin.bias)

    def stage(self, j: int, state: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """(state after stage j, its pre-activation for the logits) from the state of stage j - 1
        [..., D] and the embedding of the token drafted by it [..., E]; j in 1..n_heads."""
        if self.cfg.kind == "medusa":
            return state, state + F.silu(self.res[j - 1](state))
        x = torch.add(self.a * self.state_proj[j - 1](state), self.emb_proj[j - 1](emb), alpha=self.b)  # one kernel
        z = self.ln[j - 1](x)
        return F.gelu(z), z

    def forward(self, h: torch.Tensor, emb: torch.Tensor, lm_head) -> list[torch.Tensor]:
        """Training (teacher forcing): h [B, T, D] the target's hidden states, emb [B, T, E] the
        embeddings of the tokens. Stage j's logits at position t predict token t + 1 + j from h_t
        and tokens t + 1 .. t + j; returns n_heads tensors [B, T - 1 - n_heads, V] (every position
        whose last target token is in the sequence)."""
        K, T = self.cfg.n_heads, h.shape[1]
        state, out = h[:, :T - 1 - K], []
        for j in range(1, K + 1):
            state, z = self.stage(j, state, emb[:, j:T - 1 - K + j])
            out.append(lm_head(z))
        return out


class Speculator:
    """Trained heads bound to their target: a drafter source for ``generate``
    (``sampling.contracts.DrafterSource``); ``drafter(params, vocab, tree)`` makes each generation's."""

    kind = "heads"

    def __init__(self, heads: SpeculatorHeads, target, one_row: bool = False):
        self.heads, self.target = heads, target
        self.embedding, self.lm_head = target.get_input_embeddings(), target.get_output_embeddings()
        w = self.lm_head.weight
        if one_row and w.device.type == "cpu" and w.dtype == torch.float32 and type(self.lm_head) in (
                nn.Linear, SkinnyLinear):
            # heads for drafting (loaded, not trained): their one-row products, and the target's lm_head
            # as they use it, through bfloat16 copies (sampling.skinny; the target's own passes keep its
            # float32 layer): q moves, the output law does not
            skinny_linears(heads, ONE_ROW)
            self.lm_head = SkinnyLinear.of(self.lm_head, ONE_ROW)

    @property
    def n_heads(self) -> int:
        return self.heads.cfg.n_heads

    def close(self) -> None:
        """Nothing to release: the heads no longer hook the target (kept for earlier callers)."""
        warnings.warn("Speculator.close() is no longer needed: the heads hold no hook on the target",
                      DeprecationWarning, stacklevel=2)

    def check_target(self, target) -> None:
        """ValueError unless ``target`` is the model these heads were trained on and bound to."""
        if target is not self.target:
            raise ValueError("this speculator is bound to another target model; load it with "
                             "sampling.load_speculator(path, target) for the target you generate with")

    def drafter(self, params: SamplingParams | RowParams, vocab: int | None, tree=None) -> SpeculatorDrafter:
        return SpeculatorDrafter(self, params, vocab, tree)

    def priced_pass(self) -> PricedPass:
        """One stage on n nodes and its law (the target's lm_head, then a softmax): what each level
        of a chain or tree costs beyond the target's verify pass."""
        w = self.lm_head.weight
        size = sum(t.numel() for t in self.heads.parameters())
        drafter = self.drafter(SamplingParams(temperature=1.0), None)

        def run(n: int) -> torch.Tensor:
            state = torch.zeros(1, n, self.heads.cfg.hidden, device=w.device, dtype=w.dtype)     # [1, n, D]
            kids = torch.zeros(1, n, dtype=torch.long, device=w.device)
            _, z = self.heads.stage(1, state, self.embedding(kids))
            return drafter.law(1, z, kids, None)                                                # [1, n, V]
        return PricedPass(f"{type(self.heads).__name__}|{self.heads.cfg.kind}|{size}|{tuple(w.shape)}|"
                          f"{str(w.dtype)[6:]}{linear_path(self.lm_head)}", w.device, run)


class SpeculatorDrafter:
    """A drafter (``sampling.contracts.Drafter``) on speculator heads: a chain of g tokens or a static
    tree per step, from the target's hidden state at each row's last accepted position, which the
    verifier returns with its verdict (``Verified.hidden``)."""

    reads_target = True                                   # the verifier returns the target's hidden states

    def __init__(self, spec: Speculator, params: SamplingParams | RowParams, vocab: int | None, tree=None):
        self.spec, self.heads, self.vocab = spec, spec.heads, vocab
        self.greedy = params.greedy
        # greedy trees rank children by the law at temperature 1 (as TreeDrafter); chains sample q
        self.params = SamplingParams(temperature=1.0, repetition_penalty=params.repetition_penalty) \
            if params.greedy and tree is not None else params
        self.tree = None if tree is None else parse_tree(tree)
        if isinstance(self.tree, DynamicTree):
            raise ValueError(f"speculator heads draft static trees (branching factors such as 4,2,1 or "
                             f"paths:...); got the dynamic tree {tree}")
        if self.tree is not None and self.tree.depth > spec.n_heads:
            raise ValueError(f"tree {tree} is {self.tree.depth} levels deep; this speculator has "
                             f"{spec.n_heads} heads, so at most {spec.n_heads} levels")
        self.max_draft = spec.n_heads                     # the loop drafts no more per step
        self.calls = 0                                    # model passes: none (the heads are counted in time)
        self.h: torch.Tensor | None = None                # [b, D] target hidden state of each row's last slot
        self.pending = 0                                  # tokens of seq after that slot (0 after prefill, else 1)
        self.n_drafted = 0                                # nodes of the last proposal

    def prefill(self, input_ids: torch.Tensor, mask: torch.Tensor, hidden: torch.Tensor | None) -> None:
        """The target's hidden state at each prompt's last slot [b, D] (from the verifier's prefill)."""
        self.h, self.pending = hidden, 0

    def select_rows(self, keep: torch.Tensor) -> None:
        self.h = self.h[keep]
        self.params = self.params.select(keep)

    def law(self, j: int, z: torch.Tensor, seq: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Filtered law [b, m, V] of stage j's pre-activation z [b, m, D] (j = 0: the target's lm_head).
        Greedy without a repetition penalty: the logits themselves, whose top-k are the law's (no q
        is kept when greedy, so neither a one-hot nor a softmax is made)."""
        logits = self.spec.lm_head(z)
        if self.vocab is not None:
            logits = logits[..., :self.vocab]
        if not self.params.uses_prefix:
            return logits if self.greedy else norm_logits(logits, self.params)
        return torch.cat([norm_logits(logits[:, i:i + 1], self.params, seq, mask)   # the prefix: seq only
                          for i in range(logits.shape[1])], 1)

    @torch.inference_mode()
    def propose(self, seq: torch.Tensor, mask: torch.Tensor, g: int, generator) -> Draft:
        """g drafts after seq [b, S] (a chain), or the tree cut to g levels: stage j drafts level j."""
        shape = self.tree.truncated(g) if self.tree is not None else TreeShape.from_branching((1,) * g)
        self.n_drafted = shape.n
        if not shape.n:
            return Draft(seq[:, :0], None, shape if self.tree is not None else None)
        state = self.h.unsqueeze(1)                                          # [b, 1, D]
        j, z = 0, state
        if self.pending:                                                     # the bonus token is not fed yet
            j, (state, z) = 1, self.heads.stage(1, state, self.spec.embedding(seq[:, -1:]))

        def expand(d: int, kids: torch.Tensor, up) -> torch.Tensor:          # the next stage on level d's nodes
            nonlocal j, state
            j += 1
            state, z = self.heads.stage(j, state if up is None else state[:, up],
                                        self.spec.embedding(kids))           # [b, w, D]
            return self.law(j, z, seq, mask)                                 # [b, w, V]

        tokens, q = draft_levels(shape, self.law(j, z, seq, mask), shape.on(seq.device), self.greedy, generator,
                                 expand)                                     # [b, n], [b, n, V]
        return Draft(tokens, q, shape if self.tree is not None else None)

    def work(self, g: int) -> StepWork:
        """A stage and its law per level (``Speculator.priced_pass``; the root's law, the target's
        lm_head alone, priced as one), as wide as the level it drafts from; a verify pass of the
        chain's g or the cut tree's nodes, + 1."""
        if self.tree is None:
            return StepWork((1,) * g, g + 1)
        tree = self.tree.truncated(g)
        return StepWork(tree.pass_widths, tree.n + 1)

    def commit(self, acc: Accepted) -> None:
        """The hidden state of each row's last accepted position, from the verify pass's positions
        (P pending chain tokens, then the drafts or nodes); none when no pass ran."""
        last = acc.verified.hidden                                           # [b, P + n, D]
        if last is not None:
            P = last.shape[1] - self.n_drafted                               # pending tokens it fed
            hist = torch.cat([self.h.unsqueeze(1), last], 1)                 # [b, 1 + P + n, D]
            k = acc.n
            if self.tree is None:                                            # a chain: draft i is node i
                idx = P + k                                                  # [b]
            else:
                lastnode = acc.nodes.gather(1, (k - 1).clamp(min=0).unsqueeze(1)).squeeze(1) \
                    if acc.nodes.shape[1] else torch.zeros_like(k)           # [b]
                idx = P + torch.where(k > 0, 1 + lastnode, torch.zeros_like(k))   # [b]
            D = hist.shape[2]
            self.h = hist.gather(1, idx.view(-1, 1, 1).expand(-1, 1, D)).squeeze(1)   # [b, D]
        self.pending = 1


def save_speculator(heads: SpeculatorHeads, path: str, dtype=torch.float16, extra: dict | None = None) -> None:
    """config.json (the SpeculatorConfig, plus ``extra`` such as the training summary) and the
    weights in ``dtype``: float16 (half of float32's bytes) or torch.int8 (a quarter: each matrix
    as int8 with one float16 scale per output row, max |w| / 127, the vectors in float16);
    ``load_speculator`` dequantizes to the target's dtype."""
    from safetensors.torch import save_file
    os.makedirs(path, exist_ok=True)
    state = heads.state_dict()
    tensors = quantize_int8(state) if dtype == torch.int8 else \
        {k: v.detach().to(dtype).contiguous() for k, v in state.items()}
    save_file(tensors, os.path.join(path, WEIGHTS))
    with open(os.path.join(path, CONFIG), "w") as f:
        json.dump(dict(asdict(heads.cfg), **(extra or {})), f, indent=2, allow_nan=False)


def load_speculator(path: str, target) -> Speculator:
    """The heads in folder ``path`` bound to ``target``; ValueError (one line) when the folder is
    not a speculator or the heads were trained on another target. Beside a float32 target on the
    CPU they draft their one-row products through bfloat16 copies (``Speculator``)."""
    from safetensors.torch import load_file
    cfg_path = os.path.join(str(path), CONFIG)
    if not os.path.isfile(cfg_path) or not os.path.isfile(os.path.join(str(path), WEIGHTS)):
        raise ValueError(f"speculator path {path} has no {CONFIG} and {WEIGHTS} (train heads with "
                         f"`python -m training.train_speculator`)")
    try:
        with open(cfg_path) as f:
            raw = json.load(f)
        cfg = SpeculatorConfig(**{k: raw[k] for k in SpeculatorConfig.__dataclass_fields__})
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"speculator config {cfg_path} is not a speculator's ({type(e).__name__}: {e})") from None
    have = target_dims(target)
    for key in ("hidden", "embed", "vocab", "target_type"):
        if getattr(cfg, key) != have[key]:
            raise ValueError(f"speculator {path} was trained for another target: its {key} is "
                             f"{getattr(cfg, key)!r}, this target's is {have[key]!r}")
    if not all(math.isclose(a, b, rel_tol=1e-3) for a, b in zip(cfg.fingerprint, have["fingerprint"])):
        raise ValueError(f"speculator {path} was trained for another target: the target's lm_head weights differ "
                         f"(fingerprint {cfg.fingerprint} vs {have['fingerprint']})")
    heads = SpeculatorHeads(cfg)
    stored = load_file(os.path.join(str(path), WEIGHTS))
    heads.load_state_dict(dequantize_int8(stored))
    w = target.get_output_embeddings().weight
    return Speculator(heads.to(device=w.device, dtype=w.dtype).eval(), target, one_row=True)


def new_speculator(target, kind: str, n_heads: int, seed: int = 0, noise: float = 0.0) -> Speculator:
    """Freshly initialised heads for ``target`` (training starts from these); ``noise`` > 0 adds
    Gaussian noise of that scale to every weight (tests: heads that disagree with the target)."""
    torch.manual_seed(seed)
    heads = SpeculatorHeads(SpeculatorConfig(kind=kind, n_heads=n_heads, **target_dims(target)))
    if noise:
        with torch.no_grad():
            for p in heads.parameters():
                p.add_(torch.randn_like(p) * noise)
    w = target.get_output_embeddings().weight
    return Speculator(heads.to(device=w.device, dtype=w.dtype).eval(), target)
