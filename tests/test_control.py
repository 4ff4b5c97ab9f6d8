"""The controller of speculation (``sampling.control``): its choices from pass costs and acceptance,
its cost table on disk, and exactness while the draft length switches mid-generation (AR steps
included): greedy output equal to greedy AR, sampled output in the target's law."""
import itertools
import json

import pytest
import torch
from test_distribution import ALPHA, CASES, joint_pvalue, peaked_models
from tiny import greedy_reference, left_padded_batch, noisy_copy, tiny_model

from sampling import NgramDrafter, generate, new_speculator, speculative_bass, speculative_sampling
from sampling.cache.spec import CacheSpec
from sampling.contracts import StepWork
from sampling.control import CONTEXT, PROBE_AFTER, Always, Controller, CostCurve, CostTable, pass_costs


class Chain:
    """A drafter's ``work`` alone: g one-token draft passes, a verify of g + 1."""

    def work(self, g):
        return StepWork((1,) * g, g + 1)


ORIGINAL_STEP_MS = Controller.step_ms        # read at import, before any fixture patches it


def linear(a: float, b: float, per_slot: float = 0.0) -> CostTable:
    """a + b x tokens ms for a pass of rows x tokens (a table of one row count prices them so)."""
    grid = (1, 2, 4, 8, 16, 32, 64, 128)
    return CostTable((1,), (CostCurve(grid, tuple(a + b * n for n in grid)),), per_slot)


def controller(monkeypatch, target=(10.0, 0.5), draft=(1.0, 0.05), **kw) -> Controller:
    """A controller on linear costs: target a + b x tokens, draft likewise (ms)."""
    monkeypatch.setattr(Controller, "step_ms", ORIGINAL_STEP_MS)
    return Controller(linear(*target), linear(*draft), Chain(), **kw)


def test_cost_curve_interpolates_and_extends():
    c = CostCurve((1, 2, 4), (10.0, 12.0, 13.0))
    assert c(1) == 10.0 and c(0.5) == 10.0 and c(3) == 12.5
    assert c(8) == 15.0                                   # the last segment, extended
    assert CostCurve((1, 2), (5.0, 4.0))(10) == 4.0       # beyond the last point never cheaper: flat
    skinny = CostCurve((1, 2, 4), (14.4, 8.2, 9.0))       # float32: 2 tokens on the skinny path, 1 not
    assert skinny(2) == 8.2 and skinny(1.5) == pytest.approx(11.3) and skinny(1) == 14.4   # the points kept


def test_cost_table_prices_rows_and_tokens_apart():
    """Each measured row count has its curve over tokens per row; between two row counts the cost is
    linear in the rows, beyond the last extended; a cached slot beyond CONTEXT costs per row."""
    one, four = CostCurve((1, 5), (10.0, 12.0)), CostCurve((1, 5), (14.0, 30.0))
    t = CostTable((1, 4), (one, four), per_slot=0.01)
    assert t(1, 5) == 12.0 and t(4, 5) == 30.0            # 4 rows of 5: not one row of 20
    assert t(2, 1) == pytest.approx(10.0 + 4.0 / 3) and t(7, 5) == pytest.approx(30.0 + 18.0)
    assert t(2, 5, CONTEXT + 100) == pytest.approx(12.0 + 6.0 + 2.0)          # 2 rows x 100 slots x 0.01
    fall = CostTable((1, 2, 4), (CostCurve((1,), (14.4,)), CostCurve((1,), (7.7,)), CostCurve((1,), (9.0,))))
    assert fall(2, 1) == 7.7 and fall(3, 1) == pytest.approx(8.35)   # a measured row count's own cost
    source = CostTable((1,), (CostCurve((1, 8), (1.0, 8.0)),))
    assert source(4, 2) == source(1, 8) == 8.0           # one row count: r rows of k as one row of r x k


def test_a_batch_dearer_than_its_tokens_means_ar(monkeypatch):
    """Drafting that pays when 4 rows of 5 tokens cost what one row of 20 does is an AR step when
    the table measured 4 rows at 20 ms a token each (compute-bound: the pricing before drafted there)."""
    c = controller(monkeypatch, target=(10.0, 0.1), draft=(1.0, 0.0))
    for _ in range(20):
        c.observe([3] * 4, [4] * 4)                       # 3 of every 4 drafts accepted
    assert c.choose(4, 4) > 0
    grid = (1, 2, 4, 8)
    rows = lambda a, b: CostCurve(grid, tuple(a + b * n for n in grid))     # noqa: E731
    monkeypatch.setattr(c, "target", CostTable((1, 4), (rows(10.0, 0.1), rows(0.0, 20.0))))
    assert c.choose(4, 4) == 0 and c.choose(4, 1) > 0     # batch 4's verify pass is dear; batch 1's is not


def test_the_grid_straddles_the_skinny_path_and_the_model_limit():
    from sampling.control import MOST_TOKENS, per_row_grid
    from sampling.skinny import SKINNY_ROWS
    assert {SKINNY_ROWS, SKINNY_ROWS + 1} <= set(per_row_grid(1))
    assert {SKINNY_ROWS // 8, SKINNY_ROWS // 8 + 1} <= set(per_row_grid(8))
    assert max(per_row_grid(32)) * 32 <= MOST_TOKENS and per_row_grid(64)[:2] == (1, 2)
    assert max(per_row_grid(1, limit=CONTEXT + 10)) <= 10


def test_long_cached_rows_make_drafting_pay(monkeypatch):
    """At a batch where the new tokens alone rule drafting out, a cache of long rows (read by every
    pass, a one-token step too) makes a verify pass cost little more than an AR step: drafting pays."""
    c = controller(monkeypatch, target=(2.0, 1.0))
    for _ in range(20):
        c.observe([4] * 32, [4] * 32)                     # every draft accepted
    assert c.choose(4, 32) == 0                           # 32 rows of CONTEXT slots: the tokens decide
    monkeypatch.setattr(c, "target", CostTable(c.target.rows, c.target.curves, per_slot=0.05))
    assert c.choose(4, 32, 1000) == 4                     # 32 rows of 1000: the slots decide


def test_drafts_while_it_pays_and_not_at_a_large_batch(monkeypatch):
    """Every draft accepted: cheap drafts pay at batch 1; at batch 64 a pass costs about as many
    times one token as it feeds (compute-bound), so the drafts' passes make an AR step the better."""
    c = controller(monkeypatch, target=(2.0, 1.0))
    for _ in range(20):
        c.observe([4], [4])                               # every draft accepted
    assert c.choose(6, 1) >= 4
    assert c.choose(6, 64) == 0
    assert c.choose(0, 1) == 0                            # nothing to choose from


def test_drafts_never_accepted_bring_the_rate_to_zero(monkeypatch):
    """The prior's weight decays with the counts: no floor holds a useless drafter's rate up."""
    c = controller(monkeypatch)
    assert c.rates(1) == [pytest.approx(c.prior)]
    for _ in range(150):
        c.observe([0], [2])
    assert c.rates(2)[0] < 0.001 and c.rates(2)[1] < 0.01


def test_low_acceptance_means_ar_steps_and_a_probe_now_and_then(monkeypatch):
    c = controller(monkeypatch)
    for _ in range(30):
        c.observe([0], [3])                               # every first draft rejected
    picks = [c.choose(4, 1) for _ in range(3 * PROBE_AFTER)]
    assert picks[:PROBE_AFTER - 1] == [0] * (PROBE_AFTER - 1)
    assert picks[PROBE_AFTER - 1] == 1 and picks[PROBE_AFTER] == 0   # a probe of one draft, then AR again
    assert picks[PROBE_AFTER:].index(1) == 2 * PROBE_AFTER - 1      # the next probe after twice as many
    c.observe([1], [1])
    for _ in range(30):
        c.observe([3], [3])                               # the text changed: drafts accepted again
    assert c.choose(4, 1) > 1 and c.probe_after == PROBE_AFTER


def test_rates_per_level(monkeypatch):
    """Rows that accepted 1 of 3: level 1 passed, level 2 tried and failed, level 3 never reached."""
    c = controller(monkeypatch, decay=1.0, weight=1e-9)
    c.observe([1, 1], [3, 3])
    assert c.tried == [2, 2, 0] and c.passed == [2, 0, 0]
    beta = c.rates(3)
    assert beta[0] == pytest.approx(1.0, abs=1e-6) and beta[1] == pytest.approx(0.0, abs=1e-6)


def test_same_history_same_choices(monkeypatch):
    """No clock: two controllers fed the same acceptance choose alike (a seeded run repeats)."""
    a, b = controller(monkeypatch), controller(monkeypatch)
    hist = [([3, 0], [4, 4]), ([1, 4], [4, 4]), ([0, 0], [2, 2])]
    assert [a.observe(*h) or a.choose(5, 2) for h in hist] == [b.observe(*h) or b.choose(5, 2) for h in hist]


def test_pass_costs_are_measured_once_and_kept(monkeypatch, tmp_path):
    """The table is written whole under $BASS_CACHE_DIR and read back, not measured again."""
    from sampling import control
    monkeypatch.setenv("BASS_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(control, "_TABLES", {})
    model = tiny_model("llama", seed=0, dtype=torch.float32)
    costs = pass_costs(model, CacheSpec())
    table = json.loads((tmp_path / "pass-costs.json").read_text())
    assert costs.rows == control.ROWS and len(costs.curves) == len(control.ROWS)
    assert len(table) == 1 and [list(c.tokens) for c in costs.curves] == next(iter(table.values()))["tokens"]
    assert all(ms > 0 for c in costs.curves for ms in c.ms)
    monkeypatch.setattr(control, "_TABLES", {})
    monkeypatch.setattr(control, "measure_table", lambda *a, **k: pytest.fail("measured again"))
    assert pass_costs(model, CacheSpec()) == costs


def test_the_heads_stages_are_priced_and_the_ngram_lookup_is_not(monkeypatch, tmp_path):
    """Speculator heads run a stage and the target's lm_head per level: the controller prices them
    from their own curve (kept in the table beside the models'), level by level as wide as each."""
    from sampling import control
    monkeypatch.setenv("BASS_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(control, "_TABLES", {})
    target = tiny_model("llama", seed=0, dtype=torch.float32)
    heads = new_speculator(target, "mlp", 3, seed=5)
    _, stages = control.cost_tables(target, heads, CacheSpec())
    assert stages is not None and stages.per_slot == 0 and stages.rows == (1,)
    assert all(ms > 0 for ms in stages.curves[0].ms)
    assert len(json.loads((tmp_path / "pass-costs.json").read_text())) == 2     # the target's and the heads'
    assert control.cost_tables(target, NgramDrafter(), CacheSpec())[1] is None
    from sampling.params import SamplingParams
    chain = heads.drafter(SamplingParams(temperature=1.0), None)
    assert chain.work(3) == StepWork((1, 1, 1), 4)
    tree = heads.drafter(SamplingParams(temperature=1.0), None, tree="3,2,1")
    assert tree.work(2) == StepWork((1, 3), 10) and tree.work(3) == StepWork((1, 3, 6), 16)


class Scripted:
    """A controller that switches by a fixed script: AR steps, short and full drafts in turn."""

    def __init__(self, script):
        self.script = itertools.cycle(script)

    def choose(self, most, batch, context):
        return min(most, next(self.script))

    def observe(self, counts, limits):
        pass


SCRIPT = (0, 3, 1, 0, 0, 2, 4)                # an AR step first: right after the prefill


@pytest.fixture
def switching(monkeypatch):
    for module in (speculative_bass, speculative_sampling):
        monkeypatch.setattr(module, "make_controller", lambda *a, **k: Scripted(SCRIPT))


@pytest.mark.parametrize("case", ("google", "bass", "bass-ngram", "bass-mlp", "tree", "tree-dynamic", "tree-mlp",
                                  "cascade"))
def test_greedy_equals_ar_while_switching(case, switching):
    target = tiny_model("llama", seed=0, dtype=torch.float32)
    ids, mask = left_padded_batch(97, (5, 9, 3), seed=2)
    mode, kind = (case.split("-") + ["model"])[:2]
    draft = {"model": noisy_copy(target, 0.2), "ngram": NgramDrafter(),
             "mlp": new_speculator(target, "mlp", 3, seed=5, noise=0.05),
             "dynamic": noisy_copy(target, 0.2)}[kind]
    extra = {"tree": dict(tree="dynamic:6:3:3" if kind == "dynamic" else "2,2,1")}.get(mode, {})
    if mode == "cascade":
        draft = [noisy_copy(target, 0.5), noisy_copy(target, 0.2)]
    res = generate(target, ids, mask, draft_model=draft, mode=mode, max_new_tokens=12, gamma=3, temperature=0,
                   **extra)
    assert res.tokens == greedy_reference(target, ids, mask, 12)
    assert 0 in res.stats["gamma_trace"] and max(res.stats["gamma_trace"]) > 1     # it did switch


@pytest.mark.parametrize("mode", ("google", "bass", "tree"))
def test_sampled_law_while_switching(mode, switching):
    """Joint law of the first 3 new tokens against enumeration, the draft length switching (AR steps
    included) by the script."""
    V, K = 5, 3
    params = CASES["t1"]
    target, draft = peaked_models(11, 12)
    prompt = [1, 3, 0, 4]
    N = 3000
    ids = torch.tensor([prompt] * N)
    extra = dict(tree="2,2") if mode == "tree" else dict(gamma=2)
    res = generate(target, ids, draft_model=draft, mode=mode, max_new_tokens=K, temperature=1.0, seed=3, **extra)
    pval = joint_pvalue(res.tokens, target, prompt, params, K, V)
    assert 0.05 < res.stats["acceptance_rate"] < 0.95 and pval > ALPHA, (res.stats["acceptance_rate"], pval)


def test_always_is_the_schedule(monkeypatch):
    assert Always().choose(5, 32) == 5


def test_the_first_step_drafts_in_full_where_drafts_could_pay(monkeypatch):
    """Before any acceptance is seen, the prior alone must not rule drafting out: draft what is
    allowed, unless no draft could pay at this batch even if every one were accepted."""
    c = controller(monkeypatch, target=(2.0, 1.0))
    assert c.choose(5, 4) == 5                             # at a batch where the prior says AR
    c.observe([0] * 4, [5] * 4)
    assert c.choose(5, 4) == 0
    fresh = controller(monkeypatch, target=(2.0, 1.0))
    assert fresh.choose(5, 64) == 0                        # compute-bound: a draft costs what it could bring


def test_a_generation_of_ar_steps_never_runs_the_draft(monkeypatch):
    """The draft model's prefill waits for its first draft: a controller that never drafts costs
    no draft pass at all, and the output is still greedy AR's."""
    from sampling import speculative_bass as sb
    target = tiny_model("llama", seed=0, dtype=torch.float32)
    ids, mask = left_padded_batch(97, (5, 9, 3), seed=2)
    monkeypatch.setattr(sb, "make_controller", lambda *a, **k: Scripted((0,)))
    for mode, extra in (("bass", {}), ("tree", dict(tree="dynamic:6:3:3"))):
        res = generate(target, ids, mask, draft_model=noisy_copy(target, 0.2), mode=mode, max_new_tokens=8,
                       temperature=0, **extra)
        assert res.tokens == greedy_reference(target, ids, mask, 8)
        assert res.stats["draft_calls"] == 0, mode


def test_a_draft_must_promise_the_margin_over_ar(monkeypatch):
    """A step drafts only where it expects MARGIN times AR's tokens per ms: a gain of a few per cent
    is within what a cost curve errs by."""
    from sampling.control import MARGIN
    assert MARGIN == 1.05
    c = controller(monkeypatch, target=(10.0, 0.0), draft=(1.4, 0.0))
    assert c.best(1, 1, assume=0.2)[0] == 1                    # 1.2 tokens for 11.4 ms: 1.053x AR's
    c = controller(monkeypatch, target=(10.0, 0.0), draft=(1.5, 0.0))
    assert c.best(1, 1, assume=0.2) == (0, pytest.approx(0.1))   # 1.043x: AR, at AR's rate


def test_a_kept_table_of_another_format_is_measured_again(tmp_path, monkeypatch):
    from sampling import control
    monkeypatch.setenv("BASS_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(control, "_TABLES", {})
    old = dict(tokens=[1, 2], ms=[5.0, 6.0], per_slot=0.0, format=2)          # one row's curve, the format before
    (tmp_path / "pass-costs.json").write_text(json.dumps({"k": old}))
    fresh = CostTable((1, 2), (CostCurve((1, 2), (7.0, 8.0)), CostCurve((1,), (9.0,))), 0.5)
    assert control.kept_table("k", lambda: fresh) == fresh                 # the old format's entry: measured again
    assert json.loads((tmp_path / "pass-costs.json").read_text())["k"]["format"] == control.TABLE_FORMAT
    monkeypatch.setattr(control, "_TABLES", {})
    assert control.kept_table("k", lambda: pytest.fail("measured again")) == fresh   # now kept: read back whole
