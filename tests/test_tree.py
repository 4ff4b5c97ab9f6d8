"""Draft trees: shapes, exactness on four architectures (BLOOM refused), batched rows finishing
early, the cache after compaction, the joint law under sampling, bad values."""
import pytest
import torch
from test_distribution import ALPHA, CASES, joint_pvalue, peaked_models
from tiny import greedy_reference, left_padded_batch, noisy_copy, tiny_model

from sampling import generate
from sampling.tree_shapes import DynamicTree, TreeShape, parse_tree

TREE_ARCHS = ("llama", "gpt_neox", "gpt2", "opt")
LENGTHS = (5, 9, 3, 7, 1, 6)


def test_shape_structure():
    t = TreeShape.parse("2,3,1")
    assert t.n == 2 + 6 + 6 and t.depth == 3 and [list(r) for r in t.levels] == [[0, 1], [2, 3, 4, 5, 6, 7],
                                                                                  list(range(8, 14))]
    assert t.parent[:8] == [-1, -1, 0, 0, 0, 1, 1, 1] and t.parent[8:] == [2, 3, 4, 5, 6, 7]
    assert t.depths.tolist() == [1, 1, 2, 2, 2, 2, 2, 2] + [3] * 6
    assert t.ancestors[9].nonzero().squeeze(1).tolist() == [0, 3, 9]        # node 9: 0 -> 3 -> 9
    assert t.children[-1] == [0, 1] and t.children[1] == [5, 6, 7] and t.children[13] == []
    assert TreeShape.parse((1, 1, 1, 1)).n == 4 and str(TreeShape.parse([4, 2])) == "4,2"
    u = parse_tree("paths:0,1,2,0.0,0.1,1.0,0.0.0")               # a Sequoia-style tree: children vary per node
    assert u.branching is None and str(u) == "paths:0,1,2,0.0,0.1,1.0,0.0.0"
    assert u.parent == [-1, -1, -1, 0, 0, 1, 3] and u.depths.tolist() == [1, 1, 1, 2, 2, 2, 3]
    assert parse_tree([(1,), (0,), (0, 0), (1, 0)]) is parse_tree("2,1")       # same tree, same object


def test_dynamic_tree_spec():
    assert parse_tree("dynamic:16") == DynamicTree(16, 5, 4) and str(parse_tree("dynamic:3")) == "dynamic:3:3:3"
    assert str(parse_tree(" dynamic:20:6:3 ")) == "dynamic:20:6:3" and parse_tree("2,1").n == 4
    sharp = parse_tree("dynamic:8:4:3:2.5")
    assert sharp.sharpen == 2.5 and str(sharp) == "dynamic:8:4:3:2.5"


def test_dynamic_tree_keeps_the_best_paths():
    """Row trees from a draft equal to the target: every kept node's parent is kept, the nodes are in
    level order, and the ancestor matrix follows the parent pointers."""
    from sampling.drafters.tree import DynamicTreeDrafter
    from sampling.params import SamplingParams
    from sampling.tree_shapes import children_of
    model = tiny_model("llama", seed=14)
    ids, mask = left_padded_batch(97, (4, 7, 2), seed=15)
    drafter = DynamicTreeDrafter(model, SamplingParams(temperature=0), None, parse_tree("dynamic:10:4:3"))
    drafter.prefill(ids, mask)
    draft = drafter.propose(ids, mask, 4, None)
    tree = draft.tree
    assert draft.tokens.shape == (3, 10) and tree.n == 10
    par, dep = tree.parent.tolist(), tree.depths.tolist()
    for i in range(3):
        for j, p in enumerate(par[i]):
            assert p < j and dep[i][j] == (1 if p < 0 else dep[i][p] + 1)
            assert tree.ancestors[i, j].nonzero().squeeze(1).tolist() == sorted(
                [j] + ([] if p < 0 else tree.ancestors[i, p].nonzero().squeeze(1).tolist()))
        assert children_of(par[i])[-1] == [j for j, p in enumerate(par[i]) if p < 0]
    assert (tree.depths.max(1).values > 1).all() and (tree.fed[:, :3] >= 0).all()


@pytest.mark.parametrize("bad", ("", "4,0", "a,b", "3,-1", "8,8,8", "dynamic", "dynamic:0", "dynamic:4:9",
                                 "dynamic:x", "dynamic:64:2:2", "dynamic:4:2:2:0", "dynamic:4:2:2:2:2", "paths:",
                                 "paths:0,0.1",
                                 "paths:1", "paths:0,0", "paths:0,a"))
def test_bad_tree_is_a_one_line_error(bad):
    target = tiny_model("llama", seed=1)
    ids, mask = left_padded_batch(97, (3,), seed=1)
    with pytest.raises(ValueError, match="tree"):
        generate(target, ids, mask, draft_model=target, mode="tree", tree=bad, max_new_tokens=3, temperature=0)


def test_bloom_is_refused_by_name():
    target = tiny_model("bloom", seed=1)
    ids, mask = left_padded_batch(97, (3,), seed=1)
    with pytest.raises(ValueError, match="the target is bloom, which does not"):
        generate(target, ids, mask, draft_model=target, mode="tree", max_new_tokens=3, temperature=0)


@pytest.mark.parametrize("arch", TREE_ARCHS)
@pytest.mark.parametrize("tree", ("4,2,1,1", "1,1,1", "3,3", "2", "paths:0,1,2,0.0,0.1,1.0,0.0.0", "dynamic:8",
                                  "dynamic:3:3:1", "dynamic:8:4:3:3"))
def test_greedy_tree_equals_greedy(arch, tree):
    target = tiny_model(arch, seed=3)
    draft = noisy_copy(target, 0.3, seed=4)
    ids, mask = left_padded_batch(97, LENGTHS, seed=5)
    res = generate(target, ids, mask, draft_model=draft, mode="tree", tree=tree, max_new_tokens=12, temperature=0)
    assert res.tokens == greedy_reference(target, ids, mask, 12)
    s = res.stats
    assert 0 < s["accepted"] < s["drafted"]                   # partial agreement: both branches used
    assert s["drafted"] == sum(r["drafted"] for r in s["rows"]) and sum(s["accepted_hist"]) > 0


@pytest.mark.parametrize("tree", ("3,2,1", "dynamic:10:4:3"))
@pytest.mark.parametrize("finished_rows", ("drop", "mask"))
def test_rows_finishing_early(finished_rows, tree):
    target = tiny_model("llama", seed=6)
    draft = noisy_copy(target, 0.2, seed=7)
    ids, mask = left_padded_batch(97, LENGTHS, seed=8)
    free = greedy_reference(target, ids, mask, 14)
    eos = free[1][3]
    ref = greedy_reference(target, ids, mask, 14, eos_token_id=eos)
    assert len({len(r) for r in ref}) > 1                     # rows end at different steps
    res = generate(target, ids, mask, draft_model=draft, mode="tree", tree=tree, max_new_tokens=14,
                   temperature=0, eos_token_id=eos, finished_rows=finished_rows)
    assert res.tokens == ref


@pytest.mark.parametrize("tree", ("2,2,2", "dynamic:3:3:1"))
def test_draft_equal_to_target_accepts_whole_paths(tree):
    """Also checks the draft's cache after compaction: a wrong key or position would make the draft
    disagree with the target somewhere in 3 steps. (dynamic:3:3:1 is the greedy chain grown by the
    dynamic drafter; wider dynamic trees keep the best cumulative paths, not always the greedy one.)"""
    target = tiny_model("gpt2", seed=9)
    ids, mask = left_padded_batch(97, (4, 8), seed=10)
    res = generate(target, ids, mask, draft_model=target, mode="tree", tree=tree, max_new_tokens=12, temperature=0)
    assert res.tokens == greedy_reference(target, ids, mask, 12)
    assert res.stats["accepted_hist"] == [0, 0, 0, 6]         # 3 steps of 3 accepted + a bonus, 2 rows


@pytest.mark.parametrize("kind", ("dynamic", "static"))
def test_cache_after_compaction_equals_a_fresh_pass(kind):
    """keep_tree leaves the KV entries a plain forward over the accepted sequence would make."""
    from sampling.cache.spec import CacheSpec
    from sampling.cache.tree import TreeKVCacheModel
    from sampling.kvcache_model import position_ids
    from sampling.params import SamplingParams
    model = tiny_model("llama", seed=11)
    ids, mask = left_padded_batch(97, (4, 7), seed=12)
    kv = TreeKVCacheModel(model, SamplingParams(temperature=1.0), cache=CacheSpec(kind, room=12))
    kv.prefill(ids, mask)
    tree = TreeShape.parse("3,2")
    tokens = torch.randint(3, 97, (2, tree.n), generator=torch.Generator().manual_seed(13))
    kv.forward_tree(ids, mask, tokens, tree.ancestors, tree.depths)
    path = torch.tensor([[1, 6], [2, 0]])                     # row 0: node 1 then its child 6; row 1: node 2 only
    assert tree.parent[6] == 1
    kv.keep_tree(path, torch.tensor([2, 1]))
    kept = torch.cat([ids, tokens.gather(1, path)], 1)        # row 1's second slot is a hole
    kept_mask = torch.cat([mask, torch.tensor([[1, 1], [1, 0]])], 1)
    assert kv.mask.tolist() == kept_mask.tolist()
    with torch.no_grad():
        ref = model(input_ids=kept, attention_mask=kept_mask, position_ids=position_ids(kept_mask), use_cache=True)
    for layer, ref_layer in zip(kv.cache.layers, ref.past_key_values.layers):
        for name in ("keys", "values"):
            got, want = getattr(layer, name)[:, :, :kv.filled], getattr(ref_layer, name)
            live = kept_mask.bool()[:, None, :, None].expand_as(want)
            torch.testing.assert_close(got[live], want[live])


@pytest.mark.parametrize("row1", ("fed at depth 2", "unfed at depth 3"))
def test_dynamic_drafter_keeps_its_fed_path(row1):
    """After a step the draft's cache holds the accepted nodes it fed, copied into place, as a
    plain forward over the accepted sequence would make them (rows of different path lengths); a
    path that ends in a node the draft did not feed keeps, in every row, only the columns before
    it (the drafter knows from the fed slots the walk brought to the host)."""
    from sampling.contracts import HostVerdict, Verified
    from sampling.drafters.tree import DynamicTreeDrafter
    from sampling.kvcache_model import position_ids
    from sampling.params import SamplingParams
    model = tiny_model("llama", seed=16)
    ids, mask = left_padded_batch(97, (4, 7), seed=17)
    drafter = DynamicTreeDrafter(model, SamplingParams(temperature=0), None, parse_tree("dynamic:30:4:3"))
    drafter.prefill(ids, mask)
    draft = drafter.propose(ids, mask, 4, None)
    tree = draft.tree
    paths = []                                                # all 30 candidates kept
    fed_at = ((0, 3, True), (1, 2, True) if row1.startswith("fed") else (1, 3, False))   # (row, depth, fed)
    for i, want, fed in fed_at:
        j = next(j for j in range(tree.n) if (tree.fed[i, j] >= 0) == fed and tree.depths[i, j] == want)
        paths.append(tree.ancestors[i, j].nonzero().squeeze(1).tolist())
    nodes = torch.tensor([p + [0] * (3 - len(p)) for p in paths])
    n = torch.tensor([len(p) for p in paths])
    tokens = draft.tokens.gather(1, nodes)
    host = HostVerdict([[k, 0] + t[:k] for k, t in zip(n.tolist(), tokens.tolist())],
                       [tree.fed[i, p].tolist() for i, p in enumerate(paths)])   # as the walk brings them
    verified = Verified(n, torch.zeros(2, dtype=torch.long), tokens, nodes, ids.shape[1], tree.n, (None, 0), host=host)
    drafter.commit(verified.settle(torch.zeros(2, dtype=torch.bool), [False, False]))
    keep = 3 if row1.startswith("fed") else 2                 # the unfed node's column goes in every row
    kept = torch.cat([ids, draft.tokens.gather(1, nodes)[:, :keep]], 1)
    kept_mask = torch.cat([mask, torch.tensor([[1, 1, 1], [1, 1, 0]])[:, :keep]], 1)
    assert drafter.kv.mask.tolist() == kept_mask.tolist() and drafter.kv.tree_len == 0
    with torch.no_grad():
        ref = model(input_ids=kept, attention_mask=kept_mask, position_ids=position_ids(kept_mask), use_cache=True)
    L = kept.shape[1]                                         # a slot cache's buffer is wider: its filled slots
    for layer, ref_layer in zip(drafter.kv.cache.layers, ref.past_key_values.layers):
        live = kept_mask.bool()[:, None, :, None].expand_as(ref_layer.keys)
        torch.testing.assert_close(layer.keys[:, :, :L][live], ref_layer.keys[live])
        torch.testing.assert_close(layer.values[:, :, :L][live], ref_layer.values[live])


@pytest.mark.parametrize("tree", ("2,2", "3,1", "4,1", "paths:0,1,2,3,0.0,0.1,1.0", "dynamic:4:2:2", "dynamic:6:3:3",
                                  "dynamic:6:3:3:2.5"))
@pytest.mark.parametrize("case", ("t1", "t0.7-topk3", "t1.3-topp0.8"))
def test_tree_joint_law(tree, case):
    """Joint law of the first 3 new tokens against enumeration; siblings drawn without replacement
    (with top-k 3, a node of 4 children has one drawn after the draft's support ran out). The
    dynamic trees keep a different number of children under each node, chosen before they are drawn."""
    V, K = 5, 3
    params = CASES[case]
    target, draft = peaked_models(11, 12)
    prompt = [1, 3, 0, 4]
    N = 3000
    res = generate(target, torch.tensor([prompt] * N), draft_model=draft, mode="tree", tree=tree, max_new_tokens=K,
                   temperature=params.temperature, top_k=params.top_k, top_p=params.top_p, seed=7)
    pval = joint_pvalue(res.tokens, target, prompt, params, K, V)
    assert 0.05 < res.stats["acceptance_rate"] < 0.95
    assert pval > ALPHA, pval


def test_a_pass_without_nodes_under_the_repetition_penalty():
    """A budget that leaves a static tree no room for nodes in its last step, with a filter that
    needs each node's prefix: the pass feeds only the chain (it once asserted)."""
    from tiny import left_padded_batch, noisy_copy, tiny_model

    from sampling import generate
    target = tiny_model("llama", seed=81)
    draft = noisy_copy(target, 0.1, seed=82)
    ids, mask = left_padded_batch(97, (5, 9, 3, 7), seed=83)
    res = generate(target, ids, mask, draft_model=draft, mode="tree", tree="2,2,1", max_new_tokens=5,
                   temperature=0.9, repetition_penalty=1.2, seed=1)
    assert [len(t) for t in res.tokens] == [5, 5, 5, 5]
