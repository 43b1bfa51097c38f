"""What a run leaves in RUN = {ray.storage_path}/{name}, besides its checkpoints.

    config.yaml     resolved config of the first start (no secrets: the config holds none; credentials come from
                    the environment); fingerprint.json and config_history.jsonl: see gl_ray.train.identity
    plan.json       the stage plan and per-stage data accounting; attention: {asked, runs, why}, the backend the
                    workers run (masked rows on CUDA: flex, not sdpa; gl_ray.attention.attention_route)
    metrics.jsonl   one JSON object per report: step, stage, seq_len, tokens, loss, lr, tokens_per_s,
                    data_wait_frac, micro_batch (sequences per forward pass), elapsed_s, flops (cumulative
                    training FLOPs, all workers, PaLM's accounting), world_size (workers that trained the window)
                    (+ bucket_lens with data.packing=decompose: each step's bucket length)
                    (+ source_tokens with data.sources: {source name: tokens trained from it so far})
                    (+ val_loss, val_loss_final_len when evaluated); each step once, even across resumes
    .gl-ray.shared  a local run folder's token from the Ray driver, read back by every worker (gl_ray.train.ray_train)
    starts.jsonl    one line per start of the workers, the first and every restart: start, time, resumed_step,
                    world_size, nodes (each rank's node id), distinct_nodes, steps_redone (reported steps dropped
                    by this restart, trained again), and after a preemption notice notice_step (the step the
                    workers checkpointed at when the notice came; a restart from an earlier step means the
                    notice was too short); between them one line per notice: notice, time, step, deadline
    summary.json    tokens, steps, wall_s, flops, final_val_loss, final_val_loss_final_len,
                    stages: [{seq_len, tokens, steps, wall_s, tokens_per_s, flops, loss, micro_batch}]
                    (+ buckets with data.packing=decompose: trained_tokens per bucket, left_out_tokens/chunks)
                    (+ source_tokens with data.sources: {name: tokens}, in total and in each stage)
    final/          Hugging Face folder: config.json, model.safetensors, tokenizer files
    trackers.json   with train.loggers: tracker run ids and the last step logged (gl_ray.train.tracking), beside
                    tensorboard/, mlflow.db + mlartifacts/ (MLflow's default local store) and wandb/
"""

from __future__ import annotations

import datetime
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

from gl_ray import storage
from gl_ray.data.mixture import mixture_for
from gl_ray.plots import plot_curves
from gl_ray.schedule import Plan
from gl_ray.train.checkpoint import TrainState
from gl_ray.train.io import RunHooks


def finite(obj):
    """obj with every NaN or infinite float replaced by None, so that it is valid JSON (json.dumps writes NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


class MetricsLog:
    """RUN/metrics.jsonl. On (re)start, lines past the resumed step are dropped, so a step is never logged
    twice. Local files are appended; S3 objects are rewritten whole (S3 has no append)."""

    def __init__(self, run_uri: str, resume_step: int):
        self.uri = storage.join(run_uri, "metrics.jsonl")
        good, bad = parse_metrics(storage.read_bytes(self.uri)) if storage.exists(self.uri) else ([], [])
        self.lines: list[str] = [line for line, m in good if m["step"] <= resume_step]
        self.dropped_steps = len(good) - len(self.lines)  # reported before a failure, done again from here
        warn_bad_lines(self.uri, bad, "dropping")
        storage.write_bytes(self.uri, "".join(f"{ln}\n" for ln in self.lines).encode())

    def append(self, metrics: dict) -> None:
        line = json.dumps(finite(metrics), allow_nan=False)
        self.lines.append(line)
        if storage.is_s3(self.uri):
            storage.write_bytes(self.uri, "".join(f"{ln}\n" for ln in self.lines).encode())
        else:
            with storage.errors_at(self.uri), open(self.uri, "a") as f:  # a full disk: one line, exit 2
                f.write(line + "\n")


REPORT_KEYS = ("step", "stage", "seq_len", "tokens", "elapsed_s")  # numbers every report line has
MAX_COUNT = 1 << 63  # int fields: steps, tokens, lengths, workers
MAX_SECONDS = 1e10  # time fields (~300 years): above, datetime.timedelta overflows where status prints them
MAX_AMOUNT = 1e30  # other numbers (FLOPs, rates, losses): squares and sums of them stay finite in report's tests
# Each field a reader uses (status, report, the resume, the summary, plots): its kind and least value. "count": an
# int; "amount": a finite number; "loss": a finite number or null (NaN read as null: a window of skipped steps has
# no loss, gl_ray.train.loop.Meter.read); "lengths": a list of ints; "counts": a mapping of names to ints. A field
# may be missing (runs written before it existed); any other field must be a JSON scalar (nothing nested).
REPORT_FIELDS = {
    "step": ("count", 0), "stage": ("count", 0), "seq_len": ("count", 1), "tokens": ("count", 0),
    "micro_batch": ("count", 1), "world_size": ("count", 1), "skipped_steps": ("count", 0),
    "total_tokens": ("count", 0), "num_stages": ("count", 1), "window": ("count", 1),
    "elapsed_s": ("seconds", 0), "budget_time_s": ("seconds", 0), "checkpoint_block_s": ("seconds", 0),
    "tokens_per_s": ("amount", 0), "data_wait_frac": ("amount", 0), "flops": ("amount", 0), "lr": ("amount", 0),
    "loss": ("loss", 0), "grad_norm": ("loss", 0), "val_loss": ("loss", 0), "val_loss_final_len": ("loss", 0),
    "bucket_lens": ("lengths", 1), "source_tokens": ("counts", 0),
}


def _number_ok(v, kind: str, least: float) -> bool:
    """Whether v is a value of the kind, at least `least` (and below the kind's bound)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    if kind == "count":
        return isinstance(v, int) and least <= v < MAX_COUNT
    return math.isfinite(v) and least <= v <= (MAX_SECONDS if kind == "seconds" else MAX_AMOUNT)


def check_report(rec) -> dict | None:
    """rec (a parsed metrics.jsonl line) as a report, NaN losses as None; None if it is not one: REPORT_KEYS
    missing, or a field of REPORT_FIELDS of the wrong type or out of range, or another field that is nested."""
    if not isinstance(rec, dict) or any(k not in rec for k in REPORT_KEYS):
        return None
    out = {}
    for key, v in rec.items():
        kind, least = REPORT_FIELDS.get(key, ("scalar", 0))
        if kind == "loss" and (v is None or isinstance(v, float) and math.isnan(v)):
            v = None
        elif kind == "lengths":
            if not isinstance(v, list) or not all(_number_ok(x, "count", least) for x in v):
                return None
        elif kind == "counts":
            if not isinstance(v, dict) or not all(isinstance(k, str) and _number_ok(x, "count", least)
                                                  for k, x in v.items()):
                return None
        elif kind == "scalar":
            if v is not None and not isinstance(v, (str, int, float)):  # bool is an int
                return None
        elif not _number_ok(v, "amount" if kind == "loss" else kind, least):
            return None
        out[key] = v
    return out


def parse_metrics(raw: bytes) -> tuple[list[tuple[str, dict]], list[str]]:
    """The reports of a metrics.jsonl as (line, record) pairs, and its other non-empty lines: torn by a writer
    that died mid-line, garbage, not UTF-8, nested too deep to parse, or JSON that is not a report (check_report:
    every field a reader uses checked for type and range). The one rule for every reader: the resume (which drops
    them), status and report (which skip them), each with a warning (warn_bad_lines)."""
    good, bad = [], []
    for line in raw.decode("utf-8", errors="replace").splitlines():
        try:
            rec = check_report(json.loads(line))
        except (ValueError, RecursionError):  # JSONDecodeError, numbers too large to read, nesting too deep
            rec = None
        if rec is not None:
            good.append((line, rec))
        elif line.strip():
            bad.append(line)
    return good, bad


WARN_LINES = 10  # bad lines named one by one; the rest are counted


def warn_bad_lines(uri: str, bad: list[str], verb: str = "skipping", file=None) -> None:
    """One line per bad line of a metrics.jsonl (the first WARN_LINES of them, then a count): the resume's
    "dropping" on stdout, the other readers' "skipping" on stderr (stdout is the command's output)."""
    file = file or (sys.stdout if verb == "dropping" else sys.stderr)
    for line in bad[:WARN_LINES]:
        print(f"gl-ray: {verb} a line of {uri} that is not a report (torn by a writer that died, or garbage): "
              f"{line[:60]!r}", file=file, flush=True)
    if len(bad) > WARN_LINES:
        print(f"gl-ray: {verb} {len(bad) - WARN_LINES} more such lines of {uri}", file=file, flush=True)


def read_metrics(run_uri: str) -> list[dict]:
    """The reports of RUN/metrics.jsonl (none if it does not exist), bad lines skipped with a warning on stderr
    (see parse_metrics)."""
    uri = storage.join(run_uri, "metrics.jsonl")
    if not storage.exists(uri):
        return []
    good, bad = parse_metrics(storage.read_bytes(uri))
    warn_bad_lines(uri, bad)
    return [m for _, m in good]


STARTS = "starts.jsonl"


def record_start(run_uri: str, resume_step: int, nodes: list[str], steps_redone: int) -> dict:
    """One line per start of the run's workers at the end of RUN/starts.jsonl: the first start and every restart
    (a resume, or Ray Train's restart after a worker or node was lost), with the world size, each rank's node and
    the reported steps the restart does again. Local files are appended; S3 objects are rewritten whole."""
    uri = storage.join(run_uri, STARTS)
    old = storage.read_bytes(uri) if storage.exists(uri) else b""
    rec = {"start": len(parse_starts(old)) + 1, "time": _now(),
           "resumed_step": resume_step, "world_size": len(nodes), "nodes": nodes, "distinct_nodes": len(set(nodes)),
           "steps_redone": steps_redone}
    records = _records(old)
    if records and "notice" in records[-1]:  # the workers before this start were told their node would go
        rec["notice_step"] = records[-1]["step"]
    _append(uri, old, rec)
    return rec


def record_notice(run_uri: str, step: int, deadline_s: float) -> dict:
    """A line in RUN/starts.jsonl when the workers get a preemption notice: they checkpoint at `step` and wait
    for the node to go (deadline_s: when, Unix seconds; 0 if the notice gave none)."""
    uri = storage.join(run_uri, STARTS)
    old = storage.read_bytes(uri) if storage.exists(uri) else b""
    rec = {"notice": sum("notice" in r for r in _records(old)) + 1, "time": _now(), "step": step,
           "deadline": datetime.datetime.fromtimestamp(deadline_s, datetime.timezone.utc).isoformat(
               timespec="seconds") if deadline_s else None}
    _append(uri, old, rec)
    return rec


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _append(uri: str, old: bytes, rec: dict) -> None:
    """One JSON line after `old` (the file's bytes): local files are appended, S3 objects rewritten whole."""
    line = ("\n" if old and not old.endswith(b"\n") else "") + json.dumps(rec) + "\n"  # after a torn line: its own
    if storage.is_s3(uri):
        storage.write_bytes(uri, old + line.encode())
    else:
        with storage.errors_at(uri), open(uri, "a") as f:
            f.write(line)


def read_starts(run_uri: str) -> list[dict]:
    """RUN/starts.jsonl's records (none before the first start); a torn last line is skipped."""
    uri = storage.join(run_uri, STARTS)
    return parse_starts(storage.read_bytes(uri)) if storage.exists(uri) else []


def parse_starts(raw: bytes) -> list[dict]:
    """The start records of a starts.jsonl's bytes; a torn or foreign line is skipped."""
    return [r for r in _records(raw) if "start" in r]


START_COUNTS = {"start": ("resumed_step", "world_size", "distinct_nodes", "steps_redone"), "notice": ("step",)}


def _records(raw: bytes) -> list[dict]:
    """Start and notice records, in file order: a line whose counts (START_COUNTS, and notice_step) are not
    non-negative ints, or that is torn or nested too deep to parse, is skipped."""
    out = []
    for line in raw.decode("utf-8", errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except (ValueError, RecursionError):
            continue
        kind = next((k for k in START_COUNTS if isinstance(rec, dict) and k in rec), None)
        counts = [kind, *START_COUNTS[kind], *(["notice_step"] if "notice_step" in rec else [])] if kind else []
        if counts and all(_number_ok(rec.get(k), "count", 0) for k in counts):
            out.append(rec)
    return out


def progress_line(m: dict) -> str:
    """stage i/n, L, tokens done/total, loss, tokens/s, ETA."""
    total, done, rate = m.get("total_tokens", 0), m["tokens"], m["tokens_per_s"]
    if m.get("budget_time_s"):  # time mode: the clock decides, tokens are only a cap
        eta = datetime.timedelta(seconds=max(0, int(m["budget_time_s"] - m["elapsed_s"])))
    else:
        eta = datetime.timedelta(seconds=int((total - done) / rate)) if total and rate > 0 else "?"
    val = f" val {m['val_loss']:.3f}/{m['val_loss_final_len']:.3f}@Lmax" if "val_loss" in m else ""
    return (f"[gl-ray] stage {m['stage'] + 1}/{m.get('num_stages', '?')} L={m['seq_len']} "
            f"tokens {done:,}/{total:,} ({100 * done / max(1, total):.0f}%) loss {m['loss']:.4f}{val} "
            f"lr {m['lr']:.2e} {rate:,.0f} tok/s wait {100 * m['data_wait_frac']:.1f}% ETA {eta}")


def export_final(run_uri: str, model: torch.nn.Module, weights: dict, tokenizer_uri: str) -> str:
    """Save RUN/final/ as a plain HF folder (model config, `weights`, the dataset's tokenizer), whether or not the
    model was sharded."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    final = storage.join(run_uri, "final")
    with torch.device("meta"):  # a plain (not sharded, not wrapped) model of the same config, holding `weights`
        plain = AutoModelForCausalLM.from_config(model.config)
    plain.load_state_dict(weights, assign=True)
    with tempfile.TemporaryDirectory() as tmp:
        plain.save_pretrained(tmp, safe_serialization=True)
        for name in storage.list_dir(tokenizer_uri):
            (Path(tmp) / name).write_bytes(storage.read_bytes(storage.join(tokenizer_uri, name)))
        storage.delete_dir(final)
        for p in sorted(Path(tmp).iterdir()):
            storage.write_bytes(storage.join(final, p.name), p.read_bytes())
    return final


def run_artifacts(run_uri: str, metrics: list[dict], folder: str) -> dict[str, str]:
    """What trackers upload at the end of a run, as local files in `folder`: summary.json, plan.json and the run's
    curves (training loss vs time, tokens and FLOPs; validation loss at the final length vs time)."""
    out = {}
    for name in ("summary.json", "plan.json"):
        uri = storage.join(run_uri, name)
        if storage.exists(uri):
            out[name] = str(Path(folder, name))
            Path(out[name]).write_bytes(storage.read_bytes(uri))
    return out | plot_curves({Path(run_uri.rstrip("/")).name: metrics}, folder)


def build_summary(plan: Plan, state: TrainState, metrics: list[dict], final_val: dict) -> dict:
    stages = []
    for st in plan.stages:
        ms = [m for m in metrics if m["stage"] == st.index]
        steps = _stage_delta(metrics, st.index, "step")  # every stage end is logged
        wall = state.stage_wall_s[st.index] if st.index < len(state.stage_wall_s) else 0.0
        tokens = steps * plan.tokens_per_step
        stages.append({"seq_len": st.seq_len, "tokens": tokens, "steps": steps, "wall_s": round(wall, 3),
                       "tokens_per_s": tokens / wall if wall > 0 else 0.0,
                       "flops": _stage_delta(metrics, st.index, "flops"), "loss": ms[-1]["loss"] if ms else None,
                       "micro_batch": ms[-1].get("micro_batch") if ms else None}
                      | ({"window": st.window or st.seq_len} if plan.window_mode else {}))
    summary = {"tokens": state.tokens, "steps": state.step, "wall_s": round(state.elapsed_s, 3),
               "flops": state.flops,
               "tokens_skipped": state.skipped_batch_steps * plan.tokens_per_step,  # rewind's --skip-steps: tokens
               "final_val_loss": final_val.get("val_loss"),
               "final_val_loss_final_len": final_val.get("val_loss_final_len"), "stages": stages}
    if metrics and "source_tokens" in metrics[-1]:  # data.sources: from the reports (the last step and every
        # stage end are reported)
        summary["source_tokens"] = metrics[-1].get("source_tokens", {})
        for st, out in zip(plan.stages, stages):
            out["source_tokens"] = _stage_counts(metrics, st.index)
    return summary


def _stage_counts(metrics: list[dict], stage: int) -> dict[str, int]:
    """How much each count of `source_tokens` grew in a stage (as _stage_delta)."""
    def at_end(pick) -> dict:
        ms = [m for m in metrics if pick(m["stage"]) and "source_tokens" in m]
        return ms[-1]["source_tokens"] if ms else {}

    end, before = at_end(lambda k: k <= stage), at_end(lambda k: k < stage)
    return {name: n - before.get(name, 0) for name, n in end.items()}


def _stage_delta(metrics: list[dict], stage: int, key: str):
    """How much a cumulative metric (step, flops) grew in a stage: its value at the stage's last report minus its
    value at the last report before the stage (metrics written before `key` existed count as 0)."""
    ends: dict = {}
    for m in metrics:
        ends[m["stage"]] = max(ends.get(m["stage"], 0), m.get(key, 0))
    prev = max((v for k, v in ends.items() if k < stage), default=0)
    return ends.get(stage, prev) - prev


def format_summary(summary: dict) -> str:
    rows = [f"{'stage':>5} {'seq_len':>7} {'tokens':>13} {'steps':>7} {'wall_s':>8} {'tokens/s':>10} {'loss':>8}"]
    for i, s in enumerate(summary["stages"]):
        loss = f"{s['loss']:.4f}" if s.get("loss") is not None else "-"
        rows.append(f"{i:>5} {s['seq_len']:>7} {s['tokens']:>13,} {s['steps']:>7} {s['wall_s']:>8.1f} "
                    f"{s['tokens_per_s']:>10,.0f} {loss:>8}")
    v, vf = summary.get("final_val_loss"), summary.get("final_val_loss_final_len")
    rows.append(f"total: {summary['tokens']:,} tokens, {summary['steps']} steps, {summary['wall_s']:.1f} s; "
                f"val loss {v if v is None else round(v, 4)} (current L), {vf if vf is None else round(vf, 4)} "
                "(final L)")
    return "\n".join(rows)


def notice_line(step: int, deadline_s: float) -> str:
    left = f", {max(0.0, deadline_s - time.time()):.0f} s before its deadline" if deadline_s else ""
    return (f"preemption notice: checkpointed at step {step}{left}; waiting for Ray Train to restart the workers "
            "without that node")


def notice_too_short(start: dict) -> str:
    """The line of a restart whose preemption notice came too late to checkpoint at the step it was seen."""
    return (f"the preemption notice at step {start['notice_step']} was too short for its checkpoint; resumed from "
            f"step {start['resumed_step']} ({start['steps_redone']} reported steps trained again)")


class RunOutputs(RunHooks):
    """The run's own files, kept by rank 0: metrics.jsonl (trimmed to the resumed step), progress lines, and at
    the end final/ and summary.json. Other ranks do nothing."""

    def __init__(self, run_uri: str, plan: Plan, tokenizer_uri: str, rank: int, print_progress: bool, cfg=None):
        self.run_uri, self.plan, self.tokenizer_uri = run_uri, plan, tokenizer_uri
        self.rank, self.print_progress, self.cfg = rank, print_progress, cfg
        self.log: MetricsLog | None = None
        self.trackers = None
        self.mixture = mixture_for(cfg.data, plan) if cfg is not None else None  # data.sources: source_tokens
        self.stage_ends: dict[int, int] = {}  # with a mixture: the last step reported in each stage

    def on_restore(self, state: TrainState | None, nodes: list[str]) -> None:
        if self.rank == 0:
            self.log = MetricsLog(self.run_uri, resume_step=state.step if state else 0)
            for m in map(json.loads, self.log.lines):  # the lines kept: those up to the resumed step
                self.stage_ends[m["stage"]] = m["step"]
            rec = record_start(self.run_uri, state.step if state else 0, nodes, self.log.dropped_steps)
            if rec.get("notice_step", rec["resumed_step"]) > rec["resumed_step"]:
                print(notice_too_short(rec), flush=True)
            if self.cfg is not None and self.cfg.train.loggers:
                from gl_ray.train.tracking import Trackers

                self.trackers = Trackers(self.run_uri, self.cfg)

    def on_notice(self, step: int, deadline_s: float) -> None:
        if self.rank == 0:
            record_notice(self.run_uri, step, deadline_s)
            print(notice_line(step, deadline_s), flush=True)  # a Ray worker's line reaches the driver's console

    def on_report(self, metrics: dict) -> None:
        if self.rank != 0:
            return
        if self.mixture is not None:
            metrics["source_tokens"] = self.source_tokens(metrics["stage"], metrics["step"])
        self.log.append(metrics)
        if self.trackers is not None:
            self.trackers.log(metrics)
        if self.print_progress:
            print(progress_line(metrics), flush=True)

    def source_tokens(self, stage: int, step: int) -> dict[str, int]:
        """data.sources: tokens drawn from each source up to global step `step` (of stage `stage`), cumulative.
        A stage's steps are counted from the last step reported before it (every stage end is reported), so a
        time-mode stage cut short by the clock counts only the steps it took."""
        self.stage_ends[stage] = step
        steps, before = {}, 0
        for k in sorted(self.stage_ends):
            steps[k], before = self.stage_ends[k] - before, self.stage_ends[k]
        return dict(zip(self.mixture.names, self.mixture.drawn(steps)))

    def on_abort(self) -> None:
        if self.trackers is not None:
            self.trackers.abort()

    def on_finish(self, model: torch.nn.Module, weights: dict, state: TrainState, final_val: dict) -> None:
        if self.rank != 0:
            return
        export_final(self.run_uri, model, weights, self.tokenizer_uri)
        metrics = [json.loads(ln) for ln in self.log.lines]
        summary = build_summary(self.plan, state, metrics, final_val or (metrics[-1] if metrics else {}))
        if self.cfg is not None and self.cfg.data.packing == "decompose":  # tokens trained per bucket, left out
            from gl_ray.data.decompose import accounting, draws_for

            acc = accounting(draws_for(self.cfg.data, self.plan), self.cfg.data)
            trained: dict[str, int] = {}  # the steps taken (in time mode the plan's steps are an upper bound)
            for m in metrics:
                for length in m.get("bucket_lens", []):
                    trained[str(length)] = trained.get(str(length), 0) + self.plan.tokens_per_step
            summary["buckets"] = {"trained_tokens": dict(sorted(trained.items(), key=lambda kv: int(kv[0]))),
                                  "left_out_tokens": acc["left_out_tokens"], "left_out_chunks": acc["left_out_chunks"]}
        storage.write_bytes(storage.join(self.run_uri, "summary.json"),
                            json.dumps(finite(summary), indent=1, allow_nan=False).encode())
        if self.trackers is not None:
            with tempfile.TemporaryDirectory(prefix="gl-ray-artifacts-") as tmp:
                self.trackers.finish(summary, run_artifacts(self.run_uri, metrics, tmp))
