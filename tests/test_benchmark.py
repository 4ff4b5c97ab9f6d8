"""Dataset loader, eval_dolly and a small sweep of python -m benchmark.run_experiment."""
import json
import os

import pandas as pd
import pytest
from tiny import left_padded_batch, save_tiny_pair, tiny_model

import eval_dolly
from benchmark import run_experiment
from benchmark.metrics import leviathan_speedup, summarise
from sampling.app.cli import run
from sampling.app.dolly import load_dolly, render_prompt

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "dolly-fixture.jsonl")


def test_fixture_loads_and_skips_blank_lines():
    records = load_dolly(FIXTURE)
    assert len(records) == 12                       # 13 lines, one blank
    assert set(records[0]) == {"instruction", "context", "response", "category"}
    with_ctx = render_prompt(records[1])
    assert with_ctx.startswith("### Instruction:\n") and "### Context:\n" in with_ctx
    assert with_ctx.endswith("### Response:\n")
    assert "### Context" not in render_prompt(records[0])


def test_malformed_line_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    lines = open(FIXTURE).read().splitlines()
    lines.insert(3, '{"instruction": "half a record"')
    lines.insert(5, '["not", "an", "object"]')
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=rf"{bad}:4: malformed record: invalid JSON"):
        load_dolly(str(bad))
    warnings = []
    records = load_dolly(str(bad), skip_bad_lines=True, warn=warnings.append)
    assert len(records) == 12 and warnings == [f"warning: skipped 2 malformed line(s) in {bad}"]


def test_missing_file_and_offline_hub(monkeypatch):
    with pytest.raises(ValueError, match="dataset file not found: /no/such.jsonl"):
        load_dolly("/no/such.jsonl")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(ValueError, match="pass a local Dolly jsonl with --dataset_path"):
        load_dolly(None)


def test_alpha_from_accepted_inverts_the_geometric_sum():
    from benchmark.metrics import alpha_from_accepted
    for alpha in (0.1, 0.5, 0.73, 0.95):
        assert abs(alpha_from_accepted(alpha * (1 - alpha ** 4) / (1 - alpha), 4) - alpha) < 1e-9


def test_leviathan_formula():
    assert leviathan_speedup(0.0, 4, 0.0) == 1.0
    assert leviathan_speedup(1.0, 4, 0.0) == 5.0
    assert abs(leviathan_speedup(0.8, 4, 0.1) - (1 - 0.8 ** 5) / (0.2 * 1.4)) < 1e-12


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pair")
    paths = save_tiny_pair(folder, positions=512)
    paths["other_draft"] = save_tiny_pair(folder / "other", positions=512, other_draft_tokenizer=True)["draft"]
    return paths


def reject_constant(name):
    raise ValueError(f"not strict JSON: {name}")


def cli(module, argv, capsys):
    code = 0
    try:
        run(lambda: module.main(argv))
    except SystemExit as e:
        code = e.code
    return code, *capsys.readouterr()


def test_eval_dolly_table_and_consistency(pair, capsys, tmp_path):
    code, out, err = cli(eval_dolly, ["--dataset_path", FIXTURE, "--samples", "5", "--max_tokens", "4",
                                      "--modes", "AR,google,Bass,hf", "--temperature", "0", "--batch", "2",
                                      "--target_model_name", pair["target"], "--approx_model_name",
                                      pair["draft"], "--out", str(tmp_path)], capsys)
    assert code == 0, err
    for mode in ("google", "bass", "hf"):
        assert f"consistency: {mode} equals ar on 5/5 outputs" in out
    assert {"raw.csv", "summary.csv"} <= set(os.listdir(tmp_path))
    assert set(pd.read_csv(tmp_path / "raw.csv").query("mode == 'google'").gamma) == {4}   # DEFAULTS.gamma
    table = out[out.index("mode "):].splitlines()
    assert [line.split()[0] for line in table[1:5]] == ["ar", "google", "bass", "hf"]    # the order of --modes
    assert table[0].split()[:6] == ["mode", "batch", "tok/s", "speedup", "rounds", "tok/call"]
    assert table[1].split()[4] == "1.00-1.00"                        # ar against itself, round by round
    assert "  seq ms/tok: what one sequence waits per token" in out
    assert max(len(ln) for ln in out.splitlines() if str(tmp_path) not in ln) <= 120
    summary = pd.read_csv(tmp_path / "summary.csv")
    assert (summary.speedup_min_round <= summary.speedup_max_round).all() and summary.speedup_min_round.notna().all()
    code, out, err = cli(eval_dolly, ["--dataset_path", FIXTURE, "--samples", "2", "--max_tokens", "3",
                                      "--modes", "bass,ar", "--temperature", "0", "--show", "1", "--repeats", "1",
                                      "--target_model_name", pair["target"], "--approx_model_name", pair["draft"],
                                      "--out", str(tmp_path)], capsys)
    assert code == 2 and "raw.csv exists" in err                     # no silent overwrite
    code, out, err = cli(eval_dolly, ["--dataset_path", FIXTURE, "--samples", "2", "--max_tokens", "3",
                                      "--modes", "bass,ar", "--temperature", "0", "--show", "1", "--repeats", "1",
                                      "--target_model_name", pair["target"], "--approx_model_name", pair["draft"]],
                         capsys)
    assert code == 0, err
    raw_text = out[out.index("=== sample 0"):]
    assert raw_text.count("--- bass: ") == 1 and raw_text.count("--- ar: ") == 1


def test_offline_hub_id_fails_at_once(monkeypatch):
    import time

    from sampling.app import models
    monkeypatch.setattr(models, "hub_reachable", lambda: False)
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match="the hub is out of reach .* and it is not in the local cache"):
        models.load_model("no-such-org/no-such-model", "target", "cpu")
    assert time.perf_counter() - t0 < 5
    models.hub_reachable.cache_clear() if hasattr(models.hub_reachable, "cache_clear") else None


def test_eval_dolly_bad_input(pair, capsys):
    code, out, err = cli(eval_dolly, ["--dataset_path", FIXTURE, "--modes", "ar,turbo"], capsys)
    assert code == 2 and err.strip() == ("error: unknown mode(s) turbo; choose from ar, google, deepmind, "
                                         "bass, tree, cascade, hf, hf_assisted, hf_prompt_lookup")
    code, out, err = cli(eval_dolly, ["--dataset_path", "/no/file.jsonl", "--target_model_name",
                                      pair["target"]], capsys)
    assert code == 2 and err.strip() == "error: dataset file not found: /no/file.jsonl"
    code, out, err = cli(eval_dolly, ["--dataset_path", FIXTURE, "--modes", "hf,hf_assisted", "--target_model_name",
                                      pair["target"], "--approx_model_name", pair["other_draft"]], capsys)
    assert code == 2 and err.startswith("error: the draft's tokenizer (280 tokens) differs") and "hf " not in out


def test_small_sweep_writes_csv_and_png(pair, capsys, tmp_path):
    out_dir = tmp_path / "sweep"
    argv = ["--dataset_path", FIXTURE, "--samples", "4", "--max_tokens", "4", "--modes",
            "ar,google,bass,hf_assisted", "--batch_sizes", "1,2", "--gammas", "2", "--temperatures", "0,1",
            "--repeats", "1", "--target_model_name", pair["target"], "--approx_model_name", pair["draft"],
            "--out", str(out_dir)]
    code, out, err = cli(run_experiment, argv, capsys)
    assert code == 0, err
    files = set(os.listdir(out_dir))
    assert {"raw.csv", "summary.csv", "table.md", "config.json", "env.json", "throughput_t0.png", "speedup_t1.png",
            "acceptance_by_gamma.png", "acceptance_by_category.png"} <= files
    assert not [f for f in files if f.endswith(".tmp")]
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(out_dir / "summary.csv").st_mode & 0o777 == 0o666 & ~umask   # not mkstemp's 0600
    raw = pd.read_csv(out_dir / "raw.csv")
    # ar at 2 batch sizes, bass at 2, google and hf_assisted at 1; two temperatures; 4 samples each
    assert len(raw) == (2 + 2 + 1 + 1) * 2 * 4
    for col in ("mode", "batch", "gamma", "temperature", "category", "prompt_tokens", "new_tokens",
                "wall_time_s", "target_calls", "accepted", "drafted"):
        assert col in raw.columns
    summary = pd.read_csv(out_dir / "summary.csv")
    spec = summary[summary["mode"].isin(["google", "bass"])]
    assert spec.predicted_speedup.notna().all() and (spec.efficiency.notna() | (spec.flagged != "")).all()
    assert {"1x2", "2x2"} <= set(json.load(open(out_dir / "env.json"))["cost"])
    assert "measured step costs (ms; " in out and "the median of 1 timed run(s)" in out
    # what a user reads: a table that fits 120 columns, each shown column defined under it, strict JSON
    assert max(len(ln) for ln in out.splitlines() if str(tmp_path) not in ln) <= 120, out
    header = next(ln for ln in out.splitlines() if ln.startswith("configuration "))
    assert header.split()[:4] == ["configuration", "batch", "T", "tok/s"] and "  speedup:" in out
    assert "more column(s) (" in out and "--wide prints them all" in out
    for name in ("config.json", "env.json"):
        json.loads((out_dir / name).read_text(), parse_constant=reject_constant)
    eval_raw = pd.read_csv(out_dir / "raw.csv")
    assert set(eval_raw[eval_raw["mode"] == "bass"].gamma) == {2}
    # --resume: nothing left to run, the rows stay as they were
    code, out, err = cli(run_experiment, argv + ["--resume"], capsys)
    assert code == 0 and "12 configurations, 12 already in" in out
    code, wide, err = cli(run_experiment, argv + ["--resume", "--wide"], capsys)
    assert code == 0 and max(map(len, wide.splitlines())) > 120 and "more column(s)" not in wide
    assert len(pd.read_csv(out_dir / "raw.csv")) == len(raw)
    # a file from before --finished_rows existed resumes too; only the new bass configurations run
    raw.drop(columns=["finished_rows"]).to_csv(out_dir / "raw.csv", index=False)
    code, out, err = cli(run_experiment, argv + ["--resume", "--finished_rows", "drop,mask"], capsys)
    assert code == 0 and "16 configurations, 12 already in" in out, err
    grown = pd.read_csv(out_dir / "raw.csv")
    assert len(grown) == len(raw) + 2 * 2 * 4        # bass masked at batch 1 and 2, two temperatures
    masked = grown[grown.finished_rows == "mask"]
    assert set(masked["mode"]) == {"bass"}
    greedy = grown[(grown.temperature == 0) & (grown["mode"] == "bass")].groupby("finished_rows")
    assert (greedy.get_group("mask").tokens.values == greedy.get_group("drop").tokens.values).all()
    assert "mask" in set(pd.read_csv(out_dir / "summary.csv").finished_rows)
    # what a user reads: the record's index, the decoded text, peak memory in env.json
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(pair["target"])
    text = pd.read_csv(out_dir / "raw.csv", keep_default_na=False)
    assert text.output.tolist() == [tok.decode([int(t) for t in str(ids).split()]).replace("\x00", "\ufffd")
                                    for ids in text.tokens]                 # NUL, which CSV cannot hold, as U+FFFD
    assert set(grown["sample"]) == {0, 1, 2, 3}
    assert "max_rss_mib" in json.load(open(out_dir / "env.json"))["peak_memory"]
    # resuming with a setting that changes the rows is refused, naming it; nothing is rewritten
    before = (out_dir / "config.json").read_text()
    for flag, value, name in (("--max_tokens", "5", "max_tokens"), ("--samples", "3", "samples"),
                              ("--seed", "9", "seed"), ("--top_k", "5", "top_k")):
        changed = list(argv)
        if flag in changed:
            changed[changed.index(flag) + 1] = value
        else:
            changed += [flag, value]
        code, out, err = cli(run_experiment, changed + ["--resume"], capsys)
        assert code == 2 and err.startswith(f"error: --resume: {name} is ") and len(err.splitlines()) == 1, err
    assert (out_dir / "config.json").read_text() == before
    # a rerun without --resume does not overwrite raw.csv unless told to
    code, out, err = cli(run_experiment, argv, capsys)
    assert code == 2 and "raw.csv exists; pass --resume" in err
    assert len(pd.read_csv(out_dir / "raw.csv")) == len(grown)


def test_sweep_together_interleaves_batch_sizes(pair, capsys, tmp_path, monkeypatch):
    """--together reaches run_grid (which interleaves the groups: test_run_grid_*), its rows are
    every batch size's, config.json keeps it, and a resume without it is refused."""
    seen = []

    def spy(*args, **kwargs):
        seen.append(kwargs.get("together"))
        yield from runner_run_grid(*args, **kwargs)
    from benchmark.runner import run_grid as runner_run_grid
    monkeypatch.setattr(run_experiment, "run_grid", spy)
    argv = ["--dataset_path", FIXTURE, "--samples", "2", "--max_tokens", "3", "--modes", "ar,bass", "--gammas", "2",
            "--batch_sizes", "1,2", "--repeats", "1", "--target_model_name", pair["target"],
            "--approx_model_name", pair["draft"], "--out", str(tmp_path / "t")]
    code, out, err = cli(run_experiment, argv + ["--together"], capsys)
    assert code == 0, err
    assert seen == [True] and "batch sizes too" in out
    raw = pd.read_csv(tmp_path / "t" / "raw.csv")
    assert sorted(set(zip(raw["mode"], raw.batch))) == [("ar", 1), ("ar", 2), ("bass", 1), ("bass", 2)]
    assert json.load(open(tmp_path / "t" / "config.json"))["together"] is True
    code, out, err = cli(run_experiment, argv + ["--resume"], capsys)
    assert code == 2 and err.startswith("error: --resume: together is True in ") and seen == [True], err


def test_interrupted_sweep_says_what_it_kept_and_lost(pair, capsys, tmp_path, monkeypatch):
    """Interrupted in its second group of three (batch sizes 1, 2, 4): raw.csv holds the first
    group, the message counts it, the group lost and the one not begun."""
    from benchmark import runner

    def interrupted(todo, *args, **kwargs):
        yield [dict(mode="ar", batch=1, sample=0)]
        raise KeyboardInterrupt
    monkeypatch.setattr(run_experiment, "run_grid", interrupted)
    code, out, err = cli(run_experiment, ["--dataset_path", FIXTURE, "--samples", "2", "--max_tokens", "2",
                                          "--modes", "ar", "--batch_sizes", "1,2,4", "--target_model_name",
                                          pair["target"], "--out", str(tmp_path / "s")], capsys)
    assert code == 130
    assert err.strip().splitlines()[-1] == (f"error: interrupted; {tmp_path / 's'}/raw.csv holds 1 of the sweep's 3 "
                                            f"configurations (0 from earlier runs, 1 from this one); the 1 being "
                                            f"measured were lost and 1 had not begun; to continue, run the same "
                                            f"command with --resume")
    assert len(pd.read_csv(tmp_path / "s" / "raw.csv")) == 1
    assert runner.run_grid is not interrupted
    grid = list(range(6))                 # --together: one unit, everything in it lost
    cfgs = [runner.RunConfig(mode="ar", batch=b, gamma=0, gamma_schedule="constant", temperature=0.0,
                             sort_batch=False, max_tokens=2) for b in (1, 2, 4)]
    note = run_experiment.interrupt_note(grid, cfgs, 0, True, "r.csv")
    assert "holds 3 of the sweep's 6 configurations (3 from earlier runs, 0 from this one); the 3 being measured " \
           "were lost and 0 had not begun" in note


def test_run_grid_interleaves_configurations_of_one_batching(monkeypatch):
    """Each configuration warms up on the group's first batch at its full budget, then the
    configurations take turns on every batch, and each keeps its median run."""
    from benchmark import runner
    calls, walls, made = [], [3.0, 1.0, 2.0], []          # the 3 repeats of a batch take 3 s, 1 s, 2 s

    def fake_runner(cfg, data):
        made.append(cfg)
        first = []

        def once(idx, bid):
            warm = not first
            first.append(1)
            calls.append("warm-up" if warm else (cfg.mode, cfg.batch, bid))
            wall = 0.0 if warm else walls[calls.count((cfg.mode, cfg.batch, bid)) - 1]
            rows = [dict(target_calls=1, accepted=0, drafted=0) for _ in idx]
            return [[7] for _ in idx], dict(wall_time_s=wall, ttft_s=0.0, rows=rows, peak_mem_mib=0.0)
        return once

    class Tok:
        def decode(self, ids):
            return "x" * len(ids)

    monkeypatch.setattr(runner, "_runner", fake_runner)
    cfg = dict(gamma=0, gamma_schedule="constant", temperature=0.0, sort_batch=False, max_tokens=5)
    cfgs = [runner.RunConfig(mode="ar", batch=2, **cfg), runner.RunConfig(mode="bass", batch=2, **cfg),
            runner.RunConfig(mode="ar", batch=1, **cfg)]
    data = runner.Prepared([[1, 2]] * 4, [dict(sample=i, category="x") for i in range(4)], None, None, Tok(),
                           None, "")
    groups = list(runner.run_grid(cfgs, data, repeats=3))
    assert [len(g) for g in groups] == [8, 4]             # batch 2 (ar and bass together), then batch 1
    assert calls[:2] == ["warm-up"] * 2 and calls[14] == "warm-up"
    for bid in (0, 1):                   # ar, bass / bass, ar / ar, bass: the order rotates per round
        assert calls[2 + 6 * bid:8 + 6 * bid] == [("ar", 2, bid), ("bass", 2, bid), ("bass", 2, bid),
                                                  ("ar", 2, bid), ("ar", 2, bid), ("bass", 2, bid)]
    assert calls[15:] == [("ar", 1, bid) for bid in range(4) for _ in range(3)]
    assert {r["wall_time_s"] for g in groups for r in g} == {2.0}     # the median of 3, 1, 2
    assert {r["output"] for g in groups for r in g} == {"x"}
    assert {r["round_walls"] for g in groups for r in g} == {"3 1 2"}
    calls.clear()                        # together: every group warms up, then round by round over all
    groups = list(runner.run_grid(cfgs, data, repeats=3, together=True))
    assert [len(g) for g in groups] == [8, 4] and calls[:3] == ["warm-up"] * 3
    b2 = [("ar", 2, 0), ("bass", 2, 0), ("ar", 2, 1), ("bass", 2, 1)]
    b2_turned = [("bass", 2, 0), ("ar", 2, 0), ("bass", 2, 1), ("ar", 2, 1)]
    b1 = [("ar", 1, bid) for bid in range(4)]
    assert calls[3:] == b2 + b1 + b1 + b2_turned + b2 + b1      # the groups' order and the turns rotate
    assert {r["wall_time_s"] for g in groups for r in g} == {2.0}


def test_out_of_range_figures_are_flagged_not_printed():
    from benchmark.metrics import flag_out_of_range
    df = pd.DataFrame(dict(verify_cost_v=[1.8, 0.7, 1.5], efficiency=[0.9, 0.8, 2.36],
                           efficiency_verify=[0.95, 1.1, 1.0], predicted_verify=[1.2, 1.3, 1.1]))
    out = flag_out_of_range(df)
    assert out.flagged.tolist() == ["", "verify cost v 0.70 < 1", "efficiency 2.36 outside (0, 1.25]"]
    assert out.efficiency.isna().tolist() == [False, False, True]
    assert out.efficiency_verify.isna().tolist() == [False, True, False]
    assert out.loc[0].equals(df.assign(flagged="").loc[0])


def test_hf_assisted_leaves_the_draft_config_alone():
    import torch
    from tiny import greedy_reference, noisy_copy, tiny_model

    from benchmark.runner import RunConfig
    from benchmark.runner_support import hf_generate
    target = tiny_model("llama", seed=71)
    draft = noisy_copy(target, 0.1, seed=72)
    before = draft.generation_config.to_dict()
    ids = torch.tensor([[5, 9, 3, 17]])
    cfg = RunConfig(mode="hf_assisted", batch=1, gamma=3, gamma_schedule="constant", temperature=0.0,
                    sort_batch=False, max_tokens=6)
    new, _ = hf_generate(target, ids, cfg, eos_token_id=None, pad_token_id=0, draft=draft)
    assert new == greedy_reference(target, ids, torch.ones_like(ids), 6)[0]
    assert draft.generation_config.to_dict() == before


def test_memory_probe_runs(capsys):
    from benchmark.studies import memory_probe
    code, out, err = cli(memory_probe, ["--vocab", "300", "--batch", "2", "--max_tokens", "6", "--draft_noise", "0"],
                         capsys)
    assert code == 0, err
    assert out.startswith("vocab 300, batch 2, 6 new tokens: peak RSS ") and "12 tokens, 3 target calls" in out
    code, out, err = cli(memory_probe, ["--batch", "0"], capsys)
    assert code == 2 and err.strip() == "error: --batch must be >= 1, got 0"


def test_tree_mode_in_eval_dolly_and_a_sweep(pair, capsys, tmp_path):
    common = ["--dataset_path", FIXTURE, "--samples", "4", "--max_tokens", "5", "--repeats", "1",
              "--target_model_name", pair["target"], "--approx_model_name", pair["draft"]]
    code, out, err = cli(eval_dolly, common + ["--modes", "ar,tree", "--tree", "2,2", "--temperature", "0",
                                               "--batch", "2"], capsys)
    assert code == 0, err
    assert "consistency: tree equals ar on 4/4 outputs" in out
    code, out, err = cli(run_experiment, common + ["--modes", "ar,tree", "--trees", "2,2;1,1,1", "--batch_sizes", "2",
                                                   "--out", str(tmp_path / "t")], capsys)
    assert code == 0, err
    raw = pd.read_csv(tmp_path / "t" / "raw.csv", keep_default_na=False)
    assert set(raw[raw["mode"] == "tree"].tree) == {"2,2", "1,1,1"}
    greedy = raw.groupby(["mode", "tree"]).tokens.apply(list)
    assert greedy[("tree", "2,2")] == greedy[("ar", "")] == greedy[("tree", "1,1,1")]
    code, out, err = cli(run_experiment, common + ["--modes", "tree", "--trees", "2,0", "--out", str(tmp_path / "u")],
                         capsys)
    assert code == 2 and "every branching factor >= 1" in err and len(err.splitlines()) == 1


def test_tree_cost_writes_csv_and_plot(pair, capsys, tmp_path):
    from benchmark.studies import tree_cost
    argv = ["--batch_sizes", "1,2", "--prefixes", "8", "--tokens", "2,3", "--reps", "1", "--target_model_name",
            pair["target"], "--out", str(tmp_path)]
    code, out, err = cli(tree_cost, argv, capsys)
    assert code == 0, err
    df = pd.read_csv(tmp_path / "tree_cost.csv")
    assert len(df) == 4 and {"tree_ms", "chain_ms", "paths_ms"} <= set(df.columns) and (df.tree_ms > 0).all()
    assert (tmp_path / "tree_cost.png").exists()
    code, out, err = cli(tree_cost, argv, capsys)
    assert code == 2 and "tree_cost.csv exists" in err


def _ordered_trees(n: int, depth: int):
    """Every ordered tree of n nodes at most depth deep, as its children's subtrees (brute force)."""
    if n == 0:
        yield ()
        return
    if depth == 0:
        return
    for s in range(1, n + 1):                   # the first child's subtree has s nodes
        for first in _ordered_trees(s - 1, depth - 1):
            for rest in _ordered_trees(n - s, depth):
                yield (first,) + rest


def test_best_trees_beat_every_tree_of_their_size():
    from benchmark.studies.tree_fit import best_trees, expected_accepted
    from sampling.tree_shapes import TreeShape
    r = [0.55, 0.2, 0.1, 0.05]

    def paths(kids, prefix=()):
        return [p for rank, sub in enumerate(kids) for p in [prefix + (rank,)] + paths(sub, prefix + (rank,))]

    best = best_trees(r, range(1, 7), 3)
    for n in range(1, 7):
        brute = max(expected_accepted(TreeShape.of_paths(paths(t), t), r) for t in _ordered_trees(n, 3))
        value, shape = best[n]
        assert shape.n == n and shape.depth <= 3
        assert value == pytest.approx(brute) == pytest.approx(expected_accepted(shape, r))
    chain = TreeShape.parse("1,1,1")
    assert expected_accepted(chain, r) == pytest.approx(0.55 + 0.55 ** 2 + 0.55 ** 3)
    assert expected_accepted(TreeShape.parse("2,1"), r) == pytest.approx(0.55 + 0.2 + 0.55 * 0.55 + 0.2 * 0.55)


def test_sampled_ranks_match_the_exact_first_acceptance():
    """The simulated rule accepts the first draw with probability sum min(p, q) (exact), and the
    greedy rank counts where the target's argmax sits in the draft's order."""
    import torch

    from benchmark.studies.tree_fit import greedy_ranks, sampled_ranks
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(3, 12, generator=g) * 2, -1)
    q = torch.softmax(torch.randn(3, 12, generator=g) * 2, -1)
    counts = sampled_ranks(p, q, 4, 4000, torch.Generator().manual_seed(1))
    assert counts[0].item() == pytest.approx(torch.minimum(p, q).sum().item(), abs=0.05)
    assert counts.sum().item() <= 3 + 1e-6
    q_rank = (q > q.gather(1, p.argmax(-1, keepdim=True))).sum(-1)
    assert greedy_ranks(p, q, 12).tolist() == torch.bincount(q_rank, minlength=12).float().tolist()


def test_tree_fit_writes_its_tables(pair, capsys, tmp_path):
    from benchmark.studies import tree_fit
    argv = ["--dataset_path", FIXTURE, "--samples", "2", "--max_tokens", "4", "--repeats", "1", "--ranks", "4",
            "--trials", "4", "--sizes", "2,3", "--max_depth", "3", "--shapes", "1,1;2,1;dynamic:4",
            "--target_model_name", pair["target"], "--approx_model_name", pair["draft"], "--out", str(tmp_path)]
    code, out, err = cli(tree_fit, argv, capsys)
    assert code == 0, err
    fit = pd.read_csv(tmp_path / "fit.csv")
    assert sorted(set(fit.n)) == [2, 3] and set(fit.temperature) == {0.0, 1.0}
    assert (fit.tokens_per_call >= 1).all() and (fit.predicted_speedup > 0).all()
    assert set(pd.read_csv(tmp_path / "expected.csv").tree) == {"1,1", "2,1"}     # dynamic trees: no formula
    assert pd.read_csv(tmp_path / "costs.csv").tokens.tolist() == [1, 2, 3, 4, 5]    # up to 2,1's 4 nodes + 1
    assert "dynamic:4:4:4 changes every step" in out
    code, out, err = cli(tree_fit, argv, capsys)
    assert code == 2 and "fit.csv exists" in err


def test_summary_pairs_the_speedup_round_by_round():
    """speedup_min_round / _max_round: a configuration's tokens over its batches' summed wall time in
    each round, over ar's in the same round (the median runs' ratio beside them); nan for rows
    recorded before round_walls was."""
    base = dict(draft="", batch=1, gamma=0, gamma_schedule="constant", temperature=0.0, sort_batch=False,
                finished_rows="drop", max_tokens=4, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0, seed=0,
                tree="", kv_cache="dynamic", compile=False, press="", category="x", prompt_tokens=3, ttft_s=0.1,
                target_calls=4, accepted=0, drafted=0, padding_fraction=0.0, prompt_padding=0.0, rows_verified=1,
                mean_gamma=0.0, process=0, new_tokens=4)
    walls = {("ar", 0): "1 1 2", ("ar", 1): "1 1 2", ("google", 0): "0.5 1 1", ("google", 1): "0.5 2 1"}
    raw = pd.DataFrame([dict(base, mode=m, sample=b, batch_id=b, wall_time_s=sorted(map(float, w.split()))[1],
                             round_walls=w) for (m, b), w in walls.items()])
    s = summarise(raw).set_index("mode")
    # rounds: ar 8 tokens in 2, 2, 4 s; google in 1, 3, 2 s -> 2x, 0.67x, 2x
    assert s.loc["google", "speedup_min_round"] == pytest.approx(2 / 3)
    assert s.loc["google", "speedup_max_round"] == pytest.approx(2.0)
    assert s.loc["ar", "speedup_min_round"] == s.loc["ar", "speedup_max_round"] == 1.0
    assert s.loc["google", "speedup_vs_ar"] == 1.0          # the median runs: 1 + 1 s against 1 + 1 s
    old = summarise(raw.drop(columns=["round_walls"]))
    assert old.speedup_min_round.isna().all() and old.speedup_vs_ar.notna().all()


def test_decode_phase_counts_the_tokens_after_the_first_hand_out():
    """decode_throughput: the tokens after each batch's first hand-out over the time after it. A
    speculative loop hands out its first step's accepted drafts with its first token (``ttft_tokens``);
    files without the column expect a row's mean tokens per verify there (AR: one)."""
    base = dict(draft="", batch=2, gamma=0, gamma_schedule="constant", temperature=0.0, sort_batch=False,
                finished_rows="drop", max_tokens=9, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0, seed=0,
                tree="", kv_cache="dynamic", compile=False, press="", category="x", prompt_tokens=3,
                target_calls=4, accepted=0, drafted=0, padding_fraction=0.0, prompt_padding=0.0, rows_verified=1,
                mean_gamma=0.0, process=0, new_tokens=9, batch_id=0, wall_time_s=2.0, round_walls="2")
    raw = pd.DataFrame([dict(base, mode="ar", sample=0, ttft_s=0.2, ttft_tokens=2),
                        dict(base, mode="ar", sample=1, ttft_s=0.2, ttft_tokens=2),
                        dict(base, mode="google", sample=0, ttft_s=0.5, ttft_tokens=8),
                        dict(base, mode="google", sample=1, ttft_s=0.5, ttft_tokens=8)])
    s = summarise(raw).set_index("mode")
    assert s.loc["ar", "decode_throughput"] == pytest.approx(16 / 1.8)
    assert s.loc["google", "decode_throughput"] == pytest.approx(10 / 1.5)     # 18 tokens, 8 of them at TTFT
    old = summarise(raw.drop(columns=["ttft_tokens"])).set_index("mode")      # a file from before the column
    assert old.loc["google", "decode_throughput"] == pytest.approx((18 - 2 * 9 / 3) / 1.5)   # 9 tokens, 3 verifies
    assert old.loc["ar", "decode_throughput"] == pytest.approx(16 / 1.8)


def test_stats_count_the_tokens_of_the_first_hand_out():
    """ttft_tokens: one per row for AR (the prefill's), the first step's accepted drafts + 1 per row
    for a speculative loop (the draft is the target: all gamma accepted), summed over batches."""
    from sampling import generate, generate_many
    target = tiny_model("llama", seed=3)
    ids, mask = left_padded_batch(97, (4, 6, 3), seed=4)
    assert generate(target, ids, mask, mode="ar", max_new_tokens=8, temperature=0).stats["ttft_tokens"] == 3
    for mode in ("bass", "google"):                                         # google: the first row's
        st = generate(target, ids, mask, draft_model=target, mode=mode, gamma=3, max_new_tokens=8,
                      temperature=0).stats
        assert st["ttft_tokens"] == (4 if mode == "google" else 3 * 4), mode        # gamma + 1 per row
    res, per_batch = generate_many(target, [[5, 6, 7], [8, 9], [10]], batch_size=2, pad_id=0, mode="ar",
                                   max_new_tokens=4, temperature=0)
    assert res.stats["ttft_tokens"] == 3 and [s["ttft_tokens"] for s in per_batch] == [2, 1]


def test_pass_cost_measures_each_dtype_and_thread_count(pair, capsys, tmp_path):
    from benchmark import pass_cost
    out = tmp_path / "pc"
    code, text, err = cli(pass_cost, ["--target_model_name", pair["target"], "--approx_model_name", pair["draft"],
                                      "--rounds", "2", "--reps", "2", "--threads", "1", "--drafts", "lean,lean+one-row",
                                      "--out", str(out)], capsys)
    assert code == 0, err
    s = pd.read_csv(out / "summary.csv")
    # a bfloat16 draft has no one-row copies: that variant would repeat the lean one
    assert list(zip(s["dtype"], s.threads, s["draft"])) == [("float32", 1, "lean"), ("float32", 1, "lean+one-row"),
                                                            ("bfloat16", 1, "lean")]
    assert (s.target_step_ms > 0).all() and (s.draft_step_ms > 0).all() and (s.verify_ms > 0).all()
    assert len(pd.read_csv(out / "raw.csv")) == 2 * 3
    json.loads((out / "env.json").read_text(), parse_constant=reject_constant)
    assert max(len(ln) for ln in text.splitlines() if str(tmp_path) not in ln) <= 120
    for bad, message in ((["--dtypes", "float8"], "--dtypes takes a comma list of float32, bfloat16"),
                         (["--threads", "0"], "--threads takes a comma list of integers >= 1"),
                         (["--drafts", "lean,fast"], "--drafts takes a comma list of transformers, "),
                         (["--dtype", "float32"], "--dtype float32: this tool measures each dtype of --dtypes")):
        code, _, err = cli(pass_cost, ["--out", str(tmp_path / "x")] + bad, capsys)
        assert code == 2 and err.startswith(f"error: {message}"), err


def test_auto_dtype_is_bfloat16_only_where_the_cpu_has_it(monkeypatch):
    import torch

    from sampling.app import models
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert models.resolve_dtype("auto", cpu) is torch.float32            # conftest: no native bfloat16
    monkeypatch.setattr(models, "native_bf16", lambda: True)
    assert models.resolve_dtype("auto", cpu) is torch.bfloat16
    assert models.resolve_dtype("auto", cuda) is torch.float16
    assert models.resolve_dtype("float32", cpu) is torch.float32


def test_older_raw_files_read_as_what_they_ran():
    """A raw.csv from before the controller ran every speculative step at full length ("always"; modes
    without drafts ""), and a compile column read back as text holds RunConfig's values again."""
    from benchmark.metrics import upgrade_raw
    raw = upgrade_raw(pd.DataFrame(dict(mode=["ar", "google", "tree", "hf"], compile=["False", "draft", "True", "0"])))
    assert raw.speculate.tolist() == ["", "always", "always", ""]
    assert raw["compile"].tolist() == [False, "draft", True, False]


def test_a_baseline_dtype_times_ar_beside_the_sweep(pair, capsys, tmp_path):
    """--baseline_dtype: AR with the target in another dtype, interleaved with the sweep at each batch
    size; every configuration's tokens/s over it in summary.csv and the console. Its AR is not the
    sweep's own (speedup_vs_ar stays against AR in the sweep's dtype). A dtype the sweep runs in
    already, or a sweep without ar, is refused."""
    common = ["--dataset_path", FIXTURE, "--samples", "2", "--max_tokens", "4", "--repeats", "1", "--dtype", "float32",
              "--target_model_name", pair["target"], "--approx_model_name", pair["draft"], "--batch_sizes", "1,2"]
    code, out, err = cli(run_experiment, common + ["--modes", "ar,google,bass", "--baseline_dtype", "bfloat16",
                                                   "--out", str(tmp_path / "b")], capsys)
    assert code == 0, err
    raw = pd.read_csv(tmp_path / "b" / "raw.csv", keep_default_na=False)
    assert sorted(set(zip(raw["mode"], raw["dtype"], raw["batch"]))) == [
        ("ar", "", 1), ("ar", "", 2), ("ar", "bfloat16", 1), ("ar", "bfloat16", 2), ("bass", "", 1), ("bass", "", 2),
        ("google", "", 1)]
    s = pd.read_csv(tmp_path / "b" / "summary.csv", keep_default_na=False)
    base = s[s["dtype"] == "bfloat16"].set_index("batch")
    assert (base.speedup_vs_baseline == 1.0).all()
    ar = s[(s["mode"] == "ar") & (s["dtype"] == "")].set_index("batch")
    assert (ar.speedup_vs_ar == 1.0).all()
    assert ar.speedup_vs_baseline.to_list() == pytest.approx((ar.throughput / base.throughput).to_list())
    assert "vs baseline" in out and "ar bfloat16" in out
    table = (tmp_path / "b" / "table.md").read_text()
    assert "| ar bfloat16 | 1 |" in table and "speedup vs the baseline dtype's ar" in table
    own = ar.loc[1, "throughput"] if ar.index.is_unique else None
    assert own is not None and f"(baseline: ar at batch 1, {own:.1f} tokens/s" in table   # the sweep's own dtype's
    from benchmark.analyzer import replot
    assert replot(str(tmp_path / "b"))                               # an empty dtype reads back as the sweep's
    for extra, words in ((["--modes", "ar", "--baseline_dtype", "float32"], "is the sweep's own dtype"),
                         (["--modes", "google", "--baseline_dtype", "bfloat16"], "add ar to --modes")):
        code, out, err = cli(run_experiment, common + extra + ["--out", str(tmp_path / "x")], capsys)
        assert code == 2 and words in err and len(err.splitlines()) == 1, err
