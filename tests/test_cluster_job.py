"""`ray job submit` end to end on a local cluster (127.0.0.1), with data and runs in the local S3 server:
the first job dies mid-run, the same job submitted again resumes from the bucket's checkpoint."""

import json
import os
import re
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from conftest import TEST_HEALTH_CHECK_INTERVAL_S, agent_ports, aws_env, free_port, submit_job, tiny_overrides

from gl_ray import storage

REPO = Path(__file__).resolve().parents[1]
BIN = Path(os.sys.executable).parent

pytestmark = pytest.mark.slow


@pytest.fixture
def local_cluster(s3_server, tmp_path):
    """A head node of its own (not the test session's Ray), stopped by killing its processes only."""
    temp_dir = Path("/tmp") / f"glray-{uuid.uuid4().hex[:8]}"
    port, dash = free_port(), free_port()
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_AUTH_MODE": "token"}
    env.pop("RAY_ADDRESS", None)
    r = subprocess.run([str(BIN / "ray"), "start", "--head", "--num-cpus=4", f"--port={port}",
                        f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1", "--node-ip-address=127.0.0.1",
                        *agent_ports(),
                        f"--temp-dir={temp_dir}", "--disable-usage-stats"], env=env, capture_output=True, text=True,
                       timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    try:
        yield f"http://127.0.0.1:{dash}", env
    finally:
        subprocess.run(["pkill", "-9", "-f", str(temp_dir)], check=False)
        time.sleep(1)
        shutil.rmtree(temp_dir, ignore_errors=True)


def submit(address: str, env: dict, args: list[str], extra_env: dict | None = None) -> str:
    """The output of a `ray job submit` that waits for the job: its logs, then its status line."""
    submit_job(address, env, args, extra_env)
    return submit_job.output


def test_job_submit_with_s3_runs_and_resume(local_cluster, s3_server, bucket, tiny_data):
    address, env = local_cluster
    for p in Path(tiny_data).rglob("*"):
        if p.is_file():
            storage.write_bytes(f"s3://{bucket}/data/{p.relative_to(tiny_data)}", p.read_bytes())
    sets = tiny_overrides(f"s3://{bucket}/data", f"s3://{bucket}/runs", "job", **{"ray.num_workers": 2})
    args = [x for s in ["--config", "pipelines/configs/tiny-growlength.yaml"] for x in [s]] + \
        [x for s in sets for x in ("--set", s)]
    aws = aws_env() | {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": TEST_HEALTH_CHECK_INTERVAL_S}  # reports every 0.1 s
    out = submit(address, env, args, {**aws, "GL_RAY_FAIL_AT_STEP": "6"})
    assert re.search(r"Job '\S+' failed", out) and "injected failure" in out, out[-5000:]
    out = submit(address, env, args, aws)
    assert re.search(r"Job '\S+' succeeded", out), out[-5000:]
    run = f"s3://{bucket}/runs/job"
    steps = [json.loads(x)["step"] for x in storage.read_bytes(f"{run}/metrics.jsonl").decode().splitlines()]
    assert steps == list(range(1, 17))  # resumed from the bucket's checkpoint: nothing repeated or lost
    names = storage.list_dir(run)
    assert {"final", "summary.json", "config.yaml", "plan.json"} <= set(names)
    assert any(n.startswith("checkpoint_step-") for n in names)
    assert storage.exists(f"{run}/final/model.safetensors")
    assert json.loads(storage.read_bytes(f"{run}/summary.json"))["tokens"] == 16384
