"""The feature bank: one HDF5 file with every feature of a shard set, for neighbours and k-NN metrics.

``build_bank(root, manifest)`` streams the shards a manifest lists (one shard in memory at a time)
into ``ROOT/bank.h5``::

    keys           (N,)    str      sample keys, in shard order
    features       (N, D)  float16/float32 (the manifest's feature_dtype)
    features_flip  (N, D)  optional: features of the mirrored crops
    labels         (N,)    int64    class index, -1 where unknown
    shard          (N,)    int32    index of the shard in the manifest's list
    offset         (N,)    int32    position of the sample inside that shard
    attrs: format, encoder (JSON of the manifest's encoder), dim, feature_dtype, count, classes (JSON)

The file is written to a local temporary file and renamed (local) or uploaded whole (object stores),
so a reader never sees a partial bank.

``FeatureBank(url)`` reads it in row chunks, so memory stays bounded at ImageNet scale (1.28M x 2048
float16 features are 5 GB on disk)::

    bank = FeatureBank("runs/features/dino/train/bank.h5")
    scores, idx = bank.knn(queries, k=20)          # (Q, 20) cosine similarities, (Q, 20) row indices
    bank.labels[idx]                                 # (Q, 20) neighbour labels (for k-NN accuracy)
    bank.get(idx[0])                                 # (20, D) their features
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator, Sequence
from functools import cached_property
from typing import Any, Literal

import h5py
import numpy as np
import torch
import torch.nn.functional as F

from rcdm import shards, storage

FORMAT = "rcdm-bank/1"
Metric = Literal["cosine", "l2"]


def _npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def build_bank(
    root_url: str,
    manifest: dict[str, Any],
    out_url: str | None = None,
    *,
    include_flip: bool = False,
) -> str:
    """Write the bank of the shard set at ``root_url`` (listed by ``manifest``); returns its URL.

    ``out_url`` defaults to ``ROOT/bank.h5``. Reads one shard at a time. Raises ManifestError when a
    shard does not hold the number of samples the manifest says.
    """
    out_url = out_url or storage.join(root_url, shards.BANK)
    n = int(sum(s["count"] for s in manifest["shards"]))
    dim = int(manifest["encoder"]["feature_dim"])
    dtype = np.dtype(manifest.get("feature_dtype", "float16"))
    with storage.atomic_local_path(out_url) as tmp:
        with h5py.File(tmp, "w") as h5:
            feats = h5.create_dataset("features", (n, dim), dtype=dtype)
            flips = h5.create_dataset("features_flip", (n, dim), dtype=dtype) if include_flip else None
            keys = h5.create_dataset("keys", (n,), dtype=h5py.string_dtype())
            labels = h5.create_dataset("labels", (n,), dtype=np.int64)
            shard_ds = h5.create_dataset("shard", (n,), dtype=np.int32)
            offset_ds = h5.create_dataset("offset", (n,), dtype=np.int32)
            pos = 0
            for s_idx, (entry, url) in enumerate(
                zip(manifest["shards"], shards.shard_urls(root_url, manifest))
            ):
                rows = list(shards.iter_tar(storage.read_bytes(url), url))
                if len(rows) != entry["count"]:
                    raise shards.ManifestError(
                        f"{url} holds {len(rows)} samples but the manifest says {entry['count']}: the "
                        "feature set is damaged; re-run stage one into a fresh output folder"
                    )
                m = len(rows)
                feats[pos : pos + m] = np.stack([_npy(r["feat.npy"]) for r in rows]).astype(dtype)
                if flips is not None:
                    flips[pos : pos + m] = np.stack([_npy(r["feat_flip.npy"]) for r in rows]).astype(dtype)
                keys[pos : pos + m] = [r["__key__"] for r in rows]
                labels[pos : pos + m] = [int(r["cls"]) if "cls" in r else -1 for r in rows]
                shard_ds[pos : pos + m] = s_idx
                offset_ds[pos : pos + m] = np.arange(m)
                pos += m
            h5.attrs["format"] = FORMAT
            h5.attrs["encoder"] = json.dumps(manifest["encoder"], sort_keys=True)
            h5.attrs["dim"] = dim
            h5.attrs["feature_dtype"] = dtype.name
            h5.attrs["count"] = n
            h5.attrs["classes"] = json.dumps((manifest.get("labels") or {}).get("classes"))
    return out_url


class FeatureBank:
    """Read-only access to a bank file (local path or fsspec URL), chunk by chunk.

    Attributes: ``len(bank)``, ``dim``, ``encoder`` (dict), ``classes`` (list or None), and the
    per-row arrays ``labels`` (int64, -1 unknown), ``keys`` (list of str), ``shard``, ``offset``
    (loaded on first use: a few bytes per row).
    """

    def __init__(self, url: str) -> None:
        self.url = url
        local = storage.local_path(url)
        if local is not None and not os.path.isfile(local):
            raise FileNotFoundError(
                f"no feature bank at {url}: run stage one (it writes bank.h5 unless bank=false)"
            )
        self._file = None
        if local is None:
            fs, path = storage.url_to_fs(url)
            self._file = storage.retry(lambda: fs.open(path, "rb", block_size=1 << 22), url)
        self._h5 = h5py.File(local if local is not None else self._file, "r")
        if self._h5.attrs.get("format") != FORMAT:
            raise ValueError(f"{url} is not an RCDM feature bank (format {self._h5.attrs.get('format')!r})")
        self.dim = int(self._h5.attrs["dim"])
        self.encoder: dict[str, Any] = json.loads(self._h5.attrs["encoder"])
        self.classes: list[str] | None = json.loads(self._h5.attrs.get("classes", "null"))
        self._n = int(self._h5["features"].shape[0])

    def __len__(self) -> int:
        return self._n

    def __repr__(self) -> str:
        return f"FeatureBank({self.url}, {self._n} x {self.dim}, encoder={self.encoder.get('name')})"

    @property
    def has_flip(self) -> bool:
        return "features_flip" in self._h5

    @cached_property
    def labels(self) -> np.ndarray:
        return self._h5["labels"][:]  # (N,) int64

    @cached_property
    def keys(self) -> list[str]:
        return [k.decode("utf-8") if isinstance(k, bytes) else k for k in self._h5["keys"][:]]

    @cached_property
    def shard(self) -> np.ndarray:
        return self._h5["shard"][:]  # (N,) int32

    @cached_property
    def offset(self) -> np.ndarray:
        return self._h5["offset"][:]  # (N,) int32

    def _features(self, flip: bool) -> h5py.Dataset:
        if flip and not self.has_flip:
            raise KeyError(f"{self.url} has no features_flip (build it with include_flip=True)")
        return self._h5["features_flip" if flip else "features"]

    def chunks(self, chunk: int = 65536, flip: bool = False) -> Iterator[tuple[int, np.ndarray]]:
        """(start row, float32 (n, D) features) for consecutive row blocks of at most ``chunk`` rows."""
        ds = self._features(flip)
        for start in range(0, self._n, chunk):
            yield start, ds[start : start + chunk].astype(np.float32)

    def get(self, indices: Sequence[int] | np.ndarray, flip: bool = False) -> np.ndarray:
        """float32 (len(indices), D) features of the given rows, in the given order (repeats allowed)."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= self._n):
            raise IndexError(f"row indices must be in [0, {self._n}), got {idx.min()}..{idx.max()}")
        uniq, inverse = np.unique(idx, return_inverse=True)  # h5py wants increasing indices
        rows = self._features(flip)[uniq] if uniq.size else np.zeros((0, self.dim))
        return np.asarray(rows, dtype=np.float32)[inverse.reshape(-1)]

    @torch.no_grad()
    def knn(
        self,
        queries: np.ndarray | torch.Tensor,
        k: int,
        metric: Metric = "cosine",
        chunk: int = 65536,
        device: str | torch.device | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Exact k nearest neighbours of each query among all rows, reading the bank chunk by chunk.

        ``queries`` (Q, D). Returns ``(scores, indices)``, both (Q, min(k, N)), best first:
        ``metric="cosine"``: scores are cosine similarities (descending); ``metric="l2"``: scores are
        Euclidean distances (ascending). Memory: one (``chunk``, D) block plus a (Q', chunk) score
        block, where queries are processed ``2**24 // chunk`` at a time. ``device`` (e.g. "cuda")
        runs the products there.
        """
        if metric not in ("cosine", "l2"):
            raise ValueError(f"metric must be 'cosine' or 'l2', got {metric!r}")
        q = torch.as_tensor(np.asarray(queries) if not torch.is_tensor(queries) else queries)
        q = q.to(device or "cpu", torch.float32)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"queries must be (Q, {self.dim}) for this bank, got {tuple(q.shape)}")
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        k = min(k, self._n)
        if metric == "cosine":
            q = F.normalize(q, dim=1)
        q_sq = (q * q).sum(1, keepdim=True)  # (Q, 1)
        n_q = q.shape[0]
        best_s = torch.full((n_q, 0), float("-inf"), device=q.device)
        best_i = torch.zeros((n_q, 0), dtype=torch.long, device=q.device)
        q_block = max(1, (1 << 24) // chunk)
        for start, block in self.chunks(chunk):
            x = torch.from_numpy(block).to(q.device)  # (n, D)
            if metric == "cosine":
                x = F.normalize(x, dim=1)
            x_sq = (x * x).sum(1)[None]  # (1, n)
            new_s, new_i = [], []
            for qs in range(0, n_q, q_block):
                dots = q[qs : qs + q_block] @ x.T  # (q', n)
                # larger is better for both: similarity, or minus the squared distance
                s = dots if metric == "cosine" else -(q_sq[qs : qs + q_block] - 2 * dots + x_sq)
                top_s, top_i = s.topk(min(k, x.shape[0]), dim=1)
                new_s.append(top_s)
                new_i.append(top_i + start)
            cand_s = torch.cat([best_s, torch.cat(new_s)], dim=1)
            cand_i = torch.cat([best_i, torch.cat(new_i)], dim=1)
            best_s, order = cand_s.topk(min(k, cand_s.shape[1]), dim=1)
            best_i = cand_i.gather(1, order)
        if metric == "l2":
            best_s = (-best_s).clamp_min(0).sqrt()
        return best_s.cpu().numpy(), best_i.cpu().numpy()

    def close(self) -> None:
        self._h5.close()
        if self._file is not None:
            self._file.close()

    def __enter__(self) -> FeatureBank:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
