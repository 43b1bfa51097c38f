"""Where the Ray arm of `bare_loop` loses time: CPU per process and per thread in steady state, beside the bare loop.

    python -m benchmarks.ray_background --data data/stdlib [--steps 80] [--delay 60] [--window 40] [--out F.json]

Runs, one after another: the bare loop, the same run on local Ray Train (1 worker holding every core) while a
sampler reads /proc over `--window` seconds starting `--delay` seconds in (steady state: after start-up), then the
bare loop again. Prints the rates, the Ray/bare ratio, the CPU share of each process (top 15) and of each thread of
the Ray train worker, as one JSON object. The shapes are bare_loop's (pythia-14m, L=512, 8,192 tokens per step).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time

from benchmarks.bare_loop import bare, gl_ray_run

HZ = os.sysconf("SC_CLK_TCK")


def _ticks(stat_path: str) -> int:
    fields = open(stat_path).read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def _processes() -> dict[str, tuple[int, str]]:
    out = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            name = open(f"/proc/{pid}/cmdline").read().replace("\0", " ").strip()[:80]
            out[pid] = (_ticks(f"/proc/{pid}/stat"), name or open(f"/proc/{pid}/comm").read().strip())
        except OSError:
            continue
    return out


def _threads(pid: str) -> dict[str, tuple[int, str]]:
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            out[tid] = (_ticks(f"/proc/{pid}/task/{tid}/stat"), open(f"/proc/{pid}/task/{tid}/comm").read().strip())
        except OSError:
            continue
    return out


def _share(a: dict, b: dict, seconds: float, top: int) -> list[list]:
    rows = sorted(((b[k][0] - a[k][0]) / HZ / seconds * 100, b[k][1]) for k in b if k in a)[::-1]
    return [[round(pct, 1), name] for pct, name in rows[:top]]


def sample(delay: float, window: float, out: dict) -> None:
    time.sleep(delay)
    procs = _processes()
    worker = next((p for p, (_, name) in procs.items() if "RayTrainWorker" in name), None)
    threads = _threads(worker) if worker else {}
    t0 = time.time()
    time.sleep(window)
    dt = time.time() - t0
    out["processes_pct"] = _share(procs, _processes(), dt, 15)
    out["train_worker_threads_pct"] = _share(threads, _threads(worker), dt, 8) if worker else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="data/stdlib")
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--delay", type=float, default=60.0)
    p.add_argument("--window", type=float, default=40.0)
    p.add_argument("--out", default="")
    a = p.parse_args()
    args = (a.data, "pythia-14m", 512, 8192, a.steps)
    res: dict = {"steps": a.steps, "cpus": os.cpu_count()}
    res["bare_1"] = bare(*args)
    sampled: dict = {}
    sampler = threading.Thread(target=sample, args=(a.delay, a.window, sampled))
    sampler.start()
    with tempfile.TemporaryDirectory() as tmp:
        res["ray"] = gl_ray_run(*args, workers=1, storage=tmp, name="ray")
    sampler.join()
    res["bare_2"] = bare(*args)
    res["ray_over_bare"] = round(res["ray"] / ((res["bare_1"] + res["bare_2"]) / 2), 3)
    res.update(sampled)
    text = json.dumps(res)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
