"""Packing and stream arithmetic: pure numpy functions of in-memory arrays (no I/O, no Ray).

The train split is one token stream: epoch 0 is the documents in manifest order, each later epoch the same
documents in an order shuffled by (seed, epoch). Stage k owns the contiguous stream slice
[start_token_k, start_token_k + tokens_k) and cuts it into rows of seq_len_k tokens, so no token is read
twice within an epoch and a stage's tokens are all packed (documents run across row boundaries, separated by
their EOS token).

Row layout of a stage: optimizer step s holds sequences_per_step rows; worker r takes the contiguous block of
micro_batch * grad_accum rows at offset r * micro_batch * grad_accum within the step. So the rows of a (stage,
rank, step) cursor are a pure function of the plan, and resume replays nothing and skips nothing.
"""

from __future__ import annotations

import numpy as np


def pack_rows(tokens: np.ndarray, seq_len: int) -> tuple[np.ndarray, int]:
    """Cut a 1-D token array into rows of exactly seq_len: returns (int32 [n, seq_len], tokens dropped)."""
    n = len(tokens) // seq_len
    rows = np.ascontiguousarray(tokens[: n * seq_len], dtype=np.int32).reshape(n, seq_len)
    return rows, len(tokens) - n * seq_len


def concat_documents(docs: list[np.ndarray]) -> np.ndarray:
    """Concatenate documents (each already ending with EOS) into one int32 stream."""
    return np.concatenate(docs).astype(np.int32, copy=False) if docs else np.zeros(0, np.int32)


def epoch_order(num_docs: int, epoch: int, seed: int) -> np.ndarray:
    """Document order of an epoch: manifest order for epoch 0, a seeded permutation after."""
    if epoch == 0:
        return np.arange(num_docs)
    return np.random.default_rng([seed, epoch]).permutation(num_docs)


def stream_segments(doc_lengths: np.ndarray, doc_offsets: np.ndarray, start: int, stop: int, seed: int,
                    order_cache: dict | None = None) -> list[tuple[int, int]]:
    """Map the stream range [start, stop) to (flat_start, length) segments of the manifest-order token array.

    doc_lengths[i], doc_offsets[i]: length and flat offset of document i in manifest order. The stream repeats
    the corpus epoch after epoch (see epoch_order), so any stop is valid. Contiguous pieces are merged.
    """
    total = int(doc_lengths.sum())
    segs: list[tuple[int, int]] = []
    pos = start
    while pos < stop:
        epoch, in_epoch = divmod(pos, total)
        take = min(stop - pos, total - in_epoch)
        if epoch == 0:
            segs.append((in_epoch, take))
        else:
            key = (seed, epoch)
            if order_cache is not None and key in order_cache:
                order, cum = order_cache[key]
            else:
                order = epoch_order(len(doc_lengths), epoch, seed)
                cum = np.concatenate([[0], np.cumsum(doc_lengths[order])])
                if order_cache is not None:
                    order_cache.clear()  # one epoch at a time is enough: stages read forward
                    order_cache[key] = (order, cum)
            i = int(np.searchsorted(cum, in_epoch, side="right")) - 1
            p, end = in_epoch, in_epoch + take
            while p < end:
                doc = int(order[i])
                off = p - int(cum[i])
                n = min(int(doc_lengths[doc]) - off, end - p)
                flat = int(doc_offsets[doc]) + off
                if segs and segs[-1][0] + segs[-1][1] == flat:
                    segs[-1] = (segs[-1][0], segs[-1][1] + n)
                else:
                    segs.append((flat, n))
                p += n
                i += 1
        pos += take
    return segs


def row_token_starts(local_rows: np.ndarray, *, stage_start_token: int, seq_len: int, sequences_per_step: int,
                     rows_per_rank_step: int, rank: int, start_step: int) -> np.ndarray:
    """Stream offset of the first token of each row a worker reads.

    local_rows: 0-based row numbers in the worker's dataset for this stage, which begins at start_step.
    """
    step = start_step + local_rows // rows_per_rank_step
    within = local_rows % rows_per_rank_step
    global_seq = step * sequences_per_step + rank * rows_per_rank_step + within
    return stage_start_token + global_seq * seq_len
