"""Test-only fault injection, off unless its environment variables are set.

    GL_RAY_FAIL_AT_STEP=N    fail when N optimizer steps are done, before step N+1
    GL_RAY_FAIL_RANK=R       on this rank only (default 0)
    GL_RAY_FAIL_MODE=raise   raise InjectedFault (default), or `exit` to kill the process (os._exit(1))
    GL_RAY_FAIL_MARKER=PATH  fail only once: skip if PATH exists, else create it and fail
    GL_RAY_SLOW_STEP_S=S     sleep S seconds before every step (so a test can kill a run mid-way)
    GL_RAY_NAN_AT_STEP=N     make the gradients of step N+1 (after N steps done) NaN, on every rank
    GL_RAY_SPIKE_AT_STEP=N   after N steps, scale the output layer's weights by 30: the loss jumps, stays finite
"""

from __future__ import annotations

import os
import time


class InjectedFault(RuntimeError):
    pass


def fault_env() -> dict[str, str]:
    """The driver's fault variables, to hand to Ray workers (which do not inherit the driver's environment)."""
    return {k: v for k, v in os.environ.items() if k.startswith(("GL_RAY_FAIL_", "GL_RAY_SLOW_", "GL_RAY_NAN_",
                                                                  "GL_RAY_OOM_", "GL_RAY_SPIKE_"))}


def maybe_fail(steps_done: int, rank: int) -> None:
    if os.environ.get("GL_RAY_SLOW_STEP_S"):
        time.sleep(float(os.environ["GL_RAY_SLOW_STEP_S"]))
    at = os.environ.get("GL_RAY_FAIL_AT_STEP")
    if at is None or int(at) != steps_done or int(os.environ.get("GL_RAY_FAIL_RANK", "0")) != rank:
        return
    marker = os.environ.get("GL_RAY_FAIL_MARKER")
    if marker:
        if os.path.exists(marker):
            return
        open(marker, "w").close()
    if os.environ.get("GL_RAY_FAIL_MODE") == "exit":
        os._exit(1)
    raise InjectedFault(f"injected failure after step {steps_done} on rank {rank}")


def maybe_poison(steps_done: int, model) -> object | None:
    """With GL_RAY_NAN_AT_STEP=steps_done: a gradient hook that turns one parameter's gradient into NaN for the
    coming step; returns the hook handle to remove after it (None otherwise)."""
    at = os.environ.get("GL_RAY_NAN_AT_STEP")
    if at is None or int(at) != steps_done:
        return None
    param = next(p for p in model.parameters() if p.requires_grad)
    return param.register_hook(lambda g: g * float("nan"))


def maybe_spike(steps_done: int, model) -> None:
    """With GL_RAY_SPIKE_AT_STEP=steps_done: blow the output layer's weights up (x30), as a bad update would."""
    at = os.environ.get("GL_RAY_SPIKE_AT_STEP")
    if at is None or int(at) != steps_done:
        return
    import torch

    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(30.0)
