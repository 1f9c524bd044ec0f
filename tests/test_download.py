"""digitkit.download against a real HTTP server on 127.0.0.1 serving small synthetic IDX files.

No urllib mocks: each test starts a ThreadingHTTPServer on an ephemeral port. Folders under its root act as
separate mirrors; a few path prefixes make it misbehave (slow, stalled, short body, HTTP 500).
"""

from __future__ import annotations

import gzip
import shutil
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from digitkit import download, idx
from digitkit.errors import DataError

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Server:
    root: Path
    base: str  # "http://127.0.0.1:<port>/"
    requests: list[str] = field(default_factory=list)

    def publish(self, mirror: str, name: str, blob: bytes) -> None:
        (self.root / mirror).mkdir(parents=True, exist_ok=True)
        (self.root / mirror / f"{name}.gz").write_bytes(blob)

    def hits(self, mirror: str) -> int:
        return sum(p.startswith(f"/{mirror}/") for p in self.requests)


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    # A proxy from the environment would send test traffic off this machine.
    for var in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "*")
    root = tmp_path / "www"
    root.mkdir()
    requests: list[str] = []
    lock = threading.Lock()
    release = threading.Event()  # set at teardown so stalled handlers end with the test

    class Handler(SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(root), **kwargs)

        def do_GET(self) -> None:
            with lock:
                requests.append(self.path)
            if self.path.startswith("/slow/"):  # never sends a status line
                release.wait(10)
            elif self.path.startswith("/stall/"):  # headers and a little body, then nothing
                self.send_response(200)
                self.send_header("Content-Length", "100000")
                self.end_headers()
                self.wfile.write(b"\x1f\x8b" + b"\0" * 100)
                self.wfile.flush()
                release.wait(10)
            elif self.path.startswith("/short/"):  # promises more than it sends, then hangs up
                self.send_response(200)
                self.send_header("Content-Length", "100000")
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(b"\x1f\x8b" + b"\0" * 100)
                self.close_connection = True
            elif self.path.startswith("/error500/"):
                self.send_error(500)
            else:
                super().do_GET()

        def log_message(self, *args) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield Server(root, f"http://127.0.0.1:{httpd.server_address[1]}/", requests)
    finally:
        release.set()
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


def _raw(seed: int, n: int = 6) -> bytes:
    rng = np.random.default_rng(seed)
    return idx.encode(rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))


def _gz(raw: bytes) -> bytes:
    return gzip.compress(raw, mtime=0)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fetch(server: Server, cache: Path, mirrors: list[str], raw: bytes, **kw) -> Path:
    return download.fetch("x-idx3-ubyte", idx.sha256(raw), [server.base + m for m in mirrors], cache, **kw)


def test_download_mnist_fills_cache_and_dest_dir(server: Server, tmp_path: Path):
    raws = {"a-images-idx3-ubyte": _raw(1), "a-labels-idx1-ubyte": idx.encode(np.arange(6, dtype=np.uint8))}
    for name, raw in raws.items():
        server.publish("m1", name, _gz(raw))
    files = {name: idx.sha256(raw) for name, raw in raws.items()}
    calls: list[tuple[str, int, int | None]] = []

    dest = download.download_mnist(
        tmp_path / "dest",
        mirrors=(server.base + "m1/",),
        cache_dir=tmp_path / "cache",
        timeout_s=5,
        progress=lambda *a: calls.append(a),
        files=files,
    )

    assert dest == tmp_path / "dest"
    for name, raw in raws.items():
        assert idx.read_bytes(dest / f"{name}.gz") == raw
        assert (tmp_path / "cache" / f"{name}.gz").read_bytes() == _gz(raw)
        sizes = [c for c in calls if c[0] == name]
        assert sizes[-1] == (name, len(_gz(raw)), len(_gz(raw)))  # the bar reaches the total
    # sha256sum format, and each line checks out against the file next to it.
    lines = (dest / "SHA256SUMS.raw").read_text().splitlines()
    assert lines == [f"{files[n]}  {n}" for n in raws]
    for line in lines:
        hexdigest, name = line.split("  ")
        assert idx.sha256(idx.read_bytes(dest / f"{name}.gz")) == hexdigest
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == sorted(f"{n}.gz" for n in raws)


def test_second_download_uses_the_cache_without_any_request(server: Server, tmp_path: Path):
    raw = _raw(2)
    server.publish("m1", "x-idx3-ubyte", _gz(raw))
    files = {"x-idx3-ubyte": idx.sha256(raw)}
    mirrors = (server.base + "m1/",)
    download.download_mnist(tmp_path / "d1", mirrors=mirrors, cache_dir=tmp_path / "cache", files=files)
    assert len(server.requests) == 1

    download.download_mnist(tmp_path / "d2", mirrors=mirrors, cache_dir=tmp_path / "cache", files=files)

    assert len(server.requests) == 1
    assert idx.read_bytes(tmp_path / "d2" / "x-idx3-ubyte.gz") == raw


def _flipped(blob: bytes) -> bytes:
    b = bytearray(blob)
    for i in range(len(b) // 2, len(b) // 2 + 8):
        b[i] ^= 0xFF
    return bytes(b)


BAD_COPIES = {
    "flipped bytes": lambda raw: _flipped(_gz(raw)),
    "other contents": lambda raw: _gz(_raw(99)),
    "truncated gzip": lambda raw: _gz(raw)[: len(_gz(raw)) // 2],
    "not gzip": lambda raw: b"<html><body>Moved</body></html>",
    # Right contents, but the cache promises <name>.gz is gzip, so an uncompressed copy is refused.
    "uncompressed": lambda raw: raw,
    "404": None,
}


@pytest.mark.parametrize("kind", list(BAD_COPIES))
def test_bad_first_mirror_is_rejected_and_second_supplies_the_file(server: Server, tmp_path: Path, kind: str):
    raw = _raw(3)
    if BAD_COPIES[kind] is not None:
        server.publish("m1", "x-idx3-ubyte", BAD_COPIES[kind](raw))
    server.publish("m2", "x-idx3-ubyte", _gz(raw))

    path = _fetch(server, tmp_path / "cache", ["m1/", "m2/"], raw, timeout_s=5, retries=2)

    assert idx.read_bytes(path) == raw
    # A bad file is not transient: one request to mirror 1, no retries, and only the good file remains.
    assert server.hits("m1") == 1 and server.hits("m2") == 1
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["x-idx3-ubyte.gz"]


def test_every_mirror_failing_raises_an_error_naming_the_file_and_each_mirror(server: Server, tmp_path: Path):
    raw = _raw(4)
    server.publish("m2", "x-idx3-ubyte", _gz(raw)[:-20])
    server.publish("m3", "x-idx3-ubyte", _gz(_raw(5)))
    dead = f"http://127.0.0.1:{_closed_port()}/"
    mirrors = [server.base + "m1/", server.base + "m2/", server.base + "m3/", dead]
    cache = tmp_path / "cache"

    with pytest.raises(DataError) as e:
        download.fetch("x-idx3-ubyte", idx.sha256(raw), mirrors, cache, timeout_s=5, retries=0)

    msg = str(e.value)
    assert "x-idx3-ubyte.gz" in msg
    for mirror in mirrors:
        assert mirror + "x-idx3-ubyte.gz" in msg
    assert "HTTP 404" in msg and "truncated gzip" in msg and "checksum mismatch" in msg
    assert "cannot connect" in msg and "--data-dir" in msg
    assert list(cache.iterdir()) == []  # no temp files, no partial copies


def test_file_with_the_right_checksum_that_is_not_idx_is_rejected(server: Server, tmp_path: Path):
    junk = b"this is not an IDX file at all"
    server.publish("m1", "x-idx3-ubyte", _gz(junk))

    with pytest.raises(DataError, match="not an IDX file"):
        _fetch(server, tmp_path / "cache", ["m1/"], junk, timeout_s=5)

    assert list((tmp_path / "cache").iterdir()) == []


@pytest.mark.parametrize("damage", ["truncate", "flip", "replace"])
def test_cached_file_damaged_on_disk_is_detected_and_fetched_again(server: Server, tmp_path: Path, damage):
    raw = _raw(6)
    server.publish("m1", "x-idx3-ubyte", _gz(raw))
    path = _fetch(server, tmp_path / "cache", ["m1/"], raw, timeout_s=5)
    blob = path.read_bytes()
    path.write_bytes({"truncate": blob[:100], "flip": _flipped(blob), "replace": _gz(_raw(7))}[damage])

    again = _fetch(server, tmp_path / "cache", ["m1/"], raw, timeout_s=5)

    assert again == path and idx.read_bytes(again) == raw
    assert len(server.requests) == 2


def test_cache_hit_makes_no_request_even_when_mirrors_are_dead(server: Server, tmp_path: Path):
    raw = _raw(8)
    server.publish("m1", "x-idx3-ubyte", _gz(raw))
    _fetch(server, tmp_path / "cache", ["m1/"], raw, timeout_s=5)

    path = download.fetch(
        "x-idx3-ubyte",
        idx.sha256(raw),
        [f"http://127.0.0.1:{_closed_port()}/"],
        tmp_path / "cache",
        timeout_s=5,
    )

    assert idx.read_bytes(path) == raw
    assert len(server.requests) == 1


@pytest.mark.parametrize("prefix, reason", [("slow", "timed out"), ("stall", "timed out")])
def test_unresponsive_server_times_out_quickly_and_cleanly(server: Server, tmp_path: Path, prefix, reason):
    raw = _raw(9)
    start = time.monotonic()

    with pytest.raises(DataError, match=reason):
        _fetch(server, tmp_path / "cache", [f"{prefix}/"], raw, timeout_s=0.3, retries=1)

    assert time.monotonic() - start < 3
    assert server.hits(prefix) == 2  # a timeout is transient: retried once
    assert list((tmp_path / "cache").iterdir()) == []


def test_slow_mirror_falls_through_to_a_good_one(server: Server, tmp_path: Path):
    raw = _raw(10)
    server.publish("m2", "x-idx3-ubyte", _gz(raw))
    start = time.monotonic()

    path = _fetch(server, tmp_path / "cache", ["slow/", "m2/"], raw, timeout_s=0.3, retries=0)

    assert idx.read_bytes(path) == raw
    assert time.monotonic() - start < 3


@pytest.mark.parametrize("prefix, reason", [("error500", "HTTP 500"), ("short", "closed after")])
@pytest.mark.parametrize("retries", [0, 2])
def test_transient_failures_are_retried_then_reported(server: Server, tmp_path, prefix, reason, retries):
    with pytest.raises(DataError, match=reason):
        _fetch(server, tmp_path / "cache", [f"{prefix}/"], _raw(11), timeout_s=5, retries=retries)

    assert server.hits(prefix) == retries + 1
    assert list((tmp_path / "cache").iterdir()) == []


def test_mirror_without_trailing_slash_still_works(server: Server, tmp_path: Path):
    raw = _raw(12)
    server.publish("m1", "x-idx3-ubyte", _gz(raw))

    path = _fetch(server, tmp_path / "cache", ["m1"], raw, timeout_s=5)

    assert idx.read_bytes(path) == raw


def test_mnist_checksums_match_the_committed_data_and_a_real_file_downloads(server: Server, tmp_path: Path):
    sums = (REPO / "data" / "mnist" / "SHA256SUMS.raw").read_text().splitlines()
    assert download.MNIST_FILES == {name: hexdigest for hexdigest, name in (s.split() for s in sums)}
    assert all(m.endswith("/") for m in download.MNIST_MIRRORS) and len(download.MNIST_MIRRORS) >= 2
    name = "t10k-labels-idx1-ubyte"
    (server.root / "real").mkdir()
    shutil.copy(REPO / "data" / "mnist" / f"{name}.gz", server.root / "real" / f"{name}.gz")

    path = download.fetch(name, download.MNIST_FILES[name], [server.base + "real/"], tmp_path / "cache")

    labels = idx.read(path, download.MNIST_FILES[name])
    assert labels.shape == (10000,) and np.bincount(labels)[1] == 1135


def test_default_cache_dir_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setenv("DIGITKIT_CACHE", str(tmp_path / "mine"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert download.default_cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("DIGITKIT_CACHE")
    assert download.default_cache_dir() == tmp_path / "xdg" / "digitkit"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert download.default_cache_dir() == tmp_path / "home" / ".cache" / "digitkit"


def test_cli_data_download_against_a_local_mirror_gives_a_working_data_dir(server: Server, tmp_path: Path, capsys):
    from digitkit import data
    from digitkit.cli import main

    for name in download.MNIST_FILES:
        server.publish("mnist", name, (REPO / "data" / "mnist" / f"{name}.gz").read_bytes())
    # mirror 1 serves a corrupted copy of every file; the CLI must fall through to mirror 2
    for name in download.MNIST_FILES:
        server.publish("bad", name, _flipped((REPO / "data" / "mnist" / f"{name}.gz").read_bytes()))
    out, cache = tmp_path / "mnist-dl", tmp_path / "cache"
    code = main(["data", "download", "--out", str(out), "--cache-dir", str(cache),
                 "--mirror", server.base + "bad/", "--mirror", server.base + "mnist/"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert set(data.verify_dir(out).values()) == {"ok (sha256)"}
    assert data.load_split(out, "test").class_counts()[:3] == [980, 1135, 1032]
    code = main(["data", "download", "--out", str(tmp_path / "x"), "--mirror", server.base + "missing/",
                 "--cache-dir", str(tmp_path / "empty-cache"), "--timeout", "2"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("digitkit: error: ") and "missing/" in err
