"""Fold the GPU check's outputs into one JSON and one Markdown table for docs/BENCHMARKS.md.

    python -m benchmarks.gpu_check_summary [--bench OUT/bench.json] [--train OUT/train_summary.json --data DATA \
        --preset P] [--fsdp WORK/fsdp.json] [--loss WORK/loss.json] [--sync WORK/sync.json] \
        [--checkpoint WORK/checkpoint.json] [--induction WORK/induction.json] [--failed WORK/failed.tsv] \
        --out OUT/gpu_check

Reads the `gl-ray bench` JSON (Tables 1-3 at fixed tokens per step) and the Ray-free training run's summary.json,
and adds for each training stage: seconds per optimizer step, tokens/s, achieved TFLOP/s and model FLOPs
utilisation (MFU: achieved / the device's bf16 peak, the same accounting as `gl-ray bench`). Every input is
optional: a check that failed left none, and --failed (gpu_check.sh's list: check name, exit status, log path,
tab-separated) puts each failure and the end of its log at the top. Writes OUT.json and OUT.md; needs neither Ray
nor a GPU.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path


def train_rows(summary: dict, preset: str, vocab_size: int, peak_tflops: float | None) -> list[dict]:
    """Per-stage throughput of a training summary (stage wall time includes data waits and stage switches)."""
    from gl_ray.model import flops_per_token, preset_shape

    rows = []
    for st in summary["stages"]:
        tps = st["tokens_per_s"]
        if st.get("flops") and st["wall_s"]:  # counted by the loop (pairs inside documents when masked)
            tflops = st["flops"] / st["wall_s"] / 1e12
        else:
            tflops = flops_per_token(preset_shape(preset, vocab_size), st["seq_len"]) * tps / 1e12
        rows.append({"seq_len": st["seq_len"], "steps": st["steps"], "tokens": st["tokens"], "wall_s": st["wall_s"],
                     "step_time_s": st["wall_s"] / st["steps"] if st["steps"] else None, "tokens_per_s": tps,
                     "achieved_tflops": tflops, "mfu": tflops / peak_tflops if peak_tflops else None,
                     "loss": st["loss"], "micro_batch": st.get("micro_batch")})
    return rows


def to_markdown(doc: dict) -> str:
    from gl_ray.bench import format_bench

    def pct(v: float | None) -> str:
        return f"{100 * v:.1f}%" if v is not None else "-"

    b, t = doc.get("bench"), doc.get("train")
    lines = []
    if doc.get("failed"):
        lines += [f"**Checks that failed: {', '.join(f['check'] for f in doc['failed'])}** (the rest of this page is "
                  "what the others measured)", ""]
        for f in doc["failed"]:
            lines += [f"`{f['check']}` exited with status {f['exit_status']}; the end of its log:", "", "```",
                      *f["log_tail"], "```", ""]
    if b:
        lines += [f"Device: {b['device_name']} ({b['dtype']}{', torch.compile' if b.get('compile') else ''}); "
                  f"preset {b['preset']}; vocab {b['vocab_size']:,} in the bench.", "",
                  f"`gl-ray bench`, {b['tokens_per_step']:,} tokens per step, memory at "
                  f"{b['memory_micro_batch_seqs']} sequences per micro batch:", "", format_bench(b), ""]
    if t:
        lines += [f"Ray-free GrowLength training, vocab {t['vocab_size']:,} (the dataset's tokenizer): {t['steps']} "
                  f"steps, {t['tokens']:,} tokens in {t['wall_s']:.1f} s ({t['tokens'] / t['wall_s']:,.0f} tokens/s), "
                  f"final loss {t['final_loss']:.3f}:", "",
                  "| seq_len | micro batch (seqs) | steps | s/step | tokens/s | TFLOP/s | MFU | loss at stage end |",
                  "|" + " --- |" * 8]
        for r in t["stages"]:
            lines.append(f"| {r['seq_len']} | {r.get('micro_batch') or '-'} | {r['steps']} | "
                         f"{r['step_time_s']:.4f} | {r['tokens_per_s']:,.0f} | {r['achieved_tflops']:.2f} | "
                         f"{pct(r['mfu'])} | {r['loss']:.3f} |")
    f = doc.get("fsdp")
    if f:
        restored = "exactly" if f["restored_equal"] else "NOT exactly"
        lines += ["", f"FSDP2 in one process (`benchmarks/fsdp_check.py`), L={f['seq_len']}, {f['steps']} steps, "
                  f"{f['dtype']}: {f['tokens_per_s_fsdp']:,.0f} tokens/s sharded vs {f['tokens_per_s_unsharded']:,.0f} "
                  f"unsharded; largest loss difference {f['max_loss_diff']:.2e}; sharded checkpoint "
                  f"({', '.join(f['checkpoint_files'])}) restored {restored}."]
        if f.get("checkpoint_block_s"):
            b = f["checkpoint_block_s"]
            lines[-1] += (f" A sharded checkpoint held the loop up {b['sync']:.3f} s saved in the loop, "
                          f"{b['async']:.3f} s with the async save.")
    if doc.get("loss"):
        from benchmarks.loss_memory import format_table

        lines += ["", f"Peak memory of one forward+backward, stock vs chunked loss (`benchmarks/loss_memory.py`), "
                  f"vocab {doc['loss']['vocab']:,}:", "", format_table(doc["loss"], "")]
    if doc.get("sync"):
        from benchmarks.sync_check import format_table as sync_table

        lines += ["", "`benchmarks/sync_check.py`: " + sync_table(doc["sync"])]
    if doc.get("checkpoint"):
        from benchmarks.checkpoint_block import format_table as checkpoint_table

        lines += ["", "How long a checkpoint holds the loop up (`benchmarks/checkpoint_block.py`):", "",
                  checkpoint_table(doc["checkpoint"])]
    if doc.get("induction"):
        from benchmarks.induction_probe import format_table as induction_table

        lines += ["", induction_table(doc["induction"])]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip("\n") + "\n"  # sections left out leave no gaps


def summarize(bench: dict | None, summary: dict | None, vocab_size: int, preset: str = "") -> dict:
    """{"bench": the bench JSON or None, "train": per-stage throughput or None}; MFU needs the bench's GPU peak."""
    if summary is None:
        return {"bench": bench, "train": None}
    peak = bench["peak_tflops"] if bench and bench["device"] == "cuda" else None
    stages = train_rows(summary, preset or bench["preset"], vocab_size, peak)
    final_loss = stages[-1]["loss"] if stages else None
    return {"bench": bench, "train": {"vocab_size": vocab_size, "steps": summary["steps"], "tokens": summary["tokens"],
                                      "wall_s": summary["wall_s"], "final_loss": final_loss, "stages": stages}}


def read_failed(path: str, tail_lines: int = 20) -> list[dict]:
    """gpu_check.sh's failed checks (name, exit status, log path per tab-separated line), each with its log's end."""
    if not path or not Path(path).exists():
        return []
    failed = []
    for line in Path(path).read_text().splitlines():
        name, status, log = (line.split("\t") + ["", ""])[:3]
        log_path = Path(log)
        text = log_path.read_text(errors="replace") if log and log_path.is_file() else ""
        failed.append({"check": name, "exit_status": int(status) if status.lstrip("-").isdigit() else status,
                       "log": log, "log_tail": text.splitlines()[-tail_lines:]})
    return failed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bench", default="", help="gl-ray bench JSON (optional)")
    ap.add_argument("--train", default="", help="the training run's summary.json (optional)")
    ap.add_argument("--data", default="", help="with --train: the dataset the run trained on (its manifest: the vocab)")
    ap.add_argument("--preset", default="", help="with --train: the run's model preset (default: the bench's)")
    ap.add_argument("--fsdp", default="", help="benchmarks/fsdp_check.py's JSON (optional)")
    ap.add_argument("--loss", default="", help="benchmarks/loss_memory.py's JSON (optional)")
    ap.add_argument("--sync", default="", help="benchmarks/sync_check.py's JSON (optional)")
    ap.add_argument("--checkpoint", default="", help="benchmarks/checkpoint_block.py's JSON (optional)")
    ap.add_argument("--induction", default="", help="benchmarks/induction_probe.py's JSON (optional)")
    ap.add_argument("--failed", default="", help="gpu_check.sh's list of failed checks (optional)")
    ap.add_argument("--out", required=True, help="output stem: writes STEM.json and STEM.md")
    a = ap.parse_args()
    from gl_ray.data.manifest import load_manifest

    bench = json.loads(Path(a.bench).read_text()) if a.bench else None
    summary = json.loads(Path(a.train).read_text()) if a.train else None
    doc = summarize(bench, summary, load_manifest(a.data).vocab_size if summary else 0, a.preset)
    for key in ("fsdp", "loss", "sync", "checkpoint", "induction"):
        if getattr(a, key):
            doc[key] = json.loads(Path(getattr(a, key)).read_text())
    doc["failed"] = read_failed(a.failed)
    Path(f"{a.out}.json").write_text(json.dumps(doc, indent=1))
    md = to_markdown(doc)
    Path(f"{a.out}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
