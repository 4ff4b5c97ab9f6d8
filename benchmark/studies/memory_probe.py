"""Peak memory of one BASS generation with a large vocabulary, on a random-init Llama built here
(nothing is downloaded): what the KV wrapper's probability history costs.

    python -m benchmark.studies.memory_probe --vocab 128000 --batch 16 --max_tokens 256

The model is tiny (hidden size 32) so that the [B, positions, V] probability tensors dominate.
Prints the peak resident memory of the process and how far it rose during the generation.
"""
from __future__ import annotations

import resource

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from sampling import generate
from sampling.app.cli import Parser, check_at_least_one, run


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024       # KiB on Linux


def main(argv=None) -> None:
    ap = Parser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vocab", type=int, default=128_000, help="vocabulary size of the random models")
    ap.add_argument("--batch", type=int, default=16, help="rows in the batch")
    ap.add_argument("--prompt_tokens", type=int, default=20, help="tokens per prompt")
    ap.add_argument("--max_tokens", type=int, default=256, help="new tokens per row")
    ap.add_argument("--gamma", type=int, default=4, help="draft length")
    ap.add_argument("--draft_noise", type=float, default=0.05,
                    help="the draft is the target plus Gaussian noise of this size relative to each weight's std")
    args = ap.parse_args(argv)
    check_at_least_one(args, "vocab", "batch", "prompt_tokens", "max_tokens", "gamma")
    if not args.draft_noise >= 0:
        raise ValueError(f"--draft_noise must be >= 0, got {args.draft_noise}")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=args.prompt_tokens + args.max_tokens)
    target, draft = LlamaForCausalLM(cfg).eval(), LlamaForCausalLM(cfg).eval()
    with torch.no_grad():                          # a draft that agrees with the target part of the time
        for p, q in zip(target.parameters(), draft.parameters()):
            q.copy_(p + torch.randn_like(p) * args.draft_noise * p.std().clamp(min=1e-3))
    ids = torch.randint(0, args.vocab, (args.batch, args.prompt_tokens))
    before = rss_mib()
    res = generate(target, ids, draft_model=draft, mode="bass", max_new_tokens=args.max_tokens,
                   gamma=args.gamma, temperature=0)
    s = res.stats
    print(f"vocab {args.vocab}, batch {args.batch}, {args.max_tokens} new tokens: peak RSS {rss_mib():.0f} MiB, "
          f"{rss_mib() - before:.0f} MiB above what the models took; {s['new_tokens']} tokens, "
          f"{s['target_calls']} target calls, {s['wall_time_s']:.1f} s")


if __name__ == "__main__":
    run(main)
