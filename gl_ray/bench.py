"""`gl-ray bench`: the paper's Tables 1-3 for a model preset on this machine, without Ray.

Table 1: seconds per optimizer step at each length, tokens per step held fixed (warm-up steps excluded, median).
Table 2: peak memory of one forward+backward at a fixed micro batch (sequences) per length: CUDA max allocated
         on GPU; on CPU, peak RSS of a fresh child process (so lengths do not see each other's peaks).
Table 3: the largest micro batch (tokens) whose forward+backward fits --memory-budget, found by doubling then
         bisection; probes that run out of memory are caught (CUDA OOM, or a child process over budget), and a
         size that failed is never reported.
Also: analytic training FLOPs per token and, on GPU, model FLOPs utilisation (MFU) against --peak-tflops.
"""

from __future__ import annotations

import itertools
import multiprocessing as mp
import resource
import statistics
import time

import numpy as np
import torch

from gl_ray.config import OptimConfig
from gl_ray.devices import autocast_for, pick_device, resolved_precision
from gl_ray.errors import UserError
from gl_ray.model import build_model, check_preset, flops_per_token, lm_loss
from gl_ray.schedule import micro_batch_for
from gl_ray.train.step import make_optimizer, train_step

# dense bf16 peak TFLOP/s by device name fragment, for MFU
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0}


def _batch(vocab: int, seqs: int, seq_len: int) -> np.ndarray:
    """Random token ids, int32 [seqs, seq_len], as the data pipeline hands them to the loop."""
    rng = np.random.default_rng(seqs * 7919 + seq_len)
    return rng.integers(1, vocab, (seqs, seq_len), dtype=np.int32)


def step_time(*, preset: str, vocab: int, seq_len: int, tokens_per_step: int, micro_batch_tokens: int,
              device: torch.device, dtype: str, steps: int, warmup: int, use_compile: bool = False) -> dict:
    """Median seconds per optimizer step as training runs it: the same optimizer, micro batch choice and
    `train_step` (`use_compile`: train.compile; the compile itself falls in the warm-up steps)."""
    model = build_model(preset, vocab, max(seq_len, 2048)).to(device)
    optimizer = make_optimizer(model, OptimConfig(lr=1e-4))
    net = torch.compile(model, dynamic=False) if use_compile else model
    seqs = tokens_per_step // seq_len
    mb = micro_batch_for(seqs, seq_len, max(seq_len, micro_batch_tokens))
    batches = itertools.repeat(_batch(vocab, mb, seq_len))
    amp = autocast_for(device, dtype)
    times = []
    for i in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        train_step(net, optimizer, batches, grad_accum=seqs // mb, device=device, amp=amp, grad_clip=1.0)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    del model, net, optimizer
    return {"step_time_s": statistics.median(times), "micro_batch_seqs": mb, "grad_accum": seqs // mb}


def _fwd_bwd(preset: str, vocab: int, seqs: int, seq_len: int, device: torch.device, dtype: str) -> None:
    model = build_model(preset, vocab, max(seq_len, 2048)).to(device)
    x = torch.from_numpy(_batch(vocab, seqs, seq_len)).to(device, dtype=torch.long)
    with autocast_for(device, dtype)():
        loss = lm_loss(model, x)
    loss.backward()


def _child_peak_rss(q, preset, vocab, seqs, seq_len, dtype) -> None:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    try:
        _fwd_bwd(preset, vocab, seqs, seq_len, torch.device("cpu"), dtype)
        q.put(("ok", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024))
    except (RuntimeError, MemoryError) as e:
        q.put(("oom", str(e)[:200]))


def peak_memory(preset: str, vocab: int, seqs: int, seq_len: int, device: torch.device, dtype: str,
                budget: int = 0) -> int | None:
    """Peak bytes of one forward+backward; None if it ran out of memory (or, on CPU, exceeded budget)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        try:
            _fwd_bwd(preset, vocab, seqs, seq_len, device, dtype)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            return None
        peak = torch.cuda.max_memory_allocated()
        torch.cuda.empty_cache()
        return None if budget and peak > budget else peak
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_child_peak_rss, args=(q, preset, vocab, seqs, seq_len, dtype))
    p.start()
    p.join()
    if p.exitcode != 0 or q.empty():  # killed (e.g. by the OOM killer) or crashed: does not fit
        return None
    status, value = q.get()
    if status != "ok" or (budget and value > budget):
        return None
    return value


def max_micro_batch(preset: str, vocab: int, seq_len: int, device: torch.device, dtype: str, budget: int,
                    limit_seqs: int = 1 << 16) -> tuple[int, list[dict]]:
    """Largest number of sequences whose forward+backward fits budget (0 if even one does not); and the probes."""
    probes: list[dict] = []

    def fits(n: int) -> bool:
        peak = peak_memory(preset, vocab, n, seq_len, device, dtype, budget)
        probes.append({"seqs": n, "peak_bytes": peak, "fits": peak is not None})
        return peak is not None

    if not fits(1):
        return 0, probes
    lo, hi = 1, 2
    while hi <= limit_seqs and fits(hi):
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo, probes


def run_bench(*, preset: str, lengths: list[int], tokens_per_step: int, micro_batch_tokens: int, device: str,
              dtype: str, steps: int, warmup: int, memory_micro_batch_seqs: int, memory_budget: int,
              vocab: int = 50304, peak_tflops: float = 0.0, use_compile: bool = False) -> dict:
    check_preset(preset, "--preset")
    if not lengths or any(L <= 0 or tokens_per_step % L for L in lengths):
        raise UserError(f"--lengths {lengths}: each must divide --tokens-per-step {tokens_per_step}")
    dev = pick_device(device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    peak = peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in name), 0.0)
    res = {"preset": preset, "device": dev.type, "device_name": name, "dtype": resolved_precision(dev, dtype),
           "tokens_per_step": tokens_per_step, "micro_batch_tokens": micro_batch_tokens,
           "memory_micro_batch_seqs": memory_micro_batch_seqs, "memory_budget_bytes": memory_budget,
           "peak_tflops": peak or None, "vocab_size": vocab, "compile": use_compile, "lengths": []}
    for L in sorted(lengths):
        row = {"seq_len": L}
        row.update(step_time(preset=preset, vocab=vocab, seq_len=L, tokens_per_step=tokens_per_step,
                             micro_batch_tokens=micro_batch_tokens, device=dev, dtype=dtype, steps=steps,
                             warmup=warmup, use_compile=use_compile))
        row["tokens_per_s"] = tokens_per_step / row["step_time_s"]
        row["flops_per_token"] = flops_per_token(preset, vocab, L)
        row["achieved_tflops"] = row["flops_per_token"] * row["tokens_per_s"] / 1e12
        row["mfu"] = row["achieved_tflops"] / peak if peak and dev.type == "cuda" else None
        row["peak_memory_bytes"] = peak_memory(preset, vocab, memory_micro_batch_seqs, L, dev, dtype)
        if memory_budget:
            seqs, probes = max_micro_batch(preset, vocab, L, dev, dtype, memory_budget)
            row["max_micro_batch_seqs"], row["max_micro_batch_tokens"] = seqs, seqs * L
            row["max_batch_probes"] = probes
        res["lengths"].append(row)
    return res


def format_bench(res: dict) -> str:
    head = ("| seq_len | s/step | tokens/s | micro x accum | peak mem (MiB) | max micro batch (tokens) | "
            "GFLOP/token | TFLOP/s | MFU |")
    rows = [head, "|" + " --- |" * 9]
    for r in res["lengths"]:
        mem = f"{r['peak_memory_bytes'] / 2**20:,.0f}" if r["peak_memory_bytes"] else "OOM"
        mx = f"{r['max_micro_batch_tokens']:,}" if r.get("max_micro_batch_tokens") is not None else "-"
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
        rows.append(f"| {r['seq_len']} | {r['step_time_s']:.4f} | {r['tokens_per_s']:,.0f} | "
                    f"{r['micro_batch_seqs']} x {r['grad_accum']} | {mem} | {mx} | {r['flops_per_token'] / 1e9:.3f} | "
                    f"{r['achieved_tflops']:.3f} | {mfu} |")
    return "\n".join(rows)


def parse_size(text: str) -> int:
    """'24GiB', '512MiB', '1.5e9' -> bytes."""
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
    t = text.strip().upper()
    for u, mult in units.items():
        if t.endswith(u):
            try:
                return int(float(t[: -len(u)]) * mult)
            except ValueError:
                break
    try:
        return int(float(t))
    except ValueError:
        raise UserError(f"--memory-budget {text!r}: expected bytes or a size like 8GiB") from None

