"""Train the embedded default target/draft pair from scratch, offline, on a 2-core CPU.

Reproduce (Debian; about 1 h 10 min on a 2-core x86 CPU with bf16 support)::

    apt-get install -y python3.11-doc debian-handbook
    python -m training.train_default_pair --out models

Stages, all seeded:
  1. corpus: the reStructuredText sources of the Python 3.11 documentation (PSF licence) and the
     English HTML of "The Debian Administrator's Handbook" (GPL-2+ or CC-BY-SA-3.0), cleaned to
     prose; 1 document in 50 is held out for validation. The corpus is not committed.
  2. tokenizer: byte-level BPE (``tokenizers``), 4096 tokens, shared by both models.
  3. target: a Llama-architecture causal LM trained on next-token loss (bf16 autocast).
  4. draft: a much smaller Llama distilled from the target: forward KL to the target's
     next-token distribution, on corpus windows and on continuations the target wrote itself
     (greedy and sampled), so that it agrees with the target as much as its size allows.
``--stage draft`` runs stage 4 alone for one more draft of the target already in ``<out>/target``
(its tokenizer too), written to ``<out>/<draft_name>`` with its own log and summary; models/README.md
gives the command that made ``models/draft_small``.
Weights are stored in float16 (config ``dtype`` says float32, so they load as float32).
Loss logs go to ``<out>/training_log.csv`` (target: cross-entropy, nats/token; draft: KL(p || q)
to the target, nats/token, and top-1 agreement with the target on the training batch).
"""
from __future__ import annotations

import argparse
import csv
import glob
import html.parser
import json
import math
import os
import random
import re
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from sampling.app.strict_json import dumps

PY_DOC_SOURCES = "/usr/share/doc/python3.11/html/_sources"
HANDBOOK_HTML = "/usr/share/doc/debian-handbook/html/en-US"
EOS = "<|endoftext|>"


@dataclass
class TrainConfig:
    out: str = "models"                # output folder: <out>/target, <out>/draft, <out>/training_log.csv
    seed: int = 1234                   # seeds python, torch and data order
    vocab_size: int = 4096             # BPE vocabulary shared by both models
    seq_len: int = 512                 # training context length
    max_positions: int = 1024          # max_position_embeddings of both models
    # target: Llama, 8 layers x 512 wide (29M parameters)
    target_layers: int = 8
    target_dim: int = 512
    target_ffn: int = 1536
    target_heads: int = 8
    target_steps: int = 1000           # optimizer steps
    target_batch: int = 12             # sequences per step
    target_lr: float = 1.5e-3
    # draft: Llama, 2 layers x 256 wide (2.8M parameters)
    draft_layers: int = 2
    draft_dim: int = 256
    draft_ffn: int = 768
    draft_heads: int = 4
    draft_steps: int = 900
    draft_batch: int = 16
    draft_lr: float = 3e-3
    gen_prompts: int = 768             # target-written continuations used to distil the draft
    gen_tokens: int = 192              # length of each continuation
    warmup: int = 60                   # linear warm-up steps, then cosine decay to 10%
    threads: int = 0                   # torch threads (0: torch's default)
    stage: str = "pair"                # "pair": tokenizer, target and draft; "draft": distil one more
                                       # draft from the target and tokenizer already in <out>/target
    draft_name: str = "draft"          # folder under <out> the draft is written to


# ----------------------------------------------------------------------------- corpus
class _HTMLText(html.parser.HTMLParser):
    """Collects the text of block elements, skipping navigation, scripts and styles."""
    BLOCKS = {"p", "li", "h1", "h2", "h3", "h4", "dd", "dt", "td", "title", "pre"}
    SKIP = {"script", "style", "nav", "head"}

    def __init__(self):
        super().__init__()
        self.blocks, self.cur, self.skip = [], [], 0

    def handle_starttag(self, tag, attrs):
        if tag in self.SKIP:
            self.skip += 1
        elif tag in self.BLOCKS:
            self._flush()

    def handle_endtag(self, tag):
        if tag in self.SKIP:
            self.skip = max(0, self.skip - 1)
        elif tag in self.BLOCKS:
            self._flush()

    def handle_data(self, data):
        if not self.skip:
            self.cur.append(data)

    def _flush(self):
        text = re.sub(r"\s+", " ", "".join(self.cur)).strip()
        if len(text) > 30:
            self.blocks.append(text)
        self.cur = []


def _clean_rst(text: str) -> str:
    out = []
    for line in text.splitlines():
        s = line.strip()
        if s.startswith(".. ") or re.fullmatch(r"[=\-~^*#+`'\"]{3,}", s) or s.startswith(":"):
            continue                                    # directives, underlines, field lists
        line = re.sub(r":[a-z:]+:`~?([^`<]*?)(?: <[^>]*>)?`", r"\1", line)  # :func:`x` -> x
        line = line.replace("``", "").replace("**", "")
        out.append(line.rstrip())
    text = "\n".join(out)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def load_corpus() -> list[str]:
    """The documents of the corpus, in a fixed order (needs the two Debian packages)."""
    docs = []
    for path in sorted(glob.glob(os.path.join(PY_DOC_SOURCES, "**", "*.txt"), recursive=True)):
        if "whatsnew/changelog" in path:
            continue                                    # a bug-number list, not prose
        with open(path, encoding="utf-8", errors="replace") as f:
            doc = _clean_rst(f.read())
        if len(doc) > 200:
            docs.append(doc)
    for path in sorted(glob.glob(os.path.join(HANDBOOK_HTML, "*.html"))):
        parser = _HTMLText()
        with open(path, encoding="utf-8", errors="replace") as f:
            parser.feed(f.read())
        parser._flush()
        doc = "\n\n".join(parser.blocks)
        if len(doc) > 200:
            docs.append(doc)
    if not docs:
        raise SystemExit("error: corpus not found; install it with "
                         "`apt-get install -y python3.11-doc debian-handbook`")
    return docs


# ----------------------------------------------------------------------------- tokenizer
def train_tokenizer(docs: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(docs, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS,
                                  pad_token=EOS, unk_token=EOS, padding_side="left",
                                  model_max_length=1024)


# ----------------------------------------------------------------------------- models
def llama(cfg: TrainConfig, layers: int, dim: int, ffn: int, heads: int, eos_id: int):
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=dim, intermediate_size=ffn,
                         num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=heads, max_position_embeddings=cfg.max_positions,
                         tie_word_embeddings=True, bos_token_id=eos_id, eos_token_id=eos_id,
                         pad_token_id=eos_id, rope_theta=10000.0)
    return LlamaForCausalLM(config)


def load_target(path: str):
    from sampling.app.models import load_model  # reads the int8 folder training.store_int8 writes
    return load_model(path, device="cpu", dtype="float32")


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def windows(stream: torch.Tensor, seq_len: int, batch: int, gen: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(stream) - seq_len - 1, (batch,), generator=gen)
    return torch.stack([stream[s:s + seq_len] for s in starts.tolist()])  # [batch, seq_len]


@torch.no_grad()
def val_loss(model, val: torch.Tensor, seq_len: int) -> float:
    model.eval()
    n = min(16, (len(val) - 1) // seq_len)
    x = val[:n * seq_len].view(n, seq_len)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=x, labels=x).loss.item()
    model.train()
    return loss


def save(model, tokenizer, path: str, eos_id: int):
    from transformers import GenerationConfig
    model = model.to(torch.float16)
    model.generation_config = GenerationConfig(bos_token_id=eos_id, eos_token_id=eos_id,
                                               pad_token_id=eos_id)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    model.to(torch.float32)
    config_path = os.path.join(path, "config.json")     # stored in fp16, loaded as fp32
    with open(config_path) as f:
        config = json.load(f)
    config["dtype"] = "float32"
    with open(config_path, "w") as f:
        f.write(dumps(config, indent=2))


class Log:
    def __init__(self, path: str):
        self.f = open(path, "w", newline="")
        self.w = csv.writer(self.f)
        self.w.writerow(["model", "step", "tokens", "lr", "train_loss", "val_loss", "top1_agree", "elapsed_s"])

    def row(self, *values):
        self.w.writerow(values)
        self.f.flush()


def train_target(cfg, train, val, eos_id, log, t0):
    torch.manual_seed(cfg.seed)
    model = llama(cfg, cfg.target_layers, cfg.target_dim, cfg.target_ffn, cfg.target_heads, eos_id)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.target_lr, betas=(0.9, 0.95), weight_decay=0.1)
    gen = torch.Generator().manual_seed(cfg.seed)
    bar = tqdm(range(cfg.target_steps), desc="target", dynamic_ncols=True)
    for step in bar:
        lr = lr_at(step, cfg.target_steps, cfg.target_lr, cfg.warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        x = windows(train, cfg.seq_len, cfg.target_batch, gen)     # [B, T]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        last = step == cfg.target_steps - 1
        if step % 25 == 0 or last:
            v = val_loss(model, val, cfg.seq_len) if (step % 100 == 0 or last) else ""
            log.row("target", step, (step + 1) * x.numel(), f"{lr:.2e}", f"{loss.item():.4f}",
                    f"{v:.4f}" if v != "" else "", "", f"{time.time() - t0:.0f}")
    return model.eval()


@torch.no_grad()
def target_continuations(cfg, target, train, eos_id) -> torch.Tensor:
    """Continuations the target writes itself from corpus prefixes, half greedy, half sampled."""
    from transformers import DynamicCache
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    prefix_len, chunk, out = 64, 64, []
    for i in tqdm(range(0, cfg.gen_prompts, chunk), desc="target samples", dynamic_ncols=True):
        x = windows(train, prefix_len, chunk, gen)                 # [chunk, prefix_len]
        greedy = (i // chunk) % 2 == 0
        cache = DynamicCache(config=target.config)
        ids, seq = x, [x]
        for t in range(cfg.gen_tokens):
            pos = torch.arange(prefix_len + t - ids.shape[1], prefix_len + t).expand(chunk, -1)
            logits = target(input_ids=ids, past_key_values=cache, position_ids=pos,
                            use_cache=True).logits[:, -1].float()  # [chunk, V]
            if greedy:
                ids = logits.argmax(-1, keepdim=True)
            else:
                ids = torch.multinomial(F.softmax(logits, -1), 1, generator=gen)
            seq.append(ids)
        out.append(torch.cat(seq, 1))                           # [chunk, prefix_len + gen_tokens]
    return torch.cat(out)


def distill_draft(cfg, target, train, samples, eos_id, log, t0):
    torch.manual_seed(cfg.seed + 2)
    draft = llama(cfg, cfg.draft_layers, cfg.draft_dim, cfg.draft_ffn, cfg.draft_heads, eos_id)
    opt = torch.optim.AdamW(draft.parameters(), lr=cfg.draft_lr, betas=(0.9, 0.95), weight_decay=0.0)
    gen = torch.Generator().manual_seed(cfg.seed + 3)
    bar = tqdm(range(cfg.draft_steps), desc="draft", dynamic_ncols=True)
    for step in bar:
        lr = lr_at(step, cfg.draft_steps, cfg.draft_lr, cfg.warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        if step % 2 == 0:                                       # corpus windows
            x = windows(train, cfg.seq_len, cfg.draft_batch, gen)
        else:                                                   # the target's own writing
            x = samples[torch.randint(0, len(samples), (cfg.draft_batch * 2,), generator=gen)]
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            p_logits = target(input_ids=x).logits.float()       # [B, T, V]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            q_logits = draft(input_ids=x).logits.float()        # [B, T, V]
        # forward KL(p || q) summed over the vocabulary, mean over positions
        loss = F.kl_div(F.log_softmax(q_logits, -1), F.log_softmax(p_logits, -1),
                        log_target=True, reduction="none").sum(-1).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(draft.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            agree = (q_logits.argmax(-1) == p_logits.argmax(-1)).float().mean().item()
        bar.set_postfix(kl=f"{loss.item():.3f}", top1=f"{agree:.3f}")
        if step % 25 == 0 or step == cfg.draft_steps - 1:
            log.row("draft", step, (step + 1) * x.numel(), f"{lr:.2e}", f"{loss.item():.4f}", "",
                    f"{agree:.4f}", f"{time.time() - t0:.0f}")
    return draft.eval()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for field, default in asdict(TrainConfig()).items():
        ap.add_argument(f"--{field}", type=type(default), default=default,
                        help=f"TrainConfig.{field} (default {default})")
    cfg = TrainConfig(**vars(ap.parse_args(argv)))
    if cfg.stage not in ("pair", "draft"):
        ap.error(f"--stage {cfg.stage!r}: choose 'pair' or 'draft'")
    if cfg.stage == "draft" and not os.path.isdir(os.path.join(cfg.out, "target")):
        ap.error(f"--stage draft needs a trained target in {os.path.join(cfg.out, 'target')!r}")
    if cfg.stage == "draft" and os.path.exists(os.path.join(cfg.out, cfg.draft_name)):
        ap.error(f"--draft_name {cfg.draft_name!r}: {os.path.join(cfg.out, cfg.draft_name)} exists; "
                 "pick a new name")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    os.makedirs(cfg.out, exist_ok=True)
    t0 = time.time()

    docs = load_corpus()
    val_docs, train_docs = docs[::50], [d for i, d in enumerate(docs) if i % 50]
    if cfg.stage == "pair":
        tokenizer = train_tokenizer(train_docs, cfg.vocab_size)
    else:                                                       # the target's own tokenizer
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(os.path.join(cfg.out, "target"))
    eos_id = tokenizer.convert_tokens_to_ids(EOS)

    def stream(ds):
        ids = []
        for enc in tokenizer(ds, add_special_tokens=False)["input_ids"]:
            ids.extend(enc + [eos_id])
        return torch.tensor(ids, dtype=torch.long)

    train, val = stream(train_docs), stream(val_docs)
    print(f"corpus: {len(docs)} documents, {sum(map(len, docs)) / 1e6:.1f}M characters, "
          f"{len(train) / 1e6:.2f}M train tokens, {len(val) / 1e3:.0f}k validation tokens", flush=True)

    if cfg.stage == "pair":
        log = Log(os.path.join(cfg.out, "training_log.csv"))
        target = train_target(cfg, train, val, eos_id, log, t0)
        save(target, tokenizer, os.path.join(cfg.out, "target"), eos_id)
        suffix = ""
    else:                                                       # one more draft for the same target
        log = Log(os.path.join(cfg.out, f"training_log_{cfg.draft_name}.csv"))
        target = load_target(os.path.join(cfg.out, "target"))
        suffix = f"_{cfg.draft_name}"
    samples = target_continuations(cfg, target, train, eos_id)
    draft = distill_draft(cfg, target, train, samples, eos_id, log, t0)
    save(draft, tokenizer, os.path.join(cfg.out, cfg.draft_name), eos_id)
    summary = {"config": asdict(cfg), "documents": len(docs), "train_tokens": len(train),
               "target_tokens_seen": cfg.target_steps * cfg.target_batch * cfg.seq_len
               if cfg.stage == "pair" else None,
               "target_val_loss": val_loss(target, val, cfg.seq_len),
               "draft_val_loss": val_loss(draft, val, cfg.seq_len),
               "params_target": sum(p.numel() for p in target.parameters()),
               "params_draft": sum(p.numel() for p in draft.parameters()),
               "wall_time_s": round(time.time() - t0)}
    with open(os.path.join(cfg.out, f"training_summary{suffix}.json"), "w") as f:
        f.write(dumps(summary, indent=2))
    print(dumps(summary, indent=2))


if __name__ == "__main__":
    main()
