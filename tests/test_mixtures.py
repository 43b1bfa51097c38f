"""Training mixtures (gl_ray.data.mixture): the assignment of stage rows to sources, cursors and epochs as pure
functions; the Ray-free and Ray Data paths read the same rows; a tiny run accounts every source's tokens in
plan.json, summary.json and metrics.jsonl; bad input is one line. data.long_doc_boost, a mixture of one dataset's
long and short documents, is tested here too (on the same small dataset)."""

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import cli_inprocess, metrics, tiny_overrides

from gl_ray.config import DataConfig, SourceConfig, load_config
from gl_ray.data.mixture import (SHARE_DENOMINATOR, accounting, check_sources, corpus_tokens, format_mixture,
                                 integer_weights, mixture_for, mixture_rows, mixture_steps, period_order,
                                 plan_mixture, source_counts)
from gl_ray.data.packing import RowLayout, stream_segments
from gl_ray.data.pipeline import fetch_rows
from gl_ray.data.stream import TokenStream, get_stream
from gl_ray.errors import UserError
from gl_ray.schedule import plan_stages
from gl_ray.train.outputs import check_report

SMALL = {"val_fraction": 0.5, "shard_tokens": 60_000, "unit_bytes": 300_000}


def tiny_plan(workers: int = 1, lengths=(32, 64), budget: int = 16384):
    return plan_stages(lengths=list(lengths), ratios=[1 / len(lengths)] * len(lengths), tokens_per_step=1024,
                       micro_batch_tokens=256, num_workers=workers, budget_tokens=budget)


def data_of(paths, weights, stage_weights=()) -> DataConfig:
    return DataConfig(path=paths[0], sources=[SourceConfig(p, w) for p, w in zip(paths, weights)],
                      stage_weights=[list(r) for r in stage_weights])


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Three small datasets of the stdlib corpus, prepared in this process (no Ray): `long` (30 documents, its own
    BPE), `short` (2 train documents, ~3k tokens, with long's tokenizer) and `other` (another tokenizer)."""
    from gl_ray.data.prepare import prepare

    root = tmp_path_factory.mktemp("mix")
    long, short, other = (str(root / n) for n in ("long", "short", "other"))
    prepare("stdlib", long, tokenizer="train:1024", max_docs=30, **SMALL)
    prepare("stdlib", short, tokenizer=str(Path(long) / "tokenizer"), max_docs=4, **SMALL)
    prepare("stdlib", other, tokenizer="train:512", max_docs=4, **SMALL)
    return long, short, other


def test_integer_weights_keep_the_ratios_as_written():
    assert integer_weights([0.7, 0.3]) == (7, 3)
    assert integer_weights([3, 1, 0]) == (3, 1, 0)
    assert integer_weights([2.0, 4.0]) == (1, 2)
    assert integer_weights([1 / 3, 2 / 3]) == (1, 2)


@pytest.mark.parametrize("weights", [(1, 1), (3, 1), (7, 3), (5, 0, 2), (1, 2, 3, 4), (13, 1, 1, 29, 6)])
def test_every_prefix_of_a_period_is_within_one_row_of_its_share(weights):
    order, before = period_order(weights)
    assert len(order) == sum(weights) and np.bincount(order, minlength=len(weights)).tolist() == list(weights)
    n = np.arange(len(order) + 1)[:, None]
    assert np.all(np.abs(before - n * np.asarray(weights) / sum(weights)) < 1)
    for rows in (0, 1, 5, 1000, 12345):  # counts past a period go on exactly
        assert source_counts(weights, rows).sum() == rows
        assert np.all(np.abs(source_counts(weights, rows) - rows * np.asarray(weights) / sum(weights)) < 1)


def test_stage_proportions_are_exact_within_one_row():
    plan = tiny_plan(lengths=(32, 64, 128), budget=3 * 8192)
    mix = mixture_for(data_of(["a", "b", "c"], [1, 1, 1], [[5, 1, 0], [1, 1, 1], [1, 2, 4]]), plan)
    for k, st in enumerate(plan.stages):
        rows = st.steps * st.sequences_per_step
        src, _ = mix.assign(k, np.arange(rows))
        w = np.asarray(mix.weights[k])
        assert np.all(np.abs(np.bincount(src, minlength=3) - rows * w / w.sum()) < 1)
        assert sum(mix.stage_tokens(k)) == st.tokens
        assert mix.stage_tokens(k) == [int(c) * st.seq_len for c in np.bincount(src, minlength=3)]
        assert [sum(t) for t in zip(*(mix.step_tokens(k, s) for s in range(st.steps)))] == mix.stage_tokens(k)
    assert mix.stage_tokens(0)[2] == 0  # a weight of 0 draws nothing


def global_assignment(workers: int):
    """Every stage's rows, step by step and rank by rank, as (source, start) pairs read through RowLayout."""
    plan = tiny_plan(workers)
    mix = mixture_for(data_of(["a", "b"], [3, 1], [[3, 1], [1, 3]]), plan)
    out = []
    for st in plan.stages:
        for r in range(plan.world_size):
            layout = RowLayout.of(st, rank=r, start_step=0)
            local = np.arange(layout.num_rows)
            src, starts = mix.assign(st.index, layout.global_rows(local))
            out += list(zip(layout.global_rows(local) + 10**6 * st.index, src, starts))
    return sorted(out)


def test_world_sizes_give_the_same_global_rows_and_the_rule_is_deterministic():
    one = global_assignment(1)
    assert one == global_assignment(2) == global_assignment(4) == global_assignment(1)


def test_each_source_cursor_continues_across_stages():
    plan = tiny_plan(lengths=(32, 64, 128), budget=3 * 8192)
    mix = mixture_for(data_of(["a", "b"], [1, 1], [[3, 1], [1, 1], [1, 3]]), plan)
    end = [0, 0]
    for k, st in enumerate(plan.stages):
        assert list(mix.cursors[k]) == end  # all the source gave the stages before
        src, starts = mix.assign(k, np.arange(st.steps * st.sequences_per_step))
        for i in (0, 1):
            mine = starts[src == i]  # back to back from where the stages before left off, in row order
            assert mine.tolist() == list(range(end[i], end[i] + len(mine) * st.seq_len, st.seq_len))
            end[i] += len(mine) * st.seq_len
    assert end == [sum(mix.stage_tokens(k)[i] for k in range(3)) for i in (0, 1)]
    assert [list(c) for c in mix.cursors] == [[0, 0], [6144, 2048], [10240, 6144]]


def test_a_source_that_runs_out_starts_its_next_epoch_and_says_so():
    plan = tiny_plan()
    mix = mixture_for(data_of(["data/long", "data/short"], [1, 1], [[3, 1], [1, 3]]), plan)
    acc = accounting(mix, corpus_tokens=[100_000, 3000])  # short: 2048 tokens in stage 0, 6144 in stage 1
    short = acc["sources"][1]
    assert short["drawn_tokens"] == 8192 and short["epochs"] == pytest.approx(8192 / 3000, abs=1e-4)
    assert short["epoch_starts"] == [{"epoch": 2, "stage": 1}, {"epoch": 3, "stage": 1}]
    assert acc["sources"][0]["epoch_starts"] == []
    assert acc["stages"][1]["epochs"]["short"] == [0, 2] and acc["stages"][1]["stream"]["short"] == [2048, 8192]
    text = format_mixture(acc)
    assert "data.sources[1] 'short': epoch 2 starts in stage 1" in text and "'long'" not in text


def test_the_ray_free_rows_are_the_batch_function_rows_and_read_each_source(sources):
    long, short, _ = sources
    plan = tiny_plan(workers=2)
    mix = mixture_for(data_of([long, short], [1, 1], [[3, 1], [1, 3]]), plan)
    for st in plan.stages:
        for r in range(2):
            layout = RowLayout.of(st, rank=r, start_step=1)  # a resumed cursor too
            steps = np.concatenate(list(mixture_steps(mix, layout)))
            batch = fetch_rows({"id": np.arange(layout.num_rows)}, long, 0, layout, mixture=mix)
            assert np.array_equal(steps, batch["input_ids"]) and steps.shape == (layout.num_rows, st.seq_len)
            src, starts = mix.assign(st.index, layout.global_rows(np.arange(layout.num_rows)))
            for row, i, a in zip(steps, src, starts):
                assert np.array_equal(row, get_stream([long, short][i], "train").read(int(a), int(a) + st.seq_len))
    assert np.array_equal(mixture_rows(mix, RowLayout.of(plan.stages[0], rank=0, start_step=0), np.arange(4)),
                          np.concatenate(list(mixture_steps(mix, RowLayout.of(plan.stages[0], rank=0,
                                                                              start_step=0))))[:4])


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sources", "long_doc_boost"])
def test_ray_data_reads_the_same_mixture_rows(sources, ray_local, kind):
    from gl_ray.data.pipeline import stage_dataset

    ray_local.data.DataContext.get_current().execution_options.preserve_order = True
    long, short, _ = sources
    plan = tiny_plan(workers=2)
    data = data_of([long, short], [1, 1], [[3, 1], [1, 3]]) if kind == "sources" else boosted(long, [1, 3], seed=2)
    mix = mixture_for(data, plan)
    st = plan.stages[1]
    layout = RowLayout.of(st, rank=1, start_step=2)
    got = np.concatenate([b["input_ids"] for b in stage_dataset(long, 0, layout, mixture=mix).iter_batches(
        batch_size=layout.rows_per_rank_step, batch_format="numpy")])
    assert np.array_equal(got, np.concatenate(list(mixture_steps(mix, layout))))


def test_a_mixture_run_accounts_every_source_token(sources, tmp_path, capsys):
    from gl_ray.train.driver import launch_run

    long, short, _ = sources
    cfg = load_config(None, tiny_overrides("", str(tmp_path), "mix", **{
        "data.sources": f"[{{path: {long}, weight: 3}}, {{path: {short}, weight: 1}}]",
        "data.stage_weights": "[[3,1],[1,3]]"}))
    assert cfg.data.path == long  # empty: the first source
    summary = launch_run(cfg)
    out = capsys.readouterr().out
    assert "data.sources[1] 'short': epoch 2 starts in stage 1" in out and "mixture (train tokens" in out
    plan = json.loads((tmp_path / "mix" / "plan.json").read_text())
    assert [s["tokens"] for s in plan["data"]] == [{"long": 6144, "short": 2048}, {"long": 2048, "short": 6144}]
    for st, acc in zip(plan["stages"], plan["data"]):
        assert sum(acc["tokens"].values()) == st["tokens"]
    assert [s["drawn_tokens"] for s in plan["sources"]] == [8192, 8192]
    assert plan["sources"][1]["epoch_starts"][0] == {"epoch": 2, "stage": 1}
    assert summary["source_tokens"] == {"long": 8192, "short": 8192}
    assert [s["source_tokens"] for s in summary["stages"]] == [s["tokens"] for s in plan["data"]]
    ms = metrics(tmp_path / "mix")
    assert all(check_report(m) == m or "val_loss" in m for m in ms)
    assert all(sum(m["source_tokens"].values()) == m["tokens"] for m in ms)
    assert ms[7]["source_tokens"] == {"long": 6144, "short": 2048}  # the end of stage 0
    from gl_ray.status import format_status, run_status

    assert "tokens per source: long 8,192 (50%), short 8,192 (50%)" in format_status(run_status(
        str(tmp_path / "mix")))
    from gl_ray.evaluate import NO_CONTEXT, evaluate_models
    from gl_ray.reproduce import eval_sources

    final = str(tmp_path / "mix" / "final")  # reproduce's eval of a mixture: each source's val split
    by_source = eval_sources(cfg.data, [final], [32, 64], max_tokens=512)
    assert list(by_source) == ["long", "short"] and [r["data"] for r in by_source.values()] == [long, short]
    for name, path in (("long", long), ("short", short)):  # what `gl-ray eval --data SOURCE` gives
        assert by_source[name]["models"] == evaluate_models([final], path, [32, 64], max_tokens=512,
                                                            context=NO_CONTEXT)["models"]
    known = by_source["long"] | {"models": {"mix": "from the eval before"}, "context": {}}  # reproduce's of data.path
    reused = eval_sources(cfg.data, [final], [32, 64], max_tokens=512, known=known)
    assert reused["long"] == by_source["long"] | {"models": {"mix": "from the eval before"}}  # not run again
    assert reused["short"] == by_source["short"]
    from gl_ray.data.prepare import prepare

    moved = str(tmp_path / "moved" / "short")  # the same name and weight, other documents: not this run's data
    prepare("stdlib", moved, tokenizer=str(Path(long) / "tokenizer"), max_docs=3, **SMALL)
    other = load_config(None, tiny_overrides("", str(tmp_path), "mix", **{
        "data.sources": f"[{{path: {long}, weight: 3}}, {{path: {moved}, weight: 1}}]",
        "data.stage_weights": "[[3,1],[1,3]]"}))
    with pytest.raises(UserError, match=r"was started with data.sources \(manifest.json digests\)="):
        launch_run(other, quiet=True)


@pytest.mark.slow
def test_two_ray_workers_train_the_mixture_as_one_process_does(sources, ray_local, tmp_path):
    """The same mixture on two Ray Train workers: the first 4 steps read in process by each worker
    (data.head_steps), the rest from Ray Data's mixture pipeline; the losses are one process's, and so are the
    per-source tokens of every report."""
    from conftest import run_tiny

    long, short, _ = sources
    sets = {"data.sources": f"[{{path: {long}, weight: 3}}, {{path: {short}, weight: 1}}]",
            "data.stage_weights": "[[3,1],[1,3]]", "data.head_steps": 4}
    run_tiny("", tmp_path, "one", **sets)
    run_tiny("", tmp_path, "two", **sets, **{"ray.num_workers": 2})
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert [m["source_tokens"] for m in two] == [m["source_tokens"] for m in one]
    for a, b in zip(two, one, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-4)


def test_reports_check_source_tokens():
    line = {"step": 1, "stage": 0, "seq_len": 32, "tokens": 1024, "elapsed_s": 0.5}
    assert check_report(line | {"source_tokens": {"a": 768, "b": 256}}) is not None
    for bad in ({"a": -1}, {"a": 1.5}, {"a": True}, [1, 2], {"a": {"b": 1}}, 7):
        assert check_report(line | {"source_tokens": bad}) is None, bad


@pytest.mark.parametrize("sets, message", [
    ({"data.sources": "[{path: a, weight: -1}, {path: b}]"}, "must be >= 0 and not all 0"),
    ({"data.sources": "[{path: a, weight: 0}, {path: b, weight: 0}]"}, "must be >= 0 and not all 0"),
    ({"data.sources": "[{path: a}, {path: b}]", "data.stage_weights": "[[1, 1], [1]]"},
     "data.stage_weights[1] has 1 weights for 2 sources"),
    ({"data.sources": "[{path: a}, {path: b}]", "data.stage_weights": "[[1, 1], [0, 0]]"}, "not all 0"),
    ({"data.stage_weights": "[[1]]"}, "set data.sources"),
    ({"data.sources": "[{path: a}]", "data.packing": "decompose"}, "data.packing=decompose is not supported"),
    ({"data.sources": "[{path: a}]", "data.path": "b"}, "data.path 'b' is not one of data.sources"),
    ({"data.sources": "[{path: a, wieght: 1}]"}, "did you mean 'data.sources[0].weight'"),
])
def test_bad_mixture_configs_are_one_line(sets, message):
    with pytest.raises(UserError) as e:
        load_config(None, [f"{k}={v}" for k, v in ({"data.path": ""} | sets).items()])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_stage_weights_need_one_row_per_stage():
    with pytest.raises(UserError, match=r"data.stage_weights has 3 rows for 2 stages \(32, 64\)"):
        mixture_for(data_of(["a", "b"], [1, 1], [[1, 1]] * 3), tiny_plan())


def test_a_source_of_another_tokenizer_or_no_dataset_is_refused(sources, tmp_path):
    long, short, other = sources
    check_sources(data_of([long, short], [1, 1]))  # the same tokenizer: fine
    with pytest.raises(UserError, match=r"data.sources\[1\] .*other.* has a tokenizer of 512 tokens"):
        check_sources(data_of([long, other], [1, 1]))
    with pytest.raises(UserError, match=r"data.sources\[1\] .*: no dataset there .*gl-ray prepare"):
        check_sources(data_of([long, str(tmp_path / "nothing")], [1, 1]))


def test_gl_ray_plan_shows_the_mix(sources, capsys, monkeypatch):
    long, short, _ = sources
    sets = tiny_overrides("", "runs", "p", **{"data.sources": f"[{{path: {long}}}, {{path: {short}}}]",
                                              "data.stage_weights": "[[3,1],[1,3]]"})
    r = cli_inprocess(capsys, monkeypatch, "plan", *[a for s in sets for a in ("--set", s)])
    assert r.returncode == 0, r.stderr
    assert "mixture (train tokens per source)" in r.stdout and "6,144 (75%)" in r.stdout
    assert "epoch 2 starts in stage 1" in r.stdout


# data.long_doc_boost on `long` (12 train documents, 56,090 tokens): two of at least LONG_MIN tokens, half the tokens
LONG_MIN = 12_000


def boosted(path: str, boost, long_min: int = LONG_MIN, seed: int = 0) -> DataConfig:
    return DataConfig(path=path, seed=seed, long_doc_boost=list(boost), long_doc_min=long_min)


def long_short_tokens(path: str) -> tuple[int, int]:
    lengths = get_stream(path, "train").doc_lengths
    return int(lengths[lengths >= LONG_MIN].sum()), int(lengths[lengths < LONG_MIN].sum())


def flat_positions(view: TokenStream, start: int, stop: int) -> np.ndarray:
    """The flat (manifest-order) offsets a view's stream tokens [start, stop) are read from."""
    segs = stream_segments(view.block_lengths, view.block_offsets, start, stop, view.seed, None, view.shard_blocks,
                           whole=view.doc_filter is None)
    return np.concatenate([np.arange(a, a + n) for a, n in segs])


@pytest.mark.parametrize("lo, hi", [(LONG_MIN, None), (0, LONG_MIN), (500, 3000)])
def test_a_length_filtered_stream_holds_exactly_the_selected_documents(sources, lo, hi):
    long = sources[0]
    whole = TokenStream(long, "train")
    flat = whole.read(0, whole.tokens)  # seed 0: epoch 0 is the flat array
    keep = (whole.doc_lengths >= lo) & (whole.doc_lengths < (hi or np.inf))
    assert 0 < keep.sum() < len(keep)
    mine = np.concatenate([np.arange(a, a + n) for a, n in zip(whole.doc_offsets[keep], whole.doc_lengths[keep])])
    for seed in (0, 3):
        view = TokenStream(long, "train", seed, doc_filter=(lo, hi))
        assert view.tokens == len(mine) and view.doc_lengths.tolist() == whole.doc_lengths[keep].tolist()
        for epoch in (0, 1, 2):  # each epoch: every selected token once, no other
            a, b = epoch * view.tokens, (epoch + 1) * view.tokens
            pos = flat_positions(view, a, b)
            assert sorted(pos.tolist()) == mine.tolist() and np.array_equal(view.read(a, b), flat[pos])
            if epoch == 0 and seed == 0:
                assert pos.tolist() == mine.tolist()  # manifest order, as the whole split's epoch 0
        cached = get_stream(long, "train", seed, (lo, hi))  # a view of the cached whole split: its shards shared
        assert cached._cache is get_stream(long, "train", seed)._cache and cached is not get_stream(long, "train", seed)
        assert np.array_equal(cached.read(0, view.tokens), view.read(0, view.tokens))


def test_long_doc_boost_weights_give_the_boosted_share():
    from fractions import Fraction

    from gl_ray.data.mixture import long_doc_weights

    rows = long_doc_weights([1, 2, 4, 0.5, 1e6], long_tokens=1000, short_tokens=3000)
    assert rows[:4] == [[1, 3], [2, 3], [4, 3], [1, 6]]  # b*L : S, as the smallest integers
    assert rows[4] == [1, 0]  # a share within 1/SHARE_DENOMINATOR of all long rounds to all long
    w = long_doc_weights([3], long_tokens=28_132, short_tokens=27_958)[0]
    assert abs(Fraction(w[0], sum(w)) - Fraction(3 * 28_132, 3 * 28_132 + 27_958)) < Fraction(1, SHARE_DENOMINATOR)


@pytest.mark.parametrize("boost", [[0.5, 1, 3], [1, 1, 1]])
def test_a_boosted_stage_draws_long_documents_at_their_boosted_share(sources, boost):
    """Every prefix of a stage's rows is within one row of the target long share b*L / (b*L + S) (boost 1: the
    natural share, L / (L + S)); every token of a long row is of a long document, of a short row of a short one."""
    long = sources[0]
    plan = tiny_plan(lengths=(32, 64, 128), budget=3 * 8192)
    mix = mixture_for(boosted(long, boost), plan)
    assert mix.names == ("long:long", "long:short") and mix.filters == ((LONG_MIN, None), (0, LONG_MIN))
    L, S = long_short_tokens(long)
    whole = get_stream(long, "train")
    doc_len = np.repeat(whole.doc_lengths, whole.doc_lengths)  # flat token -> the length of its document
    for k, (b, st) in enumerate(zip(boost, plan.stages)):
        target = b * L / (b * L + S)
        rows = st.steps * st.sequences_per_step
        src, starts = mix.assign(k, np.arange(rows))
        n = np.arange(1, rows + 1)
        assert np.all(np.abs(np.cumsum(src == 0) - n * target) < 1 + n / SHARE_DENOMINATOR)
        assert abs(mix.stage_tokens(k)[0] - target * st.tokens) < st.seq_len
        for i, a in zip(src, starts):
            lens = doc_len[flat_positions(mix.stream(i), int(a), int(a) + st.seq_len)]
            assert np.all(lens >= LONG_MIN) if i == 0 else np.all(lens < LONG_MIN)
    if boost == [1, 1, 1]:
        assert len(set(mix.weights)) == 1 and abs(mix.weights[0][0] / sum(mix.weights[0]) - L / (L + S)) < 1e-4


def test_a_boosted_mixture_resumes_exactly_and_starts_epochs(sources):
    """From any step a worker's rows are the uninterrupted run's (and the Ray Data batch function's); the long
    documents, drawn 4x in stage 1, run out and start their next epoch there, and the plan says so."""
    long = sources[0]
    plan = tiny_plan(workers=2, budget=2 * 32768)
    data = boosted(long, [1, 4], seed=1)
    mix = mixture_for(data, plan)
    for st in plan.stages:
        for r in range(2):
            full = np.concatenate(list(mixture_steps(mix, RowLayout.of(st, rank=r, start_step=0))))
            layout = RowLayout.of(st, rank=r, start_step=5)
            resumed = np.concatenate(list(mixture_steps(mix, layout)))
            assert np.array_equal(resumed, full[5 * layout.rows_per_rank_step:])
            batch = fetch_rows({"id": np.arange(layout.num_rows)}, long, 1, layout, mixture=mix)
            assert np.array_equal(batch["input_ids"], resumed)
    acc = accounting(mix, corpus_tokens(mix))
    L, S = long_short_tokens(long)
    assert [s["corpus_tokens"] for s in acc["sources"]] == [L, S]
    assert [s["doc_tokens"] for s in acc["sources"]] == [[LONG_MIN, None], [0, LONG_MIN]]
    assert acc["sources"][0]["epoch_starts"] == [{"epoch": 2, "stage": 1}]
    doc, text = plan_mixture(data, plan)
    assert doc["sources"] == acc["sources"] and [sum(s["tokens"].values()) for s in doc["data"]] == [32768] * 2
    assert "data.long_doc_boost 1, 4: 'long:long' holds the documents of >= 12,000 tokens, 50.2% of the train " \
           "tokens" in text
    assert "'long:long' (documents of >= 12,000 tokens): epoch 2 starts in stage 1" in text


def test_a_boosted_run_accounts_long_and_short_tokens(sources, tmp_path, capsys):
    from gl_ray.train.driver import launch_run

    long = sources[0]
    cfg = load_config(None, tiny_overrides(long, str(tmp_path), "boost", **{
        "data.long_doc_boost": "[1, 3]", "data.long_doc_min": LONG_MIN}))
    summary = launch_run(cfg)
    assert "data.long_doc_boost 1, 3: 'long:long' holds" in capsys.readouterr().out
    plan = json.loads((tmp_path / "boost" / "plan.json").read_text())
    L, S = long_short_tokens(long)
    for b, st, acc in zip([1, 3], plan["stages"], plan["data"]):
        assert sum(acc["tokens"].values()) == st["tokens"]
        assert abs(acc["tokens"]["long:long"] - st["tokens"] * b * L / (b * L + S)) < st["seq_len"]
    assert summary["source_tokens"] == {s["name"]: s["drawn_tokens"] for s in plan["sources"]}
    assert [s["source_tokens"] for s in summary["stages"]] == [s["tokens"] for s in plan["data"]]
    assert all(sum(m["source_tokens"].values()) == m["tokens"] for m in metrics(tmp_path / "boost"))
    other = load_config(None, tiny_overrides(long, str(tmp_path), "boost", **{"data.long_doc_boost": "[1, 2]",
                                                                              "data.long_doc_min": LONG_MIN}))
    with pytest.raises(UserError, match=r"was started with data.long_doc_boost=\[1.0, 3.0\]"):
        launch_run(other, quiet=True)  # other rows: not a resume of this run


def boosted_sources(paths, weights, boost, stage_weights=(), long_min: int = LONG_MIN) -> DataConfig:
    data = data_of(paths, weights, stage_weights)
    data.long_doc_boost, data.long_doc_min = list(boost), long_min
    return data


def test_a_boosted_mixture_keeps_each_sources_share_and_boosts_within_it(sources):
    """data.long_doc_boost with data.sources: each source's share of a stage is its weight's (within one row per
    period), and within a source its long documents take b*L / (b*L + S); a source with no long document (short)
    is drawn whole, and the plan says so."""
    long, short, _ = sources
    plan = tiny_plan(lengths=(32, 64, 128), budget=3 * 8192)
    data = boosted_sources([long, short], [3, 1], [1, 1, 4], stage_weights=[[3, 1], [1, 1], [3, 1]])
    mix = mixture_for(data, plan)
    assert mix.names == ("long:long", "long:short", "short")
    assert mix.filters == ((LONG_MIN, None), (0, LONG_MIN), None) and mix.paths == (long, long, short)
    L, S = long_short_tokens(long)
    for k, (b, w, st) in enumerate(zip([1, 1, 4], [3 / 4, 1 / 2, 3 / 4], plan.stages)):
        rows = st.steps * st.sequences_per_step
        src, _ = mix.assign(k, np.arange(rows))
        n = np.arange(1, rows + 1)
        period = sum(mix.weights[k])
        assert np.all(np.abs(np.cumsum(src <= 1) - n * w) < 1 + n / period)  # long's share: its weight's
        share = b * L / (b * L + S)
        got = mix.stage_tokens(k)
        assert abs(got[0] - share * (got[0] + got[1])) < 2 * st.seq_len  # within long: the boosted share
        assert sum(got) == st.tokens
    doc, text = plan_mixture(data, plan)
    assert [s["name"] for s in doc["sources"]] == ["long:long", "long:short", "short"]
    assert "data.long_doc_boost 1, 1, 4: 'long:long' holds the documents of >= 12,000 tokens, 50.2% of the " \
           "train tokens" in text
    assert "'short' has documents of one kind only (long: 12,000 tokens or more): drawn whole" in text


def test_a_boost_splits_every_source_that_has_both_kinds(sources):
    long, short, _ = sources
    lengths = get_stream(short, "train").doc_lengths
    long_min = int(lengths.max())  # short's longest document is long, the rest short
    assert lengths.min() < long_min
    data = boosted_sources([long, short], [1, 1], [1, 3], long_min=long_min)
    mix = mixture_for(data, tiny_plan())
    assert mix.names == ("long:long", "long:short", "short:long", "short:short")
    for i, path in ((0, long), (2, short)):  # each pair is its source's documents, split at long_min
        whole = get_stream(path, "train")
        assert mix.stream(i).tokens + mix.stream(i + 1).tokens == whole.tokens
        assert mix.stream(i).doc_lengths.min() >= long_min > mix.stream(i + 1).doc_lengths.max()
    k = 1  # stage 1 (boost 3): the sources still half each, long documents 3x within each
    got = mix.stage_tokens(k)
    assert abs((got[0] + got[1]) - (got[2] + got[3])) <= 2 * mix.seq_lens[k]
    layout = RowLayout.of(tiny_plan().stages[k], rank=0, start_step=1)
    assert np.array_equal(np.concatenate(list(mixture_steps(mix, layout))),
                          fetch_rows({"id": np.arange(layout.num_rows)}, long, 0, layout, mixture=mix)["input_ids"])


def test_reproduces_fixed_arms_draw_the_mix_of_their_stage(sources):
    """reproduce with data.stage_weights and data.long_doc_boost: fixed shortest trains stage 0's mix, fixed
    longest the last stage's, and long documents are those of the ladder (from its final length)."""
    from gl_ray.reproduce import run_variants

    long, short, _ = sources
    sets = tiny_overrides("", "runs", "m", **{"data.sources": f"[{{path: {long}}}, {{path: {short}}}]",
                                              "data.stage_weights": "[[3, 1], [1, 3]]",
                                              "data.long_doc_boost": "[1, 4]"})
    cfgs = [load_config(None, v) for v in run_variants(None, sets, [])]
    assert [c.name for c in cfgs] == ["m-growlength", "m-fixed32", "m-fixed64"]
    assert cfgs[0].data.stage_weights == [[3, 1], [1, 3]] and cfgs[0].data.long_doc_boost == [1, 4]
    for cfg, weights, boost in ((cfgs[1], [[3, 1]], [1]), (cfgs[2], [[1, 3]], [4])):
        assert cfg.data.stage_weights == weights and cfg.data.long_doc_boost == boost
        assert cfg.data.long_doc_min == 64
    plan = tiny_plan(lengths=(32,), budget=8192)
    assert mixture_for(cfgs[1].data, plan).filters[0] == (64, None)


def test_a_boost_that_no_source_can_take_is_one_line(sources):
    long, short, _ = sources
    with pytest.raises(UserError) as e:
        mixture_for(boosted_sources([long, short], [1, 1], [1, 2], long_min=20_000), tiny_plan())
    assert str(e.value).startswith("data.long_doc_min=20000: no source of data.sources has both documents that long")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("sets, message", [
    ({"data.long_doc_boost": "[1, 0]"}, "data.long_doc_boost factors must be positive and finite"),
    ({"data.long_doc_boost": "[1, -2]"}, "data.long_doc_boost factors must be positive and finite"),
    ({"data.long_doc_boost": "[1, .nan]"}, "config key 'data.long_doc_boost[1]' expects float, got nan"),
    ({"data.long_doc_boost": "[.inf, 1]"}, "config key 'data.long_doc_boost[0]' expects float, got inf"),
    ({"data.long_doc_boost": "[1, 2]", "data.packing": "decompose"}, "data.packing=decompose has its own length"),
    ({"data.long_doc_min": 100}, "set data.long_doc_boost"),
    ({"data.long_doc_boost": "[1, 2]", "data.long_doc_min": -1}, "data.long_doc_min must be >= 0"),
])
def test_bad_long_doc_boost_configs_are_one_line(sets, message):
    with pytest.raises(UserError) as e:
        load_config(None, [f"{k}={v}" for k, v in sets.items()])
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("command, sets, message", [
    ("plan", {"data.long_doc_boost": "[1, 2, 3]"}, r"data.long_doc_boost has 3 factors for 2 stages \(32, 64\)"),
    ("plan", {"data.long_doc_boost": "[1, 2]", "data.long_doc_min": 20_000},
     r"data.long_doc_min=20000: no train document of '.*long' is that long \(the longest has 16,022 tokens\)"),
    ("plan", {"data.long_doc_boost": "[1, 2]", "data.long_doc_min": 10},
     r"data.long_doc_min=10: every train document of '.*long' is that long \(the shortest has 20 tokens"),
    ("train", {"data.long_doc_boost": "[1, 2]", "data.long_doc_min": 20_000}, r"no train document of '.*long'"),
])
def test_long_doc_boost_that_does_not_fit_the_data_is_one_line_exit_2(sources, tmp_path, capsys, monkeypatch,
                                                                       command, sets, message):
    import re

    sets = tiny_overrides(sources[0], str(tmp_path), "bad", **sets)
    r = cli_inprocess(capsys, monkeypatch, command, *[a for s in sets for a in ("--set", s)])
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and re.search(message, r.stderr), r.stderr
    assert not (tmp_path / "bad").exists()
