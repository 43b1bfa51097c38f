"""The attention backends of model.attention (sdpa, flex, flash_attention_2), as gl-ray hands them to transformers.
Single-device code: torch and transformers only.

Each backend is registered under a name of gl-ray's own, which transformers has no mask builder for. transformers
then passes the attention function no mask (plain causal attention) or the mask gl_ray.model built, as given,
instead of checking on every forward pass whether the position ids look packed (`find_packed_sequence_indices`)
or whether a 2-D mask is all ones (`attention_mask.all()`): each is a device-to-host read that stalls the GPU once
per micro batch. Saved configs do not keep the names (a run's final/ folder is the stock class). No name has
"flash" in it: transformers would take it for its own flash integration and look for a kernel of that name.

    check_attention("flash_attention_2", on_gpu=True)       # the driver: what it can know from the config
    check_attention_here("flash_attention_2", device)       # where the model runs: the kernel and the device
    attention_route("sdpa", masked=True, on_gpu=True)       # -> Route("flex", "document masks on CUDA ...")

The kernels behind flex and flash are looked up through KERNELS, so that a CPU test can put sdpa-backed stubs under
their names (benchmarks/stub_kernels.py) and run everything but the kernel itself.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from gl_ray.errors import UserError

SDPA_NO_SYNC, FLEX_NO_SYNC, FLASH_NO_SYNC = "gl_ray_sdpa", "gl_ray_flex", "gl_ray_fa2"
# model.attention -> the name the model's config carries
ATTENTION = {"sdpa": SDPA_NO_SYNC, "flex": FLEX_NO_SYNC, "flash_attention_2": FLASH_NO_SYNC}
HALF = (torch.float16, torch.bfloat16)  # the dtypes flash-attn computes in


def has_flex() -> bool:
    return importlib.util.find_spec("torch.nn.attention.flex_attention") is not None


def has_flash_attn() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


class Kernels:
    """The kernels behind flex and flash, imported on first use. Tests replace them with stubs of the same
    signatures: `flex(module, q, k, v, block_mask, **kwargs)` (transformers' flex_attention_forward),
    `flash(q, k, v, dropout_p, softmax_scale, causal)` and `flash_varlen(q, k, v, cu_q, cu_k, max_q, max_k,
    dropout_p, softmax_scale, causal)` (flash-attn's flash_attn_func and flash_attn_varlen_func)."""

    def __init__(self):
        self.flex = self.flash = self.flash_varlen = None

    def flex_forward(self):
        if self.flex is None:
            from transformers.integrations.flex_attention import flex_attention_forward

            self.flex = flex_attention_forward
        return self.flex

    def flash_pair(self):
        if self.flash is None:
            from flash_attn import flash_attn_func, flash_attn_varlen_func

            self.flash, self.flash_varlen = flash_attn_func, flash_attn_varlen_func
        return self.flash, self.flash_varlen


KERNELS = Kernels()


@functools.cache
def compiled_block_mask_builder():
    """torch's create_block_mask, compiled once for the process (on GPU the eager build evaluates the mask function
    over every (q, kv) pair; `create_block_mask(_compile=True)` is deprecated)."""
    from torch.nn.attention.flex_attention import create_block_mask

    return torch.compile(create_block_mask)


def block_mask(mask_mod, batch: int | None, seq_len: int, device: torch.device):
    """A flex BlockMask [batch or 1, 1, seq_len, seq_len] of mask_mod(b, h, q, kv) -> bool (True: attend); built by
    the compiled builder on CUDA, eagerly elsewhere (CPU runs flex forward only, for eval)."""
    from torch.nn.attention.flex_attention import create_block_mask

    build = compiled_block_mask_builder() if device.type == "cuda" else create_block_mask
    return build(mask_mod, batch, None, seq_len, seq_len, device=device)


@functools.lru_cache(maxsize=16)
def causal_block_mask(seq_len: int, window: int, device: torch.device):
    """The causal BlockMask of one row length (banded to `window` keys if window > 0), shared by every row: made
    once per stage and device, not per micro batch."""

    def causal(b, h, q, kv):
        return (q >= kv) & (q - kv < window) if window else q >= kv

    return block_mask(causal, None, seq_len, device)


def flex_no_sync(module, query, key, value, attention_mask, **kwargs):
    """transformers' flex attention with the mask as given. query, key, value [batch, heads, seq_len, head_dim];
    attention_mask: gl_ray.model's BlockMask (training always passes one), or None for plain causal attention."""
    if attention_mask is None:
        attention_mask = torch.compiler.disable(causal_block_mask)(query.shape[2], 0, query.device)
    # Under bf16 autocast with fp32 weights RoPE's fp32 cos/sin promote q and k to fp32 while v comes from a bf16
    # matmul; flex takes one dtype (older torch refuses the mix, newer ones upcast v and lose the bf16 kernel).
    query, key = query.to(value.dtype), key.to(value.dtype)
    return KERNELS.flex_forward()(module, query, key, value, attention_mask, **kwargs)


def flash_no_sync(module, query, key, value, attention_mask, *, scaling: float | None = None, dropout: float = 0.0,
                  cu_seq_lens_q: torch.Tensor | None = None, max_length_q: int | None = None, **kwargs):
    """flash-attn, causal. query, key, value [batch, heads, seq_len, head_dim]; with cu_seq_lens_q (int32
    [documents + 1], offsets into the flattened batch * seq_len tokens) the variable-length kernel keeps attention
    within each document, max_length_q an upper bound of their lengths (the row length: one compiled graph per
    stage, whatever the documents). Computes in the half dtype flash needs (v's under autocast, else bf16).
    Returns ([batch, seq_len, heads, head_dim], None), as transformers' attention functions do."""
    batch, heads, seq_len, head_dim = query.shape
    dtype = value.dtype if value.dtype in HALF else torch.bfloat16
    q, k, v = (t.transpose(1, 2).to(dtype) for t in (query, key, value))  # [batch, seq_len, heads, head_dim]
    flash, flash_varlen = KERNELS.flash_pair()
    if cu_seq_lens_q is None:
        out = flash(q, k, v, dropout_p=dropout, softmax_scale=scaling, causal=True)
    else:
        flat = [t.reshape(batch * seq_len, heads, head_dim) for t in (q, k, v)]
        out = flash_varlen(*flat, cu_seq_lens_q, cu_seq_lens_q, max_length_q, max_length_q, dropout_p=dropout,
                           softmax_scale=scaling, causal=True).view(batch, seq_len, heads, head_dim)
    return out.to(value.dtype), None


AttentionInterface.register(SDPA_NO_SYNC, sdpa_attention_forward)
AttentionInterface.register(FLEX_NO_SYNC, flex_no_sync)
AttentionInterface.register(FLASH_NO_SYNC, flash_no_sync)


def check_attention(attention: str, what: str = "model.attention", on_gpu: bool | None = None) -> str:
    """The config's name of a backend (ATTENTION's value); UserError if it is unknown or cannot run where the
    config trains. Only what the caller can know from here: `on_gpu` is whether training runs on a GPU (flex has
    no CPU backward, flash no CPU kernel; None: forward only, eval or bench forward). The kernel itself is checked
    where the model runs (check_attention_here): a CPU head node of a GPU cluster has no flash-attn, nor a GPU."""
    if attention not in ATTENTION:
        raise UserError(f"{what}={attention!r} is not one of {' | '.join(ATTENTION)}")
    if attention == "flex" and on_gpu is False:
        raise UserError(f"{what}=flex trains on CUDA only (torch's flex attention has no CPU backward): set "
                        "ray.use_gpu=true or train.device=cuda, or use sdpa")
    if attention == "flash_attention_2" and on_gpu is False:
        raise UserError(f"{what}=flash_attention_2 runs on CUDA only: set ray.use_gpu=true or train.device=cuda, "
                        "or use sdpa")
    return ATTENTION[attention]


def check_attention_here(attention: str, device: torch.device, what: str = "model.attention") -> None:
    """What the backend needs in this process, where the model runs on `device` (a Ray worker, or the process of
    a run without Ray): UserError naming `what` otherwise."""
    check_attention(attention, what)
    if attention == "flex" and not has_flex():
        raise UserError(f"{what}=flex needs torch.nn.attention.flex_attention (torch >= 2.5); this torch "
                        f"{torch.__version__} has none: upgrade torch or use sdpa")
    if attention == "flash_attention_2":
        if device.type != "cuda":
            raise UserError(f"{what}=flash_attention_2 needs a CUDA device; this process runs on {device.type}: "
                            "set ray.use_gpu=true or train.device=cuda, or use sdpa")
        if not has_flash_attn():
            raise UserError(f"{what}=flash_attention_2 needs the flash-attn package where the model runs: pip "
                            "install flash-attn --no-build-isolation on every GPU node (or use sdpa)")


@dataclass(frozen=True)
class Route:
    """The backend a run uses and, when it is not the one asked for, why (printed with the plan)."""

    attention: str
    why: str = ""


def attention_route(attention: str, *, masked: bool, on_gpu: bool) -> Route:
    """The backend that runs model.attention when rows are `masked` (document masking or an attention window):
    sdpa with a mask on CUDA becomes flex. sdpa cannot hand a [batch, 1, L, L] mask to its flash kernel, and its
    memory-efficient kernel keeps a bf16 copy of the mask per layer for backward (about 6 GB at 12 layers, L=4096,
    64k tokens), while flex's block mask is a few KB. sdpa keeps masks where nothing else trains (CPU), and on a
    torch without flex."""
    if attention == "sdpa" and masked and on_gpu and has_flex():
        return Route("flex", "masked rows on CUDA train with flex's block mask, not sdpa's dense [batch, 1, L, L] "
                             "mask (a bf16 copy of it per layer for backward)")
    return Route(attention)
