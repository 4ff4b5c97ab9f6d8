"""The n-gram drafter (prompt lookup): its lookup, greedy exactness on five architectures in the
chain modes, the joint law under sampling against enumeration, and its refusals."""
import pytest
import torch
from test_distribution import ALPHA, CASES, joint_pvalue, peaked_models
from tiny import ARCHS, greedy_reference, left_padded_batch, tiny_model

from sampling import NgramDrafter, generate


def test_lookup_takes_the_latest_longest_match():
    d = NgramDrafter(max_ngram=2)
    assert d.lookup([5, 6, 7, 8, 5, 6, 9, 1, 5, 6], 3) == [9, 1, 5]      # "5 6" last seen before 9
    assert d.lookup([1, 2, 3, 2], 3) == [3, 2, 2]                          # a 1-gram match, then filled
    assert d.lookup([1, 2, 3], 2) == [3, 3]                                # no match: the last token
    assert d.lookup([4], 2) == [4, 4]
    with pytest.raises(ValueError, match="min_ngram"):
        NgramDrafter(max_ngram=1, min_ngram=2)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mode", ("google", "deepmind", "bass"))
def test_greedy_ngram_equals_greedy(arch, mode):
    target = tiny_model(arch, seed=21)
    ids, mask = left_padded_batch(20, (5, 9, 3, 7), seed=22)               # a small vocabulary: matches happen
    res = generate(target, ids, mask, draft_model=NgramDrafter(), mode=mode, gamma=3, max_new_tokens=14,
                   temperature=0)
    assert res.tokens == greedy_reference(target, ids, mask, 14)
    s = res.stats
    assert 0 < s["accepted"] < s["drafted"] and s["draft_calls"] == 0


@pytest.mark.parametrize("mode", ("google", "bass"))
@pytest.mark.parametrize("case", ("t1", "t0.7-topk3", "t1.3-topp0.8"))
def test_ngram_joint_law(mode, case):
    """Joint law of the first 3 new tokens against enumeration (one-hot drafts, gamma 2)."""
    V, K = 5, 3
    params = CASES[case]
    target, = peaked_models(11)
    prompt = [1, 3, 0, 4, 1, 3]
    N = 3000 if mode == "bass" else 1500
    res = generate(target, torch.tensor([prompt] * N), draft_model=NgramDrafter(), mode=mode, gamma=2,
                   max_new_tokens=K, temperature=params.temperature, top_k=params.top_k, top_p=params.top_p, seed=7)
    pval = joint_pvalue(res.tokens, target, prompt, params, K, V)
    assert pval > ALPHA, pval
    assert 0.01 < res.stats["acceptance_rate"] < 0.95           # both accepts and rejections were drawn


def test_tree_mode_refuses_the_ngram_drafter():
    target = tiny_model("llama", seed=1)
    ids, mask = left_padded_batch(97, (3,), seed=1)
    with pytest.raises(ValueError) as e:
        generate(target, ids, mask, draft_model=NgramDrafter(), mode="tree", max_new_tokens=3, temperature=0)
    assert str(e.value) == ("mode 'tree' needs a draft model or speculator heads (a Speculator); the n-gram drafter "
                            "(NgramDrafter) drafts for google, deepmind and bass only")
