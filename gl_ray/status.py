"""`gl-ray status RUN [--watch]`: where a run stands, from its folder alone (local or s3://), without Ray.

    gl-ray status runs/tiny-growlength            # one look
    gl-ray status s3://bucket/runs/x --watch 30   # again every 30 s while a trainer holds it (Ctrl-C stops)

It reads plan.json, metrics.jsonl, starts.jsonl, the checkpoint folders' state.json and summary.json: stage, tokens,
loss, validation loss at the final length, tokens/s, ETA, the current world size and nodes, the restarts and the
steps each one redid, the last checkpoint and whether the run has finished.
"""

from __future__ import annotations

import datetime
import time

from gl_ray import storage
from gl_ray.errors import UserError
from gl_ray.train.checkpoint import list_checkpoints
from gl_ray.lock import is_held
from gl_ray.train.outputs import read_metrics, read_starts

MAX_SHOWN_S = 1e12  # seconds: a longer time (or ETA) is shown as "?" (datetime.timedelta ends near 8.6e13)


def run_status(run_uri: str) -> dict:
    """The facts `gl-ray status` prints (UserError if run_uri is not a gl-ray run)."""
    plan_uri = storage.join(run_uri, "plan.json")
    if not storage.exists(plan_uri):
        raise UserError(f"{run_uri!r} is not a gl-ray run folder (no plan.json); give RUN = storage_path/name")
    plan = storage.read_json(plan_uri)
    lines = read_metrics(run_uri)  # a line being written, or garbage, is skipped
    last = lines[-1] if lines else {}
    val = next((m for m in reversed(lines) if "val_loss_final_len" in m), {})
    ckpts = list_checkpoints(run_uri)
    ckpt = None
    if ckpts:
        step, folder = ckpts[-1]
        ckpt = {"step": step, "folder": folder}
    summary_uri = storage.join(run_uri, "summary.json")
    summary = storage.read_json(summary_uri) if storage.exists(summary_uri) else None
    finished = summary is not None and summary.get("steps") == last.get("step")
    total = plan["total_tokens"]
    eta = None
    if not finished and last:
        if plan.get("budget_time_s"):
            eta = max(0.0, plan["budget_time_s"] - last["elapsed_s"])
        elif last.get("tokens_per_s"):
            eta = (total - last["tokens"]) / last["tokens_per_s"]
    updated = storage.modified(storage.join(run_uri, "metrics.jsonl"))
    starts = read_starts(run_uri)
    return {"run": run_uri, "finished": finished, "training": not finished and is_held(run_uri),
            "started": bool(lines), "step": last.get("step", 0),
            "budget_time_s": plan.get("budget_time_s"), "updated_s_ago": time.time() - updated if updated else None,
            "stage": last.get("stage"), "num_stages": len(plan["stages"]), "seq_len": last.get("seq_len"),
            "tokens": last.get("tokens", 0), "total_tokens": total, "loss": last.get("loss"),
            "source_tokens": last.get("source_tokens"),  # a mixture's tokens per source so far
            "val_loss_final_len": val.get("val_loss_final_len"), "val_step": val.get("step"),
            "tokens_per_s": last.get("tokens_per_s"), "elapsed_s": last.get("elapsed_s"), "eta_s": eta,
            "last_checkpoint": ckpt, "summary": summary, "restarts": max(0, len(starts) - 1),
            "world_size": starts[-1]["world_size"] if starts else None,
            "nodes": starts[-1]["distinct_nodes"] if starts else None,
            "steps_redone": [st["steps_redone"] for st in starts[1:]],
            "notices": [st for st in starts[1:] if "notice_step" in st]}


def format_status(s: dict) -> str:
    def dur(sec):  # "?" for an unknown time, or one too long to be one (an ETA at a rate near zero)
        return str(datetime.timedelta(seconds=int(sec))) if sec is not None and 0 <= sec < MAX_SHOWN_S else "?"

    if s["finished"]:
        state = "finished"
    elif s["training"]:
        state = f"training; last report {dur(s['updated_s_ago'])} ago" if s["started"] else "training; no report yet"
    elif s["started"]:
        state = f"not finished and stopped (no trainer holds it); last report {dur(s['updated_s_ago'])} ago: " \
                "rerun the same command to resume"
    else:
        state = "not started"
    out = [f"run {s['run']}: {state}"]
    if s["started"]:
        if s["budget_time_s"]:  # time mode: the clock is the budget, tokens only a cap
            pct = 100 * s["elapsed_s"] / s["budget_time_s"]
            done = f"{dur(s['elapsed_s'])} of {dur(s['budget_time_s'])} ({pct:.0f}%)"
        else:
            done = f"{100 * s['tokens'] / max(1, s['total_tokens']):.0f}% of {s['total_tokens']:,} tokens"
        out.append(f"  stage {s['stage'] + 1}/{s['num_stages']} (L={s['seq_len']}), step {s['step']}, "
                   f"{s['tokens']:,} tokens: {done}")
        val = (f", val loss at the final length {s['val_loss_final_len']:.4f} (step {s['val_step']})"
               if s["val_loss_final_len"] is not None else "")
        loss = "-" if s["loss"] is None else f"{s['loss']:.4f}"  # None: a window of skipped steps only
        rate = "?" if s["tokens_per_s"] is None else f"{s['tokens_per_s']:,.0f}"
        out.append(f"  loss {loss}{val}")
        out.append(f"  {rate} tokens/s, elapsed {dur(s['elapsed_s'])}"
                   + ("" if s["finished"] else f", ETA {dur(s['eta_s'])}"))
        if s.get("source_tokens"):
            total = max(1, sum(s["source_tokens"].values()))
            out.append("  tokens per source: " + ", ".join(f"{n} {t:,} ({100 * t / total:.0f}%)"
                                                          for n, t in s["source_tokens"].items()))
    if s["world_size"] is not None:
        redone = (f", steps redone per restart: {', '.join(map(str, s['steps_redone']))}" if s["restarts"] else "")
        out.append(f"  {s['world_size']} worker{'s' * (s['world_size'] != 1)} on {s['nodes']} "
                   f"node{'s' * (s['nodes'] != 1)}, {s['restarts']} restart{'s' * (s['restarts'] != 1)}{redone}")
        for st in s["notices"]:
            kept = "checkpointed there" if st["resumed_step"] >= st["notice_step"] else \
                f"too short to checkpoint, resumed from step {st['resumed_step']}"
            out.append(f"  restart {st['start'] - 1} followed a preemption notice at step {st['notice_step']}: {kept}")
    ck = s["last_checkpoint"]
    out.append(f"  last checkpoint: step {ck['step']} ({ck['folder']})" if ck else "  last checkpoint: none")
    if s["finished"]:
        sm = s["summary"]
        v = sm.get("final_val_loss_final_len")
        out.append(f"  final: {sm['tokens']:,} tokens in {sm['wall_s']:.1f} s, val loss at the final length "
                   f"{'-' if v is None else f'{v:.4f}'}; model in {storage.join(s['run'], 'final')}")
    return "\n".join(out)


def watch(run_uri: str, every_s: float, print_fn=print) -> dict:
    """Print the status every `every_s` seconds while a trainer holds the run; returns the last status (finished,
    or stopped: a run that no trainer holds will not move, so watching it would never end)."""
    while True:
        s = run_status(run_uri)
        print_fn(format_status(s), flush=True)
        if not s["training"] or every_s <= 0:
            return s
        time.sleep(every_s)
