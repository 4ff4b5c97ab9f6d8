"""KV-cache presses (sampling.press): a pressed draft keeps the output the target's (greedy equal to
AR, chi-square), a press that evicts nothing is bit-identical, a pressed target computes exactly
the model attending over the kept tokens at their true positions (an independent reference with an
explicit mask, no cache), rollback stays correct in a compressed cache, bad settings are errors."""
import pytest
import torch
from test_distribution import ALPHA, CASES, joint_pvalue, peaked_models
from tiny import ARCHS, greedy_reference, left_padded_batch, noisy_copy, tiny_model

from sampling import PressSpec, SamplingParams, generate
from sampling.cache.spec import CacheSpec
from sampling.kvcache_model import KVCacheModel

KINDS = ("streaming", "knorm", "snapkv", "hybrid")
LENGTHS = (30, 41, 25, 37)


def case(arch="llama"):
    target = tiny_model(arch, seed=81)
    draft = noisy_copy(target, 0.1, seed=82)
    ids, mask = left_padded_batch(97, LENGTHS, seed=83)
    return target, draft, ids, mask


@pytest.mark.parametrize("arch", ARCHS)
def test_pressed_draft_keeps_greedy_output(arch):
    """Every press on the draft's cache, at prefill (ratio) and while decoding (budget), in every
    mode with a draft and both caches: the tokens are AR's (rows end on EOS at different steps)."""
    target, draft, ids, mask = case(arch)
    eos = greedy_reference(target, ids, mask, 16)[1][9]
    ref = greedy_reference(target, ids, mask, 16, eos_token_id=eos)
    kinds = KINDS if arch == "llama" else tuple(k for k in KINDS if k != "snapkv")   # snapkv: Llama-style
    for kind in kinds:
        press = PressSpec(kind, ratio=0.5, budget=20, on="draft", sinks=2, window=6)
        modes = (("google", "dynamic"), ("bass", "static"), ("bass", "dynamic")) + \
            ((("tree", "dynamic"),) if arch != "bloom" else ())                 # BLOOM takes no tree mask
        for mode, kv in modes:
            res = generate(target, ids, mask, draft_model=draft, mode=mode, max_new_tokens=16, gamma=3,
                           temperature=0, eos_token_id=eos, kv_cache=kv, press=press, tree="2,2,1")
            assert res.tokens == ref, (arch, kind, mode, kv)


def test_pressed_cascade_drafts_keep_greedy_output():
    target, draft, ids, mask = case()
    small = noisy_copy(draft, 0.2, seed=84)
    ref = greedy_reference(target, ids, mask, 14)
    res = generate(target, ids, mask, draft_model=[small, draft], mode="cascade", max_new_tokens=14, gamma=3,
                   temperature=0, press=PressSpec("hybrid", ratio=0.6, budget=16, sinks=2, window=4))
    assert res.tokens == ref


@pytest.mark.parametrize("kind", KINDS)
def test_press_that_evicts_nothing_is_bit_identical(kind):
    """Ratio 0 and a budget never reached: the press runs its checks every pass but evicts nothing,
    and sampled tokens (same seed) and their statistics are those without a press."""
    target, draft, ids, mask = case()
    kw = dict(draft_model=draft, mode="bass", max_new_tokens=12, gamma=3, temperature=0.9, top_k=20, seed=7)
    plain = generate(target, ids, mask, **kw)
    for on in ("draft", "target", "both"):
        res = generate(target, ids, mask, press=PressSpec(kind, ratio=0.0, budget=500, on=on), **kw)
        assert res.tokens == plain.tokens and res.stats["accepted"] == plain.stats["accepted"], on


def streaming_reference(model, prompt: list[int], new: int, ratio: float, budget: int, sinks: int) -> list[int]:
    """Greedy AR with a StreamingLLM-pressed cache, written without a cache: the whole sequence
    re-run every step under an explicit mask in which each position sees what the cache held when
    it was fed (the prompt: all before it; then the sinks and the most recent kept tokens)."""
    T = len(prompt)
    seq, seen = list(prompt), [list(range(j)) for j in range(T)]
    keep0 = max(1, min(T - int(T * ratio), budget))
    kept = list(range(T))
    kept = kept[:sinks] + kept[len(kept) - (keep0 - sinks):] if keep0 < T else kept
    out = []
    for _ in range(new):
        n = len(seq)
        allow = torch.zeros(n, n, dtype=torch.bool)
        for j, vis in enumerate(seen):
            allow[j, vis + [j]] = True
        dtype = next(model.parameters()).dtype
        mask4 = torch.zeros(1, 1, n, n, dtype=dtype).masked_fill(~allow, torch.finfo(dtype).min)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([seq]), attention_mask=mask4,
                           position_ids=torch.arange(n).unsqueeze(0)).logits
        x = int(logits[0, -1].argmax())
        out.append(x)
        if len(kept) > budget:                                     # evicted before the next pass
            kept = kept[:sinks] + kept[len(kept) - (budget - sinks):]
        seen.append(list(kept))
        kept.append(n)
        seq.append(x)
    return out


@pytest.mark.parametrize("arch", ("llama", "gpt_neox", "gpt2"))
def test_pressed_target_is_the_model_over_the_kept_tokens(arch):
    """A target's streaming press (prefill ratio, then a budget) against the cache-free reference:
    the same greedy tokens, so eviction keeps true positions (rotary and learned alike)."""
    target = tiny_model(arch, seed=93)
    prompt = torch.randint(1, 97, (1, 23), generator=torch.Generator().manual_seed(92))
    ref = streaming_reference(target, prompt[0].tolist(), 20, ratio=0.6, budget=8, sinks=2)
    for kv in ("dynamic", "static"):
        res = generate(target, prompt, mode="ar", max_new_tokens=20, temperature=0, kv_cache=kv,
                       press=PressSpec("streaming", ratio=0.6, budget=8, on="target", sinks=2))
        assert res.tokens[0] == ref, (arch, kv)
    plain = greedy_reference(target, prompt, torch.ones_like(prompt), 20)[0]
    assert plain != ref                                            # the press did change the model


def test_rollback_in_a_compressed_cache():
    """Feed tokens, roll some back, feed others: the same next-token law as a cache that never saw
    the rolled-back ones; a rollback into the compressed part is refused."""
    model = tiny_model("llama", seed=95)
    ids = torch.randint(1, 97, (2, 20), generator=torch.Generator().manual_seed(96))
    mask = torch.ones_like(ids)
    spec = CacheSpec(press=PressSpec("knorm", ratio=0.5, budget=10, on="target"))
    params = SamplingParams(temperature=1.0)
    a, b = KVCacheModel(model, params, cache=spec), KVCacheModel(model, params, cache=spec)
    a.prefill(ids, mask)
    b.prefill(ids, mask)
    assert a.filled == 10 and a.dropped == 10
    extra, other = torch.tensor([[5, 6, 7], [8, 9, 10]]), torch.tensor([[11, 12], [13, 14]])
    grow = lambda t: (torch.cat([ids, t], 1), torch.ones(2, 20 + t.shape[1], dtype=torch.long))  # noqa: E731
    a.catch_up(*grow(extra))
    a.rollback(21)                                                 # keep the first extra token
    seq, m = grow(torch.cat([extra[:, :1], other], 1))
    pa = a.catch_up(seq, m)
    b.catch_up(*grow(extra[:, :1]))
    b.rollback(21)
    pb = b.catch_up(seq, m)
    assert a.press.evictions == b.press.evictions >= 2                         # the budget evicted before the last pass
    torch.testing.assert_close(pa, pb, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="compressed part"):
        a.rollback(20)


@pytest.mark.parametrize("mode", ("google", "bass", "tree"))
def test_pressed_draft_keeps_the_target_law(mode):
    """Sampled tokens with the draft's cache pressed hard (half the prompt, then 3 slots) follow the
    target's exact joint law, computed independently."""
    V, K, N = 5, 3, 2500
    params = CASES["t1"]
    target, draft = peaked_models(31, 32)
    prompt = [1, 3, 0, 4, 2, 2]
    press = PressSpec("streaming", ratio=0.5, budget=3, on="draft", sinks=1)
    res = generate(target, torch.tensor([prompt] * N), draft_model=draft, mode=mode, max_new_tokens=K, gamma=2,
                   temperature=params.temperature, seed=5, press=press, tree="2,1")
    pval = joint_pvalue(res.tokens, target, prompt, params, K, V)
    assert 0.05 < res.stats["acceptance_rate"] < 0.95 and pval > ALPHA, (res.stats["acceptance_rate"], pval)


@pytest.mark.parametrize("press, msg", [
    (PressSpec("zip"), "unknown press 'zip'; choose one of none, streaming"),
    (PressSpec("streaming", ratio=1.0), r"press ratio must be in \[0, 1\), got 1.0"),
    (PressSpec("streaming", ratio=-0.1), r"press ratio must be in \[0, 1\), got -0.1"),
    (PressSpec("hybrid", budget=4, sinks=4), "press budget must be above the 4 sinks, got 4"),
    (PressSpec("knorm", ratio=0.5, on="neither"), "press_on must be one of draft, target, both"),
    (PressSpec("none", ratio=0.5), "a press ratio or budget needs a press"),
])
def test_bad_presses_are_one_line_errors(press, msg):
    target = tiny_model("llama")
    with pytest.raises(ValueError, match=msg):
        generate(target, torch.tensor([[1, 2, 3]]), draft_model=target, mode="google", max_new_tokens=2, press=press)


def test_snapkv_needs_llama_style_attention():
    target = tiny_model("gpt2")
    with pytest.raises(ValueError, match="press snapkv needs Llama-style attention"):
        generate(target, torch.tensor([[1, 2, 3]]), mode="ar", max_new_tokens=2,
                 press=PressSpec("snapkv", ratio=0.5, on="target"))


# --- the command line: sweeps over presses, long prompts, perplexity, one-line errors ---

@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from tiny import save_tiny_pair
    return save_tiny_pair(tmp_path_factory.mktemp("pair"), positions=512)


def test_sweep_over_presses_and_long_prompts(pair, capsys, tmp_path):
    import pandas as pd
    from test_benchmark import FIXTURE, cli

    from benchmark import run_experiment
    out = tmp_path / "sweep"
    code, stdout, err = cli(run_experiment, [
        "--dataset_path", FIXTURE, "--samples", "3", "--prompt_tokens", "60", "--max_tokens", "6",
        "--modes", "ar,google",
        "--press", "none,hybrid", "--press_on", "draft,target", "--press_ratio", "0.5", "--press_window", "8",
        "--batch_sizes", "1", "--temperatures", "0", "--repeats", "1", "--target_model_name", pair["target"],
        "--approx_model_name", pair["draft"], "--out", str(out)], capsys)
    assert code == 0, err
    raw = pd.read_csv(out / "raw.csv", keep_default_na=False)
    assert (raw.prompt_tokens == 60).all()
    configs = set(zip(raw["mode"], raw.press))
    hybrid = "hybrid:0.5::{}:4:8"
    assert configs == {("ar", ""), ("ar", hybrid.format("target")), ("google", ""),
                       ("google", hybrid.format("draft")), ("google", hybrid.format("target"))}
    tokens = raw.set_index(["mode", "press", "sample"]).tokens
    for s in raw["sample"].unique():                                   # a pressed draft: AR's tokens
        assert tokens["google", hybrid.format("draft"), s] == tokens["ar", "", s]
    summary = pd.read_csv(out / "summary.csv", keep_default_na=False)
    assert (summary.speedup_vs_ar > 0).all()                           # against the plain AR
    assert "press hybrid on draft" in (out / "table.md").read_text()


def test_perplexity_plain_equals_the_model_and_a_press_differs(tmp_path):
    from benchmark.perplexity import window_nll
    model = tiny_model("llama", seed=97)
    windows = torch.randint(1, 97, (3, 40), generator=torch.Generator().manual_seed(98))
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=windows).logits.double(), -1)   # [3, 40, V]
    ref = -logp[:, 19:39].gather(2, windows[:, 20:].unsqueeze(2)).squeeze(2).sum(1)
    torch.testing.assert_close(window_nll(model, windows, PressSpec()), ref, rtol=1e-9, atol=1e-9)
    pressed = window_nll(model, windows, PressSpec("knorm", ratio=0.5, on="target"))
    assert (pressed - ref).abs().max() > 1e-3


def test_perplexity_cli_writes_its_table(pair, capsys, tmp_path):
    from test_benchmark import FIXTURE, cli

    from benchmark import perplexity
    out = tmp_path / "ppl"
    code, stdout, err = cli(perplexity, ["--dataset_path", FIXTURE, "--windows", "32,64", "--ratios", "0.5",
                                         "--presses", "streaming,hybrid", "--press_window", "4",
                                         "--target_model_name", pair["target"], "--out", str(out)], capsys)
    assert code == 0, err
    import pandas as pd
    s = pd.read_csv(out / "summary.csv")
    assert set(s.press) == {"none", "streaming", "hybrid"} and set(s.window_tokens) == {32, 64}
    assert (out / "perplexity.png").exists() and "windows of 64 tokens" in (out / "table.md").read_text()


@pytest.mark.parametrize("tool, argv, msg", [
    ("main", ["--input", "x", "--press", "zip"], "unknown press 'zip'"),
    ("main", ["--input", "x", "--press", "streaming", "--press_ratio", "1"], r"press ratio must be in \[0, 1\)"),
    ("main", ["--input", "x", "--press", "hybrid", "--press_budget", "2"], "budget must be above the 4 sinks"),
    ("main", ["--input", "x", "--press", "streaming,knorm", "--press_ratio", "0.5"], "one press and one model"),
    ("eval_dolly", ["--press", "knorm", "--press_ratio", "0.5", "--press_on", "drafts"], "press_on must be one of"),
    ("run_experiment", ["--press", "none,snap", "--press_ratio", "0.5"], "unknown press 'snap'"),
    ("perplexity", ["--ratios", "0.5,1.5"], r"press ratio must be in \[0, 1\), got 1.5"),
    ("perplexity", ["--presses", "none"], "--presses lists presses"),
])
def test_bad_press_flags_are_one_line_errors(tool, argv, msg, capsys, tmp_path):
    import re

    from test_benchmark import FIXTURE, cli

    import eval_dolly
    import main as main_py
    from benchmark import perplexity, run_experiment
    module = {"main": main_py, "eval_dolly": eval_dolly, "run_experiment": run_experiment,
              "perplexity": perplexity}[tool]
    extra = [] if tool == "main" else ["--dataset_path", FIXTURE, "--out", str(tmp_path / "o")]
    code, stdout, err = cli(module, argv + extra, capsys)
    assert code == 2 and re.search(msg, err) and "Traceback" not in err, err


def test_press_cost_writes_its_tables(pair, capsys, tmp_path):
    from test_benchmark import cli

    from benchmark.studies import press_cost
    out = tmp_path / "cost"
    code, stdout, err = cli(press_cost, ["--caches", "16,32", "--reps", "1", "--target_model_name", pair["target"],
                                         "--approx_model_name", pair["draft"], "--out", str(out)], capsys)
    assert code == 0, err
    import pandas as pd
    presses = pd.read_csv(out / "presses.csv")
    assert set(presses.press) == {"streaming", "knorm", "snapkv", "hybrid"} and (presses.ms > 0).all()
    assert "ms to press a cache" in (out / "table.md").read_text()
