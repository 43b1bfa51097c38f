"""benchmarks/gpu_check.sh, the script a GPU session runs, end to end on CPU with a tiny preset, on a Python where
Ray and boto3 cannot be imported (the GPU machine has neither)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def no_ray_python(tmp_path) -> dict:
    """PYTHONPATH entries that make `import ray` and `import boto3` fail as on a machine without them; one torch
    thread per check (tiny models: a second thread gains nothing, and on two cores shared with the session's Ray
    processes torch's spinning intra-op threads made the script up to 10x slower, e.g. sync_check 13 s -> 147 s)."""
    blocked = tmp_path / "blocked"
    for name in ("ray", "boto3"):
        (blocked / name).mkdir(parents=True)
        (blocked / name / "__init__.py").write_text(f"raise ImportError('{name} is not installed on this machine')\n")
    return {"PYTHONPATH": os.pathsep.join([str(blocked), str(REPO)]), "OMP_NUM_THREADS": "1"}


def test_gpu_check_script_runs_without_ray(tiny_data, tmp_path, no_ray_python):
    out, work = tmp_path / "out", tmp_path / "work"
    env = {**os.environ, **no_ray_python, "OUT": str(out), "WORK": str(work), "PY": sys.executable,
           "DEVICE": "cpu", "DTYPE": "fp32", "PRESET": "tiny", "LENGTHS": "32,64", "STEPS": "1", "BUDGET": "",
           "TOKENS_PER_STEP": "1024", "MICRO_BATCH_TOKENS": "512", "TRAIN_LENGTHS": "[32,64]",
           "TRAIN_TOKENS": "8192", "MAX_POSITIONS": "128", "EVAL_TOKENS": "2048", "DATA": tiny_data,
           "DOC_MASKING": "1", "ACT_CKPT": "1",  # the long-context path
           "FSDP_SEQ_LEN": "64", "FSDP_STEPS": "2", "LOSS_SEQ_LEN": "64", "LOSS_SEQS": "2",
           "SYNC_LEN": "64", "CKPT_PRESET": "tiny", "CKPT_REPEATS": "1",
           "INDUCTION_ARGS": "--preset tiny --length 32 --span 4 --spans 2 --distance 4:24 --batch 2 --steps 4 "
                             "--log-every 2"}
    r = subprocess.run(["bash", "benchmarks/gpu_check.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=600, check=False)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted(["env.txt", "bench.log", "bench.json", "train.log", "train_summary.json", "metrics.jsonl",
                            "gpu_check.json", "gpu_check.md"])  # the device tool brings back at most 8 files
    doc = json.loads((out / "gpu_check.json").read_text())
    assert [row["seq_len"] for row in doc["bench"]["lengths"]] == [32, 64]
    assert doc["bench"]["document_masking"] and doc["bench"]["activation_checkpointing"]
    cfg = yaml.safe_load((work / "runs" / "gpu-check" / "config.yaml").read_text())
    assert cfg["data"]["document_masking"] and cfg["train"]["activation_checkpointing"]
    assert all(row["step_time_s"] > 0 and row["peak_memory_bytes"] > 0 for row in doc["bench"]["lengths"])
    train = doc["train"]
    assert train["tokens"] == 8192 and train["steps"] == 8  # every planned step ran: 8 x 1,024 tokens
    assert [s["seq_len"] for s in train["stages"]] == [32, 64]
    assert sum(s["steps"] for s in train["stages"]) == 8
    for s in train["stages"]:
        assert s["tokens_per_s"] > 0 and s["achieved_tflops"] > 0
        assert s["step_time_s"] == pytest.approx(s["wall_s"] / s["steps"])
        assert s["mfu"] is None  # no bf16 peak on CPU: MFU is left out, not made up
    assert [s["micro_batch"] for s in train["stages"]] == [32, 16]  # auto, no CPU budget: a whole step at once
    fsdp = doc["fsdp"]
    assert fsdp["restored_equal"] and fsdp["max_loss_diff"] < 1e-5  # fp32: sharding changes nothing
    assert {"__0_0.distcp", ".metadata", "state.json"} <= set(fsdp["checkpoint_files"])
    loss = doc["loss"]["arms"]  # stock vs chunked loss at vocab 50,304: the chunked one never holds all logits
    assert loss["chunked (gl_ray.loss)"]["peak_bytes"]["2"] < loss["stock HF loss"]["peak_bytes"]["2"]
    md = (out / "gpu_check.md").read_text()
    assert "| 32 |" in md and "| 64 |" in md and "tokens/s" in md and "FSDP2 in one process" in md
    assert "stock vs chunked loss" in md
    sync = doc["sync"]  # every position mode x masking x schedule mode (sdpa on CPU), reads counted on the host
    assert sync["all_clean"] and len(sync["combinations"]) == 30  # sdpa and flex 12 each, flash 6 (no window)
    assert {(c["position_mode"], c["masking"], c["attention"], c["schedule_mode"]) for c in sync["combinations"]} == {
        (m, k, a, s) for m in ("extrapolate", "interpolate", "pose") for k in (False, True)
        for a in ("sdpa", "flex", "flash_attention_2") for s in ("reshape", "window")
        if not (a == "flash_attention_2" and s == "window")}
    ckpt = doc["checkpoint"]
    assert ckpt["preset"] == "tiny" and ckpt["host_copy_s"][0] > 0 and ckpt["write_s"][0] > 0
    assert "Host syncs in" in md and "holds the loop up" in md
    induction = doc["induction"]  # the retrieval probe ran on the device asked for, its curve in the summary
    assert induction["args"]["device"] == "cpu" and [c["step"] for c in induction["curve"]] == [2, 4]
    assert all(c["targets"] > 0 for c in induction["curve"]) and "Retrieval by content" in md


def test_the_sync_check_catches_a_read_back_in_the_step(monkeypatch):
    """benchmarks/sync_check.py is not vacuous: an input builder that reads a tensor back makes it report syncs."""
    import torch

    import benchmarks.sync_check as sc

    real = sc.step_inputs

    def reading(x, *a, **k):
        int(x.sum())  # a host read, as a .item() in the step would be (on CUDA: a device sync)
        return real(x, *a, **k)

    monkeypatch.setattr(sc, "step_inputs", reading)
    got = sc.check(preset="tiny", vocab=256, final_len=32, micro_batch=2, grad_accum=2, position_mode="extrapolate",
                   masking=True, attention="sdpa", schedule_mode="reshape", device=torch.device("cpu"), dtype="fp32",
                   warmup=1, steps=2)
    assert got == {"syncs": 4, "error": ""}  # one read per micro batch: 2 steps x 2 micro batches


def test_a_failing_backend_is_recorded_and_the_other_combinations_still_run(monkeypatch, tmp_path):
    """A backend that raises anything (here a ValueError, in the warm-up steps) is its combination's result, not
    the end of the check: the other combinations run, the JSON and the table are written, all_clean is false."""
    import benchmarks.sync_check as sc

    real = sc.build_model

    def build(*args, attention: str, **kwargs):
        model = real(*args, attention="sdpa", **kwargs)
        if attention == "broken":
            def fail(*a, **k):
                raise ValueError("no kernel for this shape\n(more detail)")
            model.forward = fail
        return model

    monkeypatch.setattr(sc, "build_model", build)
    monkeypatch.setattr(sc, "combinations", lambda device: [
        {"position_mode": "extrapolate", "masking": False, "attention": name, "schedule_mode": "reshape"}
        for name in ("broken", "sdpa")])
    out = tmp_path / "sync.json"
    monkeypatch.setattr(sys, "argv", ["sync_check", "--device", "cpu", "--dtype", "fp32", "--vocab", "256",
                                      "--final-len", "32", "--warmup", "1", "--steps", "1", "--out", str(out)])
    sc.main()
    res = json.loads(out.read_text())
    broken, sdpa = res["combinations"]
    assert broken["syncs"] is None and broken["error"] == "ValueError: no kernel for this shape"
    assert sdpa["syncs"] == 0 and sdpa["error"] == ""
    assert not res["all_clean"] and "error: ValueError: no kernel for this shape" in sc.format_table(res)


def test_a_failed_check_is_summarised_and_the_others_still_run(tmp_path, no_ray_python):
    """gpu_check.sh goes on past a check that fails (here the bench: a length that does not divide the tokens per
    step, exit status 2): the checkpoint check after it still runs, gpu_check.{json,md} record the failure with the end
    of its log next to what the others measured, and only then does the script exit non-zero."""
    out, work = tmp_path / "out", tmp_path / "work"
    env = {**os.environ, **no_ray_python, "OUT": str(out), "WORK": str(work), "PY": sys.executable,
           "DEVICE": "cpu", "DTYPE": "fp32", "PRESET": "tiny", "LENGTHS": "33", "STEPS": "1", "BUDGET": "",
           "TOKENS_PER_STEP": "1024", "MICRO_BATCH_TOKENS": "512", "DATA": str(tmp_path / "no-data"),
           "TRAIN": "0", "FSDP": "0", "LOSS_CHECK": "0", "SYNC_CHECK": "0", "INDUCTION_CHECK": "0",
           "CKPT_PRESET": "tiny", "CKPT_REPEATS": "1"}
    r = subprocess.run(["bash", "benchmarks/gpu_check.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=600, check=False)
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    assert "[gpu_check] failed: bench" in r.stderr
    assert {p.name for p in out.iterdir()} == {"env.txt", "bench.log", "train.log", "gpu_check.json", "gpu_check.md"}
    doc = json.loads((out / "gpu_check.json").read_text())
    (failed,) = doc["failed"]
    assert failed["check"] == "bench" and failed["exit_status"] == 2
    assert any("must divide --tokens-per-step" in line for line in failed["log_tail"])
    assert doc["bench"] is None and doc["train"] is None
    assert doc["checkpoint"]["preset"] == "tiny" and doc["checkpoint"]["write_s"][0] > 0  # ran after the failure
    md = (out / "gpu_check.md").read_text()
    assert md.startswith("**Checks that failed: bench**") and "must divide --tokens-per-step" in md
    assert "holds the loop up" in md
