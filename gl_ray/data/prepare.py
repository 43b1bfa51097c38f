"""`gl-ray prepare`: corpus -> tokenizer -> Parquet token shards + manifest (format: gl_ray.data.manifest).

Tokenization runs as a Ray Data pipeline (`from_items(files) -> map_batches(tokenize)`) so it scales out on
a cluster (or, with `no_ray`, the same batch function in this process, for machines without Ray); the driver
consumes the results in file order, splits train/val by a hash of each document's key, and writes shards as they
fill. Nothing is half-written: a local DEST is built in a temp folder and renamed into place; on S3 the manifest
goes last and a failed run deletes what it wrote.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from gl_ray import storage
from gl_ray.data.corpus import list_source, read_documents, stable_hash
from gl_ray.data.manifest import FORMAT, SHARD_SCHEMA, SPLITS
from gl_ray.data.tokenizer import encode_documents, load_tokenizer, train_bpe
from gl_ray.errors import UserError, unwrap_user_errors

TRAIN_TOKENIZER_MAX_BYTES = 256 << 20  # corpus text the BPE trainer sees at most
FILES_PER_BATCH = 16  # files per tokenize task
PROGRESS_EVERY_S = 10.0  # seconds between progress lines
ONE_DOC_EXTS = (".txt", ".md", ".rst", ".py", ".txt.gz", ".md.gz", ".rst.gz", ".py.gz")  # one document per file


def tokenize_files(batch: dict, tokenizer_json: str, eos_id: int) -> pa.Table:
    """Ray Data batch function: file uris in, one row per document out (key, input_ids, replaced)."""
    keys, texts, replaced = [], [], []
    for uri in batch["uri"]:
        for key, text, bad in read_documents(str(uri)):
            keys.append(key)
            texts.append(text)
            replaced.append(bad)
    ids = encode_documents(texts, tokenizer_json, eos_id)
    return pa.table({"key": pa.array(keys, pa.string()),
                     "input_ids": pa.array(ids, pa.list_(pa.int32())),
                     "empty": pa.array([not t.strip() for t in texts], pa.bool_()),
                     "replaced": pa.array(replaced, pa.int64())})


class ShardWriter:
    """Collects documents of one split and writes shard-NNNNN.parquet files of about shard_tokens each."""

    def __init__(self, out_dir: str, split: str, shard_tokens: int):
        self.out_dir, self.split, self.shard_tokens = out_dir, split, shard_tokens
        self.docs: list[np.ndarray] = []
        self.pending_tokens = 0
        self.shards: list[dict] = []

    def add(self, ids: np.ndarray) -> None:
        self.docs.append(ids)
        self.pending_tokens += len(ids)
        if self.pending_tokens >= self.shard_tokens:
            self.flush()

    def flush(self) -> None:
        if not self.docs:
            return
        rel = f"{self.split}/shard-{len(self.shards):05d}.parquet"
        table = pa.table({"input_ids": pa.array(self.docs, pa.list_(pa.int32())),
                          "num_tokens": pa.array([len(d) for d in self.docs], pa.int32())}, schema=SHARD_SCHEMA)
        uri = storage.join(self.out_dir, rel)
        fs, path = storage.resolve(uri)
        if not storage.is_s3(uri):
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        with storage.errors_at(uri):
            pq.write_table(table, path, filesystem=fs, write_statistics=True)
        self.shards.append({"path": rel, "rows": len(self.docs), "tokens": self.pending_tokens})
        self.docs, self.pending_tokens = [], 0

    def summary(self) -> dict:
        return {"documents": sum(s["rows"] for s in self.shards), "tokens": sum(s["tokens"] for s in self.shards),
                "shards": self.shards}


class Splitter:
    """Sends each document to train or val by a stable hash of its key (the same split on every rerun). Until val
    has a document, train documents wait in order; if none has come by the end (a small corpus) or by one shard's
    worth of waiting tokens, the waiting document with the smallest hash goes to val, so a corpus of two or more
    documents always has a val split. Corpora whose val split fills early are split exactly as by the hash alone."""

    def __init__(self, writers: dict[str, ShardWriter], val_fraction: float, shard_tokens: int):
        self.writers, self.val_fraction, self.shard_tokens = writers, val_fraction, shard_tokens
        self.val_has_doc = val_fraction == 0  # nothing to wait for
        self.waiting: list[tuple[float, np.ndarray]] = []  # (hash, document) in arrival order
        self.waiting_tokens = 0

    def add(self, key: str, ids: np.ndarray) -> None:
        h = stable_hash("split:" + key)
        if h < self.val_fraction:
            self.writers["val"].add(ids)
            self.release(to_val=False)
            self.val_has_doc = True
        elif not self.val_has_doc:
            self.waiting.append((h, ids))
            self.waiting_tokens += len(ids)
            if self.waiting_tokens >= self.shard_tokens and len(self.waiting) >= 2:
                self.release(to_val=True)
        else:
            self.writers["train"].add(ids)

    def release(self, to_val: bool) -> None:
        if to_val:
            i = min(range(len(self.waiting)), key=lambda j: self.waiting[j][0])
            self.writers["val"].add(self.waiting.pop(i)[1])
            self.val_has_doc = True
        for _, ids in self.waiting:
            self.writers["train"].add(ids)
        self.waiting.clear()
        self.waiting_tokens = 0

    def finish(self) -> None:
        self.release(to_val=len(self.waiting) >= 2)


def _resolve_tokenizer(spec: str, files: list[str], max_docs: int):
    if spec.startswith("train:"):
        try:
            vocab = int(spec.split(":", 1)[1])
        except ValueError:
            raise UserError(f"--tokenizer {spec!r}: expected train:VOCAB with an integer VOCAB") from None

        def texts():
            seen_bytes, seen_docs = 0, 0
            for uri in files:
                for _, text, _ in read_documents(uri):
                    yield text
                    seen_bytes += len(text)
                    seen_docs += 1
                    if seen_bytes >= TRAIN_TOKENIZER_MAX_BYTES or (max_docs and seen_docs >= max_docs):
                        return

        return train_bpe(texts(), vocab)
    return load_tokenizer(spec)


def _upload_dir(local: str, dest: str) -> None:
    for p in sorted(Path(local).rglob("*")):
        if p.is_file():
            storage.write_bytes(storage.join(dest, str(p.relative_to(local))), p.read_bytes())


def prepare(source: str, out: str, *, tokenizer: str = "train:8192", val_fraction: float = 0.01,
            shard_tokens: int = 1 << 24, max_docs: int = 0, address: str | None = None,
            overwrite: bool = False, no_ray: bool = False) -> dict:
    """Tokenize `source` into a dataset at `out`; returns the manifest. Raises UserError on bad input."""
    if not 0 <= val_fraction < 1:
        raise UserError(f"--val-fraction {val_fraction} must be in [0, 1)")
    if shard_tokens <= 0 or max_docs < 0:
        raise UserError("--shard-tokens must be positive and --max-docs >= 0")
    if storage.exists(storage.join(out, "manifest.json")) and not overwrite:
        raise UserError(f"{out!r} already holds a dataset; pass --overwrite or choose another --out")
    if not storage.is_s3(out) and Path(out).exists() and any(Path(out).iterdir()) and not overwrite:
        raise UserError(f"{out!r} exists and is not empty; choose another --out")
    if storage.is_s3(out):
        storage.check_writable(out)
    elif any(p.exists() and not p.is_dir() for p in [Path(out).resolve(), *Path(out).resolve().parents]):
        raise UserError(f"--out {out!r}: a file is in the way of that folder")
    files = list_source(source)
    if max_docs:
        files = files[:max_docs] if all(f.endswith(ONE_DOC_EXTS) for f in files) else files
    tok = _resolve_tokenizer(tokenizer, files, max_docs)
    eos_id = int(tok.eos_token_id)

    staging = out if storage.is_s3(out) else f"{Path(out).resolve()}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        manifest = _write_dataset(files=files, tok=tok, eos_id=eos_id, out=staging, source=source,
                                  val_fraction=val_fraction, shard_tokens=shard_tokens, max_docs=max_docs,
                                  address=address, no_ray=no_ray)
    except BaseException:
        if storage.is_s3(out):
            for split in SPLITS + ("tokenizer",):
                storage.delete_dir(storage.join(out, split))
        else:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    if not storage.is_s3(out):
        final = Path(out).resolve()
        if final.exists():
            shutil.rmtree(final)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging, final)
    return manifest


def tokenized_batches(files: list[str], tokenizer_json: str, eos_id: int, address: str | None, no_ray: bool):
    """Tokenized documents in file order: a Ray Data pipeline (scales out on a cluster), or in this process."""
    if no_ray:
        for i in range(0, len(files), FILES_PER_BATCH):
            yield tokenize_files({"uri": files[i:i + FILES_PER_BATCH]}, tokenizer_json, eos_id)
        return
    import ray

    from gl_ray.ray_utils import ensure_ray

    ensure_ray(address)
    ray.data.DataContext.get_current().execution_options.preserve_order = True  # reruns give identical shards
    ds = ray.data.from_items([{"uri": f} for f in files]).map_batches(
        tokenize_files, batch_size=FILES_PER_BATCH, batch_format="numpy",
        fn_kwargs={"tokenizer_json": tokenizer_json, "eos_id": eos_id})
    with unwrap_user_errors():
        yield from ds.iter_batches(batch_format="pyarrow", batch_size=None)


def _write_dataset(*, files: list[str], tok, eos_id: int, out: str, source: str, val_fraction: float,
                   shard_tokens: int, max_docs: int, address: str | None, no_ray: bool) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        tok.save_pretrained(tmp)
        _upload_dir(tmp, storage.join(out, "tokenizer"))
    batches = tokenized_batches(files, tok.backend_tokenizer.to_str(), eos_id, address, no_ray)

    writers = {s: ShardWriter(out, s, shard_tokens) for s in SPLITS}
    split = Splitter(writers, val_fraction, shard_tokens)
    docs = replaced = skipped = tokens = 0
    t0 = last = time.perf_counter()
    for batch in batches:
        for key, ids, empty, bad in zip(batch.column("key").to_pylist(), batch.column("input_ids"),
                                        batch.column("empty").to_pylist(), batch.column("replaced").to_pylist()):
            if max_docs and docs >= max_docs:
                break
            replaced += bad
            if empty:
                skipped += 1
                continue
            docs += 1
            tokens += len(ids.values)
            split.add(key, ids.values.to_numpy(zero_copy_only=False).astype(np.int32))
        if time.perf_counter() - last >= PROGRESS_EVERY_S:
            last = time.perf_counter()
            print(f"[prepare] {docs:,} documents, {tokens:,} tokens ({last - t0:.0f} s)", flush=True)
        if max_docs and docs >= max_docs:
            break
    split.finish()
    for w in writers.values():
        w.flush()
    if not writers["train"].shards:
        raise UserError(f"source {source!r} yielded no non-empty training documents")
    if val_fraction > 0 and not writers["val"].shards:
        raise UserError(f"no document of {docs} fell into the val split; raise --val-fraction or add documents")
    manifest = {
        "format": FORMAT, "tokenizer": "tokenizer", "vocab_size": len(tok), "eos_token_id": eos_id,
        "source": source, "replaced_chars": replaced, "skipped_empty": skipped,
        "splits": {s: w.summary() for s, w in writers.items()},
    }
    storage.write_bytes(storage.join(out, "manifest.json"), json.dumps(manifest, indent=1).encode())
    return manifest
