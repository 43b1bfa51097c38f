"""The first report window's data wait: `make demo`'s run (tiny-growlength on local Ray, 2 workers) with
data.head_steps=0 (every step from Ray Data, as before issue 38) and with the default (the first steps read by
each worker while Ray Data starts), alternating. Each run is `gl-ray train` in a process of its own with a local
Ray of its own, as `make demo` is: in one Ray instance, later runs find Ray Data's worker processes warm.

    python -m benchmarks.first_window --data data/stdlib [--repeats 2] [--budget-tokens 1048576]

Per run: data_wait_frac of the first report window, the mean of the later windows, and the wall time of the
first window (elapsed_s of its report). Prints a Markdown table and the medians per arm.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile

from gl_ray.train.outputs import read_metrics


def one_run(data: str, storage: str, name: str, head_steps: int | None, budget_tokens: int) -> dict:
    sets = [f"data.path={data}", f"ray.storage_path={storage}", f"name={name}",
            f"schedule.budget_tokens={budget_tokens}"]
    if head_steps is not None:
        sets.append(f"data.head_steps={head_steps}")
    subprocess.run([sys.executable, "-m", "gl_ray", "train", "--config", "tiny-growlength",
                    *[a for kv in sets for a in ("--set", kv)]], check=True, stdout=subprocess.DEVNULL)
    reports = list(read_metrics(f"{storage}/{name}"))
    later = [m["data_wait_frac"] for m in reports[1:]]
    return {"first_wait": reports[0]["data_wait_frac"], "later_wait": statistics.mean(later) if later else 0.0,
            "first_window_s": reports[0]["elapsed_s"], "loss_first": reports[0]["loss"]}


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.first_window")
    p.add_argument("--data", default="data/stdlib")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--budget-tokens", type=int, default=1048576)
    args = p.parse_args()
    arms = {"head_steps=0 (Ray Data from the first step)": 0, "default (head_steps=8)": None}
    rows = []
    with tempfile.TemporaryDirectory() as storage:
        for r in range(args.repeats):
            order = list(arms.items()) if r % 2 == 0 else list(arms.items())[::-1]
            for label, head in order:
                res = one_run(args.data, storage, f"fw-{r}-{head}", head, args.budget_tokens)
                rows.append((label, res))
                print(f"{label}: {res}", flush=True)
    print("\n| arm | first window wait | later windows' wait | first window s | first-window loss |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for label, res in rows:
        print(f"| {label} | {100 * res['first_wait']:.1f}% | {100 * res['later_wait']:.2f}% | "
              f"{res['first_window_s']:.1f} | {res['loss_first']:.4f} |")
    for label in arms:
        mine = [res["first_wait"] for lab, res in rows if lab == label]
        print(f"median first-window wait, {label}: {100 * statistics.median(mine):.1f}%")


if __name__ == "__main__":
    main()
