"""The one typed config tree of a gl-ray run.

Load order: dataclass defaults, then a YAML file, then `--set section.key=value` overrides (values parsed as
YAML, e.g. `--set schedule.lengths=[128,512]`), each value checked against its field's type as it is set
(`Literal` fields against their choices, `list[int]` element by element), then `Config.validate()` for what
spans fields. Every field carries a one-line doc (`metadata["doc"]`) that `gl-ray <cmd> --help` prints.

    cfg = load_config("pipelines/configs/tiny-growlength.yaml", ["train.seed=1"])
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from gl_ray.errors import UserError
from gl_ray.shipped import find_shipped
from gl_ray.sizes import parse_size

PositionMode = Literal["extrapolate", "interpolate", "pose"]
Preset = Literal["tiny", "tiny-llama", "pythia-14m", "pythia-31m", "pythia-70m", "pythia-160m",
                 "pythia-410m"]  # see gl_ray.architectures.PRESETS
Attention = Literal["sdpa", "flex", "flash_attention_2"]  # see gl_ray.attention.ATTENTION
Device = Literal["auto", "cpu", "cuda"]  # see gl_ray.devices
Precision = Literal["auto", "fp32", "bf16"]
Strategy = Literal["ddp", "fsdp"]  # see gl_ray.train.parallel
MicroBatchTokens = int | Literal["auto"]  # see gl_ray.train.micro_batch
Logger = Literal["tensorboard", "mlflow", "wandb"]  # see gl_ray.train.tracking
NonFinite = Literal["stop", "skip"]  # see gl_ray.train.loop.Trainer.diverged
Shape = Literal["ladder", "linear", "geometric"]  # see gl_ray.schedule.stage_lengths
Mode = Literal["reshape", "window"]
Packing = Literal["concat", "decompose"]  # see gl_ray.data.decompose
Curriculum = Literal["ladder", "uniform", "grow_p2", "odds"]  # see gl_ray.data.decompose.StepDraws


MAX_TOKENS = 2**50  # a token count beyond this is a typo (1e300), not a budget
MAX_COUNT = 100_000  # cycles, windows and other counts the code loops over or holds per item: beyond is a typo


def _f(default: Any, doc: str) -> Any:
    """A dataclass field with a one-line doc."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"doc": doc})
    return field(default=default, metadata={"doc": doc})


@dataclass
class SourceConfig:
    path: str = _f("", "a prepared dataset folder or s3:// URI (see `gl-ray prepare`), tokenized as data.path")
    weight: float = _f(1.0, "its share of the training tokens, relative to the other sources' (>= 0)")


@dataclass
class DataConfig:
    path: str = _f("data/stdlib", "prepared dataset folder or s3:// URI holding manifest.json (see `gl-ray prepare`); "
                                  "with data.sources: the validation set and tokenizer, one of the sources or "
                                  "empty (the first source)")
    seed: int = _f(0, "seed for the document order of each epoch (0: epoch 0 in manifest order, later epochs shuffled)")
    eval_tokens: int = _f(32768, "validation tokens per evaluation and per length (rounded down to whole rows)")
    prefetch_batches: int = _f(4, "optimizer steps' rows (per worker) Ray Data prefetches ahead of the training loop")
    head_steps: int = _f(8, "optimizer steps after each (re)start that every worker reads itself (the same rows) "
                            "while the stage's Ray Data pipeline starts up; 0: all from Ray Data")
    document_masking: bool = _f(False, "attention stays within each document of a packed row (documents end with "
                                       "EOS), positions restart per document; also in validation")
    packing: Packing = _f("concat", "concat: documents packed end to end into rows of the stage length | decompose: "
                                    "each document cut into power-of-two chunks, each step one bucket of them "
                                    "(gl_ray/data/decompose.py)")
    min_chunk: int = _f(8, "decompose: chunks shorter than this (a power of two) are left out and counted")
    curriculum: Curriculum = _f("ladder", "decompose: how steps draw their bucket: ladder (stage k among the buckets "
                                          "up to its length, by tokens) | uniform (all buckets, by tokens) | grow_p2 "
                                          "(data.cycles cycles, short chunks first in each) | odds (data.bucket_odds)")
    bucket_odds: dict[int, float] = _f({}, "decompose with curriculum odds: each bucket length's odds, summing to 1")
    cycles: int = _f(8, "decompose with curriculum grow_p2: cycles over the buckets (the paper's epochs)")
    sources: list[SourceConfig] = _f([], "a training mixture: [{path, weight}, ...], datasets of one tokenizer, "
                                         "each drawn by its weight in tokens (empty: data.path alone; "
                                         "gl_ray/data/mixture.py)")
    stage_weights: list[list[float]] = _f([], "with data.sources: one list of weights per stage, one per source, "
                                              "instead of the sources' own weights (e.g. more long documents late)")
    long_doc_boost: list[float] = _f([], "length-aware upsampling of data.path (or of each source, its weight kept): "
                                         "one factor per stage by which long documents are drawn more often than "
                                         "their share of its train tokens (1: the natural mix; e.g. [1, 1, 4]; "
                                         "gl_ray/data/mixture.py)")
    long_doc_min: int = _f(0, "with data.long_doc_boost: a document of at least this many tokens is long (0: the "
                              "final stage length)")


@dataclass
class ModelConfig:
    preset: Preset = _f("tiny", "architecture preset: tiny | tiny-llama | pythia-14m | pythia-31m | pythia-70m | "
                                "pythia-160m | pythia-410m (model.config / model.init_from take its place when given)")
    config: str = _f("", "a local folder with an HF config.json, or an org/model name in the local HF cache (a RoPE "
                         "decoder: gpt_neox, llama, mistral, qwen2, qwen3), trained from a fresh init")
    init_from: str = _f("", "continued pretraining: a local HF model folder (config, safetensors, tokenizer) or a "
                            "cached org/model whose weights the run starts from; a resume ignores it (its "
                            "checkpoint wins)")
    max_position_embeddings: int = _f(2048, "longest length the model is meant for (RoPE has no position table, so "
                                            "any value works); must be >= the last stage length")
    position_mode: PositionMode = _f("extrapolate", "position ids in short stages: extrapolate | interpolate | pose")
    rope_theta: float = _f(10000.0, "RoPE base frequency; raise it for long final lengths (e.g. 500000 at 8k+) so "
                                    "the slowest rotary dimensions do not wrap around within the context (a loaded "
                                    "config keeps its own base unless this is set to another value)")
    attention: Attention = _f("sdpa", "attention kernel: sdpa | flex (torch flex_attention, GPU for training) | "
                                      "flash_attention_2 (needs the flash-attn package)")
    init_std: float = _f(0.02, "std of the normal weight init")


@dataclass
class ScheduleConfig:
    shape: Shape = _f("ladder", "ladder (the explicit lengths) | linear | geometric (stages generated from start_len "
                                "to final_len)")
    mode: Mode = _f("reshape", "reshape: rows of the stage length (GrowLength) | window: rows at the final length, "
                               "attention limited to a causal window of the stage length (SkyLadder-style)")
    lengths: list[int] = _f([128, 256, 512, 1024], "shape ladder: stage lengths, strictly increasing, multiples of 8")
    ratios: list[float] = _f([], "share of the budget per stage, summing to 1 (empty: warmup_fraction, else equal)")
    start_len: int = _f(0, "shape linear/geometric: the first stage length (0: the first of lengths)")
    final_len: int = _f(0, "shape linear/geometric: the last stage length, where the rest of the budget runs (0: the "
                           "last of lengths)")
    len_step: int = _f(0, "shape linear: tokens added to the length per stage (or give num_stages)")
    growth: float = _f(0.0, "shape geometric: factor between stage lengths, e.g. 2 (or give num_stages)")
    num_stages: int = _f(0, "shape linear/geometric: stages before final_len, instead of len_step / growth")
    warmup_fraction: float = _f(0.0, "share of the budget for the stages before the final length, split equally "
                                     "(0: ratios decide)")
    budget_tokens: int = _f(0, "total training tokens (0 with budget_time_s: cap that sizes each stage's data)")
    budget_time_s: float = _f(0.0, "wall-time budget in seconds; stages switch at their fractions of it (0: off)")
    tokens_per_step: int = _f(65536, "global tokens per optimizer step, the same in every stage")
    rope_theta: list[float] = _f([], "RoPE base per stage, one per stage (adjusted base frequency, as Llama 3's "
                                     "long-context stage; empty: model.rope_theta throughout)")


@dataclass
class OptimConfig:
    lr: float = _f(6e-4, "peak learning rate (AdamW)")
    min_lr: float = _f(6e-5, "learning rate at the end of the budget (cosine decay)")
    warmup_tokens: int = _f(0, "tokens of linear warmup from 0 to lr")
    beta1: float = _f(0.9, "AdamW beta1")
    beta2: float = _f(0.95, "AdamW beta2")
    eps: float = _f(1e-8, "AdamW epsilon")
    weight_decay: float = _f(0.1, "AdamW weight decay (not on biases and norms)")
    grad_clip: float = _f(1.0, "max global gradient norm (0: off)")


@dataclass
class TrainConfig:
    micro_batch_tokens: MicroBatchTokens = _f(8192, "tokens per forward pass per worker (gradient accumulation "
                                                    "is derived), or auto: the largest that fits, per stage")
    memory_budget: str = _f("", "with micro_batch_tokens auto on CPU: peak memory of a worker process the micro "
                                "batch must fit, e.g. 8GiB (empty: no limit; on GPU the device's memory decides)")
    seed: int = _f(0, "seed for weight init and PoSE position ids")
    device: Device = _f("auto", "auto | cpu | cuda")
    precision: Precision = _f("auto", "auto (bf16 autocast on cuda, fp32 on cpu) | fp32 | bf16")
    compile: bool = _f(False, "torch.compile the model (faster GPU steps after a one-off compile per stage length)")
    activation_checkpointing: bool = _f(False, "recompute each transformer block's activations in backward: less "
                                               "memory for long lengths, ~1/3 more compute")
    log_every_steps: int = _f(10, "optimizer steps between metric reports")
    eval_every_tokens: int = _f(0, "training tokens between validation passes (0: only at the end)")
    checkpoint_every_tokens: int = _f(0, "training tokens between checkpoints (0: only at stage ends)")
    keep_checkpoints: int = _f(2, "checkpoints kept in storage (oldest deleted first)")
    async_checkpoint: bool = _f(True, "the loop waits only while a checkpoint is copied to host memory; it is "
                                      "written and uploaded in the background (false: the loop waits for all)")
    nonfinite: NonFinite = _f("stop", "a NaN/inf loss or gradient norm: stop (exit 3, nothing of it saved) | skip "
                                      "(leave that step's update out; reads the norm back every step)")
    max_skipped_steps: int = _f(10, "with nonfinite skip: more skipped steps than this stop the run")
    spike_factor: float = _f(2.0, "a report window whose mean loss is above this many times the median of the "
                                  "windows before it stops the run (exit 3, nothing of it saved); 0: off")
    spike_windows: int = _f(8, "report windows the spike rule takes its median over (it starts after 3)")
    loggers: list[Logger] = _f([], "experiment trackers besides metrics.jsonl: any of tensorboard, mlflow, wandb")
    mlflow_tracking_uri: str = _f("", "MLflow tracking URI (empty: MLFLOW_TRACKING_URI, else SQLite in RUN/mlflow.db)")
    wandb_project: str = _f("", "W&B project (empty: WANDB_PROJECT, else gl-ray)")
    wandb_entity: str = _f("", "W&B entity (empty: WANDB_ENTITY, else your default)")
    tracker_group: str = _f("", "MLflow experiment and W&B group (empty: the run name; a Tune search: its name)")


@dataclass
class RayConfig:
    num_workers: int = _f(1, "Ray Train workers (0: run in one process without Ray); [min, max]: elastic, sets "
                             "ray.min_workers too")
    min_workers: int = _f(0, "elastic training: go on with as few as this many workers when nodes are lost, grow "
                             "back to ray.num_workers when they return (0: fixed at ray.num_workers)")
    resize_check_s: float = _f(60.0, "elastic training: how often Ray Train looks for room to grow the workers back")
    start_timeout_s: float = _f(60.0, "how long Ray Train waits for a worker group to start before it tries again "
                                      "(elastic: with the workers it can then place)")
    notice_poll_s: float = _f(5.0, "how often Ray Train looks for a preemption notice (a drain of a node with "
                                   "workers); the workers then checkpoint and wait for the restart")
    use_gpu: bool = _f(False, "one GPU per worker")
    cpus_per_worker: float = _f(1.0, "CPUs reserved per worker")
    worker_resources: dict[str, float] = _f({}, "custom Ray resources each worker reserves as well, e.g. "
                                                "{node_slot: 1} on nodes started with `ray start --resources="
                                                "'{\"node_slot\": 1}'`: one worker per node (a local instance "
                                                "gl-ray starts gets enough of them)")
    storage_path: str = _f("runs", "where runs live: local folder or s3:// URI; a run is {storage_path}/{name}")
    address: str = _f("", "Ray cluster to join (empty: RAY_ADDRESS, else start a local one)")
    local_num_cpus: int = _f(0, "logical CPUs of a local cluster (0: workers + 2, enough for Ray Data)")
    max_failures: int = _f(0, "worker-group restarts Ray Train may do from the last checkpoint")
    strategy: Strategy = _f("ddp", "data parallelism: ddp (whole model per worker) | fsdp (FSDP2: parameters, "
                                   "gradients and optimizer state sharded over the workers; sharded checkpoints)")

    @property
    def world_sizes(self) -> list[int]:
        """The worker counts a run may train with: every one from ray.min_workers to ray.num_workers (elastic),
        else ray.num_workers alone."""
        return list(range(self.min_workers or self.num_workers, self.num_workers + 1))


@dataclass
class Config:
    name: str = _f("growlength", "run name; a run with the same name and storage resumes")
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    def validate(self) -> Config:
        """Check the config as a schema: each value and the rules between values, with nothing imported beyond
        it (no torch, data or Ray). What needs the schedule's arithmetic or this machine (kernels, devices,
        trackers) is checked by the driver before anything is written: gl_ray.train.preflight. Raises UserError."""
        self.check_values()
        self.check_cluster()
        self.check_data_and_schedule()
        self.check_sources()
        self.check_long_doc_boost()
        return self

    def check_values(self) -> None:
        """Each value on its own: the run name, sizes and counts, signs and ranges."""
        if not self.name or "/" in self.name or self.name.startswith(".") or any(ord(c) < 32 for c in self.name):
            raise UserError(f"name {self.name!r} must be a plain folder name (no '/', no control characters, not "
                            "starting with '.')")
        if self.train.micro_batch_tokens != "auto" and self.train.micro_batch_tokens <= 0:
            raise UserError(f"train.micro_batch_tokens must be positive or auto, got {self.train.micro_batch_tokens}")
        if self.train.memory_budget:
            parse_size(self.train.memory_budget, "train.memory_budget")
        for key in ("train.log_every_steps", "train.keep_checkpoints", "data.eval_tokens", "schedule.tokens_per_step",
                    "ray.start_timeout_s", "ray.notice_poll_s", "ray.cpus_per_worker", "optim.eps", "model.init_std",
                    "model.rope_theta"):
            if self.get(key) <= 0:
                raise UserError(f"{key} must be positive, got {self.get(key)}")
        for key in ("optim.lr", "optim.min_lr", "optim.warmup_tokens", "optim.weight_decay", "optim.grad_clip",
                    "train.eval_every_tokens", "train.checkpoint_every_tokens", "train.max_skipped_steps",
                    "ray.num_workers", "ray.min_workers", "ray.max_failures", "ray.local_num_cpus",
                    "ray.resize_check_s", "data.prefetch_batches", "data.head_steps", "data.seed"):
            if self.get(key) < 0:
                raise UserError(f"{key} must be >= 0, got {self.get(key)}")
        if self.train.spike_factor and self.train.spike_factor <= 1 or self.train.spike_factor < 0:
            raise UserError(f"train.spike_factor must be above 1 (or 0: off), got {self.train.spike_factor}")
        if not 3 <= self.train.spike_windows <= MAX_COUNT:
            raise UserError(f"train.spike_windows must be between 3 and {MAX_COUNT}, got {self.train.spike_windows}")
        for key in ("schedule.budget_tokens", "schedule.tokens_per_step"):
            if self.get(key) > MAX_TOKENS:
                raise UserError(f"{key}={self.get(key):.3g} is beyond any corpus (at most {MAX_TOKENS:.3g} tokens)")
        for key in ("optim.beta1", "optim.beta2"):
            if not 0 <= self.get(key) < 1:
                raise UserError(f"{key} must be in [0, 1), got {self.get(key)}")
        if self.optim.min_lr > self.optim.lr:
            raise UserError(f"optim.min_lr={self.optim.min_lr} is above optim.lr={self.optim.lr}")
        if not 1 <= self.data.cycles <= MAX_COUNT:  # cycles x buckets of draws are held in memory
            raise UserError(f"data.cycles must be between 1 and {MAX_COUNT}, got {self.data.cycles}")

    def check_cluster(self) -> None:
        """ray.* with each other and with the device: custom resources, elastic bounds, FSDP, CUDA workers."""
        for name, amount in self.ray.worker_resources.items():
            if name in ("CPU", "GPU", "memory", "object_store_memory") or not name.strip():
                raise UserError(f"ray.worker_resources: {name!r} is not a custom resource (CPUs and GPUs are "
                                "ray.cpus_per_worker and ray.use_gpu)")
            if amount <= 0:
                raise UserError(f"ray.worker_resources.{name} must be positive, got {amount}")
        if self.ray.min_workers > self.ray.num_workers or self.ray.min_workers and self.ray.num_workers == 0:
            raise UserError(f"ray.min_workers={self.ray.min_workers} is above ray.num_workers={self.ray.num_workers} "
                            "(elastic: ray.num_workers: [min, max], min >= 1)")
        if self.ray.strategy == "fsdp" and self.ray.num_workers == 0:
            raise UserError("ray.strategy=fsdp shards the model over Ray workers; set ray.num_workers >= 1 "
                            "(ray.num_workers=0 trains in one process without Ray)")
        if self.train.device == "cuda" and self.ray.num_workers > 0 and not self.ray.use_gpu:
            raise UserError("train.device=cuda with Ray workers needs ray.use_gpu=true (one GPU per worker)")

    def check_data_and_schedule(self) -> None:
        """The rules between data, schedule and model keys: decompose's curriculum, window mode."""
        s = self.schedule
        if self.data.bucket_odds and self.data.curriculum != "odds":
            raise UserError(f"data.bucket_odds is read by data.curriculum=odds only (it is {self.data.curriculum})")
        if self.data.curriculum == "odds" and not self.data.bucket_odds:
            raise UserError("data.curriculum=odds needs data.bucket_odds (each bucket length's odds, summing to 1)")
        if self.data.packing == "decompose" and s.mode == "window":
            raise UserError("data.packing=decompose takes each step's rows from one bucket of chunk lengths; "
                            "schedule.mode=window widens a window over rows of one length (use schedule.mode=reshape)")
        if s.mode == "window":
            if self.model.position_mode != "extrapolate":
                raise UserError(f"schedule.mode=window keeps every row at the final length, so positions already "
                                f"span it; model.position_mode={self.model.position_mode} does not compose with it "
                                "(use extrapolate)")
            if self.model.attention == "flash_attention_2":
                raise UserError("schedule.mode=window needs model.attention sdpa or flex (the window is a mask)")

    def check_sources(self) -> None:
        """data.sources and data.stage_weights as values (their count against the stages: gl_ray.data.mixture); an
        empty data.path becomes the first source."""
        d = self.data
        if not d.sources:
            if d.stage_weights:
                raise UserError("data.stage_weights weighs data.sources; set data.sources (or drop stage_weights)")
            return
        if d.packing == "decompose":
            raise UserError("data.sources mixes packed rows; data.packing=decompose is not supported with it "
                            "(use data.packing=concat)")
        if any(not s.path for s in d.sources):
            raise UserError(f"data.sources[{[bool(s.path) for s in d.sources].index(False)}] has no path")
        check_weights("data.sources weights", [s.weight for s in d.sources])
        for k, row in enumerate(d.stage_weights):
            if len(row) != len(d.sources):
                raise UserError(f"data.stage_weights[{k}] has {len(row)} weights for {len(d.sources)} sources: give "
                                "one weight per source")
            check_weights(f"data.stage_weights[{k}]", row)
        def same(p: str) -> str:  # as gl_ray.storage.absolute, without importing pyarrow into the schema
            return p if p.startswith("s3://") else os.path.abspath(os.path.expanduser(p))

        if not d.path:
            d.path = d.sources[0].path
        elif same(d.path) not in [same(s.path) for s in d.sources]:
            raise UserError(f"data.path {d.path!r} is not one of data.sources: with sources it is the validation set "
                            "and tokenizer; set it to one of them, or to '' (the first source)")

    def check_long_doc_boost(self) -> None:
        """data.long_doc_boost and data.long_doc_min as values (the boost's count against the stages and the
        threshold against the documents: gl_ray.data.mixture.long_doc_split)."""
        d = self.data
        if d.long_doc_min < 0:
            raise UserError(f"data.long_doc_min must be >= 0 (0: the final stage length), got {d.long_doc_min}")
        if not d.long_doc_boost:
            if d.long_doc_min:
                raise UserError("data.long_doc_min says which documents data.long_doc_boost boosts; set "
                                "data.long_doc_boost (one factor per stage) or drop long_doc_min")
            return
        if any(not (b > 0 and math.isfinite(b)) for b in d.long_doc_boost):
            raise UserError(f"data.long_doc_boost factors must be positive and finite (1: the natural mix), got "
                            f"{d.long_doc_boost}")
        if d.packing == "decompose":
            raise UserError("data.long_doc_boost mixes packed rows; data.packing=decompose has its own length "
                            "buckets (data.curriculum), use one or the other")

    def get(self, dotted: str) -> Any:
        obj: Any = self
        for part in dotted.split("."):
            obj = getattr(obj, part)
        return obj

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def check_weights(what: str, weights: list[float]) -> None:
    """Mixture weights: each >= 0 and finite, not all 0; UserError naming `what` otherwise."""
    if any(not (w >= 0 and math.isfinite(w)) for w in weights) or not sum(weights) > 0:
        raise UserError(f"{what} must be >= 0 and not all 0, got {weights}")


SECTIONS = {"data": DataConfig, "model": ModelConfig, "schedule": ScheduleConfig, "optim": OptimConfig,
            "train": TrainConfig, "ray": RayConfig}


def all_keys() -> list[str]:
    keys = ["name"]
    for section, cls in SECTIONS.items():
        keys += [f"{section}.{f.name}" for f in dataclasses.fields(cls)]
    return keys


def unknown_key(key: str, valid: list[str]) -> UserError:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(valid)}"
    return UserError(f"unknown config key {key!r}{hint}")


def _coerce(key: str, value: Any, typ: Any) -> Any:
    """Check a YAML value against the field type (ints are accepted for floats); returns the value to set."""
    if dataclasses.is_dataclass(typ):  # a mapping of its fields (data.sources' items), missing ones at their default
        if isinstance(value, typ):
            return value
        if not isinstance(value, dict):
            names = ", ".join(f.name for f in dataclasses.fields(typ))
            raise UserError(f"config key {key!r} expects a mapping of {names}, got {value!r}")
        hints = get_type_hints(typ)
        unknown = [k for k in value if k not in hints]
        if unknown:
            raise unknown_key(f"{key}.{unknown[0]}", [f"{key}.{k}" for k in hints])
        return typ(**{k: _coerce(f"{key}.{k}", v, hints[k]) for k, v in value.items()})
    if get_origin(typ) in (Union, types.UnionType):  # the first member type the value fits
        for member in get_args(typ):
            try:
                return _coerce(key, value, member)
            except UserError:
                continue
        names = " or ".join(" | ".join(map(repr, get_args(m))) if get_origin(m) is Literal else m.__name__
                            for m in get_args(typ))
        raise UserError(f"config key {key!r} expects {names}, got {value!r}")
    if get_origin(typ) is Literal:
        choices = get_args(typ)
        if value not in choices:
            raise UserError(f"{key}={value!r} is not one of {' | '.join(choices)}")
        return value
    if get_origin(typ) is dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise UserError(f"config key {key!r} expects a mapping, got {value!r}")
        key_type, value_type = get_args(typ)
        return {_coerce(f"{key} key", k, key_type): _coerce(f"{key}.{k}", v, value_type) for k, v in value.items()}
    if get_origin(typ) is list:
        if value is None:
            return []
        if not isinstance(value, list):
            raise UserError(f"config key {key!r} expects list, got {value!r}")
        (item,) = get_args(typ)
        return [_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    ok = {
        int: lambda v: isinstance(v, int) and not isinstance(v, bool),
        float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
        bool: lambda v: isinstance(v, bool),
        str: lambda v: isinstance(v, str),
    }[typ]
    if typ is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if typ in (int, float) and isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            pass
    if typ is int and isinstance(value, float) and value.is_integer():  # 1.5e+4 (YAML's float) as 1.5e4
        value = int(value)
    if not ok(value):
        raise UserError(f"config key {key!r} expects {typ.__name__}, got {value!r}")
    return float(value) if typ is float else value


def config_from_dict(raw: dict) -> Config:
    """Build a Config from a nested dict (YAML shape); unknown keys and wrong types raise UserError."""
    if not isinstance(raw, dict):
        raise UserError("a config file must be a YAML mapping of sections (name, data, model, ...)")
    cfg = Config()
    valid = all_keys()
    for top, value in raw.items():
        if top == "name":
            cfg.name = _coerce("name", value, str)
            continue
        if top not in SECTIONS:
            raise unknown_key(str(top), valid)
        if not isinstance(value, dict):
            raise UserError(f"config section {top!r} must be a mapping, got {value!r}")
        section = getattr(cfg, top)
        hints = get_type_hints(type(section))
        for key, v in value.items():
            dotted = f"{top}.{key}"
            if key not in hints:
                raise unknown_key(dotted, valid)
            if dotted == "ray.num_workers" and isinstance(v, list):  # elastic, as Ray spells it: [min, max]
                section.min_workers, v = _worker_range(v)
            setattr(section, key, _coerce(dotted, v, hints[key]))
    return cfg


def _worker_range(value: list) -> tuple[int, int]:
    """ray.num_workers: [min, max] -> (min, max), checked."""
    ok = len(value) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    if not ok or not 1 <= value[0] <= value[1]:
        raise UserError(f"ray.num_workers={value!r}: elastic training takes [min, max] with 1 <= min <= max")
    return value[0], value[1]


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply `section.key=value` strings (value parsed as YAML) to a nested dict, in place."""
    if not isinstance(raw, dict):
        raise UserError("a config file must be a YAML mapping of sections (name, data, model, ...)")
    for item in overrides:
        if "=" not in item:
            raise UserError(f"--set {item!r} must look like section.key=value")
        dotted, text = item.split("=", 1)
        try:
            value = yaml.load(text, Loader=StrictLoader) if text != "" else ""
        except yaml.YAMLError:
            raise UserError(f"--set {dotted}: value {text!r} is not valid YAML") from None
        parts = dotted.strip().split(".")
        if dotted.strip() not in all_keys():
            raise unknown_key(dotted.strip(), all_keys())
        node = raw
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"config section {part!r} must be a mapping, got {node!r}")
        node[parts[-1]] = value
    return raw


MAX_YAML_DEPTH = 32  # nesting levels; a config has three


class StrictLoader(yaml.SafeLoader):
    """YAML as gl-ray reads its configs and spaces: a key given twice in one mapping is refused (the last one
    used to win silently: a second `schedule:` replaced the first), and so are aliases (a few lines of them expand
    to gigabytes) and nesting deeper than MAX_YAML_DEPTH (a RecursionError otherwise)."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            raise yaml.MarkedYAMLError(problem="YAML aliases (*name) are not accepted here",
                                       problem_mark=self.peek_event().start_mark)
        self.depth = getattr(self, "depth", 0) + 1
        try:
            if self.depth > MAX_YAML_DEPTH:
                raise yaml.MarkedYAMLError(problem=f"nested deeper than {MAX_YAML_DEPTH} levels",
                                           problem_mark=self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.MarkedYAMLError(problem=f"key {key!r} is given twice", problem_mark=key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | Path, what: str) -> Any:
    """A YAML file through StrictLoader; UserError naming `what` (e.g. "config file 'x.yaml'") and the line."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{what} not found")
    try:
        return yaml.load(p.read_text(encoding="utf-8"), Loader=StrictLoader)
    except UnicodeDecodeError:
        raise UserError(f"{what} is not UTF-8 text") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        reason = f": {e.problem}" if getattr(e, "problem", None) else ""
        raise UserError(f"{what} is not valid YAML{where}{reason}") from None


def load_config(path: str | Path | None, overrides: list[str] | None = None, validate: bool = True) -> Config:
    """YAML file (optional; a path or a shipped config's name), then overrides, then validation. Raises UserError
    on any problem."""
    raw: dict = {}
    if path is not None:
        raw = read_yaml(find_shipped(path, "configs"), f"config file {str(path)!r}") or {}
    cfg = config_from_dict(apply_overrides(raw, overrides or []))
    return cfg.validate() if validate else cfg


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def describe_keys() -> str:
    """All keys with their defaults and docs, for --help."""
    lines = [f"  name = {Config().name!r}: {Config.__dataclass_fields__['name'].metadata['doc']}"]
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(f"  {section}.{f.name} = {default!r}: {f.metadata['doc']}")
    return "\n".join(lines)
