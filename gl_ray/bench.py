"""`gl-ray bench`: the paper's Tables 1-3 for a model preset on this machine, without Ray.

Table 1: seconds per optimizer step at each length, tokens per step held fixed (warm-up steps excluded, median).
Table 2: peak memory of one forward+backward at a fixed micro batch (sequences) per length: CUDA max allocated
         on GPU; on CPU, peak RSS of a fresh child process (so lengths do not see each other's peaks).
Table 3: the largest micro batch (tokens) whose forward+backward fits --memory-budget, found by doubling then
         bisection; probes that run out of memory are caught (CUDA OOM, or a child process over budget), and a
         size that failed is never reported.
Also: analytic training FLOPs per token and, on GPU, model FLOPs utilisation (MFU) against --peak-tflops; and
the cost of a token at each length relative to the shortest (the bound on GrowLength's saving).
The model is built as training builds it (--attention, --activation-checkpointing; masked rows on CUDA run flex,
as in training: gl_ray.attention.attention_route); --document-masking gives rows real document boundaries
(--data: a prepared dataset's documents; --mean-doc-len: random documents). Every timed step gets rows of its own,
so with documents a compiled model meets as many layouts as a run does (one repeated micro batch would hide
recompiles).
"""

from __future__ import annotations

import multiprocessing as mp
import statistics
import time
from dataclasses import dataclass, replace

from pathlib import Path

import numpy as np
import torch

from gl_ray.config import OptimConfig
from gl_ray.attention import attention_route, check_attention, check_attention_here
from gl_ray.devices import autocast_for, pick_device, resolved_precision
from gl_ray.errors import UserError
from gl_ray.data.stream import check_document_ends, get_stream
from gl_ray.architectures import PRESETS, ModelSpec, check_preset, model_spec
from gl_ray.model import batch_inputs, build_from_spec, document_pairs, flops_per_token, lm_loss
from gl_ray.schedule import micro_batch_for
from gl_ray.train.compiling import compile_model
from gl_ray.train.micro_batch import largest_fitting, peak_rss_bytes
from gl_ray.train.step import make_optimizer, train_step

# Dense bf16 tensor-core peak TFLOP/s (no 2:4 sparsity; NVIDIA's datasheets print the sparse figure, twice this) by
# the exact torch.cuda.get_device_name, for MFU. Exact names: a fragment gave H100 PCIe and NVL the SXM figure and
# an L40 the L4's. Any other device: --peak-tflops. (A10G is left out: no NVIDIA datasheet gives its figure.)
PEAK_TFLOPS = {
    "NVIDIA B200": 2250.0, "NVIDIA GB200": 2500.0,  # HGX B200 18 PF / 8 GPUs; GB200 NVL72 180 PF / 72 GPUs
    "NVIDIA H200": 989.0, "NVIDIA H200 NVL": 835.0,
    "NVIDIA H100 80GB HBM3": 989.0, "NVIDIA H100 PCIe": 756.0, "NVIDIA H100 NVL": 835.0,  # H100 SXM5, PCIe, NVL
    "NVIDIA A100-SXM4-80GB": 312.0, "NVIDIA A100-SXM4-40GB": 312.0, "NVIDIA A100 80GB PCIe": 312.0,
    "NVIDIA A100-PCIE-40GB": 312.0,
    "NVIDIA L40S": 362.0, "NVIDIA L40": 181.0, "NVIDIA L4": 121.0, "NVIDIA A40": 149.7, "NVIDIA A10": 125.0,
}


def peak_tflops_for(device_name: str) -> float | None:
    """Dense bf16 peak TFLOP/s of a GPU by its exact torch.cuda.get_device_name; None for any other name."""
    return PEAK_TFLOPS.get(device_name.strip())


@dataclass(frozen=True)
class BenchModel:
    """The model and batches a bench measures: a preset (or an HF config folder) as training builds it, and rows
    as the loop receives them (random ids; with document masking, documents cut from a prepared dataset or of a
    given mean length)."""

    preset: str  # a preset name or a folder with an HF config.json (gl_ray.architectures)
    vocab: int = 50304
    attention: str = "sdpa"
    activation_checkpointing: bool = False
    document_masking: bool = False
    data: str = ""  # prepared dataset whose train tokens (real documents, real EOS) fill the rows
    mean_doc_len: int = 0  # else: random documents of this mean length (exponential), each ending with EOS
    eos_id: int = 0

    def spec(self, seq_len: int = 2048) -> ModelSpec:
        folder = "" if self.preset in PRESETS else self.preset
        return model_spec(preset=self.preset if not folder else "tiny", config=folder, vocab_size=self.vocab,
                          eos_id=self.eos_id, max_positions=max(seq_len, 2048), final_len=seq_len)

    def build(self, seq_len: int, device: torch.device) -> torch.nn.Module:
        return build_from_spec(self.spec(seq_len), attention=self.attention,
                               activation_checkpointing=self.activation_checkpointing).to(device)

    def batch(self, seqs: int, seq_len: int, step: int = 0) -> np.ndarray:
        """Token ids, int32 [seqs, seq_len], as the data pipeline hands them to the loop; each `step` other rows
        (with documents, other layouts: a compiled model meets as many as a run does)."""
        if self.data:
            n = seqs * seq_len  # the stream goes on into later epochs past the split's end
            return get_stream(self.data, "train").read(step * n, (step + 1) * n).reshape(seqs, seq_len).copy()
        rng = np.random.default_rng((seqs * 7919 + seq_len) * 1009 + step)
        ids = rng.integers(1, self.vocab, (seqs, seq_len), dtype=np.int32)  # never EOS (id 0) by chance
        if self.mean_doc_len:
            ends = np.cumsum(rng.exponential(self.mean_doc_len, seqs * seq_len // 2 + 2).astype(np.int64) + 1) - 1
            flat = ids.reshape(-1)
            flat[ends[ends < flat.size]] = self.eos_id
        return ids

    def inputs(self, x: torch.Tensor, device: torch.device | None = None) -> dict:
        """lm_loss keyword arguments, as training gives them (extrapolate positions, masks when masking), built
        where x is and handed to `device` (default: x's)."""
        return batch_inputs(x, position_mode="extrapolate", seq_len=x.shape[1], final_len=x.shape[1],
                            eos_id=self.eos_id if self.document_masking else None, attention=self.attention,
                            device=device)


def bench_model(*, preset: str, vocab: int = 50304, attention: str = "sdpa", activation_checkpointing: bool = False,
                document_masking: bool = False, data: str = "", mean_doc_len: int = 0) -> BenchModel:
    """A checked BenchModel; with `data`, its vocab and EOS are the dataset's."""
    if preset not in PRESETS and not Path(preset).is_dir():
        check_preset(preset, "--preset")  # neither a preset nor a folder: one line naming the presets
    if mean_doc_len < 0:
        raise UserError(f"--mean-doc-len {mean_doc_len} must be >= 0")
    eos = 0
    if data:
        stream = get_stream(data, "train")
        vocab, eos = stream.manifest.vocab_size, stream.manifest.eos_token_id
        if document_masking:
            check_document_ends(stream)
    elif document_masking and not mean_doc_len:
        raise UserError("--document-masking needs document boundaries: --data DATASET (its documents) or "
                        "--mean-doc-len N (random documents of that mean length)")
    check_attention(attention, "--attention")
    model = BenchModel(preset=preset, vocab=vocab, attention=attention,
                       activation_checkpointing=activation_checkpointing, document_masking=document_masking,
                       data=data, mean_doc_len=mean_doc_len, eos_id=eos)
    model.spec()  # a config folder is checked now (one line if gl-ray cannot train it)
    return model


def step_time(*, model: BenchModel, seq_len: int, tokens_per_step: int, micro_batch_tokens: int,
              device: torch.device, dtype: str, steps: int, warmup: int, use_compile: bool = False) -> dict:
    """Median seconds per optimizer step as training runs it: the same optimizer, micro batch choice, inputs and
    `train_step` (`use_compile`: train.compile; the compile itself falls in the warm-up steps)."""
    module = model.build(seq_len, device)
    optimizer = make_optimizer(module, OptimConfig(lr=1e-4))
    if use_compile:  # as training compiles; a fresh cache per length, so lengths do not share dynamo's limit
        torch._dynamo.reset()
        net = compile_model(module, module, graphs=1)
    else:
        net = module
    seqs = tokens_per_step // seq_len
    mb = micro_batch_for(seqs, seq_len, max(seq_len, micro_batch_tokens))
    batches = iter([model.batch(seqs, seq_len, step=i) for i in range(warmup + steps)])  # new rows every step
    x = model.batch(seqs, seq_len, step=0)
    amp = autocast_for(device, dtype)
    times = []
    for i in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        train_step(net, optimizer, batches, micro_batch=mb, device=device, amp=amp, grad_clip=1.0,
                   extra_inputs=lambda xb, micro: model.inputs(xb, device))
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    del module, net, optimizer
    out = {"step_time_s": statistics.median(times), "micro_batch_seqs": mb, "grad_accum": seqs // mb,
           "mean_doc_tokens": None, "keys_per_token": None}
    if model.document_masking:  # FLOPs count only the pairs inside documents
        docs = int((x == model.eos_id).sum())
        starts = model.inputs(torch.from_numpy(x).long())["docs"].starts
        out.update(mean_doc_tokens=x.size / docs if docs else None,
                   keys_per_token=float(document_pairs(starts)) / x.size)
    return out


def _fwd_bwd(model: BenchModel, seqs: int, seq_len: int, device: torch.device, dtype: str) -> None:
    module = model.build(seq_len, device)
    x = torch.from_numpy(model.batch(seqs, seq_len)).to(device, dtype=torch.long)
    with autocast_for(device, dtype)():
        loss = lm_loss(module, x, **model.inputs(x))
    loss.backward()


def _child_peak_rss(q, model: BenchModel, seqs: int, seq_len: int, dtype: str) -> None:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    try:
        _fwd_bwd(model, seqs, seq_len, torch.device("cpu"), dtype)
        q.put(("ok", peak_rss_bytes()))
    except (RuntimeError, MemoryError) as e:
        q.put(("oom", str(e)[:200]))


def peak_memory(model: BenchModel, seqs: int, seq_len: int, device: torch.device, dtype: str,
                budget: int = 0) -> int | None:
    """Peak bytes of one forward+backward; None if it ran out of memory (or, on CPU, exceeded budget)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        try:
            _fwd_bwd(model, seqs, seq_len, device, dtype)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            return None
        peak = torch.cuda.max_memory_allocated()
        torch.cuda.empty_cache()
        return None if budget and peak > budget else peak
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_child_peak_rss, args=(q, model, seqs, seq_len, dtype))
    p.start()
    p.join()
    if p.exitcode != 0 or q.empty():  # killed (e.g. by the OOM killer) or crashed: does not fit
        return None
    status, value = q.get()
    if status != "ok" or (budget and value > budget):
        return None
    return value


def max_micro_batch(model: BenchModel, seq_len: int, device: torch.device, dtype: str, budget: int,
                    limit_seqs: int = 1 << 16) -> tuple[int, list[dict]]:
    """Largest number of sequences whose forward+backward fits budget (0 if even one does not); and the probes."""
    probes: list[dict] = []

    def fits(n: int) -> bool:
        peak = peak_memory(model, n, seq_len, device, dtype, budget)
        probes.append({"seqs": n, "peak_bytes": peak, "fits": peak is not None})
        return peak is not None

    return largest_fitting(range(1, limit_seqs + 1), fits), probes


def run_bench(*, model: BenchModel, lengths: list[int], tokens_per_step: int, micro_batch_tokens: int,
              device: str, dtype: str, steps: int, warmup: int, memory_micro_batch_seqs: int, memory_budget: int,
              peak_tflops: float = 0.0, use_compile: bool = False, progress=lambda line: None) -> dict:
    """Tables 1-3 for `model` at each length (see the module docstring); per length also the cost of a token
    relative to the shortest length (`cost_vs_first`), which bounds what GrowLength's short stages can save.
    `progress(line)` gets one line per length and table, with an estimate of the time left."""
    if not lengths or any(L <= 0 or tokens_per_step % L for L in lengths):
        raise UserError(f"--lengths {lengths}: each must divide --tokens-per-step {tokens_per_step}")
    dev = pick_device(device)
    check_attention(model.attention, "--attention", on_gpu=dev.type == "cuda")  # Table 1 trains: flex needs CUDA
    route = attention_route(model.attention, masked=model.document_masking, on_gpu=dev.type == "cuda")
    check_attention_here(route.attention, dev, "--attention")
    asked, model = model.attention, replace(model, attention=route.attention)  # the backend training would run
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    peak_tflops = peak_tflops or peak_tflops_for(name) or 0.0  # given: any device
    res = {"preset": model.preset, "device": dev.type, "device_name": name, "dtype": resolved_precision(dev, dtype),
           "tokens_per_step": tokens_per_step, "micro_batch_tokens": micro_batch_tokens,
           "memory_micro_batch_seqs": memory_micro_batch_seqs, "memory_budget_bytes": memory_budget,
           "peak_tflops": peak_tflops or None, "vocab_size": model.vocab, "compile": use_compile,
           "attention": model.attention, "attention_asked": asked,
           "activation_checkpointing": model.activation_checkpointing,
           "document_masking": model.document_masking, "data": model.data or None,
           "mean_doc_len": model.mean_doc_len or None, "lengths": []}
    t0, order = time.perf_counter(), sorted(lengths)

    def say(i: int, text: str) -> None:
        done = time.perf_counter() - t0  # a longer length costs more: a rough lower bound on what is left
        left = done / (i + 1) * (len(order) - i - 1)
        progress(f"[bench] L={order[i]} ({i + 1}/{len(order)}): {text}; {done:.0f} s so far, at least "
                 f"{left:.0f} s left")

    for i, L in enumerate(order):
        row = {"seq_len": L}
        row.update(step_time(model=model, seq_len=L, tokens_per_step=tokens_per_step,
                             micro_batch_tokens=micro_batch_tokens, device=dev, dtype=dtype, steps=steps,
                             warmup=warmup, use_compile=use_compile))
        progress(f"[bench] L={L}: Table 1 {row['step_time_s']:.3f} s/step ({tokens_per_step / row['step_time_s']:,.0f} "
                 "tokens/s)")
        row["tokens_per_s"] = tokens_per_step / row["step_time_s"]
        row["cost_vs_first"] = res["lengths"][0]["tokens_per_s"] / row["tokens_per_s"] if res["lengths"] else 1.0
        row["flops_per_token"] = flops_per_token(model.spec().shape, L, row["keys_per_token"])
        row["achieved_tflops"] = row["flops_per_token"] * row["tokens_per_s"] / 1e12
        row["mfu"] = row["achieved_tflops"] / peak_tflops if peak_tflops else None
        peak_bytes = row["peak_memory_bytes"] = peak_memory(model, memory_micro_batch_seqs, L, dev, dtype)
        text = f"Table 2 peak {peak_bytes / 2**20:,.0f} MiB" if peak_bytes else "Table 2 out of memory"
        if memory_budget:
            seqs, probes = max_micro_batch(model, L, dev, dtype, memory_budget)
            row["max_micro_batch_seqs"], row["max_micro_batch_tokens"] = seqs, seqs * L
            row["max_batch_probes"] = probes
            text += f", Table 3 max micro batch {seqs * L:,} tokens ({len(probes)} probes)"
        say(i, text)
        res["lengths"].append(row)
    return res


def format_bench(res: dict) -> str:
    head = ("| seq_len | s/step | tokens/s | cost/token vs first | micro x accum | peak mem (MiB) | "
            "max micro batch (tokens) | GFLOP/token | TFLOP/s | MFU |")
    rows = [head, "|" + " --- |" * 10]
    for r in res["lengths"]:
        mem = f"{r['peak_memory_bytes'] / 2**20:,.0f}" if r["peak_memory_bytes"] else "OOM"
        mx = f"{r['max_micro_batch_tokens']:,}" if r.get("max_micro_batch_tokens") is not None else "-"
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
        rows.append(f"| {r['seq_len']} | {r['step_time_s']:.4f} | {r['tokens_per_s']:,.0f} | "
                    f"{r.get('cost_vs_first', 1.0):.2f}x | "
                    f"{r['micro_batch_seqs']} x {r['grad_accum']} | {mem} | {mx} | {r['flops_per_token'] / 1e9:.3f} | "
                    f"{r['achieved_tflops']:.3f} | {mfu} |")
    if not res.get("peak_tflops"):
        rows += ["", f"MFU left out: no dense bf16 peak known for {res['device_name']!r}; pass --peak-tflops."]
    return "\n".join(rows)
