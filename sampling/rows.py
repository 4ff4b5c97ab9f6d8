"""What every decode loop shares: which rows still generate, what each has produced, the budget and
EOS, finished rows leaving the batch and requests joining it, the streamer, and the statistics of
one generation and of several (``merge_stats``).

Bookkeeping lives in Python lists; every tensor this module hands back (row indices, masks) is
made on the models' device, so the loops never mix host and device tensors.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .params import RowDraws, SamplingParams
from .utils import now, to_device

SUM_STATS = ("new_tokens", "target_calls", "draft_calls", "drafted", "accepted")   # counts that add up


@dataclass
class NewRow:
    """A request that joins a running batch (continuous batching): what a row streamer's ``admit``
    hands the loop."""
    ids: list[int]                # prompt token ids
    budget: int                   # new tokens it may take
    params: SamplingParams        # its sampling parameters
    seed: int | None = None       # its own draws' seed, when the batch's rows draw their own (``Rows.seeds``)


class Live(NamedTuple):
    """Which rows of the current batch are finished, as a step reads it."""
    done: torch.Tensor               # [b] bool on the models' device
    rows: list[bool]                 # the same on the host
    column: torch.Tensor             # [b, 1] long on the device, 1 where a row still runs: the next token's mask

    @staticmethod
    def all(b: int, device: torch.device) -> Live:
        """b rows that all run (a cascade's level: its one row is never finished there)."""
        return Live(torch.zeros(b, dtype=torch.bool, device=device), [False] * b,
                    torch.ones(b, 1, dtype=torch.long, device=device))


class Rows:
    """The rows of a batch being decoded: their output, budget, EOS and per-row statistics.

    ``max_new_tokens``: one budget, or one per row. ``streamer``: a transformers streamer (batch 1,
    ``put``/``end``) or a row streamer (``put_row(row, tokens)``, ``stopped(row)``, ``end``) that
    gets each row's tokens as they are accepted and may stop a row (its client left): the row then
    finishes at that step and leaves the batch like one that met its EOS. A row streamer with
    ``admit(live) -> list[NewRow]`` also hands the loop requests that join the batch between steps
    (``admit_rows``); the k-th row it admits is row B + k of the output. With ``end_row(row, stats,
    error)`` it is told as soon as a row is finished, with the row's statistics (or why it failed),
    while the batch goes on.

    ``seeds`` (one per row): every row draws from its own generators (``RowDraws``), keyed by its
    seed and its tokens so far, so a row's output does not depend on what shares its batch; the
    speculative loops then also give each row its own draft length (``rooms``), and a row whose laws
    stop being finite fails alone (``fail``)."""

    def __init__(self, B: int, max_new_tokens: int | list[int], eos_token_id: int | None, device: torch.device,
                 streamer=None, seeds: list[int] | None = None):
        self.out: list[list[int]] = [[] for _ in range(B)]   # new tokens of each original row
        self.index = list(range(B))          # original row of each row of the current batch
        self.done = [False] * B              # per current row: finished (kept only when masked)
        self.budget = [max_new_tokens] * B if isinstance(max_new_tokens, int) else list(max_new_tokens)
        self.eos, self.device, self.streamer = eos_token_id, device, streamer
        self.by_row = hasattr(streamer, "put_row")          # a row streamer (else a transformers one, or none)
        self.steps, self.accepted, self.drafted = [0] * B, [0] * B, [0] * B   # per original row
        self.accepted_lengths: list[int] = []                # drafts accepted per row and verify
        self.t0, self.ttft = now(device), None
        self.ttft_tokens = 0                 # tokens handed out by the first hand-out (AR: one per row; a
                                             # speculative loop's first step: each row's accepted drafts + 1)
        self._done_dev: tuple | None = None  # done as last copied to the device, that copy, the live column
        self.seeds = None if seeds is None else list(seeds)   # per original row: its own draws' seed
        self.speculative = False             # set by a speculative loop: it verifies after its prefill
        self.failed: dict[int, str] = {}     # original row -> why it failed (it stops; the others go on)
        self.ends_rows = self.by_row and hasattr(streamer, "end_row")

    @property
    def all_done(self) -> bool:
        return all(self.done)

    def room(self) -> int:
        """New tokens the unfinished row with the most room left may still take (its own budget)."""
        return max(self.rooms())

    def rooms(self) -> list[int]:
        """New tokens each current row may still take (0 for a finished one)."""
        return [0 if d else self.budget[r] - len(self.out[r]) for r, d in zip(self.index, self.done)]

    def draws(self, generator: torch.Generator | None, limits: list[int] | None = None):
        """What this step draws from: the batch's generator, or, with per-row seeds, each current
        row's own (``RowDraws``: keyed by its seed and its tokens so far); ``limits``: each row's
        own draft length this step."""
        if self.seeds is None:
            return generator
        return RowDraws([self.seeds[r] for r in self.index], [len(self.out[r]) for r in self.index], self.device,
                        limits)

    def fail_rows(self, draws, failed: list[bool] | None) -> None:
        """After a step of rows that draw their own values: each row whose laws were not finite
        (``failed``, read with the step) or whose draw could not be made (``draws.failed``) fails alone."""
        if not isinstance(draws, RowDraws):
            return
        bad = set(draws.failed) | {j for j, f in enumerate(failed or []) if f}
        for j in sorted(bad):
            self.fail(j, "its probabilities were not finite (NaN or infinity): a numeric fault in the model or in "
                         "its sampling parameters")

    def fail(self, j: int, error: str) -> None:
        """Current row j failed (a fault of its own): it is finished, its tokens so far kept, and the
        row streamer told why; the other rows go on."""
        if not self.done[j]:
            r = self.index[j]
            self.failed[r] = error
            self.done[j] = True
            if self.ends_rows:
                self.streamer.end_row(r, None, error)

    def done_mask(self) -> torch.Tensor:
        """[b] bool on the models' device: which current rows are finished. Copied to the device
        only when it changed (a copy from the host makes a GPU's host wait), so a step in which
        no row finishes or joins reuses the last one."""
        key = tuple(self.done)
        if self._done_dev is None or self._done_dev[0] != key:
            done = to_device(list(key), self.device, torch.bool)
            self._done_dev = key, done, (~done).long().unsqueeze(1)
        return self._done_dev[1]

    def live(self) -> Live:
        """The finished rows on the host and the device (copied only when they changed: ``done_mask``)."""
        done = self.done_mask()
        return Live(done, list(self.done), self._done_dev[2])

    def hand_out(self, new: list[list[int]], accepted: list[int] | None = None,
                 drafted: int | list[int] = 0) -> None:
        """Append each unfinished row's new tokens, cut at the budget and after an EOS; a row that
        reaches either is done (and a row streamer with ``end_row`` is told at once). ``accepted``
        (speculative loops): drafts each row accepted of ``drafted`` (one count, or one per row)."""
        for j, (r, toks) in enumerate(zip(self.index, new)):
            if self.done[j]:
                continue
            toks = toks[:self.budget[r] - len(self.out[r])]
            if self.eos is not None and self.eos in toks:
                toks = toks[:toks.index(self.eos) + 1]
            self.out[r] += toks
            stopped = False
            if self.by_row:
                self.streamer.put_row(r, toks)
                stopped = self.streamer.stopped(r)
            elif self.streamer is not None:
                self.streamer.put(torch.tensor(toks))
            self.steps[r] += 1
            if accepted is not None:
                self.accepted[r] += accepted[j]
                self.drafted[r] += drafted if isinstance(drafted, int) else drafted[j]
                self.accepted_lengths.append(accepted[j])
            self.done[j] = len(self.out[r]) == self.budget[r] or toks[-1] == self.eos or stopped
            if self.done[j] and self.ends_rows:               # answered now, while the batch goes on
                self.streamer.end_row(r, self.row_stats(r), None)
        if self.ttft is None:
            self.ttft = now(self.device) - self.t0
            self.ttft_tokens = sum(map(len, self.out))

    def take_new(self) -> list[NewRow]:
        """Requests the row streamer admits now (none without ``admit``, or once every row is done),
        registered as new rows of the batch."""
        if self.all_done or not hasattr(self.streamer, "admit"):
            return []
        new = self.streamer.admit(sum(not d for d in self.done))
        for r in new:
            if self.seeds is not None:
                if r.seed is None:
                    raise ValueError("rows that draw their own values take a seed with each joining row (NewRow.seed)")
                self.seeds.append(r.seed)
            self.index.append(len(self.out))
            self.out.append([])
            self.done.append(False)
            self.budget.append(r.budget)
            self.steps.append(0)
            self.accepted.append(0)
            self.drafted.append(0)
        return new

    def advance(self, seq: torch.Tensor, mask: torch.Tensor, parts) -> tuple[torch.Tensor, torch.Tensor]:
        """Between two steps: finished rows leave seq [b, S], mask [b, S] and every part (a cache, a
        drafter, a verifier: ``select_rows``), then requests the row streamer admits join them
        (``admit_rows``), and where rows join, the leading slots that are padding in every row go
        (``drop_leading_padding``). Returns the new seq and mask."""
        keep = self.drop_finished()
        if keep is not None and len(keep):
            seq, mask = seq[keep], mask[keep]
            for part in parts:
                part.select_rows(keep)
        old = len(seq)
        seq, mask = admit_rows(self, seq, mask, parts)
        if old and (keep is not None or len(seq) > old) and hasattr(self.streamer, "admit"):
            seq, mask = drop_leading_padding(seq, mask, parts)   # rows join: a batch that may never end narrows
        return seq, mask

    def drop_finished(self) -> torch.Tensor | None:
        """Forget finished rows; returns the indices of the rows that go on, on the models' device,
        for the caches and the loop's tensors (None when no row finished)."""
        if not any(self.done):
            return None
        keep = [j for j, d in enumerate(self.done) if not d]
        self.index = [self.index[j] for j in keep]
        self.done = [False] * len(keep)
        return to_device(keep, self.device)

    def row_stats(self, r: int) -> dict:
        """Original row r's statistics: its new tokens, the target passes it took part in (AR: one a
        token; a speculative loop: its steps and the prefill), its drafted and accepted drafts."""
        return dict(new_tokens=len(self.out[r]), target_calls=self.steps[r] + self.speculative,
                    drafted=self.drafted[r], accepted=self.accepted[r])

    def finish(self, target_calls: int, draft_calls: int = 0, gamma_trace: list[int] | None = None) -> dict:
        """End the stream (if any) and return the statistics every loop returns (README: Python API);
        ``gamma_trace``: the speculative loops' draft lengths, step by step."""
        if self.streamer is not None:
            self.streamer.end()
        B, new_tokens = len(self.out), sum(map(len, self.out))
        rows = [self.row_stats(r) for r in range(B)]
        passes = [row["target_calls"] for row in rows]                   # target passes of each row
        drafted, accepted = sum(self.drafted), sum(self.accepted)
        stats = dict(new_tokens=new_tokens, target_calls=target_calls, draft_calls=draft_calls,
                     drafted=drafted, accepted=accepted,
                     acceptance_rate=accepted / drafted if drafted else 0.0,
                     # new tokens per target pass a row took part in (the prefill included): 1.0 for AR
                     mean_accepted_tokens=new_tokens / max(1, sum(passes)),
                     wall_time_s=now(self.device) - self.t0, ttft_s=self.ttft or 0.0,
                     ttft_tokens=self.ttft_tokens, rows=rows)
        if self.failed:
            stats["failed"] = {r: e for r, e in sorted(self.failed.items())}
        if gamma_trace is not None:
            stats.update(gamma_trace=gamma_trace,
                         accepted_hist=histogram(self.accepted_lengths, max(gamma_trace + [0]) + 1))
        return stats


def histogram(values: list[int], size: int) -> list[int]:
    """Counts of 0 .. size - 1 in values."""
    counts = [0] * size
    for v in values:
        counts[v] += 1
    return counts


def sum_hists(hists: list[list[int]]) -> list[int]:
    """Element-wise sum of histograms of different lengths."""
    out = [0] * max(map(len, hists), default=0)
    for h in hists:
        for i, c in enumerate(h):
            out[i] += c
    return out


def merge_stats(parts: list[dict], one_generation: bool = False, wall_time_s: float | None = None) -> dict:
    """The statistics of several runs of a loop as one: counts and histograms added, traces and rows
    concatenated, rates recomputed. ``one_generation``: the parts are one generation's rows decoded
    one after another (TTFT is the first part's, ``wall_time_s`` the whole generation's); otherwise
    separate generations, such as batches (TTFT the mean of theirs, wall time the sum)."""
    out = {k: sum(s[k] for s in parts) for k in SUM_STATS}
    passes = sum(r["target_calls"] for s in parts for r in s["rows"])     # target passes of every row
    out.update(acceptance_rate=out["accepted"] / max(1, out["drafted"]),
               mean_accepted_tokens=out["new_tokens"] / max(1, passes),
               wall_time_s=sum(s["wall_time_s"] for s in parts) if wall_time_s is None else wall_time_s)
    if one_generation:
        out.update(ttft_s=parts[0]["ttft_s"], ttft_tokens=parts[0]["ttft_tokens"])
    else:
        out.update(ttft_s=sum(s["ttft_s"] for s in parts) / len(parts),
                   ttft_tokens=sum(s["ttft_tokens"] for s in parts))     # every generation's first hand-out
    mean = lambda xs: sum(xs) / len(xs)                                   # noqa: E731
    for key, empty, join in (("padding_fraction", 0.0, mean), ("prompt_padding_fraction", 0.0, mean),
                             ("rows_verified", 0, sum), ("gamma_trace", [], lambda xs: [g for x in xs for g in x]),
                             ("accepted_hist", [], sum_hists)):
        if any(key in s for s in parts):
            out[key] = join([s.get(key, empty) for s in parts])
    out["rows"] = [r for s in parts for r in s["rows"]]
    return out


def drop_leading_padding(seq: torch.Tensor, mask: torch.Tensor, parts) -> tuple[torch.Tensor, torch.Tensor]:
    """The leading slots that are padding in every row of seq [b, S] (mask [b, S]) go from seq, mask
    and every part (``drop_leading``): a batch that rows keep joining and leaving stays as wide as
    its rows, not as wide as every row it ever held. One read of the mask (when rows left or joined)."""
    lead = int(mask.any(0).long().argmax())                     # the first column any row uses
    if lead == 0:
        return seq, mask
    for part in parts:
        part.drop_leading(lead)
    return seq[:, lead:], mask[:, lead:]


def admit_rows(rows: Rows, seq: torch.Tensor, mask: torch.Tensor, parts) -> tuple[torch.Tensor, torch.Tensor]:
    """Continuous batching, between two steps of a loop: the requests the row streamer admits join
    the batch. Their prompts are right-aligned with the batch's sequence seq [b, S] (mask [b, S]),
    which is padded on the left when a prompt is longer; each part (a model's cache, a drafter)
    takes them in (``admit``: one prefill of the new rows). Returns the new seq and mask [b + n, W]."""
    new = rows.take_new()
    if not new:
        return seq, mask
    W = max(seq.shape[1], max(len(r.ids) for r in new))
    pad = W - seq.shape[1]
    ids = to_device([[0] * (W - len(r.ids)) + r.ids for r in new], seq.device, seq.dtype)                 # [n, W]
    m = to_device([[0] * (W - len(r.ids)) + [1] * len(r.ids) for r in new], mask.device, mask.dtype)      # [n, W]
    for part in parts:
        part.admit(ids, m, pad, [r.params for r in new])
    return torch.cat([F.pad(seq, (pad, 0)), ids]), torch.cat([F.pad(mask, (pad, 0)), m])
