"""What document masking and activation checkpointing cost, and how the cost of a token grows with the length.

    python -m benchmarks.long_context --data data/stdlib --preset pythia-14m --lengths 256,512,1024,2048,4096

Runs `gl-ray bench` (Tables 1-2, the same code) for four variants, one after another in one process so that they
share the machine's state: plain causal rows of the dataset; document-masked rows of the dataset (its real
document boundaries); document-masked random rows with --mean-doc-len documents; and dataset rows masked with
activation checkpointing. Prints one Markdown table: tokens/s per length and variant, the cost of a token at each
length relative to the shortest (what bounds GrowLength's saving), and peak memory. No Ray.
"""

from __future__ import annotations

import argparse
import json

from gl_ray.bench import bench_model, run_bench


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", default="data/stdlib")
    p.add_argument("--preset", default="pythia-14m")
    p.add_argument("--lengths", default="256,512,1024,2048,4096")
    p.add_argument("--tokens-per-step", type=int, default=16384)
    p.add_argument("--micro-batch-tokens", type=int, default=4096)
    p.add_argument("--mean-doc-len", type=int, default=512)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--memory-micro-batch", type=int, default=1)
    p.add_argument("--out", default=None, help="JSON of every variant's bench result")
    a = p.parse_args()
    variants = {
        "plain": bench_model(preset=a.preset, data=a.data),
        "masked (data's documents)": bench_model(preset=a.preset, data=a.data, document_masking=True),
        f"masked (mean {a.mean_doc_len})": bench_model(preset=a.preset, document_masking=True,
                                                     mean_doc_len=a.mean_doc_len,
                                                     vocab=bench_model(preset=a.preset, data=a.data).vocab),
        "masked + act. ckpt": bench_model(preset=a.preset, data=a.data, document_masking=True,
                                          activation_checkpointing=True),
    }
    lengths = [int(x) for x in a.lengths.split(",")]
    results = {}
    for name, model in variants.items():
        print(f"[long_context] {name} ...", flush=True)
        results[name] = run_bench(model=model, lengths=lengths, tokens_per_step=a.tokens_per_step,
                                  micro_batch_tokens=a.micro_batch_tokens, device="cpu", dtype="fp32",
                                  steps=a.steps, warmup=1, memory_micro_batch_seqs=a.memory_micro_batch,
                                  memory_budget=0)
    names = list(results)
    print("| seq_len | " + " | ".join(f"{n}: tokens/s (cost vs first)" for n in names) + " | "
          + " | ".join(f"{n}: peak MiB" for n in names) + " |")
    print("|" + " --- |" * (1 + 2 * len(names)))
    for i, L in enumerate(lengths):
        rows = [results[n]["lengths"][i] for n in names]
        print(f"| {L} | " + " | ".join(f"{r['tokens_per_s']:,.0f} ({r['cost_vs_first']:.2f}x)" for r in rows) + " | "
              + " | ".join(f"{r['peak_memory_bytes'] / 2**20:,.0f}" for r in rows) + " |")
    mean_doc = results[names[1]]["lengths"][-1].get("mean_doc_tokens")
    print(f"\nmean document length in the dataset's rows at {lengths[-1]}: "
          f"{mean_doc:,.0f} tokens" if mean_doc else "\nno document boundary in the dataset's rows")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
