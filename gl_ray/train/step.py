"""One optimizer step, as training runs it and as `gl-ray bench` times it: the optimizer, gradient accumulation
over micro batches (DDP/FSDP gradient sync only on the last), gradient clipping, the AdamW update.

    optimizer = make_optimizer(model, cfg.optim)
    out = train_step(net, optimizer, steps, micro_batch=4, device=device, amp=amp, grad_clip=1.0)
    out.loss, out.grad_norm                    # 0-d tensors on the device: reading them is a host sync
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import NamedTuple

import numpy as np
import torch

from gl_ray.model import lm_loss


def make_optimizer(model: torch.nn.Module, optim) -> torch.optim.AdamW:
    """AdamW with Pythia's defaults (`optim`: a gl_ray.config.OptimConfig); no weight decay on biases and
    LayerNorm weights (1-D tensors)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": optim.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=optim.lr, betas=(optim.beta1, optim.beta2), eps=optim.eps,
                             fused=True if decay[0].is_cuda else None)  # one fused kernel on GPU


def no_inputs(x: torch.Tensor, micro: int) -> dict:
    return {}


def tokens_to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """int32 rows on the host -> int64 tokens on device; on GPU through pinned memory with a copy that does not
    block the host."""
    if device.type == "cuda":
        return x.pin_memory().to(device, dtype=torch.long, non_blocking=True)
    return x.to(device, dtype=torch.long)


class StepResult(NamedTuple):
    loss: torch.Tensor  # this worker's mean loss of the step, 0-d, on the device
    grad_norm: torch.Tensor  # global gradient norm before clipping, 0-d, on the device (the same on every worker)
    wait_s: float  # seconds spent waiting for the step's rows
    skipped: bool  # skip_nonfinite and the gradient norm was not finite: no update was made


def train_step(net: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: Iterator[np.ndarray], *,
               micro_batch: int | Callable[[np.ndarray], int], device: torch.device, amp: Callable, grad_clip: float,
               extra_inputs: Callable[[torch.Tensor, int], dict] = no_inputs,
               skip_nonfinite: bool = False) -> StepResult:
    """Forward+backward of one step's rows (next(steps): int32 [rows_per_rank_step, seq_len]) in micro batches
    of `micro_batch` rows (a function of the rows: data.packing=decompose, whose steps differ in length), then
    clip and step.

    `extra_inputs(rows, micro)` gives further keyword arguments of lm_loss for a micro batch (position ids,
    document masks) on the device, from its rows on the host (int32 [micro_batch, seq_len]): they are built there,
    never waiting for the device. Loss and gradient norm stay on the device (no host sync), except with
    `skip_nonfinite`, which reads the norm back to leave out the update of a step whose norm is NaN or infinite."""
    t0 = time.perf_counter()
    rows = next(steps)
    wait_s = time.perf_counter() - t0
    if callable(micro_batch):
        micro_batch = micro_batch(rows)
    grad_accum = len(rows) // micro_batch
    loss_sum = torch.zeros((), device=device)
    for micro in range(grad_accum):
        host = torch.from_numpy(np.require(rows[micro * micro_batch: (micro + 1) * micro_batch], requirements="W"))
        x = tokens_to_device(host, device)
        sync = micro == grad_accum - 1
        if hasattr(net, "set_requires_gradient_sync"):  # FSDP2: reduce-scatter gradients on the last micro batch
            net.set_requires_gradient_sync(sync)
        with contextlib.nullcontext() if sync or not hasattr(net, "no_sync") else net.no_sync():
            with amp():
                loss = lm_loss(net, x, **extra_inputs(host, micro)) / grad_accum
            loss.backward()
        loss_sum += loss.detach()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if grad_clip > 0:  # foreach kernels on CPU and CUDA (the default)
        norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    if hasattr(norm, "full_tensor"):  # FSDP: a DTensor over the shards
        norm = norm.full_tensor()
    skipped = skip_nonfinite and not bool(torch.isfinite(norm))
    if not skipped:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss_sum, norm.detach(), wait_s, skipped)
