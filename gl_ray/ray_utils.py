"""Connecting to Ray: join a cluster when one is named, else start a small local one on 127.0.0.1."""

from __future__ import annotations

import logging
import os
import re
import socket
import sys
import time
import warnings

from gl_ray.errors import UserError

# gl-ray turns Ray Data's progress bars off on purpose (they garble logs); Ray then warns once per process that
# they are off, under this logger, which gl-ray quiets.
RAY_DATA_PROGRESS_LOGGER = "ray.data._internal.progress"


def ensure_ray(address: str | None = None, num_cpus: int = 0, *, verbose: bool = True,
               resources: dict[str, float] | None = None) -> None:
    """Join `address` (or RAY_ADDRESS); without either, start a local instance of its own (address "local": the
    address file that any Ray head leaves in Ray's temp folder, stale after the head died or naming a foreign
    cluster, is never read).

    A local instance gets at least 4 logical CPUs: with only as many as train workers, Ray Data's read tasks
    never get a CPU and the run hangs (Ray 2.60 on a 2-core machine).
    verbose=False: Ray's INFO lines in this process are off (`quiet_ray_info`), ray.init's banner included.
    resources: custom resources of a local instance (ray.worker_resources for every worker); a cluster has its own.
    """
    address = address or os.environ.get("RAY_ADDRESS") or None
    if not address and "ray" not in sys.modules:
        # Ray resolves 127.0.0.1 to the machine's address; in its single-node mode (read once, when ray is first
        # imported) it keeps a local cluster on loopback, so nothing it starts listens on the network.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    if not verbose:
        quiet_ray_info()
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    logging.getLogger(RAY_DATA_PROGRESS_LOGGER).setLevel(logging.ERROR)
    if not address:
        # a local instance gl-ray starts itself: Ray's notice that it turned token auth on reads as a problem to a
        # newcomer (auth stays on), and no spot node will ever be reclaimed under it, so Ray Train's preemption
        # watcher (which logs a core_worker error line at start) has nothing to watch
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    # Ray Train's controller takes a worker's report every health-check interval (2 s by default), and a report
    # blocks until the one before it was taken: with reports closer than that, training stalls. 0.5 s is cheap.
    env = {"RAY_DATA_DISABLE_PROGRESS_BARS": "1",
           "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")}
    level = {} if verbose else {"logging_level": logging.WARNING}  # ray.init sets the `ray` logger's level again
    if address:
        check_address(address)  # one line for a cluster that is not there or not Ray's, not a hang or a traceback
        # inside `ray job submit`, Ray refuses env vars that the job's runtime env sets too: leave those to it
        env = {k: v for k, v in env.items() if k not in _job_env_vars()}
        ray.init(address=address, log_to_driver=True, runtime_env={"env_vars": env} if env else None, **level)
        return
    env["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] = os.environ["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"]
    ray.init(address="local", num_cpus=max(4, num_cpus), resources=resources or None, include_dashboard=False,
             log_to_driver=True, **level,
             runtime_env={"env_vars": env, "worker_process_setup_hook": "gl_ray.ray_utils.quiet_local_worker"})


GCS_PORT = 6379  # Ray's default GCS port: what --address takes (HOST:6379)
# An HTTP/2 client preface and an empty SETTINGS frame: Ray's GCS is a gRPC (HTTP/2) server and answers with its
# own SETTINGS frame; an HTTP/1 server (the dashboard, a web app) answers "HTTP/1.1 4xx/5xx" or closes.
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
FIX_ADDRESS = "start the cluster (`ray start --head`) or fix --address / ray.address / RAY_ADDRESS"


def check_address(address: str | None, timeout_s: float = 3.0) -> None:
    """A configured Ray address (or RAY_ADDRESS) must name a running Ray cluster before anything is written; else
    one UserError line (ray.init would retry for minutes, or end in a traceback).

    No address and "local" (a local instance of gl-ray's own) pass; "auto" is resolved as ray.init resolves it
    (RAY_ADDRESS, the address file of `ray start`, a GCS process on this machine). HOST:PORT must accept a TCP
    connection within timeout_s and answer an HTTP/2 handshake as Ray's GCS (gRPC) does, within timeout_s more
    (with RAY_USE_TLS the connection alone is checked). ray:// (Ray Client) and http(s):// (the dashboard's jobs
    API) are refused with what to use instead: gl-ray's driver runs on the cluster."""
    address = address or os.environ.get("RAY_ADDRESS") or ""
    if address in ("", "local"):
        return
    named = address
    if address == "auto":
        address = _auto_address()
    host, port = parse_address(address, named)
    try:
        sock = socket.create_connection((host, port), timeout=timeout_s)
    except OSError as e:
        reason = f"no answer within {timeout_s:g} s" if isinstance(e, TimeoutError) else (e.strerror or str(e))
        raise UserError(f"Ray address {named!r} does not answer ({reason.lower()}); {FIX_ADDRESS}") from None
    with sock:
        if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
            return  # the GCS speaks TLS: a plain handshake would fail, the connection is the check
        why = _not_gcs(sock, timeout_s)
    if why:
        raise UserError(f"Ray address {named!r} {why}, not a Ray cluster's GCS (gRPC): --address takes the GCS "
                        f"address HOST:PORT (port {GCS_PORT} by default; the dashboard's jobs API, port 8265, takes "
                        "`ray job submit --address http://HOST:8265 -- gl-ray ...`)")


def parse_address(address: str, named: str | None = None) -> tuple[str, int]:
    """HOST:PORT or [IPV6]:PORT as (host, port); UserError naming `named` (the address as given) otherwise, and
    what to use instead of a ray:// (Ray Client) or http(s):// (dashboard) address."""
    named = named or address
    scheme, sep, _ = address.partition("://")
    if sep and scheme == "ray":
        raise UserError(f"Ray address {named!r} is a Ray Client address (ray://), which gl-ray does not use: its "
                        "driver reads the dataset and writes the run on the cluster. Submit the command as a job "
                        "(`ray job submit --address http://HEAD:8265 -- gl-ray ...`, the job finds its cluster), or "
                        f"on a cluster node pass the GCS address HEAD:{GCS_PORT}")
    if sep and scheme in ("http", "https"):
        raise UserError(f"Ray address {named!r} is the dashboard's (the jobs API); --address takes the GCS address "
                        f"HOST:PORT (port {GCS_PORT} by default). To run on that cluster from here: "
                        f"`ray job submit --address {address} -- gl-ray ...`")
    m = re.fullmatch(r"\[([^\[\]\s/]+)\]:(\d{1,5})|([A-Za-z0-9._-]+):(\d{1,5})", address)
    port = int(m[2] or m[4]) if m else 0
    if not 0 < port < 65536:
        raise UserError(f"Ray address {named!r} is not HOST:PORT (e.g. 10.0.0.5:{GCS_PORT}, [::1]:{GCS_PORT}), "
                        "auto or local; fix --address / ray.address / RAY_ADDRESS")
    return m[1] or m[3], port


def _auto_address() -> str:
    """The cluster address ray.init("auto") would join (Ray's own lookup); UserError if there is none."""
    from ray._private.services import get_ray_address_from_environment

    try:
        found = get_ray_address_from_environment("auto", None)
    except ConnectionError:  # no address file and no GCS process
        found = None
    if not found or found == "auto":
        raise UserError("Ray address 'auto': no running Ray cluster was found on this machine (no address file of "
                        "`ray start` in Ray's temp folder, no GCS process); start one with `ray start --head`, or "
                        "give its address HOST:PORT")
    return found


def _not_gcs(sock: socket.socket, timeout_s: float) -> str | None:
    """Why the server on `sock` is not a gRPC (HTTP/2) server, or None if it answers the HTTP/2 preface with a
    SETTINGS frame (type 4 on stream 0) as Ray's GCS does."""
    deadline = time.monotonic() + timeout_s
    reply = b""
    try:
        sock.sendall(H2_PREFACE)
        while len(reply) < 9:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            chunk = sock.recv(9 - len(reply))
            if not chunk:
                break
            reply += chunk
    except TimeoutError:
        return f"accepted a connection but did not answer a gRPC handshake within {timeout_s:g} s"
    except OSError:
        pass  # reset: judged by what came before it
    if len(reply) == 9 and reply[3] == 4 and reply[5:] == bytes(4):
        return None
    if reply.startswith((b"HTTP/", b"<")):  # a status line, or a page without one (an HTTP/0.9-style error)
        return "is an HTTP/1 server (it answered the handshake with an HTTP response)"
    return f"answered {reply!r}" if reply else "closed the connection without answering a gRPC handshake"


def refuse_unused_address(flag_value: str | None, config_value: str, *, no_ray: str, use_ray: str) -> None:
    """--address (or ray.address) where the command runs without Ray (`no_ray`: the setting that says so;
    `use_ray`: what would use the cluster) would be ignored: one UserError line instead, since the user asked for
    a cluster. RAY_ADDRESS (which `ray job submit` sets) is not one."""
    name, value = ("--address", flag_value) if flag_value else ("ray.address", config_value)
    if value:
        raise UserError(f"{name} {value!r} asks for a Ray cluster, but with {no_ray} this runs in one process "
                        f"without Ray; drop {name}, or {use_ray} to run on the cluster")


def quiet_ray_info() -> None:
    """Ray's INFO lines off in this process, its warnings and errors kept: the `ray` logger's, and Ray Data's
    (which sets its own level: an execution plan and a finish line per dataset run here)."""
    import ray.data  # noqa: F401  # it sets its logger's level on import: import first, then override

    logging.getLogger("ray").setLevel(logging.WARNING)
    logging.getLogger("ray.data").setLevel(logging.WARNING)


def quiet_local_worker() -> None:
    """Setup hook of every worker process of a local instance that gl-ray starts (which has no dashboard).

    Ray Train's PlacementGroupCleaner asks the State API, which the dashboard serves, whether the controller is
    alive; without a dashboard it logs a warning every second for the whole run. It only matters when a controller
    dies and its cluster lives on; a local instance ends with its driver, so the warning is noise here."""
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)
    # Ray Train's own DatasetManager sets an ExecutionOptions field that Ray Data deprecated: not gl-ray's to fix
    warnings.filterwarnings("ignore", message=r".*exclude_resources.* is deprecated")


def _job_env_vars() -> set[str]:
    """Env var names set by the runtime env of the Ray job this driver runs in (empty outside a job)."""
    import json

    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR

    raw = os.environ.get(RAY_JOB_CONFIG_JSON_ENV_VAR)
    if not raw:
        return set()
    return set((json.loads(raw).get("runtime_env") or {}).get("env_vars") or {})
