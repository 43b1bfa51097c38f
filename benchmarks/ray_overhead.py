"""Ray overhead: tokens/s of the TorchTrainer loop (1 worker) / tokens/s of the same loop without Ray.

    python -m benchmarks.ray_overhead --data data/stdlib [--presets tiny,pythia-14m] [--budget-tokens 262144]
        [--repeats 3]

Both runs use tiny-growlength.yaml's stages (64 -> 128 -> 256 -> 512) with the given preset and budget, side by
side in one process. Per stage it takes the median tokens/s of the log intervals after the stage's first (the
first includes the stage's data start-up), and reports the ratio per stage and over all stages. With --repeats N
the pair runs N times in alternating order (no Ray first, then Ray first, ...) so a drift of the shared machine's
speed falls on both sides; the headline is the median of the N ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile

from gl_ray.config import load_config
from gl_ray.train.driver import launch_run
from gl_ray.train.outputs import read_metrics


def steady_tokens_per_s(run_uri: str) -> dict[int, float]:
    by_stage: dict[int, list[float]] = {}
    for m in read_metrics(run_uri):
        by_stage.setdefault(m["seq_len"], []).append(m["tokens_per_s"])
    return {L: statistics.median(v[1:] or v) for L, v in by_stage.items()}


def measure(data: str, preset: str, budget: int, workers: int, storage: str, tag: str = "") -> dict[int, float]:
    # Ray gives a worker OMP_NUM_THREADS = its CPUs: reserve every core so both runs use the same threads
    name = f"{preset}-w{workers}{tag}"
    cfg = load_config("pipelines/configs/tiny-growlength.yaml", [
        f"name={name}", f"data.path={data}", f"ray.storage_path={storage}", f"model.preset={preset}",
        f"schedule.budget_tokens={budget}", f"ray.num_workers={workers}", "train.log_every_steps=2",
        "train.eval_every_tokens=0", "train.checkpoint_every_tokens=0", f"ray.cpus_per_worker={os.cpu_count()}"])
    launch_run(cfg, quiet=True)
    return steady_tokens_per_s(f"{storage}/{name}")


def compare(local: dict[int, float], ray_: dict[int, float]) -> dict:
    return {"no_ray_tokens_per_s": local, "ray_1_worker_tokens_per_s": ray_,
            "ratio_per_stage": {L: ray_[L] / local[L] for L in local},
            "ratio_mean_tokens_per_s": statistics.mean(ray_.values()) / statistics.mean(local.values())}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", default="data/stdlib")
    p.add_argument("--presets", default="tiny,pythia-14m")
    p.add_argument("--budget-tokens", type=int, default=262144)
    p.add_argument("--repeats", type=int, default=1, help="pairs of runs per preset, in alternating order")
    a = p.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as storage:
        for preset in a.presets.split(","):
            pairs = []
            for i in range(a.repeats):
                order = (0, 1) if i % 2 == 0 else (1, 0)
                got = {w: measure(a.data, preset, a.budget_tokens, w, storage, f"-r{i}") for w in order}
                pairs.append(compare(got[0], got[1]))
                print(f"{preset} repeat {i + 1}/{a.repeats} ({'no Ray first' if order[0] == 0 else 'Ray first'}): "
                      f"ratio {pairs[-1]['ratio_mean_tokens_per_s']:.3f}", flush=True)
            ratios = [r["ratio_mean_tokens_per_s"] for r in pairs]
            results[preset] = {"repeats": pairs, "ratios": ratios, "median_ratio": statistics.median(ratios)}
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
