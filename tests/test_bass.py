"""BASS-PAD specifics: batch 8, rows finishing early, draft-length schedules, sorted batching."""
import pytest
import torch
from tiny import ARCHS, greedy_reference, left_padded_batch, never_agreeing_pair, noisy_copy, tiny_model

from sampling import ScheduleParams, generate, generate_many
from sampling.utils_bass import GammaSchedule

LENGTHS8 = (3, 11, 6, 1, 9, 4, 12, 7)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("schedule", ("constant", "bass", "aimd"))
def test_bass_batch8_equals_greedy(arch, schedule):
    target = tiny_model(arch, seed=21)
    draft = noisy_copy(target, 0.1, seed=22)
    ids, mask = left_padded_batch(97, LENGTHS8, seed=23)
    ref = greedy_reference(target, ids, mask, 16)
    res = generate(target, ids, mask, draft_model=draft, mode="bass", max_new_tokens=16, gamma=3,
                   temperature=0, gamma_schedule=schedule)
    assert res.tokens == ref


def test_bass_stats_equal_counts_known_in_advance():
    """With a draft that always agrees (the target itself) and one that never does, every count is
    known before running: steps, the accepted-length histogram, the gamma trace, the padding."""
    target = tiny_model("llama", seed=24)
    ids, mask = left_padded_batch(97, LENGTHS8, seed=25)
    T, pads = ids.shape[1], sum(ids.shape[1] - n for n in LENGTHS8)
    s = generate(target, ids, mask, draft_model=target, mode="bass", max_new_tokens=16, gamma=3,
                 temperature=0).stats
    # 16 tokens = 4 steps of 3 accepted drafts + a bonus token, for all 8 rows at once
    assert s["gamma_trace"] == [3, 3, 3, 3] and s["accepted_hist"] == [0, 0, 0, 32]
    assert s["target_calls"] == 5 and s["rows_verified"] == 32
    # no holes: only the prompt padding, in verify passes of T + 3, T + 7, T + 11, T + 15 slots
    expected = sum(pads / (8 * (T + 4 * k + 3)) for k in range(4)) / 4
    assert abs(s["padding_fraction"] - expected) < 1e-6
    target, draft = never_agreeing_pair(tiny_model("llama", seed=26))
    s = generate(target, ids, mask, draft_model=draft, mode="bass", max_new_tokens=16, gamma=3,
                 temperature=0).stats
    # one token per step: 16 steps, each drafting what the remaining budget can still use
    assert s["gamma_trace"] == [3] * 13 + [2, 1, 0] and s["accepted_hist"] == [128, 0, 0, 0]
    assert s["target_calls"] == 17 and s["drafted"] == 8 * 42 and s["accepted"] == 0


def test_schedule_params_choose_the_schedule():
    target = tiny_model("llama", seed=27)
    ids, mask = left_padded_batch(97, (4, 6), seed=28)
    kw = dict(draft_model=target, mode="bass", max_new_tokens=20, gamma=2, temperature=0)
    trace = generate(target, ids, mask, schedule=ScheduleParams(kind="aimd"), **kw).stats["gamma_trace"]
    assert trace[:3] == [2, 3, 4]                     # aimd grows by one after each full accept
    trace = generate(target, ids, mask, schedule=ScheduleParams(kind="aimd"), gamma_schedule="aimd",
                     **kw).stats["gamma_trace"]
    assert trace[:3] == [2, 3, 4]
    with pytest.raises(ValueError, match="gamma_schedule 'constant' disagrees with schedule.kind 'aimd'"):
        generate(target, ids, mask, schedule=ScheduleParams(kind="aimd"), gamma_schedule="constant", **kw)


@pytest.mark.parametrize("finished_rows", ("drop", "mask"))
def test_rows_finishing_early_leave_the_others_alone(finished_rows):
    target = tiny_model("llama", seed=31)
    draft = noisy_copy(target, 0.1, seed=32)
    ids, mask = left_padded_batch(97, LENGTHS8, seed=33)
    free = generate(target, ids, mask, draft_model=draft, mode="bass", max_new_tokens=20, gamma=4,
                    temperature=0).tokens
    eos = free[0][3]                                  # row 0 ends early; which others have it?
    res = generate(target, ids, mask, draft_model=draft, mode="bass", max_new_tokens=20, gamma=4,
                   temperature=0, eos_token_id=eos, finished_rows=finished_rows)
    assert res.tokens == greedy_reference(target, ids, mask, 20, eos_token_id=eos)
    untouched = [i for i, row in enumerate(free) if eos not in row]
    assert untouched, "the test needs rows that never meet the EOS"
    for i in untouched:
        assert res.tokens[i] == free[i]
    assert len(res.tokens[0]) == free[0].index(eos) + 1


@pytest.mark.parametrize("arch", ARCHS)
def test_finished_rows_kept_masked_equal_greedy(arch):
    """finished_rows="mask": rows that met EOS stay in the batch, masked, and change nothing."""
    target = tiny_model(arch, seed=51)
    draft = noisy_copy(target, 0.1, seed=52)
    ids, mask = left_padded_batch(97, LENGTHS8, seed=53)
    free = generate(target, ids, mask, draft_model=draft, mode="bass", max_new_tokens=16, gamma=3,
                    temperature=0).tokens
    eos = free[2][2]                                   # some rows end early, at different steps
    runs = {f: generate(target, ids, mask, draft_model=draft, mode="bass", max_new_tokens=16, gamma=3,
                        temperature=0, eos_token_id=eos, finished_rows=f) for f in ("drop", "mask")}
    assert runs["mask"].tokens == greedy_reference(target, ids, mask, 16, eos_token_id=eos)
    assert runs["mask"].tokens == runs["drop"].tokens
    assert sum(len(t) < 16 for t in runs["mask"].tokens) >= 1
    # the masked run kept the finished rows in every verify pass; the other dropped them
    steps = {f: r.stats["target_calls"] - 1 for f, r in runs.items()}
    assert runs["mask"].stats["rows_verified"] == 8 * steps["mask"]
    assert runs["drop"].stats["rows_verified"] == sum(r["target_calls"] - 1 for r in runs["drop"].stats["rows"])
    assert runs["drop"].stats["rows_verified"] < runs["mask"].stats["rows_verified"]
    assert runs["mask"].stats["gamma_trace"] == runs["drop"].stats["gamma_trace"]


def test_bass_schedule_rule():
    sched = GammaSchedule(7, ScheduleParams(kind="bass"))
    sched.update([7, 7], 7)             # all accepted: +delta
    assert sched.gamma == 9 and sched.s == 0
    sched.update([2, 5], 9)             # a rejection: max(1, max x_i, g - ceil(g/m) - s)
    assert sched.gamma == 8 and sched.s == 1          # 9 - 1 - 0 beats max x_i = 5
    sched.update([0, 7], 8)             # max x_i = 7 beats 8 - 1 - 1 = 6
    assert sched.gamma == 7
    sched.update([0, 3], 7)             # 7 - 1 - 1 = 5
    assert sched.gamma == 5
    sched.update([5], 5)                # all accepted: +delta, s back to 0
    sched.update([0], 7)                # 7 - 1 - 0
    assert sched.gamma == 6
    for _ in range(20):
        sched.update(torch.tensor([sched.gamma]), sched.gamma)
    assert sched.gamma == 32                          # capped at gamma_max


def test_aimd_schedule_rule():
    sched = GammaSchedule(6, ScheduleParams(kind="aimd", gamma_min=2))
    sched.update([6], 6)
    assert sched.gamma == 7
    sched.update([6, 7], 7)
    assert sched.gamma == 3
    sched.update([0], 3)
    assert sched.gamma == 2                           # floor(3 / 2) = 1, raised to gamma_min
    const = GammaSchedule(5, ScheduleParams())
    const.update(torch.tensor([0]), 5)
    assert const.gamma == 5 and const.trace == [5]


def test_sorted_batching_keeps_order_and_cuts_padding():
    target = tiny_model("gpt_neox", seed=41)
    draft = noisy_copy(target, 0.1, seed=42)
    gen = torch.Generator().manual_seed(43)
    prompts = [torch.randint(3, 97, (n,), generator=gen).tolist() for n in (2, 30, 3, 28, 5, 26, 4, 31)]
    runs = {}
    for sort in (False, True):
        runs[sort] = generate_many(target, prompts, batch_size=2, pad_id=0, sort_batch=sort,
                                   draft_model=draft, mode="bass", max_new_tokens=8, temperature=0)[0]
    ref = [greedy_reference(target, torch.tensor([p]), torch.ones(1, len(p), dtype=torch.long), 8)[0]
           for p in prompts]
    assert runs[False].tokens == ref and runs[True].tokens == ref
    assert runs[True].stats["prompt_padding_fraction"] < runs[False].stats["prompt_padding_fraction"] / 3
