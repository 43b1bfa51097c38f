"""How long a checkpoint holds the training loop up: the whole write (train.async_checkpoint: false, and every
gl-ray before it) vs only the host copy (async: serialising, hashing and writing then run in a background thread
while training goes on).

    python -m benchmarks.checkpoint_block --preset pythia-70m --repeats 5 --out /tmp/ckpt.json

A `pythia-70m` model (vocab 50,304) with AdamW state (one step taken) is checkpointed --repeats times to --dir
(default: a temp folder on local disk), each time as two timed parts in this thread: `host_copy` (weights, AdamW
state, RNG and cursor copied to host memory: all the async loop waits for) and `write_checkpoint` (safetensors
and torch.save serialisation, SHA-256, write, state.json: what the sync loop waits for besides the copy). The
previous main waited for the write, plus on GPU the device-to-host copy (on CPU its state dict was not copied),
so both ratios are given: copy / write (the CPU comparison) and copy / (copy + write). Prints a Markdown table;
--out writes the JSON. No Ray.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from gl_ray.devices import pick_device
from gl_ray.model import build_model
from gl_ray.train.checkpoint import TrainState, host_copy, write_checkpoint


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="pythia-70m")
    p.add_argument("--vocab", type=int, default=50304)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dir", default=None, help="where checkpoints are written (default: a temp folder)")
    p.add_argument("--device", default="cpu", help="where the model and AdamW state live (cuda: the copy is the "
                   "device-to-host copy the loop waits for)")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    torch.manual_seed(0)
    device = pick_device(a.device)
    model = build_model(a.preset, a.vocab, 2048).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, a.vocab, (1, 64), device=device)
    model(input_ids=x, labels=x).loss.backward()
    optimizer.step()  # AdamW's state exists, as in a checkpoint mid-run
    state = TrainState(step=1)
    root = Path(a.dir or tempfile.mkdtemp(prefix="gl-ray-ckpt-bench-"))
    copy_s, write_s = [], []
    try:
        for i in range(a.repeats):
            t0 = time.perf_counter()
            snap = host_copy(model, optimizer, state)
            t1 = time.perf_counter()
            write_checkpoint(str(root / f"checkpoint-{i}"), snap)
            t2 = time.perf_counter()
            copy_s.append(t1 - t0)
            write_s.append(t2 - t1)
            shutil.rmtree(root / f"checkpoint-{i}")
    finally:
        if not a.dir:
            shutil.rmtree(root, ignore_errors=True)
    params = sum(p.numel() for p in model.parameters())
    med = statistics.median
    res = {"preset": a.preset, "vocab": a.vocab, "device": str(device), "params": params, "repeats": a.repeats,
           "host_copy_s": copy_s, "write_s": write_s,
           "ratio_copy_to_write": med(c / w for c, w in zip(copy_s, write_s)),
           "ratio_copy_to_copy_and_write": med(c / (c + w) for c, w in zip(copy_s, write_s))}
    print(format_table(res))
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1))


def format_table(res: dict) -> str:
    med = statistics.median
    return (f"| {res['preset']} ({res['params'] / 1e6:.0f}M params, vocab {res['vocab']:,}) on "
            f"{res.get('device', 'cpu')}, median of {res['repeats']} | seconds |\n"
            "| --- | --- |\n"
            f"| host copy: what the loop waits for (async) | {med(res['host_copy_s']):.3f} |\n"
            f"| serialise + hash + write (background with async; in the loop before) | {med(res['write_s']):.3f} |\n"
            f"| ratio copy / write | {res['ratio_copy_to_write']:.2f} |\n"
            f"| ratio copy / (copy + write) | {res['ratio_copy_to_copy_and_write']:.2f} |")


if __name__ == "__main__":
    main()
