"""train.micro_batch_tokens: auto. At the start of each stage every worker finds the largest micro batch (a divisor
of its sequences per step, so gradient accumulation stays whole) whose training step fits, by trying one
forward+backward of it (`probe_micro_batch`). Doubling, then bisection over the divisors (`largest_fitting`, which
`gl-ray bench` Table 3 uses too). The data layout does not depend on the micro batch (a worker reads one step's
rows at a time), so a resume stays exact whatever size a restarted worker picks.

    mb = probe_micro_batch(model, optimizer, rows_per_step=16, seq_len=2048, run=try_it, device=device,
                           budget_bytes=0, host_sum=io.all_reduce_host_sum)        # -> e.g. 8

What fits. A try fits if it raised no torch.OutOfMemoryError and its peak memory, plus what a step will hold that
the try cannot see (`unseen_step_bytes`: AdamW's two moments before the first optimizer step made them, 8 B per fp32
parameter of this worker; with FSDP and gradient accumulation, the unsharded gradients FSDP2 keeps between micro
batches while gradient sync is off, 4 B per parameter of the whole model), stays within the limit: on GPU
(1 - PROBE_MARGIN) of the memory PyTorch can reach there (peak: torch.cuda.max_memory_allocated); on CPU
train.memory_budget (peak resident memory; none: anything that runs fits).

How the workers agree without a hang. Every worker tries the same sizes in the same order, and each try ends in
exactly one collective: a host (gloo) all-reduce of the failures, so all take the same path through the search and
the same answer. The try itself runs no collective: under FSDP2 its all-gathers and reduce-scatters are swapped for
local stand-ins that allocate the same buffers (`local_collectives`), so the try's memory is a step's, and a worker
whose try fails anywhere (say inside block 2's forward, on one rank only) has left no other worker inside a
collective it abandoned: every worker's next collective is that same all-reduce. FSDP's per-iteration state is
reset after every try (FSDPModule.reset_iter_state), and the real collectives put back. The outcome is reduced on
the host, not the device, so a worker that just ran out of device memory need not allocate there to report it.
DDP's tries run on the unwrapped model, which has no collectives either.

Test-only fault hook: GL_RAY_OOM_ABOVE_SEQS=N makes every try above N sequences raise torch.OutOfMemoryError.
"""

from __future__ import annotations

import bisect
import contextlib
import os
import resource
from collections.abc import Callable, Iterator, Sequence

import torch

from gl_ray.errors import UserError
from gl_ray.schedule import divisors
from gl_ray.train.parallel import is_sharded

BYTES_PER_PARAM = 16  # fp32 weights, gradients and AdamW's two moments: the floor under any micro batch
# GPU: the share of the memory PyTorch can reach that a chosen micro batch leaves unused. It covers what the try's
# peak does not count: the caching allocator's fragmentation (reserved but unallocated blocks grow over a run),
# NCCL's and other libraries' buffers outside the allocator, and activation peaks that vary between steps (document
# masks, decomposed buckets). 10%: 8 GiB of an 80 GiB GPU, several times what NCCL and cuBLAS take outside it.
PROBE_MARGIN = 0.10


def largest_fitting(candidates: Sequence[int], fits: Callable[[int], bool]) -> int:
    """The largest of `candidates` (ascending) for which fits() holds, 0 if not even the first does: double
    through them while they fit, then bisect between the last that fit and the first that did not (fits() is
    taken to be monotone). The one search of the training loop's micro batch and of `gl-ray bench`'s Table 3."""
    if not candidates or not fits(candidates[0]):
        return 0
    lo, hi = 0, None  # indices into candidates: lo fits, hi (if any) does not
    while hi is None and lo < len(candidates) - 1:
        nxt = max(bisect.bisect_right(candidates, 2 * candidates[lo]) - 1, lo + 1)
        if fits(candidates[nxt]):
            lo = nxt
        else:
            hi = nxt
    while hi is not None and hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(candidates[mid]) else (lo, mid)
    return candidates[lo]


def find_micro_batch(rows_per_step: int, fits: Callable[[int], bool]) -> int:
    """The largest divisor of rows_per_step for which fits() holds (0 if not even 1 fits)."""
    return largest_fitting(divisors(rows_per_step), fits)


def reset_peak_rss() -> None:
    """Restart this process's peak-RSS count (Linux: writing 5 to clear_refs resets VmHWM); elsewhere the peak
    stays the lifetime peak, which only makes the search more careful."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss_bytes() -> int:
    """This process's peak resident memory since the last reset_peak_rss (Linux VmHWM; ru_maxrss elsewhere)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def injected_oom(seqs: int) -> None:
    limit = os.environ.get("GL_RAY_OOM_ABOVE_SEQS")
    if limit is not None and seqs > int(limit):
        raise torch.OutOfMemoryError(f"injected: {seqs} sequences > GL_RAY_OOM_ABOVE_SEQS={limit}")


def reset_device_peak(device: torch.device) -> None:
    """Give PyTorch's cached GPU memory back and restart its peak count (torch.cuda.max_memory_allocated)."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)


def device_memory(device: torch.device) -> tuple[int, int]:
    """(peak bytes PyTorch allocated on the GPU since reset_device_peak, bytes it can reach there): the free
    memory plus PyTorch's own cache, i.e. the device less the CUDA context, NCCL's buffers and other processes."""
    free_bytes, _ = torch.cuda.mem_get_info(device)
    return torch.cuda.max_memory_allocated(device), free_bytes + torch.cuda.memory_reserved(device)


def local_tensor(p: torch.Tensor) -> torch.Tensor:
    """This worker's part of a parameter: its shard under FSDP (a DTensor), the whole tensor otherwise."""
    return p.to_local() if hasattr(p, "to_local") else p


def unseen_step_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, accumulates: bool) -> int:
    """Bytes a training step will hold that a try now cannot see. AdamW's exp_avg and exp_avg_sq of every parameter
    with no optimizer state yet (the first optimizer step makes them; 8 B per fp32 parameter of this worker's
    shard). And when an FSDP model accumulates gradients over micro batches (`accumulates`), the unsharded gradient
    of every parameter, which FSDP2 keeps between them while gradient sync is off (4 B per parameter of the whole
    model: fp32, the master weights' dtype and shard_model's reduce dtype)."""
    moments = sum(2 * local_tensor(p).numel() * local_tensor(p).element_size()
                  for group in optimizer.param_groups for p in group["params"] if not optimizer.state.get(p))
    accumulated = sum(p.numel() * local_tensor(p).element_size() for p in model.parameters()) \
        if accumulates and is_sharded(model) else 0
    return moments + accumulated


def try_fits(run: Callable[[], None], seqs: int, device: torch.device, *, budget_bytes: int,
             unseen_bytes: int = 0) -> bool:
    """Run one forward+backward of `seqs` sequences (`run`): would a training step of them fit? Not if it raised
    torch.OutOfMemoryError; else its peak memory plus unseen_bytes (what the step holds that the try cannot see:
    unseen_step_bytes) must stay within (1 - PROBE_MARGIN) of what PyTorch can reach on the GPU, or on CPU within
    budget_bytes of resident memory (0: no limit)."""
    cuda = device.type == "cuda"
    if cuda:
        reset_device_peak(device)
    else:
        reset_peak_rss()
    failed = False
    try:
        injected_oom(seqs)
        run()
    except torch.OutOfMemoryError:
        failed = True  # the cache is emptied below, once the error (and the activations its traceback holds) is gone
    if cuda:
        torch.cuda.empty_cache()
    if failed:
        return False
    if cuda:
        peak_bytes, reachable_bytes = device_memory(device)
        return peak_bytes + unseen_bytes <= (1 - PROBE_MARGIN) * reachable_bytes
    return not budget_bytes or peak_rss_bytes() + unseen_bytes <= budget_bytes


class LocalAllGather:
    """FSDP2's all-gather during a try, with no collective: the output is allocated as FSDP's own is (so the try's
    memory is a step's) and every rank's slot holds this rank's shard (a memory probe needs no other values)."""

    def allocate(self, size: Sequence[int], *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group, async_op: bool = False):
        flat = input_tensor.reshape(-1)
        for slot in output_tensor.view(-1, flat.numel()):  # [world_size, shard numel]; one slot is the input itself
            if slot.data_ptr() != flat.data_ptr():
                slot.copy_(flat)
        return None  # done: nothing to wait for


class LocalReduceScatter:
    """FSDP2's reduce-scatter during a try, with no collective: this rank's chunk of its own gradients."""

    def allocate(self, size: Sequence[int], *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group, op, async_op: bool = False):
        output_tensor.copy_(input_tensor.view(-1, output_tensor.numel())[group.rank()])
        return None


@contextlib.contextmanager
def local_collectives(model: torch.nn.Module) -> Iterator[None]:
    """Within: an FSDP2 model's all-gathers and reduce-scatters are local (LocalAllGather, LocalReduceScatter), so a
    forward+backward of it runs no collective. On the way out, FSDP's per-iteration state is reset (a try that
    raised midway leaves it undefined) and the real collectives are put back. A model that is not sharded has no
    collectives: nothing to do."""
    if not is_sharded(model):
        yield
        return
    if not (hasattr(model, "set_custom_all_gather") and hasattr(model, "reset_iter_state")):
        raise UserError(f"train.micro_batch_tokens=auto with ray.strategy=fsdp needs FSDPModule's "
                        f"set_custom_all_gather and reset_iter_state, which torch {torch.__version__} lacks (2.13 has "
                        "both); upgrade torch or set train.micro_batch_tokens")
    from torch.distributed.fsdp import FSDPModule

    modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    # FSDP2 has setters for its comms but no getters: the ones to put back are read from its parameter groups
    groups = [g for m in modules for g in m._get_fsdp_state()._fsdp_param_groups]
    real = [(g._all_gather_comm, g._reduce_scatter_comm) for g in groups]
    for m in modules:
        m.set_custom_all_gather(LocalAllGather())
        m.set_custom_reduce_scatter(LocalReduceScatter())
    try:
        yield
    finally:
        try:
            if model._get_fsdp_state()._is_root:  # else no forward has begun, and there is nothing to reset
                model.reset_iter_state()
        finally:
            for g, (all_gather, reduce_scatter) in zip(groups, real):
                g._all_gather_comm, g._reduce_scatter_comm = all_gather, reduce_scatter


def probe_micro_batch(model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, rows_per_step: int, seq_len: int,
                      run: Callable[[int], None], device: torch.device, budget_bytes: int,
                      host_sum: Callable[[list[float]], list[float]]) -> int:
    """The largest divisor of rows_per_step (this worker's sequences per step) whose step fits on every worker, the
    same on all of them (which call this together): try_fits of run(seqs), one forward+backward of seqs
    sequences, under local_collectives. host_sum (WorkerIO.all_reduce_host_sum) is the search's one collective,
    once per try. A UserError if not even one sequence of seq_len tokens fits."""

    def fits_everywhere(seqs: int) -> bool:
        unseen_bytes = unseen_step_bytes(model, optimizer, accumulates=seqs < rows_per_step)
        with local_collectives(model):
            ok = try_fits(lambda: run(seqs), seqs, device, budget_bytes=budget_bytes, unseen_bytes=unseen_bytes)
        return host_sum([0.0 if ok else 1.0])[0] == 0  # every worker takes the same path through the search

    seqs = find_micro_batch(rows_per_step, fits_everywhere)
    if seqs == 0:
        raise too_small(budget_bytes, seq_len, sum(local_tensor(p).numel() for p in model.parameters()),
                        reachable_bytes=device_memory(device)[1] if device.type == "cuda" else 0)
    return seqs


def too_small(budget_bytes: int, seq_len: int, params: int, *, reachable_bytes: int = 0) -> UserError:
    """The error of a worker on which not even one sequence fits: within train.memory_budget (CPU), within
    1 - PROBE_MARGIN of reachable_bytes (what PyTorch can reach on its GPU), or at all (neither: it ran out)."""
    floor = f"weights, gradients and AdamW need {BYTES_PER_PARAM * params / 2**30:.2f} GiB before activations"
    if reachable_bytes or not budget_bytes:
        where = f"in {(1 - PROBE_MARGIN) * reachable_bytes / 2**30:.2f} GiB of GPU memory ({1 - PROBE_MARGIN:.0%} " \
                "of what PyTorch can reach)" if reachable_bytes else "in memory"
        return UserError(f"one sequence of {seq_len} tokens with {params / 1e6:.1f}M parameters on this worker does "
                         f"not fit {where} ({floor}); set train.activation_checkpointing=true, shard over more "
                         "workers with ray.strategy=fsdp, or use a smaller model.preset")
    return UserError(f"train.memory_budget ({budget_bytes / 2**30:.2f} GiB) does not fit one sequence of {seq_len} "
                     f"tokens with {params / 1e6:.1f}M parameters on this worker ({floor}); raise it or set "
                     "train.micro_batch_tokens")
