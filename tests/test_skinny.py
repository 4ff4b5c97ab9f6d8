"""``sampling.skinny``: linear layers that take ``W @ x.T`` for passes of a few tokens compute what
``nn.Linear`` computes, keep the model's parameters (and ties), and leave speculative output exact."""
import pytest
import torch
import torch.nn as nn
from tiny import ARCHS, greedy_reference, left_padded_batch, noisy_copy, tiny_model

from sampling import generate
from sampling.skinny import SKINNY_ROWS, SkinnyLinear, is_skinny, linear_path, skinny_linears


@pytest.mark.parametrize("bias", [True, False])
def test_a_skinny_linear_computes_what_linear_computes(bias):
    torch.manual_seed(0)
    lin = nn.Linear(48, 40, bias=bias, dtype=torch.float64)
    skinny = SkinnyLinear.of(lin)
    assert skinny.weight is lin.weight and skinny.bias is lin.bias
    for shape in [(1, 1), (1, 2), (3, 5), (1, SKINNY_ROWS), (2, SKINNY_ROWS), (7,), (0, 4)]:
        x = torch.randn(*shape, 48, dtype=torch.float64)
        torch.testing.assert_close(skinny(x), lin(x), rtol=1e-12, atol=1e-12)
        assert skinny(x).is_contiguous()
    with torch.autocast("cpu", dtype=torch.bfloat16):             # the dtype F.linear gives, bias or not
        x = torch.randn(1, 3, 48)
        assert SkinnyLinear.of(lin.float())(x).dtype == lin.float()(x).dtype == torch.bfloat16


@pytest.mark.parametrize("arch", ARCHS)
def test_swapped_models_keep_their_parameters_and_greedy_speculation_stays_exact(arch):
    target = tiny_model(arch, seed=0)
    draft = noisy_copy(target, 0.3)
    before = {n: p for n, p in target.named_parameters()}
    ids, mask = left_padded_batch(97, (5, 9, 3), seed=2)
    reference = greedy_reference(target, ids, mask, 10)
    n = skinny_linears(target) + skinny_linears(draft, torch.bfloat16)   # a draft as load_model makes one
    assert n > 0 and is_skinny(target) and is_skinny(draft)
    assert all(p is before[n] for n, p in target.named_parameters())     # the same tensors, no copy
    assert greedy_reference(target, ids, mask, 10) == reference
    modes = [("google", {}), ("bass", {})]
    modes += [("tree", dict(tree="dynamic:8:3:2"))] * (arch != "bloom")   # no trees over ALiBi
    for mode, extra in modes:
        rows = range(len(ids)) if mode == "google" else [slice(None)]
        for r in rows:
            sel = slice(r, r + 1) if isinstance(r, int) else r
            res = generate(target, ids[sel], mask[sel], draft_model=draft, mode=mode, max_new_tokens=10,
                           temperature=0, **extra)
            assert res.tokens == reference[sel], (arch, mode)


def test_load_model_swaps_float32_on_the_cpu_only():
    from sampling.app.models import load_model
    assert linear_path(load_model(None, "draft", "cpu", "float32")) == "|skinny|one-row-bfloat16"
    assert linear_path(load_model(None, "target", "cpu", "float32")) == "|skinny"     # a target: no copies
    assert not is_skinny(load_model(None, "draft", "cpu", "bfloat16"))


@pytest.mark.parametrize("bias", [True, False])
def test_a_one_row_copy_serves_one_row_only(bias):
    """A draft's one-row product goes through the bfloat16 copy (what F.linear gives in bfloat16);
    two rows and more, and a model moved to float64, compute from the float32 weight itself."""
    torch.manual_seed(0)
    lin = nn.Linear(48, 40, bias=bias)
    skinny = SkinnyLinear.of(lin, one_row=torch.bfloat16)
    assert skinny.one_row.dtype == torch.bfloat16 and "one_row" not in skinny.state_dict()
    x = torch.randn(1, 1, 48)
    expect = nn.functional.linear(x.bfloat16(), lin.weight.bfloat16()).float()
    expect = expect + lin.bias if bias else expect
    torch.testing.assert_close(skinny(x), expect, rtol=0, atol=0)
    assert not torch.equal(skinny(x), lin(x))                         # the copy was used
    for shape in [(1, 2), (2, 1), (3, 5)]:
        x = torch.randn(*shape, 48)
        torch.testing.assert_close(skinny(x), lin(x), rtol=1e-6, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):                 # F.linear's dtype, as without a copy
        assert skinny(torch.randn(1, 48)).dtype == lin(torch.randn(1, 48)).dtype == torch.bfloat16
    skinny.double()
    x = torch.randn(1, 1, 48, dtype=torch.float64)
    torch.testing.assert_close(skinny(x), lin.double()(x), rtol=1e-12, atol=1e-12)
