"""train.compile (gl_ray.train.compiling): every graph a run needs stays compiled (no fall back to eager at dynamo's
recompile limit), counted with the "eager" backend; under FSDP2 the blocks are compiled in place, the state dict
keeps its keys, and the losses are the uncompiled model's."""

import logging

import pytest
import torch
import torch._dynamo.config as dynamo_config
from conftest import run_tiny
from torch._dynamo.testing import CompileCounter

from gl_ray.train import compiling

EIGHT_STAGES = {"schedule.lengths": "[8,16,32,64,128,256,512,1024]", "schedule.ratios": str([0.125] * 8),
                "schedule.budget_tokens": 8192, "model.max_position_embeddings": 1024, "train.compile": True,
                "train.micro_batch_tokens": 1024, "train.eval_every_tokens": 0, "train.checkpoint_every_tokens": 0}


@pytest.mark.parametrize("mode, schedule_mode, graphs", [("extrapolate", "reshape", 8), ("interpolate", "reshape", 8),
                                                          ("pose", "reshape", 8), ("extrapolate", "window", 2)])
def test_eight_stages_stay_compiled_in_every_position_mode(mode, schedule_mode, graphs, tiny_data, tmp_path,
                                                           monkeypatch, caplog):
    """Reshape: one graph per stage length, position ids or not (8); window: every row at the final length, one
    graph with a window mask, one without at the final stage (2). Dynamo's limit is
    torch's default of 8 when the run starts, the budget the loop sets covers what it compiles, nothing warns."""
    counter = CompileCounter()
    torch._dynamo.reset()
    monkeypatch.setattr(compiling, "BACKEND", counter)
    sets = EIGHT_STAGES | {"model.position_mode": mode, "schedule.mode": schedule_mode}
    with dynamo_config.patch(recompile_limit=8), caplog.at_level(logging.WARNING):  # restored on exit
        _, summary = run_tiny(tiny_data, tmp_path, mode, **sets)
        limit = dynamo_config.recompile_limit
    torch._dynamo.reset()
    assert summary["steps"] == 8 and len(summary["stages"]) == 8
    assert not [r for r in caplog.records if "recompile" in r.getMessage()]
    assert counter.frame_count == graphs <= limit


@pytest.mark.parametrize("preset", ["tiny", "tiny-llama"])
def test_fsdp_compiles_each_block_in_place(preset, tmp_path):
    """A one-rank gloo group: after fully_shard, each block's forward is compiled (one graph the blocks share),
    the root is not, the state dict keys are the uncompiled model's, and loss and gradients are unchanged."""
    import torch.distributed as dist

    from gl_ray.model import build_model, lm_loss
    from gl_ray.train.parallel import shard_model

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        x = torch.randint(1, 256, (2, 32), generator=torch.Generator().manual_seed(0))
        plain = build_model(preset, 256, 64, seed=1)
        want = lm_loss(plain, x)
        want.backward()
        model = shard_model(build_model(preset, 256, 64, seed=1), bf16=False)
        keys = list(model.state_dict())
        counter = CompileCounter()
        net = compiling.compile_model(model, model, graphs=4, backend=counter)
        assert net is model  # the root stays as it is: FSDP's hooks run outside the graphs
        got = lm_loss(net, x)
        got.backward()
        assert counter.frame_count == 1 and list(model.state_dict()) == keys
        assert got.item() == pytest.approx(want.item(), abs=1e-5)
        grads = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
        for n, p in plain.named_parameters():
            assert torch.allclose(grads[n], p.grad, atol=1e-5), n
    finally:
        dist.destroy_process_group()
