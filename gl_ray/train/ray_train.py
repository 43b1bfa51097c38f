"""The two Ray Train layers: the per-worker function (`ray_worker_loop`, behind `RayWorkerIO`) and the driver
function that builds and fits the TorchTrainer (`fit_trainer`).

Each (stage, rank) gets its own Ray Data dataset (`gl_ray.data.pipeline`, not split by Ray), built by a callable
that Ray Train re-invokes on every worker-group (re)start: it finds the newest good checkpoint and starts the
stage's rows at that cursor, so a resume replays nothing and skips nothing. Every row carries its optimizer
step, and the worker checks that the first row it gets is the step it expects.

The first data.head_steps steps after a (re)start are the exception: each worker reads them itself, with the Ray-free
twin of the pipeline (`HeadRows`: the same rows), while that stage's Ray Data pipeline starts up, so the first
report window does not wait for Ray Data; the stage's dataset starts after them. The plan is built once, by the
driver, and reaches the workers as `Plan.to_dict()`.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator

import numpy as np
import torch

from gl_ray import storage
from gl_ray.architectures import ModelSpec
from gl_ray.config import Config, DataConfig, config_from_dict
from gl_ray.data.mixture import mixture_for
from gl_ray.data.packing import RowLayout
from gl_ray.data.pipeline import dataset_name, decomposed_dataset, stage_dataset
from gl_ray.devices import resolved_precision
from gl_ray.errors import UserError
from gl_ray.ray_utils import RAY_DATA_PROGRESS_LOGGER, quiet_ray_info
from gl_ray.schedule import Plan, Stage
from gl_ray.train.checkpoint import (
    TrainState,
    checkpoint_name,
    find_resume_checkpoint,
    host_copy,
    list_checkpoints,
    restore_latest,
    start_sharded_save,
    write_checkpoint,
)
from gl_ray.train.faults import fault_env
from gl_ray.train.io import Pending, WorkerIO, local_steps
from gl_ray.train.parallel import is_sharded, shard_model
from gl_ray.train.preempt import StopWatch
from gl_ray.train.rewind import apply_skip

WARM_STEPS_AHEAD = 4  # optimizer steps before a stage's end at which the next stage's pipeline starts


def head_steps(data: DataConfig, stage: Stage, start_step: int) -> int:
    """How many steps of `stage`, from stage step start_step (where a (re)start resumes), a worker reads in
    process (HeadRows, data.head_steps); the stage's Ray Data dataset starts after them."""
    return max(0, min(data.head_steps, stage.steps - start_step))


def resume_cursor(run_uri: str, plan: Plan) -> tuple[int, int]:
    """(stage, stage step) where the workers will resume: the newest good checkpoint's, moved on by a rewind's
    --skip-steps as the workers move it; (0, 0) for a new run."""
    found = find_resume_checkpoint(run_uri, warn=lambda _: None)
    if not found:
        return 0, 0
    apply_skip(run_uri, found[1], plan)
    return found[1].stage, found[1].stage_step


def stage_datasets(plans: dict[int, Plan], data: DataConfig, run_uri: str) -> dict:
    """Callables for TorchTrainer(datasets=...): one per (stage, rank) not yet finished at trainer start, for each
    world size the run may train with (plans: the plan of each; one but for an elastic run). Unused ones cost
    nothing: a dataset runs only when a worker reads it."""
    plan = next(iter(plans.values()))  # the same stages and steps in every plan

    memo: dict = {}
    mixtures = {w: mixture_for(data, p) for w, p in plans.items()}  # None without data.sources

    def cursor() -> tuple[int, int]:
        # verified once per set of checkpoints, not once per dataset
        key = tuple(list_checkpoints(run_uri))
        if key not in memo:
            memo.clear()
            memo[key] = resume_cursor(run_uri, plan)
        return memo[key]

    def make(stage: Stage, rank: int, plan: Plan):
        def build():
            cur_stage, cur_step = cursor()
            start = cur_step + head_steps(data, stage, cur_step) if stage.index == cur_stage else 0
            if data.packing == "decompose":
                return decomposed_dataset(data, plan, stage, rank, plan.world_size, start)
            return stage_dataset(data.path, data.seed, RowLayout.of(stage, rank=rank, start_step=start),
                                 mixture=mixtures[plan.world_size])
        return build

    first = cursor()[0]
    return {dataset_name(st.index, r, w): make(st, r, p) for w, p in plans.items() for st in p.stages[first:]
            for r in range(w)}


def in_background(fn: Callable[[dict], None], box: dict, name: str) -> threading.Thread:
    """Run fn(box) in a daemon thread; an exception lands in box["error"], for the training thread to raise after
    it joins (`joined`)."""
    def run():
        try:
            fn(box)
        except BaseException as e:  # re-raised in the training thread
            box["error"] = e

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    return thread


def joined(thread: threading.Thread, box: dict) -> dict:
    """box once its thread is done; the thread's exception raised here."""
    thread.join()
    if "error" in box:
        raise box["error"]
    return box


class StageWarmer:
    """Opens a stage's batch iterator and fetches its first batch in a background thread, so that the start-up
    of a stage's Ray Data pipeline overlaps the training of the stage before it."""

    def __init__(self, open_stage):
        self.open_stage = open_stage
        self.pending: dict[int, tuple[threading.Thread, dict]] = {}

    def start(self, stage: int) -> None:
        if stage in self.pending:
            return
        def open_first(box: dict) -> None:
            box["it"] = self.open_stage(stage)
            box["first"] = next(box["it"], None)

        box: dict = {}
        self.pending[stage] = (in_background(open_first, box, f"gl-ray-warm-stage{stage}"), box)

    def take(self, stage: int):
        self.start(stage)
        box = joined(*self.pending.pop(stage))
        if box["first"] is not None:
            yield box["first"]
            yield from box["it"]


class HeadRows:
    """The first steps of the first stage a worker trains after a (re)start, read in this process by the Ray-free
    twin of the stage's pipeline (`local_steps`: the same rows). The token stream (and data.packing=decompose's
    step draws, data.sources' mixture) load in a background thread while the model is built, and the rows
    of the step where the run resumes (`cursor`) are read there too."""

    def __init__(self, data: DataConfig, plan: Plan, rank: int, cursor: tuple[int, int]):
        """cursor: (stage, stage step) where the run resumes (resume_cursor)."""
        self.data, self.plan, self.rank, self.cursor = data, plan, rank, cursor
        self.box: dict = {}
        self.thread = in_background(self._load, self.box, "gl-ray-head-rows")

    def _load(self, box: dict) -> None:
        from gl_ray.data.decompose import draws_for
        from gl_ray.data.stream import get_stream

        box["stream"] = get_stream(self.data.path, "train", self.data.seed)
        box["draws"] = draws_for(self.data, self.plan) if self.data.packing == "decompose" else None
        box["mixture"] = mixture_for(self.data, self.plan)
        stage, step = self.cursor
        if stage < len(self.plan.stages) and head_steps(self.data, self.plan.stages[stage], step):
            box["first"] = ((stage, step), next(self._rows(self.plan.stages[stage], step)))

    def _rows(self, stage: Stage, start_step: int) -> Iterator[np.ndarray]:
        return local_steps(self.box["stream"], stage, start_step, rank=self.rank, world_size=self.plan.world_size,
                           draws=self.box["draws"], mixture=self.box["mixture"])

    def steps(self, stage: Stage, start_step: int, count: int) -> Iterator[np.ndarray]:
        """`count` steps of this worker's rows of `stage` from stage step start_step."""
        key, rows = joined(self.thread, self.box).pop("first", (None, None))
        if key == (stage.index, start_step):
            yield rows
            start_step, count = start_step + 1, count - 1
        for _, step_rows in zip(range(count), self._rows(stage, start_step)):
            yield step_rows


def quiet_ray_logs(verbose: bool) -> None:
    """Per-report and per-dataset INFO lines from the workers drown the progress lines: off unless verbose."""
    from ray.train.v2._internal.execution import context as train_context

    logging.getLogger(RAY_DATA_PROGRESS_LOGGER).setLevel(logging.ERROR)
    if verbose:
        return
    quiet_ray_info()
    for name in ("ray.train", train_context.__file__):  # that module logs under its file path
        logging.getLogger(name).setLevel(logging.WARNING)


class RayWorkerIO(WorkerIO):
    """A WorkerIO backed by Ray Train (reports, checkpoints, DDP) and Ray Data (one dataset per stage)."""

    def __init__(self, cfg: Config, plan: Plan, run_uri: str):
        import ray.train

        ctx = ray.train.get_context()
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
        self.cfg, self.plan, self.run_uri = cfg, plan, run_uri
        self.host_group = None
        self.checkpoint_group = None  # FSDP's async checkpoints: gloo, used by one save at a time
        self.checkpoint_done = threading.Event()  # no FSDP checkpoint is being completed in the background
        self.checkpoint_done.set()
        self.stop_watch = StopWatch(run_uri)
        self.warmer = StageWarmer(self.open_stage)
        # where the run resumes, as the driver found it when it (re)built the datasets: the first stage trained
        # here reads its first data.head_steps steps in process (HeadRows), its Ray Data dataset the rest
        stage, step = resume_cursor(run_uri, plan)
        self.first_stage = stage if stage < len(plan.stages) else None
        self.head = HeadRows(cfg.data, plan, self.rank, (stage, step)) if self.first_stage is not None else None
        rest = plan.stages[stage].steps - step if self.first_stage is not None else 0
        if rest > head_steps(cfg.data, plan.stages[stage], step):
            self.warmer.start(stage)  # Ray Data starts while the model is built and the head trains

    def open_stage(self, stage: int) -> Iterator[dict]:
        import ray.train

        per_step = 1 if self.cfg.data.packing == "decompose" else self.plan.stages[stage].rows_per_rank_step
        return iter(ray.train.get_dataset_shard(dataset_name(stage, self.rank, self.world_size)).iter_batches(
            batch_size=per_step, batch_format="numpy", drop_last=True,
            prefetch_batches=self.cfg.data.prefetch_batches))

    def batches(self, stage: Stage, start_step: int) -> Iterator[np.ndarray]:
        # warm the next stage a few steps before this one ends: earlier, its pipeline would run ahead and take
        # CPU from training; later, its start-up would show as data wait
        left = stage.steps - start_step  # batches are whole steps
        warm_at = max(0, left - WARM_STEPS_AHEAD)
        warm_next = stage.index + 1 < len(self.plan.stages)
        head = head_steps(self.cfg.data, stage, start_step) if stage.index == self.first_stage else 0
        if head:  # the stage's dataset starts after these (stage_datasets)
            for i, rows in enumerate(self.head.steps(stage, start_step, head)):
                if i == warm_at and warm_next:
                    self.warmer.start(stage.index + 1)
                yield rows
            if head == left:
                return
        for i, b in enumerate(self.warmer.take(stage.index), start=head):
            if i == head and int(b["step"][0]) != start_step + head:  # stage-local steps
                raise RuntimeError(f"stage {stage.index} data starts at step {int(b['step'][0])}, but the "
                                   f"restored checkpoint is at step {start_step} and {head} steps were read in "
                                   "process")
            if i == warm_at and warm_next:
                self.warmer.start(stage.index + 1)
            if "seq_len" in b:  # data.packing=decompose: one step per batch, its rows flattened
                yield b["input_ids"][0].reshape(-1, int(b["seq_len"][0]))
            else:
                yield b["input_ids"]

    def snapshot(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: TrainState) -> Pending:
        """DDP: rank 0 copies the state to host memory (the other ranks hold nothing to save). FSDP: every rank
        saves its shards to a local folder with torch.distributed.checkpoint (a collective); with
        train.async_checkpoint only their copy to host memory happens here, after the previous checkpoint is
        complete, and the write goes on in the background over a gloo group of its own."""
        name = checkpoint_name(state.step)
        if not is_sharded(model):
            return Pending(name, copy=host_copy(model, optimizer, state) if self.rank == 0 else None)
        background = self.cfg.train.async_checkpoint
        if background:
            self.checkpoint_done.wait()  # one checkpoint at a time: the group below serves one save
            if self.checkpoint_group is None:
                import torch.distributed as dist

                self.checkpoint_group = dist.new_group(backend="gloo") if dist.is_initialized() else None
        group = self.checkpoint_group if background else None  # None: the default group
        folder = tempfile.mkdtemp(prefix="gl-ray-ckpt-")  # Ray merges the ranks' folders in storage
        try:
            finish = start_sharded_save(folder, model, optimizer, state, rank=self.rank,
                                        all_gather=functools.partial(self.all_gather_object, group=group),
                                        process_group=group, background=background)
            if not background:
                finish()
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        if background:
            self.checkpoint_done.clear()
        return Pending(name, folder=folder, finish=finish if background else None)

    def report(self, metrics: dict, checkpoint: Pending | None = None) -> None:
        """With train.async_checkpoint, a checkpoint is serialised (DDP) or completed (FSDP) and uploaded in Ray
        Train's one upload thread while training goes on, in report order; Ray's workers wait for it before they
        end. A kill midway leaves a folder whose state.json is missing or does not match, which a resume refuses,
        never loads."""
        import ray.train
        from ray.train import CheckpointUploadMode

        if checkpoint is None:
            ray.train.report(metrics)
            return
        if checkpoint.copy is None and checkpoint.folder is None:  # DDP, not rank 0
            ray.train.report(metrics, checkpoint=None, checkpoint_dir_name=checkpoint.name)
            return
        folder = checkpoint.folder or tempfile.mkdtemp(prefix="gl-ray-ckpt-")
        upload = ray.train.get_context().get_storage()

        def serialise_then_upload(ckpt, dir_name: str):
            try:
                if checkpoint.copy is not None:
                    write_checkpoint(folder, checkpoint.copy)
                if checkpoint.finish is not None:
                    checkpoint.finish()
                return upload.persist_current_checkpoint(ckpt, dir_name)
            finally:
                shutil.rmtree(folder, ignore_errors=True)
                self.checkpoint_done.set()

        mode = CheckpointUploadMode.ASYNC if self.cfg.train.async_checkpoint else CheckpointUploadMode.SYNC
        try:
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder),
                             checkpoint_dir_name=checkpoint.name, checkpoint_upload_mode=mode,
                             delete_local_checkpoint_after_upload=False, checkpoint_upload_fn=serialise_then_upload)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            self.checkpoint_done.set()
            raise

    def restore(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> TrainState | None:
        return restore_latest(self.run_uri, model, optimizer, warn=print if self.rank == 0 else (lambda _: None))

    def wrap_model(self, model: torch.nn.Module) -> torch.nn.Module:
        import ray.train.torch

        if self.cfg.ray.strategy == "fsdp":
            device = next(model.parameters()).device
            return shard_model(model, bf16=resolved_precision(device, self.cfg.train.precision) == "bf16")
        return ray.train.torch.prepare_model(model, parallel_strategy="ddp" if self.world_size > 1 else None)

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        if self.world_size > 1 and dist.is_initialized():
            dist.all_reduce(t)
        return t

    def stop_requested(self) -> bool:
        return self.stop_watch.requested()

    def preemption_notice(self) -> float | None:
        try:  # what ray.train.get_preemption_info() broadcasts, read locally: the loop agrees at its meetings
            from ray.train.v2._internal.execution.context import get_train_context

            info = get_train_context().preemption_context.preemption_info
        except (ImportError, AttributeError, RuntimeError):  # a Ray without the preemption watcher
            return None
        return None if info is None else (info.deadline_ms or 0) / 1000

    def all_reduce_host_sum(self, values: list[float]) -> list[float]:
        import torch.distributed as dist

        if self.world_size == 1 or not dist.is_initialized():
            return list(values)
        if self.host_group is None:  # gloo: a CPU tensor's all-reduce never waits for the GPU's queue
            self.host_group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t, group=self.host_group)
        return t.tolist()

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def all_gather_object(self, obj: object, group=None) -> list:
        """group: a process group other than the default (the checkpoint group, from Ray's upload thread)."""
        import torch.distributed as dist

        if self.world_size == 1 or not dist.is_initialized():
            return [obj]
        out: list = [None] * self.world_size
        dist.all_gather_object(out, obj, group=group)
        return out


SHARED_MARKER = ".gl-ray.shared"  # written by the driver in a local run folder, read by every worker


def mark_shared(run_uri: str) -> str:
    """The driver's half of check_shared: a file with a fresh token in a local run folder ("" for s3://)."""
    if storage.is_s3(run_uri):
        return ""
    token = uuid.uuid4().hex
    storage.write_bytes(storage.join(run_uri, SHARED_MARKER), token.encode())
    return token


def check_shared(run_uri: str, token: str, data_paths: dict[str, str]) -> None:
    """A worker's half: a local ray.storage_path and every dataset it reads (data_paths: {config key: path}, see
    `shared_data`) must be the driver's folders, seen from this node too (a worker on another node without a shared
    mount would write its checkpoints where nobody reads them). One UserError line naming the node otherwise."""
    import ray

    where = f"on node {ray.get_runtime_context().get_node_id()[:12]}"
    marker = storage.join(run_uri, SHARED_MARKER)
    if token and (not storage.exists(marker) or storage.read_bytes(marker).decode(errors="replace") != token):
        raise UserError(f"ray.storage_path: the run folder {run_uri!r} is not the driver's {where} (a local folder "
                        "that is not shared by every node); use s3:// or a mount every node shares")
    for key, path in data_paths.items():
        if not storage.is_s3(path) and not storage.exists(storage.join(path, "manifest.json")):
            raise UserError(f"{key}: {path!r} has no manifest.json {where} (a local folder that is not shared by "
                            "every node); use s3:// or a mount every node shares")


def shared_data(data: dict) -> dict[str, str]:
    """{config key: path} of every dataset a worker reads: data.path (validation, tokenizer) and each of
    data.sources (the training mixture)."""
    return {"data.path": data["path"], **{f"data.sources[{i}].path": s["path"]
                                          for i, s in enumerate(data.get("sources") or [])}}


def ray_worker_loop(config: dict) -> None:
    """Ray Train's train_loop_per_worker: one worker's run, from the plan the driver built."""
    import ray.train

    from gl_ray.train.worker import run_worker

    os.environ.update(config.get("fault_env", {}))  # test-only fault hook (gl_ray.train.faults)
    quiet_ray_logs(config.get("verbose", False))
    check_shared(config["run_uri"], config.get("shared_token", ""), shared_data(config["cfg"]["data"]))
    cfg = config_from_dict(config["cfg"])
    plan = Plan.from_dict(config["plans"][ray.train.get_context().get_world_size()])  # elastic: this world's
    io = RayWorkerIO(cfg, plan, config["run_uri"])
    run_worker(cfg, plan, config["run_uri"], io, print_progress=False, spec=ModelSpec.from_json(config["model"]))


def ray_train_env(r) -> dict[str, str]:
    """Ray Train's own settings that gl-ray sets from ray.* (Ray reads them from the driver's environment)."""
    return {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": f"{r.start_timeout_s:g}",
            "RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S": f"{r.notice_poll_s:g}"}


def fit_trainer(cfg: Config, plans: dict[int, Plan], run_uri: str, spec: ModelSpec, callbacks: list | None = None, *,
                progress: bool = True, verbose: bool = False) -> None:
    """Driver function: build and fit the TorchTrainer (the caller has connected to Ray). plans: the plan of each
    world size the run may train with (gl_ray.schedule.plans_by_world); spec: the model (gl_ray.architectures);
    progress: print rank 0's progress lines
    here (gl_ray.train.relay); verbose: Ray Train's and Ray Data's INFO lines too."""
    import contextlib

    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from gl_ray.errors import unwrap_user_errors
    from gl_ray.train.relay import ProgressRelay

    ray.data.DataContext.get_current().execution_options.preserve_order = True
    if storage.is_s3(run_uri):
        fs, path = storage.resolve(run_uri)
        storage_kwargs = {"storage_path": path.rsplit("/", 1)[0], "storage_filesystem": fs}
    else:
        storage_kwargs = {"storage_path": str(storage.resolve(run_uri)[1]).rsplit("/", 1)[0]}
    datasets = stage_datasets(plans, cfg.data, run_uri)
    r = cfg.ray
    os.environ.update(ray_train_env(r))  # Ray Train hands these from the driver to its controller and workers
    workers = (r.min_workers, r.num_workers) if len(r.world_sizes) > 1 else r.num_workers
    with (ProgressRelay() if progress else contextlib.nullcontext()) as progress_callback, unwrap_user_errors():
        run_callbacks = [progress_callback] if progress else []
        trainer = TorchTrainer(
            ray_worker_loop,
            train_loop_config={"cfg": cfg.to_dict(), "plans": {w: p.to_dict() for w, p in plans.items()},
                               "run_uri": run_uri, "model": spec.to_json(),
                               "shared_token": mark_shared(run_uri),
                               "fault_env": fault_env(), "verbose": verbose},
            scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=r.use_gpu,
                                                   resources_per_worker={"CPU": r.cpus_per_worker,
                                                                         **r.worker_resources},
                                                   elastic_resize_monitor_interval_s=r.resize_check_s),
            run_config=ray.train.RunConfig(
                name=cfg.name, **storage_kwargs, callbacks=[*run_callbacks, *(callbacks or [])],
                # Ray Train's own lines (controller and workers); its log files keep every level
                logging_config=ray.train.LoggingConfig(log_level="INFO" if verbose else "WARNING"),
                failure_config=ray.train.FailureConfig(max_failures=cfg.ray.max_failures),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints)),
            datasets=datasets,
            dataset_config=ray.train.DataConfig(datasets_to_split=[]),
        )
        trainer.fit()
