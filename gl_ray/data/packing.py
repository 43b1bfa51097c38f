"""Packing and stream arithmetic: pure numpy functions of in-memory arrays (no I/O, no Ray).

The train split is one token stream: epoch 0 is the documents in manifest order, each later epoch the same
documents in an order shuffled by (seed, epoch) at the level of blocks of consecutive documents
(`document_blocks`, ~BLOCK_TOKENS each), so a later epoch reads long slices as epoch 0 does. Stage k owns the
contiguous stream slice [start_token_k, start_token_k + tokens_k) and cuts it into rows of seq_len_k tokens,
so no token is read twice within an epoch and a stage's tokens are all packed (documents run across row
boundaries, separated by their EOS token).

Row layout of a stage (`RowLayout`): optimizer step s holds sequences_per_step rows; worker r takes the
contiguous block of rows_per_rank_step (= micro_batch * grad_accum) rows at offset r * rows_per_rank_step within
the step. So the rows of a (stage, rank, step) cursor are a pure function of the plan, and resume replays nothing
and skips nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from gl_ray.schedule import Stage


def pack_rows(tokens: np.ndarray, seq_len: int) -> tuple[np.ndarray, int]:
    """Cut a 1-D token array into rows of exactly seq_len: returns (int32 [n, seq_len], tokens dropped)."""
    n = len(tokens) // seq_len
    rows = np.ascontiguousarray(tokens[: n * seq_len], dtype=np.int32).reshape(n, seq_len)
    return rows, len(tokens) - n * seq_len


def concat_documents(docs: list[np.ndarray]) -> np.ndarray:
    """Concatenate documents (each already ending with EOS) into one int32 stream."""
    return np.concatenate(docs).astype(np.int32, copy=False) if docs else np.zeros(0, np.int32)


BLOCK_TOKENS = 16384  # tokens per shuffled block of consecutive documents (a block never spans two shards)


def document_blocks(doc_lengths: np.ndarray, shard_docs: list[int],
                    block_tokens: int = BLOCK_TOKENS) -> tuple[np.ndarray, list[int]]:
    """Group each shard's documents into blocks: a document joins the block in which its first token falls when
    the shard is cut into block_tokens windows. Returns (first document of each block, blocks per shard)."""
    firsts, per_shard, start = [], [], 0
    for n in shard_docs:
        lengths = doc_lengths[start:start + n]
        window = (np.cumsum(lengths) - lengths) // block_tokens
        new = np.flatnonzero(np.diff(window, prepend=-1)) if n else np.zeros(0, np.int64)
        firsts.append(start + new)
        per_shard.append(len(new))
        start += n
    return (np.concatenate(firsts) if firsts else np.zeros(0, np.int64)).astype(np.int64), per_shard


def block_pieces(doc_lengths: np.ndarray, doc_offsets: np.ndarray, shard_docs: list[int],
                 block_tokens: int = BLOCK_TOKENS) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """The blocks of `document_blocks` as pieces of the flat token array, the form `stream_segments` shuffles:
    (lengths, offsets, blocks per shard). Documents that are not back to back in the flat array (a selection of
    a split's documents, `stream.TokenStream`'s doc_filter) also start a new block, so each block is one read."""
    firsts, per_shard = document_blocks(doc_lengths, shard_docs, block_tokens)
    gaps = np.flatnonzero(doc_offsets[1:] != doc_offsets[:-1] + doc_lengths[:-1]) + 1
    if not len(gaps):  # back to back from the first document (not from 0: a selection may start later)
        offsets = doc_offsets[firsts]
        end = int(doc_offsets[-1] + doc_lengths[-1]) if len(doc_lengths) else 0
        return np.diff(np.append(offsets, end)).astype(np.int64), offsets, per_shard
    firsts = np.union1d(firsts, gaps).astype(np.int64)
    per_shard = np.bincount(np.repeat(np.arange(len(shard_docs)), shard_docs)[firsts],
                            minlength=len(shard_docs)).tolist()
    return np.add.reduceat(doc_lengths, firsts).astype(np.int64), doc_offsets[firsts], per_shard


def epoch_order(shard_docs: list[int], epoch: int, seed: int) -> np.ndarray:
    """Document order of an epoch (indices in manifest order), seeded by (seed, epoch).

    shard_docs: documents per shard, in manifest order. The shards come in a seeded order and each shard's
    documents in a seeded order within it, so a shuffled epoch decodes one shard at a time. Seed 0 keeps epoch 0
    in manifest order (front to back, and runs made before seeds varied epoch 0 resume exactly); any other seed
    shuffles epoch 0 too, so repeats differ in data order.
    """
    starts = np.concatenate([[0], np.cumsum(shard_docs)]).astype(np.int64)
    if epoch == 0 and seed == 0:
        return np.arange(starts[-1])
    rng = np.random.default_rng([seed, epoch])
    shards = rng.permutation(len(shard_docs)) if len(shard_docs) > 1 else range(len(shard_docs))
    return np.concatenate([starts[i] + rng.permutation(shard_docs[i]) for i in shards] or [np.zeros(0, np.int64)])


def stream_segments(doc_lengths: np.ndarray, doc_offsets: np.ndarray, start: int, stop: int, seed: int,
                    order_cache: dict | None = None, shard_docs: list[int] | None = None,
                    whole: bool = True) -> list[tuple[int, int]]:
    """Map the stream range [start, stop) to (flat_start, length) segments of the manifest-order token array.

    doc_lengths[i], doc_offsets[i]: length and flat offset of document i in manifest order; shard_docs:
    documents per shard (default: one shard); whole: the documents tile the flat array from 0 (false for a
    selection of them), so epoch 0 of seed 0 is the flat range itself. The stream repeats the corpus epoch after
    epoch in the order epoch_order gives, so any stop is valid. Contiguous pieces are merged.
    """
    total = int(doc_lengths.sum())
    segs: list[tuple[int, int]] = []
    pos = start
    while pos < stop:
        epoch, in_epoch = divmod(pos, total)
        take = min(stop - pos, total - in_epoch)
        if epoch == 0 and seed == 0 and whole:
            segs.append((in_epoch, take))
        else:
            key = (seed, epoch)
            if order_cache is not None and key in order_cache:
                order, cum = order_cache[key]
            else:
                order = epoch_order(shard_docs or [len(doc_lengths)], epoch, seed)
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


@dataclass(frozen=True, kw_only=True)
class RowLayout:
    """The rows one worker reads in one stage, from a stage-local optimizer step on (its resume cursor).

    Local row i (0-based, counted from start_step) belongs to stage step start_step + i // rows_per_rank_step;
    `token_starts` maps local rows to the stream offsets of their first tokens.

        layout = RowLayout.of(plan.stages[1], rank=0, start_step=0)
        starts = layout.token_starts(np.arange(layout.num_rows))
    """

    stage_start_token: int  # stream offset of the stage's slice
    seq_len: int
    sequences_per_step: int  # global, all workers
    rows_per_rank_step: int  # this worker's sequences per optimizer step
    rank: int
    start_step: int  # stage-local optimizer step the first local row belongs to
    stage_steps: int  # optimizer steps of the whole stage
    stage: int = 0  # the stage's index (a mixture's weights and cursors are per stage: gl_ray.data.mixture)

    @classmethod
    def of(cls, stage: Stage, rank: int, start_step: int) -> RowLayout:
        return cls(stage_start_token=stage.start_token, seq_len=stage.seq_len,
                   sequences_per_step=stage.sequences_per_step, rows_per_rank_step=stage.rows_per_rank_step,
                   rank=rank, start_step=start_step, stage_steps=stage.steps, stage=stage.index)

    @property
    def num_rows(self) -> int:
        """Local rows from start_step to the end of the stage."""
        return max(0, self.stage_steps - self.start_step) * self.rows_per_rank_step

    def steps(self, local_rows: np.ndarray) -> np.ndarray:
        """Stage-local optimizer step of each local row."""
        return self.start_step + local_rows // self.rows_per_rank_step

    def global_rows(self, local_rows: np.ndarray) -> np.ndarray:
        """Stage row (0-based, all workers, in step order) of each local row: the same whatever the world size."""
        within = local_rows % self.rows_per_rank_step
        return self.steps(local_rows) * self.sequences_per_step + self.rank * self.rows_per_rank_step + within

    def token_starts(self, local_rows: np.ndarray) -> np.ndarray:
        """Stream offset of the first token of each local row."""
        return self.stage_start_token + self.global_rows(local_rows) * self.seq_len
