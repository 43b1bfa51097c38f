"""The seam between the training loop and the world around it.

`WorkerIO` is what one worker needs from outside: its batches, reporting (with an optional checkpoint),
restoring, model wrapping and a sum over workers. `LocalIO` runs in one process without Ray (ray.num_workers: 0);
`gl_ray.train.ray_train.RayWorkerIO` is backed by Ray Train and Ray Data. `RunHooks` is what happens around the
loop on every worker, with or without Ray (metrics log, progress, final export: `gl_ray.train.outputs.RunOutputs`).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from gl_ray import storage
from gl_ray.data.packing import RowLayout
from gl_ray.data.stream import TokenStream, stage_steps
from gl_ray.schedule import Stage
from gl_ray.train.checkpoint import TrainState, checkpoint_name, prune_checkpoints, restore_latest, save_checkpoint
from gl_ray.train.preempt import StopWatch

Snapshot = tuple[torch.nn.Module, torch.optim.Optimizer, TrainState]  # what a checkpoint holds


class WorkerIO:
    """One worker's view of data, reporting and collectives. The defaults are those of a single process."""

    rank: int = 0
    world_size: int = 1
    run_uri: str = ""  # the run folder ("": none, e.g. a benchmark's loop)

    def batches(self, stage: Stage, start_step: int) -> Iterator[np.ndarray]:
        """This worker's rows of `stage`, one optimizer step at a time (int32 [rows_per_rank_step, seq_len]), from
        stage step start_step on."""
        raise NotImplementedError

    def report(self, metrics: dict, checkpoint: Snapshot | None = None) -> None:
        """Report metrics; with `checkpoint`, save it (every worker calls this at the same steps)."""
        raise NotImplementedError

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

    def all_reduce_host_sum(self, values: list[float]) -> list[float]:
        """Sums of host numbers over workers, element by element, without touching a device stream (no GPU
        sync)."""
        return list(values)

    def all_gather_object(self, obj: object) -> list:
        """Every worker's obj, in rank order (picklable objects)."""
        return [obj]


class LocalIO(WorkerIO):
    """One process, no Ray: batches straight from the token stream, checkpoints written to
    RUN/checkpoint_step-NNNNNNN/ and pruned to `keep_checkpoints`."""

    def __init__(self, train: TokenStream, run_uri: str, keep_checkpoints: int):
        self.train, self.run_uri, self.keep_checkpoints = train, run_uri, keep_checkpoints
        self.stop_watch = StopWatch(run_uri)

    def stop_requested(self) -> bool:
        return self.stop_watch.requested()

    def batches(self, stage: Stage, start_step: int) -> Iterator[np.ndarray]:
        return stage_steps(self.train, RowLayout.of(stage, rank=0, start_step=start_step))

    def report(self, metrics: dict, checkpoint: Snapshot | None = None) -> None:
        if checkpoint is not None:
            model, optimizer, state = checkpoint
            save_checkpoint(storage.join(self.run_uri, checkpoint_name(state.step)), model, optimizer, state)
            prune_checkpoints(self.run_uri, self.keep_checkpoints)

    def restore(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> TrainState | None:
        return restore_latest(self.run_uri, model, optimizer)


class RunHooks:
    """What happens around the loop on every worker; the defaults do nothing."""

    def on_restore(self, state: TrainState | None) -> None:
        """After the checkpoint (if any) is loaded, before the first step."""

    def on_report(self, metrics: dict) -> None:
        """Before each report goes to the WorkerIO."""

    def on_abort(self) -> None:
        """The loop ended with an exception (it propagates after this): close what the run had open."""

    def on_finish(self, model: torch.nn.Module, weights: dict, state: TrainState, final_val: dict) -> None:
        """After the last step. weights: the whole model's state dict on CPU (on rank 0; empty elsewhere when the
        model is sharded); final_val: the metrics of the last evaluation."""
