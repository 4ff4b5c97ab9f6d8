"""The Dolly records the benchmarks, the GPU check and the training read (``instruction``,
``context``, ``response``, ``category`` per line), and the one prompt template they all render."""
from __future__ import annotations

import json
import os

DOLLY_HUB = "databricks/databricks-dolly-15k"
FIELDS = ("instruction", "context", "response", "category")
PROMPT_TEMPLATE = "### Instruction:\n{instruction}\n\n{context}### Response:\n"
CONTEXT_TEMPLATE = "### Context:\n{context}\n\n"


def render_prompt(record: dict) -> str:
    """The one prompt template: the instruction, the context when there is one, then a cue."""
    context = record.get("context", "").strip()
    return PROMPT_TEMPLATE.format(instruction=record["instruction"].strip(),
                                  context=CONTEXT_TEMPLATE.format(context=context) if context else "")


def _check_record(rec) -> str | None:
    if not isinstance(rec, dict):
        return "not a JSON object"
    if not isinstance(rec.get("instruction"), str) or not rec["instruction"].strip():
        return "no instruction"
    for f in FIELDS[1:]:
        if f in rec and not isinstance(rec[f], str):
            return f"field {f!r} is not a string"
    return None


def load_dolly(path: str | None, skip_bad_lines: bool = False, warn=print) -> list[dict]:
    """Dolly records (instruction, context, response, category) from a local jsonl file, or the
    hub dataset through ``datasets`` when no path is given."""
    if path is None:
        try:
            import datasets

            from .models import hub_reachable
            if not hub_reachable():                    # the local cache only, at once, no retries
                datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True
            return [dict(r) for r in datasets.load_dataset(DOLLY_HUB, split="train")]
        except Exception as e:                         # offline, or the hub refused
            raise ValueError(f"no --dataset_path given and the hub dataset {DOLLY_HUB} could not be "
                             f"loaded ({type(e).__name__}); pass a local Dolly jsonl with "
                             f"--dataset_path (README: Where Dolly comes from)") from None
    if not os.path.isfile(path):
        raise ValueError(f"dataset file not found: {path}")
    records, bad = [], 0
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                problem = _check_record(rec)
            except json.JSONDecodeError as e:
                problem = f"invalid JSON ({e.msg})"
            if problem:
                if not skip_bad_lines:
                    raise ValueError(f"{path}:{lineno}: malformed record: {problem} "
                                     f"(--skip_bad_lines skips such lines)")
                bad += 1
                continue
            records.append({f: rec.get(f, "") for f in FIELDS})
    if bad:
        warn(f"warning: skipped {bad} malformed line(s) in {path}")
    if not records:
        raise ValueError(f"dataset file {path} holds no records")
    return records
