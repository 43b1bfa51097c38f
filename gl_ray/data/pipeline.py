"""The Ray Data side of training: one lazy dataset per (stage, worker), the twin of `stream.stage_steps`.

    ds = stage_dataset("data/stdlib", seed=0, layout=RowLayout.of(plan.stages[0], rank=0, start_step=0))
    # rows in layout order: {"input_ids": int32 [n, seq_len], "step": int64 [n]}

`ray.data.range(num_rows)` numbers the worker's rows; `fetch_rows` (a pure batch function) maps row numbers to
packed rows of the token stream (or of data.sources' mixture: gl_ray.data.mixture) and tags each row with its
stage-local optimizer step, so a worker can check that its data starts where its checkpoint left off.
"""

from __future__ import annotations

import numpy as np

from gl_ray.data.mixture import Mixture, mixture_rows
from gl_ray.data.packing import RowLayout
from gl_ray.data.stream import get_stream


def dataset_name(stage: int, rank: int, world_size: int) -> str:
    """Key of a worker's stage dataset in TorchTrainer(datasets=...) (an elastic run has one per world size)."""
    return f"stage{stage}_rank{rank}_of{world_size}"


def fetch_rows(batch: dict[str, np.ndarray], root: str, seed: int, layout: RowLayout,
               mixture: Mixture | None = None) -> dict[str, np.ndarray]:
    """Ray Data batch function: local row numbers ("id") in; packed rows ("input_ids": int32 [n, seq_len]) and
    their stage-local optimizer steps ("step": int64 [n]) out. mixture: data.sources' rows
    (`mixture.mixture_rows`, the mapping `mixture.mixture_steps` uses too) instead of root's."""
    rows = np.asarray(batch["id"], dtype=np.int64)
    if mixture is not None:
        return {"input_ids": mixture_rows(mixture, layout, rows), "step": layout.steps(rows)}
    return {"input_ids": get_stream(root, "train", seed).rows(layout.token_starts(rows), layout.seq_len),
            "step": layout.steps(rows)}


def stage_dataset(root: str, seed: int, layout: RowLayout, mixture: Mixture | None = None):
    """The lazy Ray Dataset of one worker's rows of a stage, from layout.start_step on (mixture: see fetch_rows)."""
    import ray

    per_step = layout.rows_per_rank_step
    blocks = max(1, min(64, layout.num_rows // max(1, per_step * 4)))
    return ray.data.range(layout.num_rows, override_num_blocks=blocks).map_batches(
        fetch_rows, batch_size=per_step, batch_format="numpy",
        fn_kwargs={"root": root, "seed": seed, "layout": layout, "mixture": mixture})


def fetch_steps(batch: dict[str, np.ndarray], data, plan, rank: int, world_size: int) -> dict[str, np.ndarray]:
    """data.packing=decompose: global optimizer steps ("id") in; each step's rows of this worker flattened
    ("input_ids": int32 [n, tokens per worker and step], the same size whatever the bucket), its bucket length
    ("seq_len") and its stage-local step ("step") out."""
    from gl_ray.data.decompose import draws_for

    draws, stream = draws_for(data, plan), get_stream(data.path, "train", data.seed)
    steps = np.asarray(batch["id"], dtype=np.int64)
    rows, lens = [], []
    for s in steps:
        length, starts = draws.step_rows(int(s), rank, world_size)
        rows.append(stream.flat_rows(starts, length).reshape(-1))
        lens.append(length)
    stage = plan.stage_at_step(int(steps[0]))
    return {"input_ids": np.stack(rows), "seq_len": np.asarray(lens, dtype=np.int64),
            "step": steps - stage.start_step}


def decomposed_dataset(data, plan, stage, rank: int, world_size: int, start_step: int):
    """data.packing=decompose: the lazy Ray Dataset of one worker's steps of a stage, from stage step start_step
    on, one row per optimizer step (data: the run's DataConfig); the twin of `stream.decomposed_steps`."""
    import ray

    first, stop = stage.start_step + start_step, stage.end_step
    ds = ray.data.from_items([{"id": s} for s in range(first, stop)]) if stop > first else \
        ray.data.from_items([{"id": 0}]).limit(0)
    return ds.map_batches(fetch_steps, batch_size=1, batch_format="numpy",
                          fn_kwargs={"data": data, "plan": plan, "rank": rank, "world_size": world_size})
