"""benchmarks/prose_corpus.py: the second corpus of docs/RESULTS.md, from text that ships inside the installed
packages, read by `gl-ray prepare` as any folder of documents is."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

from conftest import NEOX_TOKENIZER, cli_inprocess

from benchmarks.prose_corpus import write_corpus

REPO = Path(__file__).resolve().parents[1]


def test_the_prose_corpus_is_the_packages_descriptions_and_pydoc_topics_and_prepares(tmp_path, capsys, monkeypatch):
    src = tmp_path / "prose-src"
    index = write_corpus(src, min_chars=500)
    names = [f["file"] for f in index["files"]]
    assert names == sorted(names) and sorted(p.name for p in src.iterdir()) == sorted([*names, "index.json"])
    assert "topic-assert.txt" in names and "dist-torch.md" in names  # Python's reference; a package's README
    for f in index["files"]:  # the index says what each file holds
        data = (src / f["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == f["sha256"] and f["chars"] >= (500 if "dist-" in f["file"] else 1)
    assert "assert_stmt ::=" in (src / "topic-assert.txt").read_text()
    assert any(p.startswith("torch==") for p in index["packages"])
    again = write_corpus(tmp_path / "again", min_chars=500)  # the same packages: the same corpus
    assert again["files"] == index["files"]

    r = cli_inprocess(capsys, monkeypatch, "prepare", "--source", str(src), "--out", str(tmp_path / "prose"),
                      "--no-ray", "--tokenizer", str(NEOX_TOKENIZER), "--val-fraction", "0.05")
    assert r.returncode == 0, r.stderr
    manifest = json.loads((tmp_path / "prose" / "manifest.json").read_text())
    docs = sum(split["documents"] for split in manifest["splits"].values())
    assert docs == len(names) and manifest["skipped_empty"] == 0  # a document per file; index.json is not one


def test_a_folder_that_is_not_empty_is_one_line_and_exit_2(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    r = subprocess.run([sys.executable, "-m", "benchmarks.prose_corpus", "--out", str(tmp_path)], cwd=REPO,
                       capture_output=True, text=True, check=False)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr
    assert "exists and is not an empty folder" in r.stderr and (tmp_path / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]
