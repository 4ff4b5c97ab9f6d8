"""Store a model folder's weights in int8 (per-row float16 scales, dequantized at load) and
measure what that changes: next-token loss and top-1 agreement on held-out text, sizes.

    python -m training.store_int8 --model models/target --dataset_path ../shared/dolly/dolly-sample.jsonl \\
        --out /tmp/target-int8 --report models/storage_int8.json

``--out`` may be ``--model`` itself (the weights file is replaced atomically, the tokenizer and the
rest of the folder stay). The embedded target is stored this way so that the repository fits the
64 MiB a lent GPU machine takes (float16: 58.7 MB; int8: 29.5 MB).
"""
from __future__ import annotations

import os

import torch

from sampling.app.cli import Parser, run
from sampling.app.dolly import load_dolly, render_prompt
from sampling.app.models import INT8_WEIGHTS, WEIGHTS, load_model, load_tokenizer, save_int8
from sampling.app.strict_json import dumps


@torch.inference_mode()
def compare(a, b, texts: list[list[int]]) -> dict:
    """Mean next-token loss of both models, and how often their top-1 tokens agree, over texts."""
    nll, agree, n = [0.0, 0.0], 0, 0
    for ids in texts:
        x = torch.tensor([ids])
        la, lb = a(input_ids=x).logits[0, :-1].float(), b(input_ids=x).logits[0, :-1].float()   # [T - 1, V]
        y = x[0, 1:]
        nll[0] += torch.nn.functional.cross_entropy(la, y, reduction="sum").item()
        nll[1] += torch.nn.functional.cross_entropy(lb, y, reduction="sum").item()
        agree += (la.argmax(-1) == lb.argmax(-1)).sum().item()
        n += len(y)
    return dict(tokens=n, loss_before=nll[0] / n, loss_after=nll[1] / n, top1_agreement=agree / n)


def main(argv=None) -> None:
    ap = Parser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="model folder (Hugging Face format)")
    ap.add_argument("--out", required=True, help="folder for the int8 copy (may be --model: replaced in place)")
    ap.add_argument("--dataset_path", required=True, help="Dolly-format jsonl: the held-out text measured on")
    ap.add_argument("--samples", type=int, default=64, help="records measured on")
    ap.add_argument("--report", default=None, help="JSON file for the measurement (refused if it exists)")
    args = ap.parse_args(argv)
    if not os.path.isfile(os.path.join(args.model, WEIGHTS)):
        raise ValueError(f"--model {args.model}: no {WEIGHTS}")
    if args.report and os.path.exists(args.report):
        raise ValueError(f"--report {args.report} exists: choose a new file")
    if args.samples < 1:
        raise ValueError(f"--samples must be >= 1, got {args.samples}")
    before = load_model(args.model, device="cpu", dtype="float32")
    tok = load_tokenizer(args.model)
    limit = before.config.max_position_embeddings
    texts = [tok(render_prompt(r) + r["response"])["input_ids"][:limit]
             for r in load_dolly(args.dataset_path)[:args.samples]]
    size_before = os.path.getsize(os.path.join(args.model, WEIGHTS))
    save_int8(before, args.out)              # in place: the float weights file is removed
    if os.path.abspath(args.out) != os.path.abspath(args.model):
        tok.save_pretrained(args.out)
    after = load_model(args.out, device="cpu", dtype="float32")
    report = dict(compare(before, after, texts), records=len(texts), bytes_before=size_before,
                  bytes_after=os.path.getsize(os.path.join(args.out, INT8_WEIGHTS)))
    print(dumps(report, indent=2))
    if args.report:
        with open(args.report, "w") as f:
            f.write(dumps(report, indent=2))


if __name__ == "__main__":
    run(main)
