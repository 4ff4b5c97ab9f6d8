"""The static KV cache (preallocated, addressed by position) gives the dynamic cache's tokens in
every mode, rolls back without copying, grows when a generation outruns it, and keeps the target's
law; ``compile`` (torch.compile over the static cache's fixed shapes) gives the same tokens."""
import pytest
import torch
from test_distribution import ALPHA, CASES, joint_pvalue, peaked_models
from tiny import ARCHS, greedy_reference, left_padded_batch, noisy_copy, tiny_model

from sampling import generate
from sampling.cache.spec import CacheSpec
from sampling.kvcache_model import KVCacheModel
from sampling.params import SamplingParams

LENGTHS = (5, 9, 3, 7)
RUNS = {                      # name: (mode, tree, finished_rows)
    "ar": ("ar", None, "drop"), "google": ("google", None, "drop"), "deepmind": ("deepmind", None, "drop"),
    "bass": ("bass", None, "drop"), "bass-mask": ("bass", None, "mask"), "tree": ("tree", "3,2,1", "drop"),
    "tree-dynamic": ("tree", "dynamic:6:3:2", "mask"),
}


@pytest.fixture(scope="module", params=ARCHS)
def arch_case(request):
    """Rows that meet the EOS at different steps, so rows finish early (dropped or masked)."""
    target = tiny_model(request.param, seed=31)
    ids, mask = left_padded_batch(97, LENGTHS, seed=32)
    eos = greedy_reference(target, ids, mask, 12)[1][3]
    return request.param, target, noisy_copy(target, 0.1, seed=33), ids, mask, eos, \
        greedy_reference(target, ids, mask, 12, eos_token_id=eos)


@pytest.mark.parametrize("run", RUNS)
def test_static_cache_greedy_equals_greedy(arch_case, run):
    arch, target, draft, ids, mask, eos, ref = arch_case
    mode, tree, finished = RUNS[run]
    if mode == "tree" and arch == "bloom":
        pytest.skip("trees need a 4D attention mask, which BLOOM does not take")
    res = generate(target, ids, mask, draft_model=draft, mode=mode, tree=tree, finished_rows=finished,
                   max_new_tokens=12, gamma=4, temperature=0, eos_token_id=eos, kv_cache="static")
    assert res.tokens == ref, f"{arch}/{run}"
    assert any(len(r) < 12 for r in ref) and any(len(r) == 12 for r in ref)   # rows ended apart
    if mode != "ar":
        assert 0 < res.stats["accepted"] < res.stats["drafted"]


@pytest.mark.parametrize("run", ("google", "bass-mask", "tree-dynamic"))
def test_static_cache_samples_the_dynamic_caches_tokens(run):
    """Same seed, same draws: the two caches feed the rule the same laws."""
    mode, tree, finished = RUNS[run]
    target = tiny_model("llama", seed=41)
    ids, mask = left_padded_batch(97, LENGTHS, seed=42)
    kw = dict(draft_model=noisy_copy(target, 0.3, seed=43), mode=mode, tree=tree, finished_rows=finished,
              max_new_tokens=16, gamma=3, temperature=0.9, top_p=0.95, seed=5)
    dyn = generate(target, ids, mask, kv_cache="dynamic", **kw)
    sta = generate(target, ids, mask, kv_cache="static", **kw)
    assert sta.tokens == dyn.tokens
    assert sta.stats["accepted"] == dyn.stats["accepted"] < dyn.stats["drafted"]


def test_rollback_moves_the_write_position_and_copies_nothing():
    target = tiny_model("llama", seed=51)
    ids, mask = left_padded_batch(97, (4, 6), seed=52)
    kv, ref = (KVCacheModel(target, SamplingParams(temperature=1.0), cache=CacheSpec(k, room=8))
               for k in ("static", "dynamic"))
    kv.prefill(ids, mask)
    ref.prefill(ids, mask)
    buffer = kv.cache.layers[0].keys.data_ptr()
    new = torch.randint(3, 97, (2, 3), generator=torch.Generator().manual_seed(53))
    seq, m = torch.cat([ids, new], 1), torch.cat([mask, torch.ones_like(new)], 1)
    kv.catch_up(seq, m)
    kv.rollback(ids.shape[1] + 1)                              # two of the three rejected
    assert kv.filled == ids.shape[1] + 1 == int(kv.cache.layers[0].get_seq_length())
    other = torch.randint(3, 97, (2, 2), generator=torch.Generator().manual_seed(54))
    seq2 = torch.cat([seq[:, :ids.shape[1] + 1], other], 1)
    m2 = torch.ones_like(seq2)
    m2[:, :ids.shape[1]] = mask
    got = kv.catch_up(seq2, m2)
    ref.catch_up(seq2[:, :ids.shape[1] + 1], m2[:, :ids.shape[1] + 1])
    torch.testing.assert_close(got, ref.catch_up(seq2, m2))     # as if the rejected ones never were
    assert kv.cache.layers[0].keys.data_ptr() == buffer        # written in place


def test_static_cache_grows_past_its_room():
    """A cache given no room grows (one copy) and gives the same laws as the dynamic one."""
    target = tiny_model("gpt2", seed=61)
    ids = torch.randint(3, 97, (1, 60), generator=torch.Generator().manual_seed(62))
    kv, ref = (KVCacheModel(target, SamplingParams(temperature=1.0), cache=CacheSpec(k, room=0))
               for k in ("static", "dynamic"))
    kv.prefill(ids, torch.ones_like(ids))
    ref.prefill(ids, torch.ones_like(ids))
    width = kv.cache.layers[0].max_cache_len
    seq = torch.cat([ids, torch.randint(3, 97, (1, 10), generator=torch.Generator().manual_seed(63))], 1)
    for t in range(61, 71):
        ones = torch.ones(1, t)
        torch.testing.assert_close(kv.catch_up(seq[:, :t], ones), ref.catch_up(seq[:, :t], ones))
    assert width == 64 < kv.cache.layers[0].max_cache_len


def test_static_layers_are_views_of_one_buffer():
    """The eager static cache keeps every layer's keys and values in one buffer (a tree's accepted
    path moves into place with one gather for all of them); layers of different shapes are refused
    with a one-line error rather than written into a buffer of the wrong shape."""
    from sampling.cache.backends import SlotCache
    target = tiny_model("llama", seed=51)
    ids, mask = left_padded_batch(97, (4, 6), seed=52)
    kv = KVCacheModel(target, SamplingParams(temperature=1.0), cache=CacheSpec("static", room=8))
    kv.prefill(ids, mask)
    buf = kv.cache.kv                                          # [layers, 2, B, H, W, D]
    assert isinstance(kv.cache, SlotCache) and kv.kv_tensors() == [buf]
    assert all(layer.keys.data_ptr() == buf[i, 0].data_ptr() and layer.values.data_ptr() == buf[i, 1].data_ptr()
               for i, layer in enumerate(kv.cache.layers))
    kv.select_rows(torch.tensor([1]))
    assert kv.cache.kv.shape[2] == 1 and kv.cache.layers[-1].keys.data_ptr() == kv.cache.kv[-1, 0].data_ptr()
    cache = SlotCache(2, 64)
    cache.update(torch.zeros(1, 4, 3, 8), torch.zeros(1, 4, 3, 8), 0)
    with pytest.raises(ValueError, match="layer 1 has .* use kv_cache='dynamic'"):
        cache.update(torch.zeros(1, 2, 3, 8), torch.zeros(1, 2, 3, 8), 1)


@pytest.mark.parametrize("run", ("bass", "tree", "tree-dynamic"))
def test_a_model_split_over_gpus_keeps_its_static_slots_per_layer(run, monkeypatch):
    """A model whose layers run on several devices (accelerate's device map over GPUs) keeps one
    buffer per layer, where the layer runs, not one for all: the same greedy tokens through the
    per-layer path (emulated on the CPU by the map alone; offloading to the CPU or disk is one
    device)."""
    from sampling.cache.backends import SlotCache
    from sampling.utils import spans_devices
    target = tiny_model("llama", seed=31)
    ids, mask = left_padded_batch(97, LENGTHS, seed=32)
    eos = greedy_reference(target, ids, mask, 12)[1][3]
    ref, draft = greedy_reference(target, ids, mask, 12, eos_token_id=eos), noisy_copy(target, 0.1, seed=33)
    assert not spans_devices(target)
    monkeypatch.setattr(target, "hf_device_map", {"model.embed_tokens": "cpu", "model.layers.0": 0,
                                                  "model.layers.1": 1, "lm_head": "disk"}, raising=False)
    assert spans_devices(target)
    from sampling import control
    # the map is emulated: its passes cannot be timed
    flat = control.CostTable((1,), (control.CostCurve((1,), (1.0,)),))
    monkeypatch.setattr(control, "pass_costs", lambda model, cache: flat)
    made = []
    init = SlotCache.__init__
    monkeypatch.setattr(SlotCache, "__init__", lambda self, *a: made.append(1) or init(self, *a))
    mode, tree, finished = RUNS[run]
    res = generate(target, ids, mask, draft_model=draft, mode=mode, tree=tree, finished_rows=finished,
                   max_new_tokens=12, gamma=4, temperature=0, eos_token_id=eos, kv_cache="static")
    assert res.tokens == ref
    assert len(made) == 1                                      # the draft's (unsplit) cache only


@pytest.mark.parametrize("mode", ("google", "bass-mask", "tree"))
def test_static_cache_keeps_the_target_law(mode):
    mode, tree, finished = RUNS[mode]
    V, K = 5, 3
    params = CASES["t0.7-topk3"]
    target, draft = peaked_models(11, 12)
    prompt = [1, 3, 0, 4]
    N = 2500
    res = generate(target, torch.tensor([prompt] * N), draft_model=draft, mode=mode, tree=tree and "2,1",
                   finished_rows=finished, max_new_tokens=K, gamma=2, temperature=params.temperature,
                   top_k=params.top_k, seed=9, kv_cache="static")
    pval = joint_pvalue(res.tokens, target, prompt, params, K, V)
    assert 0.05 < res.stats["acceptance_rate"] < 0.95 and pval > ALPHA, (res.stats["acceptance_rate"], pval)


@pytest.mark.parametrize("kw, msg", [(dict(kv_cache="paged"), "unknown kv cache 'paged'"),
                                     (dict(compile=True), "compile needs the static kv cache"),
                                     (dict(compile="draft"), "compile='draft' compiles a draft model's passes; mode "
                                                             "'ar' has no draft")])
def test_bad_cache_settings_are_one_line_errors(kw, msg):
    target = tiny_model("llama")
    with pytest.raises(ValueError, match=msg):
        generate(target, torch.tensor([[3, 4]]), max_new_tokens=2, mode="ar", **kw)


def test_compiled_static_cache_equals_greedy():
    """torch.compile over the static cache's decode passes (inductor on the CPU, CUDA graphs on a
    GPU): the same tokens. Compiling takes a while, so one small case."""
    target = tiny_model("llama", seed=71, layers=1, dim=16)
    ids = torch.randint(3, 97, (1, 6), generator=torch.Generator().manual_seed(72))
    ref = greedy_reference(target, ids, torch.ones_like(ids), 6)
    for mode in ("ar", "google"):
        res = generate(target, ids, draft_model=noisy_copy(target, 0.1, seed=73), mode=mode, max_new_tokens=6,
                       gamma=2, temperature=0, kv_cache="static", compile=True)
        assert res.tokens == ref, mode


def test_compiled_passes_with_speculator_heads_equal_greedy():
    """Heads read the target's hidden state through a hook on its lm_head, which runs inside the
    compiled pass: chains and trees of heads give AR's tokens under compilation too, and draft what
    they draft eagerly (the same acceptance), also after a model of the same class without the hook
    was compiled (torch reused that graph, without the hook, until its hook guards were switched on)."""
    from sampling import new_speculator
    other = tiny_model("llama", seed=75, layers=1, dim=16)
    ids = torch.randint(3, 97, (1, 6), generator=torch.Generator().manual_seed(77))
    for mode in ("google", "tree"):                               # the heads' shapes: gamma 2, a 4,2 tree
        generate(other, ids, draft_model=noisy_copy(other, 0.1, seed=74), mode=mode, gamma=2, tree="4,2",
                 max_new_tokens=8, temperature=0, kv_cache="static", compile=True)
    target = tiny_model("llama", seed=76, layers=1, dim=16)
    ref = greedy_reference(target, ids, torch.ones_like(ids), 8)
    for kind in ("mlp", "medusa"):
        heads = new_speculator(target, kind, 2, seed=78)
        for mode in ("google", "tree"):
            kw = dict(draft_model=heads, mode=mode, max_new_tokens=8, temperature=0, kv_cache="static")
            res, eager = generate(target, ids, compile=True, **kw), generate(target, ids, **kw)
            assert res.tokens == ref, (kind, mode)
            assert res.stats["accepted_hist"] == eager.stats["accepted_hist"], (kind, mode)



def test_compiled_passes_compile_once_per_shape():
    """A graph per shape (tokens per pass, cache width), not per step: a sequence's slice has a new
    stride every step, which made the compiler recompile every pass until its limit (then it ran
    eager). Prompts of different lengths in one width share every graph."""
    from torch._dynamo.utils import counters
    target = tiny_model("llama", seed=74, layers=1, dim=16)
    draft = noisy_copy(target, 0.1, seed=75)
    graphs = []
    for n, length in ((12, 5), (12, 9), (12, 7)):                 # widths: 5 + 13 + 12 + 1 slots -> 64 each
        ids = torch.randint(3, 97, (1, length), generator=torch.Generator().manual_seed(length))
        generate(target, ids, draft_model=draft, mode="google", max_new_tokens=n, gamma=2, temperature=0,
                 kv_cache="static", compile=True)
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[2] == graphs[1] and graphs[1] - graphs[0] <= 1, graphs   # new tokens-per-pass shapes at most


def test_compile_draft_gives_the_draft_a_compiled_static_cache_of_its_own():
    spec = CacheSpec("dynamic", compile="draft")
    spec.validate()
    assert spec.for_role("draft") == CacheSpec("static", compile=True, lean=False)
    assert spec.for_role("target") == CacheSpec("dynamic", lean=False)
    assert CacheSpec("static", compile=True).for_role("draft") == CacheSpec("static", compile=True, lean=False)
    assert CacheSpec().for_role("draft") == CacheSpec(lean=True)          # eager drafts: lean passes
    assert spec.for_role("draft").for_role("target") == spec.for_role("draft")   # resolved once
    with pytest.raises(ValueError, match="compile must be False, True or 'draft', got 'target'"):
        CacheSpec(compile="target").validate()


def test_a_compiled_pass_run_as_its_bucket_equals_an_eager_pass():
    """A decode pass of 3 tokens runs as one of 4 (the extra token after them, its slot freed after):
    the same laws as an eager pass, and the next pass starts after the 3."""
    target = tiny_model("llama", seed=83, layers=1, dim=16)
    gen = torch.Generator().manual_seed(84)
    prompt = torch.randint(3, 97, (2, 7), generator=gen)
    parts = [KVCacheModel(target, SamplingParams(temperature=1.0), cache=CacheSpec("static", compile=c, room=16))
             for c in (False, True)]
    seq = torch.cat([prompt, torch.randint(3, 97, (2, 3), generator=gen)], 1)
    for kv in parts:
        kv.prefill(prompt, torch.ones_like(prompt))
        kv.catch_up(seq, torch.ones_like(seq))
    torch.testing.assert_close(parts[1].probs, parts[0].probs, atol=1e-5, rtol=1e-4)
    assert parts[0].filled == parts[1].filled == 10
    seq = torch.cat([seq, torch.randint(3, 97, (2, 1), generator=gen)], 1)
    for kv in parts:
        kv.catch_up(seq, torch.ones_like(seq))
    torch.testing.assert_close(parts[1].probs, parts[0].probs, atol=1e-5, rtol=1e-4)


def test_compiled_draft_beside_a_dynamic_target_equals_greedy():
    """compile="draft": the draft's passes compiled on a static cache of its own, the target's eager
    on the dynamic cache. A chain, and a dynamic tree whose levels of 3 nodes run as passes of 4
    (an additive mask padded), give AR's tokens."""
    target = tiny_model("llama", seed=85, layers=1, dim=16)
    draft = noisy_copy(target, 0.1, seed=86)
    ids = torch.randint(3, 97, (1, 6), generator=torch.Generator().manual_seed(87))
    ref = greedy_reference(target, ids, torch.ones_like(ids), 8)
    for mode, extra in (("google", dict(gamma=3)), ("tree", dict(tree="dynamic:6:3:3"))):
        res = generate(target, ids, draft_model=draft, mode=mode, max_new_tokens=8, temperature=0, compile="draft",
                       **extra)
        assert res.tokens == ref, mode
