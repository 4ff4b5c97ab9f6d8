"""Rows of their own (one seed per row, a server's requests): each row's output is what it gets alone,
whatever shares its batch, its law is still the target's, and a row whose laws stop being finite,
or whose drafter raises, fails alone while the others go on."""
import pytest
import torch
from test_continuous import Joining
from test_distribution import ALPHA, CASES, joint_pvalue, peaked_models
from tiny import left_padded_batch, noisy_copy, tiny_model

from sampling import NgramDrafter, SamplingParams, generate, new_speculator

LENGTHS = (5, 9, 3, 7, 4, 6)
BUDGETS = [10, 6, 12, 3, 8, 1]


def drafter(kind, target):
    return {"model": noisy_copy(target, 0.3), "ngram": NgramDrafter(), "mlp": new_speculator(target, "mlp", 3, seed=5,
                                                                                            noise=0.05)}.get(kind)


@pytest.mark.parametrize("case", ("ar", "bass-model", "bass-ngram", "bass-mlp", "tree-static", "tree-mlp", "google",
                                  "bass-mask"))
def test_each_seeded_row_is_what_it_gets_alone(case):
    """Six rows of different lengths, budgets and temperatures (one greedy), one seed each: every
    row's tokens equal those of the row decoded alone with its seed, for several sets of seeds."""
    mode, kind, finished = {"tree-static": ("tree", "model", "drop"), "bass-mask": ("bass", "model", "mask"),
                            "ar": ("ar", "", "drop"), "google": ("google", "model", "drop")}.get(
        case, tuple(case.split("-")) + ("drop",))
    target = tiny_model("llama", seed=0, dtype=torch.float32)
    ids, mask = left_padded_batch(97, LENGTHS, seed=3)
    temps = [1.0, 0.7, 0.0, 1.3, 1.0, 0.9]
    kw = dict(mode=mode, draft_model=drafter(kind, target), gamma=3, top_k=20,
              tree="2,2,1" if mode == "tree" else None, finished_rows=finished)
    for base in (0, 100):
        seeds = [base + i for i in range(len(LENGTHS))]
        together = generate(target, ids, mask, max_new_tokens=BUDGETS, seed=seeds, temperature=temps, **kw)
        for i in range(len(LENGTHS)):
            alone = generate(target, ids[i:i + 1], mask[i:i + 1], max_new_tokens=[BUDGETS[i]], seed=[seeds[i]],
                             temperature=[temps[i]], **kw)
            assert together.tokens[i] == alone.tokens[0], (case, base, i)


@pytest.mark.parametrize("mode", ("ar", "bass"))
def test_seeded_rows_that_join_are_what_they_get_alone(mode):
    """Continuous batching with seeds: rows that join a running batch between steps (with their own
    seeds) and the rows already running each get what they get alone."""
    target = tiny_model("llama", seed=0, dtype=torch.float32)
    draft = noisy_copy(target, 0.3)
    ids, mask = left_padded_batch(97, (5, 3, 4), seed=3)
    extra, extra_mask = left_padded_batch(97, (9, 2, 6), seed=4)
    prompts = [row[m.bool()].tolist() for row, m in zip(extra, extra_mask)]
    sampled = SamplingParams(temperature=1.0)

    class SeededJoining(Joining):                         # each joining row with its own seed
        def admit(self, live):
            new = super().admit(live)
            for r in new:
                r.seed = later_seeds.pop(0)
            return new

    later_seeds = [8, 9, 10]
    joining = SeededJoining({1: [(prompts[0], 7, sampled)], 3: [(prompts[1], 5, sampled), (prompts[2], 9, sampled)]})
    seeds = {0: 5, 1: 6, 2: 7, 3: 8, 4: 9, 5: 10}
    res = generate(target, ids, mask, draft_model=None if mode == "ar" else draft, mode=mode, gamma=3,
                   max_new_tokens=[8, 6, 10], temperature=1.0, seed=[5, 6, 7], streamer=joining)
    budgets = [8, 6, 10, 7, 5, 9]
    rows = [row[m.bool()].tolist() for row, m in zip(ids, mask)] + prompts
    for r, prompt in enumerate(rows):
        alone = generate(target, torch.tensor([prompt]), draft_model=None if mode == "ar" else draft, mode=mode,
                         gamma=3, max_new_tokens=[budgets[r]], temperature=1.0, seed=[seeds[r]])
        assert res.tokens[r] == alone.tokens[0], (mode, r)


@pytest.mark.parametrize("mode", ("ar", "bass", "tree"))
def test_rows_of_their_own_keep_the_target_law(mode):
    """Every row its own seed (its own draws, its own draft length): the joint law of the first 3
    new tokens against enumeration, as with one generator for the batch."""
    V, K = 5, 3
    params = CASES["t0.7-topk3"]
    target, draft = peaked_models(11, 12)
    prompt = [1, 3, 0, 4]
    N = 3000
    res = generate(target, torch.tensor([prompt] * N), draft_model=None if mode == "ar" else draft, mode=mode,
                   max_new_tokens=K, gamma=2, tree="2,2", temperature=params.temperature, top_k=params.top_k,
                   seed=list(range(1000, 1000 + N)))
    pval = joint_pvalue(res.tokens, target, prompt, params, K, V)
    assert pval > ALPHA, pval
    if mode != "ar":
        assert 0.05 < res.stats["acceptance_rate"] < 0.95


@pytest.mark.parametrize("mode", ("ar", "bass", "google"))
def test_a_row_whose_laws_are_not_finite_fails_alone(mode):
    """A row at temperature 1e-300 (its logits overflow to infinity, its law to NaN) fails alone,
    reported in stats["failed"] and to the row streamer; the other rows get what they get alone."""
    target = tiny_model("llama", seed=0, dtype=torch.float32)
    draft = noisy_copy(target, 0.3)
    ids, mask = left_padded_batch(97, (5, 9, 3), seed=3)
    ended = {}

    class Streamer:
        def put_row(self, row, tokens):
            pass

        def stopped(self, row):
            return False

        def end_row(self, row, stats, error):
            ended[row] = (stats, error)

        def end(self):
            pass

    temps, seeds = [1.0, 1e-300, 0.8], [1, 2, 3]
    res = generate(target, ids, mask, draft_model=None if mode == "ar" else draft, mode=mode, gamma=3,
                   max_new_tokens=8, temperature=temps, seed=seeds, streamer=Streamer())
    assert set(res.stats["failed"]) == {1}
    assert ("not finite" if mode != "google" else "RuntimeError") in res.stats["failed"][1]
    assert ended[1][0] is None and ended[1][1] and ended[0][1] is None and ended[2][1] is None
    for i in (0, 2):
        alone = generate(target, ids[i:i + 1], mask[i:i + 1], draft_model=None if mode == "ar" else draft, mode=mode,
                         gamma=3, max_new_tokens=8, temperature=[temps[i]], seed=[seeds[i]])
        assert res.tokens[i] == alone.tokens[0] and ended[i][0]["new_tokens"] == 8


def test_a_row_whose_drafter_raises_fails_alone():
    """One row at a time (google): a row whose drafter raises fails alone with the error's text;
    the next rows are decoded as they are alone."""
    target = tiny_model("llama", seed=0, dtype=torch.float32)
    ids, mask = left_padded_batch(97, (5, 9, 3), seed=3)
    victim = ids[1, -1].item()

    class Picky(NgramDrafter):
        def drafter(self, params=None, vocab=None, tree=None):
            return Picky()

        def prefill(self, input_ids, mask, hidden=None):
            if victim in input_ids[0, -1:].tolist():
                raise RuntimeError("a drafter fault")
            super().prefill(input_ids, mask, hidden)

    res = generate(target, ids, mask, draft_model=Picky(), mode="google", gamma=3, max_new_tokens=6, temperature=1.0,
                   seed=[1, 2, 3])
    assert res.stats["failed"] == {1: "RuntimeError: a drafter fault"} and res.tokens[1] == []
    for i in (0, 2):
        alone = generate(target, ids[i:i + 1], mask[i:i + 1], draft_model=NgramDrafter(), mode="google", gamma=3,
                         max_new_tokens=6, temperature=1.0, seed=[[1, 2, 3][i]])
        assert res.tokens[i] == alone.tokens[0]


def test_seeds_are_checked():
    target = tiny_model("llama", seed=0, dtype=torch.float32)
    ids, mask = left_padded_batch(97, (5, 9), seed=3)
    for bad in (2 ** 64, -1, [1], [1, None], 1.5):
        with pytest.raises(ValueError, match="seed"):
            generate(target, ids, mask, mode="ar", max_new_tokens=2, seed=bad)
