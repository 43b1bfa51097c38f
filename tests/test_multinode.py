"""Several Ray nodes on one machine: a head on 127.0.0.1 and worker nodes on 127.0.0.2, .3, ..., each worker node
with one `node_slot`, so that each train worker runs on a node of its own; data and runs in the local S3 server.
A `ray job submit` run (FSDP) loses a worker node without notice, gets a new one and goes on from the bucket's
last checkpoint; an elastic `gl-ray train --address` run (DDP) gets a preemption notice, checkpoints, goes on with
one worker, grows back to two when a node joins, then loses a node without notice; all with the losses of an
uninterrupted run (issue 26). A one-node cluster's job that fails and is submitted again: test_cluster_job.py.
"""

import datetime
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from conftest import agent_ports, aws_env, free_port, job_logs, job_status, metrics, submit_job, tiny_overrides

from gl_ray import storage
from gl_ray.status import format_status, run_status
from gl_ray.train.outputs import read_metrics, read_starts

REPO = Path(__file__).resolve().parents[1]
BIN = Path(os.sys.executable).parent

pytestmark = pytest.mark.slow


class LocalCluster:
    """`ray start` nodes of one cluster of its own (not the test session's Ray), each a raylet with its own
    processes; a node is killed by SIGKILL to every process its `ray start` left running and their children."""

    def __init__(self, temp_dir: Path):
        self.temp_dir, self.port, self.dashboard_port = temp_dir, free_port(), free_port()
        self.env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_AUTH_MODE": "token",
                    # the session's Ray keeps to one node on loopback (gl_ray.ray_utils.ensure_ray); this one has more
                    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1",
                    # the GCS declares a killed node dead after 2 failed health checks 1 s apart, not 5 checks 3 s
                    # apart (Ray's default: 15 s); a live node still has each check's 10 s timeout to answer
                    "RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "2"}
        self.env.pop("RAY_ADDRESS", None)
        self.env.pop("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", None)  # off in the session's own local Ray: on here
        self.added = 0  # worker nodes started so far
        self.nodes: dict[str, list[int]] = {}  # each live worker node's address: the processes its `ray start` left

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def _start(self, args: list[str], ip: str = "127.0.0.1") -> list[int]:
        import ray  # noqa: F401  (psutil is vendored by Ray)
        import psutil

        before = set(psutil.pids())
        r = subprocess.run([str(BIN / "ray"), "start", *args, f"--node-ip-address={ip}", *agent_ports(),
                            "--disable-usage-stats"], env=self.env, capture_output=True, text=True, timeout=180)
        assert r.returncode == 0, r.stderr[-3000:]
        roots = []
        for pid in set(psutil.pids()) - before:  # what this `ray start` left running: its raylet, log monitor ...
            try:
                p = psutil.Process(pid)
                if p.ppid() == 1 and str(self.temp_dir) in " ".join(p.cmdline()):
                    roots.append(pid)
            except psutil.Error:
                continue
        return roots

    def start_head(self, num_cpus: int) -> None:
        self._start(["--head", f"--num-cpus={num_cpus}", f"--port={self.port}",
                     f"--dashboard-port={self.dashboard_port}", "--dashboard-host=127.0.0.1",
                     f"--temp-dir={self.temp_dir}"])

    def add_node(self, num_cpus: int, resources: dict) -> str:
        """A worker node on an address of its own (127.0.0.2, .3, ...: all loopback); returns that address. On one
        shared address a driver joins any node's raylet, and a driver attached to the node that dies loses its
        connection."""
        self.added += 1
        ip = f"127.0.0.{1 + self.added}"
        # a temp dir of its own, as a machine of its own has: in the head's, a joining node's runtime-env agent
        # unpacks the job's working_dir over the folder that live workers of other nodes run in (their cwd gone,
        # a Ray Data task's imports fail: FileNotFoundError from os.getcwd)
        self.nodes[ip] = self._start([f"--address=127.0.0.1:{self.port}", f"--num-cpus={num_cpus}",
                                      f"--resources={json.dumps(resources)}",
                                      f"--temp-dir={self.temp_dir / f'n{self.added}'}"], ip=ip)
        return ip

    def node_ip(self, node_id: str) -> str:
        """The address of the node with this Ray node id."""
        r = subprocess.run([str(BIN / "ray"), "list", "nodes", "--address", f"127.0.0.1:{self.port}", "--format",
                            "json"], env=self.env, capture_output=True, text=True, timeout=60)
        return next(n["node_ip"] for n in json.loads(r.stdout) if n["node_id"] == node_id)

    def drain(self, node_id: str, deadline_s: int) -> None:
        """A preemption notice, as a cloud's spot reclaim sends it through the autoscaler."""
        r = subprocess.run([str(BIN / "ray"), "drain-node", "--address", f"127.0.0.1:{self.port}", "--node-id",
                            node_id, "--reason", "DRAIN_NODE_REASON_PREEMPTION", "--reason-message", "spot reclaim",
                            f"--deadline-remaining-seconds={deadline_s}"], env=self.env, capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 0, r.stderr[-2000:]

    def kill_node(self, ip: str) -> None:
        import ray  # noqa: F401
        import psutil

        procs = []
        for pid in self.nodes.pop(ip):
            try:
                root = psutil.Process(pid)
                procs += [root, *root.children(recursive=True)]  # the raylet's agents and Ray workers
            except psutil.Error:
                continue
        for p in procs:
            try:
                p.send_signal(signal.SIGKILL)
            except psutil.Error:
                pass

    def stop(self) -> None:
        subprocess.run(["pkill", "-9", "-f", str(self.temp_dir)], check=False)
        time.sleep(1)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def local_cluster(s3_server):
    """A head with 2 CPUs (for Ray Data and the job; no train worker fits there) and two worker nodes with 1 CPU
    and one node_slot each."""
    cluster = LocalCluster(Path("/tmp") / f"glray-{uuid.uuid4().hex[:8]}")
    try:
        cluster.start_head(num_cpus=2)
        for _ in range(2):
            cluster.add_node(1, {"node_slot": 1})
        yield cluster
    finally:
        cluster.stop()


def wait_for(what: str, check, timeout_s: float, every_s: float = 0.5):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(every_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def upload(tiny_data: str, bucket: str) -> str:
    for p in Path(tiny_data).rglob("*"):
        if p.is_file():
            storage.write_bytes(f"s3://{bucket}/data/{p.relative_to(tiny_data)}", p.read_bytes())
    return f"s3://{bucket}/data"


ACROSS_NODES = {"ray.num_workers": 2, "ray.worker_resources": "{node_slot: 1}"}  # one train worker per node


def test_a_job_across_nodes_survives_losing_a_node(local_cluster, bucket, tiny_data, baseline):
    """`ray job submit` with FSDP over a worker per node and ray.max_failures: 1. One worker node dies without
    notice (every process it started) after the first checkpoint; the run waits for capacity, a new node joins,
    and Ray Train restarts the workers from the bucket's last sharded checkpoint: every step once, in all 16, with
    the losses of the session's uninterrupted one-process run; starts.jsonl / `gl-ray status` record the restart,
    and the job ends as soon as the run has (its progress relay lives on the driver's node, not on the lost one)."""
    cluster = local_cluster
    run = f"s3://{bucket}/runs/lose-a-node"
    # no --config: the defaults and these overrides, as the baseline was trained
    sets = tiny_overrides(upload(tiny_data, bucket), f"s3://{bucket}/runs", "lose-a-node", **ACROSS_NODES,
                          **{"ray.max_failures": 1, "ray.strategy": "fsdp"})
    sid = submit_job(cluster.dashboard, cluster.env, [x for s in sets for x in ("--set", s)],
                     aws_env() | {"GL_RAY_SLOW_STEP_S": "0.7"}, wait=False)

    def past_a_checkpoint():  # a checkpoint in the bucket and two more steps reported after it
        done = [int(n.split("-")[1]) for n in storage.list_dir(run) if n.startswith("checkpoint_step-")]
        steps = read_metrics(run)
        return done and steps and steps[-1]["step"] >= max(done) + 2 and steps[-1]["step"] < 14
    first = wait_for("the workers' start", lambda: storage.exists(f"{run}/plan.json") and read_starts(run), 240)
    assert len(first) == 1 and first[0]["world_size"] == 2 and first[0]["distinct_nodes"] == 2
    victim = cluster.node_ip(first[0]["nodes"][1])
    wait_for("a checkpoint and two steps after it", past_a_checkpoint, 240)
    cluster.kill_node(victim)
    killed_at = time.time()
    cluster.add_node(1, {"node_slot": 1})

    polls = itertools.count(1)

    def finished_or_ended():  # the summary, or the job over without one (then the test says why at once); the
        # job's status (a CLI that imports Ray: a core for seconds) every 20th poll only
        return storage.exists(f"{run}/summary.json") or (next(polls) % 20 == 0 and re.search(
            r"failed|stopped", job_status(cluster.dashboard, cluster.env, sid)))
    try:
        wait_for("the summary", finished_or_ended, 300, 0.5)
        assert storage.exists(f"{run}/summary.json"), "the job ended without a summary"
    except AssertionError as e:
        raise AssertionError(f"{e}\nstarts.jsonl: {records(run)}\nlast metrics: {read_metrics(run)[-2:]}\n"
                             f"the job's output:\n{job_logs(cluster.dashboard, cluster.env, sid, 6000)}") from None
    finished_at = time.time()
    ended = wait_for("the job's end", lambda: re.search(r"succeeded|failed|stopped",
                                                        job_status(cluster.dashboard, cluster.env, sid)), 60, 1)
    assert ended.group(0) == "succeeded", job_status(cluster.dashboard, cluster.env, sid)
    print(f"run finished -> job succeeded: {time.time() - finished_at:.1f} s")

    got = read_metrics(run)
    assert [m["step"] for m in got] == list(range(1, 17))  # nothing repeated or lost
    assert {m["world_size"] for m in got} == {2}  # every window, before and after the restart
    for a, b in zip(got, metrics(baseline[2]), strict=True):  # the same rows and updates as one process
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-4)
    starts = read_starts(run)
    assert len(starts) == 2
    again = starts[1]
    assert again["world_size"] == 2 and again["distinct_nodes"] == 2
    assert len(set(again["nodes"]) & set(first[0]["nodes"])) == 1  # the survivor, and the node that joined
    assert again["resumed_step"] >= 4 and again["steps_redone"] >= 2
    resumed_at = datetime.datetime.fromisoformat(again["time"]).timestamp()
    print(f"node lost -> workers restarted: {resumed_at - killed_at:.1f} s; steps redone: {again['steps_redone']}")
    assert storage.exists(f"{run}/final/model.safetensors")
    assert storage.read_json(f"{run}/checkpoint_step-{again['resumed_step']:07d}/state.json")["strategy"] == "fsdp"
    s = run_status(run)
    assert s["finished"] and (s["restarts"], s["world_size"], s["nodes"]) == (1, 2, 2)
    assert f"2 workers on 2 nodes, 1 restart, steps redone per restart: {again['steps_redone']}" in format_status(s)


def test_an_elastic_run_shrinks_on_a_preemption_notice_and_grows_back(local_cluster, bucket, tiny_data, baseline):
    """ray.num_workers: [1, 2] with a worker per node. A preemption notice (`ray drain-node`, reason preemption, 5 s
    deadline) on a worker's node: the workers checkpoint at the step they agree on and wait; at the deadline the
    node goes, Ray Train restarts the run on the one node left without redoing a step; a node joins and the run
    grows back to two workers; a node then dies without notice and the run goes on with the worker left. Every step
    once, with the losses of the one-process run whatever the world size."""
    cluster = local_cluster
    run = f"s3://{bucket}/runs/elastic"
    # ray.start_timeout_s 6: a start that waits for a node already gone (Ray Data's resource view lags up to 20 s)
    # gives up and tries again sooner; such retries are free (FailureConfig.controller_failure_limit: -1)
    sets = tiny_overrides(upload(tiny_data, bucket), f"s3://{bucket}/runs", "elastic",
                          **ACROSS_NODES | {"ray.num_workers": "[1,2]", "ray.resize_check_s": 2, "ray.max_failures": 1,
                                            "ray.start_timeout_s": 6, "ray.notice_poll_s": 1})
    driver = subprocess.Popen([sys.executable, "-m", "gl_ray", "train", "--address", f"127.0.0.1:{cluster.port}",
                               *[x for s in sets for x in ("--set", s)]], cwd=REPO,
                              env={**cluster.env, "GL_RAY_SLOW_STEP_S": "2.5"}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        wait_for("a step", lambda: storage.exists(f"{run}/metrics.jsonl") and read_metrics(run), 240)
        first = read_starts(run)[0]
        drained = first["nodes"][1]
        cluster.drain(drained, deadline_s=5)
        noticed = wait_for("the notice", lambda: [r for r in records(run) if "notice" in r], 60)[0]
        deadline = datetime.datetime.fromisoformat(noticed["deadline"]).timestamp()
        drained_ip = cluster.node_ip(drained)
        time.sleep(max(0.0, deadline - time.time()))
        cluster.kill_node(drained_ip)  # the cloud takes the node at its deadline
        wait_for("the restart on one node", lambda: len(read_starts(run)) >= 2, 180)

        def one_worker_checkpointed():  # so the windows the one worker trained stay in metrics.jsonl
            m = read_metrics(run)
            done = [int(n.split("-")[1]) for n in storage.list_dir(run) if n.startswith("checkpoint_step-")]
            return m and m[-1]["world_size"] == 1 and max(done) > noticed["step"]
        wait_for("a checkpoint of the one worker", one_worker_checkpointed, 120)
        cluster.add_node(1, {"node_slot": 1})
        joined_at = time.time()

        def two_workers_again():  # the regrown workers reported a step of their own
            starts, m = read_starts(run), read_metrics(run)
            return len(starts) >= 3 and m[-1]["world_size"] == 2 and m[-1]["step"] > starts[2]["resumed_step"]
        wait_for("two workers again", two_workers_again, 180)
        victim = cluster.node_ip(read_starts(run)[2]["nodes"][1])
        cluster.kill_node(victim)  # this time without notice
        lost_at = time.time()
        out, _ = driver.communicate(timeout=300)
    except BaseException:
        driver.kill()
        print(driver.communicate()[0][-8000:])
        raise
    finally:
        driver.kill()
    assert driver.returncode == 0, out[-5000:]

    got = read_metrics(run)
    assert [m["step"] for m in got] == list(range(1, 17))
    for a, b in zip(got, metrics(baseline[2]), strict=True):  # the same rows and updates at any world size
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-4)
    starts = read_starts(run)
    assert len(starts) == 4, (starts, out[-3000:])
    shrunk, grown, lost = starts[1:]
    assert (shrunk["world_size"], shrunk["steps_redone"]) == (1, 0)  # nothing after the notice's checkpoint
    assert shrunk["resumed_step"] == shrunk["notice_step"] == noticed["step"]
    assert grown["world_size"] == 2 and grown["distinct_nodes"] == 2
    assert lost["world_size"] == 1 and "notice_step" not in lost  # went on with the worker left
    assert {m["world_size"] for m in got} == {1, 2}
    at = {k: datetime.datetime.fromisoformat(v["time"]).timestamp() for k, v in (("shrunk", shrunk),
                                                                                ("grown", grown), ("lost", lost))}
    print(f"deadline -> restart on one node: {at['shrunk'] - deadline:.1f} s, 0 steps redone; node joined -> two "
          f"workers: {at['grown'] - joined_at:.1f} s, {grown['steps_redone']} steps redone; node lost without "
          f"notice -> one worker: {at['lost'] - lost_at:.1f} s, {lost['steps_redone']} steps redone")
    text = format_status(run_status(run))
    assert f"restart 1 followed a preemption notice at step {noticed['step']}: checkpointed there" in text
    assert "1 worker on 1 node, 3 restarts, steps redone per restart: 0, " in text


def records(run: str) -> list[dict]:
    """Every line of RUN/starts.jsonl (starts and notices)."""
    uri = f"{run}/starts.jsonl"
    return [json.loads(x) for x in storage.read_bytes(uri).decode().splitlines()] if storage.exists(uri) else []
