"""main.py: output, JSON, --compare, and one-line errors for bad input."""
import json
import os
import subprocess
import sys

import pytest

import main as main_cli
from sampling.cli import run
from tiny import save_tiny_pair

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pair")
    paths = save_tiny_pair(folder)
    paths["bad_draft"] = save_tiny_pair(folder / "other", draft_vocab=111)["draft"]
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
    assert lines[0].split()[:3] == ["mode", "tokens/s", "speedup"]
    texts = {line.split()[0]: line.split("  ")[-1] for line in lines[1:]}
    assert set(texts) == {"ar", "google", "deepmind", "bass"}
    assert len(set(texts.values())) == 1               # greedy: every mode writes the same text


BAD = {
    "empty prompt": (["--input", "  "], "empty prompt"),
    "gamma 0": (["--gamma", "0"], "gamma must be >= 1, got 0"),
    "negative temperature": (["--temperature", "-0.5"], "temperature must be >= 0"),
    "top_p 0": (["--top_p", "0"], "top_p must be in (0, 1], got 0.0"),
    "top_p above 1": (["--top_p", "1.2"], "top_p must be in (0, 1], got 1.2"),
    "negative top_k": (["--top_k", "-3"], "top_k must be >= 0"),
    "batch 0": (["--batch", "0"], "--batch must be >= 1, got 0"),
    "unknown mode": (["--mode", "fast"], "invalid choice: 'fast'"),
    "unknown finished_rows": (["--finished_rows", "keep"], "invalid choice: 'keep'"),
    "missing model": (["--target_model_name", "./no/such/model"], "target model path does not exist: ./no/such/model"),
    "too long": (["--input", "fox " * 200], "exceeds the target model's maximum of 64 positions"),
    "vocab mismatch": (["--approx_model_name", "BAD"], "draft vocabulary (111 tokens) differs"),
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


def test_script_error_has_no_traceback(pair):
    proc = subprocess.run([sys.executable, "main.py", "--input", "fox", "--gamma", "-2"] + models(pair),
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: gamma must be >= 1, got -2"
