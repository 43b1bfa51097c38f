"""Connecting to Ray: join a cluster when one is named, else start a small local one on 127.0.0.1."""

from __future__ import annotations

import os


def ensure_ray(address: str | None = None, num_cpus: int = 0) -> None:
    """Join `address` (or RAY_ADDRESS); without either, start a local instance.

    A local instance gets at least 4 logical CPUs: with only as many as train workers, Ray Data's read tasks
    never get a CPU and the run hangs (see shared RAY_NOTES).
    """
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    ray.init(num_cpus=max(4, num_cpus), include_dashboard=False, log_to_driver=True,
             runtime_env={"env_vars": {"RAY_DATA_DISABLE_PROGRESS_BARS": "1"}})
