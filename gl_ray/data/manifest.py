"""The on-disk dataset format `gl-ray-shards/1`, written by `gl-ray prepare` and read by training.

    DEST/manifest.json   written last: its presence means the dataset is complete
    DEST/tokenizer/      a Hugging Face tokenizer folder (AutoTokenizer.from_pretrained works, eos set)
    DEST/train/shard-00000-0000.parquet, DEST/val/shard-00000-0000.parquet, ...   (shard-UNIT-K: see prepare)

manifest.json:
    {"format": "gl-ray-shards/1", "tokenizer": "tokenizer", "vocab_size": int, "eos_token_id": int,
     "source": str, "replaced_chars": int, "skipped_empty": int,
     "splits": {"train": {"documents": int, "tokens": int,
                          "shards": [{"path": "train/shard-00000-0000.parquet", "rows": int, "tokens": int}, ...]},
                "val": {...}}}

Each shard holds one row per document, in the order training reads them:
    input_ids:  list<int32>   the document's token ids, ending with eos_token_id
    num_tokens: int32         len(input_ids), so the stream index is built without reading the tokens
`tokens` counts every token, EOS included; split totals equal the sums over their shards.
A dataset prepared with `--recall` adds two list<int32> columns (recall_targets, recall_distances) and a
"recall" entry to manifest.json: see gl_ray.data.recall.
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from gl_ray import storage
from gl_ray.errors import UserError

FORMAT = "gl-ray-shards/1"
SPLITS = ("train", "val")
MAX_VOCAB = 1 << 22  # 4M ids: above any tokenizer in use; a bigger vocab_size is a corrupt manifest
SHARD_SCHEMA = pa.schema([("input_ids", pa.list_(pa.int32())), ("num_tokens", pa.int32())])


@dataclass(frozen=True)
class ShardInfo:
    uri: str  # full location of the Parquet file
    path: str  # relative path as in the manifest
    rows: int
    tokens: int


@dataclass(frozen=True)
class Manifest:
    root: str
    vocab_size: int
    eos_token_id: int
    tokenizer_uri: str
    splits: dict  # split -> {"documents", "tokens", "shards": [ShardInfo]}
    raw: dict

    def shards(self, split: str) -> list[ShardInfo]:
        return self.splits[split]["shards"]

    def tokens(self, split: str) -> int:
        return self.splits[split]["tokens"]


def _safe_relpath(root: str, rel: str, what: str) -> str:
    """A manifest path must stay inside the dataset folder."""
    if not isinstance(rel, str) or not rel or rel.startswith("/") or "\\" in rel or "://" in rel or "\x00" in rel:
        raise UserError(f"manifest {what} path {rel!r} must be a relative path inside {root!r}")
    norm = posixpath.normpath(rel)
    if norm == ".." or norm.startswith("../"):
        raise UserError(f"manifest {what} path {rel!r} escapes the dataset folder {root!r}")
    return storage.join(root, norm)


def load_manifest(root: str) -> Manifest:
    """Read and check manifest.json (structure and totals; shards are checked by check_shards)."""
    uri = storage.join(root, "manifest.json")
    if not storage.exists(uri):
        raise UserError(f"no dataset at {root!r} (manifest.json missing); run `gl-ray prepare --out {root}` first")
    try:
        raw = json.loads(storage.read_bytes(uri))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"manifest {uri!r} is not valid JSON") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise UserError(f"manifest {uri!r} has format {raw.get('format') if isinstance(raw, dict) else None!r}, "
                        f"expected {FORMAT!r}")
    try:
        vocab, eos = int(raw["vocab_size"]), int(raw["eos_token_id"])
        splits = {}
        for split in SPLITS:
            s = raw["splits"][split]
            shards = [ShardInfo(_safe_relpath(root, sh["path"], "shard"), sh["path"], int(sh["rows"]),
                                int(sh["tokens"])) for sh in s["shards"]]
            splits[split] = {"documents": int(s["documents"]), "tokens": int(s["tokens"]), "shards": shards}
        tok = _safe_relpath(root, raw["tokenizer"], "tokenizer")
    except (KeyError, TypeError, ValueError, OverflowError) as e:
        raise UserError(f"manifest {uri!r} is missing or has a bad field: {e}") from None
    if not (1 <= vocab <= MAX_VOCAB and 0 <= eos < vocab):  # bounded before it sizes an embedding table
        raise UserError(f"manifest {uri!r}: vocab_size {raw['vocab_size']!r} must be in [1, {MAX_VOCAB:,}] and "
                        f"eos_token_id {raw['eos_token_id']!r} in [0, vocab_size)")
    for split, s in splits.items():
        if sum(sh.tokens for sh in s["shards"]) != s["tokens"]:
            raise UserError(f"manifest {uri!r}: {split} tokens {s['tokens']} differ from the sum over its shards")
        if sum(sh.rows for sh in s["shards"]) != s["documents"]:
            raise UserError(f"manifest {uri!r}: {split} documents {s['documents']} differ from the sum of shard rows")
    if not splits["train"]["tokens"]:
        raise UserError(f"dataset {root!r} has no training tokens")
    return Manifest(root, vocab, eos, tok, splits, raw)


def read_shard_lengths(shard: ShardInfo, vocab_size: int) -> pa.Array:
    """Check one shard against its manifest entry and return its document lengths (num_tokens column).

    Reads only the Parquet footer and the small num_tokens column; the token-id range comes from the footer's
    column statistics, so a token id >= vocab_size is caught without reading the tokens.
    """
    fs, path = storage.resolve(shard.uri)
    try:
        pf = pq.ParquetFile(path, filesystem=fs)
    except FileNotFoundError:
        raise UserError(f"shard {shard.uri!r} is missing") from None
    except (OSError, pa.ArrowInvalid) as e:
        if not storage.exists(shard.uri):
            raise UserError(f"shard {shard.uri!r} is missing") from None
        raise UserError(f"shard {shard.uri!r} is not a readable Parquet file ({str(e).splitlines()[0]})") from None
    schema = pf.schema_arrow
    for name in SHARD_SCHEMA.names:
        if name not in schema.names or not schema.field(name).type.equals(SHARD_SCHEMA.field(name).type):
            got = schema.field(name).type if name in schema.names else "missing"
            raise UserError(f"shard {shard.uri!r}: column {name!r} is {got}, expected "
                            f"{SHARD_SCHEMA.field(name).type}")
    md = pf.metadata
    if md.num_rows != shard.rows:
        raise UserError(f"shard {shard.uri!r} has {md.num_rows} rows but the manifest says {shard.rows}")
    leaf = schema.names.index("input_ids")
    for rg in range(md.num_row_groups):
        stats = md.row_group(rg).column(leaf).statistics
        if stats is not None and stats.has_min_max and (stats.max >= vocab_size or stats.min < 0):
            raise UserError(f"shard {shard.uri!r} has token ids outside [0, {vocab_size}) "
                            f"(min {stats.min}, max {stats.max})")
    try:
        lengths = pf.read(columns=["num_tokens"]).column("num_tokens").combine_chunks()
    except (OSError, pa.ArrowInvalid) as e:
        raise UserError(f"shard {shard.uri!r} is corrupt ({str(e).splitlines()[0]})") from None
    total = int(pc.sum(lengths).as_py() or 0)
    if total != shard.tokens:
        raise UserError(f"shard {shard.uri!r} holds {total} tokens but the manifest says {shard.tokens}")
    return lengths


def read_shard_tokens(shard: ShardInfo, vocab_size: int) -> pa.Array:
    """All token ids of a shard as one flat int32 array (documents concatenated in row order)."""
    fs, path = storage.resolve(shard.uri)
    try:
        col = pq.read_table(path, filesystem=fs, columns=["input_ids"]).column("input_ids").combine_chunks()
    except (OSError, pa.ArrowInvalid) as e:
        raise UserError(f"shard {shard.uri!r} is corrupt or unreadable ({str(e).splitlines()[0]})") from None
    flat = col.flatten()
    if len(flat) != shard.tokens:
        raise UserError(f"shard {shard.uri!r} holds {len(flat)} tokens but the manifest says {shard.tokens}")
    check_token_ids(flat, vocab_size, shard.uri)
    return flat


def check_token_ids(ids: pa.Array, vocab_size: int, where: str) -> None:
    """Every id in [0, vocab_size), checked on the tokens themselves as they are read (the column statistics
    read_shard_lengths trusts may be missing); UserError naming `where` and the first bad id otherwise."""
    if len(ids) == 0:
        return
    lo, hi = pc.min_max(ids).values()
    if lo.as_py() < 0 or hi.as_py() >= vocab_size:
        bad = ids.to_numpy(zero_copy_only=False)
        first = int(np.flatnonzero((bad < 0) | (bad >= vocab_size))[0])
        raise UserError(f"shard {where!r} has token id {int(bad[first])} (at token {first}) outside the vocab "
                        f"[0, {vocab_size}); it was written with another tokenizer or is corrupt: prepare it again")
