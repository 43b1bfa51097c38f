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
