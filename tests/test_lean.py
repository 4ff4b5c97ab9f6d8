"""``LeanBackend``: a draft's passes through the toolkit's own loop over the model's layers give
transformers' logits, bit for bit, for every kind of pass a drafter makes; rows join and leave its
slots as they do a dynamic cache's."""
import pytest
import torch
import torch.nn.functional as F
from tiny import ARCHS, left_padded_batch, tiny_model

from sampling.cache.backends import DynamicBackend, LeanBackend, backend_class, lean_fits
from sampling.cache.spec import CacheSpec
from sampling.kvcache_model import KVCacheModel
from sampling.params import SamplingParams


def wrappers(model, params, role="draft"):
    """The same model behind transformers' passes and behind the lean loop."""
    return (KVCacheModel(model, params, cache=CacheSpec(lean=False), role=role),
            KVCacheModel(model, params, cache=CacheSpec(lean=True), role=role))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lean_passes_give_transformers_logits(dtype):
    """A left-padded prefill, a multi-token catch-up over a hole (BASS), one-token passes, a
    rollback and a rows' selection: the same laws, exactly."""
    model = tiny_model("llama", seed=3, dtype=dtype)
    ids, mask = left_padded_batch(97, (9, 14, 5), seed=4)
    ids = torch.cat([ids, torch.randint(3, 97, (3, 6))], 1)
    mask = torch.cat([mask, torch.ones(3, 6, dtype=mask.dtype)], 1)
    mask[1, 16] = 0                                                    # a hole in one row
    plain, lean = wrappers(model, SamplingParams(temperature=1.0))
    for kv in (plain, lean):
        kv.prefill(ids[:, :14], mask[:, :14])
    assert isinstance(lean.backend, LeanBackend) and isinstance(plain.backend, DynamicBackend)
    torch.testing.assert_close(lean.probs, plain.probs, rtol=0, atol=0)
    for end in (17, 18, 19, 18, 20):                                  # catch-ups of 3, 1, 1; a rollback; 2
        for kv in (plain, lean):
            if end <= kv.length:
                kv.rollback(end)
            else:
                kv.catch_up(ids[:, :end], mask[:, :end])
        torch.testing.assert_close(lean.probs, plain.probs, rtol=0, atol=0)
    keep = torch.tensor([0, 2])
    for kv in (plain, lean):
        kv.select_rows(keep)
        kv.catch_up(ids[keep], mask[keep])
    torch.testing.assert_close(lean.probs, plain.probs, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_chain_of_one_token_passes_without_padding_gives_transformers_logits(dtype):
    """Batch 1, no masked slot: an unpadded prefill, then one-token passes that need no mask at all
    (what a draft's chain runs)."""
    model = tiny_model("llama", seed=11, dtype=dtype)
    ids = torch.randint(3, 97, (1, 16), generator=torch.Generator().manual_seed(12))
    plain, lean = wrappers(model, SamplingParams(temperature=0))
    for end in (10, 11, 12, 13, 12, 14):
        for kv in (plain, lean):
            if kv.length == 0:
                kv.prefill(ids[:, :end], torch.ones(1, end, dtype=torch.long))
            elif end <= kv.length:
                kv.rollback(end)
            else:
                kv.catch_up(ids[:, :end], torch.ones(1, end, dtype=torch.long))
        torch.testing.assert_close(lean.probs, plain.probs, rtol=0, atol=0)


def test_a_lean_pass_reads_an_additive_4d_mask_as_given():
    """A tree's pass: each node sees the cached slots and the nodes its mask allows."""
    model = tiny_model("llama", seed=5)
    ids = torch.randint(3, 97, (2, 8), generator=torch.Generator().manual_seed(6))
    nodes = torch.randint(3, 97, (2, 3), generator=torch.Generator().manual_seed(7))
    allow = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 0, 1]], dtype=torch.bool)          # a root and two children
    seen = torch.cat([torch.ones(3, 8, dtype=torch.bool), allow], 1)                    # [3, 8 + 3]
    mask4 = torch.zeros(2, 1, 3, 11, dtype=model.dtype).masked_fill_(~seen, torch.finfo(model.dtype).min)
    pos = torch.tensor([[8, 9, 9]] * 2)
    out = []
    for lean in (False, True):
        kv = KVCacheModel(model, SamplingParams(), cache=CacheSpec("static", lean=lean), role="draft")
        kv.prefill(ids, torch.ones_like(ids))
        with torch.inference_mode():
            out.append(kv.backend.forward(model, nodes, mask4, pos, 3, False)[0])
    assert type(kv.backend) is LeanBackend
    torch.testing.assert_close(out[1], out[0], rtol=0, atol=0)


def test_rows_join_and_leave_lean_slots_as_they_do_a_dynamic_cache():
    """Continuous batching: a short row joins (the batch's slots shifted right, the new row
    prefilled from its first real slot on), then the slots that are padding in every row go."""
    model = tiny_model("llama", seed=8)
    ids, mask = left_padded_batch(97, (6, 9), seed=9)                      # width 9
    short, short_mask = left_padded_batch(97, (5,), seed=10)
    new_ids, new_mask = F.pad(short, (7, 0)), F.pad(short_mask, (7, 0))    # aligned with the width 12 after pad 3
    params = SamplingParams(temperature=1.0)
    plain, lean = wrappers(model, params)
    for kv in (plain, lean):
        kv.prefill(ids, mask)
        kv.admit(new_ids, new_mask, pad=3, params=[params])
    seq = torch.cat([F.pad(ids, (3, 0)), new_ids])
    both = torch.cat([F.pad(mask, (3, 0)), new_mask])
    assert not both[:, :3].any()                                           # three slots of padding in every row
    seq, both = torch.cat([seq, seq[:, -1:]], 1), torch.cat([both, both[:, -1:]], 1)
    for kv in (plain, lean):
        kv.catch_up(seq, both)
    torch.testing.assert_close(lean.probs, plain.probs, rtol=0, atol=0)
    for kv in (plain, lean):
        kv.drop_leading(3)
        kv.catch_up(torch.cat([seq[:, 3:], seq[:, -1:]], 1), torch.cat([both[:, 3:], both[:, -1:]], 1))
    torch.testing.assert_close(lean.probs, plain.probs, rtol=0, atol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_only_drafts_of_the_llama_architecture_take_lean_passes(arch, monkeypatch):
    model = tiny_model(arch, seed=1)
    assert lean_fits(model) == (arch == "llama")
    draft, target = CacheSpec().for_role("draft"), CacheSpec().for_role("target")
    assert (backend_class(draft, model) is LeanBackend) == (arch == "llama")
    assert backend_class(target, model) is DynamicBackend                      # a target's passes never
    assert backend_class(CacheSpec("static", compile="draft").for_role("draft"), model).__name__ == "CompiledBackend"
    monkeypatch.setattr(model, "hf_device_map", {"model.layers.0": 0, "model.layers.1": 1}, raising=False)
    assert not lean_fits(model)                                                 # split over devices
