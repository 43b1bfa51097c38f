import math

import pytest

from gl_ray.errors import UserError
from gl_ray.schedule import format_plan, lr_at, micro_batch_for, plan_stages, split_steps


def plan(**kw):
    args = dict(lengths=[128, 256, 512, 1024], ratios=[0.25, 0.25, 0.25, 0.25], tokens_per_step=8192,
                micro_batch_tokens=4096, num_workers=2, budget_tokens=8192 * 100)
    args.update(kw)
    return plan_stages(**args)


def test_stage_tokens_add_up_exactly_to_the_budget():
    p = plan(ratios=[0.1, 0.2, 0.3, 0.4], budget_tokens=8192 * 97)
    assert sum(s.tokens for s in p.stages) == p.total_tokens == 8192 * 97
    assert sum(s.steps for s in p.stages) == p.total_steps == 97
    assert [s.steps for s in p.stages] == [10, 19, 29, 39]  # 9.7, 19.4, 29.1, 38.8: largest remainders round up
    assert p.unplanned_tokens == 0
    # stages are contiguous in steps and tokens
    for a, b in zip(p.stages, p.stages[1:]):
        assert b.start_step == a.start_step + a.steps
        assert b.start_token == a.start_token + a.tokens


def test_remainder_below_one_step_is_reported():
    p = plan(budget_tokens=8192 * 10 + 100)
    assert p.total_tokens + p.unplanned_tokens == 8192 * 10 + 100
    assert p.unplanned_tokens == 100
    assert "100 budget tokens" in format_plan(p)


def test_per_stage_shapes():
    p = plan(micro_batch_tokens=2048)
    for s in p.stages:
        assert s.sequences_per_step * s.seq_len == 8192
        assert s.micro_batch * s.grad_accum * p.world_size == s.sequences_per_step
        assert s.micro_batch * s.seq_len <= 2048
    assert [s.grad_accum for s in p.stages] == [2, 2, 2, 2]


def test_one_stage_baseline():
    p = plan(lengths=[1024], ratios=[1.0])
    assert len(p.stages) == 1 and p.stages[0].steps == 100 and p.final_len == 1024


def test_equal_ratios_by_default():
    assert [s.steps for s in plan(ratios=[]).stages] == [25, 25, 25, 25]


@pytest.mark.parametrize("kw, needle", [
    (dict(tokens_per_step=8192 + 128, num_workers=1), "stage 1: schedule.tokens_per_step"),
    (dict(tokens_per_step=1024, num_workers=4), "stage 2: 2 sequences per step"),
    (dict(ratios=[0.5, 0.5, 0.5, 0.5]), "sum to 2"),
    (dict(ratios=[0.5, 0.5]), "2 entries"),
    (dict(ratios=[1.0, 0.0, 0.0, 0.0]), "must be a positive number"),
    (dict(lengths=[256, 128, 512, 1024]), "strictly increasing"),
    (dict(lengths=[128, 128, 512, 1024]), "strictly increasing"),
    (dict(lengths=[100, 256, 512, 1024]), "multiple of 8"),
    (dict(lengths=[], ratios=[]), "empty"),
    (dict(budget_tokens=8192 * 3), "smaller than one optimizer step"),
    (dict(budget_tokens=0), "set a budget"),
    (dict(micro_batch_tokens=512), "smaller than one sequence"),
    (dict(ratios=[0.97, 0.01, 0.01, 0.01], budget_tokens=8192 * 10), "gets no optimizer step"),
])
def test_plan_errors_name_the_problem(kw, needle):
    with pytest.raises(UserError, match=needle):
        plan(**kw)


def test_ratio_tolerance():
    plan(ratios=[0.25, 0.25, 0.25, 0.25 + 5e-7])
    with pytest.raises(UserError):
        plan(ratios=[0.25, 0.25, 0.25, 0.25 + 5e-6])


def test_split_steps_largest_remainder():
    assert split_steps(10, [1 / 3] * 3) == [3, 3, 4]
    assert sum(split_steps(1001, [0.1, 0.2, 0.7])) == 1001


def test_micro_batch_divides_the_per_worker_sequences():
    assert micro_batch_for(24, 128, 128 * 10) == 8  # largest divisor of 24 that is <= 10
    assert micro_batch_for(7, 64, 64 * 100) == 7


def test_lr_warmup_then_cosine_to_min():
    kw = dict(lr=1.0, min_lr=0.1, warmup_tokens=100, total_tokens=1100)
    assert lr_at(50, **kw) == pytest.approx(0.5)
    assert lr_at(100, **kw) == pytest.approx(1.0)
    assert lr_at(600, **kw) == pytest.approx(0.55)
    assert lr_at(1100, **kw) == pytest.approx(0.1)


def test_lr_is_continuous_across_stage_switches():
    p = plan(ratios=[0.1, 0.2, 0.3, 0.4])
    kw = dict(lr=6e-4, min_lr=6e-5, warmup_tokens=8192 * 5, total_tokens=p.total_tokens)
    per_step_max = max(abs(lr_at((i + 1) * 8192, **kw) - lr_at(i * 8192, **kw)) for i in range(p.total_steps))
    for st in p.stages[1:]:
        before, after = lr_at(st.start_token, **kw), lr_at(st.start_token + p.tokens_per_step, **kw)
        assert abs(after - before) <= per_step_max + 1e-12
    # a schedule of tokens alone: the same tokens give the same LR whatever the ladder
    q = plan(lengths=[1024], ratios=[1.0])
    assert q.total_tokens == p.total_tokens


def test_time_budget_mode():
    p = plan(budget_tokens=0, budget_time_s=100.0, cap_tokens=8192 * 40, ratios=[0.1, 0.2, 0.3, 0.4])
    assert p.time_mode
    assert [s.time_s for s in p.stages] == pytest.approx([10.0, 20.0, 30.0, 40.0])
    assert sum(s.steps for s in p.stages) == 40  # data caps sized from the corpus
    lr_mid = lr_at(0, 1.0, 0.0, 0, 0, time_frac=0.5)
    assert lr_mid == pytest.approx(0.5)
    assert lr_at(10**9, 1.0, 0.0, 0, 0, time_frac=1.0) == pytest.approx(0.0)
    unknown = plan(budget_tokens=0, budget_time_s=100.0)
    assert all(s.steps == 0 for s in unknown.stages)
    assert "time budget" in format_plan(unknown)


def test_plan_round_trips_as_a_dict():
    """The driver ships its plan to the workers as a plain dict; they get the same plan back."""
    from gl_ray.schedule import Plan

    for p in (plan(ratios=[0.1, 0.2, 0.3, 0.4]), plan(budget_tokens=0, budget_time_s=50.0, cap_tokens=8192 * 40)):
        assert Plan.from_dict(p.to_dict()) == p
        assert [s.rows_per_rank_step * p.world_size for s in p.stages] == [s.sequences_per_step for s in p.stages]


def test_plan_json_shape():
    j = plan().to_json()
    assert set(j) >= {"stages", "total_tokens", "total_steps"}
    assert set(j["stages"][0]) == {"index", "seq_len", "sequences_per_step", "micro_batch", "grad_accum", "steps",
                                   "tokens"}
    assert not math.isnan(j["total_tokens"])
