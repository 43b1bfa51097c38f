"""PNG plots for eval, bench and report (matplotlib, no display needed)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def save_figure(fig, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_eval(res: dict, path: str) -> str:
    """Perplexity vs input length, one line per model (the paper's Figure 4)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, rows in res["models"].items():
        ls = res["lengths"]
        ax.plot(ls, [rows[str(L)]["ppl"] for L in ls], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("input length (tokens)")
    ax.set_ylabel("validation perplexity")
    ax.set_title("Context-window extension")
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, path)


def plot_bench(res: dict, path: str) -> str:
    """Time per step, peak memory and max micro batch per length (the paper's Tables 1-3 as pictures)."""
    rows = res["lengths"]
    ls = [r["seq_len"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    axes[0].plot(ls, [r["step_time_s"] for r in rows], marker="o")
    axes[0].set_ylabel(f"s per optimizer step ({res['tokens_per_step']:,} tokens)")
    axes[1].plot(ls, [r["peak_memory_bytes"] / 2**20 for r in rows], marker="o")
    axes[1].set_ylabel(f"peak memory (MiB), micro batch {res['memory_micro_batch_seqs']} seqs")
    if all(r.get("max_micro_batch_tokens") is not None for r in rows):
        axes[2].plot(ls, [r["max_micro_batch_tokens"] for r in rows], marker="o")
    axes[2].set_ylabel(f"max tokens per micro batch (budget {res.get('memory_budget_bytes', 0) / 2**30:.1f} GiB)")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length")
        ax.grid(alpha=0.3)
    fig.suptitle(f"{res['preset']} on {res['device_name']}")
    return save_figure(fig, path)


def plot_runs(runs: dict[str, list[dict]], x: str, path: str, y: str = "loss", title: str = "") -> str:
    """One line per run: y (loss or val_loss_final_len) against x (elapsed_s or tokens)."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, ms in runs.items():
        pts = [(m[x], m[y]) for m in ms if y in m and x in m]  # runs written before a metric existed lack it
        if pts:
            ax.plot(*zip(*pts), marker="." if y != "loss" else None, label=name)
    ax.set_xlabel({"elapsed_s": "wall time (s)", "tokens": "training tokens", "flops": "training FLOPs"}.get(x, x))
    ax.set_ylabel({"loss": "training loss", "val_loss_final_len": "val loss at the final length"}.get(y, y))
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, path)


CURVES = (("elapsed_s", "loss", "loss_vs_time", "Training loss vs wall time"),
          ("tokens", "loss", "loss_vs_tokens", "Training loss vs tokens"),
          ("flops", "loss", "loss_vs_flops", "Training loss vs training FLOPs"),
          ("elapsed_s", "val_loss_final_len", "val_loss_vs_time", "Validation loss at the final length vs time"))


def plot_curves(runs: dict[str, list[dict]], folder: str) -> dict[str, str]:
    """The runs' training curves (the paper's Figures 1-3) as folder/NAME.png; returns {NAME.png: path}."""
    return {f"{name}.png": plot_runs(runs, x, f"{folder}/{name}.png", y=y, title=title) for x, y, name, title in CURVES}


def _length_panels(lengths: list[int], title: str):
    """One panel per eval length, side by side (at most 4 per row)."""
    cols = min(4, len(lengths))
    nrows = -(-len(lengths) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.6 * cols, 3.2 * nrows), squeeze=False)
    for ax in axes.flat[len(lengths):]:
        ax.set_visible(False)
    fig.suptitle(title)
    return fig, list(axes.flat)


def _bucket_xy(buckets: list[dict], key: str) -> tuple[list, list]:
    pts = [(b["lo"], b[key]) for b in buckets if b.get(key) is not None]
    return ([p[0] for p in pts], [p[1] for p in pts]) if pts else ([], [])


def plot_context(res: dict, stem: str) -> list[str]:
    """The context-use metrics of an eval result (its "context" section), one PNG per metric, a curve per model:
    {stem}_position.png (loss by position in the window, dashed: within the document), {stem}_recall.png
    (recall-hit accuracy by distance), {stem}_copy.png (copy score by d), one panel per length; and
    {stem}_passkey.png (passkey accuracy by length, one panel per depth). Returns the paths written."""
    ctx = res.get("context")
    if not ctx:
        return []
    lengths, models, metrics = res["lengths"], ctx["models"], ctx["settings"]["metrics"]
    colors = {name: f"C{i % 10}" for i, name in enumerate(models)}
    written = []
    curves = {"position": ("loss by position in the window", "position of the target (log2 bucket start)",
                           "mean loss (nats)"),
              "recall": ("associative recall by distance", "distance t-1-j (log2 bucket start)", "top-1 accuracy"),
              "copy": ("copy probe: loss on copy 1 - copy 2", "copy length d (tokens)", "score (nats)")}
    for metric, (title, xlabel, ylabel) in curves.items():
        if metric not in metrics:
            continue
        fig, axes = _length_panels(lengths, title)
        for ax, L in zip(axes, lengths):
            for name, by_len in models.items():
                row = by_len[str(L)]
                if metric == "position":
                    ax.plot(*_bucket_xy(row["position"], "loss"), marker=".", color=colors[name], label=name)
                    if "doc_position" in row:
                        ax.plot(*_bucket_xy(row["doc_position"], "loss"), ls="--", color=colors[name])
                elif metric == "recall":
                    ax.plot(*_bucket_xy(row["recall"]["buckets"], "acc"), marker=".", color=colors[name], label=name)
                else:
                    ax.plot([c["d"] for c in row["copy"]], [c["score"] for c in row["copy"]], marker=".",
                            color=colors[name], label=name)
            ax.set_xscale("log", base=2)
            ax.set_title(f"L = {L}", fontsize=9)
            ax.set_xlabel(xlabel, fontsize=8)
            ax.set_ylabel(ylabel, fontsize=8)
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=7)
        written.append(save_figure(fig, f"{stem}_{metric}.png"))
    if "passkey" in metrics:
        depths = ctx["settings"]["passkey_depths"]
        fig, axes = _length_panels(depths, "passkey by likelihood: true key ranked first")
        for k, (ax, depth) in enumerate(zip(axes, depths)):
            for name, by_len in models.items():
                ax.plot(lengths, [by_len[str(L)]["passkey"]["depths"][k]["accuracy"] for L in lengths], marker="o",
                        color=colors[name], label=name)
            ax.axhline(1 / (ctx["settings"]["distractors"] + 1), color="grey", ls=":", lw=1)  # chance
            ax.set_xscale("log", base=2)
            ax.set_ylim(-0.05, 1.05)
            ax.set_title(f"key at depth {depth}", fontsize=9)
            ax.set_xlabel("window length (tokens)", fontsize=8)
            ax.set_ylabel("accuracy (dotted: chance)", fontsize=8)
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=7)
        written.append(save_figure(fig, f"{stem}_passkey.png"))
    return written
