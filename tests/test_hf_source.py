"""Hugging Face datasets as a prepare source (gl_ray.data.hf_source): `hf:NAME[:CONFIG][@SPLIT]`, streamed shard by
shard. Local data files only (no hub here)."""

import json
import sysconfig
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import NEOX_TOKENIZER
from test_tokens import documents

from gl_ray.data.corpus import list_source
from gl_ray.data.prepare import prepare
from gl_ray.errors import UserError


@pytest.fixture(scope="module")
def jsonl_folder(tmp_path_factory):
    """30 stdlib files as rows of three .jsonl data files (a folder `load_dataset` reads)."""
    root = tmp_path_factory.mktemp("hf") / "corpus"
    root.mkdir()
    texts = [f.read_text(encoding="utf-8", errors="replace")[:2000]
             for f in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:30]]
    for k in range(3):
        (root / f"part-{k}.jsonl").write_text("".join(json.dumps({"text": t, "n": i}) + "\n"
                                                      for i, t in enumerate(texts[k::3])))
    return root


def test_a_datasets_folder_streams_shard_by_shard_into_the_same_documents(jsonl_folder, tmp_path, ray_local):
    """Each data file is a shard and a unit (a Ray Data task); the documents are those gl-ray's own .jsonl reader
    gives for the same files."""
    assert [f.uri.rsplit("#", 1)[1] for f in list_source(f"hf:{jsonl_folder}")] == \
        ["shard=0/3", "shard=1/3", "shard=2/3"]
    want = prepare(str(jsonl_folder), str(tmp_path / "plain"), tokenizer=str(NEOX_TOKENIZER), no_ray=True,
                   val_fraction=0.2)
    got = prepare(f"hf:{jsonl_folder}@train", str(tmp_path / "hf"), tokenizer=str(NEOX_TOKENIZER), val_fraction=0.2)
    assert documents(tmp_path / "hf", got) == documents(tmp_path / "plain", want)
    assert got["source"] == f"hf:{jsonl_folder}@train" and got["splits"]["val"]["documents"] > 0


def test_one_data_file_with_its_own_text_column(tmp_path):
    table = pa.table({"content": ["def f():\n    return 1\n", "x = [i for i in range(3)]\n", "print('hi')\n"]})
    pq.write_table(table, tmp_path / "docs.parquet")
    got = prepare(f"hf:{tmp_path / 'docs.parquet'}", str(tmp_path / "out"), tokenizer=str(NEOX_TOKENIZER),
                  no_ray=True, val_fraction=0.34, text_column="content")
    assert got["splits"]["train"]["documents"] + got["splits"]["val"]["documents"] == 3


def test_bad_hf_sources_are_one_line(jsonl_folder, tmp_path):
    def refused(match, source, **kw):
        with pytest.raises(UserError, match=match) as e:
            prepare(source, str(tmp_path / "out"), tokenizer=str(NEOX_TOKENIZER), no_ray=True, **kw)
        assert "\n" not in str(e.value) and not (tmp_path / "out").exists()

    refused("has no column 'body' \\(columns: text, n\\); pass --text-column", f"hf:{jsonl_folder}",
            text_column="body")
    refused("row 0 of shard 0 has a int in 'n', not text", f"hf:{jsonl_folder}", text_column="n")
    refused("cannot open it with datasets.load_dataset", f"hf:{tmp_path / 'missing'}")
    refused("cannot open it", f"hf:{jsonl_folder}@nosuchsplit")
    (tmp_path / "notes.xyz").write_text("x")
    refused("a data file must be one of", f"hf:{tmp_path / 'notes.xyz'}")
