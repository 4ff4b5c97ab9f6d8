"""The embedded default pair loads offline, and greedy speculative output equals greedy AR."""
import os
import subprocess
import sys

import pytest

from sampling import DEFAULTS, generate, load_speculator, pad_left
from sampling.app.models import DEFAULT_TARGET, is_int8_folder, load_model, load_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["The quick brown fox",
           "### Instruction:\nExplain what a Python list is.\n\n### Response:\n",
           "To install a package on Debian, run",
           "The function returns"]


@pytest.fixture(scope="module")
def pair():
    assert is_int8_folder(DEFAULT_TARGET), "the embedded target (int8) is missing from models/"
    tok = load_tokenizer(None)
    # float32, where the greedy equality is exact (--dtype auto picks bfloat16 on a CPU with it natively)
    return load_model(None, "target", "cpu", "float32"), load_model(None, "draft", "cpu", "float32"), tok


def test_pair_shares_a_vocabulary_and_loads_as_float32(pair):
    target, draft, tok = pair
    assert target.config.vocab_size == draft.config.vocab_size == len(tok)
    assert next(target.parameters()).dtype == next(draft.parameters()).dtype
    assert str(next(target.parameters()).dtype) == "torch.float32"


@pytest.mark.parametrize("mode", ("google", "deepmind", "bass"))
def test_greedy_speculative_equals_greedy_ar(pair, mode):
    target, draft, tok = pair
    ids, mask = pad_left([tok(p)["input_ids"] for p in PROMPTS], tok.pad_token_id)
    kw = dict(max_new_tokens=24, temperature=0, eos_token_id=tok.eos_token_id)
    ar = generate(target, ids, mask, mode="ar", **kw)
    spec = generate(target, ids, mask, draft_model=draft, mode=mode, gamma=4, **kw)
    assert spec.tokens == ar.tokens
    assert spec.stats["acceptance_rate"] > 0.3          # a trained, distilled draft agrees often


def test_main_runs_offline_on_the_default_pair(pair):
    """The quick start's command, greedy: it streams exactly the text greedy AR writes in-process."""
    target, _, tok = pair
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    prompt = "The quick brown fox"
    proc = subprocess.run([sys.executable, "main.py", "--input", prompt, "--max_tokens", "12", "--temperature", "0",
                           "--dtype", "float32"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    ids, mask = pad_left([tok(prompt)["input_ids"]], tok.pad_token_id)
    ar = generate(target, ids, mask, mode="ar", max_new_tokens=12, temperature=0, eos_token_id=tok.eos_token_id)
    assert proc.stdout.rstrip("\n") == prompt + tok.decode(ar.tokens[0])
    assert f"[{DEFAULTS.main_mode}] " in proc.stderr                  # float32: the chain


@pytest.mark.parametrize("kind", ("mlp", "medusa"))
def test_embedded_speculator_heads(pair, kind):
    """models/speculator loads for the embedded target, writes greedy AR's tokens, and accepts drafts."""
    target, _, tok = pair
    spec = load_speculator(os.path.join(ROOT, "models", "speculator", kind), target)
    ids, mask = pad_left([tok(p)["input_ids"] for p in PROMPTS], tok.pad_token_id)
    kw = dict(max_new_tokens=16, temperature=0, eos_token_id=tok.eos_token_id)
    ar = generate(target, ids, mask, mode="ar", **kw)
    res = generate(target, ids, mask, draft_model=spec, mode="bass", **kw)
    assert res.tokens == ar.tokens and res.stats["accepted"] > 0


@pytest.mark.parametrize("tree", ("3,2,1", "dynamic:12"))
def test_second_draft_and_trees_on_the_embedded_target(pair, tree):
    """models/draft_small shares the target's tokenizer; trees with it write greedy AR's tokens."""
    target, _, tok = pair
    small = load_model(os.path.join(ROOT, "models", "draft_small"), "draft", "cpu")
    assert small.config.vocab_size == target.config.vocab_size and small.config.num_hidden_layers == 1
    assert load_tokenizer(os.path.join(ROOT, "models", "draft_small"), "draft").get_vocab() == tok.get_vocab()
    ids, mask = pad_left([tok(p)["input_ids"] for p in PROMPTS], tok.pad_token_id)
    kw = dict(max_new_tokens=16, temperature=0, eos_token_id=tok.eos_token_id)
    ar = generate(target, ids, mask, mode="ar", **kw)
    spec = generate(target, ids, mask, draft_model=small, mode="tree", tree=tree, **kw)
    assert spec.tokens == ar.tokens and spec.stats["accepted"] > 0


@pytest.mark.parametrize("argv,msg", ((["--stage", "x"], "choose 'pair' or 'draft'"),
                                      (["--stage", "draft"], "needs a trained target")))
def test_training_stage_is_checked_first(tmp_path, capsys, argv, msg):
    from training.train_default_pair import main
    with pytest.raises(SystemExit) as e:
        main(argv + ["--out", str(tmp_path)])
    assert e.value.code == 2 and msg in capsys.readouterr().err
