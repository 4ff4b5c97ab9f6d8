"""accelerate: sweeps and evaluations sharded over processes (``accelerate launch``, gloo on the
CPU), and targets split over devices by ``--device_map`` / ``--max_memory`` (here: the CPU and the
disk, the two devices this machine has)."""
import json
import os
import subprocess
import sys

import pandas as pd
import pytest
import torch
from test_benchmark import cli
from tiny import save_tiny_pair

import main as main_py
from benchmark.load_test import free_port
from benchmark.metrics import process_throughput, summarise
from benchmark.shard import Shard
from sampling import generate, pad_left
from sampling.app.models import Placement, load_model, save_int8
from sampling.utils import model_device

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(REPO, "tests", "fixtures", "dolly-fixture.jsonl")
MODES = ("ar", "google", "deepmind", "bass", "tree")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return save_tiny_pair(tmp_path_factory.mktemp("pair"), positions=512)


# every step drafts what the schedule says: the controller's pass costs are keyed by the thread
# count, which differs under accelerate, so its choices (and a sampled row's draws) could differ
FIXED = ["--device", "cpu", "--dtype", "float32", "--speculate", "always"]


def launch(n: int, args: list[str]) -> subprocess.CompletedProcess:
    """``accelerate launch`` of n CPU processes (torchrun under it; the tools pick gloo for --device cpu)."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(n),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port())] + args + FIXED
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)


def plain(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable] + args + FIXED, cwd=REPO, capture_output=True, text=True, timeout=300)


SAME = ["mode", "batch", "sample", "batch_id", "seed", "prompt_tokens", "new_tokens", "tokens", "accepted", "drafted"]


def same_rows(one: pd.DataFrame, two: pd.DataFrame) -> None:
    """The same rows, in the same order, measured by one process or by two (each row says which)."""
    assert list(one.columns) == list(two.columns) and len(one) == len(two)
    pd.testing.assert_frame_equal(one[SAME].reset_index(drop=True), two[SAME].reset_index(drop=True))
    assert set(one.process) == {0} and set(two.process) == {0, 1}


def test_two_processes_of_eval_dolly_give_the_rows_of_one(pair, tmp_path):
    """Same prompts, batches, seeds and tokens (sampled ones too: each batch keeps its seed), one
    header, no duplicate or missing row; the throughput table per process and in total."""
    args = ["eval_dolly.py", "--dataset_path", FIXTURE, "--samples", "7", "--max_tokens", "5", "--modes",
            "ar,google,bass,tree", "--tree", "2,1", "--batch", "2", "--temperature", "1", "--repeats", "1",
            "--target_model_name", pair["target"], "--approx_model_name", pair["draft"]]
    one = plain(args + ["--seed", "3", "--out", str(tmp_path / "one")])
    assert one.returncode == 0, one.stderr
    two = launch(2, args + ["--out", str(tmp_path / "two")] + ["--seed", "3"])
    assert two.returncode == 0, two.stderr[-3000:]
    same_rows(pd.read_csv(tmp_path / "one" / "raw.csv"), pd.read_csv(tmp_path / "two" / "raw.csv"))
    assert "2 process(es)" in two.stdout and "tokens/s per process and in total" in two.stdout
    assert two.stdout.count("consistency:") == 0 and two.stdout.count("wrote ") == 1   # the main process writes
    procs = pd.read_csv(tmp_path / "two" / "processes.csv")
    assert sorted(set(procs.process)) == [0, 1] and len(procs) == 8


def test_two_processes_of_a_sweep_give_the_rows_of_one_and_resume(pair, tmp_path):
    args = ["-m", "benchmark.run_experiment", "--dataset_path", FIXTURE, "--samples", "6", "--max_tokens", "4",
            "--modes", "ar,google,bass", "--batch_sizes", "1,2", "--gammas", "2", "--temperatures", "0",
            "--repeats", "1", "--target_model_name", pair["target"], "--approx_model_name", pair["draft"]]
    one = plain(args + ["--out", str(tmp_path / "one")])
    assert one.returncode == 0, one.stderr
    two = launch(2, args + ["--out", str(tmp_path / "two")])
    assert two.returncode == 0, two.stderr[-3000:]
    same_rows(pd.read_csv(tmp_path / "one" / "raw.csv"), pd.read_csv(tmp_path / "two" / "raw.csv"))
    assert "sweep wall time" in two.stdout and json.load(open(tmp_path / "two" / "env.json"))["processes"] == 2
    summary = pd.read_csv(tmp_path / "two" / "summary.csv")
    assert (summary.processes == 2).all() and (summary.throughput_total > summary.throughput).all()
    # --resume with two processes: only the new temperature runs, the old rows stay
    more = launch(2, args[:-6] + ["--temperatures", "0,1", "--repeats", "1", "--target_model_name", pair["target"],
                                  "--approx_model_name", pair["draft"], "--out", str(tmp_path / "two"), "--resume"])
    assert more.returncode == 0, more.stderr[-3000:]
    assert "10 configurations, 5 already in" in more.stdout
    raw = pd.read_csv(tmp_path / "two" / "raw.csv")
    assert len(raw) == 2 * len(pd.read_csv(tmp_path / "one" / "raw.csv"))
    assert not raw.duplicated(["mode", "batch", "temperature", "sample"]).any()


def test_shard_deals_batches_round_robin_and_throughput_adds_up():
    assert Shard(1, 3).mine(list(range(8))) == [1, 4, 7] and Shard().mine([1, 2]) == [1, 2]
    base = dict(mode="ar", draft="", batch=1, gamma=0, gamma_schedule="constant", temperature=0.0, sort_batch=False,
                finished_rows="drop", max_tokens=4, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0, seed=0,
                tree="", kv_cache="dynamic", compile=False, press="", sample=0, category="x", prompt_tokens=3,
                ttft_s=0.1, target_calls=4, accepted=0, drafted=0, padding_fraction=0.0, prompt_padding=0.0,
                rows_verified=1, mean_gamma=0.0)
    raw = pd.DataFrame([dict(base, process=p, batch_id=b, new_tokens=4, wall_time_s=w)
                        for p, b, w in ((0, 0, 1.0), (1, 1, 2.0), (0, 2, 1.0))])
    procs = process_throughput(raw)
    assert procs.throughput.tolist() == [4.0, 2.0]                       # 8 tokens in 2 s, 4 in 2 s
    s = summarise(raw)
    assert s.processes.iloc[0] == 2 and s.throughput_total.iloc[0] == 6.0 and s.throughput.iloc[0] == 3.0


SPLIT = Placement("sequential", "cpu=100KB")   # the CPU holds the embeddings, the layers go to the disk


@pytest.mark.parametrize("storage", ("float", "int8"))
def test_split_target_and_draft_equal_the_whole_models_in_every_mode(pair, storage, tmp_path):
    """Greedy tokens of every mode, both caches, with target and draft split by --max_memory over the
    CPU and the disk (accelerate's hooks load each offloaded layer for its pass), equal to the
    models in one piece. int8: the embedded pair's storage, placed by dispatch_model."""
    paths = dict(pair)
    if storage == "int8":
        for role in ("target", "draft"):
            save_int8(load_model(pair[role], role, "cpu", "float32"), str(tmp_path / role))
            paths[role] = str(tmp_path / role)
    whole = [load_model(paths[r], r, "cpu", "float32") for r in ("target", "draft")]
    parts = [load_model(paths[r], r, "cpu", "float32", SPLIT) for r in ("target", "draft")]
    for m in parts:
        assert set(m.hf_device_map.values()) == {"cpu", "disk"}, m.hf_device_map
        assert model_device(m) == torch.device("cpu")
    ids, mask = pad_left([[5, 6, 7, 8, 9, 10], [3, 4]], 0)
    for mode in MODES:
        for kv in ("dynamic", "static"):
            kw = dict(mode=mode, max_new_tokens=10, temperature=0, kv_cache=kv, tree="2,1" if mode == "tree" else None)
            want = generate(whole[0], ids, mask, draft_model=whole[1], **kw).tokens
            got = generate(parts[0], ids, mask, draft_model=parts[1], **kw).tokens
            assert got == want, (mode, kv)


def test_main_with_a_split_target_and_bad_placements(pair, capsys, tmp_path):
    common = ["--input", "Pack my box", "--max_tokens", "8", "--temperature", "0", "--json", "--mode", "bass",
              "--target_model_name", pair["target"], "--approx_model_name", pair["draft"], "--device", "cpu"]
    code, whole, err = cli(main_py, common, capsys)
    assert code == 0, err
    code, parts, err = cli(main_py, common + ["--device_map", "sequential", "--max_memory", "cpu=100KB",
                                              "--offload_folder", str(tmp_path / "off")], capsys)
    assert code == 0, err
    assert json.loads(parts)["tokens"] == json.loads(whole)["tokens"]
    for extra, msg in ((["--device_map", "auto", "--max_memory", "cpu"], "give device=size items"),
                       (["--device_map", "auto", "--max_memory", "cpu=lots"], "size 'lots' of cpu is not a positive"),
                       (["--max_memory", "cpu=1GB"], "give --device_map too"),
                       (["--device_map", "auto", "--kv_cache", "static", "--compile"], "--compile with --device_map")):
        code, out, err = cli(main_py, common + extra, capsys)
        assert code == 2 and err.startswith("error: ") and msg in err and err.count("\n") == 1, (extra, err)
