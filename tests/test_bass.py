"""BASS-PAD specifics: batch 8, rows finishing early, draft-length schedules, sorted batching."""
import pytest
import torch

from sampling import ScheduleParams, generate, generate_many
from sampling.utils_bass import GammaSchedule
from tiny import ARCHS, greedy_reference, left_padded_batch, noisy_copy, tiny_model

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
    s = res.stats
    assert sum(s["accepted_hist"]) == sum(r["target_calls"] - 1 for r in s["rows"])
    assert 0 < s["padding_fraction"] < 1 and len(s["gamma_trace"]) == s["target_calls"] - 1


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
    sched.update(torch.tensor([7, 7]), 7)             # all accepted: +delta
    assert sched.gamma == 9 and sched.s == 0
    sched.update(torch.tensor([2, 9]), 9)             # a rejection: max(1, max x_i, g - ceil(g/m) - s)
    assert sched.gamma == max(1, 9, 9 - 1 - 0) == 9 and sched.s == 1
    sched.update(torch.tensor([0, 3]), 9)             # s = 1 now: 9 - 1 - 1 = 7
    assert sched.gamma == 7
    sched.update(torch.tensor([0, 0]), 7)             # 7 - 1 - 1 = 5
    assert sched.gamma == 5
    for _ in range(20):
        sched.update(torch.tensor([sched.gamma]), sched.gamma)
    assert sched.gamma == 32                          # capped at gamma_max


def test_aimd_schedule_rule():
    sched = GammaSchedule(6, ScheduleParams(kind="aimd", gamma_min=2))
    sched.update(torch.tensor([6]), 6)
    assert sched.gamma == 7
    sched.update(torch.tensor([6, 7]), 7)
    assert sched.gamma == 3
    sched.update(torch.tensor([0]), 3)
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
