"""Every mode on a second device type: CUDA where there is one, and everywhere a virtual device that
catches host/device mixing on the CPU (the crash AR once had on CUDA when a row finished early) and
counts the points where a GPU's host would wait for the device."""
import pytest
import torch
from tiny import greedy_reference, left_padded_batch, noisy_copy, tiny_model

from benchmark.virtual_device import DeviceMismatch, VirtualDevice
from sampling import generate, new_speculator
from sampling import tree_shapes as tree_module
from sampling.drafters.ngram import NgramDrafter

MODES = ("ar", "google", "deepmind", "bass", "bass-mask", "tree", "cascade")
CACHES = ("dynamic", "static")
LENGTHS = (3, 9, 5, 7)


def case(mode):
    """A batch where rows meet the EOS at different steps, so finished rows leave (or stay masked)."""
    target = tiny_model("llama", seed=81)
    draft = noisy_copy(target, 0.1, seed=82)
    if mode == "cascade":
        draft = [noisy_copy(draft, 0.2, seed=84), draft]
    ids, mask = left_padded_batch(97, LENGTHS, seed=83)
    free = greedy_reference(target, ids, mask, 12)
    eos = free[1][2]
    return target, draft, ids, mask, eos, greedy_reference(target, ids, mask, 12, eos_token_id=eos)


def run(mode, target, draft, ids, mask, eos, **kw):
    if mode == "cascade":                                    # draft: [smallest, ..., largest]
        return generate(target, ids, mask, draft_model=draft, mode="cascade", max_new_tokens=12, gamma=3,
                        eos_token_id=eos, **kw)
    mode, finished = ("bass", "mask") if mode == "bass-mask" else (mode, "drop")
    return generate(target, ids, mask, draft_model=draft, mode=mode, max_new_tokens=12, gamma=3,
                    eos_token_id=eos, finished_rows=finished, **kw)


@pytest.mark.parametrize("kv", CACHES)
@pytest.mark.parametrize("mode", MODES)
def test_virtual_device_catches_no_host_device_mixing(mode, kv):
    target, draft, ids, mask, eos, ref = case(mode)
    assert sum(len(r) < 12 for r in ref) >= 1 and sum(len(r) == 12 for r in ref) >= 1   # rows end apart
    with VirtualDevice(target, *(draft if mode == "cascade" else [draft])) as vd:
        greedy = run(mode, target, draft, ids, mask, eos, temperature=0, kv_cache=kv)
        sampled = run(mode, target, draft, ids, mask, eos, temperature=0.9, top_k=20, top_p=0.9, min_p=0.05,
                      repetition_penalty=1.2, seed=3, kv_cache=kv)
    assert vd.ops > 300                                       # it saw the loops' tensor work
    assert greedy.tokens == ref
    assert all(len(t) >= 1 for t in sampled.tokens)


# host-device synchronisations per decode step: the read of what the step accepted (the one that
# decides; a greedy tree's walk reads the target's argmaxes and the tree, with the dynamic drafter's
# fed slots, and decides on the host, all in one transfer; a sampled walk runs on the device and
# reads its result, with the fed slots of its path), and
# where the host needs more of the device's values: a cascade's level decides its own acceptance
# (the n-gram drafter looks up the accepted tokens the loop has read already: Accepted.taken)
SYNCS_PER_STEP = {"ar": 1, "google": 1, "deepmind": 1, "bass": 1, "bass-mask": 1, "bass static": 1, "tree": 1,
                  "dynamic tree": 1, "cascade": 2, "ngram": 1, "tree sampled": 1, "dynamic tree sampled": 1,
                  "bass sampled": 1, "bass heads": 1, "tree heads": 1, "bass heads sampled": 1}


@pytest.mark.parametrize("mode", SYNCS_PER_STEP)
def test_a_decode_step_makes_the_host_wait_once(mode):
    """Two generations of 12 and 24 tokens that differ only in their number of steps (the draft is the
    target: every draft is accepted, the rows finish together; the n-gram drafter's rows too, here):
    each extra step costs exactly the
    syncs listed, so nothing else in a step reads the device (a boolean-mask index, a host list copied
    to the device without pinned memory, an early exit on ``.any()``). Tree shapes are made afresh
    inside the virtual device, so that their host tensors are known as such (a shape's index tensors
    copied to the device every step made 8 syncs a step of the heads' chain on an H200)."""
    target = tiny_model("llama", seed=81)
    ids, mask = left_padded_batch(97, (5, 9, 7), seed=83)
    kw = dict(gamma=3, temperature=0, mode=mode.split()[0], draft_model=target)
    heads = new_speculator(target, "mlp", n_heads=3, seed=1, noise=0.05) if "heads" in mode else None
    kw.update({"bass-mask": dict(mode="bass", finished_rows="mask"), "bass static": dict(kv_cache="static"),
               "tree": dict(tree="2,1,1"), "dynamic tree": dict(mode="tree", tree="dynamic:6:3:2"),
               "tree sampled": dict(tree="2,1,1", temperature=1.0, seed=0),
               "dynamic tree sampled": dict(mode="tree", tree="dynamic:6:3:2", temperature=1.0, seed=0),
               "bass sampled": dict(temperature=1.0, seed=0),
               "cascade": dict(draft_model=[target, target]),
               "ngram": dict(mode="bass", draft_model=NgramDrafter()),
               "bass heads": dict(draft_model=heads), "tree heads": dict(draft_model=heads, tree="2,2,1"),
               "bass heads sampled": dict(mode="bass", draft_model=heads, temperature=1.0, seed=0)}.get(mode, {}))
    counts = []
    for n in (12, 24):
        generate(target, ids, mask, max_new_tokens=n, **kw)                   # warm-up
        tree_module._shape.cache_clear()                                      # shapes made inside, below
        with VirtualDevice(target) as vd:
            out = generate(target, ids, mask, max_new_tokens=n, **kw)
        counts.append((len(vd.syncs), out.stats["target_calls"], vd.syncs))
    (s12, c12, _), (s24, c24, syncs) = counts
    assert c24 > c12
    assert s24 - s12 == SYNCS_PER_STEP[mode] * (c24 - c12), syncs


@pytest.mark.parametrize("tree", ("2,2,1", "paths:0,1,2,0.0,0.1,1.0", "dynamic:8:3:3"))
@pytest.mark.parametrize("noise", (0.05, 0.5))
def test_sampled_walk_draws_alike_on_a_device_and_on_the_cpu(tree, noise):
    """The sampled tree walk runs its loops to their bounds on a device (the host reads nothing)
    and stops early on the CPU (where reading costs nothing): the same seeded tokens either way,
    with rows that accept different depths and rows cut at their own depth (seeds per row). A
    close draft (some rows accept a whole path) and a far one (most steps reject a sibling)."""
    target = tiny_model("llama", seed=81)
    draft = noisy_copy(target, noise, seed=82)
    ids, mask = left_padded_batch(97, LENGTHS, seed=83)
    kw = dict(draft_model=draft, mode="tree", tree=tree, temperature=1.0)
    for seeds in (dict(seed=5, max_new_tokens=10), dict(seed=[5, 6, 7, 8], max_new_tokens=[10, 3, 7, 5])):
        cpu = generate(target, ids, mask, **kw, **seeds)
        with VirtualDevice(target, draft):
            device = generate(target, ids, mask, **kw, **seeds)
        assert device.tokens == cpu.tokens
        assert 0 < cpu.stats["acceptance_rate"] < 1


def test_virtual_device_raises_on_the_old_ar_bug():
    """The emulator is able to fail: a host index tensor indexed by a device mask, as AR once did."""
    x = torch.tensor([5, 2, 7, 2])                            # an input: on the (virtual) accelerator
    with VirtualDevice():
        rows = torch.arange(4)                                # host: no device given
        live = (x != 2).nonzero().squeeze(1)                  # on the device, like x
        with pytest.raises(DeviceMismatch):
            rows[live]
        with pytest.raises(DeviceMismatch):
            torch.cat([rows, live])
        assert rows[live.cpu()].tolist() == [0, 2]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("kv", CACHES)
@pytest.mark.parametrize("mode", MODES)
def test_every_mode_on_cuda(mode, kv):
    target, draft, ids, mask, eos, ref = case(mode)
    target = target.cuda()
    draft = [d.cuda() for d in draft] if mode == "cascade" else draft.cuda()
    ids, mask = ids.cuda(), mask.cuda()
    assert run(mode, target, draft, ids, mask, eos, temperature=0, kv_cache=kv).tokens == ref
    sampled = run(mode, target, draft, ids, mask, eos, temperature=0.9, top_k=20, top_p=0.9, seed=3, kv_cache=kv)
    assert all(1 <= len(t) <= 12 for t in sampled.tokens)
