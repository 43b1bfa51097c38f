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

With an eval result (`--eval EVAL.json`, which `reproduce` passes itself), each run also gets the eval's headline
context numbers at the final length (`gl_ray.context.headlines`): recall accuracy in the farthest distance bucket
with hits, passkey accuracy over every depth and the copy score at d = L/2. With two or more seeds per arm, every
difference between an arm and each fixed-length (baseline) arm in those numbers, the final val loss and the time
to target gets Welch's t-test (two-sided; the t distribution's p from the regularized incomplete beta function),
and the report says which ones it supports (p < 0.05).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from gl_ray import storage
from gl_ray.context import headlines
from gl_ray.errors import UserError
from gl_ray.plots import plot_curves
from gl_ray.train.outputs import read_metrics


def smoothed(ms: list[dict], k: int) -> list[float]:
    out = []
    for i in range(len(ms)):
        window = [m["loss"] for m in ms[max(0, i - k + 1): i + 1] if m.get("loss") is not None]  # None: skipped
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
    return next((name for name, ms in data.items() if is_fixed(ms) and ms[-1]["seq_len"] == longest), None)


def baseline_arms(data: dict[str, list[dict]], baseline: str | None) -> list[str]:
    """The arms every other arm is tested against: those whose runs are all fixed-length, and the baseline's."""
    arms = {arm_of(n) for n in data}
    fixed = {a for a in arms if all(is_fixed(ms) for n, ms in data.items() if arm_of(n) == a)}
    return sorted(fixed | ({arm_of(baseline)} if baseline else set()))


def is_fixed(ms: list[dict]) -> bool:
    """A run trained at one length only (rows and attention: a window-mode run has one row length but a growing
    window, a decomposed run a bucket length per step)."""
    lengths = {m["seq_len"] for m in ms}
    buckets = {L for m in ms for L in m.get("bucket_lens", [m["seq_len"]])}  # decompose: each step's own length
    return len(lengths) == 1 and {m.get("window", ms[0]["seq_len"]) for m in ms} == lengths == buckets


def _ratio(a, b):
    return a / b if a is not None and b else None


def arm_of(run: str) -> str:
    """The arm of a run: its name without a trailing -sK seed tag (`gl-ray reproduce --seeds`)."""
    return re.sub(r"-s\d+$", "", run)


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


EVAL_HEADLINES = ("recall_acc_far", "passkey_acc", "copy_score")  # from gl_ray.context.headlines
ARM_KEYS = ("final_val_loss_final_len", "time_to_target_s", "flops_to_target", "time_to_target_ratio",
            "flops_to_target_ratio", *EVAL_HEADLINES)
TESTED = {"time_to_target_s": "time to target (s)", "final_val_loss_final_len": "val loss @ final len",
          "recall_acc_far": "recall acc (farthest bucket)", "passkey_acc": "passkey acc", "copy_score": "copy score"}


def eval_length(ev: dict, final_len: int) -> int:
    """The eval length the headline numbers are read at: the final length if evaluated, else the longest eval
    length below it, else the shortest."""
    below = [L for L in ev["lengths"] if L <= final_len]
    return max(below) if below else min(ev["lengths"])


def eval_headlines(ev: dict | None, run: str, length: int) -> dict:
    """The headline context numbers of one run (its final/ model's label is the run name) at `length`; None
    values where the eval has no context section or no such run."""
    row = ((ev or {}).get("context") or {}).get("models", {}).get(run, {}).get(str(length))
    return {k: v for k, v in headlines(row or {}).items() if k in EVAL_HEADLINES}


def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b), by its continued fraction (modified Lentz; Numerical
    Recipes' betai/betacf), to about 1e-14."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x > (a + 1.0) / (a + b + 2.0):  # the fraction converges fast below this point: use the symmetry
        return 1.0 - betainc(b, a, 1.0 - x)
    tiny, c, d = 1e-300, 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    frac = d
    for m in range(1, 500):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            frac *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return front * frac / a


def t_p_value(t: float, df: float) -> float:
    """Two-sided p-value of Student's t with df degrees of freedom (df may be fractional)."""
    return betainc(df / 2.0, 0.5, df / (df + t * t))


def welch_t(a: list[float], b: list[float]) -> dict | None:
    """Welch's unequal-variance t-test of mean(a) - mean(b): t, Welch-Satterthwaite df and the two-sided p;
    None with fewer than two values on a side. No spread on either side: t and p are None (untestable) unless
    the means are equal (p 1)."""
    if len(a) < 2 or len(b) < 2:
        return None
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    va = sum((x - ma) ** 2 for x in a) / (len(a) - 1) / len(a)  # squared standard error of each mean
    vb = sum((x - mb) ** 2 for x in b) / (len(b) - 1) / len(b)
    if va + vb == 0:
        return {"t": None, "df": None, "p": 1.0 if ma == mb else None}
    t = (ma - mb) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    return {"t": t, "df": df, "p": t_p_value(t, df)}


def significance(rows: list[dict], baseline_arms: list[str], alpha: float = 0.05) -> list[dict]:
    """Welch's t for every TESTED number between each arm and each baseline arm (other than itself), where both
    have two or more seeds with a value; `supported`: p < alpha."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(arm_of(r["run"]), []).append(r)
    out = []
    for base in baseline_arms:
        for arm, rs in groups.items():
            if arm == base:
                continue
            for key in TESTED:
                a = [r[key] for r in rs if r.get(key) is not None]
                b = [r[key] for r in groups[base] if r.get(key) is not None]
                test = welch_t(a, b)
                if test is None:
                    continue
                out.append({"metric": key, "arm": arm, "baseline": base, "arm_mean": sum(a) / len(a), "arm_n": len(a),
                            "baseline_mean": sum(b) / len(b), "baseline_n": len(b),
                            "difference": sum(a) / len(a) - sum(b) / len(b), **test,
                            "supported": test["p"] is not None and test["p"] < alpha})
    return out


def arm_stats(rows: list[dict], baseline_arm: str | None) -> list[dict]:
    """Per arm (runs that differ only by seed): n, and mean / min / max of the headline numbers over the seeds that
    reached the target; `inside_spread`: its time-to-target range overlaps the baseline arm's."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(arm_of(r["run"]), []).append(r)
    out = []
    for arm, rs in groups.items():
        entry = {"arm": arm, "n": len(rs)}
        for key in ARM_KEYS:
            vals = [r[key] for r in rs if r.get(key) is not None]
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


def build_report(runs: list[str], out_dir: str, smooth: int = 5, baseline: str | None = None, *,
                 eval_res: dict | None = None) -> dict:
    """Compare runs (see the module docstring); eval_res: a `gl-ray eval` result holding the runs' final models."""
    data = load_runs(runs)
    base = find_baseline(data, baseline)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    plot_curves(data, out_dir)
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
        summary = storage.read_json(summary_uri) if storage.exists(summary_uri) else {}
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
    final_len = max(ms[-1]["seq_len"] for ms in data.values())
    at = eval_length(eval_res, final_len) if eval_res else None
    for r in rows:
        r.update(eval_headlines(eval_res, r["run"], at))
    baselines = baseline_arms(data, base)
    rep = {"baseline": base, "val_target": val_target, "common_loss": target, "smooth_reports": smooth,
           "eval_length": at, "runs": rows, "arms": arm_stats(rows, arm_of(base) if base else None),
           "baseline_arms": baselines, "significance": significance(rows, baselines)}
    Path(out_dir, "report.json").write_text(json.dumps(rep, indent=1))
    Path(out_dir, "report.md").write_text(format_report(rep))
    return rep


def _format_arms(arms: list[dict]) -> list[str]:
    """Mean (min-max) over the seeds of each arm, and whether its time to target overlaps the baseline's."""
    def spread(v, spec):
        return "-" if v is None else f"{v['mean']:{spec}} ({v['min']:{spec}}-{v['max']:{spec}}, n={v['n']})"

    evals = any(a.get(k) for a in arms for k in EVAL_HEADLINES)
    extra = [TESTED[k] for k in EVAL_HEADLINES] if evals else []
    lines = ["## Seeds", "", "Mean (min-max, seeds that reached the target) over each arm's seeds.", "",
             "| arm | runs | val loss @ final len | time to target (s) | time ratio | FLOPs ratio | vs baseline | "
             + "".join(f"{e} | " for e in extra), "|" + " --- |" * (7 + len(extra))]
    for a in arms:
        verdict = {None: "-", True: "inside the spread", False: "outside the spread"}[a["inside_spread"]]
        cells = "".join(f" {spread(a.get(k), '.3f')} |" for k in EVAL_HEADLINES) if evals else ""
        lines.append(f"| {a['arm']} | {a['n']} | {spread(a['final_val_loss_final_len'], '.4f')} | "
                     f"{spread(a['time_to_target_s'], '.1f')} | {spread(a['time_to_target_ratio'], '.2f')} | "
                     f"{spread(a['flops_to_target_ratio'], '.2f')} | {verdict} |{cells}")
    return [*lines, ""]


def _format_significance(tests: list[dict], baselines: list[str]) -> list[str]:
    """Welch's t of each difference between an arm and a baseline arm, and what it supports at p < 0.05."""
    def f(v, spec):
        return "-" if v is None else format(v, spec)

    lines = ["## Significance", "",
             f"Welch's t-test (two-sided) of each arm against each fixed-length arm ({', '.join(baselines)}) over "
             "the seeds; supported: p < 0.05.", "",
             "| number | arm | baseline | arm mean (n) | baseline mean (n) | difference | t | df | p | supported |",
             "|" + " --- |" * 10]
    for t in tests:
        lines.append(f"| {TESTED[t['metric']]} | {t['arm']} | {t['baseline']} | {t['arm_mean']:.4g} ({t['arm_n']}) | "
                     f"{t['baseline_mean']:.4g} ({t['baseline_n']}) | {t['difference']:+.4g} | {f(t['t'], '.2f')} | "
                     f"{f(t['df'], '.1f')} | {f(t['p'], '.3g')} | "
                     f"{'yes' if t['supported'] else 'no' if t['p'] is not None else 'untestable (no spread)'} |")
    yes = [f"{t['arm']} vs {t['baseline']}: {TESTED[t['metric']]} {t['difference']:+.4g}" for t in tests
           if t["supported"]]
    lines += ["", "Differences the seeds support: " + ("; ".join(yes) if yes else "none") + ". Any other difference "
              "above is within what seed-to-seed noise explains.", ""]
    return lines


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
    if rep.get("eval_length") is not None:
        lines += [f"## Context use (eval at length {rep['eval_length']})", "",
                  "Recall: top-1 accuracy on associative-recall hits in the farthest distance bucket with hits; "
                  "passkey: share of trials whose key outranks every distractor, over the depths; copy: loss on the "
                  "first copy minus the second at d = L/2 (nats). See `gl-ray eval`.", "",
                  "| run | time to target (s) | recall acc (farthest) | passkey acc | copy score |", "|" + " --- |" * 5]
        for r in rep["runs"]:
            lines.append(f"| {r['run']} | {f(r['time_to_target_s'], '.1f')} | {f(r.get('recall_acc_far'), '.3f')} | "
                         f"{f(r.get('passkey_acc'), '.2f')} | {f(r.get('copy_score'), '.2f')} |")
        lines.append("")
    if any(a["n"] > 1 for a in rep["arms"]):
        lines += _format_arms(rep["arms"])
    if rep.get("significance"):
        lines += _format_significance(rep["significance"], rep["baseline_arms"])
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
