"""`gl-ray prepare`: corpus -> tokenizer -> Parquet token shards + manifest (format: gl_ray.data.manifest).

The source files are cut into units (consecutive files of about `unit_bytes`, in listing order). Each unit is one
Ray Data task that streams its files, tokenizes them, sends each document to train or val by a hash of its key,
and writes its own shards straight to the output (`train/shard-UUUUU-KKKK.parquet`, U the unit, K the shard
within it). So shards are named and filled by input order alone: the same inputs give byte-identical shards on
any number of CPUs or nodes, and the driver only collects per-unit statistics (its memory does not grow with the
corpus). A byte-level BPE tokenizer is trained on a deterministic sample of the corpus, not on all of it.

Nothing is half-written: the dataset is complete only when manifest.json exists, and it is written last. A local
DEST is built in DEST.partial and renamed into place; on S3 the manifest goes last. Each finished unit leaves
`_units/unit-UUUUU.json`, so an interrupted prepare continues with `resume` (the same settings) or starts over
with `overwrite`; bad input (a UserError) deletes what was written.

With `recall` (`--recall SPEC`), each document gets key-value recall items inserted after tokenization, and the
shards and manifest record them: see gl_ray.data.recall.

The files prepare writes, and the only ones `overwrite` deletes (a folder holding anything else, or whose
manifest.json is not gl-ray's, is refused: `check_replaceable`):

    manifest.json, tokenizer/NAME.{json,txt,model,jinja} (what save_pretrained writes),
    train/ and val/shard-UUUUU-KKKK.parquet (and shard-UUUUU-KKKK-rest.parquet: _give_val_a_document),
    _units/unit-UUUUU.json and _units/prepare.json (until the dataset is complete),
    any of these + .tmp-HEX (a write a kill interrupted), and on S3 .gl-ray.lease (gl_ray.lock)
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from gl_ray import storage
from gl_ray.data.corpus import SourceFile, list_source, read_documents, stable_hash
from gl_ray.data.manifest import FORMAT, SHARD_SCHEMA, SPLITS, load_manifest
from gl_ray.data.recall import (RECALL_COLUMNS, Inserted, RecallItems, RecallSpec, count_document, document_rng,
                                insert_recall, merge_counts, new_counts, resolve_items)
from gl_ray.data.tokenizer import encode_documents, load_tokenizer, train_bpe
from gl_ray.data.tokens import DTYPES, is_tokens, open_tokens, token_files, token_units, unit_documents
from gl_ray.errors import UserError, unwrap_user_errors
from gl_ray.lock import output_lock

UNIT_BYTES = 16 << 20  # source bytes per task (a unit ends at a file boundary)
ENCODE_BYTES = 4 << 20  # text handed to the tokenizer at once
SAMPLE_BYTES = 32 << 20  # default corpus text the BPE trainer sees (--tokenizer-sample-bytes)
SAMPLE_PIECE = 4096  # characters per piece of sample text handed to the BPE trainer
PROGRESS_EVERY_S = 10.0  # seconds between progress lines
UNITS_DIR = "_units"  # per-unit statistics of finished units (removed when the dataset is complete)
ONE_DOC_EXTS = (".txt", ".md", ".rst", ".py")
OWN_FILE = re.compile(r"(manifest\.json|tokenizer/[\w.-]+\.(json|txt|model|jinja)|(train|val)/shard-\d{5,}-\d{4,}"
                      r"(-rest)?\.parquet|_units/(unit-\d{5,}|prepare)\.json|\.gl-ray\.lease)(\.tmp-[0-9a-f]+)?")
OWN_DIRS = ("tokenizer", *SPLITS, UNITS_DIR)


class ShardWriter:
    """Collects documents of one split of one unit and writes {split}/{prefix}-KKKK.parquet of ~shard_tokens."""

    def __init__(self, out_dir: str, split: str, prefix: str, shard_tokens: int):
        self.out_dir, self.split, self.prefix, self.shard_tokens = out_dir, split, prefix, shard_tokens
        self.docs: list[np.ndarray] = []
        self.recall: dict[str, list[np.ndarray]] = {}  # recall column -> one array per document (recall datasets)
        self.pending_tokens = 0
        self.shards: list[dict] = []

    def add(self, ids: np.ndarray, recall: dict[str, np.ndarray] | None = None) -> tuple[int, int]:
        """Queue a document (and its recall columns); returns its (shard number, row) within this writer."""
        where = (len(self.shards), len(self.docs))
        self.docs.append(ids)
        for name, arr in (recall or {}).items():
            self.recall.setdefault(name, []).append(arr)
        self.pending_tokens += len(ids)
        if self.pending_tokens >= self.shard_tokens:
            self.flush()
        return where

    def flush(self) -> None:
        if not self.docs:
            return
        rel = f"{self.split}/{self.prefix}-{len(self.shards):04d}.parquet"
        write_shard(storage.join(self.out_dir, rel), self.docs, self.recall)
        self.shards.append({"path": rel, "rows": len(self.docs), "tokens": self.pending_tokens})
        self.docs, self.recall, self.pending_tokens = [], {}, 0


def write_shard(uri: str, docs: list[np.ndarray], extra: dict[str, list] | None = None) -> None:
    """One shard; `extra`: more list<int32> columns, one entry per document (the recall columns)."""
    table = pa.table({"input_ids": pa.array(docs, pa.list_(pa.int32())),
                      "num_tokens": pa.array([len(d) for d in docs], pa.int32())}, schema=SHARD_SCHEMA)
    for name, col in (extra or {}).items():
        table = table.append_column(name, pa.array(col, pa.list_(pa.int32())))
    fs, path = storage.resolve(uri)
    if not storage.is_s3(uri):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    with storage.errors_at(uri):
        pq.write_table(table, path, filesystem=fs, write_statistics=True)


def units_of(files: list[SourceFile], unit_bytes: int) -> list[list[str]]:
    """Consecutive files grouped into units of about unit_bytes (a big file is a unit of its own)."""
    units: list[list[str]] = []
    size = unit_bytes
    for f in files:
        if size >= unit_bytes:
            units.append([])
            size = 0
        units[-1].append(f.uri)
        size += f.size
    return units


def write_unit(unit: dict, *, out: str, tokenizer_json: str, eos_id: int, val_fraction: float, shard_tokens: int,
               text_column: str, max_docs: int = 0, recall: RecallItems | None = None, token_dtype: str = "auto",
               vocab_size: int = 0) -> dict:
    """Tokenize one unit's files (or take a token unit's documents: gl_ray.data.tokens) and write its shards;
    returns (and stores under _units/) its statistics.

    A Ray Data task on a cluster, or a plain call. Documents keep source order within each split; the train
    document with the smallest split hash is remembered so the driver can give a tiny corpus a val document."""
    index = unit["index"]
    writers = {s: ShardWriter(out, s, f"shard-{index:05d}", shard_tokens) for s in SPLITS}
    st = {"index": index, "documents": 0, "tokens": 0, "replaced_chars": 0, "skipped_empty": 0, "min_train": None}
    if recall:
        st["recall"] = {s: new_counts() for s in SPLITS}
    batch: list[tuple[str, str | np.ndarray]] = []  # (key, text, or a token unit's ids)

    def encode() -> None:
        texts = [t for _, t in batch if isinstance(t, str)]
        encoded = iter(encode_documents(texts, tokenizer_json, eos_id) if texts else [])
        for key, doc in batch:
            ids = next(encoded) if isinstance(doc, str) else doc  # a token unit's documents are ids already
            h = stable_hash("split:" + key)
            split = "val" if h < val_fraction else "train"
            columns = None
            if recall:  # the per-document transform: seeded by (seed, key), so units stay independent
                ins = insert_recall(ids, document_rng(recall.spec.seed, key), recall)
                count_document(st["recall"][split], ins, recall.spec)
                ids, columns = ins.tokens, dict(zip(RECALL_COLUMNS, (ins.targets, ins.distances)))
            shard, row = writers[split].add(ids, columns)
            if split == "train" and (st["min_train"] is None or h < st["min_train"][0]):
                st["min_train"] = [h, shard, row]
            st["documents"] += 1
            st["tokens"] += len(ids)
        batch.clear()

    size = 0
    if "tokens" in unit:
        st["appended_eos"] = 0  # documents at a token file's end that had no EOS
    for key, doc, appended in documents_of(unit, st, text_column, eos_id, token_dtype, vocab_size):
        if max_docs and st["documents"] + len(batch) >= max_docs:
            break
        batch.append((key, doc))
        if appended:
            st["appended_eos"] += 1
        size += len(doc) if isinstance(doc, str) else 4 * len(doc)
        if size >= ENCODE_BYTES:
            encode()
            size = 0
    encode()
    for w in writers.values():
        w.flush()
    st["shards"] = {s: w.shards for s, w in writers.items()}
    if st["min_train"] is not None:  # (hash, shard path, row)
        h, shard, row = st["min_train"]
        st["min_train"] = [h, writers["train"].shards[shard]["path"], row]
    storage.write_bytes(storage.join(out, UNITS_DIR, f"unit-{index:05d}.json"), json.dumps(st).encode())
    return st


def documents_of(unit: dict, st: dict, text_column: str, eos_id: int, token_dtype: str,
                 vocab_size: int) -> Iterator[tuple[str, str | np.ndarray, bool]]:
    """(key, text or ids, whether an EOS was appended) of each document of a unit: the texts of its files (empty
    ones skipped and replaced characters counted into st), or the documents of its token range (ids, as they are:
    gl_ray.data.tokens)."""
    if "tokens" in unit:
        arr = open_tokens(unit["tokens"], token_dtype)
        for offset, ids, appended in unit_documents(arr, unit["start"], unit["stop"], eos_id, vocab_size,
                                                    unit["tokens"]):
            yield f"{unit['tokens']}#{offset}", ids, appended
        return
    for uri in unit["files"]:
        for key, text, bad in read_documents(uri, text_column):
            st["replaced_chars"] += bad
            if not text.strip():
                st["skipped_empty"] += 1
                continue
            yield key, text, False


def tokenizer_sample(files: list[SourceFile], sample_bytes: int, text_column: str, progress=print):
    """Deterministic training text for the BPE: files in listing order (already shuffled by path hash), at most a
    1/64 share of the sample from each (a long document is cut at that share), so at least 64 files contribute
    when the corpus has them; yielded in pieces of at most SAMPLE_PIECE characters, because the trainer would
    take a document without whitespace as one word and stall on it. `progress(line)` every 8 MiB."""
    per_file = max(sample_bytes // 64, 1 << 16)
    seen, reported = 0, 0
    for f in files:
        taken = 0
        for _, text, _ in read_documents(f.uri, text_column):
            text = text[: min(per_file - taken, sample_bytes - seen)]
            for i in range(0, len(text), SAMPLE_PIECE):
                yield text[i:i + SAMPLE_PIECE]
            taken += len(text)
            seen += len(text)
            if seen - reported >= 8 << 20:
                reported = seen
                progress(f"[prepare] tokenizer sample: {seen / 2**20:.0f} of at most {sample_bytes / 2**20:.0f} MiB")
            if seen >= sample_bytes:
                return
            if taken >= per_file:
                break


def _resolve_tokenizer(spec: str, files: list[SourceFile], sample_bytes: int, text_column: str):
    if spec.startswith("train:"):
        try:
            vocab = int(spec.split(":", 1)[1])
        except ValueError:
            raise UserError(f"--tokenizer {spec!r}: expected train:VOCAB with an integer VOCAB") from None
        print(f"[prepare] training a BPE tokenizer of {vocab:,} ids on a sample of the corpus", flush=True)
        return train_bpe(tokenizer_sample(files, sample_bytes, text_column), vocab)
    return load_tokenizer(spec)


def _upload_dir(local: str, dest: str) -> None:
    for p in sorted(Path(local).rglob("*")):
        if p.is_file():
            storage.write_bytes(storage.join(dest, str(p.relative_to(local))), p.read_bytes())


def foreign_files(folder: str) -> list[str]:
    """The paths under a dataset folder (relative; folders with a trailing /) that no prepare writes (OWN_FILE,
    OWN_DIRS). A symbolic link counts by its name: deleting it leaves its target, and it is not followed."""
    fs, root = storage.resolve(folder)
    if storage.is_s3(folder):
        with storage.errors_at(folder):
            infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
        rels = [(i.path[len(root):].strip("/"), i.type == pafs.FileType.Directory) for i in infos]
    else:
        rels = []
        for top, dirs, files in os.walk(root):  # followlinks=False
            rel = Path(top).relative_to(root)
            rels += [((rel / d).as_posix(), True) for d in dirs] + [((rel / f).as_posix(), False) for f in files]
    return sorted(f"{rel}/" if is_dir else rel for rel, is_dir in rels
                  if not (rel in OWN_DIRS if is_dir else OWN_FILE.fullmatch(rel)))


def check_replaceable(out: str) -> None:
    """--overwrite deletes --out whole: only a gl-ray dataset may go, one whose manifest.json the manifest reader
    accepts (format gl-ray-shards/1 and its fields) and whose every file is one that prepare writes (see the module
    docstring); else one UserError line naming the folder and why, before anything is touched."""
    try:
        load_manifest(out)
    except UserError as e:
        raise UserError(f"--overwrite: {out!r} is not a gl-ray dataset ({e}); nothing was deleted: move it away or "
                        "choose another --out") from None
    foreign = foreign_files(out)
    if foreign:
        more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
        raise UserError(f"--overwrite: {out!r} holds files that gl-ray's prepare does not write "
                        f"({', '.join(foreign[:3])}{more}); nothing was deleted: move them away or choose another "
                        "--out")


def _check_out(out: str, source: str, overwrite: bool) -> None:
    """--out may be replaced only when it is a gl-ray dataset (--overwrite) or empty, and never when it holds or is
    inside --source: --overwrite deletes it whole. Its staging folder (DEST.partial) is checked the same way."""
    has_manifest = storage.exists(storage.join(out, "manifest.json"))
    if has_manifest and not overwrite:
        raise UserError(f"{out!r} already holds a dataset; pass --overwrite or choose another --out")
    if storage.is_s3(out):
        if has_manifest:
            check_replaceable(out)
        storage.check_writable(out)
        return
    dest = Path(out).expanduser().resolve()
    source = source.removeprefix("tokens:").removeprefix("hf:").split("@")[0]
    if source != "stdlib" and "://" not in source and not any(c in source for c in "*?["):
        src = Path(source).expanduser().resolve()
        if dest == src or dest in src.parents or src in dest.parents:
            raise UserError(f"--out {out!r} {'holds' if dest in src.parents or dest == src else 'is inside'} "
                            f"--source {source!r}; choose an --out outside the source")
    if any(p.exists() and not p.is_dir() for p in [dest, *dest.parents]):
        raise UserError(f"--out {out!r}: a file is in the way of that folder")
    if dest.exists() and any(dest.iterdir()) and not (dest / "manifest.json").is_file():
        raise UserError(f"{out!r} exists, is not empty and is not a gl-ray dataset (no manifest.json); "
                        "choose another --out" + (" (--overwrite replaces only a dataset)" if overwrite else ""))
    if has_manifest:
        check_replaceable(out)
    staging = Path(_staging(out))
    if staging.exists() and any(staging.iterdir()) and not (staging / UNITS_DIR / "prepare.json").is_file():
        raise UserError(f"{str(staging)!r} exists and is not a gl-ray prepare's staging folder (no "
                        f"{UNITS_DIR}/prepare.json); move it away or choose another --out")
    if staging.exists() and (foreign := foreign_files(str(staging))):  # --overwrite or a failure deletes it
        raise UserError(f"{str(staging)!r} holds files that gl-ray's prepare does not write ({', '.join(foreign[:3])}"
                        f"{' ...' if len(foreign) > 3 else ''}); move them away or choose another --out")


def _settings(source: str, files: list[SourceFile], tokenizer: str, **kw) -> dict:
    """What a resumed prepare must share with the interrupted one."""
    listing = hashlib.sha256("\n".join(f"{f.uri}\t{f.size}" for f in files).encode()).hexdigest()
    return {"source": source, "files": len(files), "listing_sha256": listing, "tokenizer": tokenizer, **kw}


def _staging(out: str) -> str:
    return out if storage.is_s3(out) else f"{Path(out).resolve()}.partial"


def _start_or_resume(staging: str, settings: dict, resume: bool, overwrite: bool) -> set[int]:
    """Units already finished in staging (resume), after checking it belongs to the same prepare."""
    marker = storage.join(staging, UNITS_DIR, "prepare.json")
    if not storage.exists(marker):
        return set()
    if not resume:
        if not overwrite:
            raise UserError(f"{staging!r} holds an interrupted prepare ({len(_finished_units(staging))} units done); "
                            "pass --resume to finish it or --overwrite to start over")
        _remove(staging)
        return set()
    old = json.loads(storage.read_bytes(marker))
    if old != settings:
        diff = sorted(k for k in settings if old.get(k) != settings[k])
        raise UserError(f"cannot resume the prepare in {staging!r}: {', '.join(diff)} differ from the interrupted "
                        "one; pass --overwrite to start over")
    return _finished_units(staging)


def _finished_units(staging: str) -> set[int]:
    """Indexes of the units whose statistics file is complete (unit-UUUUU.json; a *.tmp-* file beside them is a
    write that a kill interrupted, and its unit is done again)."""
    names = storage.list_dir(storage.join(staging, UNITS_DIR))
    return {int(m[1]) for n in names if (m := re.fullmatch(r"unit-(\d{5})\.json", n))}


def _remove(staging: str) -> None:
    if storage.is_s3(staging):
        for part in SPLITS + ("tokenizer", UNITS_DIR):
            storage.delete_dir(storage.join(staging, part))
    else:
        shutil.rmtree(staging, ignore_errors=True)


def prepare(source: str, out: str, *, tokenizer: str = "train:8192", val_fraction: float = 0.01,
            shard_tokens: int = 1 << 24, max_docs: int = 0, address: str | None = None,
            overwrite: bool = False, resume: bool = False, no_ray: bool = False, text_column: str = "text",
            tokenizer_sample_bytes: int = SAMPLE_BYTES, unit_bytes: int = UNIT_BYTES, workers: int = 0,
            recall: RecallSpec | None = None, verbose: bool = False, token_dtype: str = "auto") -> dict:
    """Tokenize `source` into a dataset at `out`; returns the manifest. Raises UserError on bad input.
    verbose: Ray's INFO lines too (Ray Data's per-dataset lines; off by default, its warnings and errors stay).
    `recall`: insert key-value recall items into every document (gl_ray.data.recall). A `tokens:PATH` source is
    already tokenized (gl_ray.data.tokens): `tokenizer` must be the folder of the tokenizer that made it, and
    token_dtype says how raw files hold the ids."""
    if not 0 <= val_fraction < 1:
        raise UserError(f"--val-fraction {val_fraction} must be in [0, 1)")
    if shard_tokens <= 0 or max_docs < 0 or tokenizer_sample_bytes <= 0 or unit_bytes <= 0 or workers < 0:
        raise UserError("--shard-tokens and --tokenizer-sample-bytes must be positive, --max-docs and --workers "
                        ">= 0")
    if not text_column:
        raise UserError("--text-column must not be empty")
    if token_dtype not in ("auto", *DTYPES):
        raise UserError(f"--token-dtype {token_dtype!r} is not one of auto | {' | '.join(DTYPES)}")
    if is_tokens(source) and tokenizer.startswith("train:"):
        raise UserError(f"--source {source!r} is already tokenized: give --tokenizer FOLDER, the tokenizer that made "
                        "its ids (the dataset keeps it)")
    from gl_ray.ray_utils import check_address, refuse_unused_address

    if no_ray or max_docs:  # units run in this process: --max-docs stops them at a document count, in order
        flag = "--no-ray" if no_ray else "--max-docs"
        refuse_unused_address(address, "", no_ray=flag, use_ray=f"leave out {flag}")
    else:
        check_address(address)  # a cluster that is not there (or not Ray's): one line, before anything is written
    _check_out(out, source, overwrite)
    with output_lock(out):  # one prepare per output, from before its staging is read or written
        return _prepare_locked(source, out, tokenizer=tokenizer, val_fraction=val_fraction,
                               shard_tokens=shard_tokens, max_docs=max_docs, address=address, overwrite=overwrite,
                               resume=resume, no_ray=no_ray, text_column=text_column,
                               tokenizer_sample_bytes=tokenizer_sample_bytes, unit_bytes=unit_bytes, workers=workers,
                               recall=recall, verbose=verbose, token_dtype=token_dtype)


def _prepare_locked(source: str, out: str, *, tokenizer: str, val_fraction: float, shard_tokens: int,
                    max_docs: int, address: str | None, overwrite: bool, resume: bool, no_ray: bool,
                    text_column: str, tokenizer_sample_bytes: int, unit_bytes: int, workers: int,
                    recall: RecallSpec | None, verbose: bool, token_dtype: str) -> dict:
    """The part of prepare that reads or writes the staging folder and the output, under the output's lock."""
    tokens = is_tokens(source)
    files = token_files(source) if tokens else list_source(source)
    one_doc_files = not tokens and all(f.uri.endswith(ONE_DOC_EXTS) for f in files)
    if max_docs and one_doc_files:  # the first N files are the first N documents: no count to stop at
        files, max_docs_per_unit = files[:max_docs], 0
    else:
        max_docs_per_unit = max_docs
    settings = _settings(source, files, tokenizer, text_column=text_column, val_fraction=val_fraction,
                         shard_tokens=shard_tokens, max_docs=max_docs, unit_bytes=unit_bytes,
                         tokenizer_sample_bytes=tokenizer_sample_bytes,
                         **({"recall": recall.to_json()} if recall else {}),
                         **({"token_dtype": token_dtype} if tokens else {}))
    staging = _staging(out)
    done = _start_or_resume(staging, settings, resume, overwrite)
    if storage.is_s3(out) and overwrite and storage.exists(storage.join(out, "manifest.json")):
        storage.delete_file(storage.join(out, "manifest.json"))  # first: the old dataset stops being one
        _remove(out)
    try:
        if done:
            tok = _load_saved_tokenizer(storage.join(staging, "tokenizer"))
        else:
            tok = _resolve_tokenizer(tokenizer, files, tokenizer_sample_bytes, text_column)
            with tempfile.TemporaryDirectory() as tmp:
                tok.save_pretrained(tmp)
                _upload_dir(tmp, storage.join(staging, "tokenizer"))
            storage.write_bytes(storage.join(staging, UNITS_DIR, "prepare.json"), json.dumps(settings).encode())
        if tokens:  # ranges of about unit_bytes of ids (4 bytes each in memory)
            units = [{"index": i, **u} for i, u in enumerate(token_units(files, token_dtype, max(1, unit_bytes // 4)))]
        else:
            units = [{"index": i, "files": u} for i, u in enumerate(units_of(files, unit_bytes))]
        kw = {"out": staging, "tokenizer_json": tok.backend_tokenizer.to_str(), "eos_id": int(tok.eos_token_id),
              "val_fraction": val_fraction, "shard_tokens": shard_tokens, "text_column": text_column,
              "recall": resolve_items(recall, len(tok), tok.all_special_ids) if recall else None,
              **({"token_dtype": token_dtype, "vocab_size": len(tok)} if tokens else {})}
        stats = _run_units(units, done, kw, staging, max_docs=max_docs_per_unit, address=address, no_ray=no_ray,
                           workers=workers, verbose=verbose)
        manifest = _finish(stats, tok, source, staging, val_fraction, kw["recall"])
    except UserError:
        _remove(staging)  # bad input: nothing half-written
        raise
    if not storage.is_s3(out):
        final = Path(out).resolve()
        if final.exists() and any(final.iterdir()):
            check_replaceable(str(final))  # again, as it stands now: the new dataset waits in staging meanwhile
        if final.exists():
            shutil.rmtree(final)
        final.parent.mkdir(parents=True, exist_ok=True)
        Path(staging).rename(final)
        shutil.rmtree(final / UNITS_DIR, ignore_errors=True)
    else:
        storage.delete_dir(storage.join(out, UNITS_DIR))
    return manifest


def _load_saved_tokenizer(folder: str):
    """The tokenizer an interrupted prepare saved (local or S3), through a local copy."""
    with tempfile.TemporaryDirectory() as tmp:
        for name in storage.list_dir(folder):
            Path(tmp, name).write_bytes(storage.read_bytes(storage.join(folder, name)))
        return load_tokenizer(tmp)


def _run_units(units: list[dict], done: set[int], kw: dict, staging: str, *, max_docs: int, address: str | None,
               no_ray: bool, workers: int, verbose: bool) -> list[dict]:
    """Statistics of every unit in order: finished ones read back, the rest written now (Ray Data tasks, or in
    this process with no_ray or with max_docs, a document count the units must stop at in order)."""
    stats = {i: json.loads(storage.read_bytes(storage.join(staging, UNITS_DIR, f"unit-{i:05d}.json")))
             for i in done}
    todo = [u for u in units if u["index"] not in done]
    t0 = last = time.perf_counter()

    def progress(force: bool = False) -> None:
        nonlocal last
        if force or time.perf_counter() - last >= PROGRESS_EVERY_S:
            last = time.perf_counter()
            tokens = sum(s["tokens"] for s in stats.values())
            print(f"[prepare] {len(stats)}/{len(units)} units, {tokens:,} tokens ({last - t0:.0f} s)", flush=True)

    if no_ray or max_docs:
        count = sum(s["documents"] for s in stats.values())
        for u in todo:
            if max_docs and count >= max_docs:
                break
            stats[u["index"]] = write_unit(u, **kw, max_docs=max_docs - count if max_docs else 0)
            count += stats[u["index"]]["documents"]
            progress()
    elif todo:
        import ray

        from gl_ray.ray_utils import ensure_ray

        ensure_ray(address, verbose=verbose)
        ds = ray.data.from_items([{"unit": json.dumps(u)} for u in todo], override_num_blocks=len(todo))
        ds = ds.map(_unit_task, fn_kwargs=kw, num_cpus=1, concurrency=workers or None)
        with unwrap_user_errors():
            for row in ds.iter_rows():
                st = json.loads(row["stats"])
                stats[st["index"]] = st
                progress()
    progress(force=True)
    return [stats[i] for i in sorted(stats)]


def _unit_task(row: dict, **kw) -> dict:
    """A unit as a Ray Data task. It holds one CPU, so the tokenizer runs single-threaded in it (its own thread
    pool would otherwise take every core of the node once per task)."""
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # read by `tokenizers` at each encode_batch call
    try:
        return {"stats": json.dumps(write_unit(json.loads(row["unit"]), **kw))}
    finally:
        if before is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = before


def _give_val_a_document(stats: list[dict], staging: str, recall: RecallItems | None) -> None:
    """A corpus so small that the hash sent no document to val: move the train document with the smallest split
    hash there (so any corpus of two or more documents has a val split, the same on every rerun).

    A kill at any point and a resume give the same dataset: the train shard is never changed in place. Its
    document is written to a val shard and the other rows to a new train shard (NAME-rest.parquet), and only then
    is the old shard deleted; a resume that finds it gone reads the move back from the files written."""
    best = min((s for s in stats if s["min_train"]), key=lambda s: s["min_train"][0])
    _, rel, row = best["min_train"]
    entry = next(sh for sh in best["shards"]["train"] if sh["path"] == rel)
    val_rel = f"val/shard-{best['index']:05d}-0000.parquet"
    rest_rel = rel.removesuffix(".parquet") + "-rest.parquet"
    if storage.exists(storage.join(staging, rel)):
        cols = _read_columns(storage.join(staging, rel))
        table = cols.pop("input_ids")
        doc = table.pop(row)
        write_shard(storage.join(staging, val_rel), [np.asarray(doc, np.int32)],
                    {name: [col.pop(row)] for name, col in cols.items()})  # recall columns go with their document
        if table:
            write_shard(storage.join(staging, rest_rel), [np.asarray(d, np.int32) for d in table], cols)
        storage.delete_file(storage.join(staging, rel))
    moved = _read_columns(storage.join(staging, val_rel))  # the move, made now or by a prepare that was killed
    doc = np.asarray(moved.pop("input_ids")[0], np.int32)
    best["shards"]["val"] = [{"path": val_rel, "rows": 1, "tokens": len(doc)}]
    if recall:  # its recall counts move to val as well (no unit has val documents)
        one = new_counts()
        count_document(one, Inserted(doc, *(np.asarray(moved[c][0], np.int32) for c in RECALL_COLUMNS)),
                       recall.spec)
        best["recall"] = {"val": one, "train": merge_counts([best["recall"]["train"], one], sign=[1, -1])}
    if entry["rows"] > 1:
        entry.update(path=rest_rel, rows=entry["rows"] - 1, tokens=entry["tokens"] - len(doc))
    else:
        best["shards"]["train"].remove(entry)


def _read_columns(uri: str) -> dict[str, list]:
    """A shard's columns as lists (num_tokens left out: write_shard makes it)."""
    fs, path = storage.resolve(uri)
    with storage.errors_at(path):
        cols = pq.read_table(path, filesystem=fs).to_pydict()
    cols.pop("num_tokens")
    return cols


def _finish(stats: list[dict], tok, source: str, staging: str, val_fraction: float,
            recall: RecallItems | None = None) -> dict:
    docs = sum(s["documents"] for s in stats)

    def shards_of(split: str) -> list[dict]:
        return [sh for s in stats for sh in s["shards"][split]]

    if val_fraction > 0 and not shards_of("val") and docs >= 2:
        _give_val_a_document(stats, staging, recall)
    shards = {split: shards_of(split) for split in SPLITS}
    if not shards["train"]:
        raise UserError(f"source {source!r} yielded no non-empty training documents")
    if val_fraction > 0 and not shards["val"]:
        raise UserError(f"no document of {docs} fell into the val split; raise --val-fraction or add documents")
    manifest = {
        "format": FORMAT, "tokenizer": "tokenizer", "vocab_size": len(tok), "eos_token_id": int(tok.eos_token_id),
        "source": source, "replaced_chars": sum(s["replaced_chars"] for s in stats),
        "skipped_empty": sum(s["skipped_empty"] for s in stats),
        **({"appended_eos": sum(s["appended_eos"] for s in stats)} if any("appended_eos" in s for s in stats) else {}),
        "splits": {split: {"documents": sum(sh["rows"] for sh in shards[split]),
                           "tokens": sum(sh["tokens"] for sh in shards[split]), "shards": shards[split]}
                   for split in SPLITS},
    }
    if recall:
        manifest["recall"] = {**recall.to_json(),
                              "splits": {s: merge_counts([st["recall"][s] for st in stats]) for s in SPLITS}}
    storage.write_bytes(storage.join(staging, "manifest.json"), json.dumps(manifest, indent=1).encode())
    return manifest
