"""Local and S3 storage behind one small API (pyarrow.fs), with errors a user can act on.

A location is a local path or `s3://bucket/prefix`. S3 uses the usual AWS chain (env vars, profile, instance
role); `AWS_ENDPOINT_URL` points it at another endpoint (MinIO, moto). Credentials never enter messages.

    fs, path = resolve("s3://bucket/run")
    write_bytes("s3://bucket/run/summary.json", b"{}")
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import uuid
from collections.abc import Iterator
from pathlib import Path

import pyarrow.fs as pafs

from gl_ray.errors import UserError


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def s3_filesystem() -> pafs.S3FileSystem:
    kwargs: dict = {"region": os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        scheme, _, rest = endpoint.partition("://")
        kwargs.update(endpoint_override=rest or scheme, scheme=scheme if rest else "https")
    return pafs.S3FileSystem(**kwargs)


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it). Local paths become absolute."""
    if is_s3(uri):
        return s3_filesystem(), uri[len("s3://"):].rstrip("/")
    if "://" in uri:
        raise UserError(f"unsupported location scheme in {uri!r}; use a local path or s3://bucket/prefix")
    return pafs.LocalFileSystem(), str(Path(uri).expanduser().resolve())


def absolute(uri: str) -> str:
    """An s3:// URI as it is; a local path with `~` expanded, made absolute (workers do not share the driver's
    working directory, and a literal `~` folder is never what a user meant)."""
    return uri if is_s3(uri) else os.path.abspath(os.path.expanduser(uri))


def join(base: str, *parts: str) -> str:
    return posixpath.join(base.rstrip("/"), *parts) if is_s3(base) else str(Path(base, *parts))


def explain(uri: str, err: Exception) -> UserError:
    """Turn a storage exception into one line that names the location, never the credentials."""
    text = str(err)
    low = text.lower()
    compact = low.replace("_", "").replace(" ", "")  # pyarrow says INVALID_ACCESS_KEY_ID, S3 InvalidAccessKeyId
    if "nosuchbucket" in compact or "bucketdoesnotexist" in compact:
        return UserError(f"S3 bucket of {uri!r} does not exist; create it or fix the path")
    if any(k in compact for k in ("invalidaccesskeyid", "signaturedoesnotmatch", "accessdenied", "forbidden",
                                  "credentials", "expiredtoken", "invalidtoken")):
        return UserError(f"S3 refused access to {uri!r}: check AWS credentials (AWS_ACCESS_KEY_ID / profile / role)")
    if isinstance(err, PermissionError) or "permission denied" in low:
        return UserError(f"no permission to write or read {uri!r}")
    if isinstance(err, FileNotFoundError):
        return UserError(f"{uri!r} not found")
    first = text.splitlines()[0] if text else type(err).__name__
    return UserError(f"storage error at {uri!r}: {first}")


@contextlib.contextmanager
def errors_at(uri: str) -> Iterator[None]:
    """Turn a storage error (OSError) inside the block into the one-line UserError of `explain`."""
    try:
        yield
    except OSError as e:
        raise explain(uri, e) from None


def exists(uri: str) -> bool:
    fs, path = resolve(uri)
    with errors_at(uri):
        return fs.get_file_info(path).type != pafs.FileType.NotFound


def modified(uri: str) -> float | None:
    """Last modification time (seconds since the epoch) of a file, None if it does not exist."""
    fs, path = resolve(uri)
    with errors_at(uri):
        info = fs.get_file_info(path)
    return None if info.type == pafs.FileType.NotFound or info.mtime is None else info.mtime.timestamp()


def read_bytes(uri: str) -> bytes:
    fs, path = resolve(uri)
    with errors_at(uri), fs.open_input_stream(path, compression=None) as f:
        return f.read()


def read_json(uri: str) -> object:
    """A JSON file of gl-ray's (plan.json, summary.json, ...); UserError naming it if it is torn, not UTF-8 or
    not JSON (a disk that filled, a hand edit), instead of a traceback in whatever reads it."""
    try:
        return json.loads(read_bytes(uri))
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise UserError(f"{uri!r} is torn or not JSON ({str(e).splitlines()[0][:80]}); restore it or remove it "
                        "(a run rewrites plan.json when it starts and summary.json when it ends)") from None


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole object: atomic on local disk (temp file + rename), single PUT on S3."""
    fs, path = resolve(uri)
    with errors_at(uri):
        if is_s3(uri):
            with fs.open_output_stream(path, compression=None) as f:
                f.write(data)
            return
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        finally:  # a failed write (a full disk) leaves no partial file behind
            if os.path.exists(tmp):
                os.remove(tmp)


def delete_file(uri: str) -> None:
    fs, path = resolve(uri)
    with errors_at(uri):
        if fs.get_file_info(path).type != pafs.FileType.NotFound:
            fs.delete_file(path)


def delete_dir(uri: str) -> None:
    fs, path = resolve(uri)
    with errors_at(uri):
        if fs.get_file_info(path).type != pafs.FileType.NotFound:
            fs.delete_dir(path)


def move(src: str, dst: str) -> None:
    """Move a file or folder within one storage: a rename on local disk; on S3 each object is copied, then the
    source deleted (a kill between the two leaves both copies, never none)."""
    fs, src_path = resolve(src)
    _, dst_path = resolve(dst)
    with errors_at(src):
        if not is_s3(src):
            Path(dst_path).parent.mkdir(parents=True, exist_ok=True)
            fs.move(src_path, dst_path)
            return
        info = fs.get_file_info(src_path)
        files = [info] if info.type == pafs.FileType.File else \
            [i for i in fs.get_file_info(pafs.FileSelector(src_path, recursive=True)) if i.type == pafs.FileType.File]
        for f in files:
            fs.copy_file(f.path, dst_path + f.path[len(src_path):])
        (fs.delete_file if info.type == pafs.FileType.File else fs.delete_dir)(src_path)


def list_dir(uri: str) -> list[str]:
    """Names (not paths) directly under uri; empty if it does not exist."""
    fs, path = resolve(uri)
    with errors_at(uri):
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return sorted(posixpath.basename(i.path) for i in infos)


def check_writable(uri: str) -> None:
    """Fail early, with one line, if uri cannot be written (missing bucket, bad credentials, read-only disk)."""
    probe = join(uri, f".gl-ray-write-probe-{uuid.uuid4().hex[:8]}")
    fs, path = resolve(probe)
    with errors_at(uri):
        if not is_s3(uri):
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        with fs.open_output_stream(path, compression=None) as f:
            f.write(b"ok")
        fs.delete_file(path)
