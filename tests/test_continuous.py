"""Continuous batching: rows that join a running batch between steps (a row streamer's ``admit``)
get what they would get alone, and the rows already running are not disturbed."""
import pytest
import torch
from tiny import ARCHS, greedy_reference, left_padded_batch, never_agreeing_pair, noisy_copy, tiny_model

from sampling import NgramDrafter, generate
from sampling.params import SamplingParams
from sampling.rows import NewRow

GREEDY = SamplingParams(temperature=0.0)


class Joining:
    """A row streamer that admits ``later`` (prompt, budget, params) at the given steps, as many as
    ``limit`` live rows leave room for; collects every row's tokens."""

    def __init__(self, later: dict[int, list[tuple]], limit: int = 99):
        self.later, self.limit, self.step = later, limit, 0
        self.got: dict[int, list[int]] = {}
        self.waiting: list[tuple] = []

    def put_row(self, row, tokens):
        self.got.setdefault(row, []).extend(tokens)

    def stopped(self, row):
        return False

    def end(self):
        pass

    def admit(self, live: int) -> list[NewRow]:
        self.step += 1
        self.waiting += self.later.pop(self.step, [])
        take, self.waiting = self.waiting[:max(0, self.limit - live)], self.waiting[max(0, self.limit - live):]
        return [NewRow(ids, budget, params) for ids, budget, params in take]


class LateDrafts:
    """A controller whose first four steps are AR, then drafts of 3 (rows join a draft model that
    has prefilled nothing yet)."""

    def __init__(self):
        self.steps = 0

    def choose(self, most, batch, context):
        self.steps += 1
        return 0 if self.steps <= 4 else most

    def observe(self, counts, limits):
        pass


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mode", ("ar", "bass", "bass-ngram", "bass-self", "bass-never", "bass-late"))
def test_joining_rows_equal_greedy_alone(arch, mode, monkeypatch):
    """Three rows start; a long prompt joins at step 1 (the batch is padded on the left for it), two
    short ones at step 3 (one of a single token), one more when a place is free (limit 4): every
    row's tokens equal plain greedy decoding of its prompt alone. bass-self: the target drafts for
    itself, every draft is accepted (the draft's cache then lags the sequence by two); bass-never:
    no draft is ever accepted (the draft's rollback leaves it no law of a last position); bass-late:
    AR steps first, so rows join and leave a draft model whose prefill still waits for its first draft."""
    if mode == "bass-late":
        from sampling import speculative_bass
        monkeypatch.setattr(speculative_bass, "make_controller", lambda *a, **k: LateDrafts())
    target = tiny_model(arch)
    draft = NgramDrafter() if mode == "bass-ngram" else target if mode == "bass-self" else noisy_copy(target, 0.1)
    if mode == "bass-never":
        target, draft = never_agreeing_pair(target)
    ids, mask = left_padded_batch(97, (5, 3, 4), seed=3)
    extra, extra_mask = left_padded_batch(97, (14, 2, 1, 6), seed=4)
    prompts = [row[m.bool()].tolist() for row, m in zip(extra, extra_mask)]
    budgets = [9, 12, 7]
    joining = Joining({1: [(prompts[0], 10, GREEDY)], 3: [(prompts[1], 8, GREEDY), (prompts[2], 11, GREEDY),
                                                          (prompts[3], 6, GREEDY)]}, limit=4)
    res = generate(target, ids, mask, draft_model=None if mode == "ar" else draft, mode=mode.split("-")[0],
                   max_new_tokens=budgets, gamma=3, temperature=0, streamer=joining)
    assert len(res.tokens) == 7 and not joining.waiting and not joining.later
    want = greedy_reference(target, ids, mask, max(budgets))
    want = [w[:b] for w, b in zip(want, budgets)]
    for p, b in zip(prompts, (10, 8, 11, 6)):
        want.append(greedy_reference(target, torch.tensor([p]), torch.ones(1, len(p), dtype=torch.long), b)[0])
    assert res.tokens == want, mode
    assert [joining.got[r] for r in range(7)] == want
    assert [r["new_tokens"] for r in res.stats["rows"]] == list(map(len, want))


@pytest.mark.parametrize("mode", ("ar", "bass", "bass-ngram"))
def test_a_batch_rows_keep_joining_stays_as_wide_as_its_rows(mode, monkeypatch):
    """A long prompt (20 tokens) with a small budget starts beside a short one; short prompts join
    every other step. Once the long row leaves, the leading slots that are padding in every row go
    (from the sequence and every cache, ``drop_leading_padding``), so a batch that never empties
    does not grow without bound; every row still gets what it gets alone."""
    import sampling.rows as rows_module
    dropped = []
    real = rows_module.drop_leading_padding

    def spy(seq, mask, parts):
        out = real(seq, mask, parts)
        dropped.append((seq.shape[1], out[0].shape[1]))
        return out
    monkeypatch.setattr(rows_module, "drop_leading_padding", spy)
    target = tiny_model("llama")
    draft = NgramDrafter() if mode == "bass-ngram" else noisy_copy(target, 0.1)
    ids, mask = left_padded_batch(97, (20, 2), seed=5)
    extra, extra_mask = left_padded_batch(97, (3, 2, 4, 3), seed=6)
    prompts = [row[m.bool()].tolist() for row, m in zip(extra, extra_mask)]
    joining = Joining({2 * k + 2: [(p, 6, GREEDY)] for k, p in enumerate(prompts)})
    res = generate(target, ids, mask, draft_model=None if mode == "ar" else draft, mode=mode.split("-")[0],
                   max_new_tokens=[2, 14], gamma=2, temperature=0, streamer=joining)
    want = [w[:b] for w, b in zip(greedy_reference(target, ids, mask, 14), (2, 14))]
    for p in prompts:
        want.append(greedy_reference(target, torch.tensor([p]), torch.ones(1, len(p), dtype=torch.long), 6)[0])
    assert res.tokens == want
    assert any(after <= before - 15 for before, after in dropped), dropped    # the long prompt's padding went


def test_joining_sampled_rows_keep_the_target_law():
    """Greedy rows run; sampled rows (temperature 0.8, top-k 3) join at step 2: their first 2 tokens
    follow the target's exact law (enumerated independently)."""
    from test_distribution import joint_pvalue, peaked_models
    V, K, N = 5, 2, 3000
    target, draft = peaked_models(11, 12)
    prompt = [1, 3, 0, 4]
    params = SamplingParams(temperature=0.8, top_k=3)
    joining = Joining({2: [([2, 1] + prompt, K, params)] * N})
    ids = torch.tensor([[4, 4, 1]] * 2)
    res = generate(target, ids, draft_model=draft, mode="bass", max_new_tokens=[12, 12], gamma=2, temperature=0,
                   seed=5, streamer=joining)
    joined = res.tokens[2:]
    assert len(joined) == N and all(len(t) == K for t in joined)
    pval = joint_pvalue(joined, target, [2, 1] + prompt, params, K, V)
    assert pval > 1e-3, pval
    alone = generate(target, ids, draft_model=draft, mode="bass", max_new_tokens=12, gamma=2, temperature=0)
    assert res.tokens[:2] == alone.tokens


def test_admission_is_refused_where_it_is_not_built():
    target = tiny_model("llama")
    ids, mask = left_padded_batch(97, (3, 4))
    for kw, msg in ((dict(mode="google"), "mode google"), (dict(mode="bass", kv_cache="static"), "static cache"),
                    (dict(mode="bass", finished_rows="mask"), "finished_rows=mask")):
        with pytest.raises(ValueError, match=f"rows cannot join a running batch with .*{msg}"):
            generate(target, ids, mask, draft_model=target, max_new_tokens=4, streamer=Joining({}), **kw)


def test_a_greedy_cache_keeps_laws_once_sampled_rows_join():
    """A greedy batch's cache keeps the target's logits (norm_logits(law=False): only their argmax
    is read); once sampled rows join, its history is read as laws, so every row's last entry must
    be one: the greedy rows' one-hot on their argmax, the sampled row's a distribution."""
    from sampling.kvcache_model import KVCacheModel
    target = tiny_model("llama")
    ids, mask = left_padded_batch(97, (5, 3), seed=3)
    kv = KVCacheModel(target, GREEDY)
    logits = kv.prefill(ids, mask)                                       # [2, V]: greedy, the logits
    assert (logits < 0).any()
    new, new_mask = left_padded_batch(97, (5,), seed=4)
    kv.admit(new, new_mask, 0, [SamplingParams(temperature=0.8)])
    law = kv.probs[:, -1]                                                # [3, V]
    assert torch.allclose(law.sum(-1), torch.ones(3, dtype=law.dtype)) and (law >= 0).all()
    assert torch.equal(law[:2].argmax(-1), logits.argmax(-1))
    assert torch.equal(law[:2].max(-1).values, torch.ones(2, dtype=law.dtype))


@pytest.mark.parametrize("mode", ("bass", "bass-heads", "tree", "tree-dynamic"))
def test_greedy_rows_stay_exact_once_the_sampled_rows_leave(mode):
    """A batch of greedy and sampled rows (a server's); the sampled rows' budgets end first, so the
    batch turns greedy mid-generation and the parts switch to the greedy shortcuts (logits kept,
    argmax compared): the greedy rows still equal plain greedy decoding of their prompts."""
    from sampling import new_speculator
    target = tiny_model("llama")
    draft = new_speculator(target, "mlp", 3, seed=2) if mode == "bass-heads" else noisy_copy(target, 0.1)
    mode, tree = {"tree": ("tree", "2,2"), "tree-dynamic": ("tree", "dynamic:6:3:3")}.get(mode, ("bass", None))
    ids, mask = left_padded_batch(97, (5, 3, 4, 6), seed=3)
    budgets, temps = [12, 2, 12, 3], [0.0, 0.9, 0.0, 1.2]
    res = generate(target, ids, mask, draft_model=draft, mode=mode, max_new_tokens=budgets, gamma=3,
                   temperature=temps, seed=5, **({"tree": tree} if tree else {}))
    want = greedy_reference(target, ids, mask, 12)
    assert [res.tokens[i] for i in (0, 2)] == [want[0], want[2]]
    assert [len(t) for t in res.tokens] == budgets
