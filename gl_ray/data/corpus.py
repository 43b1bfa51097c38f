"""Corpus sources for `gl-ray prepare`: listing files and streaming their documents (no Ray).

SRC is `stdlib` (the running Python's standard-library .py files: the embedded corpus, no download), a local
folder, file or glob, `s3://bucket/prefix`, or `hf:NAME[:CONFIG][@SPLIT]` (gl_ray.data.hf_source). Files:

    .txt .md .rst .py     one document per file; bytes that are not UTF-8 are replaced (U+FFFD) and counted
    .jsonl                one document per line, a JSON object whose text field (--text-column) is a string
    .parquet              one document per row of the text column
    .arrow                Arrow IPC stream files, as `datasets.Dataset.save_to_disk` writes them
    .gz / .zst            on text and .jsonl files: decompressed as a stream

A folder written by Hugging Face `datasets` `save_to_disk` is read in its own file order (state.json); a
DatasetDict folder (dataset_dict.json) reads its `train` split. Every reader streams: a file is never read whole
into memory except a one-document text file.
"""

from __future__ import annotations

import glob
import hashlib
import json
import posixpath
import re
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from gl_ray import storage
from gl_ray.errors import UserError

TEXT_EXTS = (".txt", ".md", ".rst", ".py")
RECORD_EXTS = (".jsonl", ".parquet", ".arrow")
COMPRESSIONS = {".gz": "gzip", ".zst": "zstd"}  # outer compression of text and .jsonl files
READ_CHUNK = 8 << 20  # bytes per read from a stream
RECORD_BATCH = 1024  # Parquet rows per read
LONE_SURROGATE = re.compile("[\ud800-\udfff]")  # what json.loads leaves of an unpaired "\\ud800" escape


class SourceFile(NamedTuple):
    uri: str
    size: int  # bytes on storage (compressed size for .gz/.zst)


def file_kind(name: str) -> tuple[str, str | None] | None:
    """(document extension, compression or None) of a file name, or None if it is not a document file."""
    base, comp = name, None
    for ext, codec in COMPRESSIONS.items():
        if name.endswith(ext):
            base, comp = name[: -len(ext)], codec
    for ext in TEXT_EXTS + RECORD_EXTS:
        if base.endswith(ext) and (comp is None or ext in TEXT_EXTS + (".jsonl",)):
            return ext, comp
    return None


def stable_hash(key: str) -> float:
    """A number in [0, 1) from a string, the same on every machine and run."""
    return int.from_bytes(hashlib.sha1(key.encode()).digest()[:8], "big") / 2**64


def _infos(src: str, path: str, fs: pafs.FileSystem, recursive: bool) -> list[pafs.FileInfo]:
    with storage.errors_at(src):
        return fs.get_file_info(pafs.FileSelector(path, recursive=recursive, allow_not_found=True))


def _hf_saved(src: str) -> list[SourceFile] | None:
    """The .arrow files of a `save_to_disk` folder in their order (a DatasetDict's `train` split); None if src is
    not such a folder."""
    if storage.exists(storage.join(src, "dataset_dict.json")):
        splits = json.loads(storage.read_bytes(storage.join(src, "dataset_dict.json"))).get("splits", [])
        if "train" not in splits:
            raise UserError(f"source {src!r} is a DatasetDict with splits {splits} and no 'train'; pass the "
                            "folder of the split to prepare")
        src = storage.join(src, "train")
    if not storage.exists(storage.join(src, "state.json")):
        return None
    try:
        names = [f["filename"] for f in json.loads(storage.read_bytes(storage.join(src, "state.json")))["_data_files"]]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise UserError(f"source {src!r}: state.json is not a `datasets` save_to_disk state file") from None
    fs, _ = storage.resolve(src)
    infos = fs.get_file_info([storage.resolve(storage.join(src, n))[1] for n in names])
    missing = [n for n, i in zip(names, infos) if i.type != pafs.FileType.File]
    if missing:
        raise UserError(f"source {src!r}: data file {missing[0]!r} named in state.json is missing")
    return [SourceFile(storage.join(src, n), i.size) for n, i in zip(names, infos)]


def local_files(pattern: str, what: str) -> list[Path]:
    """The files of a local file, folder (recursively) or glob; UserError "{what} does not exist" if it is none."""
    p = Path(pattern).expanduser()
    if any(c in pattern for c in "*?["):
        paths = [Path(f) for f in glob.glob(str(p), recursive=True)]
    elif p.is_dir():
        paths = list(p.rglob("*"))
    elif p.is_file():
        paths = [p]
    else:
        raise UserError(f"{what} does not exist")
    return [f for f in paths if f.is_file()]


def list_source(src: str) -> list[SourceFile]:
    """Document files of a source, in a deterministic order shuffled by path hash (so topics mix); a
    `save_to_disk` folder keeps its own order."""
    if src.startswith("hf:"):  # streamed through `datasets`: one pseudo-file per shard (gl_ray.data.hf_source)
        from gl_ray.data.hf_source import hf_shards

        return [SourceFile(uri, size) for uri, size in hf_shards(src)]
    if "://" in src and not storage.is_s3(src):
        raise UserError(f"source {src!r} has an unknown scheme; use stdlib, a local path or s3://bucket/prefix")
    if src != "stdlib" and (storage.is_s3(src) or Path(src).expanduser().is_dir()):
        saved = _hf_saved(src if storage.is_s3(src) else str(Path(src).expanduser().resolve()))
        if saved is not None:
            return saved
    if src == "stdlib":
        root = Path(sysconfig.get_paths()["stdlib"])
        cands = [(str(p), p.stat().st_size) for p in root.rglob("*.py") if "site-packages" not in p.parts]
    elif storage.is_s3(src):
        fs, path = storage.resolve(src)
        cands = [("s3://" + i.path, i.size) for i in _infos(src, path, fs, True) if i.type == pafs.FileType.File]
    else:
        cands = [(str(f.resolve()), f.stat().st_size) for f in local_files(src, f"source {src!r}")]
    files = [SourceFile(u, s) for u, s in cands if file_kind(posixpath.basename(u))]
    if not files:
        exts = ", ".join(TEXT_EXTS + RECORD_EXTS)
        raise UserError(f"source {src!r} has no document files ({exts}; text and .jsonl optionally .gz or .zst)")
    return sorted(files, key=lambda f: (stable_hash(f.uri), f.uri))


def _decode(data: bytes) -> tuple[str, int]:
    try:
        return data.decode("utf-8"), 0
    except UnicodeDecodeError:
        text = data.decode("utf-8", errors="replace")
        return text, text.count("\ufffd") - data.decode("utf-8", errors="ignore").count("\ufffd")


def _chunks(uri: str, compression: str | None) -> Iterator[bytes]:
    """The (decompressed) bytes of a file, a chunk at a time; a truncated or corrupt archive is a UserError."""
    fs, path = storage.resolve(uri)
    with storage.errors_at(uri):
        stream = fs.open_input_stream(path, compression=compression)
    with stream:
        while True:
            try:
                chunk = stream.read(READ_CHUNK)
            except OSError as e:
                if compression:
                    raise UserError(f"{uri!r} is not a valid {compression} file ({str(e).splitlines()[0]}); "
                                    "the file is truncated or corrupt") from None
                raise storage.explain(uri, e) from None
            if not chunk:
                return
            yield chunk


def _lines(uri: str, compression: str | None) -> Iterator[bytes]:
    rest = b""
    for chunk in _chunks(uri, compression):
        *lines, rest = (rest + chunk).split(b"\n")
        yield from lines
    if rest:
        yield rest


def _jsonl(uri: str, compression: str | None, text_column: str) -> Iterator[tuple[str, str, int]]:
    for i, raw in enumerate(_lines(uri, compression)):
        if not raw.strip():
            continue
        where = f"{uri!r} line {i + 1}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"{where} is not UTF-8 (byte {e.start}); JSON lines must be UTF-8") from None
        try:
            doc = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{where} is not JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(doc, dict) or text_column not in doc:
            raise UserError(f"{where} is not a JSON object with a {text_column!r} field (--text-column)")
        text = doc[text_column]
        if text is not None and not isinstance(text, str):
            raise UserError(f"{where}: field {text_column!r} is {type(text).__name__}, expected a string")
        text, bad = _without_surrogates(text or "")
        yield f"{uri}#{i}", text, bad


def _without_surrogates(text: str) -> tuple[str, int]:
    """(text, count) with each lone surrogate (JSON's "\\ud800" escapes that pair with nothing) replaced by U+FFFD
    and counted as a replaced character: no tokenizer or file can take one."""
    return LONE_SURROGATE.subn("\ufffd", text)


def _check_column(uri: str, schema: pa.Schema, text_column: str) -> None:
    if text_column not in schema.names:
        raise UserError(f"{uri!r} has no column {text_column!r} (--text-column); columns: "
                        f"{', '.join(schema.names[:12])}")
    if not (pa.types.is_string(schema.field(text_column).type) or
            pa.types.is_large_string(schema.field(text_column).type)):
        raise UserError(f"{uri!r}: column {text_column!r} is {schema.field(text_column).type}, expected a string")


def _column_texts(uri: str, batches: Iterator[pa.RecordBatch], text_column: str):
    i = 0
    for batch in batches:
        for text in batch.column(text_column).to_pylist():
            yield f"{uri}#{i}", text or "", 0
            i += 1


def _records(uri: str, kind: str, text_column: str) -> Iterator[tuple[str, str, int]]:
    fs, path = storage.resolve(uri)
    try:
        with storage.errors_at(uri):
            f = fs.open_input_file(path) if kind == ".parquet" else fs.open_input_stream(path)
        with f:
            if kind == ".parquet":
                pf = pq.ParquetFile(f)
                _check_column(uri, pf.schema_arrow, text_column)
                batches = pf.iter_batches(RECORD_BATCH, columns=[text_column])
            else:
                reader = pa.ipc.open_stream(f)
                _check_column(uri, reader.schema, text_column)
                batches = iter(reader)
            yield from _column_texts(uri, batches, text_column)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as e:
        what = "Parquet" if kind == ".parquet" else "Arrow IPC stream"
        raise UserError(f"{uri!r} is not a readable {what} file ({str(e).splitlines()[0][:160]})") from None


def read_documents(uri: str, text_column: str = "text") -> Iterator[tuple[str, str, int]]:
    """(key, text, replaced_chars) for each document of one file, streamed; key is uri or uri#index."""
    if uri.startswith("hf:"):
        from gl_ray.data.hf_source import read_hf

        yield from read_hf(uri, text_column)
        return
    kind, compression = file_kind(posixpath.basename(uri)) or (None, None)
    if kind in TEXT_EXTS:
        text, bad = _decode(b"".join(_chunks(uri, compression)))
        yield uri, text, bad
    elif kind == ".jsonl":
        yield from _jsonl(uri, compression, text_column)
    elif kind in (".parquet", ".arrow"):
        yield from _records(uri, kind, text_column)
    else:
        raise UserError(f"{uri!r} is not a document file")
