"""Reading the token stream of a prepared dataset (no Ray): stage rows for training, blocks for evaluation.

    stream = get_stream("data/stdlib", "train", seed=0)
    rows = stream.rows(np.array([0, 128, 256]), seq_len=128)   # int32 [3, 128]
    layout = RowLayout.of(plan.stages[1], rank=0, start_step=0)
    for rows in stage_steps(stream, layout): ...   # one optimizer step's rows of this worker at a time

`stage_steps` is the Ray-free twin of `gl_ray.data.pipeline.stage_dataset`: both yield the same rows in the
same order (see `gl_ray.data.packing.RowLayout` for the layout).
"""

from __future__ import annotations

import copy
import threading
from collections import OrderedDict
from collections.abc import Iterator

import numpy as np

from gl_ray.data.manifest import load_manifest, read_shard_lengths, read_shard_tokens
from gl_ray.data.packing import RowLayout, block_pieces, pack_rows, stream_segments
from gl_ray.errors import UserError
from gl_ray.schedule import Plan

_SHARDS_CACHED = 4  # decoded shards kept per process (a shard is ~64 MB at the default 16M tokens)


DocFilter = tuple[int, int | None]  # document lengths [lo, hi) in tokens (hi None: no upper bound)


class TokenStream:
    """The token stream of one split, epoch after epoch in the order data.seed gives (epoch_order over blocks of
    documents, see document_blocks). doc_filter (lo, hi): only the documents of lo <= length < hi tokens, the
    same stream rules over that selection (data.long_doc_boost's views, gl_ray.data.mixture); reads still go to
    flat (manifest-order) offsets, and doc_lengths/doc_offsets are the selected documents'."""

    def __init__(self, root: str, split: str, seed: int = 0, doc_filter: DocFilter | None = None):
        self.manifest = load_manifest(root)
        self.split, self.seed = split, seed
        self.shards = self.manifest.shards(split)
        lengths = [np.asarray(read_shard_lengths(sh, self.manifest.vocab_size), dtype=np.int64)
                   for sh in self.shards]
        self.shard_starts = np.concatenate([[0], np.cumsum([sh.tokens for sh in self.shards])]).astype(np.int64)
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._index(np.concatenate(lengths) if lengths else np.zeros(0, np.int64), doc_filter)

    def _index(self, all_lengths: np.ndarray, doc_filter: DocFilter | None) -> None:
        """The documents this stream holds (all of the split's, or those doc_filter keeps) and their blocks."""
        offsets = (np.cumsum(all_lengths) - all_lengths).astype(np.int64)  # flat offset of each document
        keep = np.ones(len(all_lengths), bool)
        if doc_filter is not None:
            lo, hi = doc_filter
            keep = (all_lengths >= lo) & (all_lengths < (hi if hi is not None else np.inf))
        self.doc_filter = doc_filter
        self.doc_lengths, self.doc_offsets = all_lengths[keep], offsets[keep]
        ends = np.cumsum([sh.rows for sh in self.shards]).astype(np.int64)
        kept = np.concatenate([[0], np.cumsum(keep)]).astype(np.int64)
        self.shard_docs = np.diff(np.concatenate([[0], kept[ends]])).tolist()  # documents kept per shard
        self.block_lengths, self.block_offsets, self.shard_blocks = block_pieces(  # what later epochs shuffle
            self.doc_lengths, self.doc_offsets, self.shard_docs)
        self.tokens = int(self.doc_lengths.sum())
        self._orders: dict = {}

    def select(self, doc_filter: DocFilter) -> TokenStream:
        """A view of this (whole) stream's documents of lo <= length < hi tokens, sharing its decoded shards."""
        assert self.doc_filter is None, "select from the whole split"
        view = copy.copy(self)
        view._index(self.doc_lengths, doc_filter)
        return view

    def _shard(self, i: int) -> np.ndarray:
        if i in self._cache:
            self._cache.move_to_end(i)
            return self._cache[i]
        arr = read_shard_tokens(self.shards[i], self.manifest.vocab_size).to_numpy(zero_copy_only=False)
        self._cache[i] = arr
        while len(self._cache) > _SHARDS_CACHED:
            self._cache.popitem(last=False)
        return arr

    def _read_flat(self, a: int, b: int) -> np.ndarray:
        """Tokens [a, b) of the manifest-order concatenation of all shards."""
        out = []
        i = int(np.searchsorted(self.shard_starts, a, side="right")) - 1
        while a < b:
            s0, s1 = int(self.shard_starts[i]), int(self.shard_starts[i + 1])
            hi = min(b, s1)
            out.append(self._shard(i)[a - s0: hi - s0])
            a, i = hi, i + 1
        return out[0] if len(out) == 1 else np.concatenate(out)

    def read(self, start: int, stop: int) -> np.ndarray:
        """Stream tokens [start, stop); wraps into later epochs past the end of the split."""
        if self.tokens == 0:
            raise ValueError(f"the {self.split} split is empty")
        segs = stream_segments(self.block_lengths, self.block_offsets, start, stop, self.seed, self._orders,
                               self.shard_blocks, whole=self.doc_filter is None)
        parts = [self._read_flat(a, a + n) for a, n in segs]
        return (parts[0] if len(parts) == 1 else np.concatenate(parts)).astype(np.int32, copy=False)

    def rows(self, starts: np.ndarray, seq_len: int) -> np.ndarray:
        """Rows of seq_len tokens beginning at each stream offset in starts: int32 [len(starts), seq_len]."""
        out = np.empty((len(starts), seq_len), dtype=np.int32)
        i = 0
        while i < len(starts):  # read runs of back-to-back rows in one go
            j = i + 1
            while j < len(starts) and starts[j] == starts[j - 1] + seq_len:
                j += 1
            out[i:j], dropped = pack_rows(self.read(int(starts[i]), int(starts[j - 1]) + seq_len), seq_len)
            assert dropped == 0  # a run of back-to-back rows is a whole number of rows
            i = j
        return out


    def flat_rows(self, starts: np.ndarray, seq_len: int) -> np.ndarray:
        """Rows of seq_len tokens at flat (manifest-order) offsets, e.g. decomposed chunks: int32 [n, seq_len]."""
        out = np.empty((len(starts), seq_len), dtype=np.int32)
        for i, a in enumerate(starts):
            out[i] = self._read_flat(int(a), int(a) + seq_len)
        return out


_STREAMS: dict[tuple, TokenStream] = {}
_BUILDING: dict[tuple, threading.Lock] = {}  # one lock per key: a worker's threads build each stream once


def get_stream(root: str, split: str, seed: int = 0, doc_filter: DocFilter | None = None) -> TokenStream:
    """A per-process cached TokenStream (Ray Data tasks reuse it across batches); a doc_filter view shares the
    whole split's stream and its decoded shards."""
    key = (root, split, seed, doc_filter)
    with _BUILDING.setdefault(key, threading.Lock()):  # setdefault is atomic under the GIL
        if key not in _STREAMS:
            _STREAMS[key] = TokenStream(root, split, seed) if doc_filter is None else \
                get_stream(root, split, seed).select(doc_filter)
    return _STREAMS[key]


def stage_steps(stream: TokenStream, layout: RowLayout) -> Iterator[np.ndarray]:
    """One worker's rows of a stage, a step at a time (int32 [rows_per_rank_step, seq_len]), without Ray. The
    trainer cuts each step into micro batches, so the data does not depend on the micro batch."""
    n = layout.rows_per_rank_step
    for first in range(0, layout.num_rows, n):
        yield stream.rows(layout.token_starts(np.arange(first, first + n)), layout.seq_len)


def decomposed_steps(stream: TokenStream, draws, stage, start_step: int, rank: int = 0,
                     world_size: int = 1) -> Iterator[np.ndarray]:
    """data.packing=decompose: one worker's rows of a stage, a step at a time (int32 [rows, L], L the step's
    bucket), from stage step start_step on; the Ray-free twin of `pipeline.decomposed_dataset`."""
    for s in range(stage.start_step + start_step, stage.end_step):
        length, starts = draws.step_rows(s, rank, world_size)
        yield stream.flat_rows(starts, length)


def check_document_ends(stream: TokenStream, docs: int = 256) -> None:
    """UserError unless the first `docs` documents of the split end with the EOS token (gl-ray's format promises
    it; document masking finds documents by their EOS, so without it rows carry no document boundaries)."""
    n = min(docs, len(stream.doc_lengths))
    if n == 0:
        return
    ends = stream.doc_offsets[:n] + stream.doc_lengths[:n] - 1  # flat (manifest-order) offsets: whatever data.seed
    tokens = stream._read_flat(0, int(ends[-1]) + 1)
    missing = int((tokens[ends] != stream.manifest.eos_token_id).sum())
    if missing:
        raise UserError(f"data.document_masking: {missing} of the first {n} {stream.split} documents of "
                        f"{stream.manifest.root!r} do not end with the EOS token (id {stream.manifest.eos_token_id}), "
                        "so rows carry no document boundaries; prepare the data with `gl-ray prepare` or turn "
                        "masking off")


def stage_accounting(plan: Plan, corpus_tokens: int) -> list[dict]:
    """Per stage: the stream slice it reads and which epochs of the corpus that slice spans. Every token of a
    slice is trained (a slice is a whole number of rows), so the slice is the stage's token count."""
    out = []
    for st in plan.stages:
        a, b = st.start_token, st.start_token + st.tokens
        out.append({"stage": st.index, "seq_len": st.seq_len, "stream_start": a, "stream_stop": b,
                    "epochs": [a // corpus_tokens, max(a, b - 1) // corpus_tokens] if corpus_tokens else None})
    return out
