"""Train speculator heads (IBM's multi-stage MLP speculator and Medusa heads) for the embedded target.

Reproduce (Debian; about 35 min on the 2-core x86 CPU)::

    apt-get install -y python3.11-doc debian-handbook
    python -m training.train_speculator --out models/speculator

Both kinds train side by side on the same batches, so one frozen target pass per batch serves
both. The target is frozen; its input embedding and lm_head are shared, never trained or saved.
  phase 1: corpus windows (the corpus of ``train_default_pair``), cross-entropy of head j at
           position t against token t + 1 + j (teacher forcing: stage j sees the true tokens).
  phase 2: continuations the target wrote itself from corpus prefixes (half greedy, half
           sampled), forward KL(p || q_j) to the target's own law of token t + 1 + j, which the
           same pass computes: the heads learn what the target will say, not what the corpus said.
Then the heads are evaluated on Dolly prompts (never trained on): the target's greedy answers,
per head top-1 and top-5 accuracy against the target's token (teacher forced), and written to
``<out>/<kind>/`` (safetensors + config.json) with ``<out>/training_log.csv`` (loss and
per-head top-1 every 10 steps) and ``<out>/training_summary.json``; ``--storage int8`` (the default)
stores each matrix as int8 with per-row scales (``save_speculator``), dequantized at load.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import random
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from sampling.app.strict_json import dumps
from sampling.drafters.heads import KINDS, SpeculatorConfig, SpeculatorHeads, save_speculator, target_dims

from .train_default_pair import EOS, load_corpus, load_target, lr_at, target_continuations, windows

STORAGE = {"int8": torch.int8, "float16": torch.float16}


@dataclass
class SpecTrainConfig:
    target: str = "models/target"      # the target the heads read (its tokenizer too)
    out: str = "models/speculator"     # <out>/mlp, <out>/medusa, training_log.csv, training_summary.json
    kinds: str = "mlp,medusa"          # which heads to train, side by side on the same batches
    n_heads: int = 4                   # stages (mlp) or heads (medusa): tokens drafted after the target's own
    seed: int = 1234                   # seeds python, torch and data order
    seq_len: int = 256                 # tokens per training sequence
    batch: int = 8                     # sequences per step
    phase1_steps: int = 500            # corpus windows, cross-entropy
    phase2_steps: int = 700            # the target's continuations, KL to the target
    lr: float = 1e-3                   # AdamW peak learning rate, each phase: warm-up then cosine to 10%
    warmup: int = 30                   # linear warm-up steps per phase
    gen_prompts: int = 384             # continuations the target writes for phase 2
    gen_tokens: int = 192              # tokens per continuation (after a 64-token corpus prefix)
    dolly: str = "../shared/dolly/dolly-sample.jsonl"   # held-out prompts for the per-head accuracy
    eval_prompts: int = 60             # Dolly prompts evaluated
    eval_tokens: int = 32              # greedy tokens the target writes per prompt
    threads: int = 0                   # torch threads (0: torch's default)
    init: str = ""                     # continue from the heads in <init>/<kind> (e.g. more phase 2: --phase1_steps 0)
    eval_only: bool = False            # evaluate the heads in --init on Dolly and print it; nothing trained or written
    storage: str = "int8"              # int8 (per-row scales, a quarter of float32's bytes) or float16


class Tap:
    """The input of the target's lm_head (its last hidden state) on each forward pass."""

    def __init__(self, target):
        self.last = None
        target.get_output_embeddings().register_forward_pre_hook(self._capture)

    def _capture(self, module, args):
        self.last = args[0]


@torch.no_grad()
def target_pass(target, tap, x):
    """Hidden states [B, T, D], logits [B, T, V] and input embeddings [B, T, E] of the frozen target."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = target(input_ids=x).logits
    return tap.last.float(), logits.float(), target.get_input_embeddings()(x).float()


def head_losses(heads, h, emb, logits, x, phase: int, lm_head):
    """Per-head losses and top-1 agreement: phase 1 cross-entropy on the tokens, phase 2 KL(p || q)
    to the target's law of the same token."""
    K, T = heads.cfg.n_heads, x.shape[1]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outs = heads(h, emb, lm_head)                                      # K x [B, T - 1 - K, V]
    losses, top1 = [], []
    for j, q_logits in enumerate(outs, start=1):
        q_logits = q_logits.float()
        p_logits = logits[:, j:T - 1 - K + j]                              # the target's law of token t + 1 + j
        labels = x[:, 1 + j:T - K + j] if phase == 1 else p_logits.argmax(-1)
        if phase == 1:
            losses.append(F.cross_entropy(q_logits.flatten(0, 1), labels.flatten()))
        else:
            losses.append(F.kl_div(F.log_softmax(q_logits, -1), F.log_softmax(p_logits, -1), log_target=True,
                                   reduction="none").sum(-1).mean())
        top1.append((q_logits.argmax(-1) == labels).float().mean().item())
    return losses, top1


@torch.no_grad()
def evaluate(heads_by_kind, target, tap, tokenizer, cfg) -> dict:
    """Per-head top-1 / top-5 accuracy on the target's greedy answers to Dolly prompts: head j at
    position t against the token the target wrote at t + 1 + j, every answer position."""
    from sampling import generate
    from sampling.app.dolly import load_dolly, render_prompt
    records = load_dolly(cfg.dolly)[:cfg.eval_prompts]
    eos = tokenizer.eos_token_id
    hits = {k: torch.zeros(2, cfg.n_heads) for k in heads_by_kind}
    count = torch.zeros(cfg.n_heads)
    for rec in tqdm(records, desc="eval", dynamic_ncols=True):
        ids = tokenizer(render_prompt(rec), return_tensors="pt")["input_ids"][:, -400:]
        new = generate(target, ids, mode="ar", max_new_tokens=cfg.eval_tokens, temperature=0,
                       eos_token_id=eos).tokens[0]
        x = torch.cat([ids, torch.tensor([new])], 1)                       # [1, T]
        T, P, K = x.shape[1], ids.shape[1], cfg.n_heads
        target(input_ids=x)
        h, emb = tap.last.float(), target.get_input_embeddings()(x).float()
        for kind, heads in heads_by_kind.items():
            outs = heads(h, emb, target.get_output_embeddings())           # K x [1, T - 1 - K, V]
            for j, q in enumerate(outs, start=1):
                t = torch.arange(max(0, P - 1 - j), T - 1 - K)             # predicted token t + 1 + j is an answer's
                t = t[t + 1 + j >= P]
                gold = x[0, t + 1 + j]
                top5 = q[0, t].topk(5, -1).indices
                hits[kind][0, j - 1] += (top5[:, 0] == gold).sum()
                hits[kind][1, j - 1] += (top5 == gold.unsqueeze(1)).any(-1).sum()
                if kind == next(iter(heads_by_kind)):
                    count[j - 1] += len(t)
    return {k: dict(top1=[round(float(v), 4) for v in hk[0] / count], top5=[round(float(v), 4) for v in hk[1] / count],
                    positions=[int(c) for c in count], prompts=len(records)) for k, hk in hits.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for field, default in asdict(SpecTrainConfig()).items():
        if isinstance(default, bool):
            ap.add_argument(f"--{field}", action="store_true", help=f"SpecTrainConfig.{field}")
        else:
            ap.add_argument(f"--{field}", type=type(default), default=default, help=f"SpecTrainConfig.{field}")
    cfg = SpecTrainConfig(**vars(ap.parse_args(argv)))
    kinds = [k.strip() for k in cfg.kinds.split(",") if k.strip()]
    if not kinds or any(k not in KINDS for k in kinds):
        ap.error(f"--kinds {cfg.kinds!r}: a comma list of {', '.join(KINDS)}")
    if cfg.eval_only and not cfg.init:
        ap.error("--eval_only evaluates the heads in --init; give --init")
    for k in kinds if not cfg.eval_only else []:
        if os.path.exists(os.path.join(cfg.out, k)):
            ap.error(f"{os.path.join(cfg.out, k)} exists; remove it or pick another --out")
    if cfg.storage not in STORAGE:
        ap.error(f"--storage {cfg.storage!r}: choose {' or '.join(STORAGE)}")
    if cfg.init and not all(os.path.isdir(os.path.join(cfg.init, k)) for k in kinds):
        ap.error(f"--init {cfg.init!r}: needs a folder per kind ({', '.join(kinds)}) with saved heads")
    if not os.path.isfile(cfg.dolly):
        ap.error(f"--dolly {cfg.dolly!r} does not exist (the held-out evaluation prompts)")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    t0 = time.time()

    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(cfg.target)
    eos_id = tokenizer.convert_tokens_to_ids(EOS)
    target = load_target(cfg.target).requires_grad_(False)
    tap, lm_head = Tap(target), target.get_output_embeddings()
    dims = target_dims(target)
    heads = {k: SpeculatorHeads(SpeculatorConfig(kind=k, n_heads=cfg.n_heads, **dims)).train() for k in kinds}
    if cfg.init:                                                         # continue training saved heads
        from sampling.drafters.heads import load_speculator
        for k in kinds:
            heads[k].load_state_dict(load_speculator(os.path.join(cfg.init, k), target).heads.float().state_dict())
    if cfg.eval_only:
        print(dumps(evaluate({k: h.eval() for k, h in heads.items()}, target, tap, tokenizer, cfg), indent=2))
        return
    docs = load_corpus()
    train_docs = [d for i, d in enumerate(docs) if i % 50]               # the target's own split
    train = torch.tensor([t for enc in tokenizer(train_docs, add_special_tokens=False)["input_ids"]
                          for t in enc + [eos_id]], dtype=torch.long)
    os.makedirs(cfg.out, exist_ok=True)
    opts = {k: torch.optim.AdamW(h.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)
            for k, h in heads.items()}
    samples = None
    gen = torch.Generator().manual_seed(cfg.seed)
    with open(os.path.join(cfg.out, "training_log.csv"), "w", newline="") as f:
        log = csv.writer(f)
        log.writerow(["kind", "phase", "step", "lr", "loss"] + [f"top1_head{j}" for j in range(1, cfg.n_heads + 1)]
                     + ["elapsed_s"])
        for phase, steps in ((1, cfg.phase1_steps), (2, cfg.phase2_steps)):
            if not steps:
                continue
            if phase == 2:
                samples = target_continuations(cfg, target, train, eos_id)   # [gen_prompts, 64 + gen_tokens]
            bar = tqdm(range(steps), desc=f"phase {phase}", dynamic_ncols=True)
            for step in bar:
                lr = lr_at(step, steps, cfg.lr, cfg.warmup)
                if phase == 1:
                    x = windows(train, cfg.seq_len, cfg.batch, gen)                  # [B, T]
                else:
                    rows = torch.randint(0, len(samples), (cfg.batch,), generator=gen)
                    x = samples[rows][:, :cfg.seq_len]
                h, logits, emb = target_pass(target, tap, x)
                post = {}
                for k, hd in heads.items():
                    for g in opts[k].param_groups:
                        g["lr"] = lr
                    losses, top1 = head_losses(hd, h, emb, logits, x, phase, lm_head)
                    loss = sum(losses) / len(losses)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(hd.parameters(), 1.0)
                    opts[k].step()
                    opts[k].zero_grad(set_to_none=True)
                    post[k] = f"{loss.item():.3f}/{top1[0]:.2f}"
                    if step % 10 == 0 or step == steps - 1:
                        log.writerow([k, phase, step, f"{lr:.2e}", f"{loss.item():.4f}"] +
                                     [f"{a:.4f}" for a in top1] + [f"{time.time() - t0:.0f}"])
                f.flush()
                bar.set_postfix(post)
    train_s = time.time() - t0
    for hd in heads.values():
        hd.eval()
    acc = evaluate(heads, target, tap, tokenizer, cfg)
    summary = dict(config=asdict(cfg), train_wall_s=round(train_s), wall_s=round(time.time() - t0),
                   train_tokens=len(train),
                   params={k: sum(p.numel() for p in h.parameters()) for k, h in heads.items()},
                   dolly_accuracy=acc)
    for k, hd in heads.items():
        before = None
        if cfg.init:                                                     # the training the heads started from
            with open(os.path.join(cfg.init, k, "config.json")) as f:
                before = json.load(f).get("training")
        save_speculator(hd, os.path.join(cfg.out, k), dtype=STORAGE[cfg.storage], extra=dict(training=dict(
            steps=[cfg.phase1_steps, cfg.phase2_steps], seq_len=cfg.seq_len, batch=cfg.batch, seed=cfg.seed,
            gen_prompts=cfg.gen_prompts, dolly_top1=acc[k]["top1"], dolly_top5=acc[k]["top5"], before=before)))
    with open(os.path.join(cfg.out, "training_summary.json"), "w") as f:
        f.write(dumps(summary, indent=2))
    print(dumps(summary, indent=2))


if __name__ == "__main__":
    main()
