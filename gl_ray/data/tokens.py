"""Pre-tokenized corpora for `gl-ray prepare --source tokens:PATH`: token arrays as nanoGPT and OLMo write them.

PATH is a file, a folder or a glob of `.npy` / `.bin` files, read in name order (the corpus order). Each file is
one flat array of token ids with the EOS id after every document:

    .npy   numpy's format (its header gives the dtype), or a raw array under that name (OLMo writes those): then
           --token-dtype
    .bin   a raw array (nanoGPT's train.bin): --token-dtype, uint16 unless given

Files are memory-mapped, never read whole. prepare cuts each into units of token ranges; a unit owns the
documents that start in its range (the last may run past it), so units are independent Ray Data tasks. A final
document without EOS gets one appended (counted in the manifest as `appended_eos`). An id at or above the
tokenizer's vocab is bad input: one line naming the file and offset. The tokenizer must be given (--tokenizer
FOLDER, the one that made the ids): the dataset keeps it like any other.

    files = token_files("tokens:data/owt/train.bin")
    for offset, ids, appended in unit_documents(open_tokens(uri, "uint16"), start, stop, eos_id=0):
        ...
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from gl_ray.data.corpus import SourceFile, local_files
from gl_ray.errors import UserError

PREFIX = "tokens:"
TOKEN_EXTS = (".npy", ".bin")
DTYPES = ("uint16", "uint32")
SCAN = 1 << 20  # tokens searched for the next EOS at a time


def is_tokens(source: str) -> bool:
    return source.startswith(PREFIX)


def token_files(source: str) -> list[SourceFile]:
    """The token files of a tokens: source, in name order; UserError if there are none."""
    path = source[len(PREFIX):]
    if "://" in path:
        raise UserError(f"--source {source!r}: token files are memory-mapped, so they must be local (copy them "
                        "from object storage first)")
    found = local_files(path, f"--source {source!r}: {path!r}")
    files = sorted(f.resolve() for f in found if f.suffix in TOKEN_EXTS)
    if not files:
        raise UserError(f"--source {source!r} has no token files ({', '.join(TOKEN_EXTS)})")
    return [SourceFile(str(f), f.stat().st_size) for f in files]


def open_tokens(uri: str, dtype: str) -> np.ndarray:
    """A token file as a flat read-only memory map; dtype: a DTYPES name, or "auto" (an .npy header's, else
    uint16)."""
    if dtype not in ("auto", *DTYPES):
        raise UserError(f"--token-dtype {dtype!r} is not one of auto | {' | '.join(DTYPES)}")
    if uri.endswith(".npy"):
        try:
            arr = np.load(uri, mmap_mode="r", allow_pickle=False)
        except ValueError:  # no npy header: a raw array named .npy (OLMo's)
            arr = None
        if arr is not None:
            if arr.ndim != 1 or arr.dtype.kind not in "iu" or arr.dtype.itemsize > 4:
                raise UserError(f"token file {uri!r} holds a {arr.dtype} array of shape {arr.shape}; expected a flat "
                                "array of uint16 or uint32 ids")
            if dtype != "auto" and arr.dtype != np.dtype(dtype):
                raise UserError(f"token file {uri!r} holds {arr.dtype} ids; --token-dtype says {dtype}")
            return arr
    raw = np.dtype("uint16" if dtype == "auto" else dtype)
    size = Path(uri).stat().st_size
    if size % raw.itemsize:
        raise UserError(f"token file {uri!r} has {size} bytes, not a whole number of {raw} ids; check --token-dtype")
    return np.memmap(uri, dtype=raw, mode="r") if size else np.zeros(0, raw)


def token_units(files: list[SourceFile], dtype: str, unit_tokens: int) -> list[dict]:
    """Consecutive token ranges of about unit_tokens, per file: [{"tokens": uri, "start", "stop"}]."""
    units = []
    for f in files:
        n = len(open_tokens(f.uri, dtype))
        units += [{"tokens": f.uri, "start": a, "stop": min(a + unit_tokens, n)} for a in range(0, n, unit_tokens)]
    return units


def next_eos(arr: np.ndarray, start: int, eos_id: int) -> int:
    """The index of the first EOS at or after start, or len(arr)."""
    for a in range(start, len(arr), SCAN):
        hits = np.flatnonzero(arr[a:a + SCAN] == eos_id)
        if hits.size:
            return a + int(hits[0])
    return len(arr)


def unit_documents(arr: np.ndarray, start: int, stop: int, eos_id: int,
                   vocab_size: int = 0, uri: str = "") -> Iterator[tuple[int, np.ndarray, bool]]:
    """(offset, ids int32 ending with EOS, whether that EOS was appended) of each document starting in
    [start, stop). A document starts at 0 and after each EOS. vocab_size > 0: UserError on an id >= it."""
    s = 0 if start == 0 else next_eos(arr, start - 1, eos_id) + 1
    while s < stop and s < len(arr):
        e = next_eos(arr, s, eos_id)
        ids = np.asarray(arr[s:e + 1], dtype=np.int64)
        if vocab_size and ids.size and int(ids.max()) >= vocab_size:
            bad = int(np.flatnonzero(ids >= vocab_size)[0])
            raise UserError(f"token file {uri!r} holds id {int(ids[bad])} at offset {s + bad}, beyond the "
                            f"tokenizer's vocab of {vocab_size}: it was made with another tokenizer, or read with "
                            "the wrong --token-dtype")
        appended = e >= len(arr)
        if appended:
            ids = np.append(ids, eos_id)
        yield s, ids.astype(np.int32), appended
        s = e + 1
