"""gl_ray.ray_utils.check_address: a Ray address that is malformed, not there, or not Ray's is one line before
anything is written (issue 40, 6). Fake servers on ephemeral ports of 127.0.0.1; no Ray cluster is started."""

import contextlib
import http.server
import socket
import threading
import time

import pytest
from conftest import REPO, cli_inprocess

from gl_ray.errors import UserError
from gl_ray.ray_utils import check_address, parse_address

CONFIG = str(REPO / "pipelines" / "configs" / "tiny-growlength.yaml")
SETTINGS = b"\x00\x00\x06\x04\x00\x00\x00\x00\x00" + b"\x00\x03\x00\x00\x00\x64"  # a server's SETTINGS frame


@contextlib.contextmanager
def tcp_server(handle):
    """A TCP server on an ephemeral port of 127.0.0.1 that calls handle(conn) for each connection; yields
    "127.0.0.1:PORT"."""
    srv = socket.create_server(("127.0.0.1", 0))
    srv.settimeout(0.1)
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                continue
            with conn:
                handle(conn)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{srv.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(5)
        srv.close()


@contextlib.contextmanager
def http_server():
    """A plain HTTP/1 server (a web app, or Ray's dashboard) on an ephemeral port; yields "127.0.0.1:PORT"."""
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()
        srv.server_close()


def one_line_error(address, needle, **kw) -> float:
    """check_address(address) raises one UserError line holding `needle`; returns the seconds it took."""
    t0 = time.monotonic()
    with pytest.raises(UserError) as e:
        check_address(address, **kw)
    assert needle.lower() in str(e.value).lower() and "\n" not in str(e.value), str(e.value)
    return time.monotonic() - t0


def test_an_http_server_at_the_address_is_one_line_within_seconds(monkeypatch):
    """An open port that is not Ray's (an HTTP server: the TCP connect succeeds, and ray.init used to wait over
    60 s): the HTTP/2 handshake gets an HTTP/1 answer, so one line names it and what to use for the dashboard."""
    monkeypatch.delenv("RAY_USE_TLS", raising=False)
    with http_server() as address:
        assert one_line_error(address, "is an HTTP/1 server") < 3
        one_line_error(address, "ray job submit --address http://")


def test_servers_that_do_not_speak_grpc_are_one_line(monkeypatch):
    """A server that accepts and says nothing is refused after timeout_s; one that closes at once, or answers
    bytes that are not an HTTP/2 SETTINGS frame, at once."""
    monkeypatch.delenv("RAY_USE_TLS", raising=False)

    def silent(conn):
        conn.recv(1024)
        time.sleep(1.0)

    with tcp_server(silent) as address:
        assert one_line_error(address, "did not answer a gRPC handshake within 0.3 s", timeout_s=0.3) < 2
    with tcp_server(lambda conn: None) as address:
        assert one_line_error(address, "closed the connection") < 2
    with tcp_server(lambda conn: conn.sendall(b"SSH-2.0-OpenSSH_9.6\r\n")) as address:
        one_line_error(address, "answered b'SSH-2.0-O'")


def test_a_grpc_server_passes(monkeypatch):
    """A server that answers the HTTP/2 preface with a SETTINGS frame on stream 0, as Ray's GCS (a gRPC server)
    does, passes; with RAY_USE_TLS the TCP connection alone is checked (the GCS would expect a TLS handshake)."""
    monkeypatch.delenv("RAY_USE_TLS", raising=False)

    def grpc(conn):
        conn.recv(24 + 9)
        conn.sendall(SETTINGS)

    with tcp_server(grpc) as address:
        check_address(address)
    monkeypatch.setenv("RAY_USE_TLS", "1")
    with tcp_server(lambda conn: None) as address:
        check_address(address)


@pytest.mark.parametrize("address,needle", [
    ("::::", "is not HOST:PORT"),
    ("10.0.0.5", "is not HOST:PORT"),
    ("10.0.0.5:0", "is not HOST:PORT"),
    ("10.0.0.5:99999", "is not HOST:PORT"),
    ("10.0.0.5:6379/x", "is not HOST:PORT"),
    ("::1:6379", "is not HOST:PORT"),
    ("ftp://10.0.0.5:6379", "is not HOST:PORT"),
    ("http://127.0.0.1:8265", "ray job submit --address http://127.0.0.1:8265 -- gl-ray"),
    ("https://ray.example.com", "is the dashboard's"),
    ("ray://127.0.0.1:10001", "Ray Client address (ray://), which gl-ray does not use"),
])
def test_malformed_addresses_are_one_line(address, needle):
    """Addresses that ray.init rejects with a traceback (or, for ray:// and http://, that are not a GCS address)
    are one line naming the address and what to use instead; nothing is connected to."""
    with pytest.raises(UserError) as e:
        parse_address(address)
    assert needle.lower() in str(e.value).lower() and "\n" not in str(e.value), str(e.value)
    assert repr(address) in str(e.value)


def test_well_formed_addresses_parse():
    assert parse_address("10.0.0.5:6379") == ("10.0.0.5", 6379)
    assert parse_address("[::1]:6379") == ("::1", 6379)
    assert parse_address("head-node.example.com:6380") == ("head-node.example.com", 6380)


def test_auto_without_a_cluster_is_one_line(tmp_path, monkeypatch):
    """"auto" is resolved as ray.init resolves it (RAY_ADDRESS, the address file of `ray start` in Ray's temp
    folder, a GCS process on this machine) without starting Ray: none is one line; a stale address file (its head
    died) names the address that does not answer."""
    import ray._private.services as services

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    monkeypatch.setattr(services, "find_gcs_addresses", lambda: frozenset())  # the suite's own Ray runs here
    one_line_error("auto", "no running Ray cluster was found")
    monkeypatch.setenv("RAY_ADDRESS", "auto")
    one_line_error(None, "no running Ray cluster was found")
    monkeypatch.delenv("RAY_ADDRESS")
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "ray_current_cluster").write_text("127.0.0.1:1")
    one_line_error("auto", "Ray address 'auto' does not answer")


def test_a_bad_address_leaves_nothing_behind_in_train_and_prepare(tmp_path, capsys, monkeypatch):
    """From the command line: train and prepare with an HTTP server's address, a ray:// or http:// address, or
    "::::" exit 2 with one line before the run folder, DEST, DEST.partial or DEST.lock exist."""
    monkeypatch.delenv("RAY_USE_TLS", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with http_server() as web:
        for address, needle in [(web, "HTTP/1 server"), ("ray://127.0.0.1:10001", "Ray Client"),
                                ("http://127.0.0.1:8265", "dashboard"), ("::::", "not HOST:PORT")]:
            r = cli_inprocess(capsys, monkeypatch, "train", "--config", CONFIG, "--address", address,
                              "--set", f"data.path={tmp_path}/data", "--set", f"ray.storage_path={tmp_path}/runs",
                              "--set", "ray.num_workers=1")
            assert r.returncode == 2 and r.stderr.count("\n") == 1 and needle in r.stderr, r.stderr
            r = cli_inprocess(capsys, monkeypatch, "prepare", "--source", "stdlib", "--out", str(tmp_path / "ds"),
                              "--address", address)
            assert r.returncode == 2 and r.stderr.count("\n") == 1 and needle in r.stderr, r.stderr
    assert list(tmp_path.iterdir()) == []


def test_an_address_where_no_ray_runs_is_one_line(tmp_path, capsys, monkeypatch):
    """--address (or ray.address) with ray.num_workers=0 / --no-ray, prepare --no-ray or --max-docs, reproduce
    --workers 0: the run would ignore the cluster asked for; one line naming the setting, nothing written."""
    train = ["train", "--config", CONFIG, "--set", f"data.path={tmp_path}/data", "--set",
             f"ray.storage_path={tmp_path}/runs"]
    for args, needle in [
        ([*train, "--no-ray", "--address", "10.0.0.5:6379"], "--address '10.0.0.5:6379' asks for a Ray cluster, "
                                                              "but with --no-ray"),
        ([*train, "--set", "ray.num_workers=0", "--set", "ray.address=auto"], "ray.address 'auto' asks for a Ray "
                                                                              "cluster, but with ray.num_workers=0"),
        (["prepare", "--source", "stdlib", "--out", str(tmp_path / "ds"), "--no-ray", "--address", "auto"],
         "but with --no-ray"),
        (["prepare", "--source", "stdlib", "--out", str(tmp_path / "ds"), "--max-docs", "5", "--address", "auto"],
         "but with --max-docs"),
        (["reproduce", "--workers", "0", "--address", "auto", "--out", str(tmp_path / "res")], "--workers 0"),
    ]:
        r = cli_inprocess(capsys, monkeypatch, *args)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and needle in r.stderr, r.stderr
    assert list(tmp_path.iterdir()) == []
