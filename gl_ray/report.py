"""`gl-ray report RUN [RUN ...] --out DIR`: compare runs from their metrics.jsonl (the paper's Figures 1-3).

Writes DIR/loss_vs_time.png, DIR/loss_vs_tokens.png, DIR/val_loss_vs_time.png, DIR/report.md and
DIR/report.json. "Time to common loss": the best smoothed training loss that every run reached (the worst of the
runs' best), and the wall time at which each run first reached it, with its ratio to the first run's time.
Training loss is smoothed by a running mean over `smooth` reports to keep one noisy batch from deciding.
"""

from __future__ import annotations

import json
from pathlib import Path

from gl_ray import storage
from gl_ray.errors import UserError
from gl_ray.plots import plot_runs
from gl_ray.train.outputs import read_metrics


def smoothed(ms: list[dict], k: int) -> list[float]:
    out = []
    for i in range(len(ms)):
        window = ms[max(0, i - k + 1): i + 1]
        out.append(sum(m["loss"] for m in window) / len(window))
    return out


def time_to_loss(ms: list[dict], target: float, k: int) -> tuple[float, int] | None:
    for m, s in zip(ms, smoothed(ms, k)):
        if s <= target:
            return m["elapsed_s"], m["tokens"]
    return None


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


def build_report(runs: list[str], out_dir: str, smooth: int = 5) -> dict:
    data = load_runs(runs)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    plot_runs(data, "elapsed_s", f"{out_dir}/loss_vs_time.png", title="Training loss vs wall time")
    plot_runs(data, "tokens", f"{out_dir}/loss_vs_tokens.png", title="Training loss vs tokens")
    plot_runs(data, "elapsed_s", f"{out_dir}/val_loss_vs_time.png", y="val_loss_final_len",
              title="Validation loss at the final length vs time")
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
        rows.append({
            "run": name, "tokens": ms[-1]["tokens"], "wall_s": ms[-1]["elapsed_s"],
            "final_loss": smoothed(ms, smooth)[-1],
            "final_val_loss_final_len": vals[-1]["val_loss_final_len"] if vals else None,
            "time_to_common_loss_s": t, "tokens_to_common_loss": reached[1] if reached else None,
            "time_ratio_to_first": (t / first_time) if t and first_time else None,
            "stages": summary.get("stages", []),
        })
    rep = {"common_loss": target, "smooth_reports": smooth, "runs": rows}
    Path(out_dir, "report.json").write_text(json.dumps(rep, indent=1))
    Path(out_dir, "report.md").write_text(format_report(rep))
    return rep


def format_report(rep: dict) -> str:
    def f(v, spec):  # a value that may be missing
        return format(v, spec) if v is not None else "-"

    lines = ["# Run comparison", "",
             f"Common loss (the best smoothed training loss every run reached): **{rep['common_loss']:.4f}**", "",
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
              "![val loss vs time](val_loss_vs_time.png)", ""]
    return "\n".join(lines)
