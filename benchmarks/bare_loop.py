"""gl-ray's training loop against a bare torch loop: the same model, rows and AdamW, one length, side by side.

    python -m benchmarks.bare_loop --data data/stdlib [--preset pythia-14m] [--seq-len 512] \
        [--tokens-per-step 8192] [--steps 24] [--rounds 2] [--out results/bare_loop.json]

Three arms, each round in alternating order (a drift of the shared machine's speed falls on every arm):
- bare: a plain loop over the same rows (read before timing), AdamW with the same groups, clip, step;
- no-ray: `gl-ray train --no-ray` of one stage of the same shape (ray.num_workers: 0);
- ray: the same run on local Ray Train, 1 worker holding every core (ray.cpus_per_worker = os.cpu_count()).
The rate of a gl-ray arm is its summary's tokens / stage wall time: every step from the first, data waits
included, the final evaluation and checkpoint excluded; the bare loop is timed over the same steps. The ratios
to the bare loop are the headline (targets: no-ray >= 0.97, ray >= 0.95).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from gl_ray.config import OptimConfig, load_config
from gl_ray.data.manifest import load_manifest
from gl_ray.data.stream import get_stream
from gl_ray.model import build_model, lm_loss


def bare(data: str, preset: str, seq_len: int, tokens_per_step: int, steps: int) -> float:
    """tokens/s of a bare torch loop over the rows the gl-ray run trains on (stage 0 of its plan)."""
    vocab = load_manifest(data).vocab_size
    stream = get_stream(data, "train")
    seqs = tokens_per_step // seq_len
    rows = [torch.from_numpy(stream.rows(np.arange(s * seqs, (s + 1) * seqs) * seq_len, seq_len)).long()
            for s in range(steps)]
    model = build_model(preset, vocab, max(2048, seq_len), seed=0)
    o = OptimConfig()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay}, {"params": rest, "weight_decay": 0}],
                            lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)
    t0 = time.perf_counter()
    for x in rows:
        loss = lm_loss(model, x)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return steps * tokens_per_step / (time.perf_counter() - t0)


def gl_ray_run(data: str, preset: str, seq_len: int, tokens_per_step: int, steps: int, workers: int, storage: str,
               name: str) -> float:
    """tokens/s of `gl-ray train` (in this process) from its summary."""
    from gl_ray.train.driver import launch_run

    cfg = load_config("pipelines/configs/tiny-growlength.yaml", [
        f"name={name}", f"data.path={data}", f"ray.storage_path={storage}", f"model.preset={preset}",
        f"schedule.lengths=[{seq_len}]", "schedule.ratios=[1.0]", f"model.max_position_embeddings={max(2048, seq_len)}",
        f"schedule.tokens_per_step={tokens_per_step}", f"train.micro_batch_tokens={tokens_per_step}",
        f"schedule.budget_tokens={steps * tokens_per_step}", "schedule.budget_time_s=0", "optim.warmup_tokens=0",
        "train.eval_every_tokens=0", "train.checkpoint_every_tokens=0", "data.eval_tokens=2048",
        f"ray.num_workers={workers}", f"ray.cpus_per_worker={os.cpu_count()}"])
    summary = launch_run(cfg, quiet=True)
    st = summary["stages"][0]
    return st["tokens"] / st["wall_s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="data/stdlib")
    ap.add_argument("--preset", default="pythia-14m")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--tokens-per-step", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    args = (a.data, a.preset, a.seq_len, a.tokens_per_step, a.steps)
    arms = {"bare": lambda k, tmp: bare(*args),
            "no-ray": lambda k, tmp: gl_ray_run(*args, workers=0, storage=tmp, name=f"noray-{k}"),
            "ray": lambda k, tmp: gl_ray_run(*args, workers=1, storage=tmp, name=f"ray-{k}")}
    rates: dict[str, list[float]] = {arm: [] for arm in arms}
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(a.rounds):
            for arm in (list(arms) if k % 2 == 0 else list(arms)[::-1]):
                rates[arm].append(arms[arm](k, tmp))
                print(f"[bare_loop] round {k + 1}/{a.rounds} {arm}: {rates[arm][-1]:,.0f} tokens/s", flush=True)
    doc = {"args": vars(a), "cpus": os.cpu_count(), "tokens_per_s": rates,
           "ratio_to_bare": {arm: [r / b for r, b in zip(rates[arm], rates["bare"])] for arm in ("no-ray", "ray")}}
    doc["median_ratio"] = {arm: statistics.median(v) for arm, v in doc["ratio_to_bare"].items()}
    print(json.dumps(doc["median_ratio"]))
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
