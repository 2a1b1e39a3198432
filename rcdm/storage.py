"""Storage through fsspec URLs (`/local/path`, `file://`, `s3://`, `gs://`), never half-written.

Local files are written to a temporary name in the same folder, flushed, fsynced and renamed over the
destination, so a reader sees the old file or the new one, never a partial one. Object stores write
whole objects (a PUT is atomic), so a partially uploaded object is never visible; callers write their
manifest or pointer last. Transient errors of remote stores are retried with exponential back-off.

S3-compatible endpoints and credentials come from fsspec's configuration, e.g. the environment variables
``FSSPEC_S3_ENDPOINT_URL``, ``FSSPEC_S3_KEY`` and ``FSSPEC_S3_SECRET`` (fsspec maps
``FSSPEC_<PROTOCOL>_<KWARG>`` to filesystem keyword arguments), which also reach subprocesses.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable
from typing import Any, TypeVar

import fsspec
from fsspec.core import url_to_fs as _url_to_fs

T = TypeVar("T")

# Errors worth retrying on remote stores (throttling, dropped connections, 5xx).
_TRANSIENT_NAMES = ("Throttl", "SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "Timeout")


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def strip_file_scheme(url: str) -> str:
    return url[len("file://") :] if url.startswith("file://") else url


def url_to_fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path) for ``url``; local paths need no scheme."""
    return _url_to_fs(url)


def join(url: str, *parts: str) -> str:
    out = url.rstrip("/")
    for p in parts:
        out = f"{out}/{p.strip('/')}"
    return out


def _is_transient(err: BaseException) -> bool:
    if isinstance(err, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    text = f"{type(err).__name__} {err}"
    return isinstance(err, (ConnectionError, TimeoutError)) or any(s in text for s in _TRANSIENT_NAMES)


def retry(fn: Callable[[], T], url: str = "", attempts: int = 5, base_delay: float = 0.2) -> T:
    """Call ``fn``; retry transient errors of remote stores with exponential back-off."""
    for attempt in range(attempts):
        try:
            return fn()
        except Exception as err:  # noqa: BLE001 - re-raised unless transient
            if attempt == attempts - 1 or is_local(url) or not _is_transient(err):
                raise
            time.sleep(base_delay * 2**attempt)
    raise AssertionError("unreachable")


def exists(url: str) -> bool:
    fs, path = url_to_fs(url)
    return retry(lambda: fs.exists(path), url)


def makedirs(url: str) -> None:
    if is_local(url):
        os.makedirs(strip_file_scheme(url), exist_ok=True)
    # object stores have no folders; a bucket must exist already


def read_bytes(url: str) -> bytes:
    fs, path = url_to_fs(url)
    return retry(lambda: fs.cat_file(path), url)


def read_text(url: str) -> str:
    return read_bytes(url).decode("utf-8")


def read_json(url: str) -> Any:
    return json.loads(read_text(url))


def write_bytes_atomic(url: str, data: bytes) -> None:
    """Write ``data`` to ``url`` so that no reader ever sees a partial file."""
    if is_local(url):
        path = strip_file_scheme(url)
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return
    fs, path = url_to_fs(url)
    retry(lambda: fs.pipe_file(path, data), url)


def write_text_atomic(url: str, text: str) -> None:
    write_bytes_atomic(url, text.encode("utf-8"))


def write_json_atomic(url: str, obj: Any) -> None:
    write_text_atomic(url, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def listdir(url: str) -> list[str]:
    """Names (not paths) directly under ``url``; [] when it does not exist."""
    fs, path = url_to_fs(url)
    try:
        entries = retry(lambda: fs.ls(path, detail=False), url)
    except FileNotFoundError:
        return []
    return sorted(os.path.basename(e.rstrip("/")) for e in entries)


def remove(url: str) -> None:
    fs, path = url_to_fs(url)
    try:
        retry(lambda: fs.rm(path), url)
    except FileNotFoundError:
        pass


def size(url: str) -> int:
    fs, path = url_to_fs(url)
    return retry(lambda: fs.size(path), url)


def local_path(url: str) -> str | None:
    """The local path of ``url``, or None for remote URLs."""
    return strip_file_scheme(url) if is_local(url) else None


def register_webdataset_fsspec() -> None:
    """Let webdataset open every fsspec URL scheme (it knows only local files, pipes and http)."""
    import importlib

    gopen = importlib.import_module("webdataset.gopen")  # the package re-exports a function of that name

    def _open(url: str, mode: str = "rb", bufsize: int = 8192, **kw: Any):
        fs, path = url_to_fs(url)
        return retry(lambda: fs.open(path, mode), url)

    for scheme in ("s3", "gs", "gcs", "az", "abfs", "memory"):
        gopen.gopen_schemes[scheme] = _open
