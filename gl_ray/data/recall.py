"""Recall items for `gl-ray prepare --recall`: targets that only attention far back can predict.

    gl-ray prepare --source stdlib --out data/recall --no-ray \
        --recall target_fraction=0.03,items=64,key_len=1,value_len=2,min_distance=16,max_distance=4096,seed=0

Each document, after tokenization (so distances are exact in tokens), gets key-value pairs inserted into its
token stream. A pair is two blocks of 1 + key_len + value_len tokens, the second `d` tokens after the first:

    ... text  MARK k1..kK v1..vV  text ... (d tokens after MARK) ...  CUE k1..kK v1..vV  text ...
                                                                               ^^^^^^^ targets

The values v after CUE are the recall targets: a fresh random key -> value map per document, so only the earlier
block predicts them. `d` (the distance, in tokens, from each inserted value token to its recalled copy: Zoology's
t-1-j) is log-uniform in [min_distance, max_distance), cut short where the document ends. Keys are unique among pairs
whose spans overlap, so the nearest earlier `MARK key` is the right one. Keys and values are drawn from `items`
token ids; MARK, CUE and the items are distinct ids drawn by `seed` from the upper half of the vocabulary (a
byte-level BPE's latest merges: the rarest pieces), skipping special tokens. The original tokens stay in order and
the last one (EOS) stays last. About `target_fraction` of each document's tokens are targets (the pair count is
rounded at random), so language modelling still dominates; blocks may fill at most 40% of the tokens
(target_fraction <= 0.4 * value_len / (2 * (1 + key_len + value_len))), and a document too short or too dense for
its pairs gets fewer. A document is seeded by (seed, document key) alone: units stay independent and the same
inputs give byte-identical shards. `benchmarks/recall_probe.py` scores a model's top-1 accuracy on the val targets.

SPEC keys (defaults): target_fraction=0.03, items=64, key_len=1, value_len=2, min_distance=16,
max_distance=4096, seed=0. A bad value is a UserError (`gl-ray prepare` exits 2).

What it adds to the dataset format (gl_ray.data.manifest), in both splits:
    shard columns   recall_targets: list<int32>    positions (within the document) of the recalled value tokens
                    recall_distances: list<int32>  the distance d of each of those targets
    manifest.json   "recall": {"spec": {SPEC keys}, "mark_id": int, "cue_id": int, "item_ids": [int],
                               "splits": {"train": COUNTS, "val": COUNTS}}
    COUNTS = {"documents", "documents_with_pairs", "pairs", "target_tokens" (= pairs * value_len),
              "inserted_tokens" (= 2 * pairs * (1 + key_len + value_len); the split's tokens minus these are the
              text's), "distance_hist": {"LO": pairs with LO <= d < 2 * LO, LO a power of two}}
"""

from __future__ import annotations

import bisect
import hashlib
import math
from dataclasses import asdict, dataclass, fields
from typing import NamedTuple

import numpy as np

from gl_ray.errors import UserError

RECALL_COLUMNS = ("recall_targets", "recall_distances")  # the shard columns, in Inserted's order
MAX_BLOCK_SHARE = 0.4  # of a document's tokens in blocks; random placement packs this with few retries
_TRIES_PER_PAIR = 32  # placement draws per wanted pair before a dense document settles for fewer pairs


@dataclass(frozen=True)
class RecallSpec:
    target_fraction: float = 0.03  # share of a document's tokens (after insertion) that are recall targets
    items: int = 64  # token ids keys and values are drawn from (chance of a value token: 1 / items)
    key_len: int = 1  # tokens per key
    value_len: int = 2  # tokens per value (the targets of one pair)
    min_distance: int = 16  # shortest distance, tokens from an inserted value token to its recalled copy
    max_distance: int = 4096  # distances stay below it (set it to the final training length)
    seed: int = 0  # draws the item ids and, with each document's key, its pairs

    def __post_init__(self):
        def bad(key: str, why: str) -> UserError:
            return UserError(f"--recall {key}={getattr(self, key)}: {why}")

        if not 0 < self.target_fraction <= 0.25:
            raise bad("target_fraction", "must be in (0, 0.25]")
        if self.items < 2:
            raise bad("items", "must be at least 2")
        if not 1 <= self.key_len <= 16 or not 1 <= self.value_len <= 64:
            raise bad("key_len" if not 1 <= self.key_len <= 16 else "value_len",
                      "key_len must be in [1, 16] and value_len in [1, 64]")
        if self.min_distance < self.block_len:
            raise bad("min_distance", f"must be at least 1 + key_len + value_len = {self.block_len} (blocks may "
                                      "not overlap)")
        if self.max_distance <= self.min_distance:
            raise bad("max_distance", f"must be more than min_distance={self.min_distance}")
        if self.seed < 0:
            raise bad("seed", "must be >= 0")
        if 2 * self.block_len * self.target_fraction > MAX_BLOCK_SHARE * self.value_len:
            raise bad("target_fraction", f"would fill over {MAX_BLOCK_SHARE:.0%} of the tokens with blocks of "
                                         f"{self.block_len} tokens; lower it to at most "
                                         f"{MAX_BLOCK_SHARE * self.value_len / (2 * self.block_len):.3f}")

    @property
    def block_len(self) -> int:
        """Tokens in one block (MARK or CUE, key, value); a pair inserts two."""
        return 1 + self.key_len + self.value_len

    def to_json(self) -> dict:
        return asdict(self)


def parse_recall_spec(text: str) -> RecallSpec:
    """`KEY=VALUE,...` (empty: the defaults) -> RecallSpec; a UserError names a bad key or value."""
    types = {f.name: f.type for f in fields(RecallSpec)}
    kw: dict = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        key, eq, value = part.partition("=")
        key = key.strip()
        if not eq or key not in types:
            raise UserError(f"--recall {part!r}: expected KEY=VALUE with KEY one of {', '.join(types)}")
        if key in kw:
            raise UserError(f"--recall gives {key} twice; give each key once")
        try:
            kw[key] = float(value) if types[key] == "float" else int(value)
        except ValueError:
            raise UserError(f"--recall {part!r}: {key} must be a {types[key]}") from None
    return RecallSpec(**kw)


@dataclass(frozen=True)
class RecallItems:
    """A spec with its token ids resolved against one tokenizer: what a prepare unit needs."""

    spec: RecallSpec
    mark_id: int
    cue_id: int
    item_ids: tuple[int, ...]

    def to_json(self) -> dict:
        return {"spec": self.spec.to_json(), "mark_id": self.mark_id, "cue_id": self.cue_id,
                "item_ids": list(self.item_ids)}


def resolve_items(spec: RecallSpec, vocab_size: int, special_ids: list[int]) -> RecallItems:
    """MARK, CUE and `items` distinct ids drawn by spec.seed from [vocab_size // 2, vocab_size), no special token."""
    special = set(special_ids)
    pool = np.array([i for i in range(vocab_size // 2, vocab_size) if i not in special], np.int64)
    if len(pool) < spec.items + 2:
        raise UserError(f"--recall items={spec.items}: the tokenizer's upper half holds only {len(pool)} ordinary "
                        f"ids; use at most {len(pool) - 2} items")
    drawn = np.random.default_rng([spec.seed, 0x7EC411]).choice(pool, spec.items + 2, replace=False)
    return RecallItems(spec, int(drawn[0]), int(drawn[1]), tuple(sorted(int(i) for i in drawn[2:])))


def document_rng(seed: int, key: str) -> np.random.Generator:
    """The generator of one document's pairs: a function of (seed, document key) only."""
    digest = hashlib.sha256(f"recall:{seed}:{key}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:16], "big"))


class Inserted(NamedTuple):
    tokens: np.ndarray  # int32 [len(input) + 2 * pairs * block_len], the input's tokens in order around the blocks
    targets: np.ndarray  # int32 [pairs * value_len]: positions of the recalled value tokens
    distances: np.ndarray  # int32 [pairs * value_len]: each target's distance back to its inserted copy


def _distances(rng: np.random.Generator, lo: int, hi: int, size: int) -> np.ndarray:
    """`size` integers in [lo, hi), log-uniform."""
    return np.minimum(hi - 1, np.exp(rng.uniform(math.log(lo), math.log(hi), size)).astype(np.int64))


def _place(n_out: int, pairs: int, rng: np.random.Generator, spec: RecallSpec, n_items: int) -> list[tuple]:
    """Up to `pairs` (start, distance, key) in a token array of n_out, blocks disjoint and before the last token,
    pairs with the same key on disjoint spans."""
    L = spec.block_len
    d_hi = min(spec.max_distance, n_out - L)  # exclusive: a recall block ends before the last token
    if d_hi <= spec.min_distance:
        return []
    busy = np.zeros(n_out, bool)
    spans: dict[tuple, tuple[list[int], list[int]]] = {}  # key -> (starts, ends) of its pairs' disjoint spans
    placed: list[tuple] = []
    tries = pairs * _TRIES_PER_PAIR
    while tries > 0 and len(placed) < pairs:
        n = min(tries, max(64, 2 * (pairs - len(placed))))  # candidates drawn at once
        tries -= n
        ds = _distances(rng, spec.min_distance, d_hi, n)
        starts = (rng.random(n) * (n_out - L - ds)).astype(np.int64)  # recall block ends <= n_out - 2
        keys = rng.integers(0, n_items, (n, spec.key_len))
        for s, d, key in zip(starts.tolist(), ds.tolist(), map(tuple, keys.tolist())):
            if busy[s:s + L].any() or busy[s + d:s + d + L].any():
                continue
            first, last = spans.setdefault(key, ([], []))
            i = bisect.bisect_right(first, s + d + L - 1)  # spans of this key starting at or before our end
            if i and last[i - 1] >= s:
                continue
            busy[s:s + L] = busy[s + d:s + d + L] = True
            first.insert(i, s)
            last.insert(i, s + d + L - 1)
            placed.append((s, d, key))
            if len(placed) == pairs:
                break
    return placed


def insert_recall(tokens: np.ndarray, rng: np.random.Generator, items: RecallItems) -> Inserted:
    """The document `tokens` with key-value pairs inserted (see the module docstring). Pure: the same tokens and
    generator state give the same result."""
    spec, ids = items.spec, np.asarray(items.item_ids, np.int32)
    n, L, K, V = len(tokens), spec.block_len, spec.key_len, spec.value_len
    # pairs P so that P * V targets are target_fraction of the n + 2 * P * L tokens out; the fraction rounds at random
    want = spec.target_fraction * n / (V - 2 * L * spec.target_fraction)
    pairs = int(want) + int(rng.random() < want - int(want))
    placed = _place(n + 2 * pairs * L, pairs, rng, spec, len(ids)) if pairs else []
    while len(placed) < pairs:  # too dense for this document: place fewer (at least 10% fewer) in a shorter array
        pairs = min(len(placed), int(0.9 * pairs))
        placed = _place(n + 2 * pairs * L, pairs, rng, spec, len(ids)) if pairs else []
    out = np.empty(n + 2 * pairs * L, np.int32)
    busy = np.zeros(len(out), bool)
    targets, distances = [], []
    for s, d, key in sorted(placed):
        value = ids[rng.integers(0, len(ids), V)]
        for start, marker in ((s, items.mark_id), (s + d, items.cue_id)):
            out[start] = marker
            out[start + 1:start + 1 + K] = ids[list(key)]
            out[start + 1 + K:start + L] = value
            busy[start:start + L] = True
        targets.append(np.arange(s + d + 1 + K, s + d + L))
        distances.append(np.full(V, d))
    out[~busy] = tokens
    cat = (lambda a: np.concatenate(a).astype(np.int32)) if targets else (lambda a: np.zeros(0, np.int32))
    return Inserted(out, cat(targets), cat(distances))


def new_counts() -> dict:
    """Per-split COUNTS (see the module docstring), all zero."""
    return {"documents": 0, "documents_with_pairs": 0, "pairs": 0, "target_tokens": 0, "inserted_tokens": 0,
            "distance_hist": {}}


def count_document(counts: dict, ins: Inserted, spec: RecallSpec) -> None:
    """Add one document's pairs to COUNTS (in place)."""
    pairs = len(ins.targets) // spec.value_len
    counts["documents"] += 1
    counts["documents_with_pairs"] += pairs > 0
    counts["pairs"] += pairs
    counts["target_tokens"] += len(ins.targets)
    counts["inserted_tokens"] += 2 * pairs * spec.block_len
    hist = counts["distance_hist"]
    for d in ins.distances[::spec.value_len]:  # one per pair
        lo = str(1 << (int(d).bit_length() - 1))
        hist[lo] = hist.get(lo, 0) + 1


def merge_counts(parts: list[dict], sign: list[int] | None = None) -> dict:
    """COUNTS of several units summed (each times its sign: -1 takes a document out); the histogram ordered by
    bucket, empty buckets dropped."""
    total = new_counts()
    for c, sg in zip(parts, sign or [1] * len(parts)):
        for k, v in c.items():
            if k == "distance_hist":
                for lo, m in v.items():
                    total[k][lo] = total[k].get(lo, 0) + sg * m
            else:
                total[k] += sg * v
    total["distance_hist"] = {lo: m for lo, m in sorted(total["distance_hist"].items(), key=lambda kv: int(kv[0]))
                              if m}
    return total
