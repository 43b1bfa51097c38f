"""sdpa-backed stand-ins for the flex and flash kernels behind gl_ray.attention.KERNELS, so that CPU tests and
`benchmarks/sync_check.py` on CPU run every flex and flash path of gl-ray (block masks, cu_seqlens, the registered
wrappers, position ids, torch.compile) except the kernel itself. Each computes attention under the same mask as the
kernel it stands for and keeps for backward what that kernel keeps (q, k, v, the output), never a dense mask: the
backward recomputes.

    with stub_kernels():      # KERNELS' flex, flash and flash_varlen replaced; restored on exit
        loss = lm_loss(build_model("tiny", 256, 64, attention="flash_attention_2"), x, **inputs)

flash_varlen is a torch.library custom op with a fake (meta) implementation, as flash-attn >= 2.7 registers its
own: torch.compile sees one opaque op whose cu_seqlens input is a graph input, so a test can count graphs.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from gl_ray.attention import KERNELS


def _dense_attention(q, k, v, allowed: torch.Tensor | None, scale: float | None, causal: bool) -> torch.Tensor:
    """q, k, v [batch, heads, L, D]; allowed bool broadcastable to [batch, heads, L, L] (True: attend)."""
    if allowed is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale)


def _varlen_allowed(cu: torch.Tensor, tokens: int) -> torch.Tensor:
    """bool [tokens, tokens]: same document (by the offsets cu) and causal."""
    doc = torch.searchsorted(cu[1:].long(), torch.arange(tokens, device=cu.device), right=True)
    causal = torch.ones(tokens, tokens, dtype=torch.bool, device=cu.device).tril()
    return (doc[:, None] == doc[None, :]) & causal


def _varlen_attention(q, k, v, cu, scale: float) -> torch.Tensor:
    allowed = _varlen_allowed(cu, q.shape[0])
    out = _dense_attention(*(t.transpose(0, 1)[None] for t in (q, k, v)), allowed, scale, causal=False)
    return out[0].transpose(0, 1).contiguous()


@torch.library.custom_op("gl_ray_stub::flash_varlen", mutates_args=())
def flash_varlen_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, scale: float) -> torch.Tensor:
    """q, k, v [tokens, heads, D]; causal attention within each document of cu. Returns [tokens, heads, D]."""
    return _varlen_attention(q, k, v, cu, scale)


@flash_varlen_op.register_fake
def _(q, k, v, cu, scale):
    return torch.empty_like(q)


def _varlen_setup(ctx, inputs, output):
    q, k, v, cu, scale = inputs
    ctx.save_for_backward(q, k, v, cu, output)  # flash keeps q, k, v, out (and a [heads, tokens] lse)
    ctx.scale = scale


def _varlen_backward(ctx, grad):
    q, k, v, cu, _ = ctx.saved_tensors
    with torch.enable_grad():  # recompute, as flash does, from what was kept
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        dq, dk, dv = torch.autograd.grad(_varlen_attention(*leaves, cu, ctx.scale), leaves, grad)
    return dq, dk, dv, None, None


flash_varlen_op.register_autograd(_varlen_backward, setup_context=_varlen_setup)


def flash_varlen(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.0, softmax_scale=None, causal=False):
    """flash_attn_varlen_func's signature (causal only, no dropout)."""
    assert causal and dropout_p == 0.0 and max_q >= 1
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    return flash_varlen_op(q, k, v, cu_q, scale)


def flash(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False):
    """flash_attn_func's signature: q, k, v [batch, L, heads, D] -> [batch, L, heads, D]."""
    out = _dense_attention(*(t.transpose(1, 2) for t in (q, k, v)), None, softmax_scale, causal=causal)
    return out.transpose(1, 2)


class _FlexStub(torch.autograd.Function):
    """Attention under a BlockMask's mask_mod, evaluated densely; keeps q, k, v and the output, not the mask."""

    @staticmethod
    def forward(ctx, q, k, v, mask_mod, scale):
        ctx.mask_mod, ctx.scale = mask_mod, scale
        out = _FlexStub.attend(q, k, v, mask_mod, scale)
        ctx.save_for_backward(q, k, v, out)
        return out

    @staticmethod
    def attend(q, k, v, mask_mod, scale):
        from torch.nn.attention.flex_attention import create_mask

        batch, _, seq_len, _ = q.shape
        allowed = create_mask(mask_mod, batch, 1, seq_len, seq_len, device=q.device)
        return _dense_attention(q, k, v, allowed, scale, causal=False)

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _ = ctx.saved_tensors
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_() for t in (q, k, v)]
            out = _FlexStub.attend(*leaves, ctx.mask_mod, ctx.scale)
            dq, dk, dv = torch.autograd.grad(out, leaves, grad)
        return dq, dk, dv, None, None


def flex(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """transformers' flex_attention_forward's signature: query, key, value [batch, heads, L, D], a BlockMask ->
    ([batch, L, heads, D], None). Records the dtypes it was given in `flex.dtypes` (a test's spy)."""
    flex.dtypes.append((query.dtype, key.dtype, value.dtype))
    out = _FlexStub.apply(query, key, value, attention_mask.mask_mod, scaling)
    return out.transpose(1, 2).contiguous(), None


flex.dtypes = []


@contextlib.contextmanager
def stub_kernels():
    """KERNELS' flex, flash and flash_varlen replaced by the stubs while inside."""
    saved = (KERNELS.flex, KERNELS.flash, KERNELS.flash_varlen)
    KERNELS.flex, KERNELS.flash, KERNELS.flash_varlen = flex, flash, flash_varlen
    try:
        yield
    finally:
        KERNELS.flex, KERNELS.flash, KERNELS.flash_varlen = saved
