"""gl_ray.loss: the chunked linear cross-entropy equals the stock Hugging Face loss (1e-5) and its gradients (1e-4),
through the model as training calls it, with and without document masks; the exported model is the stock class."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import GPTNeoXForCausalLM

from gl_ray.loss import IGNORE, linear_cross_entropy
from gl_ray.model import GrowLengthLM, batch_inputs, build_model, lm_loss


@pytest.mark.parametrize("chunk", [1, 7, 4096])
def test_equals_cross_entropy_of_the_full_logits(chunk):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(300, 32, generator=g, requires_grad=True)
    weight = (0.1 * torch.randn(500, 32, generator=g)).requires_grad_()
    targets = torch.randint(0, 500, (300,), generator=g)
    targets[::5] = IGNORE
    loss = linear_cross_entropy(hidden, weight, targets, chunk_tokens=chunk)
    grads = torch.autograd.grad(3.0 * loss, (hidden, weight))  # an incoming gradient other than 1
    ref = torch.nn.functional.cross_entropy(hidden @ weight.t(), targets, ignore_index=IGNORE)
    ref_grads = torch.autograd.grad(3.0 * ref, (hidden, weight))
    assert loss.item() == pytest.approx(ref.item(), abs=1e-5)
    for got, want in zip(grads, ref_grads):
        assert torch.allclose(got, want, atol=1e-4)


def test_all_targets_ignored_is_zero_not_nan():
    hidden = torch.randn(4, 8, requires_grad=True)
    loss = linear_cross_entropy(hidden, torch.randn(16, 8), torch.full((4,), IGNORE))
    loss.backward()
    assert loss.item() == 0.0 and torch.all(hidden.grad == 0)


def stock_copy(model: GrowLengthLM) -> GPTNeoXForCausalLM:
    stock = GPTNeoXForCausalLM(model.config)
    stock.load_state_dict(model.state_dict())
    return stock


@pytest.mark.parametrize("eos_id", [None, 3], ids=["packed", "document-masked"])
def test_model_loss_and_gradients_equal_the_stock_model(eos_id):
    model = build_model("tiny", vocab_size=64, max_position_embeddings=64, seed=1)
    stock = stock_copy(model)
    x = torch.randint(0, 64, (3, 32), generator=torch.Generator().manual_seed(2))
    inputs = batch_inputs(x, position_mode="interpolate", seq_len=32, final_len=64, eos_id=eos_id)
    losses = []
    for m in (model, stock):
        loss = lm_loss(m, x, **inputs)
        loss.backward()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)
    grads = dict(stock.named_parameters())
    for name, p in model.named_parameters():
        assert torch.allclose(p.grad, grads[name].grad, atol=1e-4), name


def test_bf16_autocast_stays_close_and_keeps_the_weights_dtype():
    model = build_model("tiny", vocab_size=64, max_position_embeddings=64, seed=1)
    x = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(3))
    fp32 = lm_loss(model, x).item()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = lm_loss(model, x)
    loss.backward()
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(fp32, rel=2e-2)
    assert all(p.grad.dtype == torch.float32 for p in model.parameters())


def test_without_labels_the_forward_gives_logits():
    model = build_model("tiny", vocab_size=64, max_position_embeddings=64, seed=1).eval()
    x = torch.randint(0, 64, (2, 16))
    assert torch.equal(model(input_ids=x).logits, stock_copy(model).eval()(input_ids=x).logits)


def test_the_exported_model_is_the_stock_class(tmp_path):
    import json

    from gl_ray.train.outputs import export_final

    model = build_model("tiny", vocab_size=64, max_position_embeddings=64, seed=1)
    (tmp_path / "tok").mkdir()
    final = export_final(str(tmp_path / "run"), model, model.state_dict(), str(tmp_path / "tok"))
    assert json.loads((tmp_path / "run" / "final" / "config.json").read_text())["architectures"] == \
        ["GPTNeoXForCausalLM"]
    assert final.endswith("final")


def test_without_grad_only_the_loss_is_computed(monkeypatch):
    """Validation and eval run under no_grad: the same loss, and no gradients made (an autograd Function's
    forward would still make them, since the weights require grad)."""
    import gl_ray.loss as loss_mod

    hidden, weight = torch.randn(64, 8), torch.randn(32, 8, requires_grad=True)
    targets = torch.randint(0, 32, (64,))
    want = linear_cross_entropy(hidden, weight, targets).item()
    asked = []
    real = loss_mod.chunked_loss
    monkeypatch.setattr(loss_mod, "chunked_loss", lambda *a, **k: asked.append(k) or real(*a, **k))
    with torch.no_grad():
        assert linear_cross_entropy(hidden, weight, targets).item() == pytest.approx(want, abs=1e-6)
    assert asked == [{"grad_hidden": False, "grad_weight": False}]


class WeightCasts(TorchDispatchMode):
    """Counts the dtype casts of a [V, H] tensor or its [H, V] transpose (the unembedding, a copy of it or its
    gradient), by target dtype."""

    def __init__(self, shape: torch.Size):
        super().__init__()
        self.shapes, self.to = {tuple(shape), tuple(reversed(shape))}, {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is torch.ops.aten._to_copy.default:
            src, dst = args[0], out
        elif func in (torch.ops.aten.copy_.default, torch.ops.aten.copy.default):
            dst, src = args[0], args[1]
        else:
            return out
        if tuple(src.shape) in self.shapes and src.dtype != dst.dtype:
            self.to[dst.dtype] = self.to.get(dst.dtype, 0) + 1
        return out


def test_bf16_autocast_casts_the_unembedding_once_per_micro_batch():
    """Under autocast the final LayerNorm gives fp32 hidden states; the [V, H] weight is cast to bf16 once per
    call, not in every chunk, and its fp32 gradient is not cast per chunk either (8 chunks here)."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(64, 16, generator=g, requires_grad=True)
    weight = (0.1 * torch.randn(96, 16, generator=g)).requires_grad_()
    targets = torch.randint(0, 96, (64,), generator=g)
    casts = WeightCasts(weight.shape)
    with torch.autocast("cpu", dtype=torch.bfloat16), casts:
        loss = linear_cross_entropy(hidden, weight, targets, chunk_tokens=8)
        loss.backward()
    assert casts.to.get(torch.bfloat16, 0) <= 1 and casts.to.get(torch.float32, 0) <= 1, casts.to
    assert weight.grad.dtype == torch.float32 and hidden.grad.dtype == torch.float32


def test_bf16_autocast_equals_fp32_cross_entropy_of_bf16_operands():
    """The loss under bf16 autocast is the fp32 loss of the bf16-rounded hidden states and weight (logits made in
    bf16, softmax in fp32), and the gradients stay near the fp32 ones."""
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(256, 32, generator=g, requires_grad=True)
    weight = (0.1 * torch.randn(500, 32, generator=g)).requires_grad_()
    targets = torch.randint(0, 500, (256,), generator=g)
    targets[::7] = IGNORE
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(hidden, weight, targets, chunk_tokens=32)
    loss.backward()
    h, w = hidden.detach().bfloat16().float().requires_grad_(), weight.detach().bfloat16().float().requires_grad_()
    ref = torch.nn.functional.cross_entropy(h @ w.t(), targets, ignore_index=IGNORE)
    ref.backward()
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(ref.item(), rel=1e-2)
    for got, want in ((hidden.grad, h.grad), (weight.grad, w.grad)):
        assert torch.allclose(got, want, rtol=2e-2, atol=2e-2 * want.abs().max().item())
