"""Top-1 accuracy of trained models on the recall targets of a `gl-ray prepare --recall` dataset's val split.

    .venv/bin/python benchmarks/recall_probe.py --data data/recall-short --length 256 \
        --model runs/recall-probe/final [--model ...] [--out probe.json]

Each val document is cut into windows of --length tokens; a target counts only when its whole pair (MARK to the
recalled value) lies in one window, so the answer is in view. Per model: accuracy on all counted targets, on the
first value token of each pair (the key lookup) and the rest (the copy), by distance bucket [LO, 2*LO), the mean
loss on the targets and on all other tokens, and chance (1 / items). See gl_ray.data.recall for the format.
"""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pyarrow.parquet as pq
import torch
from transformers import AutoModelForCausalLM

from gl_ray.data.manifest import load_manifest


def windows(data: str, length: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """(tokens, target positions, distances, value index) per window of the val documents, targets in view only."""
    m = load_manifest(data)
    spec = m.raw["recall"]["spec"]
    K, V = spec["key_len"], spec["value_len"]
    out = []
    for sh in m.shards("val"):
        for row in pq.read_table(sh.uri).to_pylist():
            ids, t, d = (np.asarray(row[c], np.int64) for c in ("input_ids", "recall_targets", "recall_distances"))
            k = np.arange(len(t)) % V  # which value token of its pair
            first = t - d - 1 - K - k  # the pair's MARK
            for w in range(0, len(ids) - 1, length):
                keep = (first >= w) & (t < w + length)
                out.append((ids[w:w + length], t[keep] - w, d[keep], k[keep]))
    return out


@torch.no_grad()
def probe(model_path: str, data: str, length: int) -> dict:
    model = AutoModelForCausalLM.from_pretrained(model_path).eval()
    hits, dist, kind, t_loss = [], [], [], []
    other_loss, other_n = 0.0, 0
    for ids, t, d, k in windows(data, length):
        logits = model(torch.as_tensor(ids)[None]).logits[0, :-1].float()  # [len-1, vocab]: predicts ids[1:]
        nll = torch.nn.functional.cross_entropy(logits, torch.as_tensor(ids[1:]), reduction="none").numpy()
        pred = logits.argmax(-1).numpy()
        hits.append(pred[t - 1] == ids[t])
        t_loss.append(nll[t - 1])
        dist.append(d)
        kind.append(k)
        mask = np.ones(len(nll), bool)
        mask[t - 1] = False
        other_loss += float(nll[mask].sum())
        other_n += int(mask.sum())
    hits, dist, kind, t_loss = map(np.concatenate, (hits, dist, kind, t_loss))
    buckets = {}
    for lo in sorted({1 << (int(x).bit_length() - 1) for x in dist}):
        sel = (dist >= lo) & (dist < 2 * lo)
        buckets[str(lo)] = {"targets": int(sel.sum()), "accuracy": round(float(hits[sel].mean()), 4)}
    items = len(load_manifest(data).raw["recall"]["item_ids"])
    return {"model": model_path, "length": length, "targets": int(len(hits)),
            "accuracy": round(float(hits.mean()), 4), "accuracy_first_value": round(float(hits[kind == 0].mean()), 4),
            "accuracy_rest": round(float(hits[kind > 0].mean()), 4) if (kind > 0).any() else None,
            "chance": round(1 / items, 4), "target_loss": round(float(t_loss.mean()), 4),
            "chance_loss": round(math.log(items), 4), "other_loss": round(other_loss / max(other_n, 1), 4),
            "by_distance": buckets}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="a dataset prepared with --recall")
    p.add_argument("--model", action="append", required=True, help="HF model folder, e.g. RUN/final (repeatable)")
    p.add_argument("--length", type=int, default=256, help="window length in tokens")
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    args = p.parse_args()
    torch.manual_seed(0)
    res = [probe(m, args.data, args.length) for m in args.model]
    for r in res:
        print(json.dumps(r))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
