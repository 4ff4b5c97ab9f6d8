"""A drafter with no model: prompt lookup (Saxena 2023; transformers' ``prompt_lookup_num_tokens``).

Each row's last n tokens (n from ``max_ngram`` down to ``min_ngram``) are looked up in the row's
own prompt and text so far; the tokens that followed the latest earlier match are the drafts. A
row with no match, or a continuation shorter than ``g``, repeats its last token to fill the step
(every row of a step drafts ``g`` tokens). The drafts are deterministic, so their law is one-hot:
the verifier's rule (accept x with probability p(x), else draw from norm(max(0, p - onehot(x))))
keeps the target's law at every temperature, and greedy output equals greedy AR.
"""
from __future__ import annotations

import torch

from ..contracts import Accepted, Draft, StepWork
from ..utils import to_device


class NgramDrafter:
    """A drafter without a model (``sampling.contracts.Drafter``, rows may join it), and its own
    source (``DrafterSource``): ``generate(..., draft_model=NgramDrafter())`` in google, deepmind and bass."""

    kind = "ngram"
    reads_target = False
    max_draft = None

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"n-gram drafter: need 1 <= min_ngram <= max_ngram, got {min_ngram} and {max_ngram}")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self.calls = 0                                   # no model passes, ever
        self.rows: list[list[int]] = []                  # each row's real tokens so far (host lists)
        self.seen = 0                                    # slots of seq already in self.rows

    def drafter(self, params=None, vocab=None, tree=None) -> NgramDrafter:
        """A fresh drafter for one generation (the loop's own copy)."""
        return NgramDrafter(self.max_ngram, self.min_ngram)

    def check_target(self, target) -> None:
        """Any target: the drafts are its own tokens."""

    def priced_pass(self) -> None:
        """No model pass to price: a lookup in host lists."""
        return None

    def prefill(self, input_ids: torch.Tensor, mask: torch.Tensor, hidden: torch.Tensor | None = None) -> None:
        """The prompts' real tokens, read once (afterwards each step's come with ``commit``)."""
        self.rows, self.seen = [[] for _ in range(len(input_ids))], 0
        self._read(input_ids, mask)

    def select_rows(self, keep: torch.Tensor) -> None:
        self.rows = [self.rows[i] for i in keep.tolist()]

    def admit(self, ids: torch.Tensor, mask: torch.Tensor, pad: int, params=None) -> None:
        """New rows join between steps: the batch's slots move right by ``pad``; ids, mask [n, W]."""
        self.seen += pad
        for r, k in zip(ids[:, :self.seen].tolist(), mask[:, :self.seen].tolist()):
            self.rows.append([t for t, m in zip(r, k) if m])

    def drop_leading(self, n: int) -> None:
        """The batch's first ``n`` slots (padding in every row) go: only the count of slots seen moves."""
        self.seen -= n

    def commit(self, acc: Accepted) -> None:
        """The step's accepted drafts and next token join each row's text: the loop has them on the
        host already (``Accepted.taken``), so the drafter reads nothing from the device."""
        for row, t in zip(self.rows, acc.taken):
            row.extend(t)
        self.seen = acc.start + acc.tokens.shape[1] + 1   # the slots seq has once the step's tokens join

    def _read(self, seq: torch.Tensor, mask: torch.Tensor) -> None:
        """Read the slots of seq [b, S] not yet in self.rows (one transfer; padding and holes are not
        text, and a slot's mask never changes once it is in seq)."""
        k = seq.shape[1] - self.seen
        host = torch.cat([seq[:, self.seen:], mask[:, self.seen:].to(seq.dtype)], 1).tolist()
        for row, h in zip(self.rows, host):
            row.extend(t for t, m in zip(h[:k], h[k:]) if m)
        self.seen = seq.shape[1]

    def lookup(self, row: list[int], g: int) -> list[int]:
        """g drafts for one row's real tokens (the latest match of the longest n-gram that has one)."""
        for n in range(min(self.max_ngram, len(row) - 1), self.min_ngram - 1, -1):
            tail = row[-n:]
            for start in range(len(row) - n - 1, -1, -1):          # latest earlier occurrence first
                if row[start:start + n] == tail:
                    follow = row[start + n:start + n + g]
                    return follow + [follow[-1]] * (g - len(follow))
        return [row[-1]] * g

    def work(self, g: int) -> StepWork:
        """No model pass; a verify pass of g + 1."""
        return StepWork((), g + 1)

    def propose(self, seq: torch.Tensor, mask: torch.Tensor, g: int, generator) -> Draft:
        """g drafts after seq [b, S] (mask [b, S]) for every row, from the rows' texts on the host
        (slots that reached seq by another way than ``commit``, if any, are read first)."""
        if seq.shape[1] > self.seen:
            self._read(seq, mask)
        if not g:
            return Draft(tokens=seq[:, :0], q=None)
        drafts = [self.lookup(r, g) for r in self.rows]
        return Draft(tokens=to_device(drafts, seq.device, seq.dtype).view(len(drafts), g), q=None)   # [b, g]
