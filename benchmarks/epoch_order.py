"""Later epochs at speed: the stream arithmetic of a shuffled epoch, document by document vs blocks of documents.

    python -m benchmarks.epoch_order [--tokens 32000000] [--mean-doc-lens 32,256,1500]

A later epoch reads the corpus in a shuffled order; `stream_segments` maps each read to slices of the
manifest-order token array. Shuffled document by document (before blocks), every document is a slice, so short
documents make many tiny slices; shuffled in blocks of ~16k tokens (`block_pieces`), a read is a few long
slices as in epoch 0. In memory (no shard decoding, which `prepare_scale`'s read numbers include): tokens/s of
reading one epoch in 131,072-token reads, epoch 0 (seed 0: one slice per read) against epoch 1 both ways.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from gl_ray.data.packing import block_pieces, stream_segments

READ = 2048 * 64  # tokens per read: a step of 64 rows of 2048


def epoch_speed(lengths: np.ndarray, offsets: np.ndarray, shard_pieces: list[int], flat: np.ndarray,
                first: int) -> float:
    cache: dict = {}
    total = int(lengths.sum())
    t0, n = time.perf_counter(), 0
    for a in range(first, first + total, READ):
        segs = stream_segments(lengths, offsets, a, a + READ, 0, cache, shard_pieces)
        n += len(np.concatenate([flat[x:x + k] for x, k in segs]))
    return n / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=32_000_000)
    p.add_argument("--mean-doc-lens", default="32,256,1500")
    a = p.parse_args()
    rng = np.random.default_rng(0)
    out = []
    for mean in [int(x) for x in a.mean_doc_lens.split(",")]:
        lengths = rng.integers(mean // 2, mean * 3 // 2 + 1, a.tokens // mean).astype(np.int64)
        total = int(lengths.sum())
        offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        flat = rng.integers(0, 50_000, total, dtype=np.int32)
        block_lengths, block_offsets, per_shard = block_pieces(lengths, offsets, [len(lengths)])
        epoch0 = epoch_speed(block_lengths, block_offsets, per_shard, flat, 0)  # as TokenStream reads it
        by_doc = epoch_speed(lengths, offsets, [len(lengths)], flat, total)
        blocks = epoch_speed(block_lengths, block_offsets, per_shard, flat, total)
        out.append({"mean_doc_len": mean, "epoch0_tokens_per_s": round(epoch0),
                    "epoch1_documents_over_epoch0": round(by_doc / epoch0, 2),
                    "epoch1_blocks_over_epoch0": round(blocks / epoch0, 2)})
        print(json.dumps(out[-1]), flush=True)


if __name__ == "__main__":
    main()
