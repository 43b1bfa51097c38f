"""Data parallelism across workers: DDP (every worker holds the whole model) or FSDP2 (each worker holds a shard of
every parameter, gradient and optimizer state; `torch.distributed.fsdp.fully_shard` per transformer block, then
the root). The model code knows nothing of either; the training layer wraps it here.

    net = shard_model(model, bf16=True)        # FSDP2, in place; needs torch.distributed initialised
    full = full_state_dict(model)              # every rank calls it; rank 0 gets the whole model on CPU

Works with or without Ray (`benchmarks/gpu_check.sh` runs FSDP in one process, without Ray). On CPU it runs on
the gloo backend, so the tests run it for real.
"""

from __future__ import annotations

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)


def transformer_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks of a Hugging Face causal LM (GPT-NeoX: model.gpt_neox.layers), the unit FSDP shards."""
    base = getattr(model, model.base_model_prefix)
    return list(base.layers)


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def shard_model(model: torch.nn.Module, *, bf16: bool) -> torch.nn.Module:
    """FSDP2 in place: each block, then the root (embeddings, final norm, unembedding). With bf16 the parameters
    are gathered in bf16 for compute and gradients reduced in fp32 (the sharded master weights stay fp32).
    Blocks keep their parameters sharded between forward and backward except the last, which backward needs
    at once (torchtitan's choice)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else \
        MixedPrecisionPolicy()
    blocks = transformer_blocks(model)
    for i, block in enumerate(blocks):
        fully_shard(block, mp_policy=mp, reshard_after_forward=i < len(blocks) - 1)
    fully_shard(model, mp_policy=mp)
    return model


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights on CPU. Sharded: a collective (every rank must call it), rank 0 gets the full
    dict and the others an empty one; unsharded: the plain state dict."""
    if not is_sharded(model):
        return {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def sharded_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> dict:
    """This rank's shards of model (and optimizer), keyed by parameter name (for torch.distributed.checkpoint)."""
    state = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        state["optim"] = get_optimizer_state_dict(model, optimizer)
    return state


def load_sharded_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, state: dict) -> None:
    """Put what sharded_state gave (then filled by torch.distributed.checkpoint.load) back into the model."""
    set_model_state_dict(model, state["model"])
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state["optim"])
