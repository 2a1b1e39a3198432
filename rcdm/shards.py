"""The feature-shard format shared by stage one, training, sampling and evaluation.

A feature dataset at ``ROOT`` (any fsspec URL) is::

    ROOT/manifest.json        written last; readers trust only the shards it lists
    ROOT/shards/000000.tar    WebDataset tars
    ROOT/errors.jsonl         inputs that were skipped, and why
    ROOT/bank.h5              the HDF5 feature bank (rcdm.bank)

One sample, key ``K`` (derived from the source path, no dots), holds::

    K.png            the training-resolution ADM center crop, RGB uint8, lossless
    K.feat.npy       the encoder feature of that crop, (D,), dtype from the manifest (float16 default)
    K.feat_flip.npy  the feature of its horizontal mirror, so training keeps random flips
    K.cls            the class index as ASCII digits (only when labels are known)
    K.json           {"source": ..., "orig_size": [w, h]}

Tars are written with fixed member metadata (mtime 0, uid 0), so the same inputs give identical bytes.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rcdm import images, storage

FORMAT = "rcdm-features/1"
MANIFEST = "manifest.json"
ERRORS = "errors.jsonl"
BANK = "bank.h5"
SHARD_DIR = "shards"


class ManifestError(ValueError):
    """A feature dataset that is missing, unfinished, or does not match what its consumer expects."""


@dataclass
class FeatureSample:
    key: str
    image: np.ndarray  # (H, W, 3) uint8
    feature: np.ndarray  # (D,) float32
    feature_flip: np.ndarray  # (D,) float32
    label: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)


def shard_name(index: int) -> str:
    return f"{SHARD_DIR}/{index:06d}.tar"


def make_key(source: str) -> str:
    """A stable WebDataset key for ``source``: readable, free of dots and slashes, and unique.

    The sanitised tail of the path keeps it readable; an 8-hex digest of the full source keeps two
    sources that sanitise alike (``a.b`` and ``a_b``) apart.
    """
    readable = re.sub(r"[^A-Za-z0-9_-]+", "_", source).strip("_")[-80:]
    digest = hashlib.sha1(source.encode("utf-8")).hexdigest()[:8]
    return f"{readable}_{digest}" if readable else digest


def npy_bytes(arr: np.ndarray) -> bytes:
    """``arr`` as the bytes of a .npy file (how features are stored in tars)."""
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


_npy_bytes = npy_bytes  # also under its private name


def _npy_load(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def encode_sample(
    key: str,
    image: np.ndarray,
    feature: np.ndarray,
    feature_flip: np.ndarray,
    label: int | None = None,
    meta: dict[str, Any] | None = None,
    dtype: str = "float16",
) -> dict[str, bytes | str]:
    """One sample as WebDataset members: {"__key__": K, "png": ..., "feat.npy": ..., ...}."""
    if "." in key or "/" in key:
        raise ValueError(f"sample key {key!r} must not contain dots or slashes (make it with make_key)")
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"sample {key}: image must be uint8 (H, W, 3), got {image.dtype} {image.shape}")
    feature = np.asarray(feature)
    feature_flip = np.asarray(feature_flip)
    if feature.ndim != 1 or feature.shape != feature_flip.shape:
        raise ValueError(
            f"sample {key}: features must be (D,) and alike, got {feature.shape}, {feature_flip.shape}"
        )
    out: dict[str, bytes | str] = {
        "__key__": key,
        "png": images.encode_png(image),
        "feat.npy": npy_bytes(feature.astype(dtype)),
        "feat_flip.npy": npy_bytes(feature_flip.astype(dtype)),
        "json": json.dumps(meta or {}, sort_keys=True).encode("utf-8"),
    }
    if label is not None:
        out["cls"] = str(int(label)).encode("ascii")
    return out


def decode_sample(raw: dict[str, Any]) -> FeatureSample:
    """Members of one sample (bytes, as WebDataset or ``iter_tar`` yields them) -> FeatureSample."""
    key = raw["__key__"]
    missing = [m for m in ("png", "feat.npy", "feat_flip.npy") if m not in raw]
    if missing:
        raise ManifestError(
            f"sample {key} in {raw.get('__url__', '?')} lacks {missing}: not an RCDM feature shard"
        )
    label = raw.get("cls")
    return FeatureSample(
        key=key,
        image=images.decode_png(raw["png"]),
        feature=_npy_load(raw["feat.npy"]).astype(np.float32),
        feature_flip=_npy_load(raw["feat_flip.npy"]).astype(np.float32),
        label=int(label) if label is not None else None,
        meta=json.loads(raw["json"]) if "json" in raw else {},
    )


def write_tar(samples: Iterable[dict[str, bytes | str]]) -> bytes:
    """A deterministic tar (fixed metadata) holding ``samples`` as encoded by ``encode_sample``."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for sample in samples:
            key = sample["__key__"]
            for ext in sorted(k for k in sample if not k.startswith("__")):
                data = sample[ext]
                data = data.encode("utf-8") if isinstance(data, str) else data
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode = len(data), 0, 0o444
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def iter_tar(data: bytes, url: str = "<tar>") -> Iterator[dict[str, Any]]:
    """Group a tar's members into samples by key (the part of the name before the first dot)."""
    current: dict[str, Any] | None = None
    with tarfile.open(fileobj=io.BytesIO(data), mode="r") as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, _, ext = member.name.partition(".")
            if current is not None and current["__key__"] != key:
                yield current
                current = None
            if current is None:
                current = {"__key__": key, "__url__": url}
            current[ext] = tar.extractfile(member).read()
    if current is not None:
        yield current


def read_shard(url: str) -> Iterator[FeatureSample]:
    """Every sample of one shard, decoded (reads the whole tar: shards are small)."""
    for raw in iter_tar(storage.read_bytes(url), url):
        yield decode_sample(raw)


# --- manifest -------------------------------------------------------------------------------------


def read_manifest(root: str) -> dict[str, Any]:
    """The manifest of the feature dataset at ``root``; a clear error when there is none yet."""
    url = storage.join(root, MANIFEST)
    if not storage.exists(url):
        raise ManifestError(
            f"no {MANIFEST} at {root}: stage one has not finished writing features there "
            "(run `make features` with OUT pointing there, or check the path)"
        )
    manifest = storage.read_json(url)
    if manifest.get("format") != FORMAT:
        raise ManifestError(f"{url} has format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


def shard_urls(root: str, manifest: dict[str, Any]) -> list[str]:
    """URLs of the finished shards the manifest lists, in order."""
    return [storage.join(root, s["name"]) for s in manifest["shards"]]


def check_manifest(
    manifest: dict[str, Any],
    *,
    feature_dim: int | None = None,
    image_size: int | None = None,
    encoder: str | None = None,
    head: bool | None = None,
    root: str = "the shards",
    fix_hint: str = "",
) -> None:
    """Refuse a feature dataset whose encoder, head, dim or image size differ from what is expected."""
    enc = manifest["encoder"]
    problems = []
    if encoder is not None and enc["name"] != encoder:
        problems.append(f"encoder {enc['name']!r} (expected {encoder!r})")
    if head is not None and bool(enc.get("head")) != bool(head):
        problems.append(
            f"{'head' if enc.get('head') else 'trunk'} features (expected {'head' if head else 'trunk'})"
        )
    if feature_dim is not None and int(enc["feature_dim"]) != int(feature_dim):
        problems.append(f"{enc['feature_dim']}-d features (expected {feature_dim}-d)")
    if image_size is not None and int(manifest["image"]["size"]) != int(image_size):
        problems.append(f"{manifest['image']['size']}px images (expected {image_size}px)")
    if problems:
        kind = f"{enc['name']}/{'head' if enc.get('head') else 'trunk'}"
        raise ManifestError(
            f"{root} were made with {kind} and hold "
            + ", ".join(problems)
            + (f": {fix_hint}" if fix_hint else "")
        )
