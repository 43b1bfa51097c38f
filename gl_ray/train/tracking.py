"""Experiment trackers (train.loggers): TensorBoard, MLflow and Weights & Biases, written by rank 0 at every report
with the step as x-axis, besides RUN/metrics.jsonl.

    tensorboard  event files in RUN/tensorboard/ (an s3:// run: written locally, uploaded after each report)
    mlflow       train.mlflow_tracking_uri, else MLFLOW_TRACKING_URI, else a SQLite store RUN/mlflow.db with
                 artifacts in RUN/mlartifacts (a local run; `mlflow ui --backend-store-uri sqlite:///RUN/mlflow.db`
                 opens it; an s3:// run needs a tracking URI); experiment train.tracker_group (default: the run
                 name); the flattened config as params; summary.json, plan.json and the run's loss curves as
                 artifacts at the end
    wandb        project train.wandb_project (else WANDB_PROJECT, else "gl-ray"), entity train.wandb_entity (else
                 WANDB_ENTITY), group train.tracker_group; WANDB_MODE=offline works without a network

A resumed run continues the same MLflow and W&B runs: their ids and the last step logged are kept in
RUN/trackers.json, and steps at or before it are not logged again (the retrained steps after a resume repeat
what was logged). A Tune search sets train.tracker_group to its name, so its trials are grouped under it.
Each tracker is an extra (`pip install 'gl-ray[tensorboard]'`, `[mlflow]`, `[wandb]`).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path

from gl_ray import storage
from gl_ray.errors import UserError
from gl_ray.train.identity import flat

MODULES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}  # logger -> module it needs


def check_loggers(loggers: list[str]) -> None:
    """Every asked-for tracker is installed here (UserError naming the extra otherwise)."""
    for name in loggers:
        if importlib.util.find_spec(MODULES[name]) is None:
            raise UserError(f"train.loggers: {name} is not installed; pip install 'gl-ray[{name}]' (or drop it "
                            "from train.loggers)")


def flatten(d: dict) -> dict[str, str]:
    """{"train": {"seed": 0}} -> {"train.seed": "0"}: gl_ray.train.identity.flat, values as text."""
    return {k: json.dumps(v) if isinstance(v, (list, dict)) else str(v) for k, v in flat(d).items()}


def numeric(metrics: dict) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}


class TensorBoard:
    def __init__(self, run_uri: str, cfg, ids: dict):
        from torch.utils.tensorboard import SummaryWriter

        self.remote = storage.join(run_uri, "tensorboard")
        self.local = tempfile.mkdtemp(prefix="gl-ray-tb-") if storage.is_s3(run_uri) else self.remote
        self.writer = SummaryWriter(log_dir=self.local)

    def log(self, metrics: dict, step: int) -> None:
        for k, v in numeric(metrics).items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()
        if self.local != self.remote:
            for p in Path(self.local).iterdir():
                storage.write_bytes(storage.join(self.remote, p.name), p.read_bytes())

    def finish(self, artifacts: dict[str, str], summary: dict) -> None:
        self.writer.close()
        if self.local != self.remote:
            shutil.rmtree(self.local, ignore_errors=True)

    def abort(self) -> None:
        self.finish({}, {})


class MLflow:
    def __init__(self, run_uri: str, cfg, ids: dict):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        uri = cfg.train.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
        artifacts = None  # a tracking server's or the given store's own artifact root
        if not uri:
            if storage.is_s3(run_uri):
                raise UserError("train.loggers: mlflow with an s3:// run needs train.mlflow_tracking_uri or "
                                "MLFLOW_TRACKING_URI (a tracking server)")
            uri = f"sqlite:///{Path(run_uri, 'mlflow.db').resolve()}"  # the store MLflow 3 recommends
            artifacts = Path(run_uri, "mlartifacts").resolve().as_uri()  # else ./mlartifacts of the cwd
        if uri.startswith("file:") or "://" not in uri:  # a file store the user asked for: MLflow 3 wants this
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=uri)
        group = cfg.train.tracker_group or cfg.name
        exp = self.client.get_experiment_by_name(group)
        exp_id = exp.experiment_id if exp else self.client.create_experiment(group, artifact_location=artifacts)
        self.run_id = ids.get("mlflow_run_id")
        if self.run_id is None:
            self.run_id = self.client.create_run(exp_id, run_name=cfg.name).info.run_id
            params = [Param(k, v[:6000]) for k, v in flatten(cfg.to_dict()).items()]
            for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
                self.client.log_batch(self.run_id, params=params[i:i + 100])
        else:
            self.client.update_run(self.run_id, status="RUNNING")
        ids["mlflow_run_id"] = self.run_id
        ids["mlflow_tracking_uri"] = uri

    def log(self, metrics: dict, step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in numeric(metrics).items()])

    def finish(self, artifacts: dict[str, str], summary: dict) -> None:
        for path in artifacts.values():
            self.client.log_artifact(self.run_id, path)
        self.client.set_terminated(self.run_id)

    def abort(self) -> None:
        self.client.set_terminated(self.run_id, status="KILLED")  # the resume sets it RUNNING again


class Wandb:
    def __init__(self, run_uri: str, cfg, ids: dict):
        import wandb

        t = cfg.train
        self.local = Path(run_uri) if not storage.is_s3(run_uri) else Path(tempfile.mkdtemp(prefix="gl-ray-wandb-"))
        self.local.mkdir(parents=True, exist_ok=True)
        run_id = ids.get("wandb_run_id") or uuid.uuid4().hex[:8]
        self.run = wandb.init(project=t.wandb_project or os.environ.get("WANDB_PROJECT") or "gl-ray",
                              entity=t.wandb_entity or os.environ.get("WANDB_ENTITY") or None, name=cfg.name,
                              id=run_id, resume="allow", group=t.tracker_group or None, config=cfg.to_dict(),
                              dir=str(self.local), reinit="create_new")
        ids["wandb_run_id"] = run_id

    def log(self, metrics: dict, step: int) -> None:
        self.run.log(numeric(metrics), step=step)

    def finish(self, artifacts: dict[str, str], summary: dict) -> None:
        self.run.summary.update({k: v for k, v in summary.items() if isinstance(v, (int, float))})
        self.run.finish()

    def abort(self) -> None:
        self.run.finish(exit_code=1)


KINDS = {"tensorboard": TensorBoard, "mlflow": MLflow, "wandb": Wandb}


class Trackers:
    """The trackers of a run, on rank 0: opened at (re)start, fed every report, closed with the run's files."""

    def __init__(self, run_uri: str, cfg):
        self.run_uri, self.loggers = run_uri, list(cfg.train.loggers)
        self.state_uri = storage.join(run_uri, "trackers.json")
        self.ids = storage.read_json(self.state_uri) if storage.exists(self.state_uri) else {}
        self.logged_step = int(self.ids.get("logged_step", 0))
        self.open = [KINDS[name](run_uri, cfg, self.ids) for name in self.loggers]
        self.save()

    def save(self) -> None:
        storage.write_bytes(self.state_uri, json.dumps(self.ids | {"logged_step": self.logged_step}).encode())

    def log(self, metrics: dict) -> None:
        step = int(metrics["step"])
        if step <= self.logged_step:  # logged before a resume: retrained, not logged twice
            return
        for tracker in self.open:
            tracker.log(metrics, step)
        self.logged_step = step
        self.save()

    def abort(self) -> None:
        """The run stopped early (an error, a stop request): close every tracker; a resume reopens them."""
        for tracker in self.open:
            try:
                tracker.abort()
            except Exception as e:  # closing must not hide why the run stopped
                print(f"gl-ray: could not close a tracker: {e}")

    def finish(self, summary: dict, artifacts: dict[str, str]) -> None:
        """Close every tracker with the run's summary and `artifacts` (name -> local file), which the run's owner
        made (gl_ray.train.outputs: summary.json, plan.json, the run's plots)."""
        for tracker in self.open:
            tracker.finish(artifacts, summary)
