"""Shared fixtures: one local Ray instance and one tiny stdlib dataset for the whole session."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The session's local Ray stays on loopback (gl_ray.ray_utils.ensure_ray sets this only if nothing imported ray
# first; a test module that imports ray at collection would otherwise put the session's node on the machine's IP)
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def submit_job(address: str, env: dict, args: list[str], extra_env: dict | None = None, wait: bool = True) -> str:
    """`ray job submit` of `python -m pipelines.pretrain ARGS` from this checkout to the cluster at `address` (its
    dashboard); returns the submission id (wait: once the job has ended)."""
    import uuid

    sid = f"gl-ray-test-{uuid.uuid4().hex[:8]}"
    runtime = {"env_vars": {"RAY_DATA_DISABLE_PROGRESS_BARS": "1", **(extra_env or {})},
               "excludes": [".venv", "runs", "data", "results", ".git"]}
    ray_bin = str(Path(sys.executable).parent / "ray")
    for _ in range(30):  # right after `ray start` the job agent may not be up yet
        r = subprocess.run([ray_bin, "job", "submit", "--address", address, "--submission-id", sid,
                            *([] if wait else ["--no-wait"]), "--working-dir", ".", "--runtime-env-json",
                            json.dumps(runtime), "--", "python", "-m", "pipelines.pretrain", *args],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        if "No available agent" not in r.stderr + r.stdout:
            break
        time.sleep(2)
    submit_job.output = r.stdout[-8000:] + r.stderr[-3000:]  # waiting: ends with "Job '...' succeeded" (failed)
    return sid


def job_status(address: str, env: dict, sid: str) -> str:
    """`ray job status` of a submission: its output, the status words included (e.g. "succeeded")."""
    r = subprocess.run([str(Path(sys.executable).parent / "ray"), "job", "status", "--address", address, sid],
                       env=env, capture_output=True, text=True, timeout=60)
    return r.stdout + r.stderr


def job_logs(address: str, env: dict, sid: str, tail: int = 8000) -> str:
    """The end of `ray job logs` of a submission: what its driver printed, for a failing test's message."""
    r = subprocess.run([str(Path(sys.executable).parent / "ray"), "job", "logs", "--address", address, sid],
                       env=env, capture_output=True, text=True, timeout=60)
    return (r.stdout + r.stderr)[-tail:]


def aws_env() -> dict:
    """The S3 settings of the session's moto server, for a job's runtime env."""
    return {k: os.environ[k] for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                       "AWS_DEFAULT_REGION")}


def agent_ports() -> list[str]:
    """`ray start` ports of a node's agents, free ones: the test session's Ray already holds the default ones."""
    return [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}"]
# The real GPT-NeoX-20B (Pythia) tokenizer, checked in with its licence (see the README.md beside it).
NEOX_TOKENIZER = REPO / "tests" / "fixtures" / "tokenizers" / "gpt-neox-20b"

RAY_STREAMED_LOG = re.compile(r"^(\x1b\[\d+m)?\(\w+ pid=\d+")


def cli_inprocess(capsys, monkeypatch, *args):
    """The CLI's main() in this process (seconds cheaper than a subprocess: no fresh interpreter importing torch);
    returns a CompletedProcess (exit code, stdout, stderr). Each command keeps one test of the real entry point in
    a subprocess (tests/test_config.py::test_cli_bad_config_exits_2_with_one_line,
    tests/test_prepare.py::test_cli_prepare_bad_input_exit_2).

    Claiming Ray fails the test outright. The suite's shared Ray instance may still stream log lines of earlier
    tests' actors into this process's stderr while main() runs; those lines are not the CLI's and are dropped."""
    import gl_ray.ray_utils
    from gl_ray.cli import main

    def no_ray(*a, **k):
        raise AssertionError("bad input reached ensure_ray(): a Ray resource would be claimed")

    monkeypatch.setattr(gl_ray.ray_utils, "ensure_ray", no_ray)
    capsys.readouterr()
    code = main(list(args))
    out = capsys.readouterr()
    err = "".join(line for line in out.err.splitlines(keepends=True) if not RAY_STREAMED_LOG.match(line))
    return subprocess.CompletedProcess(args, code, out.out, err)


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 HTTP endpoint in-process (moto) on 127.0.0.1, with fake credentials in the environment.

    Started before Ray so that Ray's worker processes inherit AWS_ENDPOINT_URL and the credentials."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per S3 request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing-secret-key",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://{host}:{port}"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield env["AWS_ENDPOINT_URL"]
    server.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def bucket(s3_server, request) -> str:
    """A fresh bucket per test."""
    import uuid

    import boto3

    name = f"t-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return name


TEST_HEALTH_CHECK_INTERVAL_S = "0.1"  # RAY_TRAIN_HEALTH_CHECK_INTERVAL_S for runs whose pace no test measures


@pytest.fixture(scope="session")
def ray_local(s3_server):
    """One local Ray instance for every test that needs Ray (4 logical CPUs: see the Ray Data deadlock note)."""
    from gl_ray.ray_utils import ensure_ray

    # Ray Train's controller takes one report per health-check interval (gl-ray's default 0.5 s), which paces a
    # tiny run's steps; at 0.1 s a 16-step run trains in ~2 s instead of ~8 s with the same losses. Only the
    # session's Ray gets it: subprocesses and clusters that tests start keep the user-facing default.
    old = os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S")
    os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = TEST_HEALTH_CHECK_INTERVAL_S
    try:
        ensure_ray(None, num_cpus=4)  # before anything imports ray: see ensure_ray on loopback
    finally:
        if old is None:
            os.environ.pop("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S")
        else:
            os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = old
    import ray

    yield ray
    ray.shutdown()


TINY_PREPARE = {"tokenizer": "train:1024", "val_fraction": 0.2, "shard_tokens": 60_000, "max_docs": 120,
                "unit_bytes": 300_000}


@pytest.fixture(scope="session")
def tiny_data(ray_local, tmp_path_factory) -> str:
    """A small dataset prepared from the stdlib corpus: ~120 documents, BPE vocab 1024, several units of shards
    written by parallel Ray Data tasks."""
    from gl_ray.data.prepare import prepare

    out = str(tmp_path_factory.mktemp("data") / "stdlib")
    prepare("stdlib", out, **TINY_PREPARE)
    return out


def tiny_overrides(data: str, storage: str, name: str, **extra) -> list[str]:
    """--set overrides for a seconds-long tiny run: two stages (32 -> 64), 1024 tokens per step."""
    sets = {
        "name": name, "data.path": data, "ray.storage_path": storage, "model.preset": "tiny",
        "model.max_position_embeddings": 128, "schedule.lengths": "[32,64]", "schedule.ratios": "[0.5,0.5]",
        "schedule.tokens_per_step": 1024, "schedule.budget_tokens": 16384, "train.micro_batch_tokens": 512,
        "train.log_every_steps": 1, "train.checkpoint_every_tokens": 4096, "train.eval_every_tokens": 8192,
        "train.keep_checkpoints": 10, "data.eval_tokens": 2048, "optim.warmup_tokens": 2048, "optim.lr": 3e-3,
        "ray.num_workers": 0,
    }
    sets.update(extra)
    return [f"{k}={v}" for k, v in sets.items()]


def metrics(run: Path) -> list[dict]:
    """The lines of a run's metrics.jsonl."""
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def weights(run: Path) -> dict:
    """The exported final weights of a run."""
    from safetensors.torch import load_file

    return load_file(run / "final" / "model.safetensors")


def run_tiny(data, storage, name, **extra):
    """Train a tiny run (tiny_overrides + extra) in this process or on the shared Ray; returns (config, summary)."""
    from gl_ray.config import load_config
    from gl_ray.train.driver import launch_run

    cfg = load_config(None, tiny_overrides(data, str(storage), name, **extra))
    return cfg, launch_run(cfg, quiet=True)


@pytest.fixture(scope="session")
def baseline(tiny_data, tmp_path_factory):
    """An uninterrupted one-process tiny run (the reference for resume, DDP, FSDP and micro batch tests)."""
    storage = tmp_path_factory.mktemp("runs")
    cfg, summary = run_tiny(tiny_data, storage, "base")
    return cfg, summary, storage / "base"


MASKED = {"data.document_masking": True}  # document-masked tiny runs (extrapolate: DDP draws no PoSE per rank)


@pytest.fixture(scope="session")
def masked_baseline(tiny_data, tmp_path_factory):
    """An uninterrupted one-process tiny run with document masking."""
    storage = tmp_path_factory.mktemp("masked")
    cfg, summary = run_tiny(tiny_data, storage, "masked", **MASKED)
    return cfg, summary, storage / "masked"


def train_then_signal(sets: list[str], log: Path, lines: int, env: dict, timeout_s: float,
                      sig: int = signal.SIGKILL) -> subprocess.CompletedProcess:
    """Run `gl-ray train` (sets: its arguments) in a subprocess and send it `sig` once its metrics.jsonl `log` has
    `lines` lines (or after `timeout_s`): SIGKILL as an OOM killer or a lost session would, SIGTERM as a spot
    reclaim or a scheduler would. Returns its exit code and output once it has ended."""
    import tempfile

    # files, not pipes: Ray's processes that a killed driver leaves behind for a while would hold a pipe open
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([sys.executable, "-m", "gl_ray", "train", *sets], cwd=REPO, env=env, stdout=out,
                                stderr=err, text=True)
        deadline = time.time() + timeout_s
        while time.time() < deadline and not (log.exists() and len(log.read_text().splitlines()) >= lines):
            time.sleep(0.05)
        proc.send_signal(sig)
        proc.wait(timeout=timeout_s)
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out.read(), err.read())
