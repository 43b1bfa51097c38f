"""gl_ray.data.recall and `gl-ray prepare --recall`: recall items inserted into documents, exact and deterministic."""

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import NEOX_TOKENIZER, cli_inprocess

from gl_ray.data.prepare import prepare
from gl_ray.data.recall import (RecallItems, RecallSpec, document_rng, insert_recall, parse_recall_spec,
                                resolve_items)
from gl_ray.errors import UserError


def _blocks(targets: np.ndarray, distances: np.ndarray, spec: RecallSpec) -> list[tuple[int, int]]:
    """(insertion start, recall start) of every pair, from the recorded targets and distances."""
    K, V = spec.key_len, spec.value_len
    return [(int(t - 1 - K - d), int(t - 1 - K)) for t, d in zip(targets[::V], distances[::V])]


def check_document(original: np.ndarray, out: np.ndarray, targets: np.ndarray, distances: np.ndarray,
                   items) -> int:
    """Every property a recall document must have; returns its pair count."""
    spec, K, V, L = items.spec, items.spec.key_len, items.spec.value_len, items.spec.block_len
    pairs = _blocks(targets, distances, spec)
    assert len(targets) == len(distances) == len(pairs) * V
    assert len(out) == len(original) + 2 * L * len(pairs)
    busy = np.zeros(len(out), bool)
    item_ids = set(items.item_ids)
    for (s, r), d in zip(pairs, distances[::V]):
        assert spec.min_distance <= d < spec.max_distance and r - s == d
        assert out[s] == items.mark_id and out[r] == items.cue_id
        assert np.array_equal(out[s + 1:s + L], out[r + 1:r + L])  # the same key, and the value recalled
        assert set(out[s + 1:s + L].tolist()) <= item_ids
        assert not busy[s:s + L].any() and not busy[r:r + L].any()  # blocks never overlap
        busy[s:s + L] = busy[r:r + L] = True
        # the nearest earlier MARK with this key is this pair's: the value is determined by the context
        key = out[r + 1:r + 1 + K]
        marks = [j for j in np.flatnonzero(out[:r] == items.mark_id) if np.array_equal(out[j + 1:j + 1 + K], key)]
        assert marks[-1] == s
    assert np.array_equal(out[targets], out[targets - distances])  # the target equals the inserted value
    assert np.array_equal(out[~busy], original)  # the text's tokens, all of them, in order
    assert out[-1] == original[-1] and not busy[-1]  # EOS stays last
    return len(pairs)


@pytest.mark.parametrize("spec", [RecallSpec(), RecallSpec(key_len=2, value_len=3, items=8, min_distance=6,
                                                           max_distance=300, target_fraction=0.1)])
def test_insertion_on_hand_made_documents(spec):
    items = resolve_items(spec, 50_000, special_ids=[0, 1])
    assert len(set(items.item_ids) | {items.mark_id, items.cue_id}) == spec.items + 2
    assert min(items.item_ids + (items.mark_id, items.cue_id)) >= 25_000
    total_pairs = total_targets = total_tokens = 0
    for n in [1, 5, 20, 300, 2000, 9000]:
        original = np.arange(n, dtype=np.int32) % 1000  # text ids all below the items'
        out, targets, distances = insert_recall(original, document_rng(spec.seed, f"doc{n}"), items)
        total_pairs += check_document(original, out, targets, distances, items)
        total_targets += len(targets)
        total_tokens += len(out)
    assert total_pairs > 20
    assert abs(total_targets / total_tokens - spec.target_fraction) < 0.3 * spec.target_fraction


def test_distances_spread_log_uniformly():
    spec = RecallSpec(min_distance=16, max_distance=1024)
    items = resolve_items(spec, 8192, special_ids=[0])
    ins = insert_recall(np.zeros(200_000, np.int32), document_rng(0, "long"), items)
    d = ins.distances[::spec.value_len]
    counts = np.bincount(np.log2(d).astype(int))[4:]  # octaves [16, 32) ... [512, 1024)
    assert len(counts) == 6 and counts.min() > 0.7 * counts.mean()


def test_insertion_is_deterministic_per_seed_and_document():
    items = resolve_items(RecallSpec(), 8192, special_ids=[0])
    doc = np.arange(3000, dtype=np.int32)
    a, b = (insert_recall(doc, document_rng(0, "x.py"), items) for _ in range(2))
    assert all(np.array_equal(u, v) for u, v in zip(a, b))
    other = insert_recall(doc, document_rng(0, "y.py"), items)
    assert not np.array_equal(a.tokens, other.tokens)
    assert resolve_items(RecallSpec(), 8192, [0]) == items != resolve_items(RecallSpec(seed=1), 8192, [0])


def test_spec_parsing_and_bad_values():
    assert parse_recall_spec("") == RecallSpec()
    s = parse_recall_spec("items=128, max_distance=256,target_fraction=0.05")
    assert (s.items, s.max_distance, s.target_fraction, s.key_len) == (128, 256, 0.05, 1)
    for bad, needle in [("items=1", "items=1"), ("min_distance=2", "min_distance=2"),
                        ("max_distance=16", "max_distance=16"), ("target_fraction=0", "target_fraction"),
                        ("target_fraction=0.25,value_len=1", "target_fraction"), ("seed=-1", "seed"),
                        ("key_len=0", "key_len"), ("pairs=3", "KEY one of"), ("items", "KEY=VALUE"),
                        ("items=many", "items must be a int")]:
        with pytest.raises(UserError, match=needle):
            parse_recall_spec(bad)
    with pytest.raises(UserError, match="at most"):
        resolve_items(RecallSpec(items=600), 1024, [0, 1])


def _corpus(root: Path, docs: int = 40) -> Path:
    src = root / "src"
    src.mkdir()
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "import", "return", "value", "key", "lambda", "self"]
    for i in range(docs):
        (src / f"doc{i:02d}.txt").write_text(" ".join(rng.choice(words, int(rng.integers(50, 900)))))
    return src


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _documents(root: Path, m: dict, split: str) -> list[dict]:
    return [row for sh in m["splits"][split]["shards"] for row in pq.read_table(root / sh["path"]).to_pylist()]


def test_prepare_records_items_and_counts_that_add_up(tmp_path):
    """Both splits carry items; the manifest's counts equal what the shards hold; with the items taken out, every
    document is exactly the plain prepare's; a rerun is byte-identical."""
    src = _corpus(tmp_path)
    spec = RecallSpec(max_distance=512, items=32)
    kw = {"tokenizer": str(NEOX_TOKENIZER), "val_fraction": 0.25, "no_ray": True, "shard_tokens": 4000}
    m = prepare(str(src), str(tmp_path / "recall"), recall=spec, **kw)
    plain = prepare(str(src), str(tmp_path / "plain"), **kw)
    again = prepare(str(src), str(tmp_path / "again"), recall=spec, **kw)
    assert _files(tmp_path / "recall") == _files(tmp_path / "again") and again == m
    rec = m["recall"]
    items = RecallItems(spec, rec["mark_id"], rec["cue_id"], tuple(rec["item_ids"]))
    assert rec["spec"] == spec.to_json() and len(rec["item_ids"]) == spec.items
    assert min(rec["item_ids"] + [rec["mark_id"], rec["cue_id"]]) >= m["vocab_size"] // 2
    assert json.loads((tmp_path / "recall" / "manifest.json").read_text()) == m
    for split in ("train", "val"):
        c, docs = rec["splits"][split], _documents(tmp_path / "recall", m, split)
        originals = [d["input_ids"] for d in _documents(tmp_path / "plain", plain, split)]
        assert c["documents"] == len(docs) == len(originals) == m["splits"][split]["documents"]
        pairs = [check_document(np.array(o), np.array(d["input_ids"]), np.array(d["recall_targets"]),
                                np.array(d["recall_distances"]), items) for o, d in zip(originals, docs)]
        assert c["pairs"] == sum(pairs) > 0 and c["documents_with_pairs"] == sum(p > 0 for p in pairs)
        assert c["target_tokens"] == sum(len(d["recall_targets"]) for d in docs) == c["pairs"] * spec.value_len
        assert c["inserted_tokens"] == 2 * spec.block_len * c["pairs"]
        assert m["splits"][split]["tokens"] == plain["splits"][split]["tokens"] + c["inserted_tokens"]
        assert sum(c["distance_hist"].values()) == c["pairs"]
        hist = {}
        for d in docs:
            for dist in d["recall_distances"][::spec.value_len]:
                lo = str(2 ** int(np.log2(dist)))
                hist[lo] = hist.get(lo, 0) + 1
        assert c["distance_hist"] == dict(sorted(hist.items(), key=lambda kv: int(kv[0])))
        assert 0.02 < c["target_tokens"] / m["splits"][split]["tokens"] < 0.04


def test_a_small_corpus_moves_its_val_document_with_its_items(tmp_path):
    src = _corpus(tmp_path, docs=12)
    m = prepare(str(src), str(tmp_path / "out"), tokenizer=str(NEOX_TOKENIZER), no_ray=True,
                recall=RecallSpec(max_distance=256))
    assert m["splits"]["val"]["documents"] == 1
    for split in ("train", "val"):
        c, docs = m["recall"]["splits"][split], _documents(tmp_path / "out", m, split)
        assert c["documents"] == len(docs) and c["target_tokens"] == sum(len(d["recall_targets"]) for d in docs) > 0
        assert sum(c["distance_hist"].values()) == c["pairs"]


def test_the_ray_path_writes_the_same_shards(ray_local, tmp_path):
    src = _corpus(tmp_path)
    kw = {"tokenizer": str(NEOX_TOKENIZER), "val_fraction": 0.25, "unit_bytes": 4000,
          "recall": RecallSpec(max_distance=512)}
    prepare(str(src), str(tmp_path / "local"), no_ray=True, **kw)
    prepare(str(src), str(tmp_path / "ray"), workers=2, **kw)
    files = _files(tmp_path / "ray")
    assert len([p for p in files if p.startswith("train/")]) > 2 and files == _files(tmp_path / "local")


@pytest.mark.parametrize("spec, needle", [("items=1", "items=1: must be at least 2"),
                                          ("distance=5", "KEY one of"),
                                          ("items=100000", "use at most")])
def test_cli_bad_recall_spec_is_one_line_exit_2(tmp_path, spec, needle, capsys, monkeypatch):
    src = _corpus(tmp_path, docs=3)
    r = cli_inprocess(capsys, monkeypatch, "prepare", "--source", str(src), "--out", str(tmp_path / "o"),
                      "--no-ray", "--tokenizer", str(NEOX_TOKENIZER), "--recall", spec)
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert needle in r.stderr and not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()


def test_the_induction_probe_rows_copy_exactly_what_they_score(capsys):
    """benchmarks/induction_probe.py: every scored target is its span's copy, with the token before it copied too,
    at the drawn distance; the same seed gives the same rows; bad distances are one line, exit 2."""
    from benchmarks.induction_probe import Rows, main

    def make(seed):
        return Rows(64, 8, 3, (4, 40), np.arange(100, 116), None, seed)

    rows = make(0)
    x, t = rows.batch(32)
    assert t.any() and x.shape == t.shape == (32, 64)
    for xi, ti in zip(x.numpy(), t.numpy()):
        for p in np.flatnonzero(ti):  # some distance in range makes it a copy of an in-view earlier pair
            assert any(xi[p] == xi[p - d] and xi[p - 1] == xi[p - 1 - d] for d in range(4, 40))
    x2, t2 = make(0).batch(32)
    assert np.array_equal(x.numpy(), x2.numpy()) and np.array_equal(t.numpy(), t2.numpy())
    fixed_x, fixed_t = Rows(32, 16, 1, (16, 16), np.arange(50), None, 1).batch(4)
    for xi, ti in zip(fixed_x.numpy(), fixed_t.numpy()):
        p = np.flatnonzero(ti)
        assert len(p) == 15 and np.array_equal(xi[p], xi[p - 16])
    for bad in ("0", "8:4", "x", "40:60"):
        assert main(["--length", "64", "--distance", bad, "--steps", "1"]) == 2
        out = capsys.readouterr().out.strip().splitlines()
        assert len(out) == 1 and out[0].startswith("error: ") and "--" in out[0]
