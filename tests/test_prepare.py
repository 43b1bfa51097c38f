import gzip
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import NEOX_TOKENIZER, TINY_PREPARE, cli_inprocess
from transformers import AutoTokenizer

from gl_ray.data.manifest import load_manifest
from gl_ray.data.corpus import list_source
from gl_ray.data.prepare import prepare
from gl_ray.data.stream import TokenStream
from gl_ray.errors import UserError

REPO = Path(__file__).resolve().parents[1]


def test_stdlib_dataset_is_valid_and_accounted(tiny_data):
    m = json.loads((Path(tiny_data) / "manifest.json").read_text())
    assert m["format"] == "gl-ray-shards/1" and m["tokenizer"] == "tokenizer"
    for split in ("train", "val"):
        s = m["splits"][split]
        assert s["tokens"] == sum(sh["tokens"] for sh in s["shards"]) > 0
        assert s["documents"] == sum(sh["rows"] for sh in s["shards"])
        for sh in s["shards"]:
            t = pq.read_table(Path(tiny_data) / sh["path"])
            assert t.schema.field("input_ids").type == pa.list_(pa.int32())
            ids = t.column("input_ids").to_pylist()
            assert len(ids) == sh["rows"] and sum(map(len, ids)) == sh["tokens"]
            assert all(doc[-1] == m["eos_token_id"] for doc in ids)  # every document ends with EOS
            assert max(max(doc) for doc in ids) < m["vocab_size"]
    assert len(m["splits"]["train"]["shards"]) > 1
    tok = AutoTokenizer.from_pretrained(Path(tiny_data) / "tokenizer")
    assert tok.eos_token_id == m["eos_token_id"] and len(tok) == m["vocab_size"]


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("how", [{"no_ray": True}, {"workers": 1}])
def test_the_same_inputs_give_byte_identical_shards_on_any_number_of_cpus(tiny_data, tmp_path, how):
    """tiny_data's units ran as parallel Ray Data tasks on 4 CPUs; in this process, or one task at a time, every
    file (shards, manifest, tokenizer) comes out byte for byte the same, and the work files are gone."""
    out = tmp_path / "again"
    prepare("stdlib", str(out), **TINY_PREPARE, **how)
    a = _files(Path(tiny_data))
    units = {p.split("-")[1] for p in a if p.startswith("train/")}  # train/shard-UUUUU-KKKK.parquet
    assert len(units) >= 3 and not any("_units" in p for p in a)
    assert _files(out) == a
    assert not Path(f"{out}.partial").exists()


def test_text_jsonl_parquet_gz_sources_with_the_pythia_tokenizer(ray_local, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("Hello world")
    (src / "b.md.gz").write_bytes(gzip.compress(b"# Title\nsome markdown"))
    (src / "c.jsonl").write_text(json.dumps({"text": "first"}) + "\n\n" + json.dumps({"text": "second"}) + "\n")
    pq.write_table(pa.table({"text": ["row one", "row two", ""]}), src / "d.parquet")
    (src / "e.txt").write_bytes(b"caf\xe9 latin-1")  # not UTF-8: replaced and counted
    (src / "ignored.bin").write_bytes(b"\x00")
    out = tmp_path / "out"
    m = prepare(str(src), str(out), tokenizer=str(NEOX_TOKENIZER), val_fraction=0.0)
    assert m["vocab_size"] == 50277 and m["eos_token_id"] == 0
    assert m["splits"]["train"]["documents"] == 7 and m["skipped_empty"] == 1
    assert m["replaced_chars"] == 1
    ids = [d for sh in m["splits"]["train"]["shards"]
           for d in pq.read_table(out / sh["path"]).column("input_ids").to_pylist()]
    assert [12092, 1533, 0] in ids  # "Hello world" + EOS with the real Pythia tokenizer


@pytest.mark.parametrize("source, needle", [
    ("/nonexistent/corpus", "does not exist"),
    ("ftp://host/x", "unknown scheme"),
    ("hf:/nonexistent/hf-folder", "cannot open it with datasets.load_dataset"),
])
def test_bad_sources(tmp_path, source, needle):
    with pytest.raises(UserError, match=needle):
        prepare(source, str(tmp_path / "o"))
    assert not list(tmp_path.glob("o*"))


def test_empty_corpus_leaves_nothing_behind(ray_local, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("   \n")
    with pytest.raises(UserError, match="no non-empty"):
        prepare(str(src), str(tmp_path / "o"), tokenizer=str(NEOX_TOKENIZER))
    assert not list(tmp_path.glob("o*"))
    (src / "b.py").write_text("")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="no document files"):
        prepare(str(empty), str(tmp_path / "o"))


def test_refuses_to_overwrite(tiny_data):
    with pytest.raises(UserError, match="already holds a dataset"):
        prepare("stdlib", tiny_data)


def test_overwrite_never_deletes_what_is_not_a_dataset(tmp_path):
    """--overwrite removes only a gl-ray dataset: not the source, not a folder holding it or inside it, not an
    unrelated folder, not a foreign DEST.partial; each is one line and every file stays."""
    src = tmp_path / "corpus"
    src.mkdir()
    (src / "a.txt").write_text("a document " * 20)
    (tmp_path / "notes.txt").write_text("a file beside the corpus")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    foreign = tmp_path / "ds.partial"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("not a staging folder")
    before = sorted(p for p in tmp_path.rglob("*"))
    for out, needle in [(src, "holds --source"), (tmp_path, "holds --source"), (src / "ds", "is inside --source"),
                        (mine, "is not a gl-ray dataset"), (tmp_path / "ds", "not a gl-ray prepare's staging")]:
        with pytest.raises(UserError, match=needle) as e:
            prepare(str(src), str(out), overwrite=True, no_ray=True, tokenizer=str(NEOX_TOKENIZER))
        assert "\n" not in str(e.value)
    assert sorted(p for p in tmp_path.rglob("*")) == before


def _tree(root: Path) -> dict[str, bytes]:
    """Every file under root (relative path -> bytes) and every folder (relative path/ -> b"")."""
    return {p.relative_to(root).as_posix() + ("/" if p.is_dir() else ""): b"" if p.is_dir() else p.read_bytes()
            for p in root.rglob("*")}


def test_overwrite_replaces_only_a_folder_that_is_all_gl_rays(tmp_path, capsys, monkeypatch):
    """--overwrite deletes --out whole, so it replaces only a gl-ray dataset: a manifest.json that the manifest
    reader accepts (a web app's is not) and only files that prepare writes (not a notes.txt put beside the shards,
    not a web app's index.html beside a gl-ray manifest). Anything else is one line naming the folder and why,
    exit 2, and every file stays, with no DEST.partial or DEST.lock (issue 40, 2)."""
    src = tmp_path / "corpus"
    src.mkdir()
    for i in range(4):
        (src / f"{i}.txt").write_text(f"document {i} " * 30)
    kw = {"overwrite": True, "no_ray": True, "tokenizer": str(NEOX_TOKENIZER), "val_fraction": 0.3}
    app = tmp_path / "app"
    app.mkdir()
    (app / "manifest.json").write_text(json.dumps({"name": "My App", "start_url": "/", "display": "standalone"}))
    (app / "index.html").write_text("<html>years of work</html>")
    ds = tmp_path / "ds"
    prepare(str(src), str(ds), **kw)
    (ds / "notes.txt").write_text("mine")
    (ds / "train" / "more").mkdir()
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "manifest.json").write_bytes((ds / "manifest.json").read_bytes())  # gl-ray's format, not its files
    (mixed / "index.html").write_text("<html/>")
    staging = tmp_path / "st.partial"  # a prepare's staging folder by its marker, with a file no prepare writes
    (staging / "_units").mkdir(parents=True)
    (staging / "_units" / "prepare.json").write_text("{}")
    (staging / "thesis.tex").write_text("years of work")
    before = _tree(tmp_path)
    foreign = "holds files that gl-ray's prepare does not write"
    for out, needle in [(app, r"is not a gl-ray dataset \(manifest '.*' has format None, expected 'gl-ray-shards/1'\)"
                         r".*nothing was deleted"),
                        (ds, rf"{foreign} \(notes.txt, train/more/\).*nothing was deleted"),
                        (mixed, rf"{foreign} \(index.html\).*nothing was deleted")]:
        with pytest.raises(UserError, match=f"--overwrite: {re.escape(repr(str(out)))} {needle}") as e:
            prepare(str(src), str(out), **kw)
        assert "\n" not in str(e.value)
    with pytest.raises(UserError, match=rf"{re.escape(repr(str(staging)))} {foreign} \(thesis.tex\)"):
        prepare(str(src), str(tmp_path / "st"), **kw)
    r = cli_inprocess(capsys, monkeypatch, "prepare", "--source", str(src), "--out", str(app), "--overwrite",
                      "--no-ray", "--tokenizer", str(NEOX_TOKENIZER))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and str(app) in r.stderr, r.stderr
    assert _tree(tmp_path) == before
    (ds / "notes.txt").unlink()
    (ds / "train" / "more").rmdir()
    prepare(str(src), str(ds), **kw)  # all gl-ray's: replaced
    assert load_manifest(str(ds)).tokens("train") > 0


def _copy(tiny_data, tmp_path) -> Path:
    import shutil

    dst = tmp_path / "ds"
    shutil.copytree(tiny_data, dst)
    return dst


def _manifest(ds: Path) -> dict:
    return json.loads((ds / "manifest.json").read_text())


def _save(ds: Path, m: dict) -> None:
    (ds / "manifest.json").write_text(json.dumps(m))


def test_bad_datasets_are_named(tiny_data, tmp_path):
    ds = _copy(tiny_data, tmp_path)
    first = ds / _manifest(ds)["splits"]["train"]["shards"][0]["path"]
    TokenStream(str(ds), "train")  # the copy is good

    first.write_bytes(first.read_bytes()[:100])  # corrupt shard
    with pytest.raises(UserError, match=f"shard .*{first.name}.* not a readable Parquet"):
        TokenStream(str(ds), "train")
    first.unlink()  # missing shard
    with pytest.raises(UserError, match=f"{first.name}.* is missing"):
        TokenStream(str(ds), "train")


def test_manifest_mismatches(tiny_data, tmp_path):
    ds = _copy(tiny_data, tmp_path)
    good = _manifest(ds)
    m = json.loads(json.dumps(good))
    m["splits"]["train"]["shards"][0]["tokens"] += 1
    m["splits"]["train"]["tokens"] += 1
    _save(ds, m)
    with pytest.raises(UserError, match="shard-00000-0000.parquet.* holds .* tokens but the manifest says"):
        TokenStream(str(ds), "train")
    m = json.loads(json.dumps(good))
    m["splits"]["train"]["tokens"] += 5
    _save(ds, m)
    with pytest.raises(UserError, match="differ from the sum over its shards"):
        load_manifest(str(ds))
    m = json.loads(json.dumps(good))
    m["splits"]["train"]["shards"][0]["path"] = "../../etc/passwd"
    _save(ds, m)
    with pytest.raises(UserError, match="escapes the dataset folder"):
        load_manifest(str(ds))
    m = json.loads(json.dumps(good))
    m["vocab_size"] = 10  # ids in the shards now exceed the vocab
    _save(ds, m)
    with pytest.raises(UserError, match="token ids outside"):
        TokenStream(str(ds), "train")
    (ds / "manifest.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        load_manifest(str(ds))
    with pytest.raises(UserError, match="manifest.json missing"):
        load_manifest(str(tmp_path / "nothing"))


def test_token_ids_are_checked_as_rows_are_read_whatever_the_statistics(tiny_data, tmp_path):
    """A shard written without column statistics holding an id beyond the vocab is refused when its tokens are
    read (it used to train 15 steps, then crash with IndexError); a manifest's vocab_size is bounded before it sizes
    anything."""
    ds = _copy(tiny_data, tmp_path)
    m = _manifest(ds)
    shard = ds / m["splits"]["train"]["shards"][0]["path"]
    t = pq.read_table(shard)
    ids = t["input_ids"].to_pylist()
    ids[0][3] = m["vocab_size"] + 4000
    pq.write_table(pa.table({"input_ids": pa.array(ids, pa.list_(pa.int32())), "num_tokens": t["num_tokens"]}),
                   shard, write_statistics=False)
    stream = TokenStream(str(ds), "train")  # the statistics cannot tell
    with pytest.raises(UserError, match=f"token id {m['vocab_size'] + 4000} .*outside the vocab"):
        stream.read(0, stream.tokens)
    for bad in (1e8, 0, -3):
        _save(ds, m | {"vocab_size": bad})
        with pytest.raises(UserError, match="vocab_size .* must be in"):
            load_manifest(str(ds))


def test_wrong_column_type(tiny_data, tmp_path):
    ds = _copy(tiny_data, tmp_path)
    m = _manifest(ds)
    sh = ds / m["splits"]["train"]["shards"][0]["path"]
    t = pq.read_table(sh)
    bad = pa.table({"input_ids": t.column("input_ids").cast(pa.list_(pa.int64())), "num_tokens": t["num_tokens"]})
    pq.write_table(bad, sh)
    with pytest.raises(UserError, match="column 'input_ids' is list<.*int64.*expected list<.*int32"):
        TokenStream(str(ds), "train")


def test_cli_prepare_bad_input_exit_2(tmp_path):
    r = subprocess.run([sys.executable, "-m", "gl_ray", "prepare", "--source", str(tmp_path / "nope"), "--out",
                        str(tmp_path / "o")], capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.count("\n") == 1
    assert "does not exist" in r.stderr


def test_token_stream_reads_documents_in_order(tiny_data):
    s = TokenStream(tiny_data, "train")
    m = _manifest(Path(tiny_data))
    flat = np.concatenate([np.concatenate(pq.read_table(Path(tiny_data) / sh["path"]).column("input_ids")
                                          .to_pylist()) for sh in m["splits"]["train"]["shards"]])
    assert s.tokens == len(flat) == m["splits"]["train"]["tokens"]
    assert s.read(0, s.tokens).tolist() == flat.tolist()
    assert s.read(100, 5000).tolist() == flat[100:5000].tolist()  # crosses shard boundaries
    nxt = s.read(s.tokens, 2 * s.tokens)  # the second epoch: the same tokens, reshuffled by document
    assert sorted(nxt.tolist()) == sorted(flat.tolist()) and nxt.tolist() != flat.tolist()
    rows = s.rows(np.array([0, 64, 10_000]), 64)
    assert rows.tolist() == [flat[0:64].tolist(), flat[64:128].tolist(), flat[10_000:10_064].tolist()]


def test_a_small_corpus_always_gets_a_val_document(tmp_path):
    """60 documents at --val-fraction 1e-6 (the split hash of a key, which holds the test's temp path, sent one or
    two of them to val at the default 1% in some runs): the hash sends none to val, so the one with the smallest
    hash goes there; the same on a rerun, and the train documents keep the source order (files shuffled by path
    hash, see list_source)."""
    src = tmp_path / "src"
    src.mkdir()
    for i in range(60):
        (src / f"doc{i:02d}.txt").write_text(f"document number {i} " * 5)
    runs = []
    for k in range(2):
        m = prepare(str(src), str(tmp_path / f"out{k}"), tokenizer=str(NEOX_TOKENIZER), no_ray=True,
                    val_fraction=1e-6)
        assert m["splits"]["val"]["documents"] == 1 and m["splits"]["train"]["documents"] == 59
        runs.append([pq.read_table(tmp_path / f"out{k}" / sh["path"]).column("input_ids").to_pylist()
                     for s in ("train", "val") for sh in m["splits"][s]["shards"]])
    assert runs[0] == runs[1]
    tok = AutoTokenizer.from_pretrained(NEOX_TOKENIZER)
    train = [int(tok.decode(d).split()[2]) for shard in runs[0][:-1] for d in shard]  # "document number I ..."
    val = int(tok.decode(runs[0][-1][0]).split()[2])
    order = [int(Path(f.uri).stem[3:]) for f in list_source(str(src))]
    assert train == [i for i in order if i != val]


def test_a_kill_before_the_manifest_of_a_small_corpus_resumes_to_the_same_dataset(tmp_path, monkeypatch):
    """The small-corpus move of a train document to val, then a kill before manifest.json (or during the move):
    a resume gives the dataset an uninterrupted prepare gives, every document once."""
    from gl_ray import storage

    src = tmp_path / "src"
    src.mkdir()
    for i in range(12):
        (src / f"doc{i:02d}.txt").write_text(f"document number {i} " * 5)
    kw = dict(tokenizer=str(NEOX_TOKENIZER), no_ray=True, val_fraction=1e-6)  # the hash sends none to val
    clean = prepare(str(src), str(tmp_path / "clean"), **kw)
    assert clean["splits"]["val"]["documents"] == 1 and clean["splits"]["train"]["documents"] == 11
    assert any(sh["path"].endswith("-rest.parquet") for sh in clean["splits"]["train"]["shards"])  # it moved one
    for name, victim in (("write_bytes", "manifest.json"), ("delete_file", ".parquet")):  # after / during the move
        real = getattr(storage, name)

        def killed(uri, *a, real=real, victim=victim):
            if str(uri).endswith(victim):
                raise KeyboardInterrupt  # as a kill would: not bad input, so the staging folder stays
            return real(uri, *a)

        out = tmp_path / f"ds-{name}"
        monkeypatch.setattr(storage, name, killed)
        with pytest.raises(KeyboardInterrupt):
            prepare(str(src), str(out), **kw)
        monkeypatch.setattr(storage, name, real)
        assert not out.exists()
        assert prepare(str(src), str(out), **kw, resume=True) == clean
        assert _files(out) == _files(tmp_path / "clean")


def test_lone_surrogates_in_json_lines_are_replaced_and_counted(tmp_path):
    """A JSON line holding an unpaired "\\ud800" escape: no tokenizer can take it, so it becomes U+FFFD and is
    counted in the manifest's replaced_chars, beside a valid pair that stays one character."""
    src = tmp_path / "c.jsonl"
    src.write_text('{"text": "lone \\ud800 here"}\n{"text": "a pair \\ud83d\\ude00 stays"}\n'
                   + "".join(json.dumps({"text": f"plain document {i} " * 4}) + "\n" for i in range(6)))
    m = prepare(str(src), str(tmp_path / "out"), tokenizer=str(NEOX_TOKENIZER), no_ray=True, val_fraction=0.2)
    assert m["replaced_chars"] == 1
    assert m["splits"]["train"]["documents"] + m["splits"]["val"]["documents"] == 8


def test_two_prepares_to_one_output_the_second_is_refused(tmp_path):
    """prepare holds a lock on its output (DEST.lock beside it) while it runs: a second prepare to the same --out
    is one line naming the holder, and touches nothing; the lock file goes when the holder ends."""
    out = tmp_path / "ds"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from gl_ray.lock import output_lock\n"
                               f"with output_lock({str(out)!r}):\n print('held', flush=True); time.sleep(60)"],
                              cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match=r"dataset .* is being written by another gl-ray \(pid "):
            prepare("stdlib", str(out), tokenizer=str(NEOX_TOKENIZER), no_ray=True, max_docs=3)
        assert not out.exists() and not Path(f"{out}.partial").exists()
    finally:
        holder.kill()
        holder.wait()
    prepare("stdlib", str(out), tokenizer=str(NEOX_TOKENIZER), no_ray=True, max_docs=3)
    assert (out / "manifest.json").exists() and not Path(f"{out}.lock").exists()


def _jsonl(docs, key="text") -> bytes:
    return "".join(json.dumps({key: d}) + "\n" for d in docs).encode()


def test_streaming_sources_jsonl_gz_zst_parquet_and_save_to_disk(ray_local, tmp_path):
    """The same eight documents as .jsonl.gz, .jsonl.zst, Parquet with another text column and a `datasets`
    save_to_disk folder (and its DatasetDict) all tokenize to the same documents."""
    import datasets  # a dev dependency: the real writer of save_to_disk folders
    docs = [f"document {i}: " + "word " * (i + 3) for i in range(8)]
    zstd = pa.Codec("zstd")
    sources = {}
    for name, write in {
        "gz": lambda d: (d / "a.jsonl.gz").write_bytes(gzip.compress(_jsonl(docs))),
        "zst": lambda d: (d / "a.jsonl.zst").write_bytes(zstd.compress(_jsonl(docs), asbytes=True)),
        "parquet": lambda d: pq.write_table(pa.table({"id": range(8), "body": docs}), d / "a.parquet",
                                            row_group_size=3),
        "hf": lambda d: datasets.Dataset.from_dict({"body": docs}).save_to_disk(str(d / "ds"), num_shards=2),
        "hfdict": lambda d: datasets.DatasetDict({"train": datasets.Dataset.from_dict({"body": docs}),
                                                  "test": datasets.Dataset.from_dict({"body": ["x"]})}
                                                 ).save_to_disk(str(d / "ds")),
    }.items():
        d = tmp_path / name
        d.mkdir()
        write(d)
        sources[name] = str(d / "ds") if name.startswith("hf") else str(d)
    tok = AutoTokenizer.from_pretrained(NEOX_TOKENIZER)
    expect = sorted(tok(t)["input_ids"] + [0] for t in docs)
    for name, src in sources.items():
        column = "text" if name in ("gz", "zst") else "body"
        m = prepare(src, str(tmp_path / f"out-{name}"), tokenizer=str(NEOX_TOKENIZER), val_fraction=0.0,
                    text_column=column)
        got = sorted(d for sh in m["splits"]["train"]["shards"]
                     for d in pq.read_table(tmp_path / f"out-{name}" / sh["path"]).column("input_ids").to_pylist())
        assert got == expect, name


def _truncated_gz(p: Path) -> None:
    data = gzip.compress(_jsonl([f"document {i} {i * i} {i ** 3}" for i in range(2000)]))
    assert len(data) > 2000
    p.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("name, write, needle", [
    ("a.jsonl.gz", _truncated_gz, r"a.jsonl.gz' is not a valid gzip file .*truncated"),
    ("a.jsonl", lambda p: p.write_bytes(_jsonl(["ok"]) + b"{not json\n"), r"a.jsonl' line 2 is not JSON"),
    ("a.jsonl", lambda p: p.write_bytes(_jsonl(["ok"]) + _jsonl(["no"], key="body")),
     r"a.jsonl' line 2 is not a JSON object with a 'text' field"),
    ("a.jsonl", lambda p: p.write_bytes(_jsonl(["ok", "ok"]) + b'{"text": "caf\xe9"}\n'),
     r"a.jsonl' line 3 is not UTF-8"),
    ("a.parquet", lambda p: pq.write_table(pa.table({"body": ["x"]}), p), r"a.parquet' has no column 'text'"),
    ("a.parquet", lambda p: p.write_bytes(b"PAR1 not really"), r"a.parquet' is not a readable Parquet file"),
])
def test_bad_source_files_are_one_line_and_leave_nothing(tmp_path, name, write, needle, capsys, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    (src / "good.txt").write_text("a fine document")
    write(src / name)
    r = cli_inprocess(capsys, monkeypatch, "prepare", "--source", str(src), "--out", str(tmp_path / "o"),
                      "--tokenizer", str(NEOX_TOKENIZER), "--no-ray")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    import re
    assert re.search(needle, r.stderr), r.stderr
    assert not list(tmp_path.glob("o*"))  # no manifest, no partial folder


def test_the_bpe_trains_on_a_deterministic_sample(tmp_path):
    """A word that only the end of a big file holds is in the vocabulary when the trainer reads everything and
    not when it reads a 64 KiB sample; the sampled tokenizer is the same on a rerun."""
    src = tmp_path / "src"
    src.mkdir()
    rare = "quuxzorblat"
    (src / "a.jsonl").write_bytes(_jsonl([f"common text number {i} here" for i in range(8000)] + [rare] * 4000))
    toks = {}
    for name, sample in [("all", 1 << 30), ("sample", 1 << 16), ("again", 1 << 16)]:
        prepare(str(src), str(tmp_path / name), tokenizer="train:400", val_fraction=0.0, no_ray=True,
                tokenizer_sample_bytes=sample)
        toks[name] = (tmp_path / name / "tokenizer" / "tokenizer.json").read_text()
    whole = AutoTokenizer.from_pretrained(tmp_path / "all" / "tokenizer")
    sampled = AutoTokenizer.from_pretrained(tmp_path / "sample" / "tokenizer")
    assert len(whole(rare)["input_ids"]) < len(sampled(rare)["input_ids"])
    assert toks["sample"] == toks["again"] != toks["all"]


def test_an_interrupted_prepare_is_not_a_dataset_and_resumes(tmp_path, monkeypatch):
    """Interrupted after two units: DEST is not a dataset and a plain rerun says how to go on; --resume finishes
    it without redoing the finished units, and gives the same bytes as an uninterrupted prepare."""
    import gl_ray.data.prepare as prep

    src = tmp_path / "src"
    src.mkdir()
    for i in range(6):
        (src / f"part{i}.jsonl").write_bytes(_jsonl([f"file {i} doc {j} " * 20 for j in range(40)]))
    kw = dict(tokenizer=str(NEOX_TOKENIZER), val_fraction=0.1, no_ray=True, unit_bytes=1)
    clean = prepare(str(src), str(tmp_path / "clean"), **kw)
    real, calls, fail = prep.write_unit, [], [True]

    def dies_on_the_third(unit, **k):
        calls.append(unit["index"])
        if fail[0] and len(calls) == 3:
            raise ConnectionError("the node went away")  # not bad input: the partial output stays
        return real(unit, **k)

    monkeypatch.setattr(prep, "write_unit", dies_on_the_third)
    out = tmp_path / "ds"
    with pytest.raises(ConnectionError):
        prepare(str(src), str(out), **kw)
    assert not out.exists() and Path(f"{out}.partial").is_dir()
    with pytest.raises(UserError, match=r"interrupted prepare \(2 units done\); pass --resume"):
        prepare(str(src), str(out), **kw)
    with pytest.raises(UserError, match="val_fraction differ"):
        prepare(str(src), str(out), **{**kw, "val_fraction": 0.2}, resume=True)
    calls.clear()
    fail[0] = False
    # a kill while a unit's statistics were being written leaves a temp file: that unit is simply done again
    Path(f"{out}.partial", "_units", "unit-00002.json.tmp-1a2b3c").write_text('{"ind')
    assert prepare(str(src), str(out), **kw, resume=True) == clean
    assert sorted(calls) == [2, 3, 4, 5]  # the two finished units were not redone
    assert _files(out) == _files(tmp_path / "clean") and not Path(f"{out}.partial").exists()


def test_tokenizer_sample_cuts_long_documents_into_pieces_within_the_file_share(tmp_path):
    """A 2 MB document without whitespace reaches the BPE trainer as pieces of at most SAMPLE_PIECE characters and
    no more than the file's 1/64 share of the sample (it used to go whole, and the trainer stalled for minutes)."""
    from gl_ray.data.prepare import SAMPLE_PIECE, tokenizer_sample
    from gl_ray.data.tokenizer import train_bpe

    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "blob.txt").write_text("ab" * (1 << 20))
    (tmp_path / "src" / "small.txt").write_text("a small document with words")
    lines = []
    pieces = list(tokenizer_sample(list_source(str(tmp_path / "src")), 1 << 22, "text", progress=lines.append))
    assert all(len(p) <= SAMPLE_PIECE for p in pieces)
    assert sum(len(p) for p in pieces if set(p) <= {"a", "b"}) <= (1 << 22) // 64  # the file's share
    assert any("small document" in p for p in pieces)  # the next file still contributes
    assert 258 <= len(train_bpe(iter(pieces), 300)) <= 300  # trained (few merges exist in this text)
