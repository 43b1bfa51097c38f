"""Pre-tokenized corpora (gl_ray.data.tokens): `prepare --source tokens:PATH` gives the dataset that preparing the
same documents as text with the same tokenizer gives."""

import json
import sysconfig
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import NEOX_TOKENIZER

from gl_ray.data.prepare import prepare
from gl_ray.data.tokenizer import encode_documents, load_tokenizer
from gl_ray.errors import UserError

EOS = 0  # GPT-NeoX-20B's <|endoftext|>


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """40 stdlib files as a .jsonl of text and as their GPT-NeoX ids, EOS after each (nanoGPT's layout)."""
    root = tmp_path_factory.mktemp("tokens")
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:40]
    texts = [f.read_text(encoding="utf-8", errors="replace")[:3000] for f in files]
    (root / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    tok = load_tokenizer(str(NEOX_TOKENIZER))
    ids = np.concatenate(encode_documents(texts, tok.backend_tokenizer.to_str(), EOS))
    return root, ids


def documents(out: Path, manifest: dict) -> list[tuple]:
    """Every document of both splits, sorted (the splits differ: the split hash keys differ)."""
    docs = [tuple(d) for split in ("train", "val") for sh in manifest["splits"][split]["shards"]
            for d in pq.read_table(out / sh["path"])["input_ids"].to_pylist()]
    return sorted(docs)


def test_token_files_give_the_datasets_text_gives(corpus, tmp_path):
    root, ids = corpus
    text = prepare(str(root / "docs.jsonl"), str(tmp_path / "text"), tokenizer=str(NEOX_TOKENIZER), no_ray=True,
                   val_fraction=0.2)
    np.save(root / "ids.npy", ids.astype(np.uint16))
    ids.astype(np.uint16).tofile(root / "train.bin")
    np.save(root / "ids32.npy", ids.astype(np.uint32))
    want = documents(tmp_path / "text", text)
    assert len(want) == 40
    for name, dtype in (("ids.npy", "auto"), ("train.bin", "auto"), ("ids32.npy", "uint32")):
        out = tmp_path / name
        # units of ~1,000 ids: documents cross unit ends, and each is still taken once
        got = prepare(f"tokens:{root / name}", str(out), tokenizer=str(NEOX_TOKENIZER), no_ray=True,
                      val_fraction=0.2, unit_bytes=4000, token_dtype=dtype)
        assert documents(out, got) == want, name
        assert got["splits"]["train"]["tokens"] + got["splits"]["val"]["tokens"] == len(ids)
        assert got["vocab_size"] == text["vocab_size"] and got["appended_eos"] == 0
        assert (out / "tokenizer" / "tokenizer.json").is_file()


def test_a_last_document_without_eos_gets_one_on_ray(corpus, tmp_path, ray_local):
    """Units are Ray Data tasks; a file that ends mid-document has the EOS appended, and counted."""
    root, ids = corpus
    cut = ids[:-1]  # drop the final EOS
    np.save(root / "cut.npy", cut.astype(np.uint16))
    got = prepare(f"tokens:{root / 'cut.npy'}", str(tmp_path / "cut"), tokenizer=str(NEOX_TOKENIZER),
                  val_fraction=0.2, unit_bytes=20000)
    assert got["appended_eos"] == 1
    assert got["splits"]["train"]["tokens"] + got["splits"]["val"]["tokens"] == len(ids)
    assert got["splits"]["train"]["documents"] + got["splits"]["val"]["documents"] == 40


def test_bad_token_files_are_one_line_and_leave_nothing(corpus, tmp_path):
    root, ids = corpus

    def refused(match, source, **kw):
        with pytest.raises(UserError, match=match) as e:
            prepare(source, str(tmp_path / "out"), no_ray=True, **{"tokenizer": str(NEOX_TOKENIZER)} | kw)
        assert "\n" not in str(e.value)
        assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()

    bad = ids.astype(np.uint16).copy()
    bad[500] = 60000  # beyond GPT-NeoX's 50,277 ids
    np.save(root / "bad.npy", bad)
    refused("holds id 60000 at offset 500, beyond the tokenizer's vocab of 50277", f"tokens:{root / 'bad.npy'}")
    refused("is already tokenized: give --tokenizer FOLDER", f"tokens:{root / 'ids.npy'}", tokenizer="train:512")
    (root / "odd.bin").write_bytes(b"\x01\x00\x02")
    refused("not a whole number of uint16 ids", f"tokens:{root / 'odd.bin'}")
    refused("holds uint16 ids; --token-dtype says uint32", f"tokens:{root / 'ids.npy'}", token_dtype="uint32")
    refused("has no token files", f"tokens:{root / '*.jsonl'}")
    refused("must be local", "tokens:s3://bucket/train.bin")
    np.save(root / "grid.npy", np.zeros((4, 4), np.uint16))
    refused("expected a flat array", f"tokens:{root / 'grid.npy'}")
