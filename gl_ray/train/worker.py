"""One worker's run, with or without Ray: dataset facts, validation set, run outputs, then the loop."""

from __future__ import annotations

from gl_ray.architectures import ModelSpec
from gl_ray.config import Config
from gl_ray.data.manifest import load_manifest
from gl_ray.data.stream import get_stream
from gl_ray.schedule import Plan
from gl_ray.train.checkpoint import TrainState
from gl_ray.train.io import WorkerIO
from gl_ray.train.loop import Trainer
from gl_ray.train.validation import Evaluator
from gl_ray.train.outputs import RunOutputs


def run_worker(cfg: Config, plan: Plan, run_uri: str, io: WorkerIO, print_progress: bool,
               spec: ModelSpec | None = None) -> TrainState:
    """Train what is left of the plan; rank 0 keeps RUN/metrics.jsonl and writes RUN/final/ and summary.json.
    spec: the run's model (the driver's gl_ray.train.identity.run_model; None: model.preset's)."""
    manifest = load_manifest(cfg.data.path)
    micro_batch_tokens = cfg.train.micro_batch_tokens  # with auto, the trainer sets it at each stage start
    if micro_batch_tokens == "auto":
        micro_batch_tokens = plan.tokens_per_step // plan.world_size
    evaluator = Evaluator(get_stream(cfg.data.path, "val"), cfg.data.eval_tokens, micro_batch_tokens,
                          eos_id=manifest.eos_token_id if cfg.data.document_masking else None,
                          attention=cfg.model.attention)
    outputs = RunOutputs(run_uri, plan, manifest.tokenizer_uri, io.rank, print_progress, cfg=cfg)
    trainer = Trainer(cfg, plan, io, vocab_size=manifest.vocab_size, eos_id=manifest.eos_token_id,
                      evaluator=evaluator, hooks=outputs, spec=spec)
    return trainer.train()
