"""The training loop without Ray (ray.num_workers: 0): plan adherence, exact resume, outputs, bad input."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import MASKED, metrics, run_tiny, weights
from safetensors.torch import load_file

from gl_ray.errors import UserError
from gl_ray.schedule import make_plan
from gl_ray.train.faults import InjectedFault


def test_run_follows_the_plan(baseline):
    cfg, summary, run = baseline
    plan = make_plan(cfg)
    ms = metrics(run)
    assert [m["step"] for m in ms] == list(range(1, plan.total_steps + 1))  # log_every_steps=1: each step once
    for m in ms:
        st = plan.stage_at_step(m["step"] - 1)
        assert (m["stage"], m["seq_len"]) == (st.index, st.seq_len)
        assert m["tokens"] == m["step"] * plan.tokens_per_step
        assert m["loss"] > 0 and 0 <= m["data_wait_frac"] <= 1 and m["tokens_per_s"] > 0
    assert summary["tokens"] == plan.total_tokens and summary["steps"] == plan.total_steps
    assert [s["tokens"] for s in summary["stages"]] == [s.tokens for s in plan.stages]
    assert ms[-1]["loss"] < ms[0]["loss"]  # it learns
    from gl_ray.data.manifest import load_manifest

    # FLOPs by PaLM's accounting, worked out by hand: 6 N per token, N the matmul parameters, plus 12 * layers *
    # hidden * L for attention. tiny: 2 layers of width 64, the embedding padded to 1024 rows, so
    # N = 2 * 12 * 64**2 + 1024 * 64 = 163_840; each stage trains 8 steps of 1024 tokens
    assert 896 < load_manifest(cfg.data.path).vocab_size <= 1024  # padded to a multiple of 128: 1024 rows
    assert [(st.seq_len, st.tokens) for st in plan.stages] == [(32, 8192), (64, 8192)]
    want = [8192 * (6 * 163_840 + 12 * 2 * 64 * 32), 8192 * (6 * 163_840 + 12 * 2 * 64 * 64)]
    assert ms[-1]["flops"] == pytest.approx(sum(want), rel=1e-9) == summary["flops"]
    assert [s["flops"] for s in summary["stages"]] == pytest.approx(want, rel=1e-9)
    assert all(b["flops"] > a["flops"] for a, b in zip(ms, ms[1:]))
    evals = [m for m in ms if "val_loss" in m]
    assert len(evals) == 2 and summary["final_val_loss_final_len"] == evals[-1]["val_loss_final_len"]
    assert {"config.yaml", "plan.json", "metrics.jsonl", "summary.json", "final"} <= {p.name for p in run.iterdir()}
    # checkpoints every 4096 tokens (4 steps) and at stage ends
    assert sorted(p.name for p in run.glob("checkpoint_step-*")) == \
        [f"checkpoint_step-{s:07d}" for s in (4, 8, 12, 16)]


def test_final_model_loads_and_generates(baseline):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, _, run = baseline
    model = AutoModelForCausalLM.from_pretrained(run / "final")
    tok = AutoTokenizer.from_pretrained(run / "final")
    x = tok("def main():", return_tensors="pt")
    out = model.generate(**x, max_new_tokens=5, do_sample=False, pad_token_id=tok.eos_token_id)
    assert out.shape[1] == x["input_ids"].shape[1] + 5
    assert isinstance(tok.decode(out[0]), str)


@pytest.mark.parametrize("fail_at, mode", [(6, "extrapolate"), (8, "extrapolate"), (9, "pose")],
                         ids=["mid-stage", "stage-boundary", "after-boundary-pose"])
def test_interrupted_run_resumes_exactly(tiny_data, tmp_path, baseline, monkeypatch, fail_at, mode):
    """Stop after `fail_at` steps, rerun the same command: same later batches, same losses, same weights."""
    _, _, base_run = baseline
    if mode != "extrapolate":  # a reference of this mode, uninterrupted
        run_tiny(tiny_data, tmp_path, "ref", **{"model.position_mode": mode})
        base_run = tmp_path / "ref"
    monkeypatch.setenv("GL_RAY_FAIL_AT_STEP", str(fail_at))
    with pytest.raises(InjectedFault):
        run_tiny(tiny_data, tmp_path, "cut", **{"model.position_mode": mode})
    monkeypatch.delenv("GL_RAY_FAIL_AT_STEP")
    run_tiny(tiny_data, tmp_path, "cut", **{"model.position_mode": mode})
    got, want = metrics(tmp_path / "cut"), metrics(base_run)
    assert [m["step"] for m in got] == [m["step"] for m in want]  # no step lost or logged twice
    for a, b in zip(got, want):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6), a["step"]
    wa, wb = weights(tmp_path / "cut"), weights(base_run)
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


def test_masked_run_resumes_exactly(tiny_data, tmp_path, masked_baseline, monkeypatch):
    """Document masking keeps resume exact: a masked run cut mid-stage and rerun matches the uninterrupted one."""
    _, summary, base_run = masked_baseline
    monkeypatch.setenv("GL_RAY_FAIL_AT_STEP", "6")
    with pytest.raises(InjectedFault):
        run_tiny(tiny_data, tmp_path, "cut", **MASKED)
    monkeypatch.delenv("GL_RAY_FAIL_AT_STEP")
    run_tiny(tiny_data, tmp_path, "cut", **MASKED)
    got, want = metrics(tmp_path / "cut"), metrics(base_run)
    assert [m["step"] for m in got] == [m["step"] for m in want]
    for a, b in zip(got, want):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6), a["step"]
    wa, wb = weights(tmp_path / "cut"), weights(base_run)
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


def test_masking_changes_training_and_validation(baseline, masked_baseline, tiny_data):
    """Masking is not a no-op on this data (some rows do cross documents), and validation is masked too."""
    from gl_ray.data.stream import get_stream
    from gl_ray.model import build_model
    from gl_ray.train.io import WorkerIO
    from gl_ray.train.validation import Evaluator

    train, val = get_stream(tiny_data, "train"), get_stream(tiny_data, "val")
    eos = train.manifest.eos_token_id
    assert (train.read(0, 16384).reshape(-1, 64) == eos).any(axis=1).sum() >= 1  # rows holding a boundary
    _, plain, _ = baseline
    _, masked, _ = masked_baseline
    assert masked["final_val_loss_final_len"] != pytest.approx(plain["final_val_loss_final_len"], abs=1e-6)
    assert masked["flops"] < plain["flops"]  # only the pairs inside documents are counted
    assert (val.read(0, 16384) == eos).sum() >= 1
    model = build_model("tiny", train.manifest.vocab_size, 128)
    cpu, amp = torch.device("cpu"), torch.no_grad
    loss_plain = Evaluator(val, 16384, 4096).loss(model, 64, WorkerIO(), cpu, amp)
    loss_masked = Evaluator(val, 16384, 4096, eos_id=eos).loss(model, 64, WorkerIO(), cpu, amp)
    assert loss_masked != pytest.approx(loss_plain, abs=1e-6)


def test_masked_compiled_run_compiles_once_per_stage_length(tiny_data, tmp_path, masked_baseline, monkeypatch):
    """With document masking the masks change every step but not their shapes: one graph per stage length."""
    import torch._dynamo
    from torch._dynamo.testing import CompileCounterWithBackend

    from gl_ray.train import compiling

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    monkeypatch.setattr(compiling, "BACKEND", counter)
    run_tiny(tiny_data, tmp_path, "masked-compiled", **MASKED, **{"train.compile": True})
    assert counter.frame_count == 2  # stages 32 and 64; 16 steps with changing masks add no recompile
    got, want = metrics(tmp_path / "masked-compiled"), metrics(masked_baseline[2])
    for a, b in zip(got, want):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-4)


def test_position_modes_give_the_model_their_position_ids(tiny_data, tmp_path, monkeypatch):
    """model.position_mode reaches the model: in the L=32 stage (final length 64) extrapolate passes no ids (the
    model counts 0..31), interpolate 0, 2, ..., 62, and pose 0..cut-1 then a jump of up to 32, within 0..63; the
    L=64 stage and validation see ordinary positions in every mode."""
    from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXModel

    real_forward, seen = GPTNeoXModel.forward, []

    def spy(self, *args, **kw):  # the transformer under the LM head: what every loss and logit goes through
        input_ids = args[0] if args else kw["input_ids"]
        seen.append((self.training, input_ids.shape[1], kw.get("position_ids")))
        return real_forward(self, *args, **kw)

    monkeypatch.setattr(GPTNeoXModel, "forward", spy)
    short = {}  # mode -> position ids of the training forwards at L=32
    for mode in ("extrapolate", "interpolate", "pose"):
        seen.clear()
        _, summary = run_tiny(tiny_data, tmp_path, f"pm-{mode}", **{"model.position_mode": mode,
                                                                      "schedule.budget_tokens": 4096})
        assert math.isfinite(summary["final_val_loss_final_len"])
        train = [(L, pos) for training, L, pos in seen if training]
        assert [L for L, _ in train] == [32] * 4 + [64] * 4  # 2 steps per stage, 2 micro batches of 16 rows each
        assert all(pos is None for L, pos in train if L == 64)  # the final length: ordinary positions
        assert all(pos is None for training, _, pos in seen if not training)  # validation too
        short[mode] = [pos for L, pos in train if L == 32]
    assert all(pos is None for pos in short["extrapolate"])
    stretched = torch.arange(0, 64, 2).expand(16, 32)
    assert all(torch.equal(pos, stretched) for pos in short["interpolate"])
    pose = torch.cat(short["pose"])  # [64 rows, 32]
    steps = pose[:, 1:] - pose[:, :-1]
    assert (pose[:, 0] == 0).all() and (pose <= 63).all()
    assert ((steps == 1).sum(dim=1) >= 30).all()  # one jump at most per row; every other step is +1
    assert (steps >= 1).all() and (steps <= 33).all()  # the jump skips 0..32 positions
    assert (pose[:, -1] > 31).any() and len({tuple(r) for r in pose.tolist()}) > 1  # drawn, not fixed


def test_time_budget_mode_switches_stages(tiny_data, tmp_path):
    _, summary = run_tiny(tiny_data, tmp_path, "timed", **{"schedule.budget_time_s": 4, "schedule.budget_tokens": 0})
    ms = metrics(tmp_path / "timed")  # one line per step (log_every_steps=1)
    assert [m["stage"] for m in ms] == sorted(m["stage"] for m in ms)  # stages in order
    # stops at the first step that ends past the budget, unless the data ran out first
    assert all(m["elapsed_s"] < 4 for m in ms[:-1])
    last = json.loads((tmp_path / "timed" / "plan.json").read_text())["stages"][-1]
    last_stage_steps = sum(m["stage"] == last["index"] for m in ms)
    assert ms[-1]["elapsed_s"] >= 4 or last_stage_steps == last["steps"]
    assert summary["steps"] == ms[-1]["step"]


def test_resuming_with_a_different_plan_is_refused(baseline, tiny_data):
    _, _, run = baseline
    with pytest.raises(UserError, match="was started with the stage plan; this config has another plan"):
        run_tiny(tiny_data, run.parent, "base", **{"schedule.lengths": "[64]", "schedule.ratios": "[1.0]"})


def test_bad_training_input(tiny_data, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UserError, match="no permission|storage error|not a directory|exists"):
        run_tiny(tiny_data, blocker, "x")
    with pytest.raises(UserError, match="manifest.json missing"):
        run_tiny(str(tmp_path / "nodata"), tmp_path, "x")
    from gl_ray.data.stream import get_stream

    big = (get_stream(tiny_data, "val").tokens // 8 + 1) * 8  # one row longer than the whole val split
    with pytest.raises(UserError, match="fewer than one row"):
        run_tiny(tiny_data, tmp_path, "x", **{"schedule.lengths": f"[{big}]", "schedule.ratios": "[1]",
                                               "model.max_position_embeddings": big, "schedule.tokens_per_step": big,
                                               "schedule.budget_tokens": big, "train.micro_batch_tokens": big})
    assert not (tmp_path / "x").exists()  # nothing half-written


def test_cli_train_bad_input_exits_2(tmp_path):
    r = subprocess.run([sys.executable, "-m", "gl_ray", "train", "--config",
                        "pipelines/configs/tiny-growlength.yaml", "--set", f"data.path={tmp_path}/none", "--no-ray"],
                       capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


def test_compiled_training_matches_eager(baseline, tiny_data, tmp_path, monkeypatch):
    """train.compile runs the loop through torch.compile: here with its aot_eager backend (the same graph capture
    and compiled autograd as inductor, without minutes of C++ codegen on CPU). Losses match eager, and checkpoints
    and the export hold the plain module's keys, so a compiled run resumes and loads like any other."""
    from gl_ray.train import compiling

    real_compile, calls = torch.compile, []

    def spy(model, **kw):
        calls.append(kw)
        return real_compile(model, **kw)

    monkeypatch.setattr(torch, "compile", spy)
    monkeypatch.setattr(compiling, "BACKEND", "aot_eager")
    _, _, base = baseline
    run_tiny(tiny_data, tmp_path, "compiled", **{"train.compile": True})
    assert calls == [{"backend": "aot_eager", "dynamic": False}]  # one compiled module; a static graph per length
    got, want = metrics(tmp_path / "compiled"), metrics(base)
    assert [m["step"] for m in got] == [m["step"] for m in want]
    for a, b in zip(got, want):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-4)
    ckpt = load_file(tmp_path / "compiled" / "checkpoint_step-0000016" / "model.safetensors")
    assert ckpt.keys() == load_file(base / "checkpoint_step-0000016" / "model.safetensors").keys()
    wa, wb = weights(tmp_path / "compiled"), weights(base)
    assert wa.keys() == wb.keys() and all(torch.allclose(wa[k], wb[k], atol=1e-4) for k in wa)


@pytest.mark.parametrize("mode", [{}, {"model.position_mode": "pose", "data.document_masking": True},
                                  {"model.position_mode": "interpolate"},
                                  {"schedule.mode": "window", "data.document_masking": True}],
                         ids=["extrapolate", "pose-masked", "interpolate", "window-masked"])
def test_steps_that_do_not_log_read_nothing_back_from_the_device(tiny_data, tmp_path, monkeypatch, mode):
    """The hot path keeps losses and FLOPs on the device and builds positions and masks from the host rows: the
    number of tensor reads to the host (item, float, bool, int, tolist) of a run does not grow with its steps,
    only with its reports (here: the stage ends), in every position mode, with and without document masking, in
    reshape and window mode (sdpa; flex and flash attention run on CUDA only). Not counted: AdamW's reads of its
    CPU step counters, which exist only on CPU (on GPU it is fused, counters on the device)."""
    from benchmarks.sync_check import HostReads

    counts = []
    for budget in (16384, 32768):  # 16 and 32 steps, two stage ends each
        with HostReads() as reads:
            run_tiny(tiny_data, tmp_path, f"quiet-{budget}", **{
                "schedule.budget_tokens": budget, "train.log_every_steps": 1000, "train.eval_every_tokens": 0,
                "train.checkpoint_every_tokens": 0, **mode})
        counts.append(reads.count)
    assert counts[0] == counts[1] and counts[0] > 0


def test_workers_meet_only_at_report_steps_and_stage_ends(tiny_data, tmp_path, monkeypatch):
    """The stop vote (with time mode's clock vote and the preemption notice) is one host all-reduce held at report
    steps and at each stage's last step, not at every step."""
    from gl_ray.train.io import LocalIO

    calls = []
    real = LocalIO.all_reduce_host_sum
    monkeypatch.setattr(LocalIO, "all_reduce_host_sum", lambda self, values: calls.append(list(values)) or
                        real(self, values))
    _, summary = run_tiny(tiny_data, tmp_path, "meet", **{"train.log_every_steps": 3})
    # by hand: 16 steps in two stages of 8; reports every 3 steps (3, 6, 9, 12, 15), stage ends at 8 and 16
    assert summary["steps"] == 16 and len(calls) == 7
    assert calls[0] == [0.0, 0.0, 0.0, 0.0]  # no stop asked, not in time mode, no notice (nor its deadline)


def test_a_tilde_in_storage_and_data_paths_means_home(tiny_data, tmp_path, monkeypatch):
    """`~/runs` is the home folder's runs, not a literal `~` folder in the working directory."""
    import shutil

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_data, tmp_path / "ds")
    run_tiny("~/ds", "~/runs", "tilde", **{"schedule.budget_tokens": 2048})
    assert (tmp_path / "runs" / "tilde" / "summary.json").is_file() and not (tmp_path / "~").exists()
