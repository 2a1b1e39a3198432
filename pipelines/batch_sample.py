"""Batch sampling as a Ray job: N samples per feature of a feature set, for evaluation at scale.

    python -m pipelines.batch_sample --config configs/batch_sample/default.yaml \\
        --set checkpoint=runs/train/tiny features=runs/features/mobilenet_v2/test out=runs/samples/tiny n=4

    # on a cluster (the entrypoint runs on the head node; RAY_ADDRESS is set by the job supervisor)
    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python -m pipelines.batch_sample --config configs/batch_sample/default.yaml --set checkpoint=... ...

Input: a feature dataset written by stage one (``ROOT/manifest.json`` + ``ROOT/shards/*.tar``) or a
feature bank file (``*.h5``, rcdm.bank). Items are numbered in input order (shards in manifest order,
samples in tar order; bank rows in order); sample j of item i is drawn with the seed
``rcdm.samplers.sample_seed(seed, i, j)`` and its own generator, so results do not depend on batching,
on the number of actors or on which actor draws them.

Work is split into units: a contiguous slice of one input shard (the whole shard when ``unit_size`` is
null) or of the bank's rows. Each Ray actor loads the model once and turns units into output tars.
Output at ``out``::

    samples/000000.tar                one WebDataset tar per unit; sample key "<item:09d>_<j:04d>":
                                        .png (the sample), .feat.npy (the float32 feature it was drawn
                                        from), .seed (ASCII int), .cls (input label, when known),
                                        .json {"key": input key, "item": i, "j": j, "seed": s, ...}
    _progress/config.json             the run's identity and resolved config (written first)
    _progress/000000.json             per-unit done marker, written after the unit's tar
    samples_NxHxWx3.npz               arr_0: uint8 (N, H, W, 3), all samples in item order, then j
                                        (guided-diffusion's file, read by the ADM evaluator)
    manifest.json                     written last: counts, units, the npz, checkpoint and features

Resume (stage one's conventions): every file is written whole (rcdm.storage.write_bytes_atomic), so a
crash never leaves a partial output visible. A rerun with the same config skips the units that have a
done marker and a tar, draws the rest, and assembles the npz and the manifest from the markers: nothing
is lost or drawn twice. A rerun with a different checkpoint, input, n, seed or sampler into the same
``out`` is refused. On a multi-node cluster ``checkpoint``, ``features`` and ``out`` must be reachable
from every node (object store or shared file system): actors write the tars, the driver the npz.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import platform
import sys
import time
import zipfile
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

import numpy as np

from rcdm import images, runstate, shards, storage
from rcdm.config import ConfigError, to_dict
from rcdm.diffusion import build_diffusion
from rcdm.runstate import PROGRESS_DIR
from rcdm.samplers import SamplerConfig
from stages.cli import add_config_args, config_from_args, fail

DEFAULT_CONFIG = "configs/batch_sample/default.yaml"
FORMAT = "rcdm-samples/1"
MANIFEST = "manifest.json"
SAMPLES_DIR = "samples"
BANK_UNIT_ROWS = 1024  # rows per unit for a bank input when unit_size is null
ORDER = "item-major: for each input item in input order, its samples j = 0..n-1"


class BatchSampleError(ValueError):
    """Bad input for batch sampling: missing or mismatched checkpoint, features or output."""


class BatchSampleAborted(RuntimeError):
    """The run stopped part-way (an actor died for good); what finished is kept for a rerun."""


# --- configuration --------------------------------------------------------------------------------


@dataclass(frozen=True)
class BatchSampleConfig:
    """Batch sampling: what to sample from, how, where to write it, and on which Ray cluster."""

    checkpoint: Optional[str] = None  # our checkpoint file, a training run folder, or a released name
    features: Optional[str] = None  # a feature dataset root (stage one) or a bank file (*.h5)
    out: Optional[str] = None
    n: int = 1  # samples per feature
    seed: int = 0
    limit: Optional[int] = None  # sample from the first `limit` items only (None: all)
    unit_size: Optional[int] = None  # items per work unit (None: one unit per input shard)
    batch_size: int = 16  # samples per model call
    ema_rate: Union[str, float, None] = "auto"  # "auto" = the first EMA, a rate such as "0.9999", null = raw
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    ray_address: Optional[str] = None  # None: $RAY_ADDRESS (set under `ray job submit`), else "local"
    actors: Optional[int] = None  # None: one per GPU, or one per `cpus_per_actor` CPUs without GPUs
    use_gpu: Optional[bool] = None  # None: GPU actors when the cluster has GPUs
    cpus_per_actor: int = 1
    num_cpus: Optional[int] = None  # CPUs of a local Ray instance (None: all)
    object_store_memory: Optional[int] = None  # bytes, for a local Ray instance
    progress_interval: float = 10.0  # seconds between progress lines

    def __post_init__(self) -> None:
        for name in ("n", "batch_size", "cpus_per_actor"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("limit", "unit_size", "actors"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1 or null, got {value}")


# --- work units -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkUnit:
    """Items [first_item, first_item + count) of the run: rows [start, start + count) of ``source``."""

    index: int
    kind: Literal["shard", "bank"]
    source: str  # the shard's or the bank's URL
    start: int
    count: int
    first_item: int

    @property
    def name(self) -> str:
        return f"{SAMPLES_DIR}/{self.index:06d}.tar"

    @property
    def marker(self) -> str:
        return f"{PROGRESS_DIR}/{self.index:06d}.json"

    def describe(self) -> str:
        return f"unit {self.index} ({self.source} rows {self.start}..{self.start + self.count - 1})"


@dataclass(frozen=True)
class FeatureSet:
    """The feature set being sampled from, as the driver sees it."""

    url: str
    kind: Literal["shard", "bank"]
    feature_dim: int
    encoder: dict[str, Any]
    fingerprint: str  # changes when the input's content listing changes
    units: tuple[WorkUnit, ...]

    @property
    def items(self) -> int:
        return sum(u.count for u in self.units)


def _slices(count: int, unit_size: int | None) -> Iterator[tuple[int, int]]:
    step = unit_size or count
    for start in range(0, count, step):
        yield start, min(step, count - start)


def _fingerprint(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode("utf-8")).hexdigest()[:16]


def open_features(url: str, unit_size: int | None = None, limit: int | None = None) -> FeatureSet:
    """The feature set at ``url`` split into work units (deterministic for given unit_size and limit)."""
    is_bank = url.endswith((".h5", ".hdf5"))
    if not storage.exists(url):
        what = "feature bank file" if is_bank else "feature dataset"
        raise BatchSampleError(
            f"features: no {what} at {url} (check the path, or run stage one: make features)"
        )
    units: list[WorkUnit] = []
    item = 0
    if is_bank:
        from rcdm.bank import FeatureBank

        with FeatureBank(url) as bank:
            rows, dim, encoder = len(bank), bank.dim, dict(bank.encoder)
        for start, count in _slices(rows, unit_size or BANK_UNIT_ROWS):
            units.append(WorkUnit(len(units), "bank", url, start, count, item))
            item += count
        fingerprint = _fingerprint({"encoder": encoder, "rows": rows, "dim": dim, "bytes": storage.size(url)})
    else:
        manifest = shards.read_manifest(url)
        encoder = dict(manifest["encoder"])
        dim = int(encoder["feature_dim"])
        for entry, shard_url in zip(manifest["shards"], shards.shard_urls(url, manifest)):
            for start, count in _slices(int(entry["count"]), unit_size):
                units.append(WorkUnit(len(units), "shard", shard_url, start, count, item))
                item += count
        fingerprint = _fingerprint({"encoder": encoder, "shards": manifest["shards"]})
    if limit is not None:
        kept = []
        for u in units:
            if u.first_item >= limit:
                break
            kept.append(
                WorkUnit(u.index, u.kind, u.source, u.start, min(u.count, limit - u.first_item), u.first_item)
            )
        units = kept
    if not units:
        raise BatchSampleError(f"features at {url} hold no samples: nothing to draw")
    return FeatureSet(url, "bank" if is_bank else "shard", dim, encoder, fingerprint, tuple(units))


@dataclass
class UnitFeatures:
    keys: list[str]
    features: np.ndarray  # (m, D) float32
    labels: list[Optional[int]]


def read_unit(unit: WorkUnit, bank_cache: dict[str, Any] | None = None) -> UnitFeatures:
    """The keys, features and labels of the unit's rows."""
    stop = unit.start + unit.count
    if unit.kind == "bank":
        from rcdm.bank import FeatureBank

        cache = bank_cache if bank_cache is not None else {}
        bank = cache.get(unit.source) or cache.setdefault(unit.source, FeatureBank(unit.source))
        labels = bank.labels[unit.start : stop]
        return UnitFeatures(
            keys=list(bank.keys[unit.start : stop]),
            features=bank.get(np.arange(unit.start, stop)),
            labels=[int(v) if v >= 0 else None for v in labels],
        )
    rows = list(shards.iter_tar(storage.read_bytes(unit.source), unit.source))
    if len(rows) < stop:
        raise shards.ManifestError(
            f"{unit.source} holds {len(rows)} samples but the manifest lists at least {stop}: the feature "
            "set is damaged; re-run stage one into a fresh folder"
        )
    rows = rows[unit.start : stop]
    missing = [r["__key__"] for r in rows if "feat.npy" not in r]
    if missing:
        raise shards.ManifestError(
            f"{unit.source}: samples {missing[:3]} lack feat.npy: not an RCDM feature shard"
        )
    feats = np.stack([np.load(io.BytesIO(r["feat.npy"]), allow_pickle=False) for r in rows])
    return UnitFeatures(
        keys=[r["__key__"] for r in rows],
        features=feats.astype(np.float32),
        labels=[int(r["cls"]) if "cls" in r else None for r in rows],
    )


def sample_key(item: int, j: int) -> str:
    """The output key of sample j of item i: fixed-width item, so keys sort in the npz order."""
    return f"{item:09d}_{j:04d}"


# --- the actor ------------------------------------------------------------------------------------


class SampleWorker:
    """Holds one model (loaded once) and turns work units into output tars plus done markers.

    Wrapped with ``ray.remote`` by ``run``; usable as a plain object too (tests, debugging).
    """

    def __init__(self, cfg: BatchSampleConfig, checkpoint: str, counter: str | None = None) -> None:
        import torch

        self.cfg, self.checkpoint = cfg, checkpoint
        self.counter = None
        if counter is not None:  # a named actor, looked up here: handles as arguments would pin objects
            import ray

            self.counter = ray.get_actor(counter)
        self.error: str | None = None
        self.info: dict[str, Any] = {}
        self.bank_cache: dict[str, Any] = {}
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.type == "cpu":
            torch.set_num_threads(cfg.cpus_per_actor)
        try:
            self._load()
        except BatchSampleError as e:
            self.error = str(e)
        except Exception as e:  # noqa: BLE001 - reported to the driver by describe()
            self.error = f"cannot load checkpoint {checkpoint}: {type(e).__name__}: {e}"

    def _load(self) -> None:
        from rcdm.checkpoint import diffusion_config_of, load_unet
        from rcdm.samplers import respace

        model, info = load_unet(self.checkpoint, ema_rate=self.cfg.ema_rate, map_location="cpu")
        self.model = model.to(self.device).eval().requires_grad_(False)
        diff_cfg = diffusion_config_of(info)
        self.diffusion = build_diffusion(diff_cfg)
        try:
            respace(self.diffusion, self.cfg.sampler.steps)  # a bad steps spec fails here, before any unit
        except ValueError as e:
            raise BatchSampleError(f"sampler.steps={self.cfg.sampler.steps!r}: {e}") from None
        self.info = {
            "source": info["source"],
            "kind": info.get("kind"),
            "step": info.get("step"),
            "encoder": info.get("encoder"),
            "model": info["config"],
            "diffusion": to_dict(diff_cfg),
        }

    def describe(self) -> dict[str, Any]:
        return {"error": self.error, "device": str(self.device), **self.info}

    def run_unit(self, unit: WorkUnit) -> dict[str, Any]:
        """Draw the unit's samples, write its tar, then its done marker; return the marker."""
        import torch

        from rcdm.samplers import sample, sample_seed

        if self.error is not None:
            raise BatchSampleError(self.error)
        cfg, n = self.cfg, self.cfg.n
        data = read_unit(unit, self.bank_cache)
        dim = self.info["model"]["feature_dim"]
        if data.features.shape[1] != dim:
            raise BatchSampleError(
                f"{unit.describe()}: features are {data.features.shape[1]}-d but the model expects {dim}-d"
            )
        size = int(self.info["model"]["image_size"])
        channels = self.model.cfg.in_channels
        pairs = [(r, j) for r in range(unit.count) for j in range(n)]  # item-major order
        feats = torch.from_numpy(data.features)  # (m, D)
        out: list[dict[str, bytes | str]] = []
        for b in range(0, len(pairs), cfg.batch_size):
            batch = pairs[b : b + cfg.batch_size]
            rows = torch.tensor([r for r, _ in batch])
            seeds = [sample_seed(cfg.seed, unit.first_item + r, j) for r, j in batch]
            x0 = sample(  # (B, C, H, W) in [-1, 1]
                self.model,
                self.diffusion,
                (len(batch), channels, size, size),
                feats[rows].to(self.device),
                sampler=cfg.sampler.name,
                steps=cfg.sampler.steps,
                eta=cfg.sampler.eta,
                guidance=cfg.sampler.guidance,
                seeds=seeds,
                device=self.device,
            )
            pixels = images.to_hwc(images.to_uint8(images.to_channels(x0, 3)))  # (B, H, W, 3) uint8
            for (r, j), seed, px in zip(batch, seeds, pixels):
                item = unit.first_item + r
                out.append(
                    _encode_output(item, j, seed, px, data.features[r], data.keys[r], data.labels[r], unit)
                )
            if self.counter is not None:
                self.counter.add.remote(len(batch))
        tar = shards.write_tar(out)
        storage.write_bytes_atomic(storage.join(cfg.out, unit.name), tar)
        marker = {
            "unit": unit.index,
            "name": unit.name,
            "first_item": unit.first_item,
            "items": unit.count,
            "samples": len(out),
            "bytes": len(tar),
            "sha256": hashlib.sha256(tar).hexdigest(),
        }
        storage.write_json_atomic(storage.join(cfg.out, unit.marker), marker)
        return marker


def _encode_output(
    item: int,
    j: int,
    seed: int,
    pixels: np.ndarray,
    feature: np.ndarray,
    key: str,
    label: int | None,
    unit: WorkUnit,
) -> dict[str, bytes | str]:
    meta = {"key": key, "item": item, "j": j, "seed": seed, "source": unit.source, "label": label}
    sample = {
        "__key__": sample_key(item, j),
        "png": images.encode_png(pixels),
        "feat.npy": shards.npy_bytes(np.asarray(feature, dtype=np.float32)),
        "seed": str(seed).encode("ascii"),
        "json": json.dumps(meta, sort_keys=True).encode("utf-8"),
    }
    if label is not None:
        sample["cls"] = str(label).encode("ascii")
    return sample


class _Counter:
    """Samples drawn so far, for the progress line (actors add after every batch)."""

    def __init__(self) -> None:
        self.total = 0

    def add(self, k: int) -> None:
        self.total += k

    def value(self) -> int:
        return self.total


# --- output folder --------------------------------------------------------------------------------


def _resolve_checkpoint(name: str) -> str:
    """A concrete checkpoint (a run folder's newest file now), so every actor loads the same weights; a
    released name stays a name, fetched by each actor where it runs."""
    from rcdm.checkpoint import CheckpointError, resolve_checkpoint

    try:
        return resolve_checkpoint(name, fetch=False)
    except CheckpointError as e:
        raise BatchSampleError(f"checkpoint: {e}") from None


def _identity(cfg: BatchSampleConfig, checkpoint: str, source: FeatureSet) -> dict[str, Any]:
    """What decides the output's contents; a rerun into the same folder must match it."""
    return {
        "checkpoint": checkpoint,
        "features_fingerprint": source.fingerprint,
        "ema_rate": cfg.ema_rate,
        "n": cfg.n,
        "seed": cfg.seed,
        "limit": cfg.limit,
        "unit_size": cfg.unit_size,
        "sampler": to_dict(cfg.sampler),
    }


def _claim_output(cfg: BatchSampleConfig, identity: dict[str, Any]) -> None:
    """Refuse an ``out`` made by a different run; record this run's identity in a fresh one."""
    runstate.claim_output(
        cfg.out, identity, to_dict(cfg), manifest=MANIFEST, pieces_dir=SAMPLES_DIR, holds="samples",
        writer="batch sampling", error=BatchSampleError,
    )  # fmt: skip


def finished_units(out: str, units: Iterable[WorkUnit]) -> dict[int, dict[str, Any]]:
    """unit index -> done marker, for units whose marker and tar both exist and fit the unit."""
    runstate.forget_listings(out)  # another process (a killed run) wrote there since this one last listed it
    markers = set(storage.listdir(storage.join(out, PROGRESS_DIR)))
    tars = set(storage.listdir(storage.join(out, SAMPLES_DIR)))
    candidates = [
        u for u in units if os.path.basename(u.marker) in markers and os.path.basename(u.name) in tars
    ]
    by_name = runstate.read_markers(out, [os.path.basename(u.marker) for u in candidates])
    done = {}
    for u in candidates:
        marker = by_name[os.path.basename(u.marker)]
        if marker.get("first_item") == u.first_item and marker.get("items") == u.count:
            done[u.index] = marker
    return done


def write_npz(url: str, shape: tuple[int, ...], chunks: Iterable[np.ndarray]) -> None:
    """Stream uint8 ``chunks`` (n_i, H, W, 3) into ``url`` as ``arr_0`` of an .npz, never half-visible.

    Bounded memory: one chunk at a time goes into a stored (uncompressed) zip entry, the layout
    ``np.savez`` writes.
    """
    written = 0
    with storage.atomic_local_path(url) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            with zf.open("arr_0.npy", "w", force_zip64=True) as f:
                header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False}
                np.lib.format.write_array_header_1_0(f, {**header, "shape": tuple(shape)})
                for chunk in chunks:
                    if chunk.dtype != np.uint8 or chunk.shape[1:] != tuple(shape[1:]):
                        raise ValueError(f"npz chunk {chunk.dtype} {chunk.shape} does not fit {shape}")
                    f.write(np.ascontiguousarray(chunk).tobytes())
                    written += chunk.shape[0]
        if written != shape[0]:
            raise RuntimeError(f"npz for {shape[0]} samples got {written}")


def _unit_pixels(out: str, marker: dict[str, Any]) -> np.ndarray:
    """(samples, H, W, 3) uint8 of one finished unit, in its tar's (item, j) order; checks its hash."""
    url = storage.join(out, marker["name"])
    data = storage.read_bytes(url)
    if hashlib.sha256(data).hexdigest() != marker["sha256"]:
        raise BatchSampleError(
            f"{url} does not match its done marker (sha256 differs): delete {marker['name']} and its "
            f"marker in {PROGRESS_DIR}/ and rerun to draw that unit again"
        )
    pngs = [images.decode_png(s["png"]) for s in shards.iter_tar(data, url)]
    if len(pngs) != marker["samples"]:
        raise BatchSampleError(f"{url} holds {len(pngs)} samples, its marker says {marker['samples']}")
    return np.stack(pngs)


def npz_name(count: int, size: int) -> str:
    return f"samples_{count}x{size}x{size}x3.npz"


def _versions() -> dict[str, str]:
    import ray
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "ray": ray.__version__,
    }


def assemble(
    cfg: BatchSampleConfig, source: FeatureSet, markers: dict[int, dict[str, Any]], model: dict[str, Any]
) -> dict[str, Any]:
    """Write the npz from the finished units (in unit order), then the manifest; return the manifest."""
    size = int(model["model"]["image_size"])
    total = source.items * cfg.n
    ordered = [markers[u.index] for u in source.units]
    name = npz_name(total, size)
    write_npz(
        storage.join(cfg.out, name), (total, size, size, 3), (_unit_pixels(cfg.out, m) for m in ordered)
    )
    manifest = {
        "format": FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "items": source.items,
        "n": cfg.n,
        "samples": total,
        "image_size": size,
        "order": ORDER,
        "npz": {"name": name, "array": "arr_0", "shape": [total, size, size, 3], "dtype": "uint8"},
        "units": [
            {k: m[k] for k in ("name", "first_item", "items", "samples", "bytes", "sha256")} for m in ordered
        ],
        "checkpoint": {k: model.get(k) for k in ("source", "kind", "step", "encoder", "model", "diffusion")},
        "features": {"url": source.url, "kind": source.kind, "encoder": source.encoder},
        "seed_rule": "rcdm.samplers.sample_seed(seed, item, j) = seed * 1_000_003 + item * 1009 + j",
        "config": to_dict(cfg),
        "versions": _versions(),
    }
    storage.write_json_atomic(storage.join(cfg.out, MANIFEST), manifest)
    return manifest


# --- the driver -----------------------------------------------------------------------------------


def _format_eta(seconds: float) -> str:
    if not np.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class Progress:
    """One line per interval: samples done/total, rate of this run, ETA."""

    def __init__(self, total: int, resumed: int) -> None:
        self.total, self.resumed = total, resumed
        self.start = time.monotonic()

    def line(self, drawn: int, units_done: int, units_total: int) -> str:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        done = min(self.resumed + drawn, self.total)
        rate = drawn / elapsed
        eta = (self.total - done) / rate if rate > 0 else float("inf")
        pct = 100.0 * done / max(self.total, 1)
        return (
            f"batch_sample: {done}/{self.total} samples ({pct:.1f}%), {rate:.2f} samples/s, "
            f"ETA {_format_eta(eta)}, units {units_done}/{units_total}"
        )


def _check_model(info: dict[str, Any], source: FeatureSet, checkpoint: str) -> None:
    dim = info["model"].get("feature_dim")
    if dim is None:
        raise BatchSampleError(
            f"checkpoint {checkpoint} is an unconditional model (no feature_dim): batch sampling draws "
            "samples per feature; pass a representation-conditional checkpoint"
        )
    enc = source.encoder
    kind = f"{enc.get('name')}/{'head' if enc.get('head') else 'trunk'}"
    if int(dim) != source.feature_dim:
        raise BatchSampleError(
            f"features at {source.url} hold {source.feature_dim}-d features ({kind}) but checkpoint "
            f"{checkpoint} expects {dim}-d features (model.feature_dim): pass features made with the encoder "
            "the model was trained on, or the checkpoint trained on these features"
        )
    trained = info.get("encoder") or {}
    if trained.get("name") and enc.get("name") and trained["name"] != enc["name"]:
        raise BatchSampleError(
            f"checkpoint {checkpoint} was trained on {trained['name']} features but the features at "
            f"{source.url} come from {kind}: pass features of the model's encoder"
        )
    if "head" in trained and "head" in enc and bool(trained["head"]) != bool(enc["head"]):
        raise BatchSampleError(
            f"checkpoint {checkpoint} was trained on {'head' if trained['head'] else 'trunk'} features "
            f"but the features at {source.url} are {kind}: pass features of the same layer"
        )


def _init_ray(cfg: BatchSampleConfig) -> bool:
    """Connect to (or start) Ray; True when this call started it."""
    import ray

    if ray.is_initialized():
        return False
    address = cfg.ray_address or os.environ.get("RAY_ADDRESS") or "local"
    kwargs: dict[str, Any] = {"address": address}
    if address == "local":
        kwargs.update(
            num_cpus=cfg.num_cpus, object_store_memory=cfg.object_store_memory, include_dashboard=False
        )
    ray.init(**kwargs)
    return True


def _start_actors(cfg: BatchSampleConfig, checkpoint: str, wanted: int, log: Callable[[str], None]):
    """(actors, progress counter, use_gpu): one model per actor, num_gpus=1 each on a GPU cluster."""
    import ray

    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    use_gpu = cfg.use_gpu if cfg.use_gpu is not None else gpus > 0
    if use_gpu and gpus == 0:
        raise BatchSampleError("use_gpu=true but the Ray cluster has no GPUs: set use_gpu=null or false")
    capacity = gpus if use_gpu else max(1, int(resources.get("CPU", 1)) // cfg.cpus_per_actor)
    count = max(1, min(cfg.actors or capacity, wanted))
    if count > capacity:
        log(f"batch_sample: {count} actors requested, room for {capacity} now: the rest wait for resources")
    counter_name = f"batch_sample_progress_{os.getpid()}_{time.time_ns()}"
    counter = ray.remote(num_cpus=0)(_Counter).options(name=counter_name).remote()
    actor_cls = ray.remote(SampleWorker).options(
        num_cpus=cfg.cpus_per_actor,
        num_gpus=1 if use_gpu else 0,
        max_restarts=2,  # a lost node or a killed worker: the unit is retried on the restarted actor
        max_task_retries=2,
    )
    actors = [actor_cls.remote(cfg, checkpoint, counter_name) for _ in range(count)]
    return actors, counter, use_gpu


def _draw(
    cfg: BatchSampleConfig,
    checkpoint: str,
    source: FeatureSet,
    todo: list[WorkUnit],
    done: dict[int, dict[str, Any]],
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Draw the ``todo`` units on Ray actors (adding their markers to ``done``); return the model's info."""
    import ray

    handles: list[Any] = []
    try:
        actors, counter, use_gpu = _start_actors(cfg, checkpoint, max(1, len(todo)), log)
        handles = [*actors, counter]
        infos = ray.get([a.describe.remote() for a in actors])
        errors = sorted({i["error"] for i in infos if i["error"]})
        if errors:
            raise BatchSampleError(errors[0])
        model = infos[0]
        _check_model(model, source, checkpoint)
        log(
            f"batch_sample: {len(actors)} {'GPU' if use_gpu else 'CPU'} actors, model {model['source']} "
            f"(step {model['step']}), sampler {cfg.sampler.name} steps={cfg.sampler.steps}"
        )
        total, units = source.items * cfg.n, len(source.units)
        progress = Progress(total, sum(m["samples"] for m in done.values()))
        queue, idle = deque(todo), [a for a in actors for _ in range(2)]  # two units queued per actor
        pending: dict[Any, tuple[WorkUnit, Any]] = {}
        last = time.monotonic()
        while queue or pending:
            while queue and idle:
                actor, unit = idle.pop(0), queue.popleft()
                pending[actor.run_unit.remote(unit)] = (unit, actor)
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=cfg.progress_interval)
            for ref in ready:
                unit, actor = pending.pop(ref)
                try:
                    done[unit.index] = ray.get(ref)
                except ray.exceptions.RayTaskError as e:
                    cause = e.cause if getattr(e, "cause", None) is not None else e
                    raise BatchSampleError(
                        f"{unit.describe()} failed: {type(cause).__name__}: {cause}"
                    ) from None
                except ray.exceptions.RayActorError as e:
                    raise BatchSampleAborted(
                        f"{unit.describe()}: its actor died ({str(e).splitlines()[0]}); the finished units are "
                        "kept: rerun the same command to resume"
                    ) from None
                idle.append(actor)
            if time.monotonic() - last >= cfg.progress_interval or not (queue or pending):
                log(progress.line(ray.get(counter.value.remote()), len(done), units))
                last = time.monotonic()
        return model
    finally:
        for handle in handles:  # frees the GPUs before the driver assembles the npz
            ray.kill(handle)


def run(cfg: BatchSampleConfig, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Draw every missing unit of ``cfg`` on Ray actors, then write the npz and the manifest.

    Returns the manifest. Raises BatchSampleError (or ManifestError / CheckpointError) on bad input.
    """
    log = log or (lambda s: print(s, flush=True))
    for name, hint in (
        ("checkpoint", "a checkpoint file, a training run folder or a released model name"),
        ("features", "the feature dataset folder written by stage one, or a bank.h5"),
        ("out", "the output folder URL"),
    ):
        if not getattr(cfg, name):
            raise BatchSampleError(f"{name} is required: --set {name}=<{hint}>")
    checkpoint = _resolve_checkpoint(cfg.checkpoint)
    source = open_features(cfg.features, cfg.unit_size, cfg.limit)
    _claim_output(cfg, _identity(cfg, checkpoint, source))
    runstate.remove_temp_files(cfg.out, [SAMPLES_DIR])
    done = finished_units(cfg.out, source.units)
    total = source.items * cfg.n
    todo = [u for u in source.units if u.index not in done]
    log(
        f"batch_sample: {source.items} items x {cfg.n} = {total} samples in {len(source.units)} units; "
        f"{len(done)} units ({sum(m['samples'] for m in done.values())} samples) already done in {cfg.out}"
    )
    manifest_url = storage.join(cfg.out, MANIFEST)
    if not todo and storage.exists(manifest_url):
        log(f"batch_sample: complete, nothing to do ({manifest_url})")
        return storage.read_json(manifest_url)

    import ray

    started = _init_ray(cfg)
    try:
        model = _draw(cfg, checkpoint, source, todo, done, log)
    finally:
        if started:
            ray.shutdown()
    manifest = assemble(cfg, source, done, model)
    log(f"batch_sample: wrote {total} samples to {cfg.out} ({manifest['npz']['name']}, {MANIFEST})")
    return manifest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_config_args(parser, DEFAULT_CONFIG)
    args = parser.parse_args(argv)
    cfg = config_from_args(BatchSampleConfig, args)
    from rcdm.checkpoint import CheckpointError

    try:
        run(cfg)
    except (BatchSampleError, shards.ManifestError, CheckpointError, ConfigError) as e:
        fail(str(e))
    except BatchSampleAborted as e:
        fail(str(e), code=1)


if __name__ == "__main__":
    main(sys.argv[1:])
