"""Device and precision choice, shared by training, `gl-ray eval` and `gl-ray bench` (the names a user may give
are `gl_ray.config.Device` and `Precision`).

    device = pick_device("auto")               # cuda if available, else cpu
    amp = autocast_for(device, "auto")         # bf16 autocast on cuda, fp32 (no autocast) on cpu
    with amp(): loss = lm_loss(model, x)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import get_args

import torch

from gl_ray.config import Device
from gl_ray.errors import UserError


def check_device(name: str, what: str = "device") -> None:
    """A device name gl-ray knows, and cuda only with a CUDA device in this process (UserError naming `what`, the
    key or flag, otherwise)."""
    if name not in get_args(Device):
        raise UserError(f"{what}={name!r} is not one of {' | '.join(get_args(Device))}")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{what}=cuda: no CUDA device is available here; use auto or cpu")


def pick_device(name: str = "auto") -> torch.device:
    """auto: the current CUDA device if there is one, else cpu; cuda without a GPU is a UserError."""
    check_device(name, "--device")
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", torch.cuda.current_device() if torch.cuda.is_initialized() else 0)
    return torch.device("cpu")


def autocast_for(device: torch.device, precision: str = "auto") -> Callable[[], contextlib.AbstractContextManager]:
    """A factory of the autocast context for forward passes: bf16 when asked, or by default on cuda."""
    if resolved_precision(device, precision) == "bf16":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def resolved_precision(device: torch.device, precision: str = "auto") -> str:
    """What autocast_for does, as a word for reports: bf16 or fp32."""
    return "bf16" if precision == "bf16" or (precision == "auto" and device.type == "cuda") else "fp32"
