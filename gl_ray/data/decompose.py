"""Dataset decomposition (data.packing: decompose; Pouransari et al. 2024): every document is cut into chunks whose
lengths are powers of two, and each optimizer step takes its whole batch from one bucket (chunks of one length),
so a row never spans two documents. Pure numpy (no I/O, no Ray).

A document of n tokens becomes n // max_len chunks of max_len, then the binary decomposition of the rest, longest
first (1,300 tokens with max_len 1,024: 1,024 + 256 + 16 + 4); chunks shorter than min_len are left out and
counted. Bucket L lists its chunks' flat offsets (manifest order), in document order.

Step s of the run draws its bucket by a seeded rule from the curriculum's odds (`StepDraws`: a ladder of stages
over the buckets up to each stage's length, uniform by tokens, the paper's Grow-P2 cycles, or odds of your own).
The k-th step that draws bucket L takes its next
tokens_per_step / L chunks, wrapping around a bucket it has used up (a later pass over it). Every worker and every
resume computes the same draws, whatever the world size.

    buckets = Buckets.of(stream.doc_lengths, stream.doc_offsets, max_len=1024, min_len=16)
    draws = StepDraws(buckets, [256, 1024], [100, 100], tokens_per_step=65536, seed=0, curriculum="ladder")
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


def token_odds(buckets: Buckets, up_to: int) -> dict[int, float]:
    """The buckets up to a length, in proportion to their tokens."""
    tokens = {L: t for L, t in buckets.tokens().items() if L <= up_to}
    total = sum(tokens.values())
    if not total:
        raise UserError(f"data.packing=decompose: no chunk of {up_to} tokens or shorter (raise the stage length or "
                        "lower data.min_chunk)")
    return {L: t / total for L, t in tokens.items()}


def check_odds(odds: dict[int, float], buckets: Buckets) -> None:
    """data.bucket_odds: bucket lengths that exist, odds >= 0 summing to one."""
    for L, p in odds.items():
        if L not in buckets.starts:
            raise UserError(f"data.bucket_odds: there is no bucket {L} (the buckets: "
                            f"{', '.join(map(str, buckets.starts))})")
        if p < 0:
            raise UserError(f"data.bucket_odds.{L} is negative ({p})")
    if abs(sum(odds.values()) - 1) > 1e-6:
        raise UserError(f"data.bucket_odds sum to {sum(odds.values()):.6g}, not 1")


def _draw(rng: np.random.Generator, odds: dict[int, float]) -> int:
    choices, p = list(odds), np.array(list(odds.values()), dtype=np.float64)
    return int(choices[rng.choice(len(choices), p=p / p.sum())])


class StepDraws:
    """The bucket of every step of a plan and the chunks it takes: a pure function of (buckets, plan, data config).

    curriculum (data.curriculum):
      ladder   stage k draws among the buckets up to its length, in proportion to their tokens
      uniform  every step draws among all buckets in proportion to their tokens (the paper's baseline)
      grow_p2  the run is cut into data.cycles cycles; each cycle holds every bucket's share of steps (by tokens)
               and orders them by drawing without replacement with odds x 2 per halving of the length, so
               short chunks come early in each cycle (the paper's Grow-P2; ml-dataset-decomposition's
               32, 16, 8, 4, 2, 1 mix weights)
      odds     every step draws with data.bucket_odds
    """

    def __init__(self, buckets: Buckets, stage_lens: list[int], stage_steps: list[int], tokens_per_step: int,
                 seed: int, curriculum: str = "ladder", odds: dict[int, float] | None = None, cycles: int = 1):
        self.buckets, self.tokens_per_step = buckets, tokens_per_step
        total = sum(stage_steps)
        self.lengths = np.zeros(total, dtype=np.int64)
        if curriculum == "ladder":
            self.odds = [token_odds(buckets, L_k) for L_k in stage_lens]
            step = 0
            for o, n in zip(self.odds, stage_steps, strict=True):
                for s in range(step, step + n):  # seeded by (seed, step): the same on every worker and resume
                    self.lengths[s] = _draw(np.random.default_rng([seed, s, 7]), o)
                step += n
        elif curriculum in ("uniform", "odds"):
            o = token_odds(buckets, max(buckets.starts)) if curriculum == "uniform" else dict(odds or {})
            if curriculum == "odds":
                check_odds(o, buckets)
            self.odds = [o]
            for s in range(total):
                self.lengths[s] = _draw(np.random.default_rng([seed, s, 7]), o)
        elif curriculum == "grow_p2":
            shares = token_odds(buckets, max(buckets.starts))
            longest = max(shares)
            self.odds = [shares]
            bounds = np.linspace(0, total, cycles + 1).round().astype(int)
            for c in range(cycles):
                self.lengths[bounds[c]:bounds[c + 1]] = _cycle(shares, longest, bounds[c + 1] - bounds[c],
                                                               np.random.default_rng([seed, c, 11]))
        else:
            raise UserError(f"data.curriculum={curriculum!r} is not one of ladder | uniform | grow_p2 | odds")
        for L in np.unique(self.lengths):
            if tokens_per_step % L:
                raise UserError(f"data.packing=decompose: schedule.tokens_per_step={tokens_per_step} is not a "
                                f"multiple of bucket length {L}")
        # the k-th draw of a bucket: how many earlier steps drew it
        self.nth = np.zeros(len(self.lengths), dtype=np.int64)
        for L in np.unique(self.lengths):
            where = np.flatnonzero(self.lengths == L)
            self.nth[where] = np.arange(len(where))
    def check_world(self, world_size: int, lengths=None) -> None:
        """Every drawn bucket's rows of a step (or those of `lengths`) split evenly over world_size workers."""
        for L in np.unique(self.lengths if lengths is None else lengths):
            rows = self.tokens_per_step // int(L)
            if rows % world_size:
                raise UserError(f"data.packing=decompose: bucket {L} gives {rows} rows per step, which do not "
                                f"split over {world_size} workers; raise schedule.tokens_per_step")

    def step_rows(self, step: int, rank: int, world_size: int) -> tuple[int, np.ndarray]:
        """(bucket length, flat offsets of this worker's chunks) of a global step."""
        L = int(self.lengths[step])
        self.check_world(world_size, [L])
        rows = self.tokens_per_step // L
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


def _cycle(shares: dict[int, float], longest: int, steps: int, rng: np.random.Generator) -> np.ndarray:
    """One Grow-P2 cycle: each bucket's share of `steps` (largest remainders), ordered by drawing without
    replacement with odds of remaining steps x 2 per halving of the length below the longest."""
    exact = {L: steps * p for L, p in shares.items()}
    count = {L: int(v) for L, v in exact.items()}
    for L in sorted(exact, key=lambda L: count[L] - exact[L])[:steps - sum(count.values())]:
        count[L] += 1
    out = np.zeros(steps, dtype=np.int64)
    for i in range(steps):
        left = {L: n * (longest // L) for L, n in count.items() if n}
        out[i] = _draw(rng, left)
        count[int(out[i])] -= 1
    return out


_DRAWS: dict[tuple, StepDraws] = {}


def draws_for(data, plan) -> StepDraws:
    """The run's StepDraws over a prepared dataset's train split (data: the run's DataConfig), built once per
    process (the driver and each worker compute the same)."""
    from gl_ray.data.stream import get_stream

    odds = tuple(sorted(data.bucket_odds.items()))
    key = (data.path, data.seed, data.min_chunk, data.curriculum, odds, data.cycles,
           tuple((st.seq_len, st.steps) for st in plan.stages), plan.tokens_per_step)
    if key not in _DRAWS:
        stream = get_stream(data.path, "train", data.seed)
        buckets = Buckets.of(stream.doc_lengths, stream.doc_offsets, max_len=plan.final_len, min_len=data.min_chunk)
        _DRAWS[key] = StepDraws(buckets, [st.seq_len for st in plan.stages], [st.steps for st in plan.stages],
                                plan.tokens_per_step, data.seed, data.curriculum, dict(data.bucket_odds),
                                data.cycles)
    return _DRAWS[key]


def accounting(draws: StepDraws, data) -> dict:
    """For plan.json and `gl-ray plan --json`: the tokens of each bucket, what data.min_chunk left out, the
    curriculum's odds (per stage for ladder, else the run's) and the tokens each bucket trains."""
    b = draws.buckets
    return {"tokens": {str(k): v for k, v in b.tokens().items()}, "left_out_tokens": b.dropped_tokens,
            "left_out_chunks": b.dropped_chunks, "min_chunk": data.min_chunk, "curriculum": data.curriculum,
            "odds": [{str(k): round(v, 6) for k, v in o.items()} for o in draws.odds],
            "trained_tokens": {str(k): v for k, v in draws.bucket_tokens().items()}}


def format_buckets(draws: StepDraws, data, time_mode: bool = False) -> str:
    """The bucket table `gl-ray plan` and `gl-ray train` print, and one line per bucket trained more than once
    (time_mode: the plan's steps are caps, so these are the most each bucket can train)."""
    b, trained = draws.buckets, draws.bucket_tokens()
    most = "at most " if time_mode else ""
    odds_cols = [f"odds{k}" if len(draws.odds) > 1 else "odds" for k in range(len(draws.odds))]
    rows = [f"{'bucket':>7} {'chunks':>10} {'tokens':>14} " + " ".join(f"{c:>7}" for c in odds_cols)
            + f" {'trained' + (' (max)' if time_mode else ''):>14}"]
    for L, starts in b.starts.items():
        rows.append(f"{L:>7} {len(starts):>10,} {len(starts) * L:>14,} "
                    + " ".join(f"{o.get(L, 0.0):>7.3f}" for o in draws.odds) + f" {trained.get(L, 0):>14,}")
    rows.append(f"decompose ({data.curriculum}): {b.dropped_tokens:,} tokens in {b.dropped_chunks:,} chunks under "
                f"data.min_chunk={data.min_chunk} left out")
    have = b.tokens()
    rows += [f"data.packing=decompose: bucket {L} trains {most}{t:,} tokens but holds {have[L]:,}: its chunks are "
             f"used {most}{t / have[L]:.1f} times" for L, t in trained.items() if t > have[L]]
    return "\n".join(rows)
