"""train.loggers: TensorBoard, MLflow and W&B (offline), each read back with its own reader; a resumed run
continues the same tracker runs with every step logged once."""

import importlib.util
import json
import os
import re

import pytest
from conftest import metrics, run_tiny

from gl_ray.config import load_config
from gl_ray.errors import UserError
from gl_ray.train.faults import InjectedFault
from gl_ray.train.preflight import preflight

LOGGERS = {"train.loggers": "[tensorboard,mlflow,wandb]"}


@pytest.fixture(scope="module")
def tracked(tiny_data, tmp_path_factory):
    """A tiny run logged to all three trackers, cut after step 6 and resumed from its step-4 checkpoint."""
    import os

    mp = pytest.MonkeyPatch()
    mp.setenv("WANDB_MODE", "offline")
    mp.setenv("WANDB_SILENT", "true")
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    storage = tmp_path_factory.mktemp("tracked")
    mp.setenv("GL_RAY_FAIL_AT_STEP", "6")
    with pytest.raises(InjectedFault):
        run_tiny(tiny_data, storage, "tracked", **LOGGERS)
    ids_before = json.loads((storage / "tracked" / "trackers.json").read_text())
    mp.delenv("GL_RAY_FAIL_AT_STEP")
    run_tiny(tiny_data, storage, "tracked", **LOGGERS)
    yield storage / "tracked", ids_before
    mp.undo()
    assert "GL_RAY_FAIL_AT_STEP" not in os.environ


def test_tensorboard_has_every_step_once(tracked):
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    run, _ = tracked
    mux = EventMultiplexer()
    mux.AddRunsFromDirectory(str(run / "tensorboard"))
    mux.Reload()
    events = [e for name in mux.Runs() for e in mux.Scalars(name, "loss")]
    want = metrics(run)
    assert sorted(e.step for e in events) == [m["step"] for m in want]  # each step once, across both event files
    by_step = {e.step: e.value for e in events}
    assert all(by_step[m["step"]] == pytest.approx(m["loss"], rel=1e-5) for m in want)


def test_mlflow_continues_the_same_run_with_params_and_artifacts(tracked):
    from mlflow.tracking import MlflowClient

    run, before = tracked
    ids = json.loads((run / "trackers.json").read_text())
    assert ids["mlflow_run_id"] == before["mlflow_run_id"]  # the resumed run is the same MLflow run
    # the default store is SQLite inside the run folder (no file store, which MLflow 3 refuses to open unless
    # MLFLOW_ALLOW_FILE_STORE is set), and the artifacts are in the run folder too
    assert ids["mlflow_tracking_uri"] == f"sqlite:///{(run / 'mlflow.db').resolve()}"
    assert "MLFLOW_ALLOW_FILE_STORE" not in os.environ and not (run / "mlruns").exists()
    client = MlflowClient(tracking_uri=ids["mlflow_tracking_uri"])
    history = client.get_metric_history(ids["mlflow_run_id"], "loss")
    assert sorted(h.step for h in history) == [m["step"] for m in metrics(run)]
    info = client.get_run(ids["mlflow_run_id"])
    assert info.data.params["schedule.lengths"] == "[32, 64]" and info.data.params["name"] == "tracked"
    assert info.info.status == "FINISHED"
    arts = {a.path for a in client.list_artifacts(ids["mlflow_run_id"])}
    assert {"summary.json", "plan.json", "loss_vs_time.png", "val_loss_vs_time.png"} <= arts
    assert (run / "mlartifacts").is_dir() and any((run / "mlartifacts").rglob("summary.json"))


def wandb_records(path):
    """The records of a W&B run file (`run-ID.wandb`): a 7-byte header (":W&B", magic, version), then LevelDB-log
    records (crc32, length, type: full/first/middle/last) in 32 KiB blocks, each a protobuf `Record`."""
    from wandb.proto import wandb_internal_pb2

    data, pos, block, pending = path.read_bytes(), 7, 32768, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # full, last
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(pending + chunk if kind == 4 else chunk)
            pending = b""
            yield rec
        elif kind in (2, 3):  # first, middle
            pending += chunk
        else:
            break  # zero padding at the end of the file


def test_wandb_offline_run_is_resumed_with_every_step_once(tracked):
    run, before = tracked
    ids = json.loads((run / "trackers.json").read_text())
    assert ids["wandb_run_id"] == before["wandb_run_id"]
    steps = []
    files = sorted((run / "wandb").glob(f"offline-run-*/run-{ids['wandb_run_id']}.wandb"))
    assert len(files) == 2  # one per process: the cut run and its resume
    for path in files:
        for rec in wandb_records(path):
            if rec.WhichOneof("record_type") == "history":
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
                if "loss" in items:
                    steps.append(items["_step"])
    assert sorted(steps) == [m["step"] for m in metrics(run)]


def test_a_tracker_that_is_not_installed_is_one_line(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(UserError, match=r"wandb is not installed; pip install 'gl-ray\[wandb\]'"):
        preflight(load_config("pipelines/configs/tiny-growlength.yaml", ["train.loggers=[wandb]"]))
    with pytest.raises(UserError, match=re.escape("tensorboard | mlflow | wandb")):
        load_config("pipelines/configs/tiny-growlength.yaml", ["train.loggers=[comet]"])
