"""data.packing: decompose (issue 27): documents cut into power-of-two chunks, each step one bucket of them, drawn
by a seeded rule of the step: the decomposition of hand-made documents, the draws across world sizes, a run
without Ray and on two Ray workers (the same losses), an exact resume mid-stage, and bad input."""

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import cli_inprocess, metrics, run_tiny, weights
from test_reliability import assert_user_error

from gl_ray.data.decompose import Buckets, StepDraws, chunk_lengths

DECOMPOSE = {"data.packing": "decompose"}
ONE_STAGE = ["schedule.lengths=[64]", "schedule.ratios=[1.0]"]


def test_a_document_becomes_power_of_two_chunks_longest_first():
    assert chunk_lengths(1300, 1024) == ([1024, 256, 16, 4], 0)
    assert chunk_lengths(1300, 1024, min_len=8) == ([1024, 256, 16], 4)
    assert chunk_lengths(2 * 1024 + 3, 1024, min_len=4) == ([1024, 1024], 3)
    assert chunk_lengths(5, 1024) == ([4, 1], 0)


def test_every_token_is_in_one_chunk_in_order_or_counted_as_left_out():
    rng = np.random.default_rng(0)
    lengths = np.concatenate([[1300, 1, 64, 65, 3000], rng.integers(1, 700, 200)]).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    b = Buckets.of(lengths, offsets, max_len=256, min_len=8)
    assert all(L & (L - 1) == 0 and 8 <= L <= 256 for L in b.starts)
    chunks = sorted((int(a), L) for L, starts in b.starts.items() for a in starts)
    covered = np.zeros(int(lengths.sum()), dtype=np.int64)
    for a, L in chunks:
        covered[a:a + L] += 1
    assert covered.max() == 1 and int(covered.sum()) + b.dropped_tokens == int(lengths.sum())
    for n, off in zip(lengths, offsets):  # a document's chunks tile it from its start, longest first
        kept, dropped = chunk_lengths(int(n), 256, 8)
        mine = [(a, L) for a, L in chunks if off <= a < off + n]
        assert [L for _, L in mine] == kept
        assert [a for a, _ in mine] == list(off + np.cumsum([0] + kept)[:-1])
    for starts in b.starts.values():  # each bucket in document order
        assert list(starts) == sorted(starts)


def test_the_bucket_of_each_step_is_the_same_at_any_world_size():
    lengths = np.full(300, 100, dtype=np.int64)  # 64 + 32 + 4 each
    offsets = np.arange(300, dtype=np.int64) * 100
    b = Buckets.of(lengths, offsets, max_len=64, min_len=8)
    draws = StepDraws(b, [32, 64], [20, 20], tokens_per_step=256, seed=3)
    again = StepDraws(b, [32, 64], [20, 20], tokens_per_step=256, seed=3)
    assert list(draws.lengths) == list(again.lengths)  # a resume computes the same draws
    assert set(draws.lengths[:20]) == {32} and set(draws.lengths[20:]) <= {32, 64}
    assert list(StepDraws(b, [32, 64], [20, 20], 256, seed=4).lengths) != list(draws.lengths)
    for s in range(40):
        L, whole = draws.step_rows(s, 0, 1)
        halves = [draws.step_rows(s, r, 2) for r in (0, 1)]
        assert {h[0] for h in halves} == {L} and list(np.concatenate([h[1] for h in halves])) == list(whole)


def test_uniform_grow_p2_and_odds_curricula():
    """uniform: each bucket in proportion to its tokens; grow_p2: every cycle holds each bucket's share, short chunks
    first; odds: the user's odds."""
    lengths = np.full(2000, 100, dtype=np.int64)  # 64 + 32 + 4 each: buckets 64 and 32 (4 left out)
    b = Buckets.of(lengths, np.arange(2000, dtype=np.int64) * 100, max_len=64, min_len=8)
    assert (b.tokens(), b.dropped_tokens) == ({32: 64000, 64: 128000}, 8000)
    uniform = StepDraws(b, [64], [3000], 256, seed=0, curriculum="uniform").lengths
    assert abs((uniform == 64).mean() - 2 / 3) < 0.03
    grow = StepDraws(b, [64], [300], 256, seed=0, curriculum="grow_p2", cycles=3).lengths
    for cycle in grow.reshape(3, 100):
        assert ((cycle == 32).sum(), (cycle == 64).sum()) == (33, 67)  # largest remainder of 100 x (1/3, 2/3)
        assert np.flatnonzero(cycle == 32).mean() < np.flatnonzero(cycle == 64).mean()  # short first
    assert not np.array_equal(grow[:100], grow[100:200])  # each cycle its own order
    odds = StepDraws(b, [64], [3000], 256, seed=0, curriculum="odds", odds={32: 0.9, 64: 0.1}).lengths
    assert abs((odds == 32).mean() - 0.9) < 0.03


@pytest.fixture(scope="module")
def decomposed(tiny_data, tmp_path_factory):
    storage = tmp_path_factory.mktemp("decompose")
    cfg, summary = run_tiny(tiny_data, storage, "dd", **DECOMPOSE)
    return cfg, summary, storage / "dd"


def test_a_decomposed_run_trains_one_bucket_per_step_and_accounts_for_its_tokens(decomposed, tiny_data):
    from gl_ray.data.stream import get_stream

    _, summary, run = decomposed
    got = metrics(run)
    assert [m["step"] for m in got] == list(range(1, 17)) and summary["tokens"] == 16384
    lens = [m["bucket_lens"] for m in got]
    assert all(len(x) == 1 for x in lens)  # a report per step: each its own bucket
    assert {x[0] for x in lens[:8]} <= {8, 16, 32} and {x[0] for x in lens[8:]} <= {8, 16, 32, 64}
    plan = json.loads((run / "plan.json").read_text())["buckets"]
    train_tokens = get_stream(tiny_data, "train").tokens
    assert sum(plan["tokens"].values()) + plan["left_out_tokens"] == train_tokens
    assert sum(plan["trained_tokens"].values()) == 16384
    assert summary["buckets"]["trained_tokens"] == plan["trained_tokens"]
    assert summary["buckets"]["left_out_tokens"] == plan["left_out_tokens"] > 0
    trained = {}  # the steps' bucket lengths in metrics.jsonl add up to the plan's tokens per bucket
    for x in lens:
        trained[str(x[0])] = trained.get(str(x[0]), 0) + 1024
    assert trained == plan["trained_tokens"]
    from gl_ray.data.manifest import load_manifest
    from gl_ray.model import preset_shape, training_flops

    vocab = load_manifest(tiny_data).vocab_size
    flops = [0.0] + [m["flops"] for m in got]  # each step's attention: (1024 / L) chunks of L^2 pairs
    for i, x in enumerate(lens):
        want = training_flops(preset_shape("tiny", vocab), 1024, 1024 * x[0])
        assert flops[i + 1] - flops[i] == pytest.approx(want, rel=1e-9)
    assert plan["curriculum"] == "ladder" and len(plan["odds"]) == 2
    assert all(abs(sum(o.values()) - 1) < 1e-5 for o in plan["odds"])


def test_a_decomposed_run_on_two_ray_workers_takes_the_same_steps(decomposed, tiny_data, tmp_path):
    _, _, run = decomposed
    run_tiny(tiny_data, tmp_path, "dd2", **DECOMPOSE, **{"ray.num_workers": 2})
    got, want = metrics(tmp_path / "dd2"), metrics(run)
    assert [m["bucket_lens"] for m in got] == [m["bucket_lens"] for m in want]
    for a, b in zip(got, want, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-4)


def test_a_decomposed_run_resumes_exactly_mid_stage(decomposed, tiny_data, tmp_path):
    _, _, run = decomposed
    cut = tmp_path / "dd"
    shutil.copytree(run, cut)
    for ck in cut.glob("checkpoint_step-*"):
        if int(ck.name.split("-")[1]) > 4:
            shutil.rmtree(ck)
    shutil.rmtree(cut / "final")
    (cut / "summary.json").unlink()
    run_tiny(tiny_data, tmp_path, "dd", **DECOMPOSE)
    got, want = metrics(cut), metrics(run)
    assert [m["step"] for m in got] == [m["step"] for m in want]
    for a, b in zip(got, want, strict=True):
        assert (a["loss"], a["bucket_lens"]) == (pytest.approx(b["loss"], abs=1e-6), b["bucket_lens"])
    wa, wb = weights(cut), weights(run)
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


@pytest.mark.parametrize("sets,needle", [
    (["data.packing=decompose", "data.min_chunk=128"], "data.min_chunk=128 is above the longest bucket (64"),
    (["data.packing=decompose", "data.min_chunk=12"], "data.min_chunk (12) must be a power of two"),
    (["data.packing=decompose", "schedule.mode=window"], "schedule.mode=window widens a window"),
    (["data.packing=chunks"], "data.packing='chunks' is not one of concat | decompose"),
    (["data.packing=decompose", "data.curriculum=uniform"], "give one stage at the longest bucket "
                                                            "(schedule.lengths=[64])"),
    (["data.packing=decompose", "data.curriculum=odds", *ONE_STAGE, "data.bucket_odds={8: 0.5, 64: 0.4}"],
     "data.bucket_odds sum to 0.9, not 1"),
    (["data.packing=decompose", "data.curriculum=odds", *ONE_STAGE, "data.bucket_odds={8: 0.5, 128: 0.5}"],
     "data.bucket_odds: there is no bucket 128"),
    (["data.packing=decompose", "data.curriculum=odds"], "data.curriculum=odds needs data.bucket_odds"),
], ids=["min-chunk-above-the-longest", "min-chunk-not-a-power-of-two", "with-window-mode", "unknown-packing",
        "uniform-with-two-stages", "odds-not-summing-to-one", "odds-of-no-bucket", "odds-missing"])
def test_bad_decompose_settings_are_one_line(tiny_data, tmp_path, capsys, monkeypatch, sets, needle):
    from conftest import tiny_overrides

    base = tiny_overrides(tiny_data, f"{tmp_path}/runs", "bad")
    args = [x for s in base + sets for x in ("--set", s)]
    r = cli_inprocess(capsys, monkeypatch, "train", *args)
    assert_user_error(r, needle)
    assert not (tmp_path / "runs").exists()


def test_reproduce_has_a_decompose_arm_and_the_report_never_takes_it_for_a_fixed_length(tiny_data, decomposed):
    from gl_ray.report import find_baseline, is_fixed
    from gl_ray.reproduce import run_variants

    variants = run_variants("pipelines/configs/tiny-growlength.yaml", [f"data.path={tiny_data}"], [],
                            modes=("reshape", "window", "decompose"))
    arms = {next(o[5:] for o in v if o.startswith("name=")): v for v in variants}
    assert list(arms) == ["tiny-growlength-growlength", "tiny-growlength-growlength-window",
                          "tiny-growlength-growlength-decompose", "tiny-growlength-fixed64", "tiny-growlength-fixed512"]
    assert "data.packing=decompose" in arms["tiny-growlength-growlength-decompose"]
    assert all("data.packing=concat" in v for name, v in arms.items() if not name.endswith("decompose"))
    ms = metrics(decomposed[2])
    one_stage = [m | {"seq_len": 64} for m in ms]  # one stage, steps of several bucket lengths
    assert not is_fixed(one_stage)
    assert find_baseline({"dd": one_stage, "fixed": [{"seq_len": 64}]}) == "fixed"


def test_a_compiled_decomposed_run_keeps_one_graph_per_bucket_length(decomposed, tiny_data, tmp_path, monkeypatch):
    """train.compile with data.packing=decompose: one static graph per bucket length (dynamo's recompile limit
    raised to hold them), the losses of the eager run. aot_eager: no C++ codegen on this CPU."""
    import torch._dynamo.utils as dynamo_utils

    from gl_ray.train import compiling

    monkeypatch.setattr(compiling, "BACKEND", "aot_eager")
    dynamo_utils.counters.clear()
    run_tiny(tiny_data, tmp_path, "ddc", **DECOMPOSE, **{"train.compile": True})
    got, want = metrics(tmp_path / "ddc"), metrics(decomposed[2])
    lengths = {x for m in want for x in m["bucket_lens"]}
    assert dynamo_utils.counters["stats"]["unique_graphs"] == len(lengths) and len(lengths) >= 3
    assert torch._dynamo.config.recompile_limit >= 16
    for a, b in zip(got, want, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-4)


def test_one_bucket_trains_what_a_fixed_length_masked_run_trains_on_the_same_documents(tiny_data, tmp_path):
    """Documents of exactly 64 tokens (each ending with EOS): decompose has one bucket (64) whose chunks are the
    documents in order, concat packs the same rows; with document masking on the concat run both attend within
    each document, so the two runs take the same steps."""
    import pyarrow.parquet as pq

    from gl_ray.data.manifest import load_manifest
    from gl_ray.data.prepare import write_shard

    data = tmp_path / "docs64"
    shutil.copytree(tiny_data, data)
    manifest = load_manifest(str(data))
    tokens = np.concatenate([np.asarray(d, np.int32) for sh in manifest.shards("train")
                             for d in pq.read_table(sh.uri, columns=["input_ids"]).column(0).to_pylist()])
    docs = tokens[: len(tokens) // 64 * 64].reshape(-1, 64).copy()
    docs[docs == manifest.eos_token_id] = manifest.eos_token_id + 1  # the corpus's own document ends go
    docs[:, -1] = manifest.eos_token_id
    for sh in manifest.shards("train"):
        (data / sh.path).unlink()
    write_shard(str(data / "train" / "docs64.parquet"), list(docs))
    raw = json.loads((data / "manifest.json").read_text())
    raw["splits"]["train"] = {"documents": len(docs), "tokens": docs.size,
                              "shards": [{"path": "train/docs64.parquet", "rows": len(docs), "tokens": docs.size}]}
    (data / "manifest.json").write_text(json.dumps(raw))
    one = {"schedule.lengths": "[64]", "schedule.ratios": "[1.0]"}
    run_tiny(str(data), tmp_path, "dd64", **one, **DECOMPOSE, **{"data.curriculum": "uniform"})
    run_tiny(str(data), tmp_path, "masked64", **one, **{"data.document_masking": True})
    got, want = metrics(tmp_path / "dd64"), metrics(tmp_path / "masked64")
    assert {x for m in got for x in m["bucket_lens"]} == {64}
    assert [m["step"] for m in got] == [m["step"] for m in want] == list(range(1, 17))
    for a, b in zip(got, want, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
