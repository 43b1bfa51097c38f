"""Checkpoint state: one function writes it, one reads it.

A checkpoint folder (RUN/checkpoint_step-000123/) holds, for ray.strategy ddp (and runs without Ray):
    model.safetensors   model weights (unwrapped from DDP)
    optimizer.pt        AdamW state_dict (torch.save; loaded with weights_only=True)
and for ray.strategy fsdp, a torch.distributed.checkpoint folder written by every rank at once:
    __R_0.distcp        rank R's shards of model and optimizer state (by parameter name)
    .metadata           the global layout (written by rank 0); a resume on another number of workers reshards
and in both:
    rng.pt              torch CPU RNG state (uint8 tensor)
    state.json          {"step", "stage", "stage_step", "tokens", "elapsed_s", "stage_wall_s": [...], "flops",
                         "strategy", "files": {name: sha256}, "sha256"}: the data cursor is (stage, stage_step)
state.json is written last, by rank 0, and lists a digest of every other file of every rank, and "sha256" is the
digest of state.json's own other fields (`seal`; RUN/rewind.json is sealed the same way), so a truncated,
incomplete or tampered checkpoint (a hand-edited cursor too) is refused (UserError) instead of loaded.

Only folders named exactly as `checkpoint_name` writes them are checkpoints: a copy named
checkpoint_step-0000016.bak or "checkpoint_step-0000016 copy" is neither loaded, pruned nor set aside, and an
entry of a local run that is a symbolic link is never read, written or deleted through (a start refuses it).
"""

from __future__ import annotations

import copy
import datetime
import hashlib
import io
import json
import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TypeVar

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from gl_ray import storage
from gl_ray.errors import UserError
from gl_ray.train.parallel import is_sharded, load_sharded_state, sharded_state

PREFIX = "checkpoint_step-"
SET_ASIDE = "rewound"  # RUN/rewound/<time>-<why>/: what a rewind or a start moved out of the run, never deleted
TEMP_NAME = re.compile(r".+\.tmp-[0-9a-f]{8}", re.ASCII)  # storage.write_bytes' temp file of a local write
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
    strategy: str = "ddp"  # ray.strategy that wrote it: ddp (whole files) or fsdp (sharded)
    skipped_steps: int = 0  # steps whose update train.nonfinite=skip left out
    skipped_batch_steps: int = 0  # steps whose data a rewind's --skip-steps left out (gl_ray.train.rewind)
    recent_losses: list = field(default_factory=list)  # the last report windows' losses (the loss-spike rule)


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:07d}"


def checkpoint_step(name: str) -> int | None:
    """The step of a folder name as `checkpoint_name` writes it; None for any other name (a user's copy
    checkpoint_step-0000016.bak, "checkpoint_step-0000016 copy", checkpoint_step-16): never touched as a checkpoint."""
    m = re.fullmatch(re.escape(PREFIX) + r"([0-9]{7,})", name)
    return int(m.group(1)) if m and checkpoint_name(int(m.group(1))) == name else None


@dataclass
class HostCopy:
    """An unsharded checkpoint's content copied to host memory in the step (the next step changes the originals):
    all the loop waits for. write_checkpoint serialises, hashes and writes it later, in any thread."""
    weights: dict[str, torch.Tensor]
    optimizer: dict
    rng: torch.Tensor
    state: TrainState


def host_copy(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: TrainState) -> HostCopy:
    """Copies of an unsharded model's weights, AdamW state, RNG state and TrainState (DDP: the unwrapped model)."""
    weights = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}
    return HostCopy(weights, _copied(optimizer.state_dict()), torch.get_rng_state(), copy.deepcopy(state))


def _copied(obj):
    """obj with every tensor in it copied to CPU (the optimizer's state dict holds references)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _copied(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_copied(v) for v in obj)
    return obj


def write_checkpoint(folder: str, snap: HostCopy) -> None:
    """Serialise, hash and write a host copy as a checkpoint folder (local path or s3:// URI), state.json last."""
    blobs = {"model.safetensors": st_save(snap.weights), "optimizer.pt": _saved(snap.optimizer),
             "rng.pt": _saved(snap.rng)}
    for name, data in blobs.items():
        storage.write_bytes(storage.join(folder, name), data)
    _write_state(folder, snap.state, {name: hashlib.sha256(data).hexdigest() for name, data in blobs.items()})


def _saved(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _write_state(folder: str, state: TrainState, files: dict[str, str]) -> None:
    storage.write_bytes(storage.join(folder, "state.json"), seal(asdict(state) | {"files": files}))


def seal(meta: dict) -> bytes:
    """A JSON record of gl-ray's (state.json, rewind.json) with "sha256", the digest of its other fields: a torn or
    hand-edited copy is told apart from what gl-ray wrote (`unseal`)."""
    return json.dumps(meta | {"sha256": _digest(meta)}).encode()


def unseal(data: bytes) -> tuple[dict, bool] | None:
    """(fields but the digest, whether they match it) of a record `seal` wrote; None if it is none (torn, not JSON,
    not UTF-8, no digest)."""
    try:
        meta = json.loads(data)
        own = meta.pop("sha256")
        return meta, own == _digest(meta)
    except (ValueError, KeyError, TypeError, AttributeError):  # ValueError: JSONDecodeError, UnicodeDecodeError
        return None


def save_checkpoint(folder: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: TrainState, *,
                    rank: int = 0, all_gather: Callable[[object], list] = lambda x: [x]) -> None:
    """Write a checkpoint folder now (local path or s3:// URI). A sharded (FSDP) model: every rank calls this at
    once, each with its own local folder (Ray Train merges the ranks' folders in storage), and `all_gather`
    collects the ranks' file digests for rank 0's state.json. Otherwise only rank 0 calls it."""
    if not is_sharded(model):
        write_checkpoint(folder, host_copy(model, optimizer, state))
        return
    start_sharded_save(folder, model, optimizer, state, rank=rank, all_gather=all_gather)()


def start_sharded_save(folder: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: TrainState, *,
                       rank: int, all_gather: Callable[[object], list], process_group=None,
                       background: bool = False) -> Callable[[], None]:
    """Start this rank's part of a sharded (FSDP) checkpoint in its local `folder` (every rank at once: a
    collective) and return `finish`, which every rank then calls to complete it: it waits for the shards, and
    rank 0 writes rng.pt and state.json with every rank's digests (`all_gather`, a collective too).

    background: torch.distributed.checkpoint's async save. This call blocks only while the shards are copied to
    host memory; they are written by a thread, over `process_group` (a gloo group kept for checkpoints, since the
    training collectives go on meanwhile), and `finish` may run in another thread, after training has moved on:
    the state and RNG are taken now. Otherwise the shards are written before this returns."""
    import torch.distributed.checkpoint as dcp

    state = copy.deepcopy(state)  # as of this step; the loop goes on changing its own
    rng = _saved(torch.get_rng_state()) if rank == 0 else b""
    shards = sharded_state(model, optimizer)
    written = (dcp.async_save(shards, checkpoint_id=folder, process_group=process_group) if background
               else dcp.save(shards, checkpoint_id=folder, process_group=process_group))

    def finish() -> None:
        if background:
            written.result()  # raises the write's error
        digests = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in Path(folder).iterdir()}
        if rank == 0:
            storage.write_bytes(storage.join(folder, "rng.pt"), rng)
            digests["rng.pt"] = hashlib.sha256(rng).hexdigest()
        every_rank = {name: d for ranks in all_gather(digests) for name, d in ranks.items()}
        if rank == 0:
            _write_state(folder, state, every_rank)

    return finish


def _digest(meta: dict) -> str:
    """The digest of state.json's fields (but its own), in a canonical form."""
    return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()


def _read_meta(folder: str) -> tuple[TrainState, dict]:
    """(state, {file: sha256}) from state.json (UserError if missing or unreadable)."""
    try:
        found = unseal(storage.read_bytes(storage.join(folder, "state.json")))
    except UserError:
        found = None
    if found is None:
        raise UserError(f"checkpoint {folder!r} has no valid state.json")
    meta, intact = found
    if not intact:
        raise UserError(f"checkpoint {folder!r}: state.json was modified after it was written (digest mismatch)")
    try:
        digests = meta.pop("files")
        return TrainState(**meta), digests
    except (KeyError, TypeError):
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
    if (state.strategy == "fsdp") != is_sharded(model):
        raise StrategyMismatch(strategy_mismatch(folder, state.strategy, "fsdp" if is_sharded(model) else "ddp"))
    if state.strategy == "fsdp":
        _load_sharded(blobs, model, optimizer)
    else:
        model.load_state_dict(st_load(blobs["model.safetensors"]))
        if optimizer is not None:
            optimizer.load_state_dict(torch.load(io.BytesIO(blobs["optimizer.pt"]), weights_only=True))
    torch.set_rng_state(torch.load(io.BytesIO(blobs["rng.pt"]), weights_only=True))
    return state


def _load_sharded(blobs: dict[str, bytes], model: torch.nn.Module, optimizer: torch.optim.Optimizer | None
                  ) -> None:
    """Load a torch.distributed.checkpoint folder (its verified files) into a sharded model: each rank reads the
    pieces of its own shards, whatever the number of ranks that wrote it."""
    import torch.distributed.checkpoint as dcp

    with tempfile.TemporaryDirectory(prefix="gl-ray-dcp-") as tmp:
        for name, data in blobs.items():
            (Path(tmp) / name).write_bytes(data)
        target = sharded_state(model, optimizer)
        dcp.load(target, checkpoint_id=tmp)
    load_sharded_state(model, optimizer, target)


class StrategyMismatch(UserError):
    """A checkpoint of the other strategy: never skipped for an older one (they all are), the run stops."""


def strategy_mismatch(folder: str, wrote: str, runs: str) -> str:
    return (f"run checkpoint {folder!r} was written with ray.strategy={wrote} and this run uses ray.strategy={runs}; "
            f"resume with ray.strategy={wrote}, or start a new run (another name)")


def list_checkpoints(run_uri: str) -> list[tuple[int, str]]:
    """(step, folder) of every checkpoint folder of a run with a state.json, oldest first: only names as
    `checkpoint_name` writes them, never a symbolic link (`linked_checkpoints`)."""
    links = set(linked_checkpoints(run_uri))
    steps = {name: checkpoint_step(name) for name in storage.list_dir(run_uri) if name not in links}
    return sorted((step, storage.join(run_uri, name)) for name, step in steps.items()
                  if step is not None and storage.exists(storage.join(run_uri, name, "state.json")))


def _local_entries(run_uri: str) -> tuple[Path, list[str]]:
    """(folder, names in it) of a local run, broken symbolic links too (pyarrow's listing follows links and skips
    broken ones)."""
    folder = Path(storage.resolve(run_uri)[1])  # the run folder itself resolved; its entries are not
    return folder, sorted(os.listdir(folder)) if folder.is_dir() else []


def linked_checkpoints(run_uri: str) -> list[str]:
    """Names of a local run's entries named as checkpoints that are symbolic links (S3 has none)."""
    if storage.is_s3(run_uri):
        return []
    folder, names = _local_entries(run_uri)
    return [name for name in names if checkpoint_step(name) is not None and (folder / name).is_symlink()]


def set_aside_folder(run_uri: str, why: str) -> str:
    """A new RUN/rewound/<time>-<why>/ for what a rewind or a start moves out of the run (never deleted)."""
    base = storage.join(run_uri, SET_ASIDE, f"{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}-{why}")
    uri, n = base, 1
    while storage.exists(uri):  # two in one second
        n += 1
        uri = f"{base}-{n}"
    return uri


def checkpoint_state(folder: str) -> TrainState:
    """The state of a checkpoint from its state.json alone (its digest checked, the other files not read)."""
    return _read_meta(folder)[0]


def verify_checkpoint(folder: str) -> TrainState:
    """The state of a checkpoint whose files all match their digests (UserError otherwise)."""
    return _verified(folder)[0]


def _newest_good(run_uri: str, use: Callable[[str], T], warn: Callable[[str], object]) -> T | None:
    """use(folder) of the newest checkpoint for which it succeeds; a bad one (UserError) is reported and skipped,
    falling back to the one before it. None: no usable checkpoint (a new run)."""
    for _, folder in reversed(list_checkpoints(run_uri)):
        try:
            return use(folder)
        except StrategyMismatch:
            raise
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
    """Delete all but the newest `keep` checkpoints (the Ray path lets Ray Train do this): only folders that
    `list_checkpoints` lists, so never a user's copy, a symbolic link or what one points to."""
    for _, folder in list_checkpoints(run_uri)[:-keep]:
        storage.delete_dir(folder)


def clear_leftovers(run_uri: str) -> list[tuple[str, str | None]]:
    """What an interrupted writer left in a run folder, cleared before a run (re)starts, when nothing writes:
    checkpoint folders without state.json (written last, so incomplete) are moved into RUN/rewound/<time>-
    incomplete/ (never deleted: gl-ray cannot read them, the user may), storage's own temp files (NAME.tmp-
    XXXXXXXX, local runs) deleted. Returns (name, where it was moved, or None: deleted). UserError, before
    anything is moved, if an entry named as a checkpoint is a symbolic link."""
    links = linked_checkpoints(run_uri)
    if links:
        raise UserError(f"run {run_uri!r}: {links[0]} is a symbolic link; gl-ray neither loads a linked checkpoint "
                        "nor deletes or writes through one: replace the link with a copy of the folder, or move it "
                        "out of the run")
    complete = {folder.rsplit("/", 1)[-1] for _, folder in list_checkpoints(run_uri)}
    incomplete = [n for n in storage.list_dir(run_uri) if checkpoint_step(n) is not None and n not in complete]
    done: list[tuple[str, str | None]] = []
    aside = set_aside_folder(run_uri, "incomplete") if incomplete else ""
    for name in incomplete:
        storage.move(storage.join(run_uri, name), storage.join(aside, name))
        done.append((name, aside))
    if not storage.is_s3(run_uri):
        folder, names = _local_entries(run_uri)
        for name in names:  # the entry itself, never what a link points to
            if TEMP_NAME.fullmatch(name) and not (folder / name).is_symlink() and (folder / name).is_file():
                (folder / name).unlink()
                done.append((name, None))
    return done
