"""train.compile: torch.compile as training and `gl-ray bench` use it.

One static graph per shape the loop feeds (dynamic=False): a stage length each, a decomposed bucket length each,
and one more at the final stage for interpolate and PoSE, whose position ids exist below the final length and
not at it. Dynamo's recompile limit (8 graphs per code object by default) is raised to that count; past it torch
silently runs eager with only a warning, while the run says it is compiled. Document masking with flash keeps one
graph per stage: the documents' offsets are a dynamic dimension (gl_ray.model).

Unsharded (one process or DDP), the whole model is compiled, after DDP so it can overlap the gradient all-reduce.
Under FSDP2 each transformer block's forward is compiled in place after `fully_shard` (as torchtitan does): the
parameter all-gathers and reduce-scatters stay in FSDP's hooks, outside the graph, and the blocks, alike, share it.

    net = compile_model(net, model, graphs=graph_budget(plan, cfg))
"""

from __future__ import annotations

import torch

from gl_ray.config import Config
from gl_ray.schedule import Plan
from gl_ray.train.parallel import is_sharded, transformer_blocks

BACKEND = "inductor"  # torch.compile's backend; tests count graphs with "eager" and a counter
BUCKET_LENGTHS = 16  # data.packing=decompose: bucket lengths a run can have (powers of two from 1 to 32,768)


def graph_budget(plan: Plan, cfg: Config) -> int:
    """How many static graphs a run's compiled model may need (see the module docstring)."""
    positions = 1 if cfg.model.position_mode != "extrapolate" else 0  # ids below the final length, none at it
    buckets = BUCKET_LENGTHS if cfg.data.packing == "decompose" else 0
    return len(plan.stages) + positions + buckets


def allow_graphs(n: int) -> None:
    """Let torch.compile keep n static graphs per code object before it falls back to eager."""
    import torch._dynamo.config as dynamo

    dynamo.recompile_limit = max(dynamo.recompile_limit, n)


def compile_model(net: torch.nn.Module, model: torch.nn.Module, *, graphs: int, backend: str | None = None):
    """The module the loop calls: `net` compiled whole, or, when `model` is FSDP2-sharded, `net` itself with each
    block's forward compiled in place. Checkpoints, eval and export keep using the plain `model` (the same
    parameters; in-place compiling leaves the state dict's keys as they are)."""
    allow_graphs(graphs)
    backend = backend or BACKEND
    if not is_sharded(model):
        return torch.compile(net, backend=backend, dynamic=False)
    for block in transformer_blocks(model):
        block.forward = torch.compile(block.forward, backend=backend, dynamic=False)
    return net
