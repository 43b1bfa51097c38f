"""ray.strategy: fsdp on local Ray Train (two CPU workers, gloo): the same losses as one process, sharded
checkpoints that resume exactly, a resume on another number of workers, one HF folder at the end."""

import json
import shutil

import pytest
import torch
from conftest import metrics, run_tiny, weights

from gl_ray.errors import UserError

pytestmark = pytest.mark.slow

FSDP = {"ray.num_workers": 2, "ray.strategy": "fsdp"}


@pytest.fixture(scope="module")
def fsdp_run(tiny_data, ray_local, tmp_path_factory):
    storage = tmp_path_factory.mktemp("fsdp")
    cfg, summary = run_tiny(tiny_data, storage, "fsdp2", **FSDP)
    return cfg, summary, storage / "fsdp2"


def cut_back(run, to, step: int):
    """A copy of a finished run as if it had stopped after `step` steps: later checkpoints and outputs removed."""
    shutil.copytree(run, to)
    for ck in to.glob("checkpoint_step-*"):
        if int(ck.name.split("-")[1]) > step:
            shutil.rmtree(ck)
    shutil.rmtree(to / "final")
    (to / "summary.json").unlink()
    (to / "checkpoint_manager_snapshot.json").unlink(missing_ok=True)  # Ray Train's list of the removed ones


def test_fsdp_on_two_workers_matches_one_process(fsdp_run, baseline):
    """FSDP2 shards parameters, gradients and AdamW state, and still takes the same steps as one process."""
    _, summary, run = fsdp_run
    got, want = metrics(run), metrics(baseline[2])
    assert [m["step"] for m in got] == [m["step"] for m in want]
    for a, b in zip(got, want):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-4), a["step"]
    assert summary["tokens"] == baseline[1]["tokens"]


def test_fsdp_checkpoints_are_sharded_per_rank(fsdp_run):
    _, _, run = fsdp_run
    ck = run / "checkpoint_step-0000008"
    state = json.loads((ck / "state.json").read_text())
    assert state["strategy"] == "fsdp"
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata", "rng.pt"} <= set(state["files"])  # each rank's own file
    assert not (ck / "model.safetensors").exists()
    blocked = [m["checkpoint_block_s"] for m in metrics(run) if "checkpoint_block_s" in m]
    assert blocked and all(b >= 0 for b in blocked)  # the loop waited only for the shards' copy to host memory


def test_fsdp_final_is_one_hf_folder(fsdp_run, baseline):
    from transformers import AutoModelForCausalLM

    _, _, run = fsdp_run
    model = AutoModelForCausalLM.from_pretrained(run / "final")
    assert sum(p.numel() for p in model.parameters()) > 0
    wa, wb = weights(run), weights(baseline[2])
    assert wa.keys() == wb.keys()
    assert all(torch.allclose(wa[k], wb[k], atol=1e-4) for k in wa)


def test_fsdp_run_resumes_exactly(fsdp_run, tiny_data, tmp_path):
    """From a sharded checkpoint mid-run (step 8, the stage switch), the rest of the run is the same. The first
    run saved its shards in the background (train.async_checkpoint, the default); the resumed one saves them in
    the loop: both write the same checkpoints."""
    _, _, run = fsdp_run
    cut_back(run, tmp_path / "fsdp2", step=8)
    run_tiny(tiny_data, tmp_path, "fsdp2", **FSDP, **{"train.async_checkpoint": False})
    got, want = metrics(tmp_path / "fsdp2"), metrics(run)
    assert [m["step"] for m in got] == [m["step"] for m in want]  # each step once
    for a, b in zip(got, want):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6), a["step"]
    wa, wb = weights(tmp_path / "fsdp2"), weights(run)
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


def test_fsdp_run_resumes_on_another_number_of_workers(fsdp_run, tiny_data, tmp_path):
    """Two workers' shards, resumed by one: torch.distributed.checkpoint reshards, each step's rows are the same
    whoever reads them, and the run goes on where it stopped (close to the 2-worker run, not bit-exact)."""
    _, _, run = fsdp_run
    cut_back(run, tmp_path / "fsdp2", step=12)
    run_tiny(tiny_data, tmp_path, "fsdp2", **{**FSDP, "ray.num_workers": 1})
    got, want = metrics(tmp_path / "fsdp2"), metrics(run)
    assert [m["step"] for m in got] == [m["step"] for m in want]
    for a, b in zip(got, want):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-3), a["step"]


def test_a_ddp_checkpoint_is_not_resumed_under_fsdp(baseline, tiny_data, tmp_path):
    """The two checkpoint formats are not converted: one line, before anything of the run is rewritten."""
    cut_back(baseline[2], tmp_path / "base", step=8)
    before = (tmp_path / "base" / "config.yaml").read_text()
    with pytest.raises(UserError, match="written with ray.strategy=ddp.*uses ray.strategy=fsdp"):
        run_tiny(tiny_data, tmp_path, "base", **FSDP)
    assert (tmp_path / "base" / "config.yaml").read_text() == before
