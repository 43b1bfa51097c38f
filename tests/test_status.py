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
