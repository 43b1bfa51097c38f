"""The two Ray Train layers: the per-worker train function and the driver function that builds the TorchTrainer.

Each (stage, rank) gets its own Ray Data dataset ("stage{k}_rank{r}", not split by Ray), built by a callable
that Ray Train re-invokes on every worker-group (re)start: it finds the newest good checkpoint and starts the
stage's rows at that cursor, so a resume replays nothing and skips nothing. Every row carries its optimizer
step, and the worker checks that the first row it gets is the step it restored.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading

import numpy as np

from gl_ray import storage
from gl_ray.config import Config, config_from_dict
from gl_ray.data.stream import fetch_rows, stage_num_rows, stage_row_args
from gl_ray.ray_utils import RAY_DATA_PROGRESS_LOGGER
from gl_ray.schedule import Plan, make_plan
from gl_ray.train.checkpoint import (
    checkpoint_name,
    find_resume_checkpoint,
    list_checkpoints,
    restore_latest,
    save_checkpoint,
)
from gl_ray.train.faults import fault_env

WARM_STEPS_AHEAD = 4  # optimizer steps before a stage's end at which the next stage's pipeline starts


def dataset_name(stage: int, rank: int) -> str:
    return f"stage{stage}_rank{rank}"


def fetch_rows_with_step(batch: dict, root: str, seed: int, row_args: dict) -> dict:
    out = fetch_rows(batch, root, seed, row_args)
    out["step"] = row_args["start_step"] + np.asarray(batch["id"]) // row_args["rows_per_rank_step"]
    return out


def stage_dataset(cfg: Config, plan: Plan, stage: int, rank: int, start_step: int):
    """The lazy Ray Dataset of one worker's rows of a stage, from start_step on."""
    import ray

    st = plan.stages[stage]
    rows = stage_num_rows(plan, stage, start_step)
    rows_per_step = st.micro_batch * st.grad_accum
    blocks = max(1, min(64, rows // max(1, rows_per_step * 4)))
    return ray.data.range(rows, override_num_blocks=blocks).map_batches(
        fetch_rows_with_step, batch_size=rows_per_step, batch_format="numpy",
        fn_kwargs={"root": cfg.data.path, "seed": cfg.data.seed,
                   "row_args": stage_row_args(plan, stage, rank, start_step)})


def stage_datasets(cfg: Config, plan: Plan, run_uri: str) -> dict:
    """Callables for TorchTrainer(datasets=...): one per (stage, rank) not yet finished at trainer start."""

    memo: dict = {}

    def cursor() -> tuple[int, int]:
        # verified once per set of checkpoints, not once per dataset
        key = tuple(list_checkpoints(run_uri))
        if key not in memo:
            found = find_resume_checkpoint(run_uri, warn=lambda _: None)
            memo.clear()
            memo[key] = (found[1].stage, found[1].stage_step) if found else (0, 0)
        return memo[key]

    def make(stage: int, rank: int):
        def build():
            cur_stage, cur_step = cursor()
            start = cur_step if stage == cur_stage else 0
            return stage_dataset(cfg, plan, stage, rank, start)
        return build

    first = cursor()[0]
    return {dataset_name(k, r): make(k, r) for k in range(first, len(plan.stages)) for r in range(plan.world_size)}



class StageWarmer:
    """Opens a stage's batch iterator and fetches its first batch in a background thread, so that the start-up
    of a stage's Ray Data pipeline overlaps the training of the stage before it."""

    def __init__(self, open_stage):
        self.open_stage = open_stage
        self.pending: dict[int, tuple[threading.Thread, dict]] = {}

    def start(self, stage: int) -> None:
        if stage in self.pending:
            return
        box: dict = {}

        def run():
            try:
                box["it"] = self.open_stage(stage)
                box["first"] = next(box["it"], None)
            except BaseException as e:  # re-raised in the training thread by take()
                box["error"] = e

        thread = threading.Thread(target=run, name=f"gl-ray-warm-stage{stage}", daemon=True)
        thread.start()
        self.pending[stage] = (thread, box)

    def take(self, stage: int):
        self.start(stage)
        thread, box = self.pending.pop(stage)
        thread.join()
        if "error" in box:
            raise box["error"]
        if box["first"] is not None:
            yield box["first"]
            yield from box["it"]


def quiet_ray_logs() -> None:
    """Per-report and per-dataset INFO lines from the workers drown the progress lines."""
    from ray.train.v2._internal.execution import context as train_context

    for name in ("ray.data", "ray.train", train_context.__file__):  # that module logs under its file path
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger(RAY_DATA_PROGRESS_LOGGER).setLevel(logging.ERROR)


def train_fn(config: dict) -> None:
    """Ray Train per-worker function (train_loop_per_worker)."""
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist

    from gl_ray.train.loop import WorkerIO
    from gl_ray.train.worker import train_worker

    os.environ.update(config.get("fault_env", {}))  # test-only fault hook (gl_ray.train.faults)
    quiet_ray_logs()
    cfg = config_from_dict(config["cfg"])
    plan = make_plan(cfg, cap_tokens=config["cap_tokens"])
    run_uri = config["run_uri"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()

    def open_stage(stage: int):
        st = plan.stages[stage]
        return iter(ray.train.get_dataset_shard(dataset_name(stage, rank)).iter_batches(
            batch_size=st.micro_batch, batch_format="numpy", drop_last=True,
            prefetch_batches=cfg.data.prefetch_batches))

    warm = StageWarmer(open_stage)
    names = [dataset_name(k, rank) for k in range(len(plan.stages))]
    first_stage = next((k for k, n in enumerate(names) if n in config["dataset_names"]), None)
    if first_stage is not None:
        warm.start(first_stage)  # Ray Data starts up while the model is built and restored

    def batches(stage: int, start_step: int):
        # warm the next stage a few steps before this one ends: earlier, its pipeline would run ahead and take
        # CPU from training; later, its start-up would show as data wait
        st = plan.stages[stage]
        left = stage_num_rows(plan, stage, start_step) // st.micro_batch
        warm_at = left - WARM_STEPS_AHEAD * st.grad_accum
        for i, b in enumerate(warm.take(stage)):
            if i == 0 and int(b["step"][0]) != start_step:
                raise RuntimeError(f"stage {stage} data starts at step {int(b['step'][0])}, but the restored "
                                   f"checkpoint is at step {start_step}")
            if i == max(0, warm_at) and stage + 1 < len(plan.stages):
                warm.start(stage + 1)
            yield b["input_ids"]

    def report(metrics: dict, checkpoint=None) -> None:
        if checkpoint is None:
            ray.train.report(metrics)
            return
        model, optimizer, state = checkpoint
        name = checkpoint_name(state.step)
        if rank != 0:
            ray.train.report(metrics, checkpoint=None, checkpoint_dir_name=name)
            return
        tmp = tempfile.mkdtemp(prefix="gl-ray-ckpt-")
        try:
            save_checkpoint(tmp, model, optimizer, state)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp), checkpoint_dir_name=name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def restore(model, optimizer):
        return restore_latest(run_uri, model, optimizer, warn=print if rank == 0 else (lambda _: None))

    def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
        if world > 1 and dist.is_initialized():
            dist.all_reduce(t)
        return t

    def wrap(model):
        return ray.train.torch.prepare_model(model, parallel_strategy="ddp" if world > 1 else None)

    io = WorkerIO(rank=rank, world_size=world, batches=batches, report=report, restore=restore, wrap_model=wrap,
                  all_reduce_sum=all_reduce_sum)
    train_worker(cfg, plan, run_uri, io, print_progress=False)


def fit(cfg: Config, plan: Plan, run_uri: str, cap_tokens: int, callbacks: list | None = None) -> None:
    """Driver function: build and fit the TorchTrainer (the caller has connected to Ray)."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from gl_ray.errors import find_user_error
    from gl_ray.train.outputs import progress_line

    class Progress(ray.train.UserCallback):
        def after_report(self, run_context, metrics, checkpoint):
            if metrics and metrics[0]:
                print(progress_line(metrics[0]), flush=True)

    ray.data.DataContext.get_current().execution_options.preserve_order = True
    if storage.is_s3(run_uri):
        fs, path = storage.resolve(run_uri)
        storage_kwargs = {"storage_path": path.rsplit("/", 1)[0], "storage_filesystem": fs}
    else:
        storage_kwargs = {"storage_path": str(storage.resolve(run_uri)[1]).rsplit("/", 1)[0]}
    datasets = stage_datasets(cfg, plan, run_uri)
    trainer = TorchTrainer(
        train_fn,
        train_loop_config={"cfg": cfg.to_dict(), "run_uri": run_uri, "cap_tokens": cap_tokens,
                           "dataset_names": sorted(datasets),
                           "fault_env": fault_env()},
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.ray.num_workers, use_gpu=cfg.ray.use_gpu,
                                               resources_per_worker={"CPU": cfg.ray.cpus_per_worker}),
        run_config=ray.train.RunConfig(
            name=cfg.name, **storage_kwargs, callbacks=[Progress(), *(callbacks or [])],
            failure_config=ray.train.FailureConfig(max_failures=cfg.ray.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints)),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=[]),
    )
    try:
        trainer.fit()
    except ray.train.TrainingFailedError as e:
        user = find_user_error(e)
        if user is None:
            raise
        raise user from None
