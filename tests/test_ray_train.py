"""GrowLength on local Ray Train: two CPU workers, two stages, resume and worker restarts."""

import os
import subprocess
import sys
import time

import pytest
import torch
from conftest import (MASKED, REPO, TEST_HEALTH_CHECK_INTERVAL_S, metrics, run_tiny, tiny_overrides, train_then_signal,
                      weights)

from gl_ray.schedule import make_plan
from gl_ray.status import run_status
from gl_ray.train.outputs import read_starts

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


def test_ray_final_model_loads_and_generates(ray_run, tiny_data):
    """The export of a two-worker run is the trained model: it loads with the last checkpoint's weights, scores
    the val split as the run did at its end, and generates greedily from its own next-token predictions."""
    import contextlib

    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gl_ray.data.stream import get_stream
    from gl_ray.train.io import WorkerIO
    from gl_ray.train.validation import Evaluator

    cfg, summary, run = ray_run
    model = AutoModelForCausalLM.from_pretrained(run / "final").eval()
    tok = AutoTokenizer.from_pretrained(run / "final")
    last = load_file(run / "checkpoint_step-0000016" / "model.safetensors")  # the state after the last step
    loaded = model.state_dict()
    assert last and all(torch.equal(loaded[k], v) for k, v in last.items())
    val = Evaluator(get_stream(tiny_data, "val"), cfg.data.eval_tokens, 512)
    val_loss = val.loss(model, 64, WorkerIO(), torch.device("cpu"), contextlib.nullcontext)
    assert val_loss == pytest.approx(summary["final_val_loss_final_len"], abs=1e-4)
    x = tok("import os", return_tensors="pt")
    n = x["input_ids"].shape[1]
    out = model.generate(**x, max_new_tokens=4, do_sample=False, pad_token_id=tok.eos_token_id)
    new = out[0, n:]  # 4 new tokens, or fewer ending in EOS
    assert torch.equal(out[0, :n], x["input_ids"][0])
    assert len(new) == 4 or (0 < len(new) < 4 and new[-1] == tok.eos_token_id)
    with torch.no_grad():
        for i in range(n, out.shape[1]):  # each new token is the argmax after the tokens before it
            assert out[0, i] == model(input_ids=out[:, :i]).logits[0, -1].argmax()


def test_ddp_on_two_workers_matches_one_process(ray_run, baseline):
    """Two DDP workers each taking half of every step give the same losses as one process taking all of it (the
    session's one-process run of the same overrides: the name changes no seed)."""
    _, _, run = ray_run
    for a, b in zip(metrics(run), metrics(baseline[2]), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-4)


def test_masked_ddp_on_two_workers_matches_one_process(masked_baseline, tiny_data, tmp_path):
    """Document masking under DDP: two workers give the losses of one process (the same rows per micro batch)."""
    run_tiny(tiny_data, tmp_path, "masked-ddp", **MASKED, **{"ray.num_workers": 2})
    got, want = metrics(tmp_path / "masked-ddp"), metrics(masked_baseline[2])
    assert [m["step"] for m in got] == [m["step"] for m in want]
    for a, b in zip(got, want):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-4)


def test_worker_failure_is_restarted_by_ray_train(ray_run, tiny_data, tmp_path, monkeypatch):
    """With ray.max_failures: 1, a worker dying mid-stage costs a restart from the last checkpoint, not the run."""
    _, _, base = ray_run
    monkeypatch.setenv("GL_RAY_FAIL_AT_STEP", "10")
    monkeypatch.setenv("GL_RAY_FAIL_MARKER", str(tmp_path / "failed-once"))
    run_tiny(tiny_data, tmp_path, "restarted", **{"ray.num_workers": 2, "ray.max_failures": 1})
    assert (tmp_path / "failed-once").exists()
    got, want = metrics(tmp_path / "restarted"), metrics(base)
    assert [m["step"] for m in got] == [m["step"] for m in want]  # each step exactly once
    starts = read_starts(str(tmp_path / "restarted"))  # steps 9 and 10 were reported, then redone from step 8
    assert [(st["resumed_step"], st["world_size"], st["steps_redone"]) for st in starts] == [(0, 2, 0), (8, 2, 2)]
    assert all(len(st["nodes"]) == 2 and st["distinct_nodes"] == 1 for st in starts)  # one node here
    status = run_status(str(tmp_path / "restarted"))
    assert (status["restarts"], status["steps_redone"]) == (1, [2])
    wa, wb = weights(tmp_path / "restarted"), weights(base)
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


def test_sigterm_then_sigkill_of_the_ray_driver_resume_exactly_with_the_same_command(ray_run, tiny_data, tmp_path):
    """One 2-worker run on local Ray, interrupted twice and resumed each time with the same command (one run
    instead of two saves a Ray start and a resume; every check of the two former tests is here):
    1. SIGTERM to the driver (`kill`, a scheduler, `ray job stop`): the workers see the stop request between
       steps, agree on one step, checkpoint it together, and the driver exits 143 with one line;
    2. the resume is SIGKILLed mid-stage, after its first checkpoint (as an OOM killer or a lost SSH session
       would): nothing of that run keeps writing;
    3. the same command resumes from the newest checkpoint as if nothing happened, on a quiet console, printing
       every step it runs: the losses and the final weights are those of the uninterrupted run."""
    import signal

    from gl_ray.train.checkpoint import find_resume_checkpoint

    _, _, base = ray_run
    run = tmp_path / "cut"
    sets = [x for s in tiny_overrides(tiny_data, str(tmp_path), "cut", **{"ray.num_workers": 2})
            for x in ("--set", s)]
    # the slow steps (0.4 s each) pace the two interrupted runs; the session's health-check interval (its own
    # Ray's reports at 0.1 s instead of 0.5 s) lets the final full-speed run train in ~2 s instead of ~8 s
    env = {**os.environ, "GL_RAY_SLOW_STEP_S": "0.4",
           "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": TEST_HEALTH_CHECK_INTERVAL_S}
    env.pop("RAY_ADDRESS", None)
    log = run / "metrics.jsonl"
    # 1. SIGTERM mid-stage: a checkpoint at the step the workers agreed on, exit 143, one line
    r = train_then_signal(sets, log, 3, env, timeout_s=240, sig=signal.SIGTERM)
    assert r.returncode == 143, r.stderr[-3000:]
    assert "stopped on SIGTERM, checkpointed at step" in r.stderr
    stopped = metrics(run)[-1]["step"]
    assert stopped < 16 and (run / f"checkpoint_step-{stopped:07d}" / "state.json").exists()
    # 2. the same command resumes; SIGKILL it one step after its first checkpoint (every 4 steps: 4096 tokens)
    first_ckpt = 4 * (stopped // 4 + 1)
    train_then_signal(sets, log, lines=first_ckpt + 1, env=env, timeout_s=240)
    killed_at = time.time()
    # Ray's workers outlive their killed driver by the seconds it takes them to notice the raylet is gone (a few
    # steps here); they must then stop: wait until the run folder has been quiet for 3 s, within 30 s of the kill
    seen, quiet_since = log.read_text(), time.time()
    while time.time() - quiet_since < 3:
        assert time.time() - killed_at < 30, "the killed run's workers are still training"
        time.sleep(0.2)
        if log.read_text() != seen:
            seen, quiet_since = log.read_text(), time.time()
    assert first_ckpt + 1 <= len(seen.splitlines()) < 16  # killed mid-run, after the resumed run's checkpoint
    found = find_resume_checkpoint(str(run), warn=lambda _: None)
    assert found is not None
    resume_step = found[1].step
    assert stopped < resume_step < 16  # the next start resumes from a checkpoint the killed run wrote
    # 3. the same command again, at full speed: resumes from resume_step and ends the run
    r = subprocess.run([sys.executable, "-m", "gl_ray", "train", *sets], cwd=REPO, capture_output=True, text=True,
                       env={k: v for k, v in env.items() if k != "GL_RAY_SLOW_STEP_S"}, timeout=300, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    for noise in ("Token authentication is enabled", "PreemptionWatcher", "exclude_resources",  # a quiet console:
                  "Started a local Ray instance", "INFO streaming_executor", "Attempting to start training worker"):
        assert noise not in r.stdout + r.stderr, noise  # Ray's INFO lines are off without --verbose
    progress = [line for line in r.stdout.splitlines() if "[gl-ray] stage" in line]
    assert len(progress) == 16 - resume_step, r.stdout[-3000:]  # each step it ran, printed before it ends
    assert all(line.startswith("[gl-ray] stage") for line in progress), progress  # no "(... pid=...)", no colour
    got, want = metrics(run), metrics(base)
    assert [m["step"] for m in got] == [m["step"] for m in want]  # each step exactly once
    for a, b in zip(got, want):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
    wa, wb = weights(run), weights(base)
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


def test_a_run_folder_or_dataset_a_worker_cannot_see_is_one_line(ray_local, ray_run, tiny_data, tmp_path):
    """ray.storage_path, data.path and every data.sources path must be the driver's folders on every worker's node:
    the driver writes a token into a local run folder and each worker reads it back (`check_shared`). A Ray run
    wrote and checked it; a node that sees another folder at that path (here: another token, or no dataset) gets one
    line naming the node and the config key."""
    from gl_ray.errors import UserError
    from gl_ray.train.ray_train import SHARED_MARKER, check_shared, mark_shared, shared_data

    _, _, run = ray_run
    assert len((run / SHARED_MARKER).read_text()) == 32  # the Ray run's driver wrote it, its workers checked it
    folder = tmp_path / "run"
    folder.mkdir()
    token = mark_shared(str(folder))

    @ray_local.remote(num_cpus=0)
    def on_a_node(run_uri, token, data):
        try:
            check_shared(run_uri, token, shared_data(data))
        except UserError as e:
            return str(e)
        return "ok"

    assert ray_local.get(on_a_node.remote(str(folder), token, {"path": tiny_data})) == "ok"
    (folder / SHARED_MARKER).write_text("another node's folder")
    got = ray_local.get(on_a_node.remote(str(folder), token, {"path": tiny_data}))
    assert got.startswith("ray.storage_path: the run folder") and "on node " in got and "s3://" in got
    assert "\n" not in got
    token = mark_shared(str(folder))
    got = ray_local.get(on_a_node.remote(str(folder), token, {"path": str(tmp_path / "nowhere")}))
    assert got.startswith("data.path:") and "no manifest.json on node" in got
    mixture = {"path": tiny_data, "sources": [{"path": tiny_data, "weight": 1.0},
                                              {"path": str(tmp_path / "elsewhere"), "weight": 1.0}]}
    got = ray_local.get(on_a_node.remote(str(folder), token, mixture))  # a source only the driver's node has
    assert got.startswith(f"data.sources[1].path: {str(tmp_path / 'elsewhere')!r} has no manifest.json on node")
    assert mark_shared("s3://bucket/runs/x") == ""  # S3 is every node's: nothing to check


def test_the_first_steps_are_read_in_process_and_the_stage_dataset_starts_after_them(tiny_data, ray_local, tmp_path):
    """`make demo`'s first report window waited 41% of its time for Ray Data to start: each worker now reads the
    first n_head steps itself with the pipeline's Ray-free twin (the same rows), and the stage's Ray Data
    dataset starts after them."""
    import numpy as np

    from gl_ray.config import load_config
    from gl_ray.data.packing import RowLayout
    from gl_ray.data.pipeline import dataset_name, stage_dataset
    from gl_ray.train.ray_train import HeadRows, stage_datasets

    cfg = load_config(None, tiny_overrides(tiny_data, str(tmp_path), "head", **{"ray.num_workers": 2,
                                                                               "schedule.budget_tokens": 65536}))
    plan = make_plan(cfg)
    stage = plan.stages[0]
    n_head = cfg.data.head_steps
    assert plan.world_size == 2 and n_head == 8 and stage.steps > n_head + 1
    datasets = stage_datasets({2: plan}, cfg.data, str(tmp_path / "head"))  # a new run: its cursor is (0, 0)
    for rank in (1,):  # rank 1: its rows are offset within each step
        first = next(iter(datasets[dataset_name(0, rank, 2)]().iter_batches(
            batch_size=stage.rows_per_rank_step, batch_format="numpy", drop_last=True)))
        assert int(first["step"][0]) == n_head
        whole = stage_dataset(cfg.data.path, cfg.data.seed, RowLayout.of(stage, rank=rank, start_step=0))
        expected = [b["input_ids"] for _, b in zip(range(n_head + 1), whole.iter_batches(
            batch_size=stage.rows_per_rank_step, batch_format="numpy", drop_last=True))]
        assert np.array_equal(first["input_ids"], expected[n_head])
        head = list(HeadRows(cfg.data, plan, rank, cursor=(0, 0)).steps(stage, 0, n_head))
        assert len(head) == n_head and all(np.array_equal(a, b) for a, b in zip(head, expected))
        # restored elsewhere than the step read ahead (a rewind's skip): read from where the loop asks
        moved = list(HeadRows(cfg.data, plan, rank, cursor=(0, 0)).steps(stage, 3, 2))
        assert all(np.array_equal(a, b) for a, b in zip(moved, expected[3:5]))
