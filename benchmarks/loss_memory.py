"""What the chunked loss (gl_ray.loss) saves: peak memory of one training micro batch, stock Hugging Face loss vs
chunked, side by side in one run (the paper's Tables 2 and 3 at Pythia's vocab of 50,304).

    python -m benchmarks.loss_memory --preset pythia-70m --seq-len 2048 --seqs 1,2,4 --budget 6GiB

Table 2: peak memory of one forward+backward of `--seqs` sequences (CUDA max allocated on GPU; on CPU the peak
RSS of a fresh child process, as `gl-ray bench` measures it). Table 3: the largest micro batch (sequences) whose
forward+backward fits `--budget`, by `gl-ray bench`'s doubling-then-bisection search. The "stock" arm builds the
same weights as GPTNeoXForCausalLM, whose loss makes the whole [tokens, vocab] logits and upcasts them to fp32.
Prints a Markdown table; --out writes the JSON. No Ray.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass

import torch
from transformers import GPTNeoXForCausalLM

from gl_ray.bench import BenchModel, max_micro_batch, peak_memory
from gl_ray.devices import pick_device
from gl_ray.model import build_model
from gl_ray.sizes import parse_size


@dataclass(frozen=True)
class StockLoss(BenchModel):
    """The same model with the stock Hugging Face class (and so its loss)."""

    def build(self, seq_len: int, device: torch.device) -> torch.nn.Module:
        chunked = build_model(self.preset, self.vocab, max(seq_len, 2048), eos_token_id=self.eos_id,
                              attention=self.attention)
        stock = GPTNeoXForCausalLM(chunked.config)
        stock.load_state_dict(chunked.state_dict())
        return stock.to(device)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="pythia-70m")
    p.add_argument("--vocab", type=int, default=50304)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--seqs", default="1,2,4", help="micro batches (sequences) for Table 2")
    p.add_argument("--budget", default="6GiB", help="memory budget for Table 3 (empty: skip it)")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    device = pick_device(a.device)
    arms = {"stock HF loss": StockLoss(preset=a.preset, vocab=a.vocab),
            "chunked (gl_ray.loss)": BenchModel(preset=a.preset, vocab=a.vocab)}
    res: dict = {"preset": a.preset, "vocab": a.vocab, "seq_len": a.seq_len, "device": str(device), "arms": {}}
    for name, model in arms.items():
        peaks = {n: peak_memory(model, n, a.seq_len, device, a.precision) for n in map(int, a.seqs.split(","))}
        row = {"peak_bytes": peaks}
        if a.budget:
            row["max_micro_batch_seqs"], _ = max_micro_batch(model, a.seq_len, device, a.precision,
                                                             parse_size(a.budget, "--budget"), limit_seqs=64)
        res["arms"][name] = row
        print(f"{name}: {row}", flush=True)
    print(format_table(res, a.budget))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)


def format_table(res: dict, budget: str) -> str:
    seqs = list(next(iter(res["arms"].values()))["peak_bytes"])
    head = [f"peak MiB @ {n} x {res['seq_len']}" for n in seqs] + ([f"max seqs in {budget}"] if budget else [])
    lines = ["| loss | " + " | ".join(head) + " |", "|" + " --- |" * (len(head) + 1)]
    for name, row in res["arms"].items():
        cells = [f"{v / 2**20:,.0f}" if v else "did not fit" for v in row["peak_bytes"].values()]
        cells += [str(row["max_micro_batch_seqs"])] if budget else []
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
