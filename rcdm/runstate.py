"""The state of a resumable run in its output folder: its identity, its done markers, its temp files.

Stages that fill an ``out`` folder piece by piece (stage one's feature shards, batch sampling's sample
tars) keep their bookkeeping in ``out/_progress/``::

    _progress/config.json     {"identity": ..., "config": ...}, written before any piece
    _progress/<piece>.json    one done marker per finished piece, written after the piece itself

The identity holds what decides the pieces' contents (encoder, checkpoint, seeds, sizes, ...). A rerun
with the same identity resumes from the markers; one with a different identity is refused, so two runs
never mix their pieces in one folder. Files are written whole (``rcdm.storage``), so a killed run leaves
at most temporary files, removed by the next run.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from rcdm import storage

PROGRESS_DIR = "_progress"
IDENTITY = "config.json"


class OutputInUseError(RuntimeError):
    """An output folder that holds the pieces of a different run, or of an unknown writer."""


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as one dict with dotted keys: {"a": {"b": 1}} -> {"a.b": 1}."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def identity_differences(stored: dict[str, Any], identity: dict[str, Any]) -> list[str]:
    """One "key: <stored> there, <identity> now" line per differing leaf (dotted keys, sorted)."""
    old, new = flatten(stored), flatten(identity)
    return [
        f"{k}: {old.get(k)!r} there, {new.get(k)!r} now"
        for k in sorted(set(old) | set(new))
        if old.get(k) != new.get(k)
    ]


def claim_output(
    out: str,
    identity: dict[str, Any],
    config: dict[str, Any],
    *,
    manifest: str,
    pieces_dir: str,
    holds: str,
    writer: str,
    error: type[Exception] = OutputInUseError,
) -> None:
    """Refuse an ``out`` made by a different run; record this run's identity in a fresh one.

    ``manifest`` (a file) and ``pieces_dir`` (a folder) are the names under ``out`` that a finished or
    partial run leaves; ``holds`` ("features") and ``writer`` ("stage one") word the messages; ``error``
    is the exception type raised.
    """
    url = storage.join(out, PROGRESS_DIR, IDENTITY)
    if storage.exists(url):
        diffs = identity_differences(storage.read_json(url)["identity"], identity)
        if diffs:
            raise error(
                f"{out} holds {holds} of a different run ({'; '.join(diffs)}). Write to another out= "
                "or delete that folder to start over."
            )
        return
    if storage.exists(storage.join(out, manifest)) or storage.listdir(storage.join(out, pieces_dir)):
        raise error(
            f"{out} already holds {holds} but no {PROGRESS_DIR}/{IDENTITY}: it was not written by {writer} "
            "(or by an older version). Write to another out= or delete it."
        )
    storage.makedirs(out)
    storage.write_json_atomic(url, {"identity": identity, "config": config})


def remove_temp_files(out: str, subfolders: Iterable[str] = ()) -> None:
    """Delete the temporary files a killed run left in ``out``, ``out/_progress`` and ``subfolders``
    (local outputs only: object stores never hold partial objects)."""
    if not storage.is_local(out):
        return
    for folder in (out, *(storage.join(out, sub) for sub in (*subfolders, PROGRESS_DIR))):
        for name in storage.listdir(folder):
            if storage.is_temp_name(name):
                storage.remove(storage.join(folder, name))


def forget_listings(out: str) -> None:
    """Drop cached listings of ``out``: workers in other processes wrote there (s3fs caches listings)."""
    fs, _ = storage.url_to_fs(out)
    fs.invalidate_cache()


def read_markers(out: str, names: Iterable[str]) -> dict[str, Any]:
    """The JSON done markers ``out/_progress/<name>``, by name, in one concurrent fetch on object stores.

    Every name must exist (take them from a listing of the folder).
    """
    names = list(names)
    if not names:
        return {}
    fs, path = storage.url_to_fs(storage.join(out, PROGRESS_DIR))
    blobs = storage.retry(lambda: fs.cat([f"{path}/{n}" for n in names]), out)  # {path: bytes}
    return {key.rstrip("/").rsplit("/", 1)[-1]: json.loads(raw) for key, raw in blobs.items()}
