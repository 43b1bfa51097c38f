"""Packing throughput: the pure packing function, the token-stream row reader, and one stage's Ray Data pipeline.

    python -m benchmarks.packing --data data/stdlib [--seq-len 512] [--tokens 4194304] [--out FILE.json]

Prints JSON: tokens/s for each path. Training needs (tokens/s of the model) << these for data_wait_frac < 5%.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def bench_pack_rows(seq_len: int, tokens: int) -> float:
    """Concatenate documents (~1,000 tokens each, as the stdlib corpus has about 5,000) and cut them into rows."""
    from gl_ray.data.packing import concat_documents, pack_rows

    rng = np.random.default_rng(0)
    flat = rng.integers(0, 8192, tokens, dtype=np.int32)
    cuts = np.sort(rng.choice(tokens, tokens // 1000, replace=False))
    docs = np.split(flat, cuts)
    t0 = time.perf_counter()
    for _ in range(5):
        pack_rows(concat_documents(docs), seq_len)
    return 5 * tokens / (time.perf_counter() - t0)


def bench_stream_rows(data: str, seq_len: int, tokens: int) -> float:
    from gl_ray.data.stream import TokenStream

    stream = TokenStream(data, "train")
    starts = np.arange(0, tokens, seq_len, dtype=np.int64)
    stream.rows(starts[:1], seq_len)  # load the first shard outside the timing
    t0 = time.perf_counter()
    for i in range(0, len(starts), 64):  # micro batches of 64 rows, as training asks for them
        stream.rows(starts[i:i + 64], seq_len)
    return len(starts) * seq_len / (time.perf_counter() - t0)


def bench_ray_stage(data: str, seq_len: int, tokens: int) -> float:
    import ray

    from gl_ray.data.packing import RowLayout
    from gl_ray.data.pipeline import stage_dataset
    from gl_ray.ray_utils import ensure_ray
    from gl_ray.schedule import plan_stages

    ensure_ray(None, num_cpus=4)
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    tokens_per_step = 64 * seq_len
    plan = plan_stages(lengths=[seq_len], ratios=[1.0], tokens_per_step=tokens_per_step,
                       micro_batch_tokens=tokens_per_step, num_workers=1, budget_tokens=tokens)
    ds = stage_dataset(data, 0, RowLayout.of(plan.stages[0], rank=0, start_step=0))
    t0 = time.perf_counter()
    n = 0
    for b in ds.iter_batches(batch_size=64, batch_format="numpy", drop_last=True, prefetch_batches=4):
        n += b["input_ids"].size
    return n / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", default="data/stdlib")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--tokens", type=int, default=4 << 20)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    res = {"seq_len": a.seq_len, "tokens": a.tokens,
           "pack_rows_tokens_per_s": bench_pack_rows(a.seq_len, a.tokens),
           "stream_rows_tokens_per_s": bench_stream_rows(a.data, a.seq_len, a.tokens),
           "ray_stage_tokens_per_s": bench_ray_stage(a.data, a.seq_len, a.tokens)}
    text = json.dumps(res, indent=1)
    print(text)
    if a.out:
        open(a.out, "w").write(text)


if __name__ == "__main__":
    main()
