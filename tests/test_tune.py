"""gl-ray tune: space validation before any trial, and the smoke space end to end on local Ray."""

import csv
from pathlib import Path

import pytest
import yaml

from gl_ray.config import load_config
from gl_ray.errors import UserError
from gl_ray.schedule import make_plan
from gl_ray.tune import load_space, parse_weights, run_tune, trial_overrides

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((REPO / "tune_spaces").glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_spaces_validate(path):
    space = load_space(str(path))
    assert space.params


def _space(tmp_path, params: str, extra: str = "") -> str:
    p = tmp_path / "s.yaml"
    p.write_text(f"name: s\nbase_config: {REPO}/pipelines/configs/tiny-growlength.yaml\nbudget: {{tokens: 1048576}}\n"
                 f"{extra}params:\n{params}")
    return str(p)


@pytest.mark.parametrize("params, needle", [
    ("  optim.learning_rate: {loguniform: [0.001, 0.01]}\n", "unknown config key 'optim.learning_rate'"),
    ("  ladder: {choice: ['64-128', '256-128']}\n", "not strictly increasing"),
    ("  ladder: {choice: ['64-128']}\n  ratios: {choice: ['1-1-1']}\n", "cannot normalise over 2 stages"),
    ("  ladder: {choice: ['64-128']}\n  ratios: {choice: ['1-0']}\n", "cannot normalise"),
    ("  optim.lr: {normal: [0, 1]}\n", "give one distribution"),
    ("  optim.lr: {uniform: [0.1, 0.01]}\n", "low < high"),
    ("  ladder: {choice: ['64-1024']}\n", "exceeds model.max_position_embeddings"),
    ("  schedule.tokens_per_step: {choice: [8192, 1000]}\n", "not divisible"),
    ("  model.attention: {choice: [sdpa, flex]}\n", "trains on CUDA only"),
])
def test_invalid_spaces_fail_before_any_trial(tmp_path, params, needle):
    with pytest.raises(UserError, match=needle):
        load_space(_space(tmp_path, params))


def test_a_space_whose_trials_would_run_without_ray_train_is_refused(tmp_path):
    """A Ray-free trial (ray.num_workers: 0) reports nothing to Tune, so each would end with objective inf."""
    with pytest.raises(UserError, match="trial \\(ladder=64-128\\) is invalid: gl-ray tune trains each trial on Ray "
                                        "Train: set ray.num_workers to 1 or more"):
        load_space(_space(tmp_path, "  ladder: {choice: ['64-128']}\n", "overrides: [ray.num_workers=0]\n"))


def test_trial_overrides_translate_ladders_and_ratios(tmp_path):
    space = load_space(_space(tmp_path, "  ladder: {choice: ['64-128-256']}\n  first_ratio: {uniform: [0.2, 0.6]}\n"))
    cfg = load_config(space.base_config, trial_overrides(space, {"ladder": "64-128-256", "first_ratio": 0.5}))
    assert cfg.schedule.lengths == [64, 128, 256] and cfg.schedule.ratios == [0.5, 0.25, 0.25]
    assert cfg.train.eval_every_tokens == 1048576 // 4
    assert cfg.train.tracker_group == space.name  # trackers group the trials under the search
    assert parse_weights("4-3-2-1", 4) == [0.4, 0.3, 0.2, 0.1]


def test_a_grid_search_makes_each_choice_a_grid_axis():
    """The shipped smoke space (search: grid) gives Tune one grid axis per choice list: every ladder is a trial."""
    from ray import tune

    from gl_ray.tune import _param_space

    space = load_space(str(REPO / "tune_spaces" / "smoke.yaml"))
    assert space.search == "grid" and _param_space(space) == {"ladder": tune.grid_search(["32-64", "64"])}


def test_document_masking_is_a_searchable_param(tmp_path):
    space = load_space(_space(tmp_path, "  data.document_masking: {choice: [false, true]}\n"))
    assert load_config(space.base_config, trial_overrides(space, {"data.document_masking": True})).data.document_masking


def test_tied_trials_rank_the_same_in_any_grid_order(tmp_path):
    """Two first_ratio values can give one plan (16 steps: 0.67 and 0.71 both give stage 0 11 steps), so two
    trials tie; a restored search lists its trials in another order, and the ranking must not follow it."""
    from types import SimpleNamespace

    from gl_ray.tune import write_results

    space = load_space(_space(tmp_path, "  first_ratio: {uniform: [0.2, 0.8]}\n"))
    trials = [SimpleNamespace(config={"first_ratio": x}, error=None, path=str(tmp_path / name),
                              metrics={"trial_id": name, "objective": obj, "tokens": 1048576})
              for name, x, obj in (("b", 0.71, 6.7), ("a", 0.67, 6.7), ("c", 0.3, 6.9))]
    ranked = [[r["trial"] for r in write_results(space, grid, str(tmp_path))["rows"]]
              for grid in (trials, trials[::-1], trials[1:] + trials[:1])]
    assert ranked == [["a", "b", "c"]] * 3
    assert "best trial a of s" in (tmp_path / "best.yaml").read_text()


@pytest.mark.slow
def test_an_optuna_search_with_asha_end_to_end_and_again(tiny_data, ray_local, tmp_path):
    """The shipped smoke space's trials (Ray Train, one worker, document masks) under search: optuna (Ray's
    OptunaSearch) with the ASHA scheduler that the shipped spaces use; one search serves every end-to-end check:
    - every sampled first_ratio lies in its range and reaches its trial's plan; ASHA may stop the later trial at its
      rung (half the budget) but never the best one;
    - results.csv ranks the trials (best first), results.md and the plot are written, one run folder per trial,
      and best.yaml is a complete run config that plan and train accept as is;
    - the same command again restores the finished search (Tuner.restore) instead of starting a new one."""
    space = yaml.safe_load((REPO / "tune_spaces" / "smoke.yaml").read_text())
    space.update(name="tune-optuna", search="optuna", num_samples=2, params={"first_ratio": {"uniform": [0.2, 0.8]}},
                 scheduler={"type": "asha", "grace_fraction": 0.5, "reduction_factor": 2})
    space["overrides"] = [*space["overrides"], "schedule.lengths=[32,64]"]
    path = tmp_path / "optuna.yaml"
    path.write_text(yaml.safe_dump(space))
    overrides = [f"data.path={tiny_data}", f"ray.storage_path={tmp_path}"]
    res = run_tune(None, str(path), overrides)
    tune_dir = Path(res["tune_dir"])
    with open(tune_dir / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and rows[0]["status"] == "COMPLETED" and int(rows[0]["tokens"]) == 16384
    assert [r["rank"] for r in rows] == ["1", "2"]
    for r in rows[1:]:
        assert r["status"] == "COMPLETED" or (r["status"] == "STOPPED" and 8192 <= int(r["tokens"]) < 16384)
    objs = [float(r["objective"]) for r in rows]
    assert objs == sorted(objs) and all(x < 20 for x in objs)  # every trial reported a val loss
    sampled = [float(r["param:first_ratio"]) for r in rows]
    assert all(0.2 <= x <= 0.8 for x in sampled) and sampled[0] != sampled[1]
    for r, x in zip(rows, sampled):  # each trial trained with the share it was given
        trial_cfg = load_config(tune_dir / "trials" / f"trial-{r['trial']}" / "config.yaml")
        assert trial_cfg.schedule.ratios == pytest.approx([x, 1 - x])
        assert trial_cfg.data.document_masking and trial_cfg.ray.num_workers == 1
    assert (tune_dir / "results.md").exists() and (tune_dir / "objective_vs_params.png").stat().st_size > 5000
    trial_runs = sorted(p.name for p in (tune_dir / "trials").iterdir())
    assert len(trial_runs) == 2 and all(n.startswith("trial-") for n in trial_runs)
    best = load_config(tune_dir / "best.yaml")  # a complete run config that plan and train accept as is
    assert best.schedule.ratios[0] == pytest.approx(sampled[0], rel=1e-6)  # rows are ranked: best first
    assert sum(best.schedule.ratios) == pytest.approx(1.0)
    assert best.schedule.lengths == [32, 64] and make_plan(best).total_tokens == 16384
    again = run_tune(None, str(path), overrides)
    assert [r["trial"] for r in again["rows"]] == [r["trial"] for r in res["rows"]]
    assert len(list((tune_dir / "trials").iterdir())) == 2  # no trial ran twice


def test_the_schedules_space_compares_shapes_and_modes_at_one_budget(tmp_path):
    """Every trial of tune_spaces/schedules.yaml trains the same tokens; shapes and modes give the stages they
    name; a trial's config dumped as best.yaml is runnable as is (it loads back to the same plan)."""
    from gl_ray.config import dump_config

    space = load_space(str(REPO / "tune_spaces" / "schedules.yaml"))
    plans = {}
    for shape in ("ladder", "linear", "geometric"):
        for mode in ("reshape", "window"):
            params = {"schedule.shape": shape, "schedule.mode": mode, "schedule.warmup_fraction": 0.5}
            cfg = load_config(space.base_config, trial_overrides(space, params, name="best"))
            plans[shape, mode] = plan = make_plan(cfg)
            assert plan.total_tokens == space.budget_tokens
            best = tmp_path / "best.yaml"
            best.write_text(dump_config(cfg))
            assert make_plan(load_config(str(best))) == plan
    assert [s.seq_len for s in plans["ladder", "reshape"].stages] == [64, 128, 256, 512]
    assert [s.seq_len for s in plans["linear", "reshape"].stages] == list(range(64, 513, 64))
    assert [s.seq_len for s in plans["geometric", "reshape"].stages] == [64, 512]
    assert [(s.seq_len, s.window) for s in plans["geometric", "window"].stages] == [(512, 64), (512, 0)]
    assert sum(s.steps for s in plans["linear", "window"].stages[:-1]) == 20  # half of 40 steps before 512


def _asha_decisions(scheduler, reports: dict[str, list[tuple[int, float]]]) -> dict[str, str]:
    """Feed (tokens, objective) reports to an ASHA scheduler, trial by trial, as Tune would: STOP if it stopped the
    trial before the end of the budget (at the end, ASHA stops every trial: it is done), else CONTINUE."""
    from types import SimpleNamespace

    from ray.tune.schedulers import TrialScheduler

    scheduler.set_search_properties("objective", "min")
    out = {}
    for trial_id, points in reports.items():
        trial = SimpleNamespace(trial_id=trial_id)
        scheduler.on_trial_add(None, trial)
        out[trial_id] = TrialScheduler.CONTINUE
        for tokens, objective in points:
            decision = scheduler.on_trial_result(None, trial, {"tokens": tokens, "objective": objective})
            if decision == TrialScheduler.STOP and tokens < scheduler._max_t:
                out[trial_id] = TrialScheduler.STOP
                break
    return out


def test_asha_never_judges_a_ladder_before_its_final_length():
    """The shipped ladders space: a fixed-512 trial is good early, the 64-128-256-512 ladder's final-length loss
    is poor until it trains at 512 (from 3/4 of the budget) and best at the end. Ray's ASHA with the space's own
    grace_fraction (a rung at 1/4) stops the ladder; gl-ray's scheduler puts the first rung after every ladder's
    switch to 512 and keeps it."""
    from ray.tune.schedulers import ASHAScheduler

    from gl_ray.tune import _tune_config, fair_grace_period

    space = load_space("ladders")  # by name: a shipped space
    budget = space.budget_tokens
    every = budget // space.evals
    assert space.last_switch == 7 * every  # 64-128-256-512 reaches 512 at 3/4; its next eval is at 7/8
    assert fair_grace_period(space) == space.last_switch
    fixed = [(k * every, 6.0 - 0.2 * k) for k in range(1, space.evals + 1)]  # 5.8 ... 4.4
    ladder = [(k * every, 9.0) for k in range(1, 7)] + [(7 * every, 4.6), (8 * every, 4.2)]
    reports = {"fixed-512": fixed, "ladder": ladder}
    naive = ASHAScheduler(time_attr="tokens", max_t=budget, grace_period=0.25 * budget, reduction_factor=2)
    assert _asha_decisions(naive, reports)["ladder"] == "STOP"  # judged while it had trained only short
    fair = _tune_config(space, concurrent=1).scheduler
    assert isinstance(fair, ASHAScheduler)
    assert _asha_decisions(fair, reports) == {"fixed-512": "CONTINUE", "ladder": "CONTINUE"}


def test_asha_without_a_fair_rung_stops_nothing(tmp_path, capsys):
    """A first_ratio up to 0.7 starts the last of four stages at 90% of the budget: with 4 evals, no rung is left
    before the end, so ASHA stops no trial and the search says so."""
    from gl_ray.tune import _tune_config

    space = load_space(_space(tmp_path, "  first_ratio: {uniform: [0.1, 0.7]}\n",
                              "evals: 4\nscheduler: {type: asha, grace_fraction: 0.25}\n"))
    assert space.last_switch == space.budget_tokens
    scheduler = _tune_config(space, concurrent=1).scheduler
    assert "no trial is stopped early" in capsys.readouterr().out
    every = space.budget_tokens // 4
    reports = {"good": [(k * every, 5.0) for k in range(1, 5)], "late": [(k * every, 9.0) for k in range(1, 4)]}
    assert _asha_decisions(scheduler, reports) == {"good": "CONTINUE", "late": "CONTINUE"}
