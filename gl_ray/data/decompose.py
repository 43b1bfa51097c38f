"""Dataset decomposition (data.packing: decompose; Pouransari et al. 2024): every document is cut into chunks whose
lengths are powers of two, and each optimizer step takes its whole batch from one bucket (chunks of one length),
so a row never spans two documents. Pure numpy (no I/O, no Ray).

A document of n tokens becomes n // max_len chunks of max_len, then the binary decomposition of the rest, longest
first (1,300 tokens with max_len 1,024: 1,024 + 256 + 16 + 4); chunks shorter than min_len are left out and
counted. Bucket L lists its chunks' flat offsets (manifest order), in document order.

Step s of the run draws its bucket by a seeded rule of (seed, s) from the odds of its stage: the buckets up to
the stage's length, in proportion to their tokens (a ladder of stages is a length curriculum; one stage at the
longest length is the paper's baseline, uniform by tokens). The k-th step that draws bucket L takes its next
tokens_per_step / L chunks, wrapping around a bucket it has used up (a later pass over it). Every worker and every
resume computes the same draws, whatever the world size.

    buckets = Buckets.of(stream.doc_lengths, stream.doc_offsets, max_len=1024, min_len=16)
    draws = StepDraws(buckets, [256, 1024], [100, 100], tokens_per_step=65536, seed=0)
    L, starts = draws.step_rows(step=12, rank=0, world_size=2)   # this worker's chunks of step 12
    rows = stream.flat_rows(starts, L)                            # int32 [len(starts), L]
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gl_ray.errors import UserError


def chunk_lengths(n: int, max_len: int, min_len: int = 1) -> tuple[list[int], int]:
    """The chunk lengths of a document of n tokens, in order, and the tokens left out (chunks below min_len)."""
    out = [max_len] * (n // max_len)
    rest, dropped = n % max_len, 0
    bit = max_len // 2
    while bit >= 1:
        if rest & bit:
            if bit >= min_len:
                out.append(bit)
            else:
                dropped += bit
        bit //= 2
    return out, dropped


@dataclass(frozen=True)
class Buckets:
    """Chunk offsets per bucket length (flat manifest-order token offsets, document order) and what was left out."""

    starts: dict[int, np.ndarray]  # bucket length -> int64 offsets of its chunks
    dropped_tokens: int  # in chunks shorter than min_len
    dropped_chunks: int

    @classmethod
    def of(cls, doc_lengths: np.ndarray, doc_offsets: np.ndarray, max_len: int, min_len: int) -> Buckets:
        check_lengths(max_len, min_len)
        lengths = np.asarray(doc_lengths, dtype=np.int64)
        offsets = np.asarray(doc_offsets, dtype=np.int64)
        full, rest = lengths // max_len, lengths % max_len
        # chunk starts per document: its full chunks, then each set bit of the rest, longest first (by bit)
        pieces: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}  # length -> [(doc index, start)]
        docs = np.repeat(np.arange(len(lengths)), full)
        within = np.arange(len(docs)) - np.repeat(np.cumsum(full) - full, full)
        pieces[max_len] = [(docs, offsets[docs] + within * max_len)]
        dropped_tokens = dropped_chunks = 0
        bit = max_len // 2
        while bit >= 1:
            has = (rest & bit) != 0
            if bit >= min_len:
                idx = np.flatnonzero(has)
                before = rest[idx] & ~(2 * bit - 1)  # the longer pieces of the rest come first
                pieces.setdefault(bit, []).append((idx, offsets[idx] + full[idx] * max_len + before))
            else:
                dropped_tokens += int(has.sum()) * bit
                dropped_chunks += int(has.sum())
            bit //= 2
        starts = {}
        for length, parts in pieces.items():
            doc = np.concatenate([p[0] for p in parts])
            start = np.concatenate([p[1] for p in parts])
            starts[length] = start[np.lexsort((start, doc))].astype(np.int64)  # document order
        return cls({k: v for k, v in sorted(starts.items()) if len(v)}, dropped_tokens, dropped_chunks)

    def tokens(self) -> dict[int, int]:
        return {L: int(len(s)) * L for L, s in self.starts.items()}


def check_lengths(max_len: int, min_len: int) -> None:
    for name, v in (("the longest bucket", max_len), ("data.min_chunk", min_len)):
        if v < 1 or v & (v - 1):
            raise UserError(f"data.packing=decompose: {name} ({v}) must be a power of two")
    if min_len > max_len:
        raise UserError(f"data.min_chunk={min_len} is above the longest bucket ({max_len}, the last stage length): "
                        "every chunk would be left out")


def stage_odds(buckets: Buckets, stage_len: int) -> dict[int, float]:
    """A stage's bucket odds: the buckets up to its length, in proportion to their tokens."""
    tokens = {L: t for L, t in buckets.tokens().items() if L <= stage_len}
    total = sum(tokens.values())
    if not total:
        raise UserError(f"data.packing=decompose: no chunk of {stage_len} tokens or shorter (raise the stage "
                        "length or lower data.min_chunk)")
    return {L: t / total for L, t in tokens.items()}


class StepDraws:
    """The bucket of every step of a plan and the chunks it takes: a pure function of (buckets, plan, seed)."""

    def __init__(self, buckets: Buckets, stage_lens: list[int], stage_steps: list[int], tokens_per_step: int,
                 seed: int):
        self.buckets, self.tokens_per_step = buckets, tokens_per_step
        self.lengths = np.zeros(sum(stage_steps), dtype=np.int64)
        self.odds = []
        step = 0
        for L_k, n in zip(stage_lens, stage_steps, strict=True):
            odds = stage_odds(buckets, L_k)
            self.odds.append(odds)
            choices, p = np.array(list(odds)), np.array(list(odds.values()))
            for s in range(step, step + n):  # seeded by (seed, step): the same on every worker and resume
                self.lengths[s] = choices[np.random.default_rng([seed, s, 7]).choice(len(choices), p=p)]
            step += n
        for L in np.unique(self.lengths):
            if tokens_per_step % L:
                raise UserError(f"data.packing=decompose: schedule.tokens_per_step={tokens_per_step} is not a "
                                f"multiple of bucket length {L}")
        # the k-th draw of a bucket: how many earlier steps drew it
        self.nth = np.zeros(len(self.lengths), dtype=np.int64)
        for L in np.unique(self.lengths):
            where = np.flatnonzero(self.lengths == L)
            self.nth[where] = np.arange(len(where))

    def step_rows(self, step: int, rank: int, world_size: int) -> tuple[int, np.ndarray]:
        """(bucket length, flat offsets of this worker's chunks) of a global step."""
        L = int(self.lengths[step])
        rows = self.tokens_per_step // L
        if rows % world_size:
            raise UserError(f"data.packing=decompose: bucket {L} gives {rows} rows per step, which do not split "
                            f"over {world_size} workers; raise schedule.tokens_per_step")
        per = rows // world_size
        pool = self.buckets.starts[L]
        first = int(self.nth[step]) * rows + rank * per
        return L, pool[np.arange(first, first + per) % len(pool)]  # a used-up bucket starts over

    def bucket_tokens(self) -> dict[int, int]:
        """Tokens each bucket trains over the whole plan."""
        out = {}
        for L in np.unique(self.lengths):
            out[int(L)] = int((self.lengths == L).sum()) * self.tokens_per_step
        return out


_DRAWS: dict[tuple, StepDraws] = {}


def draws_for(root: str, plan, seed: int, min_len: int) -> StepDraws:
    """The run's StepDraws over a prepared dataset's train split, built once per process (the driver and each
    worker compute the same)."""
    from gl_ray.data.stream import get_stream

    key = (root, seed, min_len, tuple((st.seq_len, st.steps) for st in plan.stages), plan.tokens_per_step)
    if key not in _DRAWS:
        stream = get_stream(root, "train", seed)
        buckets = Buckets.of(stream.doc_lengths, stream.doc_offsets, max_len=plan.final_len, min_len=min_len)
        _DRAWS[key] = StepDraws(buckets, [st.seq_len for st in plan.stages], [st.steps for st in plan.stages],
                                plan.tokens_per_step, seed)
    return _DRAWS[key]
