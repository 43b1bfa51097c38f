"""What every worker does around the loop, with or without Ray: metrics log, progress, final export, summary."""

from __future__ import annotations

import json

import torch

from gl_ray import storage
from gl_ray.config import Config
from gl_ray.data.manifest import load_manifest
from gl_ray.data.stream import get_stream
from gl_ray.schedule import Plan
from gl_ray.train.checkpoint import TrainState
from gl_ray.train.loop import Evaluator, WorkerIO, run_training
from gl_ray.train.outputs import MetricsLog, build_summary, export_final, progress_line


def train_worker(cfg: Config, plan: Plan, run_uri: str, io: WorkerIO, print_progress: bool) -> TrainState:
    """Run the loop; rank 0 keeps RUN/metrics.jsonl and writes RUN/final/ and RUN/summary.json at the end."""
    manifest = load_manifest(cfg.data.path)
    evaluator = Evaluator(get_stream(cfg.data.path, "val"), cfg.data.eval_tokens, cfg.train.micro_batch_tokens)
    inner_report, inner_restore = io.report, io.restore
    log: list[MetricsLog] = []

    def restore(model, optimizer):
        state = inner_restore(model, optimizer)
        if io.rank == 0:
            log.append(MetricsLog(run_uri, resume_step=state.step if state else 0))
        return state

    def report(metrics: dict, checkpoint=None) -> None:
        if io.rank == 0:
            log[0].append(metrics)
            if print_progress:
                print(progress_line(metrics), flush=True)
        inner_report(metrics, checkpoint=checkpoint)

    def finish(model: torch.nn.Module, state: TrainState, final_val: dict) -> None:
        if io.rank != 0:
            return
        export_final(run_uri, model, manifest.tokenizer_uri)
        metrics = [json.loads(ln) for ln in log[0].lines]
        summary = build_summary(plan, state, metrics, final_val or (metrics[-1] if metrics else {}))
        storage.write_bytes(storage.join(run_uri, "summary.json"), json.dumps(summary, indent=1).encode())

    io.report, io.restore = report, restore
    return run_training(cfg, plan, manifest.vocab_size, manifest.eos_token_id, io, evaluator, on_finish=finish)
