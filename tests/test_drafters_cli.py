"""Picking the drafter by flag: main.py, eval_dolly.py, run_experiment (with the hf_prompt_lookup
peer), heads_report and profile_step on a tiny saved pair with saved speculator heads."""
import json
import os

import pandas as pd
import pytest
import torch
from test_benchmark import FIXTURE, cli
from tiny import save_tiny_pair
from transformers import AutoModelForCausalLM

import eval_dolly
import main as main_py
from benchmark import profile_step, run_experiment
from benchmark.studies import heads_report
from sampling import DEFAULTS, new_speculator
from sampling.drafters.heads import save_speculator
from sampling.tree_shapes import parse_tree


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    folder = tmp_path_factory.mktemp("drafters")
    paths = save_tiny_pair(folder, positions=512)
    target = AutoModelForCausalLM.from_pretrained(paths["target"], dtype=torch.float32)
    for kind in ("mlp", "medusa"):
        spec = new_speculator(target, kind, n_heads=3, seed=1, noise=0.05)
        save_speculator(spec.heads, str(folder / kind))
        paths[kind] = str(folder / kind)
    return paths


def test_main_with_each_drafter(pair, capsys):
    common = ["--input", "Hello there", "--target_model_name", pair["target"], "--approx_model_name", pair["draft"],
              "--max_tokens", "6", "--temperature", "0", "--json"]
    outs = {}
    for draft, extra in (("model", []), ("ngram", []), ("mlp", ["--speculator", pair["mlp"]]),
                         ("medusa", ["--speculator", pair["medusa"]])):
        code, out, err = cli(main_py, common + ["--draft", draft, "--mode", "bass"] + extra, capsys)
        assert code == 0, err
        outs[draft] = out.split('"tokens": ')[1].split("]]")[0]
    assert len(set(outs.values())) == 1                      # greedy: the same tokens whatever drafts
    code, out, err = cli(main_py, common + ["--draft", "mlp", "--speculator", pair["medusa"]], capsys)
    assert code == 2 and err.strip() == f"error: --speculator {pair['medusa']} holds medusa heads, not mlp"
    code, out, err = cli(main_py, common + ["--draft", "mlp", "--speculator", pair["target"]], capsys)
    assert code == 2 and "has no config.json and model.safetensors" not in err and "is not a speculator's" in err
    code, out, err = cli(main_py, common + ["--draft", "mlp", "--speculator", "/nonexistent/heads"], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and "has no config.json and model.safetensors" in err


def test_sweep_with_drafters_and_the_prompt_lookup_peer(pair, capsys, tmp_path):
    common = ["--dataset_path", FIXTURE, "--samples", "3", "--max_tokens", "5", "--repeats", "1",
              "--target_model_name", pair["target"], "--approx_model_name", pair["draft"]]
    code, out, err = cli(eval_dolly, common + ["--modes", "ar,google,tree", "--draft", "mlp", "--speculator",
                                               pair["mlp"], "--temperature", "0", "--batch", "2"], capsys)
    assert code == 0, err
    assert "consistency: google equals ar on 3/3" in out and "consistency: tree equals ar on 3/3" in out
    code, out, err = cli(run_experiment, common + ["--modes", "ar,google,tree,hf_prompt_lookup",
                                                   "--draft", "model,ngram", "--batch_sizes", "1", "--gammas", "3",
                                                   "--out", str(tmp_path / "s")],
                         capsys)
    assert code == 0, err
    raw = pd.read_csv(tmp_path / "s" / "raw.csv", keep_default_na=False)
    runs = set(zip(raw["mode"], raw["draft"]))
    assert runs == {("ar", ""), ("google", "model"), ("google", "ngram"), ("tree", "model"), ("hf_prompt_lookup", "")}
    greedy = raw.groupby(["mode", "draft"]).tokens.apply(list)
    assert all(v == greedy[("ar", "")] for v in greedy)
    code, out, err = cli(run_experiment, common + ["--modes", "tree", "--draft", "mlp", "--speculator", pair["mlp"],
                                                   "--batch_sizes", "1", "--out", str(tmp_path / "t")], capsys)
    assert code == 0, err                                    # raw.csv names the tree the heads ran (their default)
    heads = json.load(open(os.path.join(pair["mlp"], "config.json")))["n_heads"]
    expected = str(parse_tree(DEFAULTS.heads_tree).truncated(heads))
    assert set(pd.read_csv(tmp_path / "t" / "raw.csv", keep_default_na=False).tree) == {expected}
    old = pd.read_csv(tmp_path / "t" / "raw.csv", keep_default_na=False).assign(tree="")   # before trees were named
    old.to_csv(tmp_path / "t" / "raw.csv", index=False)
    code, out, err = cli(run_experiment, common + ["--modes", "tree", "--draft", "mlp", "--speculator", pair["mlp"],
                                                   "--batch_sizes", "1", "--out", str(tmp_path / "t"), "--resume"],
                         capsys)
    assert code == 0, err
    assert "1 configurations, 1 already in" in out                                # known as done: not run again
    assert len(pd.read_csv(tmp_path / "t" / "raw.csv", keep_default_na=False)) == len(old)
    code, out, err = cli(heads_report, ["--runs", str(tmp_path / "s"), "--out", str(tmp_path / "h"), "--draft",
                                        "model,ngram", "--reps", "2", "--target_model_name", pair["target"],
                                        "--approx_model_name", pair["draft"]], capsys)
    assert code == 0, err
    tab = pd.read_csv(tmp_path / "h" / "table.csv")
    assert set(tab.draft) == {"-", "model", "ngram"} and (tab.r1.dropna() <= 1).all()
    assert os.path.exists(tmp_path / "h" / "speedup_t0.png")
    code, out, err = cli(profile_step, ["--dataset_path", FIXTURE, "--samples", "2", "--max_tokens", "4", "--draft",
                                        "ngram", "--target_model_name", pair["target"], "--temperature", "0",
                                        "--both_caches", "--out", str(tmp_path / "p.txt")], capsys)
    assert code == 0, err
    text = open(tmp_path / "p.txt").read()
    assert text.count("| target verify pass |") == 2 and "--kv_cache dynamic" in text and "--kv_cache static" in text
    rest = [float(ln.split("|")[2]) for ln in text.splitlines() if ln.startswith("| the loop's own work")]
    assert len(rest) == 2 and min(rest) >= 0                   # the phases do not overlap
