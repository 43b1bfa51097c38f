"""Corpus sources for `gl-ray prepare`: listing files and reading documents (no Ray).

SRC is `stdlib` (the running Python's standard-library .py files: the embedded corpus, no download), a local
folder, file or glob, or `s3://bucket/prefix`. Files: .txt .md .rst .py (one document each), .jsonl (one
document per line, field "text"), .parquet (one document per row, column "text"); any of them may be .gz.
Bytes that are not UTF-8 are replaced (U+FFFD) and counted.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import io
import json
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from gl_ray import storage
from gl_ray.errors import UserError

TEXT_EXTS = (".txt", ".md", ".rst", ".py")
DOC_EXTS = TEXT_EXTS + (".jsonl", ".parquet")


def _kind(name: str) -> str | None:
    base = name.removesuffix(".gz")
    for ext in DOC_EXTS:
        if base.endswith(ext):
            return ext
    return None


def stable_hash(key: str) -> float:
    """A number in [0, 1) from a string, the same on every machine and run."""
    return int.from_bytes(hashlib.sha1(key.encode()).digest()[:8], "big") / 2**64


def list_source(src: str) -> list[str]:
    """Document files of a source, in a deterministic order shuffled by path hash (so topics mix)."""
    if src == "stdlib":
        root = Path(sysconfig.get_paths()["stdlib"])
        files = [str(p) for p in root.rglob("*.py") if "site-packages" not in p.parts]
    elif storage.is_s3(src):
        fs, path = storage.resolve(src)
        with storage.errors_at(src):
            infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
        files = ["s3://" + i.path for i in infos if i.type == pafs.FileType.File and _kind(i.path)]
    elif src.startswith("hf:"):
        raise UserError(f"source {src!r}: hub datasets are not supported in this build; download the data and "
                        "pass its folder")
    elif "://" in src:
        raise UserError(f"source {src!r} has an unknown scheme; use stdlib, a local path or s3://bucket/prefix")
    else:
        p = Path(src).expanduser()
        if any(c in src for c in "*?["):
            cands = [Path(f) for f in glob.glob(str(p), recursive=True)]
        elif p.is_dir():
            cands = [f for f in p.rglob("*")]
        elif p.is_file():
            cands = [p]
        else:
            raise UserError(f"source {src!r} does not exist")
        files = [str(f.resolve()) for f in cands if f.is_file() and _kind(f.name)]
    if not files:
        raise UserError(f"source {src!r} has no document files ({', '.join(DOC_EXTS)}, optionally .gz)")
    return sorted(files, key=lambda f: (stable_hash(f), f))


def _decode(data: bytes) -> tuple[str, int]:
    try:
        return data.decode("utf-8"), 0
    except UnicodeDecodeError:
        text = data.decode("utf-8", errors="replace")
        return text, text.count("\ufffd") - data.decode("utf-8", errors="ignore").count("\ufffd")


def read_documents(uri: str) -> Iterator[tuple[str, str, int]]:
    """(key, text, replaced_chars) for each document of one file; key is uri or uri#index."""
    data = storage.read_bytes(uri)
    if uri.endswith(".gz"):
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError):
            raise UserError(f"{uri!r} is not a valid gzip file") from None
    kind = _kind(uri)
    if kind in TEXT_EXTS:
        text, bad = _decode(data)
        yield uri, text, bad
    elif kind == ".jsonl":
        text, bad = _decode(data)
        for i, line in enumerate(text.splitlines()):
            if not line.strip():
                continue
            try:
                doc = json.loads(line)["text"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UserError(f"{uri!r} line {i + 1} is not a JSON object with a 'text' field") from None
            yield f"{uri}#{i}", str(doc), bad if i == 0 else 0
    elif kind == ".parquet":
        try:
            table = pq.read_table(io.BytesIO(data), columns=["text"])
        except Exception as e:  # pyarrow raises several types for bad files
            raise UserError(f"{uri!r} is not a Parquet file with a 'text' column ({str(e).splitlines()[0]})") \
                from None
        for i, doc in enumerate(table.column("text").to_pylist()):
            yield f"{uri}#{i}", doc or "", 0
