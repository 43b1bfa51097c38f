"""Bad-input matrix through the CLI, tampered checkpoints, a killed driver, and secrets kept out of outputs.

Every bad input: exit code 2, one line on stderr naming the problem, no traceback, no Ray started, and nothing
half-written (no run folder, no dataset folder)."""

import http.server
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import NEOX_TOKENIZER, cli_inprocess, metrics, run_tiny, tiny_overrides, train_then_signal
from safetensors.torch import load_file

from gl_ray.errors import UserError

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "pipelines" / "configs" / "tiny-growlength.yaml")


def cli(*args, env=None, timeout=300):
    """`gl-ray ARGS` in a subprocess whose Ray temp folder (RAY_TMPDIR) is its own: `ray_started` on the result
    says whether it started Ray (a session folder appeared), which Ray's now quiet console no longer shows."""
    ray_tmp = tempfile.mkdtemp(prefix="glr-ray-")
    try:
        r = subprocess.run([sys.executable, "-m", "gl_ray", *args], check=False, capture_output=True, text=True,
                           cwd=REPO, env={**os.environ, "RAY_TMPDIR": ray_tmp, **(env or {})}, timeout=timeout)
        r.ray_started = any(Path(ray_tmp).iterdir())
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    return r


# A line the Ray log monitor streams from some actor or worker: "(RayTrainWorker pid=3270) ...", maybe coloured.
def assert_user_error(r, needle):
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    err = r.stderr.strip()
    assert "\n" not in err and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert needle.lower() in err.lower(), err
    assert not getattr(r, "ray_started", False)  # no Ray resource was claimed (cli_inprocess: ensure_ray fails)


def copy_data(tiny_data, tmp_path) -> Path:
    dst = tmp_path / "ds"
    shutil.copytree(tiny_data, dst)
    return dst


def first_shard(ds: Path) -> Path:
    return ds / json.loads((ds / "manifest.json").read_text())["splits"]["train"]["shards"][0]["path"]


def break_corrupt(ds):
    first_shard(ds).write_bytes(b"PAR1 not really parquet PAR1")


def break_missing(ds):
    first_shard(ds).unlink()


def break_count(ds):
    m = json.loads((ds / "manifest.json").read_text())
    m["splits"]["train"]["shards"][0]["rows"] += 1
    m["splits"]["train"]["documents"] += 1
    (ds / "manifest.json").write_text(json.dumps(m))


def break_range(ds):
    m = json.loads((ds / "manifest.json").read_text())
    m["vocab_size"] = 5
    (ds / "manifest.json").write_text(json.dumps(m))


def break_type(ds):
    sh = first_shard(ds)
    t = pq.read_table(sh)
    pq.write_table(pa.table({"input_ids": t["input_ids"].cast(pa.list_(pa.float32())), "num_tokens": t["num_tokens"]}),
                   sh)


def break_escape(ds):
    m = json.loads((ds / "manifest.json").read_text())
    m["splits"]["train"]["shards"][0]["path"] = "../outside.parquet"
    (ds / "manifest.json").write_text(json.dumps(m))


def break_nul(ds):
    m = json.loads((ds / "manifest.json").read_text())
    m["splits"]["train"]["shards"][0]["path"] = "train/shard\x00.parquet"
    (ds / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize("breaker, needle", [
    (break_corrupt, "not a readable parquet"), (break_missing, "is missing"), (break_count, "rows but the manifest"),
    (break_range, "token ids outside"), (break_type, "column 'input_ids'"), (break_escape, "escapes the dataset"),
    (break_nul, "must be a relative path"),
], ids=["corrupt-shard", "shard-missing", "count-mismatch", "token-out-of-range", "wrong-column-type",
        "path-escape", "nul-in-path"])
def test_bad_dataset(tiny_data, tmp_path, capsys, monkeypatch, breaker, needle):
    ds = copy_data(tiny_data, tmp_path)
    breaker(ds)
    r = cli_inprocess(capsys, monkeypatch, "train", "--config", CONFIG, "--set", f"data.path={ds}",
                      "--set", f"ray.storage_path={tmp_path}/runs")
    assert_user_error(r, needle)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("sets, needle", [
    (["schedule.lengths=[128,64]", "schedule.ratios=[0.5,0.5]"], "strictly increasing"),
    (["schedule.ratios=[0.5,0.2,0.2,0.2]"], "sum to 1.1"),
    (["schedule.tokens_per_step=8200"], "not divisible"),
    (["model.max_position_embeddings=256"], "exceeds model.max_position_embeddings"),
    (["schedule.lenghts=[64]"], "did you mean 'schedule.lengths'"),
    (["schedule.budget_tokens=16384"], "smaller than one optimizer step"),
    (["model.attention=xformers"], "is not one of sdpa | flex | flash_attention_2"),
    (["model.attention=flex", "train.device=cpu"], "trains on CUDA only"),
    (["model.attention=flash_attention_2"], "flash_attention_2 runs on CUDA only"),
], ids=["lengths-not-increasing", "ratios-sum", "tokens-per-step", "max-positions", "unknown-key", "tiny-budget",
        "unknown-attention", "flex-on-cpu", "flash-on-cpu"])
def test_bad_config(tmp_path, capsys, monkeypatch, sets, needle):
    args = [x for s in sets for x in ("--set", s)]
    r = cli_inprocess(capsys, monkeypatch, "train", "--config", CONFIG, "--set", f"ray.storage_path={tmp_path}/runs",
                      *args)
    assert_user_error(r, needle)
    assert not (tmp_path / "runs").exists()


def test_outputs_under_a_regular_file_and_bad_eval_sizes(baseline, tiny_data, tmp_path, capsys, monkeypatch):
    """--out under a file fails before any work (eval used to fail only after evaluating); a truncated model file
    and --max-tokens <= 0 are one line too."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    final = str(baseline[2] / "final")
    r = cli_inprocess(capsys, monkeypatch, "eval", "--model", final, "--data", tiny_data, "--lengths", "32",
                      "--out", str(blocker / "eval.json"))
    assert_user_error(r, "cannot be a folder here")
    r = cli_inprocess(capsys, monkeypatch, "report", str(baseline[2]), "--out", str(blocker / "rep"))
    assert_user_error(r, "cannot be a folder here")
    r = cli_inprocess(capsys, monkeypatch, "prepare", "--source", "stdlib", "--out", str(blocker / "ds"), "--no-ray")
    assert_user_error(r, "a file is in the way")
    r = cli_inprocess(capsys, monkeypatch, "eval", "--model", final, "--data", tiny_data, "--lengths", "32",
                      "--max-tokens", "-5", "--out", str(tmp_path / "e.json"))
    assert_user_error(r, "--max-tokens -5 must be positive")
    cut = tmp_path / "cut-final"
    shutil.copytree(final, cut)
    (cut / "model.safetensors").write_bytes((cut / "model.safetensors").read_bytes()[:1000])
    r = cli_inprocess(capsys, monkeypatch, "eval", "--model", str(cut), "--data", tiny_data, "--lengths", "32",
                      "--out", str(tmp_path / "e.json"))
    assert_user_error(r, "cannot load model")
    r = cli_inprocess(capsys, monkeypatch, "eval", "--model", final, "--data", tiny_data, "--lengths", "32",
                      "--device", "tpu", "--out", str(tmp_path / "e.json"))
    assert_user_error(r, "--device='tpu' is not one of auto | cpu | cuda")
    r = cli_inprocess(capsys, monkeypatch, "eval", "--model", final, "--data", tiny_data, "--lengths", "32",
                      "--out", str(tmp_path))  # a folder: refused before the eval, not after it
    assert_user_error(r, "is a folder; give the JSON file")
    assert not (tmp_path / "e.json").exists()


def test_document_masking_needs_eos_boundaries(tiny_data, tmp_path, capsys, monkeypatch):
    """A dataset whose documents do not end with its EOS token cannot be masked by documents: one line, no run."""
    ds = copy_data(tiny_data, tmp_path)
    m = json.loads((ds / "manifest.json").read_text())
    m["eos_token_id"] += 1  # a token id that is valid but ends no document
    (ds / "manifest.json").write_text(json.dumps(m))
    r = cli_inprocess(capsys, monkeypatch, "train", "--config", CONFIG, "--set", f"data.path={ds}",
                      "--set", "data.document_masking=true", "--set", f"ray.storage_path={tmp_path}/runs")
    assert_user_error(r, "do not end with the EOS token")
    assert not (tmp_path / "runs").exists()
    r = cli_inprocess(capsys, monkeypatch, "eval", "--model", str(tmp_path), "--data", str(ds), "--document-masking")
    assert_user_error(r, "do not end with the EOS token")


def test_the_eos_check_reads_documents_in_manifest_order_whatever_the_data_seed(tiny_data):
    """data.seed shuffles epoch 0's order (by blocks of documents); the EOS check looks at the documents' own ends
    (it read the shuffled stream at the manifest's offsets before, and refused every seeded masked run)."""
    from gl_ray.data.stream import check_document_ends, get_stream

    for seed in (0, 1, 2):
        check_document_ends(get_stream(tiny_data, "train", seed))


def test_reproduce_bad_input(tmp_path, capsys, monkeypatch):
    """`gl-ray reproduce` answers a bad input like every other command (it had its own main before)."""
    r = cli_inprocess(capsys, monkeypatch, "reproduce", "--config", CONFIG, "--data", str(tmp_path / "none"),
                      "--budget-tokens", "65536", "--out", str(tmp_path / "out"))
    assert_user_error(r, "manifest.json missing")
    assert not (tmp_path / "out" / "runs").exists()


def test_a_user_error_wrapped_by_ray_is_unwrapped():
    from gl_ray.errors import UserError, unwrap_user_errors

    class RayTaskError(Exception):  # what a Ray task or Train worker raises around the worker's exception
        pass

    with pytest.raises(UserError, match="bad shard") as e, unwrap_user_errors():
        try:
            raise UserError("bad shard")
        except UserError as inner:
            raise RayTaskError("task failed") from inner
    assert e.value.__cause__ is None and e.value.__suppress_context__  # one line, no chained traceback
    with pytest.raises(KeyError), unwrap_user_errors():  # a bug stays a bug
        raise KeyError("bug")


def test_empty_corpus(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.txt").write_text("\n\n")
    r = cli("prepare", "--source", str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--no-ray",
            "--tokenizer", str(NEOX_TOKENIZER))
    assert r.returncode == 2 and "no non-empty" in r.stderr and "Traceback" not in r.stderr
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("out")]


def test_a_stale_ray_address_file_is_never_joined(tmp_path):
    """A Ray head that died leaves Ray's address file behind: gl-ray's local Ray starts its own instance instead of
    reading it (it used to fail with "When connecting to an existing cluster, num_cpus ... must not be provided",
    after writing a .partial that then demanded --resume)."""
    (tmp_path / "src").mkdir()
    for i in range(3):
        (tmp_path / "src" / f"{i}.txt").write_text(f"document {i} " * 50)
    ray_tmp = Path(tempfile.mkdtemp(prefix="glr-"))  # short: Ray's socket paths live under it
    try:
        (ray_tmp / "ray").mkdir()
        (ray_tmp / "ray" / "ray_current_cluster").write_text("127.0.0.1:1")
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_TMPDIR": str(ray_tmp)}
        r = subprocess.run([sys.executable, "-m", "gl_ray", "prepare", "--source", str(tmp_path / "src"), "--out",
                            str(tmp_path / "out"), "--tokenizer", str(NEOX_TOKENIZER), "--workers", "1"],
                           capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["splits"]["train"]["documents"] >= 1


def test_a_ray_address_that_does_not_answer_is_one_line_before_anything_is_written(tiny_data, tmp_path, capsys,
                                                                                   monkeypatch):
    """--address (or ray.address) naming no cluster: train, prepare and tune fail in one line within seconds,
    before the run folder, the dataset or the search folder exists (ray.init hung for minutes after writing)."""
    dead = "127.0.0.1:1"  # nothing listens on port 1
    r = cli_inprocess(capsys, monkeypatch, "train", "--config", CONFIG, "--address", dead, "--set",
                      f"data.path={tiny_data}", "--set", f"ray.storage_path={tmp_path}/runs", "--set",
                      "ray.num_workers=1")
    assert_user_error(r, f"Ray address '{dead}' does not answer")
    r = cli_inprocess(capsys, monkeypatch, "prepare", "--source", "stdlib", "--out", str(tmp_path / "ds"),
                      "--address", dead)
    assert_user_error(r, "does not answer")  # ray:// and the other spellings: tests/test_ray_utils.py
    monkeypatch.setenv("RAY_ADDRESS", dead)
    r = cli_inprocess(capsys, monkeypatch, "tune", "--config", CONFIG, "--space", str(REPO / "tune_spaces" /
                      "smoke.yaml"), "--set", f"data.path={tiny_data}", "--set", f"ray.storage_path={tmp_path}/runs")
    assert_user_error(r, "does not answer")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_unwritable_storage(tiny_data, tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the runs folder should be")
    r = cli("train", "--config", CONFIG, "--set", f"data.path={tiny_data}", "--set", f"ray.storage_path={blocker}")
    assert_user_error(r, str(blocker))


def test_s3_bucket_missing(tiny_data, s3_server, tmp_path):
    r = cli("train", "--config", CONFIG, "--set", f"data.path={tiny_data}",
            "--set", "ray.storage_path=s3://bucket-that-is-not-there/runs")
    assert_user_error(r, "does not exist")


class Deny(http.server.BaseHTTPRequestHandler):
    """An S3 endpoint that refuses every request as a bad access key would be refused."""

    def _deny(self):
        body = (b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>InvalidAccessKeyId</Code><Message>The AWS "
                b"Access Key Id you provided does not exist in our records.</Message></Error>")
        self.send_response(403)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _deny

    def log_message(self, *args):
        pass


def test_s3_credentials_wrong(tiny_data, tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Deny)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    secret = "SECRETfake0123456789abcdefDONOTLEAK"
    try:
        r = cli("train", "--config", CONFIG, "--set", f"data.path={tiny_data}", "--set", "ray.storage_path=s3://b/runs",
                env={"AWS_ENDPOINT_URL": f"http://127.0.0.1:{server.server_port}", "AWS_ACCESS_KEY_ID": "AKIAFAKEKEYID",
                     "AWS_SECRET_ACCESS_KEY": secret, "AWS_EC2_METADATA_DISABLED": "true"})
    finally:
        server.shutdown()
    assert_user_error(r, "check AWS credentials")
    assert secret not in r.stderr + r.stdout and "AKIAFAKEKEYID" not in r.stderr + r.stdout


def test_tampered_checkpoint_falls_back_to_the_previous_one(tiny_data, tmp_path, capsys):
    run_tiny(tiny_data, tmp_path, "t")
    want = load_file(tmp_path / "t" / "final" / "model.safetensors")
    newest = tmp_path / "t" / "checkpoint_step-0000016" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated
    edited = tmp_path / "t" / "checkpoint_step-0000012" / "state.json"
    meta = json.loads(edited.read_text())
    meta["stage_step"] += 1  # a hand-edited data cursor: state.json is under its own digest
    edited.write_text(json.dumps(meta))
    capsys.readouterr()
    run_tiny(tiny_data, tmp_path, "t")
    out = capsys.readouterr().out
    assert "refusing checkpoint" in out and "checkpoint_step-0000016" in out
    assert "checkpoint_step-0000012" in out and "state.json was modified" in out
    assert [m["step"] for m in metrics(tmp_path / "t")] == list(range(1, 17))  # 9..16 retrained, once each
    got = load_file(tmp_path / "t" / "final" / "model.safetensors")
    assert all(torch.allclose(got[k], want[k], atol=1e-6) for k in want)


def test_killed_driver_resumes_with_the_same_command(tiny_data, tmp_path):
    """SIGKILL the (Ray-free) driver mid-run; the same command finishes the run as if nothing happened."""
    ref = tmp_path / "ref"
    run_tiny(tiny_data, ref, "k")
    sets = [x for s in tiny_overrides(tiny_data, str(tmp_path), "k", **{"train.checkpoint_every_tokens": 2048})
            for x in ("--set", s)]
    log = tmp_path / "k" / "metrics.jsonl"
    train_then_signal(sets, log, lines=7, env={**os.environ, "GL_RAY_SLOW_STEP_S": "0.3"}, timeout_s=120)
    assert len(log.read_text().splitlines()) < 16  # killed mid-run
    r = cli("train", *sets)
    assert r.returncode == 0, r.stderr[-2000:]
    got, want = metrics(tmp_path / "k"), metrics(ref / "k")
    assert [m["step"] for m in got] == list(range(1, 17))
    for a, b in zip(got, want):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)


def test_secrets_stay_out_of_run_outputs(s3_server, bucket, tiny_data, tmp_path):
    from gl_ray import storage

    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    r = cli("train", "--config", CONFIG, *[x for s in tiny_overrides(tiny_data, f"s3://{bucket}/runs", "sec",
                                                                         **{"schedule.budget_tokens": 4096})
                                           for x in ("--set", s)])
    assert r.returncode == 0, r.stderr[-2000:]
    assert secret not in r.stdout + r.stderr
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "plan.json"):
        text = storage.read_bytes(f"s3://{bucket}/runs/sec/{name}").decode()
        assert secret not in text


def test_a_diverging_run_stops_without_saving_that_state(tiny_data, tmp_path, capsys, monkeypatch):
    """optim.lr=1e4 drives the loss to NaN: the run stops with one line naming the step and exit 3; no checkpoint
    after it, no final/, metrics.jsonl stays valid JSON and the last good checkpoint is kept."""
    sets = [x for s in tiny_overrides(tiny_data, str(tmp_path), "nan", **{"optim.lr": 1e4, "optim.min_lr": 0,
                                                                          "train.spike_factor": 0})  # NaN guard only
            for x in ("--set", s)]
    r = cli_inprocess(capsys, monkeypatch, "train", *sets)
    assert r.returncode == 3, r.stderr[-2000:]
    err = r.stderr.strip()
    assert "\n" not in err and "Traceback" not in r.stderr and "NaN or infinite at step" in err
    bad_step = int(re.search(r"at step (\d+)", err).group(1))
    run = tmp_path / "nan"
    assert not (run / "final").exists() and not (run / "summary.json").exists()
    ms = metrics(run)  # every line parses: no bare NaN
    assert all(m["step"] < bad_step for m in ms)
    ckpts = sorted(int(p.name.split("-")[1]) for p in run.glob("checkpoint_step-*"))
    assert all(c < bad_step for c in ckpts)


def test_nonfinite_skip_leaves_one_update_out_and_counts_it(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setenv("GL_RAY_NAN_AT_STEP", "5")  # the gradients of step 6 are NaN
    _, summary = run_tiny(tiny_data, tmp_path, "skip", **{"train.nonfinite": "skip"})
    ms = metrics(tmp_path / "skip")
    assert [m["skipped_steps"] for m in ms] == [0] * 5 + [1] * (len(ms) - 5)
    assert summary["steps"] == ms[-1]["step"] and (tmp_path / "skip" / "final").exists()
    assert ms[5]["loss"] is None and all(m["loss"] is not None for m in ms[:5] + ms[6:])  # step 6: no update
    with pytest.raises(UserError, match="more than train.max_skipped_steps=0"):
        run_tiny(tiny_data, tmp_path, "skip0", **{"train.nonfinite": "skip", "train.max_skipped_steps": 0})


def test_a_nan_gradient_stops_the_run_by_default(tiny_data, tmp_path, monkeypatch):
    from gl_ray.errors import TrainingDiverged

    monkeypatch.setenv("GL_RAY_NAN_AT_STEP", "5")
    with pytest.raises(TrainingDiverged, match="at step 6; .*the newest checkpoint is step 4, from before it"):
        run_tiny(tiny_data, tmp_path, "stop")
    assert max(m["step"] for m in metrics(tmp_path / "stop")) == 5
    assert not (tmp_path / "stop" / "checkpoint_step-0000008").exists()


def test_a_loss_spike_stops_the_run_and_a_rewind_resumes_from_an_earlier_checkpoint(tiny_data, tmp_path, capsys,
                                                                                      monkeypatch):
    """A finite blow-up (the output layer x30 after step 9): the spike rule stops the run at step 10 with exit 3,
    before that state is saved, so the kept checkpoints (keep 2: steps 4 and 8) are both from before it. The same
    command with --rewind-to 4 --skip-steps 2 moves checkpoint 8 aside, skips the data of steps 5-6 and finishes;
    everything is recorded. A rewind to a step with no checkpoint, or past a stage's end, is one line and moves
    nothing."""
    sets = [x for s in tiny_overrides(tiny_data, str(tmp_path), "spike", **{"train.keep_checkpoints": 2})
            for x in ("--set", s)]
    run = tmp_path / "spike"
    monkeypatch.setenv("GL_RAY_SPIKE_AT_STEP", "9")
    r = cli_inprocess(capsys, monkeypatch, "train", *sets)
    assert r.returncode == 3, r.stderr[-2000:]
    err = r.stderr.strip()
    assert "\n" not in err and "the loss spiked at step 10" in err and "newest checkpoint is step 8" in err, err
    assert "--rewind-to STEP" in err and "train.spike_factor=0" in err
    assert [m["step"] for m in metrics(run)] == list(range(1, 10))  # the spiked window is not reported
    assert sorted(p.name for p in run.glob("checkpoint_step-*")) == ["checkpoint_step-0000004",
                                                                     "checkpoint_step-0000008"]
    monkeypatch.delenv("GL_RAY_SPIKE_AT_STEP")
    for bad, needle in ((["--rewind-to", "5"], "no checkpoint at that step (its checkpoints: 4, 8)"),
                        (["--rewind-to", "4", "--skip-steps", "4"], "reaches the end of stage 0"),
                        (["--skip-steps", "2"], "--skip-steps goes with --rewind-to")):
        assert_user_error(cli_inprocess(capsys, monkeypatch, "train", *sets, *bad), needle)
    assert (run / "checkpoint_step-0000008").exists() and not (run / "rewound").exists()
    r = cli_inprocess(capsys, monkeypatch, "train", *sets, "--rewind-to", "4", "--skip-steps", "2")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "rewound to the checkpoint of step 4, skipping the data of the 2 steps after it" in r.stdout
    assert [m["step"] for m in metrics(run)] == [1, 2, 3, 4] + list(range(7, 17))  # 5 and 6 never trained
    aside = next((run / "rewound").iterdir())
    assert (aside / "checkpoint_step-0000008" / "state.json").exists()
    assert [json.loads(x)["step"] for x in (aside / "metrics.jsonl").read_text().splitlines()] == list(range(1, 10))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["tokens"] == 16384 and summary["tokens_skipped"] == 2048 and summary["steps"] == 16
    history = [json.loads(x) for x in (run / "config_history.jsonl").read_text().splitlines()]
    assert history[-1]["rewind"] | {"moved_to": None} == {"to_step": 4, "skip_steps": 2, "moved_to": None,
                                                          "set_aside": ["checkpoint_step-0000008"]}


def test_leftovers_of_an_interrupted_run_are_cleaned_and_torn_lines_tolerated(baseline, tiny_data, tmp_path):
    """An incomplete checkpoint folder (no state.json) and a stray temp file are removed when the run starts again;
    a torn last line of metrics.jsonl is dropped (with a warning) and `report`/`status` read past it."""
    from gl_ray.report import build_report
    from gl_ray.status import run_status

    run = tmp_path / "base"
    shutil.copytree(baseline[2], run)
    (run / "checkpoint_step-0000099").mkdir()
    (run / "checkpoint_step-0000099" / "model.safetensors").write_bytes(b"partial")
    (run / "metrics.jsonl.tmp-1234abcd").write_bytes(b"partial")
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 17, "loss": 1.')  # a writer died mid-line
    assert run_status(str(run))["step"] == 16
    build_report([str(run)], str(tmp_path / "rep"))
    run_tiny(tiny_data, tmp_path, "base")  # the same run again: finished, so only the cleanup and the export
    assert not (run / "checkpoint_step-0000099").exists() and not (run / "metrics.jsonl.tmp-1234abcd").exists()
    assert [m["step"] for m in metrics(run)] == list(range(1, 17))


def test_a_failed_write_leaves_no_temp_file(tmp_path, monkeypatch):
    from gl_ray import storage

    def full_disk(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(UserError, match="No space left|storage error"):
        storage.write_bytes(str(tmp_path / "x.json"), b"{}")
    assert list(tmp_path.iterdir()) == []


def test_a_background_checkpoint_write_that_fails_keeps_the_previous_checkpoint(baseline, tiny_data, tmp_path,
                                                                                 monkeypatch):
    """Checkpoints are written in a background thread (train.async_checkpoint, the default): the loop waits only
    for the host copy, which `checkpoint_block_s` records on the next report. A write that fails halfway (a full
    disk at step 8's) ends the run with its one line at the next checkpoint; step 4's stays the resume point, and
    the same command then finishes with the uninterrupted run's losses."""
    import gl_ray.train.io as io

    real = io.write_checkpoint

    def fails_at_step_8(folder, snap):
        if folder.endswith("checkpoint_step-0000008"):
            Path(folder).mkdir(parents=True)
            (Path(folder) / "model.safetensors").write_bytes(b"half")
            raise UserError(f"storage error writing {folder}/optimizer.pt: No space left on device")
        real(folder, snap)

    monkeypatch.setattr(io, "write_checkpoint", fails_at_step_8)
    with pytest.raises(UserError, match="No space left on device"):
        run_tiny(tiny_data, tmp_path, "bg")
    run = tmp_path / "bg"
    assert (run / "checkpoint_step-0000004" / "state.json").exists()
    assert not (run / "checkpoint_step-0000008" / "state.json").exists()
    assert max(m["step"] for m in metrics(run)) <= 12  # it stopped at the next checkpoint, not at the end
    monkeypatch.setattr(io, "write_checkpoint", real)
    run_tiny(tiny_data, tmp_path, "bg")
    got, want = metrics(run), metrics(baseline[2])
    assert [m["step"] for m in got] == [m["step"] for m in want]
    assert all(a["loss"] == pytest.approx(b["loss"], abs=1e-6) for a, b in zip(got, want))
    blocked = {m["step"]: m["checkpoint_block_s"] for m in want if "checkpoint_block_s" in m}
    assert sorted(blocked) == [5, 9, 13] and all(0 < b < 30 for b in blocked.values())  # after 4, 8 and 12


def test_one_trainer_per_run(baseline, tiny_data, tmp_path):
    """While a trainer holds a run, a second one exits 2 naming it, before writing anything; once the holder is
    gone (its lock dies with it) the run is free again."""
    from gl_ray.lock import run_lock

    run = tmp_path / "base"
    shutil.copytree(baseline[2], run)
    before = (run / "config.yaml").read_text()
    with run_lock(str(run)):
        with pytest.raises(UserError, match=rf"being trained by another gl-ray \(pid {os.getpid()} on"):
            run_tiny(tiny_data, tmp_path, "base")
        assert (run / "config.yaml").read_text() == before
    run_tiny(tiny_data, tmp_path, "base")  # released: the rerun goes ahead


def test_a_killed_holder_never_blocks_the_rerun(tmp_path):
    from gl_ray.lock import run_lock

    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from gl_ray.lock import run_lock\n"
                               f"with run_lock({str(tmp_path / 'run')!r}):\n    print('held', flush=True); "
                               "time.sleep(600)"], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(UserError, match="being trained by another gl-ray"), run_lock(str(tmp_path / "run")):
        pass
    holder.kill()
    holder.wait()
    with run_lock(str(tmp_path / "run")):  # the OS released the dead holder's lock
        pass


def test_s3_lease_refuses_a_second_trainer_and_expires(s3_server, bucket, monkeypatch):
    import gl_ray.lock as lock

    uri = f"s3://{bucket}/runs/x"
    with lock.run_lock(uri):
        with pytest.raises(UserError, match="being trained by another gl-ray"), lock.run_lock(uri):
            pass
    with lock.run_lock(uri):  # released on exit
        pass
    from gl_ray import storage

    stale = {"pid": 1, "host": "gone", "since": "then", "id": "x", "expires": 0}  # a killed holder's lease
    storage.write_bytes(f"{uri}/{lock.LEASE_NAME}", json.dumps(stale).encode())
    with lock.run_lock(uri):
        pass


def test_sigterm_checkpoints_the_step_and_the_rerun_resumes_exactly(baseline, tiny_data, tmp_path):
    """SIGTERM (a spot reclaim, kill, a scheduler) mid-stage: the step in progress ends, a checkpoint is written
    at it, one line and exit 143; the same command then resumes from that step as if nothing happened."""
    sets = [x for s in tiny_overrides(tiny_data, str(tmp_path), "term") for x in ("--set", s)]
    env = {**os.environ, "GL_RAY_SLOW_STEP_S": "0.3"}
    r = train_then_signal(sets, tmp_path / "term" / "metrics.jsonl", 6, env, timeout_s=300, sig=signal.SIGTERM)
    assert r.returncode == 143, r.stderr[-2000:]
    assert r.stderr.strip().count("\n") == 0 and "stopped on SIGTERM, checkpointed at step" in r.stderr
    stopped = metrics(tmp_path / "term")[-1]["step"]
    assert 6 <= stopped < 16 and (tmp_path / "term" / f"checkpoint_step-{stopped:07d}").exists()
    assert f"step {stopped};" in r.stderr and not (tmp_path / "term" / "final").exists()
    r = cli(*["train", *sets])
    assert r.returncode == 0, r.stderr[-2000:]
    got, want = metrics(tmp_path / "term"), metrics(baseline[2])
    assert [m["step"] for m in got] == [m["step"] for m in want]
    for a, b in zip(got, want):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
    wa, wb = load_file(tmp_path / "term" / "final" / "model.safetensors"), load_file(baseline[2] / "final" /
                                                                                    "model.safetensors")
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


def test_a_resume_must_be_the_same_run(baseline, tiny_data, tmp_path):
    """Another dataset of the same shape, another model preset: refused with one line naming it, before anything
    is written; an allowed change (optim.lr) goes ahead, recorded in config_history.jsonl, config.yaml kept."""
    run = tmp_path / "base"
    shutil.copytree(baseline[2], run)
    first = (run / "config.yaml").read_text()
    other = copy_data(tiny_data, tmp_path)
    m = json.loads((other / "manifest.json").read_text())
    m["source"] = "another corpus"  # same shape, another dataset
    (other / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(UserError, match="was started with dataset"):
        run_tiny(str(other), tmp_path, "base")
    with pytest.raises(UserError, match="was started with model.preset='tiny'; this config has 'pythia-14m'"):
        run_tiny(tiny_data, tmp_path, "base", **{"model.preset": "pythia-14m"})
    assert (run / "config.yaml").read_text() == first and not (run / "config_history.jsonl").exists()
    run_tiny(tiny_data, tmp_path, "base", **{"optim.lr": 1e-3})
    history = [json.loads(ln) for ln in (run / "config_history.jsonl").read_text().splitlines()]
    assert history[-1]["changed"]["optim.lr"] == [0.003, 0.001]  # (and the storage path: the run was copied)
    assert (run / "config.yaml").read_text() == first


def test_lock_files_never_write_through_a_symlink(tmp_path):
    """RUN/.gl-ray.lock and DEST.lock that are symlinks (to a file outside) are refused in one line, and the target
    is left as it was (the lock JSON used to overwrite it)."""
    from gl_ray.lock import LOCK_NAME, output_lock, run_lock

    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    (run / LOCK_NAME).symlink_to(target)
    (tmp_path / "data.lock").symlink_to(target)
    for lock in (run_lock(str(run)), output_lock(str(tmp_path / "data"))):
        with pytest.raises(UserError, match="is a symbolic link; gl-ray never writes through one") as e:
            with lock:
                pass
        assert "\n" not in str(e.value) and target.read_text() == "keep me"


def test_a_rewind_sets_the_old_end_aside_first_and_needs_a_run(baseline, tiny_data, tmp_path, monkeypatch):
    """Rewinding a finished run moves its final/ and summary.json aside before training, so a rewind that fails
    midway does not leave the old end looking current; --rewind-to on a run that does not exist is one line and
    leaves no folder (nor a lock) behind."""
    from gl_ray.config import load_config
    from gl_ray.train.driver import launch_run
    from gl_ray.train.faults import InjectedFault

    run = tmp_path / "base"
    shutil.copytree(baseline[2], run)
    cfg = load_config(None, tiny_overrides(tiny_data, str(tmp_path), "base"))
    monkeypatch.setenv("GL_RAY_FAIL_AT_STEP", "14")
    with pytest.raises(InjectedFault):
        launch_run(cfg, quiet=True, rewind_to=12)
    assert not (run / "final").exists() and not (run / "summary.json").exists()
    aside = next((run / "rewound").iterdir())
    assert (aside / "final" / "model.safetensors").exists() and json.loads((aside / "summary.json").read_text())
    ghost = load_config(None, tiny_overrides(tiny_data, str(tmp_path), "ghost"))
    with pytest.raises(UserError, match="there is no run .* to rewind"):
        launch_run(ghost, quiet=True, rewind_to=4)
    assert not (tmp_path / "ghost").exists()


def test_unbounded_or_late_inputs_are_one_line_up_front(tiny_data):
    """Counts a typo makes huge (a runaway eval loop, a 7 TiB allocation) and values checked too late are refused
    where they are read, naming the flag or key (issue 40, 7)."""
    from gl_ray.config import load_config
    from gl_ray.data.recall import parse_recall_spec
    from gl_ray.evaluate import ContextSettings, evaluate_models

    for sets, needle in ((["data.cycles=1000000000000"], "data.cycles must be between 1 and 100000"),
                         (["data.cycles=1e12"], "data.cycles"),
                         (["train.spike_windows=1000000000000"], "train.spike_windows must be between 3 and")):
        with pytest.raises(UserError, match=needle):
            load_config("pipelines/configs/tiny-growlength.yaml", sets)
    for settings, needle in ((ContextSettings(distractors=10_000_000), "--distractors 10000000 must be between 1"),
                             (ContextSettings(seed=-1), "--context-seed -1 must be >= 0")):
        with pytest.raises(UserError, match=needle):
            settings.check([64])
    with pytest.raises(UserError, match="--max-tokens 1 is shorter than one window of the longest --lengths, 64"):
        evaluate_models([], tiny_data, [64], max_tokens=1)
    with pytest.raises(UserError, match="--recall gives items twice"):
        parse_recall_spec("items=4,items=8")


def tiny_checkpoint(folder: Path, step: int) -> Path:
    """A small complete checkpoint folder of stage 0 (state.json with its digests), as gl-ray writes one."""
    from gl_ray.train.checkpoint import HostCopy, TrainState, write_checkpoint

    state = TrainState(step=step, stage=0, stage_step=step, tokens=1024 * step)
    write_checkpoint(str(folder), HostCopy({"w": torch.zeros(2)}, {}, torch.get_rng_state(), state))
    return folder


def tiny_plan(tmp_path, **extra):
    """The tiny runs' config and plan (two stages of 8 steps, 1024 tokens a step), without a dataset."""
    from gl_ray.config import load_config
    from gl_ray.schedule import make_plan

    cfg = load_config(None, tiny_overrides(str(tmp_path / "no-data"), str(tmp_path), "r", **extra))
    return cfg, make_plan(cfg)


def test_checkpoints_are_exact_names_never_links_and_incomplete_ones_are_set_aside(tmp_path):
    """Issue 40 (1): only names gl-ray writes (checkpoint_step- and 7 digits) are checkpoints: a user's copy
    (`.bak`, `" copy"`, a trailing space) is neither loaded, pruned nor removed; an entry named as a checkpoint
    that is a symbolic link (to a complete checkpoint, to an incomplete folder, broken) is never loaded, and a
    start refuses it in one line before anything is moved (its target used to be deleted); an incomplete
    checkpoint is moved to RUN/rewound/, not deleted; only storage's own temp files are deleted, never through a
    link."""
    from gl_ray.train.checkpoint import clear_leftovers, find_resume_checkpoint, list_checkpoints, prune_checkpoints

    run, outside = tmp_path / "runs" / "r", tmp_path / "outside"
    run.mkdir(parents=True)
    tiny_checkpoint(outside / "complete", 12)
    (outside / "incomplete").mkdir()
    (outside / "incomplete" / "precious.bin").write_bytes(b"keep me")
    (outside / "notes.txt").write_text("keep me")
    tiny_checkpoint(run / "checkpoint_step-0000002", 2)
    tiny_checkpoint(run / "checkpoint_step-0000004", 4)
    for copy in ("checkpoint_step-0000004.bak", "checkpoint_step-0000008 ", "checkpoint_step-00000016"):
        shutil.copytree(run / "checkpoint_step-0000004", run / copy)
    (run / "checkpoint_step-0000016 copy").mkdir()
    (run / "checkpoint_step-0000099").mkdir()
    (run / "checkpoint_step-0000099" / "model.safetensors").write_bytes(b"partial")
    (run / "checkpoint_step-0000012").symlink_to(outside / "complete")
    (run / "checkpoint_step-0000016").symlink_to(outside / "incomplete")
    (run / "checkpoint_step-0000020").symlink_to(tmp_path / "nowhere")
    (run / "metrics.jsonl.tmp-1234abcd").write_bytes(b"partial")
    (run / "summary.json.tmp-abcdef12").symlink_to(outside / "notes.txt")
    (run / "notes.tmp-draft").write_text("mine")
    copies = ["checkpoint_step-0000004.bak", "checkpoint_step-0000008 ", "checkpoint_step-00000016",
              "checkpoint_step-0000016 copy"]

    assert list_checkpoints(str(run)) == [(2, str(run / "checkpoint_step-0000002")),
                                          (4, str(run / "checkpoint_step-0000004"))]
    assert find_resume_checkpoint(str(run))[1].step == 4  # not the linked step 12
    prune_checkpoints(str(run), 1)
    assert not (run / "checkpoint_step-0000002").exists() and (run / "checkpoint_step-0000004").exists()
    with pytest.raises(UserError, match="checkpoint_step-0000012 is a symbolic link; gl-ray neither loads") as e:
        clear_leftovers(str(run))
    assert "\n" not in str(e.value) and (run / "checkpoint_step-0000099").exists() and not (run / "rewound").exists()
    assert (outside / "incomplete" / "precious.bin").read_bytes() == b"keep me"
    assert (outside / "complete" / "state.json").exists() and all((run / c).exists() for c in copies)

    for link in ("checkpoint_step-0000012", "checkpoint_step-0000016", "checkpoint_step-0000020"):
        (run / link).unlink()
    done = clear_leftovers(str(run))
    aside = next((run / "rewound").iterdir())
    assert done == [("checkpoint_step-0000099", str(aside)), ("metrics.jsonl.tmp-1234abcd", None)]
    assert aside.name.endswith("-incomplete")
    assert (aside / "checkpoint_step-0000099" / "model.safetensors").read_bytes() == b"partial"
    assert all((run / c).exists() for c in copies) and (run / "notes.tmp-draft").read_text() == "mine"
    assert (run / "summary.json.tmp-abcdef12").is_symlink() and (outside / "notes.txt").read_text() == "keep me"


def test_a_rewind_record_is_sealed_and_its_skip_checked_as_the_flag_is(tmp_path):
    """Issue 40 (4): RUN/rewind.json carries a digest as state.json does, and its skip is checked by --skip-steps'
    own check at the start and where a worker applies it: a hand edit (skip_steps 100, Infinity, an old
    unsealed record) or a sealed skip past the stage's end is one line naming the file, never applied (100 used
    to give 116 steps and an empty stage 2, Infinity an OverflowError)."""
    from gl_ray.train.checkpoint import checkpoint_state, seal
    from gl_ray.train.rewind import apply_skip, check_rewind_record, rewind

    _, plan = tiny_plan(tmp_path)
    run = tmp_path / "runs" / "r"
    tiny_checkpoint(run / "checkpoint_step-0000004", 4)
    tiny_checkpoint(run / "checkpoint_step-0000008", 8)
    rewind(str(run), plan, 4, 2, say=lambda *_: None)
    record = run / "rewind.json"
    check_rewind_record(str(run), plan)
    state = checkpoint_state(str(run / "checkpoint_step-0000004"))
    assert apply_skip(str(run), state, plan) and (state.step, state.stage_step, state.tokens) == (6, 6, 6144)
    sealed = json.loads(record.read_text())
    for text, needle in ((json.dumps(sealed | {"skip_steps": 100}), "not the rewind record --rewind-to wrote"),
                         (record.read_text().replace('"skip_steps": 2', '"skip_steps": Infinity'),
                          "not the rewind record --rewind-to wrote"),
                         (json.dumps({"step": 4, "skip_steps": 2}), "not the rewind record --rewind-to wrote"),
                         (seal({"step": 4, "skip_steps": 100}).decode(), "reaches the end of stage 0"),
                         (seal({"step": 4, "skip_steps": -1}).decode(), "--skip-steps must be >= 0"),
                         (seal({"step": 4, "skip_steps": 2.5}).decode(), "not the rewind record --rewind-to wrote")):
        record.write_text(text)
        for check in (lambda: check_rewind_record(str(run), plan),
                      lambda: apply_skip(str(run), checkpoint_state(str(run / "checkpoint_step-0000004")), plan)):
            with pytest.raises(UserError, match=re.escape(needle)) as e:
                check()
            assert "\n" not in str(e.value) and "rewind.json" in str(e.value) and "--rewind-to STEP" in str(e.value)
    record.write_text(seal({"step": 12, "skip_steps": 100}).decode())  # its checkpoint is gone: applies to nothing
    check_rewind_record(str(run), plan)


def test_a_removed_fingerprint_is_recovered_from_the_run_never_rewritten_with_another_model(tmp_path):
    """Issue 40 (5): without fingerprint.json a resume is checked against the run's own config.yaml and plan.json
    (another model.preset used to resume into the run: a size-mismatch traceback, and fingerprint.json rewritten
    with that model); the same config goes on and fingerprint.json is rebuilt; a run with checkpoints but neither
    file is refused; a torn fingerprint.json says that removing it is safe."""
    from gl_ray.schedule import make_plan
    from gl_ray.train.identity import check_resumable, fingerprint, record_run

    cfg, plan = tiny_plan(tmp_path)
    other, other_plan = tiny_plan(tmp_path, **{"model.preset": "pythia-14m"})
    manifest = b'{"a": "manifest"}'
    run = tmp_path / "runs" / "r"
    record_run(str(run), cfg, plan, manifest)
    (run / "plan.json").write_text(json.dumps(plan.to_json()))
    tiny_checkpoint(run / "checkpoint_step-0000004", 4)
    first = json.loads((run / "fingerprint.json").read_text())
    assert other_plan.to_json()["stages"] == plan.to_json()["stages"]  # the stages alone cannot tell them apart
    (run / "fingerprint.json").unlink()
    with pytest.raises(UserError, match="was started with model.preset='tiny'; this config has 'pythia-14m'"):
        check_resumable(str(run), other, other_plan, manifest)
    assert not (run / "fingerprint.json").exists()
    check_resumable(str(run), cfg, make_plan(cfg), manifest)
    record_run(str(run), cfg, plan, manifest)
    assert json.loads((run / "fingerprint.json").read_text()) == first == fingerprint(cfg, plan, manifest)

    (run / "fingerprint.json").write_text('{"model.preset": "ti')
    with pytest.raises(UserError, match="remove it: the next start rebuilds it from the run's config.yaml"):
        check_resumable(str(run), cfg, plan, manifest)
    (run / "fingerprint.json").unlink()
    (run / "config.yaml").unlink()
    with pytest.raises(UserError, match="neither fingerprint.json nor config.yaml"):
        check_resumable(str(run), other, other_plan, manifest)


def test_a_resume_without_its_fingerprint_or_with_an_edited_rewind_record_is_refused_first(baseline, tiny_data,
                                                                                           tmp_path):
    """The same through launch_run on a finished run: another model after fingerprint.json was removed, and a
    rewind.json edited to skip 100 steps, are each one UserError line before anything of the run is written; the
    run's own config then goes on (the export again) and fingerprint.json is rebuilt as it was."""
    from gl_ray.train.checkpoint import seal

    run = tmp_path / "base"
    shutil.copytree(baseline[2], run)
    first = json.loads((run / "fingerprint.json").read_text())
    (run / "fingerprint.json").unlink()
    before = {p.name: p.stat().st_mtime_ns for p in run.iterdir() if p.name != ".gl-ray.lock"}
    with pytest.raises(UserError, match="was started with model.preset='tiny'; this config has 'pythia-14m'"):
        run_tiny(tiny_data, tmp_path, "base", **{"model.preset": "pythia-14m"})
    for record, needle in (({"step": 16, "skip_steps": 100}, "is not the rewind record --rewind-to wrote"),
                           (seal({"step": 8, "skip_steps": 100}), "reaches the end of stage 1")):
        (run / "rewind.json").write_bytes(record if isinstance(record, bytes) else json.dumps(record).encode())
        with pytest.raises(UserError, match=needle) as e:
            run_tiny(tiny_data, tmp_path, "base")
        assert "rewind.json" in str(e.value) and "\n" not in str(e.value)
    (run / "rewind.json").unlink()
    assert {p.name: p.stat().st_mtime_ns for p in run.iterdir() if p.name != ".gl-ray.lock"} == before
    run_tiny(tiny_data, tmp_path, "base")
    assert json.loads((run / "fingerprint.json").read_text()) == first
