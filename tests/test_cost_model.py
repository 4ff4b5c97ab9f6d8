"""The cost model: its fit, its replay of a sweep's call structure, layer extrapolation, the CLI;
and the GPU check script's steps, run on the CPU."""
import json
import os

import numpy as np
import pandas as pd
import pytest
import torch
from test_benchmark import FIXTURE, cli
from tiny import save_tiny_pair

from benchmark import cost_model, gpu_check, host_cost, run_experiment
from benchmark.cost_model import PassCost, draft_passes, extrapolate, predict_batch


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return save_tiny_pair(tmp_path_factory.mktemp("pair"), positions=512)


def synthetic(a=2.0, b=0.5, c=0.01, batches=(1, 8)):
    """Pass costs that follow the model's form exactly (the batch scales them)."""
    rows = [dict(kind="step", batch=B, new=n, cache=L, ms=B ** 0.5 * (a + b * n + c * n * L))
            for B in batches for n in (1, 2, 5) for L in (16, 64)]
    rows += [dict(kind="prefill", batch=B, new=T, cache=0, ms=B * (1 + 0.1 * T)) for B in batches for T in (8, 32)]
    return pd.DataFrame(rows)


def test_fit_recovers_the_costs_and_interpolates_batches():
    cost = PassCost(synthetic())
    assert cost.ms(1, 3, 40) == pytest.approx(2 + 1.5 + 0.01 * 120)
    assert cost.ms(8, 3, 40) == pytest.approx(8 ** 0.5 * (2 + 1.5 + 1.2))
    mid = cost.ms(4.5, 3, 40)                               # halfway between batch 1 and 8
    assert mid == pytest.approx((cost.ms(1, 3, 40) + cost.ms(8, 3, 40)) / 2)
    assert cost.ms(32, 1, 16) == pytest.approx(cost.ms(8, 1, 16))   # beyond the grid: the nearest
    assert cost.prefill_ms(1, 20) == pytest.approx(3.0)         # two lengths measured: linear in T


def test_layers_extrapolate_linearly():
    none, four = synthetic(a=3.0), synthetic(a=11.0)            # four layers add 8 ms to a
    full = extrapolate(none, four, measured=4, layers=10)
    assert PassCost(full).ms(1, 1, 16) == pytest.approx(3 + 10 * 2 + 0.5 + 0.16)


def test_draft_passes_per_step():
    row = dict(mode="tree", tree="4,2,1,1", mean_gamma=0.0)
    assert draft_passes(pd.Series(row)) == [1, 4, 8, 8]          # the root, then each level it expands
    assert draft_passes(pd.Series(dict(row, tree="dynamic:16:5:4"))) == [1, 4, 4, 4, 4]
    assert draft_passes(pd.Series(dict(mode="bass", tree="", mean_gamma=3.9))) == [1, 1, 1, 1]
    assert draft_passes(pd.Series(dict(mode="ar", tree="", mean_gamma=0.0))) == []


def test_replay_adds_up_the_recorded_passes():
    """Two rows of a bass batch (drop): 3 and 1 steps after the prefill; gamma 2."""
    target, draft = PassCost(synthetic()), PassCost(synthetic(a=0.5))
    rows = pd.DataFrame([dict(mode="bass", draft="model", tree="", mean_gamma=2.0, finished_rows="drop",
                              prompt_tokens=t, target_calls=c, new_tokens=n) for t, c, n in ((10, 4, 8), (6, 2, 3))])
    per_step = 11 / 6                                            # new tokens per row-pass, prefill included
    want = target.prefill_ms(2, 10) + draft.prefill_ms(2, 10)
    for s, live in ((1, 2), (2, 1), (3, 1)):
        L = 10 + s * per_step
        want += target.ms(live, 3, L) + 2 * draft.ms(live, 1, L)
        if s == 1:
            first = want                                         # TTFT holds the first step
    assert predict_batch(rows, target, draft) == pytest.approx((want / 1000, first / 1000, 3, 2))
    mask = rows.assign(finished_rows="mask")                     # masked rows keep costing
    assert predict_batch(mask, target, draft)[0] > predict_batch(rows, target, draft)[0]
    ar = rows.assign(mode="ar", draft="", mean_gamma=0.0)        # AR's first token: the prefill's
    assert predict_batch(ar, target, None)[1:] == pytest.approx((target.prefill_ms(2, 10) / 1000, 3, 3))


def test_replay_recovers_a_sweep_that_follows_it():
    """Batches whose wall time is their passes plus 2 ms of host work per step, TTFT the prefill and
    the first step with its host work (as a speculative loop hands out): the host work calibrated
    leave-one-out is 2 ms and the whole-generation and decode rates come out as measured."""
    from benchmark.cost_model import replay
    target, draft = PassCost(synthetic()), PassCost(synthetic(a=0.5))
    rows = []
    for bid, (c0, c1) in enumerate(((4, 2), (5, 3), (3, 3))):
        batch = pd.DataFrame([dict(mode="bass", draft="model", tree="", mean_gamma=2.0, finished_rows="drop",
                                   prompt_tokens=10, target_calls=c, new_tokens=2 * c, ttft_tokens=2 * 3)
                              for c in (c0, c1)])
        total, first, steps, _ = predict_batch(batch, target, draft)
        rows += [dict(r, batch_id=bid, batch=2, gamma=2, temperature=0.0, kv_cache="dynamic", compile=False,
                      sample=2 * bid + j, wall_time_s=total + 0.002 * steps, ttft_s=first + 0.002)
                 for j, r in enumerate(batch.to_dict("records"))]
    out = replay(pd.DataFrame(rows), target, draft, "dynamic").iloc[0]
    assert out.overhead_ms == pytest.approx(2.0)
    assert out.predicted_tps == pytest.approx(out.measured_tps)
    assert out.predicted_decode_tps == pytest.approx(out.measured_decode_tps)


def test_cost_model_cli_checks_itself_on_a_sweep(pair, capsys, tmp_path):
    models = ["--target_model_name", pair["target"], "--approx_model_name", pair["draft"]]
    sweep = tmp_path / "sweep"
    code, out, err = cli(run_experiment, ["--dataset_path", FIXTURE, "--samples", "4", "--max_tokens", "6",
                                          "--modes", "ar,google,bass,tree", "--batch_sizes", "1,2", "--gammas", "2",
                                          "--repeats", "1", "--trees", "2,1", "--out", str(sweep)] + models, capsys)
    assert code == 0, err
    argv = ["--raw", str(sweep / "raw.csv"), "--batches", "1,2", "--news", "1,3", "--caches", "8,32,128",
            "--prefills", "8,16,32", "--reps", "1"] + models
    code, out, err = cli(cost_model, argv + ["--out", str(tmp_path / "cm")], capsys)
    assert code == 0, err
    table = pd.read_csv(tmp_path / "cm" / "prediction.csv")
    assert set(table["mode"]) == {"ar", "google", "bass", "tree"}
    assert table.passes_only_tps.gt(0).all() and table.measured_tps.gt(0).all()
    assert np.isfinite(table.predicted_tps).all()       # (a tiny pair's passes are noise: no sign to check)
    assert {"passes.csv", "fit.csv", "table.md", "costs.png"} <= set(os.listdir(tmp_path / "cm"))
    assert table.overhead_ms.notna().all() and np.isfinite(table.predicted_decode_tps).all()
    # the same passes again, with the host work of that run given: no measuring
    code, out, err = cli(cost_model, ["--raw", str(sweep / "raw.csv"), "--passes", str(tmp_path / "cm" / "passes.csv"),
                                      "--calibration", str(tmp_path / "cm" / "prediction.csv"),
                                      "--out", str(tmp_path / "cm3")], capsys)
    assert code == 0, err
    again = pd.read_csv(tmp_path / "cm3" / "prediction.csv")
    assert (again.overhead_ms.round(6) == table.overhead_ms.round(6)).all()
    # a config folder measured with none and one of its two layers, and extrapolated
    code, out, err = cli(cost_model, argv + ["--target_config", pair["target"], "--draft_config", pair["draft"],
                                             "--layers", "1", "--out", str(tmp_path / "cm2")], capsys)
    assert code == 0, err
    assert len(pd.read_csv(tmp_path / "cm2" / "prediction.csv")) == len(table)


@pytest.mark.parametrize("flag, value, msg", [("--batches", "0,2", "--batches takes a comma list of integers >= 1"),
                                              ("--target_config", "llama-3t", "not a preset"),
                                              ("--raw", "/nonexistent.csv", "no such file")])
def test_cost_model_bad_flags(flag, value, msg, capsys, tmp_path):
    argv = ["--raw", FIXTURE, "--out", str(tmp_path / "x")]
    code, out, err = cli(cost_model, argv + [flag, value], capsys)
    assert code == 2 and msg in err and "Traceback" not in err


def test_gpu_check_steps_run_on_the_cpu(pair, capsys, tmp_path):
    out = tmp_path / "check"
    threads = torch.get_num_threads()
    torch.set_num_threads(2)                   # tests run on one thread (conftest); host_cost runs on one
    try:
        code, stdout, err = cli(gpu_check, ["--device", "cpu", "--quick", "--no_compile", "--dataset_path", FIXTURE,
                                            "--max_tokens", "4", "--exact_prompts", "3", "--target_model_name",
                                            pair["target"], "--approx_model_name", pair["draft"], "--predict",
                                            f"{pair['target']}:{pair['draft']}:1", "--out", str(out)], capsys)
    finally:
        torch.set_num_threads(threads)
    assert code == 0, err
    steps = pd.read_csv(out / "steps.csv")
    assert steps.status.tolist() == ["done"] * 6 + ["skipped (--no_compile)"] + ["done"] * 6, steps
    assert (out / "launch_model" / "prediction.csv").exists()
    assert (out / "host_cost" / "summary.csv").exists()
    static = pd.read_csv(out / "speed-static" / "raw.csv")                   # both caches, the same tokens
    assert set(static.kv_cache) == {"dynamic", "static"} and set(static["mode"]) == {"ar", "bass", "tree"}
    assert (static.groupby(["mode", "sample"]).tokens.nunique() == 1).all()
    busy = pd.read_csv(out / "device_busy.csv")                           # eager only (--no_compile); no device here
    assert list(busy["mode"]) == ["ar", "google", "tree"] and (busy.device_events == 0).all()
    assert (busy.host_ops > 0).all() and busy.busy_fraction.isna().all() and (busy.new_tokens == 4).all()
    assert (out / "cost_target" / "prediction.csv").exists()          # the predicted target, from its config
    exact = pd.read_csv(out / "exactness.csv")
    assert (exact.equal_to_ar == exact.prompts).all() and set(exact.kv_cache) == {"dynamic", "static"}
    assert len(exact) == 2 * len(gpu_check.MODES)
    agree = pd.read_csv(out / "agreement.csv")
    assert set(agree.tool) == {"main.py --compare", "eval_dolly.py"}
    assert agree[agree.tool == "eval_dolly.py"].sweep_speedup.notna().all()       # same prompts in the sweeps
    assert agree.set_index("mode").loc["tree"].sweep_speedup > 0
    assert (agree.tool_min_round <= agree.tool_max_round).all() and agree.sweep_within_tool_rounds.dtype == bool
    assert agree.set_index(["tool", "mode"]).loc[("main.py --compare", "ar"), "tool_max_round"] == 1.0
    assert agree.sweep_side_by_side.all()      # speed-tools: eval_dolly's google at 1 and ar at 8 too
    tools = pd.read_csv(out / "speed-tools" / "raw.csv")
    assert sorted(set(zip(tools["mode"], tools.batch))) == [("ar", 1), ("ar", 8), ("bass", 1), ("bass", 8),
                                                            ("google", 1), ("tree", 1), ("tree", 8)]
    assert json.loads((out / "env.json").read_text())["cores"] >= 1
    threads = {p.parent.name: json.loads(p.read_text()).get("torch_threads") for p in out.glob("*/env.json")}
    assert threads.pop("host_cost") == 1 and set(threads.values()) - {None} == {2}, threads   # the steps after it too
    # a run cut inside launch_model (its folder half written, no row in steps.csv) is completed by a second run
    cut = steps[steps.step.isin(["exactness", "speed-b1", "speed-batched", "host_cost"])]
    cut.to_csv(out / "steps.csv", index=False)
    (out / "launch_model" / "prediction.csv").write_text("half")
    again = tmp_path / "again"
    code, stdout, err = cli(gpu_check, ["--device", "cpu", "--quick", "--no_compile", "--dataset_path", FIXTURE,
                                        "--max_tokens", "4", "--target_model_name", pair["target"],
                                        "--approx_model_name", pair["draft"], "--predict", "",
                                        "--continue_from", str(out), "--out", str(again)], capsys)
    assert code == 0, err
    steps = pd.read_csv(again / "steps.csv").set_index("step").status
    assert (steps[cut.step] == "done (earlier run)").all() and steps["launch_model"] == "done", steps
    assert steps["main.py"] == "done" and steps["speed-compiled"] == "skipped (--no_compile)"
    assert pd.read_csv(again / "launch_model" / "prediction.csv").shape[0] > 1      # rewritten, not the half file
    assert (out / "launch_model" / "prediction.csv").read_text() == "half"         # the earlier folder untouched
    code, _, err = cli(gpu_check, ["--device", "cpu", "--dataset_path", FIXTURE, "--continue_from", str(tmp_path),
                                   "--out", str(tmp_path / "x")], capsys)
    assert code == 2 and "not a gpu_check folder" in err and "Traceback" not in err


def test_host_cost_counts_the_loop_beside_a_baseline(capsys, tmp_path):
    """The host-cost tool on shrunk copies of the embedded pair, this checkout as its own baseline:
    both versions measured, each with its own drafters (heads too), the same counts for both, the
    loop's syncs as the decode test holds them."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(host_cost.__file__)))
    out = tmp_path / "host"
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        code, stdout, err = cli(host_cost, ["--configs", "ar:1,bass:2:static,tree:1,bass:2:dynamic:mlp",
                                            "--max_tokens", "6", "--hidden", "16", "--repeats", "1", "--threads", "1",
                                            "--baseline", repo, "--out", str(out)], capsys)
        assert torch.get_num_threads() == 2     # its --threads left behind, gpu_check's later steps ran on one
    finally:
        torch.set_num_threads(threads)
    assert code == 0, err
    assert json.loads((out / "env.json").read_text())["torch_threads"] == 1
    s = pd.read_csv(out / "summary.csv")
    cur, base = s[s.version == "current"].reset_index(), s[s.version == "baseline"].reset_index()
    assert len(cur) == len(base) == 4 and list(cur["mode"]) == ["ar", "bass", "tree", "bass"]
    for col in ("target_calls", "kernels_per_pass", "model_kernels_per_pass", "syncs_per_pass"):
        assert (cur[col] == base[col]).all(), col
    assert (s.kernels_per_pass > 0).all() and (s.model_kernels_per_pass > s.kernels_per_pass).all()
    assert (s.host_ms_per_pass > 0).all() and len(pd.read_csv(out / "raw.csv")) == 8
    assert "->" in (out / "table.md").read_text()


@pytest.mark.parametrize("flag,value,msg", [("--configs", "beam:1", "bad config 'beam:1'"),
                                            ("--configs", "ar:0", "bad config 'ar:0'"),
                                            ("--hidden", "4", "--hidden must be 0 (the embedded pair) or >= 8"),
                                            ("--baseline", "/nonexistent", "no sampling/ package")]
                         + [("--device", "cuda", "no CUDA device")] * (not torch.cuda.is_available()))
def test_host_cost_bad_flags(flag, value, msg, capsys, tmp_path):
    code, out, err = cli(host_cost, ["--repeats", "1", "--configs", "ar:1", "--max_tokens", "3",
                                     "--out", str(tmp_path / "x"), flag, value], capsys)
    assert code == 2 and msg in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()


def test_host_cost_refuses_an_existing_folder(capsys, tmp_path):
    code, out, err = cli(host_cost, ["--out", str(tmp_path)], capsys)
    assert code == 2 and "exists" in err


def test_host_cost_counts_each_drafter(capsys, tmp_path):
    """Speculator heads' layers count as a model's kernels (their passes are launches a graph can
    hold), an n-gram drafter's lookup as the loop's; each configuration names its drafter and tree."""
    out = tmp_path / "host"
    code, stdout, err = cli(host_cost, ["--configs", "ar:1,google:1,google:1:dynamic:mlp,google:1:dynamic:ngram,"
                                        "tree:1:static:medusa", "--max_tokens", "6", "--hidden", "16",
                                        "--repeats", "1", "--out", str(out)], capsys)
    assert code == 0, err
    s = pd.read_csv(out / "summary.csv", keep_default_na=False).set_index(["mode", "draft"])
    assert list(s.index) == [("ar", ""), ("google", "model"), ("google", "mlp"), ("google", "ngram"),
                             ("tree", "medusa")]
    ar = s.loc[("ar", "")]
    assert s.loc[("google", "mlp")].model_kernels_per_pass > ar.model_kernels_per_pass       # target + heads
    assert s.loc[("google", "ngram")].model_kernels_per_pass < ar.model_kernels_per_pass + 20    # the target alone
    assert s.loc[("google", "model")].model_kernels_per_pass > ar.model_kernels_per_pass + 50   # + draft passes
    assert s.loc[("tree", "medusa")].tree != "" and s.loc[("google", "mlp")].gamma == 4 and ar.gamma == 0
    assert "| google | mlp | 1 | dynamic |" in (out / "table.md").read_text()


@pytest.mark.parametrize("configs,extra,msg", [("ar:1:dynamic:mlp", [], "bad config 'ar:1:dynamic:mlp'"),
                                               ("google:1:dynamic:beam", [], "bad config"),
                                               ("google:1:static:mlp", ["--baseline", "OLD"],
                                                "has no new_speculator, load_speculator, NgramDrafter")])
def test_host_cost_bad_drafter(configs, extra, msg, capsys, tmp_path):
    old = tmp_path / "old" / "sampling"                          # a checkout from before the drafters
    old.mkdir(parents=True)
    (old / "__init__.py").write_text("def generate(*args, **kwargs):\n    raise AssertionError\n")
    extra = [str(tmp_path / "old") if e == "OLD" else e for e in extra]
    code, out, err = cli(host_cost, ["--repeats", "1", "--configs", configs, "--out", str(tmp_path / "x"), *extra],
                         capsys)
    assert code == 2 and msg in err and "Traceback" not in err


def launch_counts(version="current"):
    """host_cost rows: kernels per pass of ar, a chain and a tree at batches 1 and 8."""
    rows = []
    for b in (1, 8):
        for mode, draft, gamma, tree, km, kl in (("ar", "", 0, "", 300, 10), ("google", "model", 4, "", 650, 70),
                                                 ("tree", "model", 0, "dyn", 700, 250)):
            rows.append(dict(version=version, mode=mode, draft=draft, batch=b, kv_cache="dynamic", gamma=gamma,
                             tree=tree, model_kernels_per_pass=km, kernels_per_pass=kl))
    return pd.DataFrame(rows)


PER_PASS = {"ar": 1.0, "google": 2.5, "tree": 4.0}


def launch_sweep(us_model=20.0, us_loop=10.0, per_pass=PER_PASS):
    """raw.csv rows whose decode time follows the launch-bound model exactly: 2 batches of 8 rows per
    configuration, each row 10 target passes after its prefill (a 0.5 s prefill); AR hands its first
    token out after the prefill, a speculative loop after its first verify (TTFT one pass later)."""
    rows, counts = [], launch_counts().set_index(["mode", "batch"])
    for (mode, b), c in counts.iterrows():
        ms = us_model * c.model_kernels_per_pass / 1000 + us_loop * c.kernels_per_pass / 1000
        for batch_id in range(2):
            for r in range(b):
                tokens = (mode == "ar") + per_pass[mode] * 10 * (1 if b == 1 else 0.8)   # batched: rows end unevenly
                rows.append(dict(mode=mode, draft=c.draft, batch=b, gamma=c.gamma, tree=c.tree, temperature=0.0,
                                 kv_cache="dynamic", compile=False, batch_id=batch_id, sample=batch_id * b + r,
                                 wall_time_s=0.5 + 10 * ms / 1000, ttft_s=0.5 + (mode != "ar") * ms / 1000,
                                 target_calls=11, new_tokens=tokens))
    return pd.DataFrame(rows)


def test_launch_model_recovers_its_costs_and_predicts():
    from benchmark import launch_model
    sweep = launch_model.decode_passes(launch_sweep())
    assert sweep.set_index(["mode", "batch"]).loc[("google", 1)].tokens_per_pass == pytest.approx(2.5)
    assert sweep.set_index(["mode", "batch"]).loc[("google", 8)].tokens_per_pass == pytest.approx(8 * 2.5 * 0.8)
    a, b, fitted = launch_model.fit(sweep, launch_counts())
    assert (a, b) == (pytest.approx(20.0), pytest.approx(10.0)) and fitted.error.abs().max() < 1e-9
    pred = launch_model.predict(launch_counts(), sweep, a, b).set_index(["mode", "batch"])
    g = pred.loc[("google", 1)]
    assert g.predicted_ms_per_pass == pytest.approx(0.02 * 650 + 0.01 * 70)
    assert g.predicted_vs_ar == pytest.approx((2.5 / (0.02 * 650 + 0.01 * 70)) / (1 / (0.02 * 300 + 0.01 * 10)))
    assert g.ceiling_vs_ar == pytest.approx(2.5 * 300 / 650)                  # the models' kernels alone
    assert pred.loc[("tree", 8)].tokens_per_pass == pytest.approx(8 * 4.0 * 0.8)
    assert pred.loc[("ar", 1)].predicted_vs_ar == 1


def test_launch_model_cli(capsys, tmp_path):
    from benchmark import launch_model
    launch_sweep().to_csv(tmp_path / "raw.csv", index=False)
    launch_counts("baseline").to_csv(tmp_path / "fit.csv", index=False)
    counts = launch_counts()
    counts = pd.concat([counts, counts.iloc[[1]].assign(draft="mlp", model_kernels_per_pass=330)])  # no acceptance
    counts.to_csv(tmp_path / "counts.csv", index=False)
    argv = ["--fit_sweep", str(tmp_path / "raw.csv"), "--fit_counts", str(tmp_path / "fit.csv"), "--fit_version",
            "baseline", "--counts", str(tmp_path / "counts.csv"), "--acceptance", str(tmp_path / "raw.csv")]
    code, out, err = cli(launch_model, argv + ["--out", str(tmp_path / "lm")], capsys)
    assert code == 0, err
    assert "20.00 us per model kernel, 10.00 us per loop kernel" in out
    assert len(pd.read_csv(tmp_path / "lm" / "fit.csv")) == 6
    code, out, err = cli(launch_model, argv[:1] + [f"{tmp_path / 'raw.csv'},{tmp_path / 'raw.csv'}"] + argv[2:]
                         + ["--out", str(tmp_path / "twice")], capsys)          # one sweep given twice: pooled
    assert code == 0 and len(pd.read_csv(tmp_path / "twice" / "fit.csv")) == 6, err
    pred = pd.read_csv(tmp_path / "lm" / "prediction.csv", keep_default_na=False)
    assert len(pred) == 7 and pred[pred["draft"] == "mlp"].tokens_per_pass.iloc[0] == ""    # said, not guessed
    for bad, msg in ((["--fit_version", "current"], "no rows of version 'current'"),
                     (["--acceptance", str(tmp_path / "none.csv")], "no such file")):
        code, out, err = cli(launch_model, argv + bad + ["--out", str(tmp_path / "x")], capsys)
        assert code == 2 and msg in err and "Traceback" not in err and not (tmp_path / "x").exists()
    code, out, err = cli(launch_model, argv + ["--out", str(tmp_path / "lm")], capsys)
    assert code == 2 and "exists" in err



def test_launch_model_costs_are_never_negative():
    """A sweep whose time falls as the models' operators grow: that cost is zero, not negative."""
    from benchmark import launch_model
    a, b, fitted = launch_model.fit(launch_model.decode_passes(launch_sweep(us_model=-2.0, us_loop=40.0)),
                                    launch_counts())
    assert a == 0 and b > 0 and fitted.error.abs().max() > 0.01


def test_agreement_takes_both_figures_from_one_sweep():
    """A tool's ratio is set against a sweep that ran both configurations (the first of REFERENCES),
    never one figure from each of two runs while one run has both; with no such sweep, each comes
    from the first that ran it, flagged as not side by side."""
    def rows(sweep, rates):                    # {(mode, batch): tokens/s}, one batch of 8 prompts each
        return [dict(mode=m, batch=b, batch_id=0, sweep=sweep, first=0, tokens=tps, wall=1.0)
                for (m, b), tps in rates.items()]
    rates = pd.DataFrame(rows("speed-tools", {("google", 1): 30.0, ("ar", 8): 300.0, ("ar", 1): 100.0})
                         + rows("speed-b1", {("google", 1): 50.0, ("ar", 1): 40.0, ("tree", 1): 60.0})
                         + rows("speed-batched", {("ar", 8): 200.0, ("bass", 8): 100.0}))
    assert gpu_check.sweep_speedup(rates, "deepmind", 1, 8, 8) == (0.1, True)       # not 50 / 300, nor 30 / 200
    assert gpu_check.sweep_speedup(rates, "bass", 8, 8, 8) == (0.5, True)           # speed-batched has both
    assert gpu_check.sweep_speedup(rates, "tree", 1, 1, 8) == (1.5, True)           # not 60 / 100
    assert gpu_check.sweep_speedup(rates, "tree", 1, 8, 8) == (0.2, False)          # 60 / 300: two runs
    num, side = gpu_check.sweep_speedup(rates, "cascade", 1, 1, 8)
    assert num != num and not side


def test_gpu_check_compares_the_compiled_rows_only(tmp_path):
    """speed-compiled runs the eager dynamic cache beside the compiled static one (ratios from one
    run); its exactness check reads each compiled row against the eager row of the same mode,
    drafter and prompt."""
    rows = [("ar", "", "dynamic", "1 2"), ("ar", "", "static", "1 2"), ("tree", "model", "dynamic", "1 3"),
            ("tree", "mlp", "dynamic", "1 2"), ("tree", "mlp", "static", "1 3")]
    (tmp_path / "speed-compiled").mkdir()
    pd.DataFrame([dict(mode=m, draft=d, kv_cache=kv, batch=1, sample=0, tokens=t) for m, d, kv, t in rows]).to_csv(
        tmp_path / "speed-compiled" / "raw.csv", index=False)
    gpu_check.compiled_exactness(str(tmp_path))
    got = pd.read_csv(tmp_path / "exactness_compiled.csv", keep_default_na=False)
    assert got["mode"].tolist() == ["ar", "tree"] and got["draft"].tolist() == ["", "mlp"]
    assert got.equal.tolist() == [True, False]          # not matched against the draft model's tree


def test_compile_cost_summary_pays_back_where_the_lines_cross():
    """First generations 5 s (eager 2 s) over settle 2, then 0.5 s against eager's 1 s: compiling
    added 3 s, saves 0.5 s a generation, so the runs' totals meet after 2 + 3 / 0.5 = 8 generations."""
    from benchmark.compile_cost import summarise
    rows = [dict(run=r, generation=i, seconds=s) for r, walls in
            (("eager", [1.0, 1.0, 1.0, 1.0, 1.0]), ("cold", [4.0, 1.0, 0.5, 0.5, 0.5])) for i, s in enumerate(walls)]
    s = summarise(pd.DataFrame(rows), settle=2).set_index("run")
    assert s.loc["cold", "extra_s"] == 3.0 and s.loc["cold", "saved_per_generation_s"] == 0.5
    assert s.loc["cold", "break_even_generations"] == 8.0
    eager_total = lambda g: sum([1.0] * g)                                       # noqa: E731
    cold_total = lambda g: 5.0 + 0.5 * (g - 2)                                  # noqa: E731
    assert eager_total(8) == cold_total(8)
