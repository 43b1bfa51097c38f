"""One writer per folder: the driver holds a lock on its run folder from before it writes anything until it ends,
and `gl-ray prepare` one on its output.

    with run_lock("runs/tiny"):           # UserError naming the holder if another trainer has it
        ...
    with output_lock("data/stdlib"):      # the same for a dataset being prepared
        ...

Local folders: an OS file lock (flock) on RUN/.gl-ray.lock (a dataset: DEST.lock beside it, removed at the end),
released by the OS whatever way the holder dies, so a stale lock never blocks a rerun. s3:// runs and datasets: a
lease object .gl-ray.lease inside, with the holder and an expiry, renewed by a heartbeat thread; a lease whose holder
stopped renewing it (killed) expires after LEASE_S and is taken over.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from gl_ray import storage
from gl_ray.errors import UserError

LOCK_NAME = ".gl-ray.lock"
LEASE_NAME = ".gl-ray.lease"
LEASE_S = 60.0  # an s3 lease not renewed for this long is stale
RENEW_S = 15.0


def holder() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S"),
            "id": uuid.uuid4().hex}


def busy(run_uri: str, who: dict, what: str = "run {uri!r} is being trained") -> UserError:
    return UserError(f"{what.format(uri=run_uri)} by another gl-ray (pid {who.get('pid')} on {who.get('host')} "
                     f"since {who.get('since')}); wait for it to end or stop it, or use another name")


def is_held(run_uri: str) -> bool:
    """Whether a trainer holds the run now (what `gl-ray status` tells a running run from a stopped one by): the
    local flock taken by someone (tried without waiting, released at once), or an s3 lease not yet expired."""
    if storage.is_s3(run_uri):
        uri = storage.join(run_uri, LEASE_NAME)
        try:
            return storage.exists(uri) and json.loads(storage.read_bytes(uri)).get("expires", 0) > time.time()
        except ValueError:  # a lease being written: someone holds it
            return True
    import fcntl

    path = Path(storage.resolve(run_uri)[1]) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # releases the flock if this call took it


@contextlib.contextmanager
def run_lock(run_uri: str) -> Iterator[None]:
    if storage.is_s3(run_uri):
        with _s3_lease(run_uri):
            yield
        return
    # the folder resolved, not the lock file: a lock that is a symlink is refused, never followed
    with _flock(Path(storage.resolve(run_uri)[1]) / LOCK_NAME, run_uri):
        yield


@contextlib.contextmanager
def output_lock(out: str) -> Iterator[None]:
    """`gl-ray prepare`'s lock on its output: an s3 lease inside it, or a flock on DEST.lock beside a local DEST
    (its staging folder is renamed into place, so the lock cannot live inside), removed when the prepare ends."""
    what = "dataset {uri!r} is being written"
    if storage.is_s3(out):
        with _s3_lease(out, what):
            yield
        return
    path = Path(storage.resolve(out)[1]).resolve()
    path = path.with_name(path.name + ".lock")
    with _flock(path, out, what, remove=True):
        yield


@contextlib.contextmanager
def _flock(path: Path, uri: str, what: str = "run {uri!r} is being trained", remove: bool = False
           ) -> Iterator[None]:
    """Hold an exclusive flock on `path` (created if missing); `remove`: delete the file before releasing it."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_symlink():  # O_NOFOLLOW below refuses it too; this names it in one line
        raise UserError(f"lock file {str(path)!r} is a symbolic link; gl-ray never writes through one (its target "
                        "would be overwritten): remove the link")
    with storage.errors_at(str(path)):
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                who = json.loads(path.read_text() or "{}")
            except (OSError, json.JSONDecodeError):
                who = {}
            raise busy(uri, who, what) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder()).encode(), 0)
        try:
            yield
        finally:
            if remove:
                path.unlink(missing_ok=True)  # while still held: a later writer makes and locks a new file
    finally:
        os.close(fd)  # releases the flock


@contextlib.contextmanager
def _s3_lease(run_uri: str, what: str = "run {uri!r} is being trained") -> Iterator[None]:
    uri = storage.join(run_uri, LEASE_NAME)
    me = holder()
    if storage.exists(uri):
        try:
            other = json.loads(storage.read_bytes(uri))
        except json.JSONDecodeError:
            other = {}
        if other.get("expires", 0) > time.time() and other.get("id") != me["id"]:
            raise busy(run_uri, other, what)

    def write() -> None:
        storage.write_bytes(uri, json.dumps(me | {"expires": time.time() + LEASE_S}).encode())

    write()
    time.sleep(0.2)  # two trainers that wrote at once: the object holds one of them, the other backs off
    if json.loads(storage.read_bytes(uri)).get("id") != me["id"]:
        raise busy(run_uri, json.loads(storage.read_bytes(uri)), what)
    stop = threading.Event()

    def heartbeat() -> None:
        while not stop.wait(RENEW_S):
            with contextlib.suppress(Exception):  # a missed renewal is retried; the lease outlasts a few
                write()

    thread = threading.Thread(target=heartbeat, name="gl-ray-lease", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        with contextlib.suppress(Exception):
            storage.delete_file(uri)
