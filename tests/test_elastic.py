"""Elastic worker counts and preemption notices without a cluster (issue 26): the config and the plans of an
elastic run, the loop's answer to a notice (a checkpoint at the step, a wait, then the same run), and what
starts.jsonl and `gl-ray status` say when a notice was too short. The cluster runs are in test_multinode.py."""

import json
import time

import pytest
from conftest import cli_inprocess, metrics, run_tiny, tiny_overrides
from test_reliability import assert_user_error

from gl_ray.config import load_config
from gl_ray.schedule import plans_by_world
from gl_ray.status import format_status, run_status
from gl_ray.train.outputs import RunOutputs, read_starts, record_notice, record_start


def test_num_workers_min_max_is_an_elastic_range():
    cfg = load_config(None, ["ray.num_workers=[1,4]", "schedule.tokens_per_step=12288", "schedule.lengths=[64,128]",
                             "schedule.budget_tokens=122880"])
    assert (cfg.ray.min_workers, cfg.ray.num_workers, cfg.ray.world_sizes) == (1, 4, [1, 2, 3, 4])
    plans = plans_by_world(cfg)
    assert sorted(plans) == [1, 2, 3, 4]
    for w, plan in plans.items():  # the same steps and rows per step; only the split over workers differs
        assert plan.world_size == w
        assert [(s.seq_len, s.steps, s.sequences_per_step) for s in plan.stages] == \
            [(s.seq_len, s.steps, s.sequences_per_step) for s in plans[4].stages]
        assert all(s.rows_per_rank_step * w == s.sequences_per_step for s in plan.stages)
    fixed = load_config(None, ["ray.num_workers=2"])
    assert (fixed.ray.min_workers, fixed.ray.world_sizes) == (0, [2])


@pytest.mark.parametrize("sets,needle", [
    (["ray.num_workers=[0,2]"], "[min, max] with 1 <= min <= max"),
    (["ray.num_workers=[3,2]"], "[min, max] with 1 <= min <= max"),
    (["ray.num_workers=[1,2,3]"], "[min, max] with 1 <= min <= max"),
    (["ray.num_workers=[2]"], "[min, max] with 1 <= min <= max"),
    (["ray.num_workers=2", "ray.min_workers=3"], "ray.min_workers=3 is above ray.num_workers=2"),
    (["ray.num_workers=[1,4]", "schedule.tokens_per_step=1024", "schedule.lengths=[32,64]",
      "schedule.budget_tokens=16384"],
     "ray.num_workers [1, 4]: stage 0: 32 sequences per step (seq_len 32) do not split evenly over 3 workers"),
    (["ray.start_timeout_s=0"], "ray.start_timeout_s must be positive"),
], ids=["min-zero", "min-above-max", "three-values", "one-value", "min-workers-key",
        "a-world-size-that-does-not-divide", "start-timeout"])
def test_bad_elastic_settings_are_one_line(tmp_path, capsys, monkeypatch, sets, needle):
    args = [x for s in sets for x in ("--set", s)]
    r = cli_inprocess(capsys, monkeypatch, "train", "--set", f"ray.storage_path={tmp_path}/runs", *args)
    assert_user_error(r, needle)
    assert not (tmp_path / "runs").exists()


def test_an_elastic_run_has_a_dataset_per_rank_of_every_world_size(tmp_path):
    from gl_ray.train.ray_train import stage_datasets

    cfg = load_config(None, tiny_overrides("data", str(tmp_path), "ds", **{"ray.num_workers": "[1,2]"}))
    names = sorted(stage_datasets(plans_by_world(cfg), cfg.data, str(tmp_path / "ds")))
    assert names == sorted(f"stage{k}_rank{r}_of{w}" for k in (0, 1) for w in (1, 2) for r in range(w))


def test_a_preemption_notice_checkpoints_at_the_step_then_the_run_goes_on_unchanged(baseline, tiny_data, tmp_path,
                                                                                    monkeypatch):
    """The workers see a notice at the meeting after step 3: they checkpoint at step 3 and wait for the restart;
    a node that is not taken (no restart here) leaves them training on after train's grace: every step once,
    the losses of the uninterrupted run, the notice in starts.jsonl."""
    import gl_ray.train.loop as loop
    from gl_ray.train.io import LocalIO

    calls = []

    def notice(self):
        calls.append(time.time())
        return time.time() if len(calls) >= 3 else None  # a deadline of now: the wait is the grace alone

    monkeypatch.setattr(LocalIO, "preemption_notice", notice)
    monkeypatch.setattr(loop, "NOTICE_GRACE_S", 1.5)
    t0 = time.monotonic()
    run_tiny(tiny_data, tmp_path, "noticed")
    assert time.monotonic() - t0 >= 1.5
    run = tmp_path / "noticed"
    assert len(calls) == 3  # asked at each meeting until the notice, never after it
    assert (run / "checkpoint_step-0000003").is_dir()
    lines = [json.loads(x) for x in (run / "starts.jsonl").read_text().splitlines()]
    assert [("start" in x, x.get("step")) for x in lines] == [(True, None), (False, 3)]
    got, want = metrics(run), metrics(baseline[2])
    assert [m["step"] for m in got] == [m["step"] for m in want]
    for a, b in zip(got, want, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)


def test_a_notice_too_short_to_checkpoint_says_so_on_the_restart(tmp_path, capsys):
    """A restart from an earlier step than the notice's: one line on the restart, and in `gl-ray status`."""
    from gl_ray.schedule import make_plan
    from gl_ray.train.checkpoint import TrainState

    run = str(tmp_path / "short")
    (tmp_path / "short").mkdir()
    record_start(run, 0, ["a", "b"], 0)
    record_notice(run, 8, time.time() + 5)
    cfg = load_config(None, tiny_overrides("data", str(tmp_path), "short"))
    out = RunOutputs(run, make_plan(cfg), "tok", rank=0, print_progress=False)
    out.on_restore(TrainState(step=4, stage_wall_s=[0.0, 0.0]), ["a"])
    said = capsys.readouterr().out
    assert said.strip() == ("the preemption notice at step 8 was too short for its checkpoint; resumed from step 4 "
                            "(0 reported steps trained again)")
    starts = read_starts(run)
    assert [(s["resumed_step"], s.get("notice_step")) for s in starts] == [(0, None), (4, 8)]
    (tmp_path / "short" / "plan.json").write_text(json.dumps(make_plan(cfg).to_json()))
    text = format_status(run_status(run))
    assert "restart 1 followed a preemption notice at step 8: too short to checkpoint, resumed from step 4" in text
