"""Checkpoint state: one function writes it, one reads it.

A checkpoint folder (RUN/checkpoint_step-000123/) holds:
    model.safetensors   model weights (unwrapped from DDP)
    optimizer.pt        AdamW state_dict (torch.save; loaded with weights_only=True)
    rng.pt              torch CPU RNG state (uint8 tensor)
    state.json          {"step", "stage", "stage_step", "tokens", "elapsed_s", "stage_wall_s": [...], "flops",
                         "files": {name: sha256}}: the data cursor is (stage, stage_step)
state.json is written last and lists a digest of every other file, so a truncated or tampered checkpoint is
refused (UserError) instead of loaded.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TypeVar

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from gl_ray import storage
from gl_ray.errors import UserError

PREFIX = "checkpoint_step-"
T = TypeVar("T")


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done (global, all stages)
    stage: int = 0  # index of the stage the next step belongs to
    stage_step: int = 0  # optimizer steps done within that stage
    tokens: int = 0  # training tokens consumed
    elapsed_s: float = 0.0  # training wall time, summed over restarts
    stage_wall_s: list = field(default_factory=list)  # wall time per finished or running stage
    flops: float = 0.0  # training FLOPs so far, all workers (PaLM's accounting, gl_ray.model.training_flops)


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:07d}"


def _model_state(model: torch.nn.Module) -> dict:
    return {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}


def save_checkpoint(folder: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    state: TrainState) -> None:
    """Write a checkpoint folder (local path or s3:// URI)."""
    blobs = {"model.safetensors": st_save(_model_state(model))}
    buf = io.BytesIO()
    torch.save(optimizer.state_dict(), buf)
    blobs["optimizer.pt"] = buf.getvalue()
    buf = io.BytesIO()
    torch.save(torch.get_rng_state(), buf)
    blobs["rng.pt"] = buf.getvalue()
    for name, data in blobs.items():
        storage.write_bytes(storage.join(folder, name), data)
    meta = asdict(state) | {"files": {n: hashlib.sha256(d).hexdigest() for n, d in blobs.items()}}
    storage.write_bytes(storage.join(folder, "state.json"), json.dumps(meta).encode())


def _read_meta(folder: str) -> tuple[TrainState, dict]:
    """(state, {file: sha256}) from state.json (UserError if missing or unreadable)."""
    try:
        meta = json.loads(storage.read_bytes(storage.join(folder, "state.json")))
        digests = meta.pop("files")
        return TrainState(**meta), digests
    except (UserError, json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
        raise UserError(f"checkpoint {folder!r} has no valid state.json") from None


def _verified(folder: str) -> tuple[TrainState, dict]:
    """(state, {file: bytes}) of a checkpoint whose files all match their digests (UserError otherwise)."""
    state, digests = _read_meta(folder)
    blobs = {}
    for name, want in digests.items():
        uri = storage.join(folder, name)
        data = storage.read_bytes(uri) if storage.exists(uri) else b""
        if hashlib.sha256(data).hexdigest() != want:
            raise UserError(f"checkpoint {folder!r}: {name} is missing, truncated or modified (digest mismatch)")
        blobs[name] = data
    return state, blobs


def load_checkpoint(folder: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None
                    ) -> TrainState:
    """Restore model, optimizer and RNG from a checkpoint; verifies every file's digest before loading any."""
    state, blobs = _verified(folder)
    model.load_state_dict(st_load(blobs["model.safetensors"]))
    if optimizer is not None:
        optimizer.load_state_dict(torch.load(io.BytesIO(blobs["optimizer.pt"]), weights_only=True))
    torch.set_rng_state(torch.load(io.BytesIO(blobs["rng.pt"]), weights_only=True))
    return state


def list_checkpoints(run_uri: str) -> list[tuple[int, str]]:
    """(step, folder) of every checkpoint folder of a run with a state.json, oldest first."""
    out = []
    for name in storage.list_dir(run_uri):
        if name.startswith(PREFIX) and storage.exists(storage.join(run_uri, name, "state.json")):
            try:
                out.append((int(name[len(PREFIX):]), storage.join(run_uri, name)))
            except ValueError:
                continue
    return sorted(out)


def verify_checkpoint(folder: str) -> TrainState:
    """The state of a checkpoint whose files all match their digests (UserError otherwise)."""
    return _verified(folder)[0]


def _newest_good(run_uri: str, use: Callable[[str], T], warn: Callable[[str], object]) -> T | None:
    """use(folder) of the newest checkpoint for which it succeeds; a bad one (UserError) is reported and skipped,
    falling back to the one before it. None: no usable checkpoint (a new run)."""
    for _, folder in reversed(list_checkpoints(run_uri)):
        try:
            return use(folder)
        except UserError as e:
            warn(f"gl-ray: refusing checkpoint, falling back to the previous one: {e}")
    return None


def find_resume_checkpoint(run_uri: str, warn=print) -> tuple[str, TrainState] | None:
    """(folder, state) of the newest checkpoint of a run that verifies (None: new run)."""
    return _newest_good(run_uri, lambda folder: (folder, verify_checkpoint(folder)), warn)


def restore_latest(run_uri: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                   warn=print) -> TrainState | None:
    """Load the newest good checkpoint of a run into model and optimizer (None: nothing to resume). Each file is
    read once: load_checkpoint checks every digest before it loads anything."""
    return _newest_good(run_uri, lambda folder: load_checkpoint(folder, model, optimizer), warn)


def prune_checkpoints(run_uri: str, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints (the Ray path lets Ray Train do this)."""
    for _, folder in list_checkpoints(run_uri)[:-keep]:
        storage.delete_dir(folder)
