"""gl_ray.attention on CPU, with sdpa-backed stand-ins for the flex and flash kernels (benchmarks/stub_kernels.py):
where each backend is checked, one compiled graph for flash's document masks, one dtype into flex under autocast,
and masked rows on CUDA routed to flex, whose block mask is not kept for backward as sdpa's dense mask is."""

import pytest
import torch
from torch._dynamo.testing import CompileCounter

from benchmarks.stub_kernels import flex as flex_stub
from benchmarks.stub_kernels import stub_kernels
from gl_ray import attention
from gl_ray.attention import attention_route, check_attention_here
from gl_ray.config import load_config
from gl_ray.errors import UserError
from gl_ray.model import PRESETS, batch_inputs, build_model, lm_loss
from gl_ray.train.preflight import attention_plan, preflight

EOS = 0
CFG = "pipelines/configs/tiny-growlength.yaml"


def rows(seed: int, batch: int = 2, seq_len: int = 32) -> torch.Tensor:
    """Random ids with documents of about 10 tokens (EOS = 0): a different layout for every seed."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(1, 256, (batch, seq_len), generator=g)
    x[torch.rand(batch, seq_len, generator=g) < 0.1] = EOS
    return x


def masked_inputs(x: torch.Tensor, attention_name: str) -> dict:
    return batch_inputs(x, position_mode="extrapolate", seq_len=x.shape[1], final_len=x.shape[1], eos_id=EOS,
                        attention=attention_name)


def test_flash_on_a_cpu_head_node_is_checked_where_the_workers_run(monkeypatch):
    """The driver of a GPU cluster with a CPU head (cluster/aws-gpu.yaml) has neither flash-attn nor a GPU: it
    accepts flash for GPU workers; each worker checks the package and its device; a CPU run is refused up front."""
    cfg = load_config(CFG, ["model.attention=flash_attention_2", "ray.use_gpu=true"])
    assert not attention.has_flash_attn() and not torch.cuda.is_available()  # this machine is such a head node
    preflight(cfg)  # no error: nothing the driver can know rules it out
    cuda = torch.device("cuda")  # a device object only: nothing runs on it
    with pytest.raises(UserError, match="needs the flash-attn package where the model runs"):
        check_attention_here("flash_attention_2", cuda)
    with pytest.raises(UserError, match="needs a CUDA device; this process runs on cpu"):
        check_attention_here("flash_attention_2", torch.device("cpu"))
    monkeypatch.setattr(attention, "has_flash_attn", lambda: True)
    check_attention_here("flash_attention_2", cuda)  # a GPU worker with flash-attn installed
    with pytest.raises(UserError, match="flash_attention_2 runs on CUDA only"):
        preflight(load_config(CFG, ["model.attention=flash_attention_2", "ray.num_workers=0", "train.device=cpu"]))


def test_flash_with_document_masks_keeps_one_compiled_graph_whatever_the_documents():
    """Three micro batches with 6, 9 and 13 documents: one graph (the documents' offsets are a dynamic dimension,
    the row length bounds the longest), and the losses are sdpa's under the same masks (flash computes in bf16)."""
    layouts = [rows(seed) for seed in (1, 2, 3)]
    assert len({int((x == EOS).sum()) for x in layouts}) == 3
    sdpa = build_model("tiny", 256, 64, seed=1)
    counter = CompileCounter()
    with stub_kernels():
        net = torch.compile(build_model("tiny", 256, 64, seed=1, attention="flash_attention_2"), backend=counter,
                            dynamic=False)
        for x in layouts:
            loss = lm_loss(net, x, **masked_inputs(x, "flash_attention_2"))
            loss.backward()
            assert loss.item() == pytest.approx(lm_loss(sdpa, x, **masked_inputs(x, "sdpa")).item(), abs=2e-3)
    assert counter.frame_count == 1


def test_flex_gets_one_dtype_under_bf16_autocast_with_fp32_weights():
    """RoPE's fp32 cos/sin promote q and k to fp32 while v is bf16: the wrapper hands flex one dtype."""
    flex_stub.dtypes.clear()
    model = build_model("tiny", 256, 64, seed=1, attention="flex")
    x = rows(4)
    with stub_kernels(), torch.autocast("cpu", dtype=torch.bfloat16):
        lm_loss(model, x, **masked_inputs(x, "flex")).backward()
        lm_loss(model, x, **batch_inputs(x, position_mode="pose", seq_len=32, final_len=64, attention="flex"))
    assert len(flex_stub.dtypes) == 2 * PRESETS["tiny"].layers
    assert set(flex_stub.dtypes) == {(torch.bfloat16,) * 3}


def test_masked_rows_on_cuda_run_flex_and_the_plan_says_so():
    assert attention_route("sdpa", masked=True, on_gpu=True).attention == "flex"
    assert attention_route("sdpa", masked=True, on_gpu=False).attention == "sdpa"  # CPU: nothing else trains
    assert attention_route("sdpa", masked=False, on_gpu=True).attention == "sdpa"  # plain causal: sdpa's flash
    assert attention_route("flash_attention_2", masked=True, on_gpu=True).attention == "flash_attention_2"
    cfg = load_config(CFG, ["data.document_masking=true", "ray.use_gpu=true"])
    doc, line = attention_plan(cfg, preflight(cfg))
    assert doc == {"asked": "sdpa", "runs": "flex", "why": attention_route("sdpa", masked=True, on_gpu=True).why}
    assert line.startswith("attention: flex instead of model.attention=sdpa: masked rows on CUDA")
    cpu = load_config(CFG, ["data.document_masking=true"])
    assert attention_plan(cpu, preflight(cpu)) == ({"asked": "sdpa", "runs": "sdpa", "why": ""}, "")


def saved_bytes(model: torch.nn.Module, x: torch.Tensor, inputs: dict) -> tuple[int, int]:
    """(bytes of every tensor kept for backward by one forward pass, of those shaped [..., L, L] like a mask)."""
    total, masks = 0, 0

    def pack(t: torch.Tensor):
        nonlocal total, masks
        size = t.numel() * t.element_size()
        total += size
        masks += size if t.dim() >= 2 and t.shape[-2:] == (x.shape[1], x.shape[1]) else 0
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        lm_loss(model, x, **inputs)
    return total, masks


def test_the_routed_backend_keeps_no_dense_mask_for_backward():
    """sdpa with document masks keeps its [batch, 1, L, L] mask in every layer for backward (on CUDA the
    memory-efficient kernel keeps a bf16 copy); flex, where masked rows train on CUDA, keeps q, k, v and the
    output but no L x L tensor, only a block mask built once per micro batch."""
    x = rows(5, batch=4, seq_len=128)
    layers = PRESETS["tiny"].layers
    sdpa_total, sdpa_masks = saved_bytes(build_model("tiny", 256, 256, seed=1), x, masked_inputs(x, "sdpa"))
    with stub_kernels():
        flex_total, flex_masks = saved_bytes(build_model("tiny", 256, 256, seed=1, attention="flex"), x,
                                             masked_inputs(x, "flex"))
    assert sdpa_masks >= layers * 4 * 128 * 128  # a bool mask per layer at least
    assert flex_masks == 0
    assert sdpa_total - flex_total >= sdpa_masks


@pytest.mark.parametrize("attention_name", ["flex", "flash_attention_2"])
def test_flex_and_flash_steps_read_nothing_back_to_the_host(attention_name):
    """benchmarks/sync_check.py's count of host reads in training steps (the CPU stand-in for CUDA's sync debug
    mode) is zero for flex and flash in every position mode, masked or not: transformers' mask builder, which
    looks at the position ids and the mask on every forward pass, never runs."""
    import benchmarks.sync_check as sc
    from gl_ray.model import POSITION_MODES

    for mode in POSITION_MODES:
        for masking in (False, True):
            got = sc.check(preset="tiny", vocab=256, final_len=32, micro_batch=2, grad_accum=2, position_mode=mode,
                           masking=masking, attention=attention_name, schedule_mode="reshape",
                           device=torch.device("cpu"), dtype="bf16", warmup=1, steps=2)
            assert got == {"syncs": 0, "error": ""}, (mode, masking)
