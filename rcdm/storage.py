"""Storage through fsspec URLs (`/local/path`, `file://`, `s3://`, `gs://`), never half-written.

Local files are written to a temporary name in the same folder, flushed, fsynced and renamed over the
destination, so a reader sees the old file or the new one, never a partial one. Object stores write
whole objects (a PUT is atomic), so a partially uploaded object is never visible; callers write their
manifest or pointer last. Transient errors of remote stores are retried with exponential back-off.
Writers that need a file path (torch.save, h5py, zipfile) get one from ``atomic_local_path``::

    with storage.atomic_local_path("s3://bucket/run/bank.h5") as tmp:
        write_the_file(tmp)  # becomes the object on normal exit; removed on error

S3-compatible endpoints and credentials come from fsspec's configuration, e.g. the environment variables
``FSSPEC_S3_ENDPOINT_URL``, ``FSSPEC_S3_KEY`` and ``FSSPEC_S3_SECRET`` (fsspec maps
``FSSPEC_<PROTOCOL>_<KWARG>`` to filesystem keyword arguments), which also reach subprocesses.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import fsspec
from fsspec.core import url_to_fs as _url_to_fs

T = TypeVar("T")

# Temporary files are named ".<destination name>.<random>.tmp", so cleanup after a killed writer finds them.
TEMP_SUFFIX = ".tmp"

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


def is_temp_name(name: str) -> bool:
    """Whether the file name ``name`` is one ``atomic_local_path`` gives its temporary files."""
    return name.startswith(".") and name.endswith(TEMP_SUFFIX)


def _umask() -> int:
    """The process umask: from /proc (Linux; a read, safe beside other threads), else by setting it and
    setting it straight back."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def atomic_local_path(url: str) -> Iterator[str]:
    """A local file path to write the contents of ``url`` to; on normal exit it becomes ``url`` whole.

    Local URLs: the temporary file lies in the destination's folder (created if needed); on exit it is
    fsynced and renamed over the destination. Remote URLs: it lies in the system's temp folder and is
    uploaded as one object, then deleted. When the body (or the rename, or the upload) raises, the
    temporary file is removed and the destination is left as it was.
    """
    local = local_path(url)
    folder = os.path.dirname(os.path.abspath(local)) if local is not None else None
    if folder is not None:
        os.makedirs(folder, exist_ok=True)
    name = os.path.basename((local or url).rstrip("/"))
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=TEMP_SUFFIX, dir=folder)
    os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600: publish with the mode open() would give
    os.close(fd)
    try:
        yield tmp
        if local is not None:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, local)
        else:
            fs, path = url_to_fs(url)
            retry(lambda: fs.put_file(tmp, path), url)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_bytes_atomic(url: str, data: bytes) -> None:
    """Write ``data`` to ``url`` so that no reader ever sees a partial file."""
    if is_local(url):
        with atomic_local_path(url) as tmp, open(tmp, "wb") as f:
            f.write(data)
        return
    fs, path = url_to_fs(url)
    retry(lambda: fs.pipe_file(path, data), url)  # bytes in memory go up in one PUT, without a temp file


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
