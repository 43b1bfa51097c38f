"""eval, bench, report and the reproduction pipeline on tiny models and budgets."""

import json
import math
from pathlib import Path

import pytest
from conftest import metrics, tiny_overrides

from gl_ray.bench import bench_model, format_bench, peak_memory, run_bench
from gl_ray.sizes import parse_size
from gl_ray.data.stream import get_stream
from gl_ray.errors import UserError
from gl_ray.evaluate import evaluate_models
from gl_ray.report import build_report, time_to_loss
from gl_ray.reproduce import reproduce


@pytest.fixture(scope="module")
def repro(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("repro")
    extra = [o for o in tiny_overrides(tiny_data, "unused", "tiny") if not o.startswith(("ray.storage_path",
                                                                                         "schedule.budget"))]
    res = reproduce(base_config="pipelines/configs/tiny-growlength.yaml", data=tiny_data, out=str(out),
                    budget_tokens=8192,
                    ratios="0.5,0.5;0.75,0.25", workers=0, eval_lengths=[32, 64, 128], extra=extra)
    return out, res


def test_reproduce_runs_growlength_and_both_baselines(repro):
    out, res = repro
    names = [Path(r).name for r in res["runs"]]
    assert names == ["tiny-growlength-r0", "tiny-growlength-r1", "tiny-fixed32", "tiny-fixed64"]
    for r in res["runs"]:
        s = json.loads((Path(r) / "summary.json").read_text())
        assert s["tokens"] == 8192  # the same budget for every run
    r1 = json.loads((out / "runs" / "tiny-growlength-r1" / "plan.json").read_text())
    assert [s["steps"] for s in r1["stages"]] == [6, 2]  # the ablation's ratios took effect
    for png in ("loss_vs_time.png", "loss_vs_tokens.png", "val_loss_vs_time.png"):
        assert (out / "report" / png).stat().st_size > 10_000
    assert (out / "eval.png").stat().st_size > 10_000


def test_report_time_to_common_loss(repro):
    """The common loss is the best smoothed training loss every run reached (the worst of the runs' bests); each
    run's time to it is the elapsed_s of its first report whose trailing mean of `smooth` losses is at or below it.
    Recomputed here from the runs' metrics.jsonl."""
    out, res = repro
    rep = json.loads((out / "report" / "report.json").read_text())
    assert len(rep["runs"]) == 4
    k = rep["smooth_reports"]

    def trailing_means(ms):
        losses = [m["loss"] for m in ms]
        return [sum(losses[max(0, i - k + 1): i + 1]) / len(losses[max(0, i - k + 1): i + 1])
                for i in range(len(losses))]

    runs = {r["run"]: metrics(out / "runs" / r["run"]) for r in rep["runs"]}
    common = max(min(trailing_means(ms)) for ms in runs.values())
    assert rep["common_loss"] == pytest.approx(common, rel=1e-12)
    first_t = None
    for r in rep["runs"]:
        ms = runs[r["run"]]
        means = trailing_means(ms)
        hit = next(i for i, s in enumerate(means) if s <= common)  # every run reaches it, by its definition
        assert r["time_to_common_loss_s"] == ms[hit]["elapsed_s"] and r["tokens_to_common_loss"] == ms[hit]["tokens"]
        assert all(s > common for s in means[:hit])  # the first report at or below, not a later one
        assert r["final_loss"] == pytest.approx(means[-1], rel=1e-12)
        first_t = r["time_to_common_loss_s"] if first_t is None else first_t
        assert r["time_ratio_to_first"] == pytest.approx(r["time_to_common_loss_s"] / first_t)
        assert len(r["stages"]) in (1, 2)
    assert rep["runs"][0]["time_ratio_to_first"] == pytest.approx(1.0)
    md = (out / "report" / "report.md").read_text()
    assert "time to common loss" in md and "tiny-fixed64" in md


def test_report_leads_with_time_to_the_baselines_val_loss(repro):
    """The headline: when each run's val loss at the final length reaches the fixed-final-length run's."""
    out, _ = repro
    rep = json.loads((out / "report" / "report.json").read_text())
    assert rep["baseline"] == "tiny-fixed64"  # the one-length run at the longest final length
    base = next(r for r in rep["runs"] if r["run"] == "tiny-fixed64")
    assert rep["val_target"] == base["final_val_loss_final_len"]
    assert base["time_to_target_ratio"] == pytest.approx(1.0) and base["flops_to_target_ratio"] == pytest.approx(1.0)
    for r in rep["runs"]:
        assert r["flops"] > 0
        if r["time_to_target_s"] is not None:
            assert r["time_to_target_s"] <= r["wall_s"] + 1e-9 and r["flops_to_target"] <= r["flops"] * (1 + 1e-9)
    md = (out / "report" / "report.md").read_text()
    assert md.index("time to target") < md.index("time to common loss")  # leads with it
    assert (out / "report" / "loss_vs_flops.png").stat().st_size > 10_000


def test_val_crossing_interpolates_between_evaluations():
    from gl_ray.report import find_baseline, val_crossing

    ms = [{"elapsed_s": 0, "flops": 0, "tokens": 0, "seq_len": 64},
          {"elapsed_s": 10, "flops": 100, "tokens": 1000, "seq_len": 64, "val_loss_final_len": 5.0},
          {"elapsed_s": 15, "flops": 150, "tokens": 1500, "seq_len": 128},
          {"elapsed_s": 20, "flops": 200, "tokens": 2000, "seq_len": 128, "val_loss_final_len": 3.0}]
    assert val_crossing(ms, 4.0) == {"elapsed_s": 15.0, "flops": 150.0, "tokens": 1500.0}  # halfway
    assert val_crossing(ms, 5.5) == {"elapsed_s": 10, "flops": 100, "tokens": 1000}  # already at the first eval
    assert val_crossing(ms, 2.0) is None
    fixed = [dict(m, seq_len=128) for m in ms]
    assert find_baseline({"grow": ms, "fixed": fixed}) == "fixed"
    assert find_baseline({"grow": ms}) is None
    with pytest.raises(UserError, match="--baseline 'x'"):
        find_baseline({"grow": ms}, "x")


def test_time_to_loss_uses_smoothed_loss():
    ms = [{"loss": v, "elapsed_s": i, "tokens": 10 * i} for i, v in enumerate([5, 1, 5, 4, 3, 2])]
    assert time_to_loss(ms, 1.0, k=1) == (1, 10)
    assert time_to_loss(ms, 3.0, k=2) == (1, 10)  # (5+1)/2
    assert time_to_loss(ms, 2.6, k=3) is None


def test_eval_same_tokens_every_length(repro, tiny_data):
    out, res = repro
    ev = json.loads((out / "eval.json").read_text())
    assert ev["lengths"] == [32, 64, 128]
    for rows in ev["models"].values():
        for L in (32, 64, 128):
            r = rows[str(L)]
            assert r["windows"] * L == ev["tokens"]  # the same tokens at every length
            assert math.isfinite(r["loss"]) and r["ppl"] == pytest.approx(math.exp(r["loss"]))
        assert rows["128"]["beyond_trained"] and not rows["32"]["beyond_trained"]


def test_eval_bad_model(tmp_path, tiny_data):
    with pytest.raises(UserError, match="not a Hugging Face model folder"):
        evaluate_models([str(tmp_path)], tiny_data, [32])


def test_bench_tables(tmp_path):
    res = run_bench(model=bench_model(preset="tiny", vocab=512), lengths=[32, 64], tokens_per_step=2048,
                    micro_batch_tokens=1024, device="cpu", dtype="fp32", steps=2, warmup=1,
                    memory_micro_batch_seqs=32, memory_budget=0)
    rows = res["lengths"]
    assert [r["seq_len"] for r in rows] == [32, 64]
    for r in rows:
        assert r["step_time_s"] > 0 and r["tokens_per_s"] > 0 and r["flops_per_token"] > 0
        assert r["micro_batch_seqs"] * r["grad_accum"] * r["seq_len"] == 2048
        assert r["mfu"] is None  # no MFU on CPU
    assert rows[1]["flops_per_token"] > rows[0]["flops_per_token"]
    assert rows[1]["peak_memory_bytes"] >= rows[0]["peak_memory_bytes"] > 0  # grows with length


def test_bench_mfu_at_every_length_with_a_given_peak(monkeypatch):
    """--peak-tflops is honoured on any device, and every length divides by it (the memory peak once took its
    name, so lengths after the first divided TFLOP/s by bytes). Table 2's spawned children are left out here (a
    made-up peak of 1 byte is the kind of value that once took the name); test_bench_tables measures them."""
    from gl_ray import bench

    monkeypatch.setattr(bench, "peak_memory", lambda *a, **k: 1)
    res = run_bench(model=bench_model(preset="tiny", vocab=512), lengths=[32, 64, 128], tokens_per_step=2048,
                    micro_batch_tokens=1024, device="cpu", dtype="fp32", steps=1, warmup=0,
                    memory_micro_batch_seqs=1, memory_budget=0, peak_tflops=0.5)
    assert res["peak_tflops"] == 0.5
    for r in res["lengths"]:
        assert r["mfu"] == pytest.approx(r["achieved_tflops"] / 0.5)


@pytest.mark.parametrize("name, peak", [("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0),
                                        ("NVIDIA H100 NVL", 835.0), ("NVIDIA L40", 181.0), ("NVIDIA L40S", 362.0),
                                        ("NVIDIA L4", 121.0), ("NVIDIA A100-SXM4-80GB", 312.0),
                                        ("NVIDIA GeForce RTX 4090", None), ("NVIDIA A10G", None), ("cpu", None)])
def test_bench_peak_by_exact_device_name(name, peak):
    """The MFU peak is looked up by the exact device name (a name fragment once gave H100 PCIe and NVL the SXM
    figure and an L40 the L4's); an unknown name has none, and the table says to pass --peak-tflops."""
    from gl_ray.bench import peak_tflops_for

    assert peak_tflops_for(name) == peak
    row = {"seq_len": 32, "step_time_s": 1.0, "tokens_per_s": 1.0, "micro_batch_seqs": 1, "grad_accum": 1,
           "peak_memory_bytes": 1, "flops_per_token": 1e9, "achieved_tflops": 0.5, "mfu": 0.5 / peak if peak else None}
    table = format_bench({"device_name": name, "peak_tflops": peak, "lengths": [row]})
    assert ("pass --peak-tflops" in table) == (peak is None)
    assert table.splitlines()[2].endswith(f"| {100 * 0.5 / peak:.1f}% |" if peak else "| - |")


def test_bench_with_document_masking_and_activation_checkpointing(tiny_data, monkeypatch):
    """--document-masking takes rows with real documents (a prepared dataset's, or random ones of a mean length)
    and times them with the masks training builds; --activation-checkpointing builds the model as training does."""
    from gl_ray import bench

    kw = dict(lengths=[32, 128], tokens_per_step=1024, micro_batch_tokens=512, device="cpu", dtype="fp32", steps=1,
              warmup=0, memory_micro_batch_seqs=2, memory_budget=0)
    synthetic = bench_model(preset="tiny", vocab=512, document_masking=True, mean_doc_len=40)
    res = run_bench(model=synthetic, **kw)
    assert res["document_masking"] and res["mean_doc_len"] == 40
    assert 20 < res["lengths"][1]["mean_doc_tokens"] < 80  # documents of about the asked mean length
    masked_flops = res["lengths"][1]["flops_per_token"]
    dense = run_bench(model=bench_model(preset="tiny", vocab=512), **{**kw, "lengths": [128]})  # only 128 compared
    assert masked_flops < dense["lengths"][0]["flops_per_token"]
    real = bench_model(preset="tiny", document_masking=True, activation_checkpointing=True, data=tiny_data)
    assert real.vocab == get_stream(tiny_data, "train").manifest.vocab_size
    # Table 2 (a spawned child per length, most of this test's time) on this path is asserted by
    # tests/test_gpu_check.py (the same data, document masking and activation checkpointing, peaks > 0)
    monkeypatch.setattr(bench, "peak_memory", lambda *a, **k: 1)
    res = run_bench(model=real, **kw)
    assert res["activation_checkpointing"] and all(r["step_time_s"] > 0 for r in res["lengths"])
    assert res["lengths"][0]["cost_vs_first"] == 1.0 and res["lengths"][1]["cost_vs_first"] > 0
    assert "cost/token vs first" in format_bench(res)


def test_bench_compile_times_the_compiled_model_over_new_layouts(monkeypatch):
    """--compile: Table 1 times the model as train.compile runs it, and every timed step has rows of its own: with
    flash's document masks (stub kernels on CPU) the steps' different layouts keep one graph, as in training."""
    import numpy as np
    import torch
    from torch._dynamo.testing import CompileCounter

    from benchmarks.stub_kernels import stub_kernels
    from gl_ray import bench
    from gl_ray.train import compiling

    counter = CompileCounter()
    monkeypatch.setattr(compiling, "BACKEND", counter)
    model = bench.bench_model(preset="tiny", vocab=512, attention="flash_attention_2", document_masking=True,
                              mean_doc_len=8)
    assert len({tuple(np.flatnonzero(model.batch(32, 32, step=i) == 0)) for i in range(3)}) == 3
    with stub_kernels():
        row = bench.step_time(model=model, seq_len=32, tokens_per_step=1024, micro_batch_tokens=512,
                              device=torch.device("cpu"), dtype="fp32", steps=2, warmup=1, use_compile=True)
    assert counter.frame_count == 1 and row["step_time_s"] > 0 and row["grad_accum"] == 2


def test_bench_max_batch_never_reports_a_size_that_did_not_fit(monkeypatch):
    """The search logic, against a simulated device: memory grows with the batch and anything above the budget
    runs out of memory (peak None), as a CUDA OOM or an over-budget child process would report it."""
    from gl_ray import bench

    base, per_seq, budget = 500 << 20, 3 << 20, 600 << 20
    calls = []

    def fake_peak(model, seqs, seq_len, device, dtype, budget_=0):
        calls.append(seqs)
        peak = base + per_seq * seqs
        return None if peak > budget_ else peak

    monkeypatch.setattr(bench, "peak_memory", fake_peak)
    model = bench.bench_model(preset="tiny", vocab=512)
    seqs, probes = bench.max_micro_batch(model, 64, "cpu", "fp32", budget, limit_seqs=4096)
    assert seqs == (budget - base) // per_seq == 33
    fitted = {p["seqs"] for p in probes if p["fits"]}
    failed = {p["seqs"] for p in probes if not p["fits"]}
    assert seqs in fitted and all(f > seqs for f in failed) and seqs + 1 in failed
    assert len(calls) <= 2 * 12  # doubling then bisection, not a scan
    assert bench.max_micro_batch(model, 64, "cpu", "fp32", base)[0] == 0  # not even one sequence fits


def test_bench_real_peak_memory_on_cpu():
    import torch

    model, cpu = bench_model(preset="tiny", vocab=512), torch.device("cpu")
    one = peak_memory(model, 1, 64, cpu, "fp32")  # a spawned child's peak RSS: Python and torch, some 100s of MiB
    assert one is not None and one > 64 << 20
    # budgets either side of the measured peak, with room for run-to-run noise of a few MiB: the same try is
    # refused under half of it and accepted (with its own peak) at twice it
    assert peak_memory(model, 1, 64, cpu, "fp32", budget=one // 2) is None
    fitted = peak_memory(model, 1, 64, cpu, "fp32", budget=2 * one)
    assert fitted is not None and fitted == pytest.approx(one, rel=0.25)


def test_cpu_peak_memory_is_the_childs_own():
    """Table 2 on CPU measures the child's own high-water mark: a spawned child's ru_maxrss would start at the RSS
    of the parent it was forked from, so a large parent made every length look the same."""
    import torch

    from gl_ray.bench import peak_rss_bytes

    held = torch.ones(512 * 2**20 // 4)  # the parent holds 512 MiB more than any tiny child needs
    parent = peak_rss_bytes()
    child = peak_memory(bench_model(preset="tiny", vocab=512), 1, 64, torch.device("cpu"), "fp32")
    assert child is not None and child < parent - (256 << 20)
    del held


def test_bench_bad_input():
    kw = dict(tokens_per_step=1024, micro_batch_tokens=1024, device="cpu", dtype="fp32", steps=1, warmup=0,
              memory_micro_batch_seqs=1, memory_budget=0)
    with pytest.raises(UserError, match="each must divide"):
        run_bench(model=bench_model(preset="tiny"), lengths=[48], **kw)
    with pytest.raises(UserError, match="unknown"):
        bench_model(preset="gpt9")
    with pytest.raises(UserError, match="needs document boundaries"):
        bench_model(preset="tiny", document_masking=True)
    with pytest.raises(UserError, match="not one of"):
        bench_model(preset="tiny", attention="xformers")
    assert parse_size("2GiB") == 2 << 30 and parse_size("1e6") == 10**6
    with pytest.raises(UserError):
        parse_size("lots")


def test_report_bad_run(tmp_path):
    with pytest.raises(UserError, match="no metrics"):
        build_report([str(tmp_path)], str(tmp_path / "out"))


def test_seeds_make_arms_with_mean_and_spread(tiny_data, tmp_path):
    """--seeds: each arm runs with train.seed/data.seed + k; the report groups them with mean and spread."""
    from gl_ray.config import load_config
    from gl_ray.report import arm_stats
    from gl_ray.reproduce import run_variants

    variants = run_variants("pipelines/configs/tiny-growlength.yaml", [f"data.path={tiny_data}"], [], seeds=2)
    cfgs = [load_config("pipelines/configs/tiny-growlength.yaml", v) for v in variants]
    assert [c.name for c in cfgs] == ["tiny-growlength-growlength-s0", "tiny-growlength-growlength-s1",
                                      "tiny-growlength-fixed64-s0", "tiny-growlength-fixed64-s1",
                                      "tiny-growlength-fixed512-s0", "tiny-growlength-fixed512-s1"]
    assert [(c.train.seed, c.data.seed) for c in cfgs[:2]] == [(0, 0), (1, 1)]
    assert cfgs[2].schedule.lengths == [64] and cfgs[4].schedule.lengths == [512]

    def row(run, t):
        return {"run": run, "final_val_loss_final_len": 5.0, "time_to_target_s": t, "flops_to_target": t,
                "time_to_target_ratio": t, "flops_to_target_ratio": t}

    arms = {a["arm"]: a for a in arm_stats([row("g-s0", 4.0), row("g-s1", 6.0), row("f-s0", 9.0),
                                             row("f-s1", 11.0), row("h-s0", 10.0), row("h-s1", None)], "f")}
    assert arms["g"]["n"] == 2 and arms["g"]["time_to_target_s"] == {"mean": 5.0, "min": 4.0, "max": 6.0, "n": 2}
    assert arms["g"]["inside_spread"] is False and arms["h"]["inside_spread"] is True
    assert arms["f"]["inside_spread"] is None  # the baseline itself
    with pytest.raises(UserError, match="--seeds 0"):
        run_variants("pipelines/configs/tiny-growlength.yaml", [f"data.path={tiny_data}"], [], seeds=0)


def test_window_mode_trains_full_rows_with_a_growing_window(tiny_data, tmp_path):
    """schedule.mode window: every step reads 64-token rows, stage 0 attends 32 back and counts fewer attention
    FLOPs per token than the full-attention stage; reproduce --modes names the arm; the report never takes it
    for the fixed-length baseline."""
    from gl_ray.config import load_config
    from gl_ray.reproduce import run_variants
    from gl_ray.train.driver import launch_run

    cfg = load_config(None, tiny_overrides(tiny_data, str(tmp_path), "win", **{"schedule.mode": "window"}))
    summary = launch_run(cfg, quiet=True)
    plan = json.loads((tmp_path / "win" / "plan.json").read_text())
    assert [(s["seq_len"], s["window"]) for s in plan["stages"]] == [(64, 32), (64, 0)]
    ms = metrics(tmp_path / "win")
    assert {m["seq_len"] for m in ms} == {64} and [m["window"] for m in ms][:: len(ms) - 1] == [32, 64]
    st = summary["stages"]
    assert st[0]["window"] == 32 and st[0]["flops"] / st[0]["tokens"] < st[1]["flops"] / st[1]["tokens"]
    assert (tmp_path / "win" / "final" / "model.safetensors").exists()
    from gl_ray.report import find_baseline

    assert find_baseline({"win": ms, "fixed": [{"seq_len": 64}]}) == "fixed"
    variants = run_variants("pipelines/configs/tiny-growlength.yaml", [f"data.path={tiny_data}"], [],
                            modes=("reshape", "window"))
    names = [next(o[5:] for o in v if o.startswith("name=")) for v in variants]
    assert names == ["tiny-growlength-growlength", "tiny-growlength-growlength-window", "tiny-growlength-fixed64",
                     "tiny-growlength-fixed512"]


def test_reproduce_evals_context_use_and_reports_it(repro):
    """reproduce runs the context-use metrics on every final model and the report carries their headlines."""
    out, res = repro
    ev = json.loads((out / "eval.json").read_text())
    assert set(ev["context"]["models"]) == set(ev["models"])
    for name in ("eval_position.png", "eval_recall.png", "eval_passkey.png", "eval_copy.png"):
        assert (out / name).stat().st_size > 5_000
    rep = json.loads((out / "report" / "report.json").read_text())
    assert rep["eval_length"] == 64  # the final training length
    assert all(r["passkey_acc"] is not None and r["copy_score"] is not None for r in rep["runs"])
    assert "## Context use (eval at length 64)" in (out / "report" / "report.md").read_text()
