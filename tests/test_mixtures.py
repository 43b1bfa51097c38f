"""Training mixtures (gl_ray.data.mixture): the assignment of stage rows to sources, cursors and epochs as pure
functions; the Ray-free and Ray Data paths read the same rows; a tiny run accounts every source's tokens in
plan.json, summary.json and metrics.jsonl; bad input is one line."""

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import cli_inprocess, metrics, tiny_overrides

from gl_ray.config import DataConfig, SourceConfig, load_config
from gl_ray.data.mixture import (accounting, check_sources, format_mixture, integer_weights, mixture_for,
                                 mixture_rows, mixture_steps, period_order, source_counts)
from gl_ray.data.packing import RowLayout
from gl_ray.data.pipeline import fetch_rows
from gl_ray.data.stream import get_stream
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
def test_ray_data_reads_the_same_mixture_rows(sources, ray_local):
    from gl_ray.data.pipeline import stage_dataset

    ray_local.data.DataContext.get_current().execution_options.preserve_order = True
    long, short, _ = sources
    plan = tiny_plan(workers=2)
    mix = mixture_for(data_of([long, short], [1, 1], [[3, 1], [1, 3]]), plan)
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
