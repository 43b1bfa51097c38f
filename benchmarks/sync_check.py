"""Host syncs in a training step that does not log, for every combination of position mode x document masking x
attention backend x schedule mode: the loop's own `train_step` with the loop's own inputs (`step_inputs`) and its
window sums on the device.

    python -m benchmarks.sync_check --device cuda --dtype bf16 --out /tmp/sync.json

On CUDA each combination runs its measured steps under `torch.cuda.set_sync_debug_mode("error")`, so any
synchronising call (a `.item()`, `nonzero`, a blocking copy) raises and is reported with its message. On CPU, where
that mode does not exist, the same steps count tensor reads to the host (item, float, bool, int, tolist; not
AdamW's reads of its CPU step counters, which exist only on CPU). The first --warmup steps of each combination
(allocators, compiled block masks, fused AdamW's first step) are not checked. A combination that fails anywhere
(building the model, warm-up, the checked steps) is recorded with its error and the others still run; `all_clean`
is then false (the script still exits 0: it has measured). Backends: sdpa, flex and flash_attention_2 (on CUDA
flash only with the flash_attn package; on CPU flex and flash run sdpa-backed stub kernels,
benchmarks/stub_kernels.py, so everything of theirs but the kernel is checked). Prints a Markdown table; --out
writes the JSON. No Ray.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import itertools
import json
import sys

import numpy as np
import torch

from benchmarks.stub_kernels import stub_kernels
from gl_ray.config import OptimConfig
from gl_ray.devices import autocast_for, pick_device
from gl_ray.model import POSITION_MODES, build_model
from gl_ray.schedule import Stage
from gl_ray.train.loop import step_inputs
from gl_ray.train.step import make_optimizer, train_step

EOS = 0


def backends(device: torch.device) -> list[str]:
    """Every backend; on CUDA flash only with the flash_attn package (on CPU flex and flash run stub kernels)."""
    if device.type == "cuda" and not importlib.util.find_spec("flash_attn"):
        return ["sdpa", "flex"]
    return ["sdpa", "flex", "flash_attention_2"]


def stage_of(schedule_mode: str, final_len: int, micro_batch: int, grad_accum: int) -> Stage:
    """The first stage of a two-stage run: half the final length (reshape) or rows at the final length with half
    of it as the attention window (window)."""
    seq_len, window = (final_len // 2, 0) if schedule_mode == "reshape" else (final_len, final_len // 2)
    return Stage(index=0, seq_len=seq_len, sequences_per_step=micro_batch * grad_accum, micro_batch=micro_batch,
                 grad_accum=grad_accum, steps=0, tokens=0, start_step=0, start_token=0, time_s=0.0, window=window)


def rows_for(stage: Stage, vocab: int, seed: int) -> np.ndarray:
    """One step's rows, int32, with documents of about 40 tokens (EOS = 0)."""
    rng = np.random.default_rng(seed)
    rows = rng.integers(1, vocab, (stage.rows_per_rank_step, stage.seq_len), dtype=np.int32)
    rows[rng.random(rows.shape) < 1 / 40] = EOS
    return rows


class HostReads:
    """Counts tensor reads to the host while active (the CPU stand-in for CUDA's sync debug mode)."""

    NAMES = ("item", "__float__", "__bool__", "__int__", "tolist")

    def __init__(self):
        self.count, self.saved = 0, {}

    def __enter__(self) -> HostReads:
        for name in self.NAMES:
            real = self.saved[name] = getattr(torch.Tensor, name)

            def counted(t, *a, _real=real, **k):
                if "torch/optim/" not in sys._getframe(1).f_code.co_filename.replace("\\", "/"):
                    self.count += 1
                return _real(t, *a, **k)
            setattr(torch.Tensor, name, counted)
        return self

    def __exit__(self, *exc) -> None:
        for name, real in self.saved.items():
            setattr(torch.Tensor, name, real)


def check(*, preset: str, vocab: int, final_len: int, micro_batch: int, grad_accum: int, position_mode: str,
          masking: bool, attention: str, schedule_mode: str, device: torch.device, dtype: str, warmup: int,
          steps: int) -> dict:
    """One combination: `warmup` steps, then `steps` checked ones. Returns {"syncs": int or None, "error": str};
    any exception (a sync under CUDA's debug mode, or a backend that fails) gives syncs None and "Type: message"."""
    kernels = stub_kernels() if device.type != "cuda" else contextlib.nullcontext()  # CPU: flex, flash stubbed
    try:
        with kernels:
                return checked_steps(preset=preset, vocab=vocab, final_len=final_len, micro_batch=micro_batch,
                                 grad_accum=grad_accum, position_mode=position_mode, masking=masking,
                                 attention=attention, schedule_mode=schedule_mode, device=device, dtype=dtype,
                                 warmup=warmup, steps=steps)
    except Exception as e:  # this combination's result; the others still run (not BaseException: ^C stops all)
        first = (str(e).splitlines() or [""])[0]
        return {"syncs": None, "error": f"{type(e).__name__}: {first}"[:200]}


def checked_steps(*, preset: str, vocab: int, final_len: int, micro_batch: int, grad_accum: int,
                  position_mode: str, masking: bool, attention: str, schedule_mode: str, device: torch.device,
                  dtype: str, warmup: int, steps: int) -> dict:
    """check's work, raising whatever fails."""
    stage = stage_of(schedule_mode, final_len, micro_batch, grad_accum)
    torch.manual_seed(0)
    model = build_model(preset, vocab, final_len, eos_token_id=EOS, attention=attention).to(device)
    optimizer = make_optimizer(model, OptimConfig(lr=1e-4))
    amp = autocast_for(device, dtype)
    loss_sum, pairs_sum = torch.zeros((), device=device), torch.zeros((), device=device)

    def one_step(step: int) -> None:
        nonlocal loss_sum, pairs_sum
        rows = rows_for(stage, vocab, step)

        def inputs(x: torch.Tensor, micro: int) -> dict:
            nonlocal pairs_sum
            got, pairs = step_inputs(x, stage, micro, position_mode=position_mode, seed=0, step=step, rank=0,
                                     final_len=final_len, eos_id=EOS if masking else None, attention=attention,
                                     device=device)
            pairs_sum = pairs_sum + pairs  # the loop's FLOPs count, on the device
            return got

        out = train_step(model, optimizer, iter([rows]), micro_batch=micro_batch, device=device, amp=amp,
                         grad_clip=1.0, extra_inputs=inputs)
        loss_sum = loss_sum + out.loss  # the loop's window sums, read back only at reports

    for step in range(warmup):
        one_step(step)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for step in range(warmup, warmup + steps):
                one_step(step)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        return {"syncs": 0, "error": ""}
    with HostReads() as reads:
        for step in range(warmup, warmup + steps):
            one_step(step)
    return {"syncs": reads.count, "error": ""}


def combinations(device: torch.device) -> list[dict]:
    out = []
    for mode, masking, attention, schedule_mode in itertools.product(
            POSITION_MODES, (False, True), backends(device), ("reshape", "window")):
        if attention == "flash_attention_2" and schedule_mode == "window":
            continue  # the variable-length kernel has no window (a UserError in training)
        out.append({"position_mode": mode, "masking": masking, "attention": attention, "schedule_mode": schedule_mode})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--final-len", type=int, default=256)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--grad-accum", type=int, default=2)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    device = pick_device(a.device)
    rows = []
    for combo in combinations(device):
        got = check(preset=a.preset, vocab=a.vocab, final_len=a.final_len, micro_batch=a.micro_batch,
                    grad_accum=a.grad_accum, device=device, dtype=a.dtype, warmup=a.warmup, steps=a.steps, **combo)
        rows.append(combo | got)
        print(f"{combo}: {got}", flush=True)
    res = {"device": str(device), "method": "cuda sync debug mode" if device.type == "cuda" else "host reads counted",
           "steps": a.steps, "final_len": a.final_len, "combinations": rows,
           "all_clean": all(r["syncs"] == 0 for r in rows)}
    print(format_table(res))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)


def format_table(res: dict) -> str:
    lines = [f"Host syncs in {res['steps']} training steps that do not log ({res['method']}), each combination:", "",
             "| position mode | document masking | attention | schedule mode | syncs |",
             "| --- | --- | --- | --- | ---: |"]
    for r in res["combinations"]:
        got = str(r["syncs"]) if r["syncs"] is not None else f"error: {r['error']}"
        lines.append(f"| {r['position_mode']} | {'yes' if r['masking'] else 'no'} | {r['attention']} | "
                     f"{r['schedule_mode']} | {got} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
