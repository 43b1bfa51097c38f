"""`gl-ray tune`: Ray Tune over GrowLength ladders, stage ratios and optimizer settings.

The third Ray layer: the Tuner runs `trial_driver` per trial, which builds and fits the trial's TorchTrainer (the
Train V2 pattern) with a callback that forwards its reports to Tune. Every trial trains under the same budget;
the objective is the validation loss at the final (longest) length, carried forward between evaluations so
that ASHA can compare trials at any report.

A search space is a YAML file (see tune_spaces/):

    name: tune-ladders                 # TUNE_DIR = {ray.storage_path}/{name}; trials in TUNE_DIR/trials/
    base_config: tiny-growlength       # a shipped config by name, or a path (relative to here or the space)
    overrides: ["train.log_every_steps=4"]       # fixed --set for every trial
    budget: {tokens: 1048576}          # or {time_s: 120}: the same per-trial budget
    evals: 4                           # validation passes per trial (ASHA rungs should fall on them)
    search: random                     # random | grid | optuna
    num_samples: 8                     # samples (grid: repeats of the grid)
    max_concurrent_trials: 0           # 0: as many as the cluster's CPUs/GPUs fit
    scheduler: {type: asha, grace_fraction: 0.25, reduction_factor: 2}   # or {type: fifo}; see below
    params:
      ladder: {choice: ["64-128-256-512", "128-256-512", "64-512"]}      # -> schedule.lengths
      first_ratio: {uniform: [0.1, 0.7]}     # share of stage 0, the rest split equally
      ratios: {choice: ["1-1-1-1", "4-3-2-1"]}  # weights per stage, normalised to sum 1
      optim.lr: {loguniform: [1.0e-4, 1.0e-2]}
      schedule.tokens_per_step: {choice: [4096, 8192]}

ASHA compares trials only after every one of them has reached its final length. Its first rung is the later of
grace_fraction of the budget and the first evaluation after the last trial's final-stage start (each categorical
combination and both ends of first_ratio's range are planned before any trial runs: `fair_grace_period`). Before
that point a ladder that starts short has a final-length loss from a model trained only short, and would be
stopped against fixed-long trials that it beats at the end. When no rung is left before the budget's end, ASHA
stops nothing and says so; more `evals` put a rung closer after the last switch.
"""

from __future__ import annotations

import csv
import itertools
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from gl_ray import storage
from gl_ray.config import all_keys, dump_config, load_config, read_yaml, unknown_key
from gl_ray.errors import UserError, find_user_error
from gl_ray.shipped import find_shipped, shipped_names
from gl_ray.train.preflight import preflight

SPECIAL = ("ladder", "first_ratio", "ratios")
DISTRIBUTIONS = ("choice", "grid", "uniform", "loguniform", "randint")


@dataclass
class Space:
    name: str
    base_config: str
    params: dict
    overrides: list = field(default_factory=list)
    budget_tokens: int = 0
    budget_time_s: float = 0.0
    evals: int = 4
    search: str = "random"
    num_samples: int = 4
    max_concurrent_trials: int = 0
    scheduler: dict = field(default_factory=lambda: {"type": "asha"})
    # The latest point (tokens, or seconds under a time budget) by which every trial of the space has evaluated
    # after starting its final-length stage: ASHA's first rung is never earlier (see fair_grace_period)
    last_switch: float = 0.0


def parse_ladder(text: str) -> list[int]:
    try:
        lengths = [int(x) for x in str(text).split("-")]
    except ValueError:
        raise UserError(f"ladder {text!r} must look like 128-256-512") from None
    if any(b <= a for a, b in zip(lengths, lengths[1:])):
        raise UserError(f"ladder {text!r} is not strictly increasing")
    return lengths


def parse_weights(text: str, stages: int) -> list[float]:
    try:
        w = [float(x) for x in str(text).split("-")]
    except ValueError:
        raise UserError(f"ratios {text!r} must look like 4-3-2-1 (weights, normalised to sum 1)") from None
    if len(w) != stages or any(not (x > 0 and math.isfinite(x)) for x in w):
        raise UserError(f"ratios {text!r} cannot normalise over {stages} stages (need {stages} positive weights)")
    return [x / sum(w) for x in w]


def load_space(path: str, extra_overrides: list[str] | None = None, num_samples: int | None = None) -> Space:
    """Read and fully validate a space (a path or a shipped space's name): every categorical combination is
    planned before any trial starts."""
    path = str(find_shipped(path, "tune_spaces"))
    raw = read_yaml(path, f"search space {path!r}") or {}
    known = {"name", "base_config", "params", "overrides", "budget", "evals", "search", "num_samples",
             "max_concurrent_trials", "scheduler"}
    for k in raw:
        if k not in known:
            raise UserError(f"search space {path!r}: unknown field {k!r} (fields: {', '.join(sorted(known))})")
    budget = raw.get("budget") or {}
    if set(budget) - {"tokens", "time_s"} or not budget:
        raise UserError(f"search space {path!r}: budget must be {{tokens: N}} or {{time_s: S}}")
    space = Space(name=str(raw.get("name") or Path(path).stem), base_config=str(raw.get("base_config", "")),
                  params=raw.get("params") or {},
                  overrides=list(raw.get("overrides") or []) + list(extra_overrides or []),
                  budget_tokens=int(budget.get("tokens", 0)), budget_time_s=float(budget.get("time_s", 0.0)),
                  evals=int(raw.get("evals", 4)), search=str(raw.get("search", "random")),
                  num_samples=int(num_samples or raw.get("num_samples", 4)),
                  max_concurrent_trials=int(raw.get("max_concurrent_trials", 0)),
                  scheduler=dict(raw.get("scheduler") or {"type": "asha"}))
    space.base_config = _find_config(space.base_config, path)
    if space.search not in ("random", "grid", "optuna"):
        raise UserError(f"search {space.search!r} must be random | grid | optuna")
    if space.scheduler.get("type") not in ("asha", "fifo"):
        raise UserError(f"scheduler type {space.scheduler.get('type')!r} must be asha | fifo")
    if not space.params:
        raise UserError(f"search space {path!r} has no params to search")
    keys = all_keys()
    for name, dist in space.params.items():
        if name not in SPECIAL and name not in keys:
            raise unknown_key(name, list(SPECIAL) + keys)
        if not isinstance(dist, dict) or len(dist) != 1 or next(iter(dist)) not in DISTRIBUTIONS:
            raise UserError(f"param {name!r}: give one distribution of {', '.join(DISTRIBUTIONS)}, e.g. "
                            "{choice: [a, b]}")
        kind, arg = next(iter(dist.items()))
        if kind in ("uniform", "loguniform", "randint") and (not isinstance(arg, list) or len(arg) != 2
                                                             or not arg[0] < arg[1]):
            raise UserError(f"param {name!r}: {kind} needs [low, high] with low < high")
        if kind in ("choice", "grid") and (not isinstance(arg, list) or not arg):
            raise UserError(f"param {name!r}: {kind} needs a non-empty list")
    if "ratios" in space.params and "first_ratio" in space.params:
        raise UserError("give either ratios or first_ratio, not both")
    _validate_combinations(space)
    return space


def _find_config(base: str, space_path: str) -> str:
    """The base config as an absolute path (trials run in other working directories): relative to the
    current directory, else to the space file's folder or its parent, else a shipped config's name."""
    if not base:
        raise UserError(f"search space {space_path!r} names no base_config")
    for root in (Path.cwd(), Path(space_path).resolve().parent, Path(space_path).resolve().parent.parent):
        if (root / base).is_file():
            return str((root / base).resolve())
    try:
        return str(find_shipped(base, "configs").resolve())
    except UserError:
        raise UserError(f"search space {space_path!r}: base_config {base!r} not found (a path, or a shipped "
                        f"config's name: {', '.join(shipped_names('configs'))})") from None


def _representatives(name: str, dist: dict) -> list:
    kind, arg = next(iter(dist.items()))
    if kind in ("choice", "grid"):
        return list(arg)
    if name == "first_ratio":
        return [arg[0], arg[1] if kind != "randint" else arg[1] - 1]
    return [arg[0]]


def _validate_combinations(space: Space) -> None:
    """Plan every categorical combination (and both ends of first_ratio's range); record the latest final-length
    switch among them in space.last_switch."""
    combos = list(itertools.product(*[_representatives(n, d) for n, d in space.params.items()]))
    if len(combos) > 2000:
        combos = combos[:2000]
    space.last_switch = 0.0
    for values in combos:
        overrides = trial_overrides(space, dict(zip(space.params, values)))
        try:
            cfg = load_config(space.base_config, overrides)
            plan = preflight(cfg)
            if cfg.ray.num_workers == 0:  # a Ray-free run reports nothing to Tune: every trial would score inf
                raise UserError("gl-ray tune trains each trial on Ray Train: set ray.num_workers to 1 or more")
        except UserError as e:
            shown = ", ".join(f"{k}={v}" for k, v in zip(space.params, values))
            raise UserError(f"search space {space.name!r}: trial ({shown}) is invalid: {e}") from None
        space.last_switch = max(space.last_switch, final_length_evaluated_at(plan, space, cfg.train.eval_every_tokens))


def final_length_evaluated_at(plan, space: Space, eval_every_tokens: int) -> float:
    """When a trial of `plan` first reports a validation loss measured after training at its final length: in
    tokens, the first eval (a multiple of eval_every_tokens, or the end) past its last stage's start; under a time
    budget, the last stage's start plus one eval interval (budget / evals)."""
    last = plan.stages[-1]
    if space.budget_time_s:
        started_s = sum(st.time_s for st in plan.stages[:-1])
        return min(space.budget_time_s, started_s + space.budget_time_s / max(1, space.evals))
    end = last.start_token + last.tokens
    if not eval_every_tokens:
        return float(end)
    return float(min(end, (last.start_token // eval_every_tokens + 1) * eval_every_tokens))


def fair_grace_period(space: Space) -> float:
    """ASHA's first rung: the space's grace_fraction of the budget, but never before every trial has evaluated at
    its final length (space.last_switch). Earlier, a ladder that starts short would be judged on a model that has
    trained only short, against fixed-long trials: the search would be biased against GrowLength."""
    max_t = space.budget_time_s or space.budget_tokens
    return max(1.0, float(space.scheduler.get("grace_fraction", 0.25)) * max_t, space.last_switch)


def trial_overrides(space: Space, params: dict, name: str | None = None) -> list[str]:
    """--set overrides of one trial: its tracker group (the search; the space's overrides may change it), the
    space's fixed ones, the budget, then the sampled params."""
    out = [f"train.tracker_group={space.name}", *space.overrides]
    out += [f"schedule.budget_tokens={space.budget_tokens}", f"schedule.budget_time_s={space.budget_time_s}"]
    base = load_config(space.base_config, out, validate=False)
    lengths = parse_ladder(params["ladder"]) if "ladder" in params else list(base.schedule.lengths)
    if "ladder" in params:
        out.append(f"schedule.lengths={lengths}")
        out.append("schedule.ratios=[]")
    if "first_ratio" in params:
        r = float(params["first_ratio"])
        if len(lengths) == 1:
            ratios = [1.0]
        elif not 0 < r < 1:
            raise UserError(f"first_ratio {r} must be in (0, 1)")
        else:
            ratios = [r] + [(1 - r) / (len(lengths) - 1)] * (len(lengths) - 1)
        out.append(f"schedule.ratios={ratios}")
    if "ratios" in params:
        out.append(f"schedule.ratios={parse_weights(params['ratios'], len(lengths))}")
    for k, v in params.items():
        if k not in SPECIAL:
            out.append(f"{k}={v}")
    budget = space.budget_tokens or 0
    if budget:  # evaluate `evals` times per trial so that ASHA's rungs see a validation loss
        out.append(f"train.eval_every_tokens={max(1, budget // max(1, space.evals))}")
    if name:
        out.append(f"name={name}")
    return out


def _domain(kind: str, arg):
    from ray import tune

    return {"choice": lambda: tune.choice(arg), "grid": lambda: tune.grid_search(arg),
            "uniform": lambda: tune.uniform(*arg), "loguniform": lambda: tune.loguniform(*arg),
            "randint": lambda: tune.randint(*arg)}[kind]()


def _trial_driver(config: dict, space: Space, trials_dir: str) -> None:
    """One trial: build and fit its TorchTrainer; Tune sees its reports through TuneObjective. The run folder is
    named by the trial id, so a restarted trial resumes its own checkpoints."""
    import ray.tune

    from gl_ray.train.driver import launch_run

    trial_id = ray.tune.get_context().get_trial_id()
    overrides = trial_overrides(space, dict(config), name=f"trial-{trial_id}")
    overrides.append(f"ray.storage_path={trials_dir}")
    cfg = load_config(space.base_config, overrides)
    launch_run(cfg, quiet=True, callbacks=[_objective_callback()])


def _objective_callback():
    from ray.tune.integration.ray_train import TuneReportCallback

    class TuneObjective(TuneReportCallback):
        """Adds `objective`: the latest val loss at the final length (inf before the first evaluation)."""

        def __init__(self):
            super().__init__()
            self.last = float("inf")

        def after_report(self, run_context, metrics, checkpoint):
            m = dict(metrics[0])
            if "val_loss_final_len" in m:
                self.last = m["val_loss_final_len"]
            m["objective"] = self.last
            super().after_report(run_context, [m], checkpoint)

    return TuneObjective()


def _concurrency(space: Space, base) -> int:
    """Trials at once: the space's setting, else as many as the cluster's CPUs (and GPUs) fit."""
    import ray

    per_trial_cpus = 1 + base.ray.num_workers * base.ray.cpus_per_worker + 1  # driver + workers + data
    concurrent = space.max_concurrent_trials or max(1, int(ray.cluster_resources().get("CPU", 1) // per_trial_cpus))
    if base.ray.use_gpu:
        gpus = ray.cluster_resources().get("GPU", 0)
        concurrent = min(concurrent, max(1, int(gpus // max(1, base.ray.num_workers))))
    return concurrent


def _param_space(space: Space) -> dict:
    """Tune domains of the params; under grid search, every choice list becomes a grid axis."""
    from ray import tune

    def domain(d: dict):
        kind, arg = next(iter(d.items()))
        if space.search == "grid" and kind in ("choice", "grid"):
            return tune.grid_search(list(arg))
        return _domain(kind, arg)

    return {k: domain(d) for k, d in space.params.items()}


def _tune_config(space: Space, concurrent: int):
    """Scheduler (ASHA on tokens or elapsed time, or FIFO) and search algorithm of the space."""
    from ray import tune

    time_attr = "elapsed_s" if space.budget_time_s else "tokens"
    max_t = space.budget_time_s or space.budget_tokens
    if space.scheduler.get("type") == "asha":
        from ray.tune.schedulers import ASHAScheduler

        grace = fair_grace_period(space)
        if grace >= max_t:
            print(f"[tune] ASHA has no rung after every trial reached its final length ({space.last_switch:g} of "
                  f"{max_t:g} {time_attr}): no trial is stopped early", flush=True)
        scheduler = ASHAScheduler(time_attr=time_attr, max_t=max_t, grace_period=min(grace, max_t),
                                  reduction_factor=float(space.scheduler.get("reduction_factor", 2)))
    else:
        from ray.tune.schedulers import FIFOScheduler

        scheduler = FIFOScheduler()
    search_alg = None
    if space.search == "optuna":
        try:
            from ray.tune.search.optuna import OptunaSearch
        except ImportError:
            raise UserError("search: optuna needs the optuna package (pip install optuna)") from None
        search_alg = OptunaSearch()
    return tune.TuneConfig(metric="objective", mode="min", scheduler=scheduler, search_alg=search_alg,
                           num_samples=space.num_samples, max_concurrent_trials=concurrent)


def run_tune(config_path: str | None, space_path: str, overrides: list[str], num_samples: int | None = None,
             address: str | None = None) -> dict:
    """The Tune driver: validate the space, start or resume the search, write ranked results and best.yaml."""
    space = load_space(space_path, overrides, num_samples)
    if config_path:
        space.base_config = _find_config(config_path, space_path)
        _validate_combinations(space)
    base = load_config(space.base_config, trial_overrides(space, {}), validate=False)  # params complete it
    if not storage.is_s3(base.data.path):  # trials run in other working directories
        space.overrides.append(f"data.path={storage.absolute(base.data.path)}")
    if storage.is_s3(base.ray.storage_path):
        raise UserError("gl-ray tune keeps its results on local disk: set ray.storage_path to a local folder")
    from gl_ray.ray_utils import check_address, ensure_ray

    check_address(address or base.ray.address or None)  # before the search folder is made
    tune_dir = os.path.join(storage.absolute(base.ray.storage_path), space.name)
    Path(tune_dir, "trials").mkdir(parents=True, exist_ok=True)
    from ray import tune

    local_cpus = base.ray.local_num_cpus or int(base.ray.num_workers * base.ray.cpus_per_worker) + 3
    ensure_ray(address or base.ray.address or None, num_cpus=local_cpus,  # custom resources: enough for any trials
               resources={k: v * base.ray.num_workers * local_cpus for k, v in base.ray.worker_resources.items()})
    param_space = _param_space(space)
    trainable = tune.with_resources(
        tune.with_parameters(_trial_driver, space=space, trials_dir=os.path.join(tune_dir, "trials")), {"CPU": 1})
    if tune.Tuner.can_restore(tune_dir):
        print(f"[tune] resuming the search in {tune_dir}", flush=True)
        tuner = tune.Tuner.restore(tune_dir, trainable=trainable, resume_unfinished=True, resume_errored=True,
                                   param_space=param_space)
    else:
        tuner = tune.Tuner(trainable, param_space=param_space,
                           tune_config=_tune_config(space, _concurrency(space, base)),
                           run_config=tune.RunConfig(name=space.name, storage_path=os.path.dirname(tune_dir)))
    grid = tuner.fit()
    res = write_results(space, grid, tune_dir)
    if all(r["status"] == "ERROR" for r in res["rows"]):
        errors = [find_user_error(r.error) for r in grid if r.error]
        first = next((e for e in errors if e is not None), None)
        raise UserError(f"all {len(res['rows'])} trials failed" + (f": {first}" if first else f"; see {tune_dir}"))
    return res


def write_results(space: Space, grid, tune_dir: str) -> dict:
    """results.csv / results.md ranked best first, objective-vs-params PNG and best.yaml."""
    budget = space.budget_time_s or space.budget_tokens
    budget_key = "elapsed_s" if space.budget_time_s else "tokens"
    rows = []
    for r in grid:
        params = dict(r.config or {})
        m = r.metrics or {}
        status = "ERROR" if r.error else ("COMPLETED" if m.get(budget_key, 0) >= budget * 0.999 else "STOPPED")
        rows.append({"trial": (m.get("trial_id") or Path(r.path).name), **{f"param:{k}": v for k, v in params.items()},
                     "objective": m.get("objective", float("inf")), "tokens": m.get("tokens"),
                     "wall_s": m.get("elapsed_s"), "status": status, "_params": params})
    order = {"COMPLETED": 0, "STOPPED": 1, "ERROR": 2}
    rows.sort(key=lambda r: (order[r["status"]], r["objective"] if r["objective"] is not None else float("inf"),
                             str(r["trial"])))  # a tie (two params, one plan) ranks the same after a restore
    for i, r in enumerate(rows):
        r["rank"] = i + 1
    cols = ["rank", "trial", *sorted({k for r in rows for k in r if k.startswith("param:")}), "objective", "tokens",
            "wall_s", "status"]
    with open(os.path.join(tune_dir, "results.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    md = ["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    for r in rows:
        md.append("| " + " | ".join(_cell(r.get(c)) for c in cols) + " |")
    Path(tune_dir, "results.md").write_text(f"# {space.name}: objective = val loss at the final length, "
                                           f"budget {budget:g} {'s' if space.budget_time_s else 'tokens'}\n\n"
                                           + "\n".join(md) + "\n")
    _plot(rows, space, os.path.join(tune_dir, "objective_vs_params.png"))
    out = {"tune_dir": tune_dir, "rows": rows}
    done = [r for r in rows if r["status"] != "ERROR" and math.isfinite(r["objective"])]
    if done:
        best = done[0]
        cfg = load_config(space.base_config, trial_overrides(space, best["_params"], name=f"{space.name}-best"))
        Path(tune_dir, "best.yaml").write_text(f"# best trial {best['trial']} of {space.name}: objective "
                                               f"{best['objective']:.4f}\n" + dump_config(cfg))
        out["best"] = best
    return out


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def _plot(rows: list[dict], space: Space, path: str) -> None:
    from gl_ray.plots import plt, save_figure

    names = list(space.params)
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.5), squeeze=False)
    ok = [r for r in rows if r["status"] != "ERROR" and math.isfinite(r["objective"])]
    for ax, name in zip(axes[0], names):
        xs = [r["_params"].get(name) for r in ok]
        if xs and all(isinstance(x, (int, float)) for x in xs):
            ax.scatter(xs, [r["objective"] for r in ok])
        else:
            labels = sorted({str(x) for x in xs})
            ax.scatter([labels.index(str(x)) for x in xs], [r["objective"] for r in ok])
            ax.set_xticks(range(len(labels)), labels, rotation=30, fontsize=8)
        ax.set_xlabel(name)
        ax.set_ylabel("val loss at final length")
        ax.grid(alpha=0.3)
    fig.suptitle(space.name)
    save_figure(fig, path)
