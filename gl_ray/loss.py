"""Next-token cross-entropy straight from the last hidden states, chunk by chunk over tokens, so that the
[tokens, vocab] logits never exist whole, in fp32 or at all.

The stock Hugging Face path computes every logit in the compute dtype, then upcasts the whole tensor to fp32 for
the loss: at 65,536 tokens per micro batch and Pythia's vocab of 50,304 that is 13 GB for the fp32 copy alone,
before its gradient. Here each chunk of `chunk_tokens` tokens makes its logits, its fp32 log-sum-exp, its loss
and, during the forward pass, its gradients with respect to the hidden states and the unembedding; backward only
scales them by the incoming gradient (the scheme of Liger's fused linear cross-entropy). Peak extra memory: one
chunk of fp32 logits plus the [tokens, hidden] and [vocab, hidden] gradients the backward needs anyway.

Precision: the matmuls run in the compute dtype, autocast's when it is on (bf16 on GPU; the final LayerNorm hands
over fp32 hidden states then) and the hidden states' otherwise; the softmax and the loss are fp32. The [vocab,
hidden] weight is cast to the compute dtype once per call, not at each chunk's matmuls as autocast would: 65,536
tokens at Pythia's vocab are 50 chunks of 1,334, and one or two casts of pythia-160m's unembedding per chunk
(232 MB of memory traffic each) came to 11-23 GB per micro batch. Its gradient is summed over the chunks in fp32
and cast to the weight's dtype once, in backward.

    loss = linear_cross_entropy(hidden, lm_head.weight, targets)   # hidden [N, H], targets [N] (-100: no loss)
"""

from __future__ import annotations

import torch

IGNORE = -100  # a target that has no loss (Hugging Face's ignore_index)
CHUNK_LOGIT_BYTES = 256 * 2**20  # fp32 logits of one chunk


def chunk_tokens_for(vocab: int) -> int:
    """Tokens per chunk: about CHUNK_LOGIT_BYTES of fp32 logits, at least 256."""
    return max(256, CHUNK_LOGIT_BYTES // (4 * vocab))


def compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The dtype of the logits' matmuls: autocast's where autocast is on for hidden's device, else hidden's own."""
    device = hidden.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype


def chunked_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_tokens: int, *,
                 grad_hidden: bool, grad_weight: bool):
    """(sum of the losses, number of targets counted, d(sum)/d(hidden) or None, d(sum)/d(weight) or None), one
    chunk of tokens at a time. The gradients are made while each chunk's logits exist, so backward needs none."""
    dtype = compute_dtype(hidden)  # the matmuls' dtype; the logits' softmax is fp32
    valid = targets != IGNORE  # [N]
    count = valid.sum().clamp_min(1).float()  # a tensor: no host sync
    loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
    d_hidden = torch.empty_like(hidden) if grad_hidden else None
    d_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if grad_weight else None
    # Autocast off, operands cast by hand: autocast would cast the [V, H] weight again at every matmul of every
    # chunk (its cast cache keeps only leaf tensors, and w.t() or an FSDP-gathered weight is none).
    with torch.autocast(hidden.device.type, enabled=False):
        w = weight.to(dtype)  # [V, H], once per call
        for start in range(0, hidden.shape[0], chunk_tokens):
            h = hidden[start:start + chunk_tokens].to(dtype)  # [c, H]
            t, keep = targets[start:start + chunk_tokens], valid[start:start + chunk_tokens]
            logits = (h @ w.t()).float()  # [c, V] fp32, this chunk only
            lse = torch.logsumexp(logits, dim=-1)  # [c]
            picked = logits.gather(1, t.clamp_min(0)[:, None]).squeeze(1)  # [c]
            loss_sum += ((lse - picked) * keep).sum()
            if d_hidden is None and d_weight is None:
                continue
            grad = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
            grad.scatter_add_(1, t.clamp_min(0)[:, None], -keep.float()[:, None])  # minus the one-hot target
            grad.mul_(keep.float()[:, None])  # [c, V]: d(sum of losses)/d(logits)
            grad = grad.to(dtype)
            if d_hidden is not None:
                d_hidden[start:start + chunk_tokens] = grad @ w  # [c, H]
            if d_weight is not None:
                # [V, H] product in the compute dtype, summed in fp32 by one mixed-dtype add: CUDA converts as it
                # loads, with no [V, H] copy. (mm's out_dtype=fp32 is CUDA-only and cannot accumulate in place.)
                d_weight += grad.t() @ h
    return loss_sum, count, d_hidden, d_weight


class LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of softmax(hidden @ weight.T) against targets; gradients made in the forward pass."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                chunk_tokens: int) -> torch.Tensor:
        loss_sum, count, d_hidden, d_weight = chunked_loss(
            hidden, weight, targets, chunk_tokens, grad_hidden=ctx.needs_input_grad[0],
            grad_weight=ctx.needs_input_grad[1])
        ctx.save_for_backward(*(g for g in (d_hidden, d_weight) if g is not None), count)
        ctx.has = (d_hidden is not None, d_weight is not None)
        ctx.hidden_dtype, ctx.weight_dtype = hidden.dtype, weight.dtype
        return loss_sum / count

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        *grads, count = ctx.saved_tensors
        scale, made = grad_out / count, iter(grads)  # d(mean)/d(sum) times the incoming gradient
        grad_hidden = (next(made) * scale).to(ctx.hidden_dtype) if ctx.has[0] else None
        grad_weight = (next(made) * scale).to(ctx.weight_dtype) if ctx.has[1] else None
        return grad_hidden, grad_weight, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk_tokens: int | None = None) -> torch.Tensor:
    """Mean cross-entropy over the targets that are not IGNORE (0-d fp32). hidden [N, H] in any float dtype,
    weight [V, H] (the unembedding), targets long [N]; equal to cross_entropy(hidden @ weight.T, targets)."""
    chunk_tokens = chunk_tokens or chunk_tokens_for(weight.shape[0])
    if not torch.is_grad_enabled():  # validation and eval: the loss alone (a Function would make the gradients)
        loss_sum, count, _, _ = chunked_loss(hidden, weight, targets, chunk_tokens, grad_hidden=False,
                                             grad_weight=False)
        return loss_sum / count
    return LinearCrossEntropy.apply(hidden, weight, targets, chunk_tokens)
