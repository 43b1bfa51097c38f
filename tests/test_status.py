"""`gl-ray status`: a run's standing from its folder alone (finished, cut mid-run, not a run)."""

import json
import shutil
import subprocess
import sys

import pytest
from conftest import REPO, metrics

from gl_ray.errors import UserError
from gl_ray.status import format_status, run_status, watch


def test_status_of_a_finished_run(baseline):
    _, summary, run = baseline
    s = run_status(str(run))
    last = metrics(run)[-1]
    assert s["finished"] and s["step"] == summary["steps"] == last["step"]
    assert s["loss"] == last["loss"] and s["val_loss_final_len"] == summary["final_val_loss_final_len"]
    assert s["last_checkpoint"]["step"] == last["step"] and s["eta_s"] is None
    assert (s["world_size"], s["nodes"], s["restarts"], s["steps_redone"]) == (1, 1, 0, [])
    assert {m["world_size"] for m in metrics(run)} == {1}  # each report line names the workers of its window
    text = format_status(s)
    assert "finished" in text and "stage 2/2 (L=64)" in text and "final:" in text
    assert "1 worker on 1 node, 0 restarts" in text


def test_status_of_a_run_cut_mid_way(baseline, tmp_path):
    _, _, run = baseline
    cut = tmp_path / "cut"
    shutil.copytree(run, cut)
    (cut / "summary.json").unlink()
    lines = (cut / "metrics.jsonl").read_text().splitlines()[:6]
    last = json.loads(lines[-1]) | {"tokens_per_s": 102.4}  # a rate that makes the ETA a round number
    (cut / "metrics.jsonl").write_text("\n".join(lines[:-1] + [json.dumps(last)]) + "\n")
    s = run_status(str(cut))
    assert not s["finished"] and s["step"] == 6 and s["stage"] == 0
    # by hand: 16384 planned tokens, 6 steps of 1024 done, 10240 left at 102.4 tokens/s
    assert (s["tokens"], s["total_tokens"]) == (6144, 16384)
    assert s["eta_s"] == pytest.approx(100.0)
    text = format_status(s)
    assert "not finished and stopped" in text and "ETA 0:01:40" in text


def test_watch_stops_when_the_run_has_finished(baseline):
    printed = []
    assert watch(str(baseline[2]), every_s=60, print_fn=lambda text, **_: printed.append(text))["finished"]
    assert len(printed) == 1


def test_status_of_a_folder_that_is_not_a_run(tmp_path):
    with pytest.raises(UserError, match="not a gl-ray run folder"):
        run_status(str(tmp_path))
    r = subprocess.run([sys.executable, "-m", "gl_ray", "status", str(tmp_path)], cwd=REPO, capture_output=True,
                       text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1


def test_garbage_lines_in_metrics_are_skipped_the_same_by_every_reader(baseline, tmp_path, capsys):
    """Bytes that are not UTF-8, JSON that is not a report and a torn line, in the middle of metrics.jsonl: status
    and report read the reports around them, and a resume drops them (one rule: outputs.parse_metrics)."""
    from gl_ray.report import build_report
    from gl_ray.train.outputs import MetricsLog, read_metrics

    _, _, run = baseline
    bad = tmp_path / "bad"
    shutil.copytree(run, bad)
    good = (bad / "metrics.jsonl").read_bytes().splitlines()
    junk = [b"\xff\xfe not utf-8", b"[1, 2]", b'{"step": "7"}', b'{"step": 3, "stage": 0, "seq_', b"null"]
    (bad / "metrics.jsonl").write_bytes(b"\n".join(good[:3] + junk + good[3:]) + b"\n")
    want = [json.loads(x) for x in good]
    assert read_metrics(str(bad)) == want
    assert run_status(str(bad))["step"] == want[-1]["step"]
    assert [r["run"] for r in build_report([str(bad)], str(tmp_path / "rep"))["runs"]] == ["bad"]
    log = MetricsLog(str(bad), resume_step=want[4]["step"])
    assert [json.loads(x) for x in log.lines] == want[:5]
    assert (bad / "metrics.jsonl").read_text().splitlines() == log.lines
    assert capsys.readouterr().out.count("dropping a line") == len(junk)


@pytest.mark.parametrize("name", ["plan.json", "summary.json"])
def test_a_torn_run_file_is_one_line(baseline, tmp_path, name):
    """status (and report, which reads summary.json) name a torn run file in one line, not a JSONDecodeError."""
    from gl_ray.report import build_report

    run = tmp_path / "torn"
    shutil.copytree(baseline[2], run)
    (run / name).write_bytes((run / name).read_bytes()[:20])
    readers = [lambda: run_status(str(run))]
    if name == "summary.json":
        readers.append(lambda: build_report([str(run)], str(tmp_path / "rep")))
    for read in readers:
        with pytest.raises(UserError, match=f"{name}' is torn or not JSON") as e:
            read()
        assert "\n" not in str(e.value)


def test_status_tells_a_training_run_from_a_stopped_one_and_watch_ends_on_either(baseline, tmp_path):
    """A cut run that no trainer holds is stopped: --watch prints it once and ends (it used to watch forever);
    while a trainer holds the run's lock it is training and --watch goes on."""
    from gl_ray.lock import run_lock

    cut = tmp_path / "cut"
    shutil.copytree(baseline[2], cut)
    (cut / "summary.json").unlink()
    printed = []
    s = watch(str(cut), every_s=3600, print_fn=lambda text, **_: printed.append(text))
    assert not s["finished"] and not s["training"] and len(printed) == 1
    with run_lock(str(cut)):
        assert run_status(str(cut))["training"] and "training" in format_status(run_status(str(cut)))
    assert not run_status(str(cut))["training"]


def test_starts_are_counted_past_a_torn_line(tmp_path):
    """RUN/starts.jsonl: a line torn by a writer that died is skipped, and the next start is a line of its own."""
    from gl_ray.train.outputs import read_starts, record_start

    record_start(str(tmp_path), 0, ["a", "b"], 0)
    with open(tmp_path / "starts.jsonl", "a") as f:
        f.write('{"start": 2, "ti')  # torn mid-line
    rec = record_start(str(tmp_path), 8, ["a", "c", "c"], 3)
    starts = read_starts(str(tmp_path))
    assert [s["start"] for s in starts] == [1, 2] and starts[-1] == rec
    assert (rec["world_size"], rec["distinct_nodes"], rec["steps_redone"]) == (3, 2, 3)


def _report(step: int, **extra) -> dict:
    """A metrics.jsonl line as gl_ray.train.loop writes it (a 2-stage plan of 32 tokens per step)."""
    return {"step": step, "stage": int(step > 4), "seq_len": 32 if step <= 4 else 64, "tokens": 32 * step,
            "loss": 10.0 - step / 2, "lr": 1e-3, "tokens_per_s": 100.0, "data_wait_frac": 0.01, "micro_batch": 1,
            "grad_norm": 1.5, "skipped_steps": 0, "elapsed_s": 0.3 * step, "flops": 1e9 * step, "world_size": 1,
            "total_tokens": 256, "num_stages": 2} | extra


def _hostile() -> list[str]:
    """metrics.jsonl lines that each crashed status, report or a resume, or were read as a report."""
    deep = "[" * 100_000 + "]" * 100_000  # RecursionError in json.loads
    ok = json.dumps(_report(3))
    return [deep, ok[:-1] + ', "x": ' + deep + "}", json.dumps(_report(3, x=[[[[1]]]])),  # nested: no reader's
            *(json.dumps(_report(3, **{k: v})) for k, v in [
                ("loss", "abc"), ("loss", 1e308), ("loss", "NaN"), ("loss", -1.0), ("elapsed_s", 1e308),
                ("tokens_per_s", float("inf")), ("val_loss_final_len", "abc"), ("tokens", True), ("seq_len", 0),
                ("stage", "0"), ("lr", -0.1), ("bucket_lens", ["a"]), ("flops", float("nan"))]),
            json.dumps(_report(-1)), ok.replace('"step": 3', '"step": 2.5'),
            ok.replace('"world_size": 1', '"world_size": 1e400'), '{"step": 3, "stage": 0, "seq_']  # torn


HOSTILE = _hostile()


def test_hostile_metrics_lines_are_dropped_with_a_warning_by_the_one_reader(tmp_path, capsys):
    """metrics.jsonl lines nested 100,000 deep, or with a loss of "abc", 1e308 or "NaN", a negative or fractional
    step, an infinite rate...: the one reader (outputs.parse_metrics) checks every field a reader uses for type and
    range, so status, report and a resume keep only the reports, each with a warning per dropped line, as for a
    torn one (issue 40, 8). A window of skipped steps only (loss null, or NaN) is a report; an ETA at a rate near
    zero prints as "?"; a starts.jsonl nested too deep or with a count that is not one is skipped."""
    from gl_ray.report import build_report
    from gl_ray.train.outputs import WARN_LINES, MetricsLog, parse_metrics, read_metrics

    run = tmp_path / "run"
    run.mkdir()
    (run / "plan.json").write_text(json.dumps({"total_tokens": 256, "stages": [{"seq_len": 32}, {"seq_len": 64}]}))
    good = [_report(s) for s in (1, 2, 3, 4)] + [_report(5, loss=None, grad_norm=None),  # skipped steps only
                                                 _report(6, val_loss=7.5, val_loss_final_len=7.0)]
    lines = [json.dumps(m) for m in good[:5]] + [json.dumps(good[5]).replace('"grad_norm": 1.5', '"grad_norm": NaN')]
    lines.append(json.dumps(_report(7, loss=None, tokens_per_s=1e-300)))  # the last report: the rate near zero
    want = good + [_report(7, loss=None, tokens_per_s=1e-300)]
    want[5] = want[5] | {"grad_norm": None}
    (run / "metrics.jsonl").write_text("\n".join(lines[:3] + HOSTILE[:10] + lines[3:] + HOSTILE[10:]) + "\n")
    start = {"start": 1, "resumed_step": 0, "world_size": 1, "nodes": ["a"], "distinct_nodes": 1, "steps_redone": 0}
    starts = [start, "[" * 100_000, start | {"start": 2, "world_size": "x"}]
    (run / "starts.jsonl").write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in starts) + "\n")

    good_pairs, bad = parse_metrics((run / "metrics.jsonl").read_bytes())
    assert [m for _, m in good_pairs] == want and bad == HOSTILE
    capsys.readouterr()
    assert read_metrics(str(run)) == want
    err = capsys.readouterr().err
    assert err.count("gl-ray: skipping a line of ") == WARN_LINES
    assert f"skipping {len(HOSTILE) - WARN_LINES} more such lines" in err
    s = run_status(str(run))
    assert (s["step"], s["loss"], s["val_loss_final_len"], s["world_size"], s["restarts"]) == (7, None, 7.0, 1, 0)
    text = format_status(s)
    assert "loss -, val loss at the final length 7.0000 (step 6)" in text and "ETA ?" in text
    rep = build_report([str(run)], str(tmp_path / "rep"))
    assert rep["runs"][0]["tokens"] == 7 * 32 and rep["runs"][0]["final_val_loss_final_len"] == 7.0
    capsys.readouterr()
    log = MetricsLog(str(run), resume_step=6)
    assert [json.loads(x) for x in log.lines][:5] == want[:5] and len(log.lines) == 6
    assert capsys.readouterr().out.count("gl-ray: dropping a line of ") == WARN_LINES
