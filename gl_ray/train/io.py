"""The seam between the training loop and the world around it.

`WorkerIO` is what one worker needs from outside: its batches, reporting (with an optional checkpoint, taken
by `snapshot` in the step and written by `report`, in the background with train.async_checkpoint), restoring,
model wrapping and a sum over workers. `LocalIO` runs in one process without Ray (ray.num_workers: 0);
`gl_ray.train.ray_train.RayWorkerIO` is backed by Ray Train and Ray Data. `RunHooks` is what happens around the
loop on every worker, with or without Ray (metrics log, progress, final export: `gl_ray.train.outputs.RunOutputs`).
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from gl_ray import storage
from gl_ray.data.mixture import Mixture, mixture_steps
from gl_ray.data.packing import RowLayout
from gl_ray.data.stream import TokenStream, decomposed_steps, stage_steps
from gl_ray.schedule import Stage
from gl_ray.train.checkpoint import (
    HostCopy,
    TrainState,
    checkpoint_name,
    host_copy,
    prune_checkpoints,
    restore_latest,
    write_checkpoint,
)
from gl_ray.train.preempt import StopWatch



@dataclass
class Pending:
    """A checkpoint taken in the step, for `report` to write: its folder name and, on this worker, a host copy to
    serialise, a folder being written (FSDP's shards; `finish` completes it), or neither (DDP: every rank but 0)."""
    name: str
    copy: HostCopy | None = None
    folder: str | None = None
    finish: Callable[[], None] | None = None  # completes `folder` (FSDP's async save: waits, then state.json)


class WorkerIO:
    """One worker's view of data, reporting and collectives. The defaults are those of a single process."""

    rank: int = 0
    world_size: int = 1
    run_uri: str = ""  # the run folder ("": none, e.g. a benchmark's loop)

    def batches(self, stage: Stage, start_step: int) -> Iterator[np.ndarray]:
        """This worker's rows of `stage`, one optimizer step at a time (int32 [rows_per_rank_step, seq_len]), from
        stage step start_step on."""
        raise NotImplementedError

    def snapshot(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: TrainState) -> Pending:
        """Take what a checkpoint at this step needs before the next step changes it: all the loop waits for
        (with train.async_checkpoint). Every worker calls it at the same steps. By default nothing is kept."""
        return Pending(checkpoint_name(state.step))

    def report(self, metrics: dict, checkpoint: Pending | None = None) -> None:
        """Report metrics; with `checkpoint` (from `snapshot`), save it (every worker calls this at the same
        steps)."""
        raise NotImplementedError

    def flush(self) -> None:
        """Wait for checkpoints still being written (raising a write's error); called when the loop ends."""

    def restore(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> TrainState | None:
        """Load the newest good checkpoint into model and optimizer (None: a new run)."""
        raise NotImplementedError

    def wrap_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def stop_requested(self) -> bool:
        """Whether the run was asked to stop (SIGTERM to the driver): then it checkpoints at this step and ends."""
        return False

    def preemption_notice(self) -> float | None:
        """None, or the deadline (Unix seconds; 0 if unknown) of a drain of one of the run's nodes: a spot
        reclaim or `ray drain-node` with notice (Ray Train's preemption watcher). A local read, no collective."""
        return None

    def all_reduce_host_sum(self, values: list[float]) -> list[float]:
        """Sums of host numbers over workers, element by element, without touching a device stream (no GPU
        sync)."""
        return list(values)

    def all_gather_object(self, obj: object) -> list:
        """Every worker's obj, in rank order (picklable objects)."""
        return [obj]

    def node_id(self) -> str:
        """The node this worker runs on (Ray's node id; without Ray, the host name)."""
        return socket.gethostname()


def local_steps(train: TokenStream, stage: Stage, start_step: int, *, rank: int = 0, world_size: int = 1,
                draws=None, mixture: Mixture | None = None) -> Iterator[np.ndarray]:
    """A worker's rows of `stage` from stage step start_step, a step at a time, read in this process: the Ray-free
    twin of the stage's Ray Data pipeline for data.packing=decompose (draws), data.sources (mixture) or packed
    rows of `train`. LocalIO reads a whole run through it, a Ray worker the first steps after a (re)start."""
    if draws is not None:
        return decomposed_steps(train, draws, stage, start_step, rank, world_size)
    layout = RowLayout.of(stage, rank=rank, start_step=start_step)
    return mixture_steps(mixture, layout) if mixture is not None else stage_steps(train, layout)


class LocalIO(WorkerIO):
    """One process, no Ray: batches straight from the token stream, checkpoints written to
    RUN/checkpoint_step-NNNNNNN/ (in a background thread with async_write) and pruned to `keep_checkpoints`."""

    def __init__(self, train: TokenStream, run_uri: str, keep_checkpoints: int, async_write: bool = False,
                 draws=None, mixture: Mixture | None = None):
        """draws: data.packing=decompose's StepDraws (gl_ray.data.decompose); mixture: data.sources' (then `train`
        is not read); neither: packed rows of `train`."""
        self.train, self.run_uri, self.keep_checkpoints, self.draws = train, run_uri, keep_checkpoints, draws
        self.mixture = mixture
        self.stop_watch = StopWatch(run_uri)
        self.writer = BackgroundWriter() if async_write else None

    def stop_requested(self) -> bool:
        return self.stop_watch.requested()

    def batches(self, stage: Stage, start_step: int) -> Iterator[np.ndarray]:
        return local_steps(self.train, stage, start_step, draws=self.draws, mixture=self.mixture)

    def snapshot(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: TrainState) -> Pending:
        return Pending(checkpoint_name(state.step), copy=host_copy(model, optimizer, state))

    def report(self, metrics: dict, checkpoint: Pending | None = None) -> None:
        if checkpoint is None:
            return

        def write() -> None:  # then prune: the previous checkpoints stay until this one is complete
            write_checkpoint(storage.join(self.run_uri, checkpoint.name), checkpoint.copy)
            prune_checkpoints(self.run_uri, self.keep_checkpoints)

        if self.writer is None:
            write()
        else:
            self.writer.submit(write)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.wait()

    def restore(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> TrainState | None:
        return restore_latest(self.run_uri, model, optimizer)


class BackgroundWriter:
    """One checkpoint write at a time in a background thread: a new one waits for the previous; a write's error
    is raised by the next `submit` or `wait`. The thread is not a daemon, so a write in progress when the loop
    fails still completes (the checkpoint before a failure is kept)."""

    def __init__(self):
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def submit(self, fn: Callable[[], None]) -> None:
        self.wait()

        def run() -> None:
            try:
                fn()
            except BaseException as e:  # handed to the loop's thread
                self.error = e

        self.thread = threading.Thread(target=run, name="gl-ray-checkpoint", daemon=False)
        self.thread.start()

    def wait(self) -> None:
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        if self.error is not None:
            error, self.error = self.error, None
            raise error


class RunHooks:
    """What happens around the loop on every worker; the defaults do nothing."""

    def on_restore(self, state: TrainState | None, nodes: list[str]) -> None:
        """After the checkpoint (if any) is loaded, before the first step; nodes: each rank's node id."""

    def on_notice(self, step: int, deadline_s: float) -> None:
        """A preemption notice reached the workers; they checkpointed at `step` (deadline_s: 0 if unknown)."""

    def on_report(self, metrics: dict) -> None:
        """Before each report goes to the WorkerIO."""

    def on_abort(self) -> None:
        """The loop ended with an exception (it propagates after this): close what the run had open."""

    def on_finish(self, model: torch.nn.Module, weights: dict, state: TrainState, final_val: dict) -> None:
        """After the last step. weights: the whole model's state dict on CPU (on rank 0; empty elsewhere when the
        model is sharded); final_val: the metrics of the last evaluation."""
