"""GrowLength on local Ray Train: two CPU workers, two stages, resume and worker restarts."""

import pytest
import torch
from test_train_local import metrics, run_tiny, weights

from gl_ray.schedule import make_plan

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_run(tiny_data, ray_local, tmp_path_factory):
    storage = tmp_path_factory.mktemp("rayruns")
    cfg, summary = run_tiny(tiny_data, storage, "ray2", **{"ray.num_workers": 2})
    return cfg, summary, storage / "ray2"


def test_the_local_cluster_listens_on_loopback_only(ray_local):
    assert {n["NodeManagerAddress"] for n in ray_local.nodes()} == {"127.0.0.1"}
    assert ray_local.get_runtime_context().gcs_address.startswith("127.0.0.1:")


def test_two_workers_two_stages_follow_the_plan(ray_run):
    cfg, summary, run = ray_run
    plan = make_plan(cfg)
    assert plan.world_size == 2
    ms = metrics(run)
    assert [m["step"] for m in ms] == list(range(1, plan.total_steps + 1))
    for m in ms:
        st = plan.stage_at_step(m["step"] - 1)
        assert (m["stage"], m["seq_len"], m["tokens"]) == (st.index, st.seq_len, m["step"] * plan.tokens_per_step)
    assert [m["stage"] for m in ms] == sorted(m["stage"] for m in ms)
    assert summary["tokens"] == plan.total_tokens
    assert (run / "checkpoint_step-0000016" / "model.safetensors").exists()


def test_ray_final_model_loads_and_generates(ray_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, _, run = ray_run
    model = AutoModelForCausalLM.from_pretrained(run / "final")
    tok = AutoTokenizer.from_pretrained(run / "final")
    out = model.generate(**tok("import os", return_tensors="pt"), max_new_tokens=4, do_sample=False,
                         pad_token_id=tok.eos_token_id)
    assert out.shape[1] > 4


def test_ddp_on_two_workers_matches_one_process(ray_run, tiny_data, tmp_path):
    """Two DDP workers each taking half of every step give the same losses as one process taking all of it."""
    _, _, run = ray_run
    run_tiny(tiny_data, tmp_path, "single")
    for a, b in zip(metrics(run), metrics(tmp_path / "single")):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-4)


def test_rerun_resumes_from_the_latest_checkpoint(ray_run, tiny_data, tmp_path, monkeypatch):
    _, _, base = ray_run
    monkeypatch.setenv("GL_RAY_FAIL_AT_STEP", "6")
    monkeypatch.setenv("GL_RAY_FAIL_RANK", "1")
    with pytest.raises(Exception, match="injected failure"):
        run_tiny(tiny_data, tmp_path, "cut", **{"ray.num_workers": 2})
    monkeypatch.delenv("GL_RAY_FAIL_AT_STEP")
    run_tiny(tiny_data, tmp_path, "cut", **{"ray.num_workers": 2})
    got, want = metrics(tmp_path / "cut"), metrics(base)
    assert [m["step"] for m in got] == [m["step"] for m in want]
    for a, b in zip(got, want):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
    wa, wb = weights(tmp_path / "cut"), weights(base)
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


def test_worker_failure_is_restarted_by_ray_train(ray_run, tiny_data, tmp_path, monkeypatch):
    """With ray.max_failures: 1, a worker dying mid-stage costs a restart from the last checkpoint, not the run."""
    _, _, base = ray_run
    monkeypatch.setenv("GL_RAY_FAIL_AT_STEP", "10")
    monkeypatch.setenv("GL_RAY_FAIL_MARKER", str(tmp_path / "failed-once"))
    run_tiny(tiny_data, tmp_path, "restarted", **{"ray.num_workers": 2, "ray.max_failures": 1})
    assert (tmp_path / "failed-once").exists()
    got, want = metrics(tmp_path / "restarted"), metrics(base)
    assert [m["step"] for m in got] == [m["step"] for m in want]  # each step exactly once
    wa, wb = weights(tmp_path / "restarted"), weights(base)
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)
