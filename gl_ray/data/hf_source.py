"""Hugging Face datasets as a source of `gl-ray prepare`: `--source hf:NAME[:CONFIG][@SPLIT]`, streamed.

NAME is a hub dataset (read through `datasets.load_dataset(..., streaming=True)`; the hub must be reachable, or
the dataset in the local cache with HF_DATASETS_OFFLINE=1), a local folder `load_dataset` reads (data files of one
format), or one local data file (.jsonl/.json, .parquet, .csv, .txt, .arrow). SPLIT defaults to train; the text
is the --text-column field of each row.

The stream's shards (its data files) are the units of prepare: each is one Ray Data task that streams its shard
(`IterableDataset.shard`), so memory stays bounded whatever the dataset's size and the same shards give the same
dataset on any number of CPUs. A source is listed as one pseudo-file per shard, `hf:...#shard=I/N`; keys of
documents add the row within the shard.

    files = hf_shards("hf:/data/my_jsonl_folder@train")
    for key, text, _ in read_hf(files[0].uri, "text"): ...
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from gl_ray.errors import UserError

PREFIX = "hf:"
BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text",
            ".arrow": "arrow"}  # one local data file -> the `datasets` builder that reads it
NOMINAL_SHARD_BYTES = 16 << 20  # a shard's size as units count it: one shard, one unit


def parse(source: str) -> tuple[str, str | None, str]:
    """hf:NAME[:CONFIG][@SPLIT] -> (NAME, CONFIG or None, SPLIT)."""
    spec = source[len(PREFIX):].split("#", 1)[0]
    spec, _, split = spec.rpartition("@") if "@" in spec else (spec, "", "train")
    name, _, config = spec.partition(":") if not Path(spec).exists() else (spec, "", "")
    if not name or not split:
        raise UserError(f"--source {source!r}: expected hf:NAME[:CONFIG][@SPLIT]")
    return name, config or None, split


def stream(source: str):
    """The `datasets` IterableDataset of a hf: source; UserError in one line if it cannot be opened."""
    try:
        import datasets
    except ImportError:
        raise UserError(f"--source {source!r} needs the datasets package: pip install 'gl-ray[hf]'") from None

    name, config, split = parse(source)
    datasets.disable_progress_bars()
    try:
        if Path(name).is_file():
            builder = BUILDERS.get(Path(name).suffix)
            if builder is None:
                raise UserError(f"--source {source!r}: a data file must be one of {', '.join(BUILDERS)}")
            return datasets.load_dataset(builder, data_files=name, split=split, streaming=True)
        return datasets.load_dataset(name, config, split=split, streaming=True)
    except UserError:
        raise
    except Exception as e:  # datasets raises FileNotFoundError, ValueError, DatasetNotFoundError, HTTP errors
        first = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise UserError(f"--source {source!r}: cannot open it with datasets.load_dataset: {first}") from None


def hf_shards(source: str) -> list[tuple[str, int]]:
    """(uri, nominal size) of one pseudo-file per shard of the stream, in shard order (gl_ray.data.corpus makes
    them SourceFiles)."""
    ds = stream(source)
    n = getattr(ds, "num_shards", None) or ds.n_shards  # num_shards: datasets >= 3
    base = source.split("#", 1)[0]
    return [(f"{base}#shard={i}/{n}", NOMINAL_SHARD_BYTES) for i in range(n)]


def read_hf(uri: str, text_column: str) -> Iterator[tuple[str, str, int]]:
    """(key, text, 0) of each row of one shard (`hf:...#shard=I/N`)."""
    base, _, where = uri.partition("#shard=")
    index, _, count = where.partition("/")
    shard = stream(base).shard(num_shards=int(count), index=int(index))
    for row_index, row in enumerate(shard):
        if text_column not in row:
            raise UserError(f"--source {base!r} has no column {text_column!r} (columns: {', '.join(row)}); pass "
                            "--text-column")
        text = row[text_column]
        if not isinstance(text, str):
            raise UserError(f"--source {base!r}: row {row_index} of shard {index} has a {type(text).__name__} in "
                            f"{text_column!r}, not text")
        yield f"{uri}#{row_index}", text, 0
