"""The training data pipeline: feature shards -> an endless, resumable stream of (x, feat) batches.

Streams. Every DataLoader worker of every rank reads its own stream: stream ``j = rank * W + w`` of
``T = world_size * W`` (W = max(1, num_workers)). A stream is a pure function of
(seed, T, j, epoch) and runs epoch after epoch forever:

* epoch ``e`` permutes the shards with ``rng(seed, e)`` (the same permutation on every rank);
* with at least T shards, stream j reads shards ``perm[j::T]`` (each shard read by one stream); with
  fewer, every stream reads every shard and keeps the samples at epoch positions ``p = j (mod T)``
  (small data sets only: each stream then reads all the bytes);
* shuffle: the stream's shards are cut into consecutive groups of at least ``shuffle_buffer`` samples;
  each group is read whole and permuted with ``rng(seed, T, j, e, g)``; the same generator draws the
  flip coins. Memory per worker: about shuffle_buffer + one shard of encoded samples.

Because every stream is endless, every rank gets a batch at every step however uneven the shards are,
so DDP can never wait for a rank that ran out of data. An epoch of the whole set is every sample once.

Batches. Worker w builds micro-batches from its stream; the DataLoader hands them out in turn, so batch
b of a rank comes from stream role ``b mod W``. Resume: a rank that has consumed k batches starts worker
w in role ``(w + k) mod W`` and skips the batches that role already delivered; the skip is located
arithmetically from the per-shard sample counts (epoch, group, offset) and only that group is read. The
order is therefore a pure function of (seed, world size, num_workers, micro-batch size, batches
consumed): a resumed run sees exactly the batches the uninterrupted run would have seen.

A batch is ``{"x": (N, 3, H, W) float32 in [-1, 1], "feat": (N, D) float32, "keys": [str] * N}``; with
``flip`` each sample is mirrored with probability 1/2 and then carries its stored ``feat_flip``.
Every feature is checked to be finite before it is used; a bad sample stops the run with its key.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from rcdm import images, shards, storage


class DataError(ValueError):
    """Training data that cannot be used: missing or empty shards, stale counts, non-finite features."""


@dataclass(frozen=True)
class DataConfig:
    """Where the training data comes from and how it is batched.

    ``shards``: the URL of a stage-one output ROOT (holding manifest.json). ``batch_size`` is the GLOBAL
    batch over all ranks. ``expect_encoder``: refuse shards made with another encoder (None = any).
    """

    shards: str = ""
    batch_size: int = 256
    num_workers: int = 4
    shuffle_buffer: int = 1000
    flip: bool = True
    expect_encoder: str | None = None

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {self.batch_size}")
        if self.num_workers < 0 or self.shuffle_buffer < 0:
            raise ValueError("data.num_workers and data.shuffle_buffer must be >= 0")


@dataclass(frozen=True)
class ShardSet:
    """The shards a manifest lists (those holding samples), with their sample counts."""

    root: str
    urls: tuple[str, ...]
    counts: tuple[int, ...]
    manifest: dict[str, Any]

    @property
    def total(self) -> int:
        return sum(self.counts)


# --- feature statistics --------------------------------------------------------------------------


def feature_statistics(shard_set: ShardSet, max_samples: int = 20000) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and std (float32, (D,)) of the training features and their mirrors.

    From the bank when stage one wrote one (up to ``max_samples`` evenly spaced rows), else from evenly
    spaced shards. Dimensions that hardly vary (e.g. dead ReLU units) get a floor of 1% of the median
    std, so a standardised feature stays bounded on inputs unlike the training set.
    """
    manifest, root = shard_set.manifest, shard_set.root
    rows: list[np.ndarray] = []
    if manifest.get("bank") and storage.exists(storage.join(root, manifest["bank"])):
        from rcdm.bank import FeatureBank

        with FeatureBank(storage.join(root, manifest["bank"])) as bank:
            idx = np.unique(np.linspace(0, len(bank) - 1, min(max_samples, len(bank))).astype(np.int64))
            rows.append(bank.get(idx))
            if bank.has_flip:
                rows.append(bank.get(idx, flip=True))
    else:
        n_shards = len(shard_set.urls)
        per_shard = max(1, shard_set.total // n_shards)
        picks = np.unique(
            np.linspace(0, n_shards - 1, min(n_shards, -(-max_samples // per_shard))).astype(int)
        )
        for i in picks:
            for sample in shards.read_shard(shard_set.urls[i]):
                rows.append(np.stack([sample.feature, sample.feature_flip]))
    feats = torch.from_numpy(np.concatenate(rows).astype(np.float64))  # (M, D)
    if not bool(torch.isfinite(feats).all()):
        raise DataError(f"the features at {root} hold non-finite values: re-run stage one")
    mean, std = feats.mean(0), feats.std(0)
    std = std.clamp_min(max(float(std.median()) * 0.01, 1e-8))
    return mean.float(), std.float()


# --- opening a data set ---------------------------------------------------------------------------


def count_samples(url: str) -> int:
    """The number of samples in one shard (reads it)."""
    return sum(1 for _ in _read_raw(url))


def open_shards(
    root: str,
    *,
    feature_dim: int | None,
    image_size: int,
    encoder: str | None = None,
) -> ShardSet:
    """Read and check the manifest at ``root``; refuse a mismatch, an empty list or missing shards.

    Per-shard sample counts come from the manifest's ``"count"`` of each shard entry, else the shard
    is read once to count it.
    """
    if not root:
        raise DataError("no training data given: set data.shards to the output folder of stage one")
    manifest = shards.read_manifest(root)
    enc = manifest["encoder"]
    fixes = []
    if feature_dim is not None and int(enc["feature_dim"]) != int(feature_dim):
        fixes.append(f"model.feature_dim={enc['feature_dim']}")
    if int(manifest["image"]["size"]) != int(image_size):
        fixes.append(f"model.image_size={manifest['image']['size']}")
    if encoder is not None and enc["name"] != encoder:
        fixes.append(f"data.expect_encoder={enc['name']}")
    shards.check_manifest(
        manifest,
        feature_dim=feature_dim,
        image_size=image_size,
        encoder=encoder,
        root=f"the shards at {root}",
        fix_hint=f"pass --set {' '.join(fixes)} or re-run stage one with the encoder and image size the model expects",
    )
    entries = manifest.get("shards") or []
    if not entries:
        raise DataError(
            f"the manifest at {root} lists no shards: stage one wrote no samples (see its errors.jsonl)"
        )
    urls = shards.shard_urls(root, manifest)
    _check_present(root, urls)
    counts = [e["count"] if "count" in e else count_samples(u) for e, u in zip(entries, urls)]
    kept = [(u, int(n)) for u, n in zip(urls, counts) if int(n) > 0]
    if not kept:
        raise DataError(f"the {len(urls)} shards listed at {root} hold no samples")
    return ShardSet(root, tuple(u for u, _ in kept), tuple(n for _, n in kept), manifest)


def _check_present(root: str, urls: Sequence[str]) -> None:
    """One listing per folder (not one request per shard) to find listed shards that are gone."""
    by_folder: dict[str, set[str]] = {}
    for u in urls:
        folder, _, name = u.rpartition("/")
        by_folder.setdefault(folder, set()).add(name)
    missing = []
    for folder, names in by_folder.items():
        present = set(storage.listdir(folder))
        missing += [f"{folder}/{n}" for n in sorted(names - present)]
    if missing:
        more = f" (+{len(missing) - 3} more)" if len(missing) > 3 else ""
        raise DataError(
            f"{len(missing)} of the {len(urls)} shards listed in {root}/manifest.json are missing: "
            f"{', '.join(missing[:3])}{more}. Re-run stage one into {root}, or restore the files"
        )


# --- the order: a pure function of (seed, streams, stream, epoch) ---------------------------------


@dataclass(frozen=True)
class Unit:
    """Samples ``start, start + step, ...`` of shard ``shard`` (``count`` of them)."""

    shard: int
    start: int
    step: int
    count: int


def epoch_units(counts: Sequence[int], seed: int, epoch: int, stream: int, num_streams: int) -> list[Unit]:
    """What stream ``stream`` of ``num_streams`` reads in ``epoch``, in reading order."""
    order = np.random.default_rng([seed, epoch]).permutation(len(counts))
    if len(counts) >= num_streams:
        return [Unit(int(s), 0, 1, int(counts[s])) for s in order[stream::num_streams]]
    units, offset = [], 0
    for s in order:
        n = int(counts[s])
        start = (stream - offset) % num_streams
        kept = len(range(start, n, num_streams))
        if kept:
            units.append(Unit(int(s), start, num_streams, kept))
        offset += n
    return units


def group_units(units: Sequence[Unit], shuffle_buffer: int) -> list[list[Unit]]:
    """Consecutive units gathered until each group holds at least ``shuffle_buffer`` samples."""
    groups: list[list[Unit]] = []
    current: list[Unit] = []
    size = 0
    for u in units:
        current.append(u)
        size += u.count
        if size >= max(1, shuffle_buffer):
            groups.append(current)
            current, size = [], 0
    if current:
        groups.append(current)
    return groups


def epoch_length(counts: Sequence[int], seed: int, epoch: int, stream: int, num_streams: int) -> int:
    """Samples stream ``stream`` reads in ``epoch`` (cheap: no data is read)."""
    n = len(counts)
    if n >= num_streams:
        order = np.random.default_rng([seed, epoch]).permutation(n)
        return int(np.asarray(counts)[order[stream::num_streams]].sum())
    total = int(sum(counts))  # sample split: positions p = stream (mod T) of every epoch
    return len(range(stream, total, num_streams))


def locate(counts: Sequence[int], seed: int, stream: int, num_streams: int, skip: int) -> tuple[int, int]:
    """(epoch, offset in that epoch) of the sample after the first ``skip`` samples of a stream."""
    if len(counts) < num_streams:  # every epoch has the same length
        n = epoch_length(counts, seed, 0, stream, num_streams)
        return skip // n, skip % n
    epoch = 0
    while True:
        n = epoch_length(counts, seed, epoch, stream, num_streams)
        if skip < n:
            return epoch, skip
        skip -= n
        epoch += 1


# --- reading ----------------------------------------------------------------------------------------


def _read_raw(url: str) -> Iterator[dict[str, Any]]:
    import webdataset as wds

    storage.register_webdataset_fsspec()
    yield from wds.tariterators.tarfile_samples([{"url": url}])


def read_unit(url: str, unit: Unit, expected: int) -> list[dict[str, Any]]:
    """The raw (still encoded) samples ``unit`` selects from shard ``url``; checks the shard's count."""

    def read() -> list[dict[str, Any]]:
        return list(_read_raw(url))

    raws = storage.retry(read, url)
    if len(raws) != expected:
        raise DataError(
            f"shard {url} holds {len(raws)} samples but the manifest says {expected}: the manifest is stale "
            "or the shard was rewritten; re-run stage one"
        )
    return raws[unit.start :: unit.step]


def decode(
    raw: dict[str, Any], flip: bool, feature_dim: int | None, image_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """One raw sample -> (image (H, W, 3) uint8, feature (D,) float32), mirrored when ``flip``."""
    s = shards.decode_sample(raw)
    where = f"sample {s.key} in {raw.get('__url__', '?')}"
    for name, f in (("feat", s.feature), ("feat_flip", s.feature_flip)):
        if not np.isfinite(f).all():
            raise DataError(
                f"{where} has a non-finite {name} ({int((~np.isfinite(f)).sum())} of {f.size} values are "
                "NaN or inf): re-run stage one on that source or drop the shard from the manifest"
            )
        if feature_dim is not None and f.shape != (feature_dim,):
            raise DataError(f"{where} has a {f.shape} {name}, expected ({feature_dim},)")
    if s.image.shape != (image_size, image_size, 3):
        raise DataError(f"{where} has a {s.image.shape} image, expected ({image_size}, {image_size}, 3)")
    if flip:
        return np.ascontiguousarray(s.image[:, ::-1]), s.feature_flip
    return s.image, s.feature


# --- the stream -----------------------------------------------------------------------------------


class FeatureStream(IterableDataset):
    """Endless micro-batches for one rank; see the module docstring for the order."""

    def __init__(
        self,
        shard_set: ShardSet,
        *,
        micro_batch: int,
        rank: int,
        world_size: int,
        seed: int,
        shuffle_buffer: int,
        flip: bool,
        feature_dim: int | None,
        image_size: int,
        start_batch: int = 0,
    ) -> None:
        super().__init__()
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.urls, self.counts = shard_set.urls, shard_set.counts
        self.micro_batch, self.rank, self.world_size = micro_batch, rank, world_size
        self.seed, self.shuffle_buffer, self.flip = seed, shuffle_buffer, flip
        self.feature_dim, self.image_size = feature_dim, image_size
        self.start_batch = start_batch

    def samples(self, stream: int, num_streams: int, skip: int = 0) -> Iterator[tuple[dict[str, Any], bool]]:
        """(raw sample, flip) of one stream, endlessly, after skipping its first ``skip`` samples."""
        epoch, skip = locate(self.counts, self.seed, stream, num_streams, skip)
        while True:
            units = epoch_units(self.counts, self.seed, epoch, stream, num_streams)
            for g, group in enumerate(group_units(units, self.shuffle_buffer)):
                size = sum(u.count for u in group)
                if skip >= size:
                    skip -= size
                    continue
                raws = [r for u in group for r in read_unit(self.urls[u.shard], u, self.counts[u.shard])]
                rng = np.random.default_rng([self.seed, num_streams, stream, epoch, g])
                order = rng.permutation(size) if self.shuffle_buffer > 0 else np.arange(size)
                coins = rng.random(size) < 0.5 if self.flip else np.zeros(size, dtype=bool)
                for i in range(skip, size):
                    yield raws[order[i]], bool(coins[i])
                skip = 0
            epoch += 1

    def role(self, worker: int, num_workers: int) -> tuple[int, int]:
        """(stream role, batches that role delivered before start_batch) of DataLoader worker ``worker``."""
        role = (worker + self.start_batch) % num_workers
        done = max(0, (self.start_batch - role + num_workers - 1) // num_workers)
        return role, done

    def batches(self, worker: int, num_workers: int) -> Iterator[dict[str, Any]]:
        role, done = self.role(worker, num_workers)
        stream = self.rank * num_workers + role
        it = self.samples(stream, self.world_size * num_workers, done * self.micro_batch)
        while True:
            imgs, feats, keys = [], [], []
            for raw, flip in (next(it) for _ in range(self.micro_batch)):
                img, feat = decode(raw, flip, self.feature_dim, self.image_size)
                imgs.append(img)
                feats.append(feat)
                keys.append(raw["__key__"])
            yield {
                "x": images.to_model(np.stack(imgs)),  # (N, 3, H, W)
                "feat": torch.from_numpy(np.stack(feats).astype(np.float32)),  # (N, D)
                "keys": keys,
            }

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        try:
            yield from self.batches(worker, num_workers)
        except (DataError, shards.ManifestError) as e:
            # handed over as data so the trainer can stop every rank with this message, no traceback
            yield {"error": str(e)}


def _ignore_stop_signals(worker_id: int) -> None:
    """Workers leave SIGTERM/SIGINT to the trainer, which finishes its step first; they end with it."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def make_loader(stream: FeatureStream, num_workers: int, pin_memory: bool = False) -> DataLoader:
    """A DataLoader over ``stream``'s micro-batches (batching happens in the workers)."""
    return DataLoader(
        stream,
        batch_size=None,
        num_workers=num_workers,
        pin_memory=pin_memory,
        prefetch_factor=2 if num_workers else None,
        worker_init_fn=_ignore_stop_signals,
    )


def heldout(
    url: str, n: int, feature_dim: int | None, image_size: int
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """The first ``n`` samples of shard ``url``: images (n, 3, H, W) in [-1, 1], features (n, D), keys."""
    imgs, feats, keys = [], [], []
    for raw in _read_raw(url):
        img, feat = decode(raw, False, feature_dim, image_size)
        imgs.append(img)
        feats.append(feat)
        keys.append(raw["__key__"])
        if len(keys) == n:
            break
    if not keys:
        raise DataError(f"shard {url} holds no samples to condition the sample grid on")
    return images.to_model(np.stack(imgs)), torch.from_numpy(np.stack(feats)), keys
