"""Speculator heads (MLP speculator, Medusa): greedy exactness on five architectures in the chain
modes and tree mode, the hidden state each row drafts from, the joint law under sampling against
enumeration, saving and loading, and the refusals."""
import pytest
import torch
from test_distribution import ALPHA, CASES, joint_pvalue, peaked_models
from tiny import ARCHS, greedy_reference, left_padded_batch, tiny_model

from sampling import generate, load_speculator, new_speculator
from sampling.drafters.heads import SpeculatorDrafter, save_speculator

KINDS = ("mlp", "medusa")


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", KINDS)
def test_greedy_speculator_equals_greedy(arch, kind):
    target = tiny_model(arch, seed=21)
    ids, mask = left_padded_batch(97, (5, 9, 3, 7), seed=22)
    ref = greedy_reference(target, ids, mask, 14)
    spec = new_speculator(target, kind, n_heads=3, seed=1, noise=0.05)
    for mode in ("google", "deepmind", "bass") + (("tree",) if arch != "bloom" else ()):
        res = generate(target, ids, mask, draft_model=spec, mode=mode, gamma=3, max_new_tokens=14,
                       temperature=0, tree="3,2,1")
        assert res.tokens == ref, mode
        assert res.stats["draft_calls"] == 0


@pytest.mark.parametrize("arch", ("llama", "gpt2"))
@pytest.mark.parametrize("mode", ("bass", "tree"))
def test_drafts_start_from_the_last_accepted_hidden_state(arch, mode, monkeypatch):
    """Every step, each row's hidden state equals the target's own lm_head input at the row's last
    token before the pending one, recomputed from scratch on the real tokens (a wrong index after a
    partial accept, a tree path or a hole would show here, though the output stays exact)."""
    V = 6                                                         # a small vocabulary: many accepts
    target = tiny_model(arch, vocab=V, seed=3)
    spec = new_speculator(target, "mlp", n_heads=3, seed=2, noise=0.05)
    seen, propose = [], SpeculatorDrafter.propose

    def recording(self, seq, mask, g, generator):
        seen.append((seq.clone(), mask.clone(), self.h.clone(), self.pending))
        return propose(self, seq, mask, g, generator)
    monkeypatch.setattr(SpeculatorDrafter, "propose", recording)
    ids, mask = left_padded_batch(V, (4, 7, 2), seed=5, pad=0)
    res = generate(target, ids, mask, draft_model=spec, mode=mode, gamma=3, max_new_tokens=12, temperature=0,
                   tree="2,2,1", finished_rows="mask")
    hist = res.stats["accepted_hist"]                             # rows x steps that accepted 0, 1, 2, ...
    assert hist[0] > 0 and sum(hist[1:]) >= 5 and (mode == "bass" or sum(hist[2:]) > 0)
    captured, checked = [], 0
    hook = target.get_output_embeddings().register_forward_pre_hook(lambda m, a: captured.append(a[0]))
    try:
        for seq, m, h, pending in seen:
            for i in range(len(seq)):
                if pending and not m[i, -1]:                      # a finished row (kept masked): no drafts used
                    continue
                real = seq[i, :seq.shape[1] - pending][m[i, :seq.shape[1] - pending].bool()]
                with torch.no_grad():
                    target(input_ids=real.unsqueeze(0))
                torch.testing.assert_close(h[i], captured[-1][0, -1])
                checked += 1
    finally:
        hook.remove()
    assert len(seen) > 3 and checked > 3 * len(ids)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", ("google", "bass", "tree"))
@pytest.mark.parametrize("case", ("t1", "t0.7-topk3"))
def test_speculator_joint_law(kind, mode, case):
    """Joint law of the first 3 new tokens against enumeration (independent of the code under test)."""
    V, K = 5, 3
    params = CASES[case]
    target, = peaked_models(11)
    spec = new_speculator(target, kind, n_heads=2, seed=4, noise=0.3)
    prompt = [1, 3, 0, 4, 1, 3]
    N = 3000 if mode != "google" else 1500
    res = generate(target, torch.tensor([prompt] * N), draft_model=spec, mode=mode, gamma=2, tree="2,2",
                   max_new_tokens=K, temperature=params.temperature, top_k=params.top_k, top_p=params.top_p, seed=7)
    pval = joint_pvalue(res.tokens, target, prompt, params, K, V)
    assert pval > ALPHA, pval
    assert 0.01 < res.stats["acceptance_rate"] < 0.95            # both accepts and rejections were drawn


def test_save_load_round_trip(tmp_path):
    target = tiny_model("gpt2", seed=4, dtype=torch.float32)
    spec = new_speculator(target, "mlp", n_heads=2, seed=3, noise=0.05)
    save_speculator(spec.heads, str(tmp_path / "heads"), dtype=torch.float32)
    again = load_speculator(str(tmp_path / "heads"), target)
    for a, b in zip(spec.heads.state_dict().values(), again.heads.state_dict().values()):
        torch.testing.assert_close(a, b)
    ids, mask = left_padded_batch(97, (5, 3), seed=1)
    kw = dict(mode="bass", gamma=2, max_new_tokens=8, temperature=1.0, seed=3)
    assert generate(target, ids, mask, draft_model=spec, **kw).tokens == \
        generate(target, ids, mask, draft_model=again, **kw).tokens


def test_refusals(tmp_path):
    target = tiny_model("llama", seed=1)
    ids, mask = left_padded_batch(97, (3,), seed=1)
    with pytest.raises(ValueError, match="has no config.json and model.safetensors"):
        load_speculator(str(tmp_path / "nowhere"), target)
    spec = new_speculator(target, "medusa", n_heads=2)
    save_speculator(spec.heads, str(tmp_path / "heads"))
    wider = tiny_model("llama", seed=1, dim=64)
    with pytest.raises(ValueError, match="trained for another target: its hidden is 32, this target's is 64"):
        load_speculator(str(tmp_path / "heads"), wider)
    other = tiny_model("llama", seed=2)                         # same shapes, other weights
    with pytest.raises(ValueError, match="trained for another target: the target's lm_head weights differ"):
        load_speculator(str(tmp_path / "heads"), other)
    with pytest.raises(ValueError, match="bound to another target model"):
        generate(other, ids, mask, draft_model=spec, mode="bass", max_new_tokens=3)
    with pytest.raises(ValueError, match="speculator heads draft static trees"):
        generate(target, ids, mask, draft_model=spec, mode="tree", tree="dynamic:8", max_new_tokens=3)
    with pytest.raises(ValueError, match="this speculator has 2 heads, so at most 2 levels"):
        generate(target, ids, mask, draft_model=spec, mode="tree", tree="2,1,1", max_new_tokens=3)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{}")
    (tmp_path / "bad" / "model.safetensors").write_text("")
    with pytest.raises(ValueError, match="is not a speculator's"):
        load_speculator(str(tmp_path / "bad"), target)


@pytest.mark.parametrize("kind", KINDS)
def test_training_forward_matches_the_drafter(kind):
    """The teacher-forced forward the training script optimises gives, at position t, the very laws
    the drafter draws from when its drafts are the sequence's next tokens: training and drafting
    read the same hidden state and align stage j with token t + 1 + j."""
    from sampling.drafters.heads import SpeculatorDrafter
    from sampling.params import SamplingParams
    target = tiny_model("gpt2", seed=5)
    spec = new_speculator(target, kind, n_heads=3, seed=6, noise=0.1)
    prefix = torch.tensor([[5, 9, 14, 3, 7, 22]])                    # t = 4: h_t, pending token x_5 = 22
    with torch.no_grad():
        h = target(input_ids=prefix[:, :-1], output_hidden_states=-1).hidden_states[-1][:, -1]   # slot 4's
    d = SpeculatorDrafter(spec, SamplingParams(temperature=1.0), None)
    d.prefill(prefix[:, :-1], torch.ones_like(prefix[:, :-1]), h)
    d.pending = 1
    draft = d.propose(prefix, torch.ones_like(prefix), 3, torch.Generator().manual_seed(0))   # tokens [1, 3]
    x = torch.cat([prefix, draft.tokens, torch.tensor([[1]])], 1)   # the drafts are the next tokens
    captured = []
    hook = target.get_output_embeddings().register_forward_pre_hook(lambda m, a: captured.append(a[0]))
    with torch.no_grad():
        target(input_ids=x)
        outs = spec.heads(captured[-1], target.get_input_embeddings()(x), target.get_output_embeddings())
    hook.remove()
    t = prefix.shape[1] - 2
    for j, logits in enumerate(outs, start=1):                      # stage j at t: token t + 1 + j
        torch.testing.assert_close(torch.softmax(logits[0, t], -1), draft.q[0, j - 1])


def test_int8_storage_round_trip(tmp_path):
    """int8 storage: a quarter of the bytes, each weight within half a step of its row's scale."""
    target = tiny_model("llama", seed=4, dtype=torch.float32, dim=64)
    spec = new_speculator(target, "mlp", n_heads=2, seed=3, noise=0.05)
    save_speculator(spec.heads, str(tmp_path / "f32"), dtype=torch.float32)
    save_speculator(spec.heads, str(tmp_path / "i8"), dtype=torch.int8)
    size = {k: (tmp_path / k / "model.safetensors").stat().st_size for k in ("f32", "i8")}
    assert size["i8"] < 0.3 * size["f32"]
    again = load_speculator(str(tmp_path / "i8"), target)
    for (name, a), b in zip(spec.heads.state_dict().items(), again.heads.state_dict().values()):
        step = a.abs().amax(-1, keepdim=True) / 127 if a.dim() == 2 else a.abs().max() * 1e-3 + 1e-6
        assert ((a - b).abs() <= step * 0.5 + 1e-3 * step + 1e-4).all(), name


def test_loaded_heads_draft_one_row_through_bfloat16_copies_and_stay_exact(tmp_path):
    """Heads loaded beside a float32 target on the CPU draft their one-row products through bfloat16
    copies (their own layers and the target's lm_head as they use it); the target's own lm_head is
    untouched, and greedy speculation still writes greedy AR's tokens."""
    from sampling.skinny import linear_path
    target = tiny_model("llama", seed=5, dtype=torch.float32)
    lm_head = target.get_output_embeddings()
    save_speculator(new_speculator(target, "mlp", n_heads=3, seed=1, noise=0.02).heads, str(tmp_path / "h"),
                    dtype=torch.float32)
    spec = load_speculator(str(tmp_path / "h"), target)
    assert linear_path(spec.heads) == linear_path(spec.lm_head) == "|skinny|one-row-bfloat16"
    assert target.get_output_embeddings() is lm_head and linear_path(target) == ""
    assert spec.lm_head.weight is lm_head.weight                            # shared, not copied
    assert linear_path(new_speculator(target, "mlp", n_heads=3).heads) == ""   # heads to train: no copies
    ids, mask = left_padded_batch(97, (6,), seed=2)
    kw = dict(max_new_tokens=12, temperature=0)
    ar = generate(target, ids, mask, mode="ar", **kw)
    assert generate(target, ids, mask, draft_model=spec, mode="google", gamma=3, **kw).tokens == ar.tokens
