"""Sampled output follows the target's exact law: the accept/reject kernel and whole loops."""

import pytest
import torch
from stats import chi_square_pvalue
from tiny import tiny_model

from sampling import SamplingParams, accept_reject, generate

ALPHA = 1e-3                     # reject the null (exact law) below this p-value


def peaked_models(*seeds, V: int = 5):
    """One-layer Llamas of vocabulary V with sharpened laws, one per seed: the loop tests' models
    (different seeds disagree often, so both branches of the rule are drawn)."""
    models = [tiny_model("llama", vocab=V, seed=s, layers=1, dim=16) for s in seeds]
    with torch.no_grad():
        for m in models:
            m.lm_head.weight.mul_(3)
    return models


def joint_pvalue(tokens, target, prompt, params, K: int, V: int) -> float:
    """Chi-square p-value of the rows' first K new tokens against the target's exact joint law."""
    codes = torch.tensor([sum(t * V ** (K - 1 - i) for i, t in enumerate(row)) for row in tokens])
    return chi_square_pvalue(torch.bincount(codes, minlength=V ** K), exact_joint(target, prompt, params, K, V))


def random_dist(shape, gen):
    """Random, fairly peaked distributions over the last dim."""
    return torch.softmax(2 * torch.randn(shape, generator=gen, dtype=torch.float64), -1)


@pytest.mark.parametrize("sequential", (False, True))
@pytest.mark.parametrize("gamma", (1, 3))
def test_kernel_first_token_follows_p(gamma, sequential):
    """Vocabulary 10, N = 1e5 rows: the token after the prefix is x_1 if accepted, else the
    residual draw; its law must be p_1 whatever q is."""
    V, N = 10, 100_000
    gen = torch.Generator().manual_seed(gamma + 10 * sequential)
    p_row, q_row = random_dist((gamma + 1, V), gen), random_dist((gamma, V), gen)
    p = p_row.expand(N, -1, -1)                                    # [N, gamma + 1, V]
    q = q_row.expand(N, -1, -1)                                    # [N, gamma, V]
    x = torch.multinomial(q.reshape(-1, V), 1, generator=gen).view(N, gamma)
    n, nxt = accept_reject(p, q, x, gen, sequential=sequential)
    first = torch.where(n > 0, x[:, 0], nxt)
    pval = chi_square_pvalue(torch.bincount(first, minlength=V), p_row[0])
    print(f"kernel gamma={gamma} sequential={sequential}: p-value {pval:.3g}")
    assert pval > ALPHA
    # when every draft is accepted, the bonus token follows p_{gamma+1}
    full = n == gamma
    assert full.any()
    pval_bonus = chi_square_pvalue(torch.bincount(nxt[full], minlength=V), p_row[gamma])
    assert pval_bonus > ALPHA


def test_kernel_p_equals_q_no_nan():
    V, N = 10, 1000
    gen = torch.Generator().manual_seed(0)
    p = random_dist((N, 4, V), gen)
    x = torch.multinomial(p[:, :3].reshape(-1, V), 1, generator=gen).view(N, 3)
    n, nxt = accept_reject(p, p[:, :3], x, gen)
    assert (n == 3).all() and not torch.isnan(nxt.double()).any()


def reference_law(logits: list[float], params: SamplingParams, prefix: list[int]) -> list[float]:
    """The filtered next-token law by hand, in plain Python, independent of the code under test:
    repetition penalty on the prefix's tokens, temperature, top-k (ties kept), top-p (drop the least
    likely tokens while the mass of those dropped, ascending, stays <= 1 - top_p; the top one always
    stays), min-p (drop below min_p x the top probability), then softmax."""
    import math
    z = list(logits)
    for t in set(prefix):
        z[t] = z[t] * params.repetition_penalty if z[t] < 0 else z[t] / params.repetition_penalty
    z = [v / params.temperature for v in z]
    keep = set(range(len(z)))

    def probs():
        m = max(z[i] for i in keep)
        e = {i: math.exp(z[i] - m) for i in keep}
        total = sum(e.values())
        return {i: e[i] / total for i in keep}

    if params.top_k:
        kth = sorted(z, reverse=True)[min(params.top_k, len(z)) - 1]
        keep = {i for i in keep if z[i] >= kth}
    if params.top_p < 1:
        pr, mass = probs(), 0.0
        for i in sorted(keep, key=lambda i: pr[i])[:-1]:      # ascending, never the top token
            mass += pr[i]
            if mass > 1 - params.top_p:
                break
            keep.discard(i)
    if params.min_p:
        pr = probs()
        top = max(pr.values())
        keep = {i for i in keep if pr[i] >= params.min_p * top}
    pr = probs()
    return [pr.get(i, 0.0) for i in range(len(z))]


def exact_joint(model, prompt: list[int], params: SamplingParams, k: int, V: int) -> torch.Tensor:
    """The target's exact law of the next k tokens, by enumeration with ``reference_law``: probs [V ** k]."""
    law = torch.ones(1, dtype=torch.float64)
    prefixes = [()]
    with torch.no_grad():
        for _ in range(k):
            batch = torch.tensor([prompt + list(s) for s in prefixes])
            logits = model(input_ids=batch).logits[:, -1].double().tolist()
            step = torch.tensor([reference_law(z, params, prompt + list(s)) for z, s in zip(logits, prefixes)],
                                dtype=torch.float64)                                   # [n, V]
            law = (law.unsqueeze(1) * step).reshape(-1)
            prefixes = [s + (v,) for s in prefixes for v in range(V)]
    return law


FILTERS = [SamplingParams(temperature=t, top_k=k, top_p=p, min_p=m, repetition_penalty=r)
           for t, k, p, m, r in [(1.0, 3, 1.0, 0.0, 1.0), (0.7, 1, 1.0, 0.0, 1.0), (1.0, 0, 0.5, 0.0, 1.0),
                                 (1.3, 0, 0.9, 0.0, 1.0), (1.0, 0, 1.0, 0.2, 1.0), (1.0, 0, 1.0, 0.0, 1.8),
                                 (0.8, 5, 0.8, 0.05, 1.3), (1.0, 0, 0.999, 0.0, 0.7)]]


@pytest.mark.parametrize("params", FILTERS, ids=str)
def test_filters_equal_the_hand_written_reference(params):
    """norm_logits (transformers' processors) against reference_law on random logits, every position
    with its own prefix, left padding excluded from the prefix."""
    from sampling.params import norm_logits
    gen = torch.Generator().manual_seed(5)
    B, S, n, V = 6, 9, 3, 12
    logits = 3 * torch.randn(B, n, V, generator=gen, dtype=torch.float64)
    seq = torch.randint(0, V, (B, S), generator=gen)
    mask = torch.ones(B, S, dtype=torch.long)
    mask[0, :4] = 0                                           # row 0 is left-padded
    got = norm_logits(logits, params, seq, mask)
    for b in range(B):
        for j in range(n):
            prefix = [t for t, m in zip(seq[b, :S - n + j + 1].tolist(), mask[b].tolist()) if m]
            want = reference_law(logits[b, j].tolist(), params, prefix)
            torch.testing.assert_close(got[b, j], torch.tensor(want, dtype=torch.float64), atol=1e-9, rtol=1e-7)


CASES = {
    "t1": SamplingParams(temperature=1.0),
    "t0.7-topk3": SamplingParams(temperature=0.7, top_k=3),
    "t1.3-topp0.8": SamplingParams(temperature=1.3, top_p=0.8),
    "t1-minp0.3": SamplingParams(temperature=1.0, min_p=0.3),
    "t1-rep2": SamplingParams(temperature=1.0, repetition_penalty=2.0),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("mode", ("google", "deepmind", "bass", "bass-mask"))
def test_whole_loop_joint_law(mode, case):
    """Joint law of the first 3 new tokens (gamma 2: drafts, rejection, bonus) against enumeration.
    bass-mask: bass keeping finished rows in the batch (rows finish at different steps here)."""
    mode, finished_rows = ("bass", "mask") if mode == "bass-mask" else (mode, "drop")
    V, K = 5, 3
    params = CASES[case]
    target, draft = peaked_models(11, 12)
    prompt = [1, 3, 0, 4]
    N = 4000 if mode == "bass" else 2500
    ids = torch.tensor([prompt] * N)
    res = generate(target, ids, draft_model=draft, mode=mode, max_new_tokens=K, gamma=2,
                   temperature=params.temperature, top_k=params.top_k, top_p=params.top_p, min_p=params.min_p,
                   repetition_penalty=params.repetition_penalty, seed=7, finished_rows=finished_rows)
    pval = joint_pvalue(res.tokens, target, prompt, params, K, V)
    print(f"{mode} ({finished_rows}) {case}: acceptance {res.stats['acceptance_rate']:.2f}, p-value {pval:.3g}")
    assert 0.05 < res.stats["acceptance_rate"] < 0.95       # both branches of the rule are used
    assert pval > ALPHA


class CopyDrafter:
    """A deterministic drafter (q = None, as an n-gram table would be): it proposes the last
    token again, g times (sampling.contracts.Drafter, written from its contract alone)."""
    calls = 0
    reads_target = False
    max_draft = None

    def prefill(self, ids, mask, hidden):
        pass

    def propose(self, seq, mask, g, generator):
        from sampling.contracts import Draft
        return Draft(tokens=seq[:, -1:].expand(-1, g).contiguous(), q=None)

    def commit(self, acc):
        pass

    def select_rows(self, keep):
        pass


@pytest.mark.parametrize("case", ("t1", "t0.7-topk3"))
def test_deterministic_drafter_keeps_the_target_law(case):
    """Drafts with no law of their own (q is one-hot on them) go through the same rule exactly."""
    from sampling.decode import speculative_decode
    from sampling.rows import Rows
    from sampling.utils_bass import GammaSchedule, ScheduleParams
    from sampling.verify.chain import ChainVerifier
    V, K, N = 5, 3, 3000
    params = CASES[case]
    target, = peaked_models(11)
    prompt = [1, 3, 0, 4]
    ids = torch.tensor([prompt] * N)
    gen = torch.Generator().manual_seed(8)
    rows = Rows(N, K, None, ids.device)
    tokens, stats = speculative_decode(CopyDrafter(), ChainVerifier(target, params), ids, torch.ones_like(ids),
                                       GammaSchedule(2, ScheduleParams()), rows, "drop", gen)
    pval = joint_pvalue(tokens, target, prompt, params, K, V)
    assert 0.05 < stats["acceptance_rate"] < 0.95 and pval > ALPHA, (stats["acceptance_rate"], pval)


MIXED = [SamplingParams(temperature=0.0), CASES["t0.7-topk3"], CASES["t1.3-topp0.8"]]   # row i: MIXED[i % 3]


def test_row_params_filter_each_row_with_its_own():
    """norm_logits with one parameter set per row (RowParams) against reference_law row by row;
    the greedy rows one-hot on their argmax."""
    from sampling.params import norm_logits, row_params
    gen = torch.Generator().manual_seed(6)
    B, V = 6, 12
    logits = 3 * torch.randn(B, 2, V, generator=gen, dtype=torch.float64)
    got = norm_logits(logits, row_params([MIXED[b % 3] for b in range(B)]))
    for b in range(B):
        for j in range(2):
            want = (torch.nn.functional.one_hot(logits[b, j].argmax(), V).tolist() if b % 3 == 0
                    else reference_law(logits[b, j].tolist(), MIXED[b % 3], []))
            torch.testing.assert_close(got[b, j], torch.tensor(want, dtype=torch.float64), atol=1e-9, rtol=1e-7)


@pytest.mark.parametrize("mode", ("ar", "google", "bass", "bass-mask", "tree", "tree-dynamic"))
def test_mixed_rows_each_keep_their_own_law(mode):
    """One batch whose rows sample with different parameters (a server's requests): greedy rows,
    temperature 0.7 with top-k 3, temperature 1.3 with top-p 0.8. Each group's joint law of the
    first 3 new tokens against enumeration, the greedy rows all equal to greedy decoding alone."""
    V, K = 5, 3
    mode, extra = {"bass-mask": ("bass", dict(finished_rows="mask")), "tree": ("tree", dict(tree="2,2")),
                   "tree-dynamic": ("tree", dict(tree="dynamic:6:3:3"))}.get(mode, (mode, {}))
    target, draft = peaked_models(11, 12)
    prompt = [1, 3, 0, 4]
    N = 4500 if mode != "google" else 3000
    per = [MIXED[i % 3] for i in range(N)]
    res = generate(target, torch.tensor([prompt] * N), draft_model=None if mode == "ar" else draft, mode=mode,
                   max_new_tokens=[K] * N, gamma=2, seed=7, temperature=[p.temperature for p in per],
                   top_k=[p.top_k for p in per], top_p=[p.top_p for p in per], **extra)
    greedy = generate(target, torch.tensor([prompt]), mode="ar", max_new_tokens=K, temperature=0).tokens[0]
    assert all(t == greedy for t in res.tokens[0::3])
    for g in (1, 2):
        pval = joint_pvalue(res.tokens[g::3], target, prompt, MIXED[g], K, V)
        print(f"{mode} {extra} rows {g}::3: p-value {pval:.3g}")
        assert pval > ALPHA, (g, pval)
