"""main.py: output, JSON, --compare, and one-line errors for bad input."""
import json
import os
import subprocess
import sys

import pytest
import torch
from tiny import save_tiny_pair

import main as main_cli
from sampling.app.cli import run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pair")
    paths = save_tiny_pair(folder)
    paths["bad_draft"] = save_tiny_pair(folder / "other", other_draft_tokenizer=True)["draft"]
    paths["padded_draft"] = save_tiny_pair(folder / "padded", draft_extra_rows=13)["draft"]
    return paths


def call(argv, capsys):
    """Run main.py in-process through the same error wrapper as the script; (code, out, err)."""
    code = 0
    try:
        run(lambda: main_cli.main(argv))
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def models(pair, draft="draft"):
    return ["--target_model_name", pair["target"], "--approx_model_name", pair[draft]]


def test_json_output_and_modes(pair, capsys):
    outs = {}
    for finished in ("drop", "mask"):
        code, out, err = call(["--input", "The quick brown fox", "--input", "Hi", "--max_tokens", "6", "--json",
                               "--temperature", "0", "--mode", "bass", "--batch", "3", "--finished_rows", finished]
                              + models(pair), capsys)
        assert code == 0, err
        res = outs[finished] = json.loads(out)
        assert len(res["outputs"]) == 3 and all(len(t) <= 6 for t in res["tokens"])
        assert res["stats"]["new_tokens"] == sum(map(len, res["tokens"]))
    assert outs["drop"]["tokens"] == outs["mask"]["tokens"]


def test_compare_table(pair, capsys):
    code, out, err = call(["--input", "The quick brown fox", "--max_tokens", "5", "--compare",
                           "--temperature", "0"] + models(pair), capsys)
    assert code == 0, err
    lines = out.strip().splitlines()
    assert lines[0] == "each mode: the median of 3 timed run(s) after one warm-up run, modes interleaved"
    assert "  rounds: lowest-highest of the same ratio within one round" in out
    assert max(map(len, lines)) <= 120
    assert "--compare runs: 100%" in err and "20/20" in err                # progress on stderr: (3 + 1) x 5 runs
    lines = [ln for ln in lines[1:7]]
    assert lines[0].split()[:4] == ["mode", "tok/s", "speedup", "rounds"]
    texts = {line.split()[0]: line.split("  ")[-1] for line in lines[1:]}
    assert set(texts) == {"ar", "google", "deepmind", "bass", "tree"}
    assert len(set(texts.values())) == 1               # greedy: every mode writes the same text
    spreads = {line.split()[0]: [float(x) for x in line.split()[3].split("-")] for line in lines[1:]}
    assert spreads["ar"] == [1.0, 1.0] and all(lo <= hi for lo, hi in spreads.values())


def test_compare_json_has_each_rounds_speedup(pair, capsys):
    code, out, err = call(["--input", "Hi", "--max_tokens", "4", "--compare", "--json", "--repeats", "2",
                           "--temperature", "0"] + models(pair), capsys)
    assert code == 0, err
    runs = json.loads(out)
    assert runs["ar"]["round_speedups"] == [1.0, 1.0]
    assert all(len(r["round_speedups"]) == 2 and min(r["round_speedups"]) > 0 for r in runs.values())


BAD = {
    "empty prompt": (["--input", "  "], "empty prompt"),
    "gamma 0": (["--gamma", "0"], "gamma must be >= 1, got 0"),
    "negative temperature": (["--temperature", "-0.5"], "temperature must be a finite number >= 0"),
    "top_p 0": (["--top_p", "0"], "top_p must be in (0, 1], got 0.0"),
    "top_p above 1": (["--top_p", "1.2"], "top_p must be in (0, 1], got 1.2"),
    "negative top_k": (["--top_k", "-3"], "top_k must be >= 0"),
    "batch 0": (["--batch", "0"], "--batch must be >= 1, got 0"),
    "unknown mode": (["--mode", "fast"], "invalid choice: 'fast'"),
    "unknown finished_rows": (["--finished_rows", "keep"], "invalid choice: 'keep'"),
    "missing model": (["--target_model_name", "./no/such/model"], "target model path does not exist: ./no/such/model"),
    "too long": (["--input", "fox " * 200], "exceeds the target model's maximum of 64 positions"),
    "tokenizer mismatch": (["--approx_model_name", "BAD"], "the draft's tokenizer (280 tokens) differs from the "
                                                           "target's (300 tokens)"),
    "infinite temperature": (["--temperature", "inf"],
                             "temperature must be a finite number >= 0 (0 is greedy), got inf"),
    "min_p 1": (["--min_p", "1"], "min_p must be in [0, 1) (0 switches it off), got 1.0"),
    "repetition_penalty 0": (["--repetition_penalty", "0"], "repetition_penalty must be a finite number > 0"),
    "repeats 0": (["--repeats", "0"], "--repeats must be >= 1, got 0"),
    "unknown speculate": (["--speculate", "never"], "invalid choice: 'never' (choose from 'auto', 'always')"),
    "unknown compile": (["--compile", "target"], "invalid choice: 'target' (choose from 'all', 'draft')"),
    "compile all without static": (["--compile"], "compile needs the static kv cache"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_one_line_error(pair, capsys, case):
    extra, message = BAD[case]
    argv = ["--input", "fox", "--max_tokens", "4"] + models(pair)
    argv += [pair["bad_draft"] if a == "BAD" else a for a in extra]
    code, out, err = call(argv, capsys)
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
    assert "Traceback" not in err


def test_no_arguments_print_the_usage(capsys):
    code, out, err = call([], capsys)
    assert code == 2 and out == ""
    assert err.startswith("usage: ") and err.strip().splitlines()[-1] == (
        "error: give at least one --input (python main.py -h lists every flag)")


def test_a_bad_request_is_refused_before_anything_is_echoed(pair, capsys):
    """One prompt streams (the prompt is printed first): a prompt too long is refused before that."""
    code, out, err = call(["--input", "fox " * 2000, "--max_tokens", "4"] + models(pair), capsys)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: prompt of ") \
        and err.strip().endswith("new tokens exceeds the target model's maximum of 64 positions")


def test_script_error_has_no_traceback(pair):
    proc = subprocess.run([sys.executable, "main.py", "--input", "fox", "--gamma", "-2"] + models(pair),
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: gamma must be >= 1, got -2"


def test_padded_embeddings_with_one_tokenizer_run_and_equal_ar(pair, capsys):
    """Real pairs share a tokenizer but pad their embeddings differently: both are restricted to it."""
    outs = {}
    for mode in ("ar", "bass", "google"):
        code, out, err = call(["--input", "The quick brown fox", "--input", "Hi", "--max_tokens", "6", "--json",
                               "--temperature", "0", "--mode", mode] + models(pair, "padded_draft"), capsys)
        assert code == 0, err
        outs[mode] = json.loads(out)["tokens"]
    assert outs["bass"] == outs["ar"] == outs["google"]


def test_streamed_text_and_verbose_stats(pair, capsys):
    argv = ["--input", "The quick brown fox", "--max_tokens", "8", "--temperature", "0"] + models(pair)
    code, out, err = call(argv + ["--json"], capsys)
    assert code == 0, err
    res = json.loads(out)
    assert "accepted_hist" in res["stats"] and len(res["stats"]["rows"]) == 1
    code, out, err = call(argv + ["-v"], capsys)                 # batch 1: the text is streamed
    assert code == 0, err
    assert out.rstrip("\n") == "The quick brown fox" + res["outputs"][0]
    assert "accepted_hist: [" in err and "rows: [{" in err


def test_help_shows_every_default(capsys):
    with pytest.raises(SystemExit):
        main_cli.parse(["-h"])
    out = " ".join(capsys.readouterr().out.split())
    from sampling import DEFAULTS
    for text in ("--max_tokens MAX_TOKENS new tokens per prompt (default: 20)",
                 "decoding mode (default: the fastest measured on the embedded pair at the temperature asked: "
                 f"{DEFAULTS.main_mode} greedy with the draft model ({DEFAULTS.main_mode_bfloat16} in bfloat16), "
                 f"{DEFAULTS.main_chain_mode} otherwise)",
                 "(default 4 for constant, 7 for bass/aimd)", "--repeats REPEATS", "(default: 3)"):
        assert text in out, text


def test_defaults_live_in_one_place():
    """main.py, eval_dolly, run_experiment and generate() all take their defaults from DEFAULTS."""
    import inspect

    import eval_dolly
    from benchmark import run_experiment
    from sampling import DEFAULTS, generate
    from sampling.generate import default_main_mode
    sig = inspect.signature(generate).parameters
    assert sig["mode"].default == DEFAULTS.mode
    sampled = main_cli.parse(["--input", "x"]).mode
    assert sampled == default_main_mode(DEFAULTS.temperature) == DEFAULTS.main_chain_mode
    assert main_cli.parse(["--input", "x", "--temperature", "0", "--dtype", "float32"]).mode == DEFAULTS.main_mode
    greedy_bf16 = main_cli.parse(["--input", "x", "--temperature", "0", "--dtype", "bfloat16"]).mode
    assert greedy_bf16 == default_main_mode(0, "model", torch.bfloat16) == DEFAULTS.main_mode_bfloat16
    for draft in ("ngram", "mlp", "medusa"):                  # chains: n-gram drafts no tree; heads' trees lose
        assert main_cli.parse(["--input", "x", "--temperature", "0", "--draft", draft]).mode == DEFAULTS.main_chain_mode
    for name, flag in (("max_new_tokens", "max_tokens"), ("top_k", "top_k"), ("top_p", "top_p"),
                       ("min_p", "min_p"), ("repetition_penalty", "repetition_penalty")):
        assert sig[name].default == getattr(DEFAULTS, name)
        for tool in (main_cli.parse(["--input", "x"]), eval_dolly.parse([]),
                     run_experiment.parse(["--out", "/nonexistent/x"])):
            assert getattr(tool, flag) == getattr(DEFAULTS, name), (tool, flag)
    assert eval_dolly.parse([]).gamma == DEFAULTS.gamma                    # constant schedule: 4, not 7
    assert eval_dolly.parse(["--gamma_schedule", "aimd"]).gamma == DEFAULTS.gamma_init


def test_clock_waits_for_the_device(monkeypatch):
    """Timings read the clock only after the device's queued work is done."""
    import torch

    from sampling.utils import now
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(device))
    now(torch.device("cuda", 0))
    now(torch.device("cpu"))
    assert calls == [torch.device("cuda", 0)]


def test_round_speedups_pair_the_runs_of_one_round(monkeypatch):
    """Each round's speedup is that round's run over ar's run of the same round, in round order."""
    from types import SimpleNamespace
    pace = {"ar": iter([50, 100, 100, 80]), "google": iter([10, 200, 300, 80])}     # warm-up round first

    def fake(target, ids, mode, **kw):
        tps = next(pace[mode])
        return SimpleNamespace(stats=dict(tokens_per_s=tps, wall_time_s=1 / tps), tokens=[[1]]), None
    monkeypatch.setattr(main_cli, "generate_many", fake)
    runs, rounds = main_cli.timed_runs(None, ["ar", "google"], None, {}, {"ar": None, "google": None}, 3)
    assert rounds == {"ar": [1.0, 1.0, 1.0], "google": [2.0, 3.0, 1.0]}
    assert runs["google"].stats["tokens_per_s"] == 200                  # the median run by wall time
