"""Mode cascade: drafts verifying drafts. Greedy equals greedy AR, the sampled joint law
is the target's (chi-square against enumeration), and bad cascades are one-line errors."""
import pytest
import torch
from test_distribution import ALPHA, CASES, joint_pvalue, peaked_models
from tiny import ARCHS, greedy_reference, left_padded_batch, noisy_copy, tiny_model

from sampling import generate


@pytest.mark.parametrize("arch", ARCHS)
def test_cascade_greedy_equals_greedy(arch):
    target = tiny_model(arch, seed=21)
    mid, small = noisy_copy(target, 0.1, seed=22), noisy_copy(target, 0.3, seed=23)
    ids, mask = left_padded_batch(97, (5, 9, 3, 7), seed=24)
    eos = greedy_reference(target, ids, mask, 12)[2][4]
    ref = greedy_reference(target, ids, mask, 12, eos_token_id=eos)
    for drafts, kw in (([small, mid], dict(gamma=4, cascade_gamma=2)),
                       ([small, small, mid], dict(gamma=3, gamma_schedule="aimd"))):
        res = generate(target, ids, mask, draft_model=drafts, mode="cascade", max_new_tokens=12, temperature=0,
                       eos_token_id=eos, **kw)
        assert res.tokens == ref, (arch, len(drafts))
        assert 0 < res.stats["accepted"] < res.stats["drafted"]
        assert res.stats["draft_calls"] > res.stats["target_calls"]      # every level's passes count


@pytest.mark.parametrize("case", ("t1", "t0.7-topk3"))
def test_cascade_keeps_the_target_law(case):
    """Three levels that disagree often: the small draft's tokens are verified by the middle model,
    whose law (not the small one's) is the q the target's rule sees."""
    V, K, N = 5, 3, 2500
    params = CASES[case]
    target, mid, small = peaked_models(11, 12, 13)
    prompt = [1, 3, 0, 4]
    res = generate(target, torch.tensor([prompt] * N), draft_model=[small, mid], mode="cascade", max_new_tokens=K,
                   gamma=2, cascade_gamma=1, temperature=params.temperature, top_k=params.top_k, seed=5)
    pval = joint_pvalue(res.tokens, target, prompt, params, K, V)
    assert 0.05 < res.stats["acceptance_rate"] < 0.95 and pval > ALPHA, (res.stats["acceptance_rate"], pval)


@pytest.mark.parametrize("draft, kw, msg", [
    ("one", {}, "takes draft_model=\\[smallest"),
    ("pair", dict(mode="google"), "a list of drafts is a cascade"),
    ("single-list", {}, "takes 2 or more draft models"),
    ("pair", dict(cascade_gamma=0), "cascade_gamma must be >= 1"),
])
def test_bad_cascades_are_one_line_errors(draft, kw, msg):
    target = tiny_model("llama")
    d = {"one": target, "pair": [target, target], "single-list": [target]}[draft]
    with pytest.raises(ValueError, match=msg):
        generate(target, torch.tensor([[3, 4]]), draft_model=d, max_new_tokens=2, **dict(dict(mode="cascade"), **kw))


def test_main_mode_cascade_on_the_embedded_models(capsys):
    """main.py --mode cascade with the embedded draft_small -> draft -> target: greedy AR's tokens."""
    import json

    from test_benchmark import cli

    import main
    argv = ["--input", "The quick brown fox", "--temperature", "0", "--max_tokens", "12", "--json", "--device", "cpu"]
    outs = {}
    for mode in ("ar", "cascade"):
        code, out, err = cli(main, argv + ["--mode", mode, "--cascade_gamma", "2"], capsys)
        assert code == 0, err
        outs[mode] = json.loads(out)["tokens"]
    assert outs["cascade"] == outs["ar"]
    code, out, err = cli(main, ["--input", "x", "--mode", "cascade", "--cascade", "models/draft"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--cascade takes 2 or more" in err


def test_cascade_in_a_sweep(capsys, tmp_path):
    """run_experiment and eval_dolly run mode cascade with the drafts of --cascade (draft column
    "cascade"), greedy outputs equal to AR's."""
    import pandas as pd
    from test_benchmark import FIXTURE, cli
    from tiny import save_tiny_pair

    import eval_dolly
    from benchmark import run_experiment
    pair = save_tiny_pair(tmp_path / "pair", positions=512)
    common = ["--dataset_path", FIXTURE, "--samples", "3", "--max_tokens", "6", "--target_model_name", pair["target"],
              "--cascade", f"{pair['draft']},{pair['target']}", "--repeats", "1"]
    code, out, err = cli(run_experiment, common + ["--modes", "ar,cascade", "--batch_sizes", "1", "--gammas", "2",
                                                   "--out", str(tmp_path / "s")], capsys)
    assert code == 0, err
    raw = pd.read_csv(tmp_path / "s" / "raw.csv", keep_default_na=False)
    assert set(raw["draft"]) == {"", "cascade"}
    tokens = raw.set_index(["mode", "sample"]).tokens
    assert all(tokens["cascade", s] == tokens["ar", s] for s in raw["sample"].unique())
    code, out, err = cli(eval_dolly, common + ["--modes", "ar,cascade", "--temperature", "0"], capsys)
    assert code == 0, err
    assert "cascade" in out
