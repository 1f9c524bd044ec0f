"""Download MNIST from public mirrors into a verified cache, then lay it out as a --data-dir.

A file enters the cache only after its *decompressed* bytes match the expected SHA-256 and parse as IDX:
the mirrors serve differently compressed .gz files with the same contents, so the compressed bytes
cannot be checked. Downloads stream into a temporary file in the cache folder and are moved into place
with os.replace, so a crash, Ctrl-C or bad mirror never leaves a half-written or unverified file behind.
This module prints nothing; `progress(name, bytes_so_far, total_or_None)` lets the CLI draw a bar.
"""

from __future__ import annotations

import http.client
import os
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import BinaryIO

from digitkit import idx
from digitkit.errors import DataError

# SHA-256 of the uncompressed IDX bytes (data/mnist/SHA256SUMS.raw), the same whatever the compression.
MNIST_FILES: dict[str, str] = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}

# Tried in order; each serves "<name>.gz". yann.lecun.com is last: it is slow and often refuses bots.
MNIST_MIRRORS: tuple[str, ...] = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)

Progress = Callable[[str, int, int | None], None]

_CHUNK_BYTES = 64 * 1024
_GZIP_MAGIC = b"\x1f\x8b"


class _MirrorFailed(Exception):
    """One attempt on one mirror failed; `transient` says whether trying the same mirror again may help."""

    def __init__(self, reason: str, transient: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.transient = transient


def default_cache_dir() -> Path:
    """$DIGITKIT_CACHE if set, else $XDG_CACHE_HOME/digitkit, else ~/.cache/digitkit."""
    if os.environ.get("DIGITKIT_CACHE"):
        return Path(os.environ["DIGITKIT_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    # The XDG spec says a relative XDG_CACHE_HOME is invalid and must be ignored.
    if xdg and Path(xdg).is_absolute():
        return Path(xdg) / "digitkit"
    return Path.home() / ".cache" / "digitkit"


def fetch(
    name: str,
    sha256_raw: str,
    mirrors: Sequence[str],
    cache_dir: Path,
    timeout_s: float = 30.0,
    retries: int = 1,
    progress: Progress | None = None,
) -> Path:
    """The path of a verified `cache_dir/<name>.gz`, downloading it only if the cache lacks a good copy.

    `sha256_raw` is the SHA-256 of the decompressed IDX bytes. Mirrors are base URLs tried in order.
    `timeout_s` bounds the connection and each read (not the whole transfer). `retries` is how many extra
    attempts a mirror gets after a transient failure (timeout, dropped connection, HTTP 5xx); a wrong
    checksum or HTTP 404 moves on to the next mirror at once. `progress` restarts from 0 on each attempt
    and is not called on a cache hit. Raises DataError naming every mirror and its failure if none works.
    """
    cache_dir = Path(cache_dir)
    sha256_raw = sha256_raw.lower()
    target = cache_dir / f"{name}.gz"
    if target.exists():
        if _problem(target, name, sha256_raw) is None:
            return target
        # A bad cached copy (disk error, interrupted tool, changed checksum) is replaced, never trusted.
        target.unlink()
    if retries < 0:
        raise ValueError(f"retries must be >= 0 (extra attempts per mirror), got {retries}")
    if not mirrors:
        raise DataError(f"cannot download {name}.gz: no mirrors given; pass at least one base URL")

    # A fresh opener per call reads the proxy settings now, not those of the first urlopen in the process.
    opener = urllib.request.build_opener()
    failures: list[str] = []
    for mirror in mirrors:
        url = (mirror if mirror.endswith("/") else mirror + "/") + f"{name}.gz"
        for attempt in range(retries + 1):
            try:
                _download_verified(opener, url, target, name, sha256_raw, timeout_s, progress)
                return target
            except _MirrorFailed as e:
                if not e.transient or attempt == retries:
                    tries = f" (after {attempt + 1} attempts)" if attempt else ""
                    failures.append(f"{url}: {e.reason}{tries}")
                    break
            except OSError as e:
                # Network errors became _MirrorFailed already; this is the cache folder itself.
                raise DataError(
                    f"{cache_dir}: cannot write the download cache ({e.strerror or e}); free disk space, "
                    "fix the folder's permissions, or set DIGITKIT_CACHE to another folder"
                ) from None
    raise DataError(
        f"cannot download {name}.gz: every mirror failed ({'; '.join(failures)}). "
        "Check the network connection (and proxy settings), or download the four MNIST .gz files by hand "
        "into one folder and pass --data-dir with that folder"
    )


def download_mnist(
    dest_dir: Path,
    mirrors: Sequence[str] = MNIST_MIRRORS,
    cache_dir: Path | None = None,
    timeout_s: float = 30.0,
    progress: Progress | None = None,
    files: Mapping[str, str] = MNIST_FILES,
) -> Path:
    """Fetch the MNIST files into the cache, then copy them and a SHA256SUMS.raw into `dest_dir`.

    `dest_dir` is then usable as --data-dir. Nothing is copied until every file is cached, so a failure
    leaves `dest_dir` untouched and the files already fetched stay cached for the next try.
    `files` maps names to raw SHA-256s; it exists so tests can use small files instead of MNIST.
    """
    dest_dir = Path(dest_dir)
    cache_dir = default_cache_dir() if cache_dir is None else Path(cache_dir)
    cached = {
        name: fetch(name, sha, mirrors, cache_dir, timeout_s=timeout_s, progress=progress)
        for name, sha in files.items()
    }
    for name, path in cached.items():
        idx.atomic_write_bytes(dest_dir / f"{name}.gz", path.read_bytes())
    sums = "".join(f"{sha.lower()}  {name}\n" for name, sha in files.items())
    idx.atomic_write_bytes(dest_dir / "SHA256SUMS.raw", sums.encode())
    return dest_dir


def _download_verified(
    opener: urllib.request.OpenerDirector,
    url: str,
    target: Path,
    name: str,
    sha256_raw: str,
    timeout_s: float,
    progress: Progress | None,
) -> None:
    """Stream `url` to a temp file next to `target`, verify it, then move it into place; else delete it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            _stream(opener, url, f, name, timeout_s, progress)
            f.flush()
            os.fsync(f.fileno())
        problem = _problem(tmp, name, sha256_raw)
        if problem is not None:
            # Same URL, same bytes: retrying a bad file cannot help, only another mirror can.
            raise _MirrorFailed(problem, transient=False)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _stream(
    opener: urllib.request.OpenerDirector,
    url: str,
    f: BinaryIO,
    name: str,
    timeout_s: float,
    progress: Progress | None,
) -> None:
    try:
        response = opener.open(url, timeout=timeout_s)
    except urllib.error.HTTPError as e:
        e.close()
        # 5xx, 408 and 429 are the server's passing trouble; other 4xx (404 above all) will not change.
        transient = e.code >= 500 or e.code in (408, 429)
        raise _MirrorFailed(f"HTTP {e.code} {e.reason}", transient=transient) from None
    except urllib.error.URLError as e:
        if isinstance(e.reason, TimeoutError):
            raise _MirrorFailed(f"timed out after {timeout_s:g} s", transient=True) from None
        raise _MirrorFailed(f"cannot connect ({e.reason})", transient=True) from None
    except ValueError as e:  # urllib's answer to a malformed URL
        raise _MirrorFailed(f"invalid URL ({e})", transient=False) from None
    except (http.client.HTTPException, OSError) as e:
        raise _MirrorFailed(_network_reason(e, timeout_s), transient=True) from None

    with response:
        length = response.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
        so_far = 0
        if progress is not None:
            progress(name, 0, total)
        while True:
            try:
                chunk = response.read(_CHUNK_BYTES)
            except (http.client.HTTPException, OSError) as e:
                raise _MirrorFailed(_network_reason(e, timeout_s), transient=True) from None
            if not chunk:
                break
            f.write(chunk)  # an OSError here is the cache disk's, so it is not caught as a mirror failure
            so_far += len(chunk)
            if progress is not None:
                progress(name, so_far, total)
    # http.client returns a short body without complaint when the server closes the connection early.
    if total is not None and so_far != total:
        raise _MirrorFailed(f"connection closed after {so_far} of {total} bytes", transient=True)


def _network_reason(e: BaseException, timeout_s: float) -> str:
    if isinstance(e, TimeoutError):
        return f"timed out after {timeout_s:g} s"
    return f"network error ({type(e).__name__}: {e})"


def _problem(path: Path, name: str, sha256_raw: str) -> str | None:
    """None if `path` is a gzip of IDX bytes with SHA-256 `sha256_raw`; otherwise what is wrong with it."""
    with open(path, "rb") as f:
        head = f.read(16)
    # idx.read_bytes also takes uncompressed files, but the cache promises <name>.gz is gzip.
    if head[:2] != _GZIP_MAGIC:
        return f"not a gzip file (starts with {head!r})"
    try:
        raw = idx.read_bytes(path)
    except DataError:
        return "corrupted or truncated gzip data"
    got = idx.sha256(raw)
    if got != sha256_raw:
        return f"checksum mismatch (raw SHA-256 {got[:16]}..., expected {sha256_raw[:16]}...)"
    try:
        idx.parse(raw, name)
    except DataError as e:
        return str(e)
    return None
