"""Preemption: SIGTERM (a spot reclaim, `kill`, a scheduler, `ray job stop`) ends the current optimizer step,
writes a checkpoint at it and stops the run with one line and exit code 143; the same command resumes from there.

The driver's SIGTERM handler marks the request twice: in this process (a run without Ray trains here) and as a
file RUN/.gl-ray.stop that Ray workers look for between steps (at most every CHECK_EVERY_S). Every worker then
agrees on the same step (a sum over workers) and they checkpoint together. The next run of the run removes the
file before it starts.
"""

from __future__ import annotations

import signal
import threading
import time

from gl_ray import storage
from gl_ray.errors import UserError

STOP_FILE = ".gl-ray.stop"
CHECK_EVERY_S = 2.0
_requested = threading.Event()


class Preempted(UserError):
    """The run stopped on request after checkpointing; rerun the same command to resume."""

    exit_code = 143  # 128 + SIGTERM, what a shell reports for a process ended by it


def install(run_uri: str):
    """In the driver (main thread): on SIGTERM, ask the run to stop at the end of its current step. Returns the
    handler it replaced (for restore), or None where signals cannot be caught (not the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def on_term(signum, frame) -> None:
        _requested.set()
        try:
            storage.write_bytes(storage.join(run_uri, STOP_FILE), b"SIGTERM\n")
        except UserError:
            pass  # the in-process flag still stops a run without Ray

    return signal.signal(signal.SIGTERM, on_term)


def restore(previous) -> None:
    if previous is not None:
        signal.signal(signal.SIGTERM, previous)


def clear(run_uri: str) -> None:
    """Forget a stop request (the driver, before a run starts)."""
    _requested.clear()
    storage.delete_file(storage.join(run_uri, STOP_FILE))


def was_requested(run_uri: str) -> bool:
    return _requested.is_set() or storage.exists(storage.join(run_uri, STOP_FILE))


class StopWatch:
    """Whether a stop was asked for: the in-process flag, or the run folder's stop file, read at most every
    CHECK_EVERY_S seconds (a storage read per step would cost an S3 request each)."""

    def __init__(self, run_uri: str):
        self.uri = storage.join(run_uri, STOP_FILE)
        self.next_check = 0.0
        self.seen = False

    def requested(self) -> bool:
        if _requested.is_set() or self.seen:
            return True
        now = time.monotonic()
        if now >= self.next_check:
            self.next_check = now + CHECK_EVERY_S
            self.seen = storage.exists(self.uri)
        return self.seen


def stopped_message(run_uri: str) -> str:
    from gl_ray.train.checkpoint import list_checkpoints

    ckpts = list_checkpoints(run_uri)
    at = f"checkpointed at step {ckpts[-1][0]}" if ckpts else "no checkpoint yet"
    return f"stopped on SIGTERM, {at}; run the same command again to resume ({run_uri})"
