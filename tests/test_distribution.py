"""Sampled output follows the target's exact law: the accept/reject kernel and whole loops."""

import pytest
import torch

from sampling import SamplingParams, accept_reject, generate, norm_logits
from stats import chi_square_pvalue
from tiny import tiny_model

ALPHA = 1e-3                     # reject the null (exact law) below this p-value


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


def exact_joint(model, prompt: list[int], params: SamplingParams, k: int, V: int) -> torch.Tensor:
    """The target's exact law of the next k tokens, by enumeration: probs [V ** k]."""
    law = torch.ones(1, dtype=torch.float64)
    prefixes = [()]
    with torch.no_grad():
        for _ in range(k):
            batch = torch.tensor([prompt + list(s) for s in prefixes])
            step = norm_logits(model(input_ids=batch).logits[:, -1], params).double()  # [n, V]
            law = (law.unsqueeze(1) * step).reshape(-1)
            prefixes = [s + (v,) for s in prefixes for v in range(V)]
    return law


CASES = {
    "t1": SamplingParams(temperature=1.0),
    "t0.7-topk3": SamplingParams(temperature=0.7, top_k=3),
    "t1.3-topp0.8": SamplingParams(temperature=1.3, top_p=0.8),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("mode", ("google", "deepmind", "bass", "bass-mask"))
def test_whole_loop_joint_law(mode, case):
    """Joint law of the first 3 new tokens (gamma 2: drafts, rejection, bonus) against enumeration.
    bass-mask: bass keeping finished rows in the batch (rows finish at different steps here)."""
    mode, finished_rows = ("bass", "mask") if mode == "bass-mask" else (mode, "drop")
    V, K = 5, 3
    params = CASES[case]
    target = tiny_model("llama", vocab=V, seed=11, layers=1, dim=16)
    draft = tiny_model("llama", vocab=V, seed=12, layers=1, dim=16)   # disagrees often
    with torch.no_grad():                                             # peaked laws
        target.lm_head.weight.mul_(3)
        draft.lm_head.weight.mul_(3)
    prompt = [1, 3, 0, 4]
    law = exact_joint(target, prompt, params, K, V)
    N = 4000 if mode == "bass" else 2500
    ids = torch.tensor([prompt] * N)
    res = generate(target, ids, draft_model=draft, mode=mode, max_new_tokens=K, gamma=2,
                   temperature=params.temperature, top_k=params.top_k, top_p=params.top_p, seed=7,
                   finished_rows=finished_rows)
    codes = torch.tensor([sum(t * V ** (K - 1 - i) for i, t in enumerate(row)) for row in res.tokens])
    pval = chi_square_pvalue(torch.bincount(codes, minlength=V ** K), law)
    print(f"{mode} ({finished_rows}) {case}: acceptance {res.stats['acceptance_rate']:.2f}, p-value {pval:.3g}")
    assert 0.05 < res.stats["acceptance_rate"] < 0.95       # both branches of the rule are used
    assert pval > ALPHA
