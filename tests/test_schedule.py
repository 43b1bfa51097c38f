import json
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
    """A tiny two-stage run (L=32 for 6 steps, then L=64 for 6): the LR the optimizer holds at each of its steps
    is warmup then cosine of the tokens seen after that step, whatever the stage, so it does not jump at the
    switch. The expected LRs are worked out here, not with lr_at."""
    import numpy as np

    from gl_ray.config import load_config
    from gl_ray.schedule import make_plan
    from gl_ray.train.io import WorkerIO
    from gl_ray.train.loop import Trainer

    class RandomRowsIO(WorkerIO):
        """One process without Ray or files: random rows of each step's shape; reports and checkpoints dropped."""

        def __init__(self, vocab_size: int):
            self.vocab_size, self.stages_read = vocab_size, []

        def batches(self, stage, start_step):
            rng = np.random.default_rng(stage.index)
            while True:
                self.stages_read.append(stage.index)
                yield rng.integers(0, self.vocab_size, (stage.rows_per_rank_step, stage.seq_len), dtype=np.int32)

        def report(self, metrics, checkpoint=None):
            pass

        def restore(self, model, optimizer):
            return None

    class NoEval:
        micro_batch_tokens = 1024

        def loss(self, *args, **kwargs):
            return 0.0

    lr, min_lr, warmup, tokens_per_step = 1e-3, 1e-4, 2048, 1024
    cfg = load_config(None, [
        "model.preset=tiny", "model.max_position_embeddings=64", "schedule.lengths=[32,64]",
        "schedule.ratios=[0.5,0.5]", f"schedule.tokens_per_step={tokens_per_step}", "schedule.budget_tokens=12288",
        "train.micro_batch_tokens=1024", "train.device=cpu", "train.eval_every_tokens=0", f"optim.lr={lr}",
        f"optim.min_lr={min_lr}", f"optim.warmup_tokens={warmup}", "ray.num_workers=0", "data.path=unused"])
    plan = make_plan(cfg)
    assert [(s.seq_len, s.steps) for s in plan.stages] == [(32, 6), (64, 6)]

    io = RandomRowsIO(vocab_size=256)
    trainer = Trainer(cfg, plan, io, vocab_size=256, eos_id=0, evaluator=NoEval())
    seen = []  # per optimizer step: (stage of the rows it read, LR of each param group as the update runs)
    trainer.optimizer.register_step_pre_hook(
        lambda opt, args, kwargs: seen.append((io.stages_read[-1], [g["lr"] for g in opt.param_groups])))
    trainer.train()

    def expected(step: int) -> float:  # step counts from 1: the LR of the step that brings tokens to step * 1024
        tokens = step * tokens_per_step
        if tokens < warmup:
            return lr * tokens / warmup
        progress = (tokens - warmup) / (12288 - warmup)
        return min_lr + (lr - min_lr) * (1 + math.cos(math.pi * progress)) / 2

    assert [stage for stage, _ in seen] == [0] * 6 + [1] * 6  # a real switch from L=32 to L=64 after step 6
    got = [lrs for _, lrs in seen]
    assert all(len(set(lrs)) == 1 for lrs in got)  # with and without weight decay: one LR
    got = [lrs[0] for lrs in got]
    assert got == pytest.approx([expected(k) for k in range(1, 13)], rel=1e-12)  # steps 6 and 7 included


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
    # by hand: 100 steps of 8192 tokens, 25 per stage; 8192 / L sequences per step, half on each of 2 workers,
    # micro batches of 4096 / L sequences, so 1 micro batch each
    assert (j["total_tokens"], j["total_steps"], j["tokens_per_step"], j["world_size"]) == (819200, 100, 8192, 2)
    assert j["stages"] == [{"index": i, "seq_len": L, "sequences_per_step": 8192 // L, "micro_batch": 4096 // L,
                            "grad_accum": 1, "steps": 25, "tokens": 25 * 8192}
                           for i, L in enumerate([128, 256, 512, 1024])]
    assert json.loads(json.dumps(j)) == j  # plain JSON values, as RUN/plan.json stores them


def test_a_rope_base_per_stage_is_planned_printed_and_checked():
    from gl_ray.config import load_config
    from gl_ray.schedule import make_plan

    cfg = load_config("pipelines/configs/tiny-growlength.yaml", ["schedule.rope_theta=[1e4,1e4,1e5,5e5]"])
    plan = make_plan(cfg)
    assert [s.rope_theta for s in plan.stages] == [1e4, 1e4, 1e5, 5e5]
    assert [s["rope_theta"] for s in plan.to_json()["stages"]] == [1e4, 1e4, 1e5, 5e5]
    assert "rope_theta" in format_plan(plan).splitlines()[0] and "500000" in format_plan(plan)
    assert "rope_theta" not in format_plan(make_plan(load_config("pipelines/configs/tiny-growlength.yaml")))
    for bad, match in (("[1e4,1e5]", "2 values for 4 stages"), ("[1e4,1e4,0,5e5]", "must be positive")):
        with pytest.raises(UserError, match=match):
            make_plan(load_config("pipelines/configs/tiny-growlength.yaml", [f"schedule.rope_theta={bad}"]))
