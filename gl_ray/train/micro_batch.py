"""train.micro_batch_tokens: auto. At the start of each stage every worker finds the largest micro batch (a divisor
of its sequences per step, so gradient accumulation stays whole) whose forward+backward fits: on GPU by trying it
and catching torch.OutOfMemoryError, on CPU by the process's peak resident memory against train.memory_budget.
Doubling, then bisection over the divisors (`largest_fitting`, which `gl-ray bench` Table 3 uses too). All
workers take the smallest choice. The data layout does not depend on the micro batch (a worker reads one step's
rows at a time), so a resume stays exact whatever size a restarted worker picks.

    mb = find_micro_batch(rows_per_step=16, fits=lambda n: try_it(n))   # -> e.g. 8

Test-only fault hook: GL_RAY_OOM_ABOVE_SEQS=N makes every try above N sequences raise torch.OutOfMemoryError.
"""

from __future__ import annotations

import bisect
import os
import resource
from collections.abc import Callable, Sequence

import torch

from gl_ray.errors import UserError
from gl_ray.schedule import divisors

BYTES_PER_PARAM = 16  # fp32 weights, gradients and AdamW's two moments: the floor under any micro batch


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


def try_fits(run: Callable[[], None], seqs: int, device: torch.device, budget_bytes: int) -> bool:
    """Run one forward+backward of `seqs` sequences (`run`): does it fit? GPU: no OutOfMemoryError (the cache is
    emptied after a failed try). CPU: the peak RSS stays within budget_bytes (0: no limit)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
    else:
        reset_peak_rss()
    try:
        injected_oom(seqs)
        run()
    except torch.OutOfMemoryError:
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return False
    return device.type == "cuda" or not budget_bytes or peak_rss_bytes() <= budget_bytes


def too_small(budget_bytes: int, seq_len: int, params: int) -> UserError:
    return UserError(f"train.memory_budget ({budget_bytes / 2**30:.2f} GiB) does not fit one sequence of {seq_len} "
                     f"tokens with {params / 1e6:.1f}M parameters on this worker (weights, gradients and AdamW need "
                     f"{BYTES_PER_PARAM * params / 2**30:.2f} GiB before activations); raise it or set "
                     "train.micro_batch_tokens")
