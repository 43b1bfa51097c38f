"""Connecting to Ray: join a cluster when one is named, else start a small local one on 127.0.0.1."""

from __future__ import annotations

import logging
import os
import socket
import sys
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
        # inside `ray job submit`, Ray refuses env vars that the job's runtime env sets too: leave those to it
        env = {k: v for k, v in env.items() if k not in _job_env_vars()}
        ray.init(address=address, log_to_driver=True, runtime_env={"env_vars": env} if env else None, **level)
        return
    env["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] = os.environ["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"]
    ray.init(address="local", num_cpus=max(4, num_cpus), resources=resources or None, include_dashboard=False,
             log_to_driver=True, **level,
             runtime_env={"env_vars": env, "worker_process_setup_hook": "gl_ray.ray_utils.quiet_local_worker"})


def check_address(address: str | None, timeout_s: float = 3.0) -> None:
    """A configured Ray address (or RAY_ADDRESS) must answer before anything is written: a TCP connect to its host
    and port within timeout_s, else one UserError line (ray.init would retry for minutes). No address, "local",
    "auto" (Ray's address file) and an address without a port are left to ray.init."""
    address = address or os.environ.get("RAY_ADDRESS") or ""
    hostport = address.split("://", 1)[-1].split("/", 1)[0]
    host, _, port = hostport.rpartition(":")
    if address in ("", "local", "auto") or not host or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as e:
        reason = f"no answer within {timeout_s:g} s" if isinstance(e, TimeoutError) else (e.strerror or str(e))
        raise UserError(f"Ray address {address!r} does not answer ({reason.lower()}); start the "
                        "cluster (`ray start --head`) or fix ray.address / --address / RAY_ADDRESS") from None


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
