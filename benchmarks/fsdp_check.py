"""FSDP2 without Ray, in one process (the GPU machine has no Ray): the same model trained unsharded and sharded
(`gl_ray.train.parallel.shard_model`) on the same rows with the loop's own `train_step`, a sharded checkpoint
written and read back with `gl_ray.train.checkpoint` (in the loop and with the async save), and the throughput of
both side by side.

    python -m benchmarks.fsdp_check --data DATA --preset pythia-160m --seq-len 1024 --tokens-per-step 65536 \
        --micro-batch-tokens 16384 --steps 20 --device cuda --dtype bf16 --out OUT.json

Reports: the largest loss difference between the two (bf16 FSDP gathers parameters in bf16 where autocast casts
them, so expect ~1e-2 there and ~1e-6 in fp32), tokens/s of each, and whether the restored sharded model equals
the saved one exactly (both checkpoints), and how long each save held the caller up (async: only the copy of
the shards to host memory).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from gl_ray.config import OptimConfig
from gl_ray.data.manifest import load_manifest
from gl_ray.data.stream import get_stream
from gl_ray.devices import autocast_for, pick_device, resolved_precision
from gl_ray.model import build_model
from gl_ray.train.checkpoint import TrainState, load_checkpoint, start_sharded_save
from gl_ray.train.parallel import full_state_dict, shard_model
from gl_ray.train.step import make_optimizer, train_step


def train(model, net, rows: list[np.ndarray], micro_batch: int, device, amp) -> tuple[list[float], float, object]:
    optimizer = make_optimizer(model, OptimConfig(lr=3e-4))
    losses, t0 = [], 0.0
    for i, step_rows in enumerate(rows):
        if i == 1:  # the first step warms up kernels and allocators
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        out = train_step(net, optimizer, iter([step_rows]), micro_batch=micro_batch, device=device, amp=amp,
                         grad_clip=1.0)
        losses.append(float(out.loss))
    if device.type == "cuda":
        torch.cuda.synchronize()
    return losses, time.perf_counter() - t0, optimizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--preset", default="pythia-160m")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--tokens-per-step", type=int, default=65536)
    ap.add_argument("--micro-batch-tokens", type=int, default=16384)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    if a.steps < 2:
        ap.error("--steps must be at least 2 (the first step is a warm-up and is not timed)")
    device = pick_device(a.device)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    manifest = load_manifest(a.data)
    stream = get_stream(a.data, "train")
    seqs = a.tokens_per_step // a.seq_len
    rows = [stream.rows(np.arange(s * seqs, (s + 1) * seqs) * a.seq_len, a.seq_len) for s in range(a.steps)]
    micro_batch = max(1, a.micro_batch_tokens // a.seq_len)
    amp = autocast_for(device, a.dtype)
    bf16 = resolved_precision(device, a.dtype) == "bf16"

    def fresh():
        return build_model(a.preset, manifest.vocab_size, max(2048, a.seq_len), seed=0).to(device)

    plain = fresh()
    ref_losses, ref_s, _ = train(plain, plain, rows, micro_batch, device, amp)
    del plain
    sharded = shard_model(fresh(), bf16=bf16)
    losses, fsdp_s, optimizer = train(sharded, sharded, rows, micro_batch, device, amp)
    state = TrainState(step=a.steps, strategy="fsdp")
    group = dist.new_group(backend="gloo")  # as training keeps for its async checkpoints
    want, got, blocked = full_state_dict(sharded), {}, {}
    for background in (False, True):  # in the loop, then torch.distributed.checkpoint's async save
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            finish = start_sharded_save(tmp, sharded, optimizer, state, rank=0, all_gather=lambda x: [x],
                                        process_group=group, background=background)
            t1 = time.perf_counter()
            finish()
            blocked["async" if background else "sync"] = (t1 if background else time.perf_counter()) - t0
            files = sorted(p.name for p in Path(tmp).iterdir())
            restored = shard_model(fresh(), bf16=bf16)
            load_checkpoint(tmp, restored, make_optimizer(restored, OptimConfig(lr=3e-4)))
            got[background] = full_state_dict(restored)
    timed_tokens = (a.steps - 1) * a.tokens_per_step
    doc = {"preset": a.preset, "device": device.type, "dtype": resolved_precision(device, a.dtype),
           "seq_len": a.seq_len, "tokens_per_step": a.tokens_per_step, "micro_batch_seqs": micro_batch,
           "steps": a.steps, "max_loss_diff": max(abs(x - y) for x, y in zip(losses, ref_losses)),
           "final_loss": losses[-1], "final_loss_unsharded": ref_losses[-1],
           "tokens_per_s_unsharded": timed_tokens / ref_s, "tokens_per_s_fsdp": timed_tokens / fsdp_s,
           "checkpoint_files": files,
           "restored_equal": all(torch.equal(want[k], g[k]) for g in got.values() for k in want),
           "checkpoint_block_s": blocked}
    dist.destroy_process_group()
    Path(a.out).write_text(json.dumps(doc, indent=1))
    print(json.dumps(doc))


if __name__ == "__main__":
    main()
