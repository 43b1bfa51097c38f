"""`gl-ray report RUN [RUN ...] --out DIR [--baseline RUN]`: compare runs from their metrics.jsonl (the paper's
Figures 1-3).

Writes DIR/loss_vs_time.png, DIR/loss_vs_tokens.png, DIR/loss_vs_flops.png, DIR/val_loss_vs_time.png, report.md
and report.json.

The headline, "time to the baseline's val loss": the baseline is the fixed-length run at the longest final
length (or --baseline); its last validation loss at the final length is the target; for every run, the wall
time, FLOPs and tokens at which its validation loss at the final length first reaches that target, linearly
interpolated between the two evaluations around the crossing (evaluations every train.eval_every_tokens), and
their ratios to the baseline's own. Secondary, "time to common loss": the best smoothed training loss that every
run reached (the worst of the runs' best) and when each run first reached it; training losses at different
lengths are not the same quantity, so read it with that caveat. Training loss is smoothed by a running mean over
`smooth` reports to keep one noisy batch from deciding.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from gl_ray import storage
from gl_ray.errors import UserError
from gl_ray.plots import plot_runs
from gl_ray.train.outputs import read_metrics


def smoothed(ms: list[dict], k: int) -> list[float]:
    out = []
    for i in range(len(ms)):
        window = [m["loss"] for m in ms[max(0, i - k + 1): i + 1] if m["loss"] is not None]  # None: skipped steps
        out.append(sum(window) / len(window) if window else math.inf)
    return out


def time_to_loss(ms: list[dict], target: float, k: int) -> tuple[float, int] | None:
    for m, s in zip(ms, smoothed(ms, k)):
        if s <= target:
            return m["elapsed_s"], m["tokens"]
    return None


def val_crossing(ms: list[dict], target: float) -> dict | None:
    """elapsed_s, flops and tokens at which val_loss_final_len first reaches target, interpolated linearly between
    the evaluation before the crossing and the one at or after it (None: never reached)."""
    prev = None
    for m in ms:
        if m.get("val_loss_final_len") is None:
            continue
        v = m["val_loss_final_len"]
        if v <= target:
            if prev is None:
                return {k: m.get(k) for k in ("elapsed_s", "flops", "tokens")}
            pv = prev["val_loss_final_len"]
            f = (pv - target) / (pv - v) if pv > v else 1.0
            out = {}
            for k in ("elapsed_s", "flops", "tokens"):
                a, b = prev.get(k), m.get(k)
                out[k] = None if a is None or b is None else a + f * (b - a)
            return out
        prev = m
    return None


def find_baseline(data: dict[str, list[dict]], baseline: str | None = None) -> str | None:
    """The named run, else the first run trained at one length only (rows and attention: a window-mode run
    has one row length but a growing window), the longest final length of all runs."""
    if baseline is not None:
        if baseline not in data:
            raise UserError(f"--baseline {baseline!r} is not one of the runs: {', '.join(data)}")
        return baseline
    longest = max(ms[-1]["seq_len"] for ms in data.values())
    return next((name for name, ms in data.items()
                 if {m["seq_len"] for m in ms} == {longest} and {m.get("window", longest) for m in ms} == {longest}),
                None)


def _ratio(a, b):
    return a / b if a is not None and b else None


def arm_of(run: str) -> str:
    """The arm of a run: its name without a trailing -sK seed tag (`gl-ray reproduce --seeds`)."""
    return re.sub(r"-s\d+$", "", run)


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def arm_stats(rows: list[dict], baseline_arm: str | None) -> list[dict]:
    """Per arm (runs that differ only by seed): n, and mean / min / max of the headline numbers over the seeds that
    reached the target; `inside_spread`: its time-to-target range overlaps the baseline arm's."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(arm_of(r["run"]), []).append(r)
    out = []
    for arm, rs in groups.items():
        entry = {"arm": arm, "n": len(rs)}
        for key in ("final_val_loss_final_len", "time_to_target_s", "flops_to_target", "time_to_target_ratio",
                    "flops_to_target_ratio"):
            vals = [r[key] for r in rs if r[key] is not None]
            entry[key] = {"mean": sum(vals) / len(vals), "min": min(vals), "max": max(vals), "n": len(vals)} \
                if vals else None
        out.append(entry)
    base = next((a for a in out if a["arm"] == baseline_arm), None)
    for a in out:
        t, b = a["time_to_target_s"], base and base["time_to_target_s"]
        a["inside_spread"] = None if not t or not b or a is base else not (t["max"] < b["min"] or t["min"] > b["max"])
    return out


def load_runs(runs: list[str]) -> dict[str, list[dict]]:
    out = {}
    for run in runs:
        ms = read_metrics(run)
        if not ms:
            raise UserError(f"run {run!r} has no metrics.jsonl (or it is empty)")
        name = Path(run.rstrip("/")).name
        if name in out:
            name = run
        out[name] = ms
    return out


def build_report(runs: list[str], out_dir: str, smooth: int = 5, baseline: str | None = None) -> dict:
    data = load_runs(runs)
    base = find_baseline(data, baseline)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    plot_runs(data, "elapsed_s", f"{out_dir}/loss_vs_time.png", title="Training loss vs wall time")
    plot_runs(data, "tokens", f"{out_dir}/loss_vs_tokens.png", title="Training loss vs tokens")
    plot_runs(data, "flops", f"{out_dir}/loss_vs_flops.png", title="Training loss vs training FLOPs")
    plot_runs(data, "elapsed_s", f"{out_dir}/val_loss_vs_time.png", y="val_loss_final_len",
              title="Validation loss at the final length vs time")
    # the target: the final val loss at the final length of the baseline arm (mean over its seeds)
    base_runs = [n for n in data if base is not None and arm_of(n) == arm_of(base)]
    val_target = _mean([next((m["val_loss_final_len"] for m in reversed(data[n]) if "val_loss_final_len" in m),
                             None) for n in base_runs])
    base_hits = [val_crossing(data[n], val_target) for n in base_runs] if val_target is not None else []
    base_hit = {k: _mean([h[k] for h in base_hits if h]) for k in ("elapsed_s", "flops")} if base_hits else None
    target = max(min(smoothed(ms, smooth)) for ms in data.values())
    first_time = None
    rows = []
    for name, ms in data.items():
        reached = time_to_loss(ms, target, smooth)
        t = reached[0] if reached else None
        first_time = t if first_time is None else first_time
        summary_uri = storage.join(runs[list(data).index(name)], "summary.json")
        summary = json.loads(storage.read_bytes(summary_uri)) if storage.exists(summary_uri) else {}
        vals = [m for m in ms if "val_loss_final_len" in m]
        hit = val_crossing(ms, val_target) if val_target is not None else None
        rows.append({
            "run": name, "tokens": ms[-1]["tokens"], "wall_s": ms[-1]["elapsed_s"], "flops": ms[-1].get("flops"),
            "time_to_target_s": hit and hit["elapsed_s"], "flops_to_target": hit and hit["flops"],
            "tokens_to_target": hit and hit["tokens"],
            "time_to_target_ratio": _ratio(hit and hit["elapsed_s"], base_hit and base_hit["elapsed_s"]),
            "flops_to_target_ratio": _ratio(hit and hit["flops"], base_hit and base_hit["flops"]),
            "final_loss": smoothed(ms, smooth)[-1],
            "final_val_loss_final_len": vals[-1]["val_loss_final_len"] if vals else None,
            "time_to_common_loss_s": t, "tokens_to_common_loss": reached[1] if reached else None,
            "time_ratio_to_first": (t / first_time) if t and first_time else None,
            "stages": summary.get("stages", []),
        })
    rep = {"baseline": base, "val_target": val_target, "common_loss": target, "smooth_reports": smooth,
           "runs": rows, "arms": arm_stats(rows, arm_of(base) if base else None)}
    Path(out_dir, "report.json").write_text(json.dumps(rep, indent=1))
    Path(out_dir, "report.md").write_text(format_report(rep))
    return rep


def _format_arms(arms: list[dict]) -> list[str]:
    """Mean (min-max) over the seeds of each arm, and whether its time to target overlaps the baseline's."""
    def spread(v, spec):
        return "-" if v is None else f"{v['mean']:{spec}} ({v['min']:{spec}}-{v['max']:{spec}}, n={v['n']})"

    lines = ["## Seeds", "", "Mean (min-max, seeds that reached the target) over each arm's seeds.", "",
             "| arm | runs | val loss @ final len | time to target (s) | time ratio | FLOPs ratio | vs baseline |",
             "|" + " --- |" * 7]
    for a in arms:
        verdict = {None: "-", True: "inside the spread", False: "outside the spread"}[a["inside_spread"]]
        lines.append(f"| {a['arm']} | {a['n']} | {spread(a['final_val_loss_final_len'], '.4f')} | "
                     f"{spread(a['time_to_target_s'], '.1f')} | {spread(a['time_to_target_ratio'], '.2f')} | "
                     f"{spread(a['flops_to_target_ratio'], '.2f')} | {verdict} |")
    return [*lines, ""]


def format_report(rep: dict) -> str:
    def f(v, spec):  # a value that may be missing
        return format(v, spec) if v is not None else "-"

    lines = ["# Run comparison", ""]
    if rep["val_target"] is None:
        lines += ["No time-to-target: no fixed-length run at the longest final length with a validation loss "
                  "(pass --baseline RUN).", ""]
    else:
        lines += [f"Target: the final validation loss at the final length of the baseline **{rep['baseline']}**, "
                  f"**{rep['val_target']:.4f}**; when each run's validation loss at the final length first "
                  "reached it (interpolated between evaluations), and the ratio to the baseline's own.", "",
                  "| run | val loss @ final len | time to target (s) | time ratio | FLOPs to target | FLOPs ratio | "
                  "tokens to target |", "|" + " --- |" * 7]
        for r in rep["runs"]:
            lines.append(f"| {r['run']} | {f(r['final_val_loss_final_len'], '.4f')} | "
                         f"{f(r['time_to_target_s'], '.1f')} | {f(r['time_to_target_ratio'], '.2f')} | "
                         f"{f(r['flops_to_target'], '.3g')} | {f(r['flops_to_target_ratio'], '.2f')} | "
                         f"{f(r['tokens_to_target'], ',.0f')} |")
        lines.append("")
    if any(a["n"] > 1 for a in rep["arms"]):
        lines += _format_arms(rep["arms"])
    lines += ["## Training loss", "",
              f"Common loss (the best smoothed training loss every run reached): **{rep['common_loss']:.4f}**. "
              "Training losses at different lengths are not the same quantity: a secondary view.", "",
              "| run | tokens | wall s | final loss | val loss @ final len | time to common loss (s) | "
              "tokens to common loss | time ratio to first |", "|" + " --- |" * 8]
    for r in rep["runs"]:
        lines.append(f"| {r['run']} | {r['tokens']:,} | {r['wall_s']:.1f} | {r['final_loss']:.4f} | "
                     f"{f(r['final_val_loss_final_len'], '.4f')} | {f(r['time_to_common_loss_s'], '.1f')} | "
                     f"{f(r['tokens_to_common_loss'], ',')} | {f(r['time_ratio_to_first'], '.2f')} |")
    lines += ["", "## Stages", "", "| run | stage | seq_len | tokens | steps | wall s | tokens/s |", "|" + " --- |" * 7]
    for r in rep["runs"]:
        for i, s in enumerate(r["stages"]):
            lines.append(f"| {r['run']} | {i} | {s['seq_len']} | {s['tokens']:,} | {s['steps']} | {s['wall_s']:.1f} | "
                         f"{s['tokens_per_s']:,.0f} |")
    lines += ["", "![loss vs time](loss_vs_time.png) ![loss vs tokens](loss_vs_tokens.png) "
              "![loss vs FLOPs](loss_vs_flops.png) ![val loss vs time](val_loss_vs_time.png)", ""]
    return "\n".join(lines)
