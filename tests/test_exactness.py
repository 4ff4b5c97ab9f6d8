"""Greedy exactness: every mode equals plain greedy decoding token for token."""
import pytest
from tiny import ARCHS, greedy_reference, left_padded_batch, never_agreeing_pair, noisy_copy, tiny_model

from sampling import generate

SPEC_MODES = ("google", "deepmind", "bass")
LENGTHS = (5, 9, 3, 7)          # a left-padded batch of mixed lengths
NEW = 12


@pytest.fixture(scope="module", params=ARCHS)
def arch_case(request):
    target = tiny_model(request.param)
    ids, mask = left_padded_batch(97, LENGTHS, seed=3)
    return request.param, target, ids, mask, greedy_reference(target, ids, mask, NEW)


@pytest.mark.parametrize("mode", ("ar",) + SPEC_MODES)
def test_greedy_partial_agreement(arch_case, mode):
    arch, target, ids, mask, ref = arch_case
    draft = noisy_copy(target, 0.1)
    res = generate(target, ids, mask, draft_model=draft, mode=mode, max_new_tokens=NEW, gamma=4,
                   temperature=0, seed=0)
    assert res.tokens == ref, f"{arch}/{mode} differs from greedy decoding"
    if mode != "ar":                     # the draft agrees part of the time, not always, not never
        assert 0 < res.stats["accepted"] < res.stats["drafted"], res.stats


@pytest.mark.parametrize("mode", SPEC_MODES)
def test_greedy_all_accepted(arch_case, mode):
    arch, target, ids, mask, ref = arch_case
    res = generate(target, ids, mask, draft_model=target, mode=mode, max_new_tokens=NEW, gamma=4,
                   temperature=0, seed=0)
    assert res.tokens == ref
    assert res.stats["acceptance_rate"] == 1.0


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mode", SPEC_MODES)
def test_greedy_all_rejected(arch, mode):
    target, draft = never_agreeing_pair(tiny_model(arch, seed=5))
    ids, mask = left_padded_batch(97, LENGTHS, seed=4)
    ref = greedy_reference(target, ids, mask, NEW)
    assert all(0 not in row for row in ref)               # precondition: the target never picks 0
    res = generate(target, ids, mask, draft_model=draft, mode=mode, max_new_tokens=NEW, gamma=3,
                   temperature=0, seed=0)
    assert res.tokens == ref
    assert res.stats["accepted"] == 0 and res.stats["drafted"] > 0


@pytest.mark.parametrize("mode", ("ar",) + SPEC_MODES)
def test_eos_inside_accepted_block(mode):
    target = tiny_model("llama")
    ids, mask = left_padded_batch(97, (6, 4), seed=7)
    free = greedy_reference(target, ids, mask, NEW)
    eos = free[0][2]                                       # row 0 meets it as its 3rd token
    ref = greedy_reference(target, ids, mask, NEW, eos_token_id=eos)
    res = generate(target, ids, mask, draft_model=target, mode=mode, max_new_tokens=NEW, gamma=4,
                   temperature=0, eos_token_id=eos)
    assert res.tokens == ref
    assert res.tokens[0][-1] == eos and len(res.tokens[0]) == free[0].index(eos) + 1


@pytest.mark.parametrize("mode", SPEC_MODES)
@pytest.mark.parametrize("budget", (1, 5, 6, 7))
def test_budget_never_overshot(mode, budget):
    target = tiny_model("gpt2")
    ids, mask = left_padded_batch(97, (5, 8), seed=8)
    ref = greedy_reference(target, ids, mask, budget)
    res = generate(target, ids, mask, draft_model=target, mode=mode, max_new_tokens=budget, gamma=4,
                   temperature=0)
    assert res.tokens == ref and all(len(r) == budget for r in res.tokens)


@pytest.mark.parametrize("mode", SPEC_MODES)
def test_p_equals_q_accepts_everything(mode):
    target = tiny_model("opt")
    ids, mask = left_padded_batch(97, (5, 8, 2), seed=9)
    res = generate(target, ids, mask, draft_model=target, mode=mode, max_new_tokens=10, gamma=3,
                   temperature=1.0, seed=1)
    assert res.stats["acceptance_rate"] == 1.0
    # every draft accepted: 10 tokens = blocks of 3 + 1, 3 + 1, then 1 + 1 (the budget), per row
    assert [len(r) for r in res.tokens] == [10, 10, 10]
    assert res.stats["drafted"] == res.stats["accepted"] == 3 * 7
    assert res.stats["target_calls"] == (4 if mode == "bass" else 3 * 4)   # prefill + 3 verifies


@pytest.mark.parametrize("mode", ("ar",) + SPEC_MODES)
def test_seed_reproduces_and_seeds_differ(mode):
    target = tiny_model("llama")
    draft = noisy_copy(target, 0.3)
    ids, mask = left_padded_batch(97, (5, 8), seed=9)
    runs = [generate(target, ids, mask, draft_model=draft, mode=mode, max_new_tokens=10,
                     temperature=1.0, seed=seed).tokens for seed in (42, 42, 43)]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]                 # 20 draws over 97 tokens: equal by chance ~never


def test_kvcache_history_follows_catch_up_rollback_and_select_rows():
    """The probability history equals a fresh forward pass over what the cache holds, through
    catch-ups, rollbacks and row selection, and never holds more than the last pass + 1 positions."""
    import torch

    from sampling.kvcache_model import KVCacheModel, position_ids
    from sampling.params import SamplingParams
    model = tiny_model("llama", seed=61)
    params = SamplingParams(temperature=0.8)
    ids, mask = left_padded_batch(97, (5, 2, 7), seed=62)
    gen = torch.Generator().manual_seed(63)
    seq = torch.cat([ids, torch.randint(3, 97, (3, 60), generator=gen)], dim=1)
    mask = torch.cat([mask, torch.ones(3, 60, dtype=mask.dtype)], dim=1)
    T = ids.shape[1]

    def expected(seq, mask, h):                 # next-token probs of the last h positions, by hand
        with torch.no_grad():
            logits = model(input_ids=seq, attention_mask=mask, position_ids=position_ids(mask)).logits
        return torch.softmax(logits[:, -h:].double() / 0.8, -1)

    kv = KVCacheModel(model, params)
    kv.prefill(ids, mask[:, :T])
    L = T
    for step, (add, back) in enumerate([(3, 1), (9, 4), (6, 0), (5, 2), (1, 0), (1, 0), (4, 3)]):
        L += add
        kv.catch_up(seq[:, :L], mask[:, :L])
        L -= back
        kv.rollback(L)
        if step == 2:
            keep = torch.tensor([0, 2])
            kv.select_rows(keep)
            seq, mask = seq[keep], mask[keep]
        assert kv.probs.shape[1] == add + 1 - back            # the last pass, its predecessor, less the rollback
        torch.testing.assert_close(kv.probs.double(), expected(seq[:, :L], mask[:, :L], add + 1 - back))
    for _ in range(30):                                       # one token at a time: memory stays flat
        L += 1
        kv.catch_up(seq[:, :L], mask[:, :L])
        assert kv.probs.shape[1] == 2


def test_greedy_with_repetition_penalty_equals_a_hand_written_reference():
    """The penalty depends on each position's own prefix (BASS holes and padding excluded)."""
    import torch
    target = tiny_model("llama", seed=64)
    draft = noisy_copy(target, 0.1, seed=65)
    ids, mask = left_padded_batch(97, LENGTHS, seed=66)
    ref = []
    for row, m in zip(ids, mask):                             # plain loop, no cache, penalty by hand
        seq = row[m.bool()].tolist()
        new = []
        for _ in range(NEW):
            with torch.no_grad():
                logits = target(input_ids=torch.tensor([seq])).logits[0, -1].tolist()
            for t in set(seq):
                logits[t] = logits[t] * 1.5 if logits[t] < 0 else logits[t] / 1.5
            tok = max(range(len(logits)), key=logits.__getitem__)
            new.append(tok)
            seq.append(tok)
        ref.append(new)
    for mode in ("ar",) + SPEC_MODES:
        res = generate(target, ids, mask, draft_model=draft, mode=mode, max_new_tokens=NEW, gamma=3,
                       temperature=0, repetition_penalty=1.5)
        assert res.tokens == ref, mode
    plain = generate(target, ids, mask, mode="ar", max_new_tokens=NEW, temperature=0).tokens
    assert plain != ref                                       # the penalty changed the text


def test_streamer_gets_the_tokens_as_they_are_accepted():
    class Collect:
        def __init__(self):
            self.puts, self.ended = [], False

        def put(self, value):
            self.puts.append(value.tolist())

        def end(self):
            self.ended = True

    target = tiny_model("llama", seed=67)
    ids, mask = left_padded_batch(97, (6,), seed=68)
    for mode in ("ar",) + SPEC_MODES:
        s = Collect()
        res = generate(target, ids, mask, draft_model=noisy_copy(target, 0.1), mode=mode, max_new_tokens=NEW,
                       gamma=3, temperature=0, streamer=s)
        assert [t for put in s.puts for t in put] == res.tokens[0] and s.ended
        assert len(s.puts) == res.stats["target_calls"] - (mode != "ar")   # one put per verify (per step for AR)
    ids2, mask2 = left_padded_batch(97, (6, 3), seed=68)
    with pytest.raises(ValueError, match="a streamer takes one sequence; got a batch of 2"):
        generate(target, ids2, mask2, mode="ar", streamer=Collect())


@pytest.mark.parametrize("mode", ("ar", "google", "deepmind", "bass", "tree", "cascade"))
def test_right_padded_batch_equals_greedy_decoding(mode):
    """A right-padded batch (a tokenizer's default padding side) decodes the real tokens of each row,
    in every mode: rows [5, 9, 13, 17, 21, 25] and [7, 1, 2] padded on the right to 6 give what
    greedy decoding of the unpadded prompts gives."""
    import torch
    target = tiny_model("llama", seed=91)
    rows = [[5, 9, 13, 17, 21, 25], [7, 1, 2]]
    ids = torch.tensor([rows[0], rows[1] + [0, 0, 0]])
    mask = torch.tensor([[1] * 6, [1, 1, 1, 0, 0, 0]])
    want = [greedy_reference(target, torch.tensor([r]), torch.ones(1, len(r), dtype=torch.long), 8)[0]
            for r in rows]
    draft = [noisy_copy(target, 0.2, seed=3), noisy_copy(target, 0.1, seed=4)] if mode == "cascade" \
        else noisy_copy(target, 0.1, seed=4)
    res = generate(target, ids, mask, draft_model=draft, mode=mode, max_new_tokens=8, gamma=3, temperature=0)
    assert res.tokens == want, mode


def test_a_mask_with_gaps_is_refused():
    import torch
    target = tiny_model("llama", seed=91)
    ids = torch.tensor([[5, 9, 13, 17]])
    with pytest.raises(ValueError, match="real tokens must be contiguous"):
        generate(target, ids, torch.tensor([[1, 0, 1, 1]]), mode="ar", max_new_tokens=2, temperature=0)
