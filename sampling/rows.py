"""What every decode loop shares: which rows still generate, what each has produced, the budget and
EOS, finished rows leaving the batch, the streamer, the clock and the statistics.

Bookkeeping lives in Python lists; every tensor this module hands back (row indices, masks) is
made on the models' device, so the loops never mix host and device tensors.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .utils import SamplingParams, to_device
from .utils_bass import histogram


@dataclass
class NewRow:
    """A request that joins a running batch (continuous batching): what a row streamer's ``admit``
    hands the loop."""
    ids: list[int]                # prompt token ids
    budget: int                   # new tokens it may take
    params: SamplingParams        # its sampling parameters


def now(device: torch.device) -> float:
    """The clock, read after the device has finished its queued work (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


class Rows:
    """The rows of a batch being decoded: their output, budget, EOS and per-row statistics.

    ``max_new_tokens``: one budget, or one per row. ``streamer``: a transformers streamer (batch 1,
    ``put``/``end``) or a row streamer (``put_row(row, tokens)``, ``stopped(row)``, ``end``) that
    gets each row's tokens as they are accepted and may stop a row (its client left): the row then
    finishes at that step and leaves the batch like one that met its EOS. A row streamer with
    ``admit(live) -> list[NewRow]`` also hands the loop requests that join the batch between steps
    (``admit_rows``); the k-th row it admits is row B + k of the output."""

    def __init__(self, B: int, max_new_tokens: int | list[int], eos_token_id: int | None, device: torch.device,
                 streamer=None):
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

    @property
    def all_done(self) -> bool:
        return all(self.done)

    def room(self) -> int:
        """New tokens the unfinished row with the most room left may still take (its own budget)."""
        return max(self.budget[r] - len(self.out[r]) for r, d in zip(self.index, self.done) if not d)

    def done_mask(self) -> torch.Tensor:
        """[b] bool on the models' device: which current rows are finished. Copied to the device
        only when it changed (a copy from the host makes a GPU's host wait), so a step in which
        no row finishes or joins reuses the last one."""
        key = tuple(self.done)
        if self._done_dev is None or self._done_dev[0] != key:
            done = to_device(list(key), self.device, torch.bool)
            self._done_dev = key, done, (~done).long().unsqueeze(1)
        return self._done_dev[1]

    def live_column(self) -> torch.Tensor:
        """[b, 1] long on the models' device, 1 where a row still runs: the mask of the slot each
        row's next token takes (made with ``done_mask``, when the rows change, not every step)."""
        self.done_mask()
        return self._done_dev[2]

    def hand_out(self, new: list[list[int]], accepted: list[int] | None = None, drafted: int = 0) -> None:
        """Append each unfinished row's new tokens, cut at the budget and after an EOS; a row that
        reaches either is done. ``accepted`` (speculative loops): drafts each row accepted of ``drafted``."""
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
                self.drafted[r] += drafted
                self.accepted_lengths.append(accepted[j])
            self.done[j] = len(self.out[r]) == self.budget[r] or toks[-1] == self.eos or stopped
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
            self.index.append(len(self.out))
            self.out.append([])
            self.done.append(False)
            self.budget.append(r.budget)
            self.steps.append(0)
            self.accepted.append(0)
            self.drafted.append(0)
        return new

    def drop_finished(self) -> torch.Tensor | None:
        """Forget finished rows; returns the indices of the rows that go on, on the models' device,
        for the caches and the loop's tensors (None when no row finished)."""
        if not any(self.done):
            return None
        keep = [j for j, d in enumerate(self.done) if not d]
        self.index = [self.index[j] for j in keep]
        self.done = [False] * len(keep)
        return to_device(keep, self.device)

    def finish(self, target_calls: int, draft_calls: int = 0, gamma_trace: list[int] | None = None) -> dict:
        """End the stream (if any) and return the statistics every loop returns (README: Python API). ``gamma_trace`` None: AR, whose
        prefill gives the first token (a row's passes = its tokens); speculative loops verify after
        the prefill (a row's passes = its steps + 1)."""
        if self.streamer is not None:
            self.streamer.end()
        B, new_tokens = len(self.out), sum(map(len, self.out))
        passes = [s + (gamma_trace is not None) for s in self.steps]     # target passes of each row
        drafted, accepted = sum(self.drafted), sum(self.accepted)
        stats = dict(new_tokens=new_tokens, target_calls=target_calls, draft_calls=draft_calls,
                     drafted=drafted, accepted=accepted,
                     acceptance_rate=accepted / drafted if drafted else 0.0,
                     # new tokens per target pass a row took part in (the prefill included): 1.0 for AR
                     mean_accepted_tokens=new_tokens / max(1, sum(passes)),
                     wall_time_s=now(self.device) - self.t0, ttft_s=self.ttft or 0.0,
                     ttft_tokens=self.ttft_tokens,
                     rows=[dict(new_tokens=len(self.out[r]), target_calls=passes[r],
                                drafted=self.drafted[r], accepted=self.accepted[r]) for r in range(B)])
        if gamma_trace is not None:
            stats.update(gamma_trace=gamma_trace,
                         accepted_hist=histogram(self.accepted_lengths, max(gamma_trace + [0]) + 1))
        return stats


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
