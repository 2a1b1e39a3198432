"""Stage one: run a frozen encoder over an image collection and write WebDataset feature shards.

    python -m stages.features --config configs/features/demo.yaml
    python -m stages.features --set encoder.name=dino encoder.head=true \\
        data=/datasets/imagenet/train out=s3://bucket/features/dino-head/train
    # on a Ray cluster (the driver connects with ray_address=auto):
    ray job submit --address http://HEAD:8265 --working-dir . -- python -m stages.features \\
        --set data=s3://bucket/imagenet/train out=s3://bucket/features/dino/train ray_address=auto

Inputs (``data``): a class tree, a folder of images, a list file or WebDataset tars (``rcdm.sources``).
Outputs in ``out`` (format in ``rcdm.shards``): ``shards/{i:06d}.tar`` holding, per input, the ADM
center crop at ``image_size`` (PNG), the feature of the encoder's crop of the same original (same field
of view) and of its horizontal mirror, the label and ``{source, orig_size}``; ``errors.jsonl`` (every
skipped input and why); ``bank.h5`` (``rcdm.bank``); ``manifest.json``, written last.

Engine ``ray`` (the default): CPU tasks read, decode and crop ``batch_size`` inputs each; encoder actors (one per GPU,
or one on CPU) encode crops and mirrors; a writer task assembles each shard in input order and writes
it. At most ``decode_tasks + 2 * num_actors`` batches are between decoding and encoding at any time, so
decoding keeps the encoders busy while memory stays bounded; features never pass through the driver.
Engine ``local``: the same per-batch and per-shard functions in one process, without Ray (one machine,
one encoder; the next batch is decoded by a pool of threads while the current one is encoded: Pillow
releases the GIL while it decodes and resizes). Both engines write identical shards, markers and
manifests.

Order: inputs are listed sorted (class folders in order), then, with ``order=shuffled`` (the default),
permuted by ``numpy.random.default_rng(seed)``: shards of a class-sorted tree would otherwise each hold
one or two classes, and a training stream that shuffles within a few shards would see batches of one
class. ``order=sorted`` keeps the listing order.

Resume: shard ``i`` always holds inputs ``[i * shard_size, (i + 1) * shard_size)`` of that order.
Each shard is written whole (temp + rename, or one PUT), then ``_progress/{i:06d}.json`` records its
count, its errors and a digest of its inputs. A rerun skips shards whose marker matches, so a killed run
loses at most the shards in flight; ``errors.jsonl`` and the manifest are assembled from the markers.
``_progress/config.json`` holds the run's identity (encoder, weights, dims, preprocessing, image size,
shard size, source): writing into an ``out`` made with a different one is refused.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import math
import os
import platform
import re
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from rcdm import images, runstate, shards, storage
from rcdm.config import CONFIGS_DIR, to_dict
from rcdm.runstate import PROGRESS_DIR, forget_listings
from rcdm.sources import Input, Source, SourceError, list_source, read_input
from stages.cli import add_config_args, config_from_args, fail


class FeaturesError(RuntimeError):
    """A run that cannot start or cannot produce a feature set; the message says what to do."""


@dataclass(frozen=True)
class EncoderChoice:
    """Which encoder of ``rcdm.encoders`` computes the features."""

    name: str = "supervised"
    head: bool = False  # projection-head features instead of the trunk's
    weights: str | None = None  # None = the official file; a path/URL; "random" = seeded random init
    input_size: int | None = None  # None = the encoder's own (224)
    precision: Literal["fp32", "bf16"] = "fp32"


@dataclass(frozen=True)
class FeaturesConfig:
    data: str  # input URL: class tree, image folder, list file (.txt/.csv) or WebDataset tars
    out: str  # output URL (local folder or s3://...)
    encoder: EncoderChoice = field(default_factory=EncoderChoice)
    image_size: int = 128  # the training-resolution ADM crop stored in the shards
    shard_size: int = 1000  # inputs per shard
    feature_dtype: Literal["float16", "float32"] = "float16"
    max_pixels: int = images.DEFAULT_MAX_PIXELS  # larger inputs are recorded as errors
    batch_size: int | None = None  # images per encoder call (each call also encodes their mirrors)
    num_actors: int | None = None  # encoder actors; None = one per GPU, or 1 without GPUs
    # ray: decode tasks in flight, None = 2 x the cluster's CPUs; local: decode threads, None = CPUs - 1
    # beside a GPU encoder, 1 beside a CPU one (which uses the other cores)
    decode_tasks: int | None = None
    encoder_threads: int | None = None  # torch threads of a CPU actor; None = (CPUs - 1) / num_actors
    engine: Literal["ray", "local"] = "ray"  # "local": one process, no Ray (one machine, one encoder)
    ray_address: str | None = None  # None = $RAY_ADDRESS if set, else local Ray; "auto" = join a cluster
    num_cpus: int | None = None  # CPUs of the local Ray (None = all); ignored with ray_address
    order: Literal["shuffled", "sorted"] = "shuffled"  # the order inputs are written in (see below)
    seed: int = 0  # of the shuffled order
    limit: int | None = None  # only the first N inputs in that order (smoke runs)
    bank: bool = True  # also write bank.h5
    labels: Literal["auto", "none"] = "auto"  # "auto": from class folders, list column or .cls

    def __post_init__(self) -> None:
        for name in (
            "image_size", "shard_size", "max_pixels", "batch_size", "num_actors", "decode_tasks",
            "encoder_threads",
        ):  # fmt: skip
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if self.order not in ("shuffled", "sorted"):
            raise ValueError(f"order must be 'shuffled' or 'sorted', got {self.order!r}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be at least 1 (or null for all inputs), got {self.limit}")
        if not self.data or not self.out:
            raise ValueError("data and out must be given (input and output URLs)")


# --- per-input work (runs in Ray tasks) -----------------------------------------------------------


def prepare_input(inp: Input, image_size: int, encoder_size: int, max_pixels: int) -> dict[str, Any]:
    """Read and decode one input; the ADM crops at ``image_size`` and at the encoder's input size.

    Both crops are taken from the same decoded original, so they share the field of view. Raises
    ImageError/OSError for inputs that cannot be used.
    """
    pil = images.open_image(read_input(inp), max_pixels=max_pixels)
    w, h = pil.size
    # the short side is resized to the crop size: refuse aspect ratios that would blow that up
    largest = max(image_size, encoder_size)
    if largest * largest * max(w, h) / min(w, h) > max_pixels:
        raise images.ImageError(f"{w}x{h}: aspect ratio too extreme to crop within max_pixels={max_pixels}")
    return {
        "key": shards.make_key(inp.source),
        "image": images.center_crop_arr(pil, image_size),  # (s, s, 3) uint8
        "enc": images.center_crop_arr(pil, encoder_size),  # (S, S, 3) uint8
        "label": inp.label,
        "meta": {"source": inp.source, "orig_size": [w, h]},
    }


_BYTES_REPR = re.compile(r" ?<_io\.BytesIO object at 0x[0-9a-fA-F]+>")  # PIL's messages name the buffer


def decode_batch(
    inputs: list[Input], image_size: int, encoder_size: int, max_pixels: int
) -> tuple[np.ndarray, list[dict[str, Any]], list[dict[str, Any]]]:
    """(encoder crops (n, S, S, 3) uint8, records of the n usable inputs, error records)."""
    records, errors = [], []
    for inp in inputs:
        try:
            records.append(prepare_input(inp, image_size, encoder_size, max_pixels))
        except Exception as e:  # noqa: BLE001 - one bad input must not stop a run: recorded, skipped
            message = str(e) if isinstance(e, images.ImageError) else f"{type(e).__name__}: {e}"
            message = _BYTES_REPR.sub("", message.replace("<bytes>: ", "", 1))
            errors.append({"index": inp.index, "source": inp.source, "url": inp.url, "error": message})
    crops = (
        np.stack([r.pop("enc") for r in records])
        if records
        else np.zeros((0, encoder_size, encoder_size, 3), np.uint8)
    )
    return crops, records, errors


def assemble_shard(
    records: list[list[dict[str, Any]]], features: list[np.ndarray], dtype: str
) -> tuple[bytes, int]:
    """The tar of one shard from its batches in input order; ``features[b]`` is (n_b, 2, D)."""
    samples = []
    for recs, feats in zip(records, features):
        assert len(recs) == len(feats), "records and features of a batch differ in length"
        for rec, f in zip(recs, feats):
            samples.append(
                shards.encode_sample(rec["key"], rec["image"], f[0], f[1], rec["label"], rec["meta"], dtype)
            )
    return shards.write_tar(samples), len(samples)


def marker_url(out: str, index: int) -> str:
    return storage.join(out, PROGRESS_DIR, f"{index:06d}.json")


# --- run identity and resume ----------------------------------------------------------------------


def order_of(cfg: FeaturesConfig) -> dict[str, Any]:
    """The order the inputs are written in, as the manifest and the run identity record it."""
    return {"kind": cfg.order, "seed": cfg.seed if cfg.order == "shuffled" else None}


def run_identity(cfg: FeaturesConfig, encoder: dict[str, Any]) -> dict[str, Any]:
    """What makes two runs write interchangeable shards (compared when reusing an ``out``)."""
    return {
        "encoder": {
            k: encoder.get(k)
            for k in ("name", "head", "feature_dim", "input_size", "weights_id", "preprocess", "precision")
        },
        "feature_dtype": cfg.feature_dtype,
        "image_size": cfg.image_size,
        "shard_size": cfg.shard_size,
        "max_pixels": cfg.max_pixels,
        "labels": cfg.labels,
        "data": cfg.data.rstrip("/"),
        "order": order_of(cfg),
    }


def check_identity(out: str, identity: dict[str, Any], cfg: FeaturesConfig) -> None:
    """Refuse an ``out`` made by a different run; record this run's identity in a fresh one."""
    runstate.claim_output(
        out, identity, to_dict(cfg), manifest=shards.MANIFEST, pieces_dir=shards.SHARD_DIR, holds="features",
        writer="this stage", error=FeaturesError,
    )  # fmt: skip


def remove_temp_files(out: str) -> None:
    """Delete temporary files a killed run left behind (local outputs; object stores have none)."""
    runstate.remove_temp_files(out, [shards.SHARD_DIR])


def read_markers(out: str) -> dict[int, dict[str, Any]]:
    """The done-markers present in ``out``, by shard index (one concurrent fetch on object stores)."""
    forget_listings(out)
    names = [
        n for n in storage.listdir(storage.join(out, PROGRESS_DIR)) if n[:6].isdigit() and n.endswith(".json")
    ]
    return {int(m["shard"]): m for m in runstate.read_markers(out, names).values()}


def plan_shards(source: Source, n: int, shard_size: int) -> list[dict[str, Any]]:
    """Work units: shard i = inputs [i * shard_size, (i + 1) * shard_size) of the first n."""
    plan = []
    for i in range(math.ceil(n / shard_size)):
        start, stop = i * shard_size, min((i + 1) * shard_size, n)
        plan.append({"shard": i, "start": start, "stop": stop, "digest": source.digest(start, stop)})
    return plan


def is_done(unit: dict[str, Any], marker: dict[str, Any] | None, tars: set[str]) -> bool:
    if marker is None or any(marker.get(k) != unit[k] for k in ("start", "stop", "digest")):
        return False
    return marker["count"] == 0 or shards.shard_name(unit["shard"]).split("/", 1)[1] in tars


# --- manifest -------------------------------------------------------------------------------------


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("rcdm", "torch", "webdataset", "ray", "numpy", "pillow"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = "unknown"
    return out


def build_manifest(
    cfg: FeaturesConfig, encoder: dict[str, Any], source: Source, n: int, markers: list[dict[str, Any]]
) -> dict[str, Any]:
    labels = None
    if source.has_labels:
        labels = {"classes": source.classes, "num_classes": source.num_classes, "from": source.kind}
    return {
        "format": shards.FORMAT,
        "encoder": encoder,
        "feature_dtype": cfg.feature_dtype,
        "preprocessing": {
            "crop": "adm_center",
            "encoder_input_size": encoder["input_size"],
            "scale": "[-1,1]",
            "normalize": (encoder.get("preprocess") or {}).get("normalize"),
            "image_size": cfg.image_size,
            "feature_flip": "feature of the horizontally mirrored encoder crop",
        },
        "image": {"size": cfg.image_size, "format": "png"},
        "labels": labels,
        "order": order_of(cfg),
        "shards": [
            {"name": shards.shard_name(m["shard"]), "count": m["count"]} for m in markers if m["count"]
        ],
        "total": sum(m["count"] for m in markers),
        "errors": {"file": shards.ERRORS, "count": sum(len(m["errors"]) for m in markers)},
        "bank": shards.BANK if cfg.bank else None,
        "source": {
            "data": cfg.data,
            "kind": source.kind,
            "num_inputs": n,
            "listed": len(source),
            "limit": cfg.limit,
        },
        "config": to_dict(cfg),
        "versions": versions(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


_VOLATILE = ("config", "versions", "created")


def same_manifest(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Equal up to the fields that do not change the data (creation time, versions, run knobs)."""
    return {k: v for k, v in a.items() if k not in _VOLATILE} == {
        k: v for k, v in b.items() if k not in _VOLATILE
    }


def finish(cfg: FeaturesConfig, manifest: dict[str, Any], markers: list[dict[str, Any]]) -> None:
    """errors.jsonl, then the bank, then the manifest (last: its presence means the set is complete)."""
    lines = [json.dumps(e, sort_keys=True) for m in markers for e in m["errors"]]
    storage.write_text_atomic(storage.join(cfg.out, shards.ERRORS), "".join(line + "\n" for line in lines))
    if manifest["total"] == 0:
        first = markers[0]["errors"][0]["error"] if markers and markers[0]["errors"] else "?"
        raise FeaturesError(
            f"none of the {manifest['source']['num_inputs']} inputs at {cfg.data} could be used "
            f"(e.g. {first}); every failure is listed in {storage.join(cfg.out, shards.ERRORS)}"
        )
    if cfg.bank:
        from rcdm.bank import build_bank

        build_bank(cfg.out, manifest)
    storage.write_json_atomic(storage.join(cfg.out, shards.MANIFEST), manifest)


# --- the Ray engine -------------------------------------------------------------------------------


class EncoderWorker:
    """Holds one encoder (on a GPU when it has one); encodes batches of crops and their mirrors."""

    def __init__(self, choice: EncoderChoice, device: str, threads: int) -> None:
        import torch

        from rcdm.encoders import Encoder, load_encoder

        if device == "cpu":
            torch.set_num_threads(max(1, threads))
        self.encoder = load_encoder(
            choice.name, head=choice.head, weights=choice.weights, device=device,
            input_size=choice.input_size, precision=choice.precision,
        )  # fmt: skip
        # The zoo's preprocess is "ADM crop, then scale to [-1, 1]": on a crop that is already S x S
        # the crop is the identity, so a whole batch can be scaled at once. Other encoders get their
        # own preprocess applied to each crop.
        self.batched = type(self.encoder).preprocess is Encoder.preprocess

    def encode(self, crops: np.ndarray) -> np.ndarray:
        """uint8 (n, S, S, 3) -> float32 (n, 2, D): features of the crops and of their mirrors."""
        import torch
        from PIL import Image

        n = len(crops)
        if n == 0:
            return np.zeros((0, 2, self.encoder.feature_dim), np.float32)
        if self.batched:
            x = images.to_model(crops.copy())  # (n, 3, S, S) in [-1, 1]; Ray's arrays are read-only
        else:
            x = torch.stack([self.encoder.preprocess(Image.fromarray(c)) for c in crops])
        f = self.encoder.encode(torch.cat([x, x.flip(-1)]))  # (2n, D)
        return torch.stack([f[:n], f[n:]], dim=1).cpu().numpy()  # (n, 2, D)


def write_shard(
    out: str, unit: dict[str, Any], records: list, features: list, errors: list, dtype: str
) -> dict[str, Any]:
    """Write one shard (whole), then its progress marker; returns the marker."""
    data, count = assemble_shard(records, features, dtype)
    if count:
        storage.write_bytes_atomic(storage.join(out, shards.shard_name(unit["shard"])), data)
    marker = {**unit, "count": count, "errors": [e for batch in errors for e in batch]}
    storage.write_json_atomic(marker_url(out, unit["shard"]), marker)
    return marker


def _write_shard_task(
    out: str, unit: dict[str, Any], records: list, features: list, errors: list, dtype: str
):
    import ray

    return write_shard(out, unit, ray.get(records), ray.get(features), ray.get(errors), dtype)


@dataclass
class _ShardJob:
    unit: dict[str, Any]
    batches: list[tuple[int, int]]  # input ranges [start, stop); Inputs are made when submitted
    records: list = field(default_factory=list)
    features: list = field(default_factory=list)
    errors: list = field(default_factory=list)
    encoded: int = 0


class Progress:
    """One live line (tqdm on stderr): images done/total, img/s, ETA, errors.

    The bar starts with the first finished batch, so Ray and encoder start-up do not count in img/s.
    """

    def __init__(self, total: int, done: int, enabled: bool) -> None:
        self.total, self.done, self.enabled = total, done, enabled
        self.errors = self.processed = 0
        self.bar = None
        self.started = self.ended = time.perf_counter()
        self.first: tuple[float, int] | None = None  # (time, images) of the first finished batch

    def update(self, n_images: int, n_errors: int) -> None:
        self.processed += n_images
        if self.bar is None:
            from tqdm import tqdm

            self.first = (time.perf_counter(), n_images)
            self.bar = tqdm(
                total=self.total, initial=self.done, unit="img", desc="features", file=sys.stderr,
                disable=not self.enabled, mininterval=0.5 if sys.stderr.isatty() else 15.0,
                dynamic_ncols=True, smoothing=0.05,
            )  # fmt: skip
        self.errors += n_errors
        if n_errors:
            self.bar.set_postfix(errors=self.errors, refresh=False)
        self.bar.update(n_images)

    def close(self) -> None:
        self.ended = time.perf_counter()
        if self.bar is not None:
            self.bar.close()

    def rates(self) -> dict[str, float]:
        """img/s over the whole encoding (start-up included) and from the first finished batch on."""
        total = self.processed / max(self.ended - self.started, 1e-9)
        steady = total
        if self.first is not None and self.ended > self.first[0]:
            steady = (self.processed - self.first[1]) / (self.ended - self.first[0])
        return {"images_per_s": total, "steady_images_per_s": steady}


def _resources(cfg: FeaturesConfig) -> tuple[int, int, int]:
    """(GPUs, CPUs, actors) of the connected cluster."""
    import ray

    res = ray.cluster_resources()
    gpus, cpus = int(res.get("GPU", 0)), int(res.get("CPU", 1))
    actors = cfg.num_actors or max(1, gpus)
    if gpus and actors > gpus:
        raise FeaturesError(f"num_actors={actors} but the cluster has {gpus} GPUs (one actor per GPU)")
    return gpus, cpus, actors


def encode_shards(
    cfg: FeaturesConfig, source: Source, todo: list[dict[str, Any]], enc_size: int, progress: Progress
) -> list[dict]:
    """Run the Ray pipeline over the shards in ``todo``; returns their markers (written already).

    ``enc_size`` is the encoder's input size S (the size of the crops the decode tasks make for it).
    """
    import ray

    gpus, cpus, n_actors = _resources(cfg)
    batch = cfg.batch_size or (256 if gpus else 32)
    decode_tasks = cfg.decode_tasks or max(2, 2 * cpus)
    # A CPU actor reserves one CPU but runs torch on its share of all CPUs but one: encoding dominates
    # the work, decoding tasks take only what they need, and a spare core keeps torch's threads from
    # being oversubscribed (they stall when they are). A one-CPU cluster reserves nothing for the
    # actor, so decoding can still be scheduled.
    threads = 1 if gpus else cfg.encoder_threads or max(1, (cpus - 1) // n_actors)
    reserved = 1 if gpus or cpus > n_actors else 0
    worker_cls = ray.remote(EncoderWorker).options(num_gpus=1 if gpus else 0, num_cpus=reserved)
    actors = [worker_cls.remote(cfg.encoder, "cuda" if gpus else "cpu", threads) for _ in range(n_actors)]
    load = [0] * n_actors
    decode = ray.remote(decode_batch).options(num_returns=3, num_cpus=1)
    writer = ray.remote(_write_shard_task).options(num_cpus=1)

    jobs = [
        _ShardJob(u, [(s, min(s + batch, u["stop"])) for s in range(u["start"], u["stop"], batch)])
        for u in todo
    ]
    window = decode_tasks + 2 * n_actors  # batches between "decode submitted" and "encoded"
    max_writers = max(2, n_actors)
    in_flight: dict[Any, tuple[_ShardJob, int, int, Any]] = {}  # features ref -> job, actor, size, errors
    writing: dict[Any, _ShardJob] = {}
    markers: list[dict] = []
    queue = [(job, b) for job in jobs for b in job.batches]
    next_batch = 0
    try:
        while next_batch < len(queue) or in_flight or writing:
            while next_batch < len(queue) and len(in_flight) < window and len(writing) < max_writers:
                job, (start, stop) = queue[next_batch]
                inputs = source.slice(start, stop)
                next_batch += 1
                crops, recs, errs = decode.remote(inputs, cfg.image_size, enc_size, cfg.max_pixels)
                a = min(range(n_actors), key=load.__getitem__)
                feats = actors[a].encode.remote(crops)
                load[a] += 1
                job.records.append(recs)
                job.features.append(feats)
                job.errors.append(errs)
                in_flight[feats] = (job, a, len(inputs), errs)
            ready, _ = ray.wait(
                list(in_flight) + list(writing), num_returns=1, timeout=5.0, fetch_local=False
            )
            for ref in ready:
                if ref in writing:
                    markers.append(ray.get(ref))
                    del writing[ref]
                    continue
                job, a, n_inputs, errs_ref = in_flight.pop(ref)
                load[a] -= 1
                job.encoded += 1
                progress.update(n_inputs, len(ray.get(errs_ref)))
                if job.encoded == len(job.batches):
                    w = writer.remote(
                        cfg.out, job.unit, job.records, job.features, job.errors, cfg.feature_dtype
                    )
                    writing[w] = job
                    job.records = job.features = job.errors = []  # the writer holds the references now
    finally:
        for actor in actors:
            ray.kill(actor)
    return markers


# --- the in-process engine ------------------------------------------------------------------------


def decode_parallel(
    inputs: list[Input],
    pool: ThreadPoolExecutor,
    threads: int,
    image_size: int,
    encoder_size: int,
    max_pixels: int,
) -> tuple[np.ndarray, list[dict[str, Any]], list[dict[str, Any]]]:
    """``decode_batch`` of ``inputs`` split into one contiguous run per thread of ``pool``, put back together
    in input order (Pillow releases the GIL while it decodes and resizes)."""
    step = -(-len(inputs) // threads)
    runs = [inputs[j : j + step] for j in range(0, len(inputs), step)]
    parts = list(pool.map(lambda run: decode_batch(run, image_size, encoder_size, max_pixels), runs))
    if len(parts) == 1:
        return parts[0]
    crops = np.concatenate([p[0] for p in parts])
    return crops, [r for p in parts for r in p[1]], [e for p in parts for e in p[2]]


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, e.g. a container's share), else all."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def encode_shards_local(
    cfg: FeaturesConfig, source: Source, todo: list[dict[str, Any]], enc_size: int, progress: Progress
) -> list[dict]:
    """The same work as ``encode_shards`` in this process, without Ray: one encoder (on the GPU when
    torch sees one), the next batch decoded by ``decode_tasks`` threads while the current one is encoded."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    worker = EncoderWorker(cfg.encoder, device, cfg.encoder_threads or torch.get_num_threads())
    batch = cfg.batch_size or (256 if device == "cuda" else 32)
    threads = cfg.decode_tasks or (max(1, usable_cpus() - 1) if device == "cuda" else 1)
    queue = [(u, s, min(s + batch, u["stop"])) for u in todo for s in range(u["start"], u["stop"], batch)]

    def decode(i: int, pool: ThreadPoolExecutor):
        _, start, stop = queue[i]
        return decode_parallel(
            source.slice(start, stop), pool, threads, cfg.image_size, enc_size, cfg.max_pixels
        )

    markers: list[dict] = []
    parts: tuple[list, list, list] = ([], [], [])
    with ThreadPoolExecutor(1) as ahead, ThreadPoolExecutor(threads) as decoders:
        pending = ahead.submit(decode, 0, decoders) if queue else None
        for i, (unit, start, stop) in enumerate(queue):
            crops, recs, errs = pending.result()
            pending = ahead.submit(decode, i + 1, decoders) if i + 1 < len(queue) else None
            for part, value in zip(parts, (recs, worker.encode(crops), errs)):
                part.append(value)
            progress.update(stop - start, len(errs))
            if stop == unit["stop"]:
                markers.append(write_shard(cfg.out, unit, *parts, cfg.feature_dtype))
                parts = ([], [], [])
    return markers


def _start_ray(cfg: FeaturesConfig) -> bool:
    """Connect to (or start) Ray; True when this call started it (and must shut it down)."""
    import ray

    if ray.is_initialized():
        return False
    # Under `ray job submit` the supervisor sets RAY_ADDRESS: join that cluster instead of starting one.
    address = cfg.ray_address or os.environ.get("RAY_ADDRESS")
    if address is None:
        ray.init(address="local", num_cpus=cfg.num_cpus, include_dashboard=False, log_to_driver=True)
    else:
        ray.init(address=address)
    return True


# --- the stage ------------------------------------------------------------------------------------


def load_encoder_description(cfg: FeaturesConfig) -> dict[str, Any]:
    """Build the encoder once in the driver (on CPU): fails at once on unknown names or absent weights."""
    from rcdm.encoders import EncoderError, load_encoder
    from rcdm.weights import WeightsError

    e = cfg.encoder
    try:
        enc = load_encoder(
            e.name,
            head=e.head,
            weights=e.weights,
            device="cpu",
            input_size=e.input_size,
            precision=e.precision,
        )
    except (EncoderError, WeightsError, FileNotFoundError) as err:
        raise FeaturesError(str(err)) from None
    return enc.describe()


def run(cfg: FeaturesConfig, progress: bool = True) -> dict[str, Any]:
    """Run stage one; returns a summary. Raises FeaturesError for problems the user must fix."""
    t0 = time.perf_counter()
    encoder = load_encoder_description(cfg)
    try:
        source = list_source(cfg.data, labels=cfg.labels == "auto")
    except (SourceError, FileNotFoundError, PermissionError) as err:
        raise FeaturesError(str(err)) from None
    if cfg.order == "shuffled":
        source = source.shuffled(cfg.seed)
    n = len(source) if cfg.limit is None else min(cfg.limit, len(source))
    storage.makedirs(cfg.out)
    check_identity(cfg.out, run_identity(cfg, encoder), cfg)
    remove_temp_files(cfg.out)
    plan = plan_shards(source, n, cfg.shard_size)
    found = read_markers(cfg.out)
    tars = set(storage.listdir(storage.join(cfg.out, shards.SHARD_DIR)))
    done = {u["shard"]: found[u["shard"]] for u in plan if is_done(u, found.get(u["shard"]), tars)}
    todo = [u for u in plan if u["shard"] not in done]
    print(
        f"features: {n} inputs ({source.kind}{f', {source.num_classes} classes' if source.has_labels else ''}) "
        f"from {cfg.data} -> {cfg.out}; encoder {encoder['key']} ({encoder['feature_dim']}-d, "
        f"{encoder['input_size']}px, weights {encoder['weights_id'][:16]}); {len(plan)} shards, "
        f"{len(done)} already done",
        flush=True,
    )
    manifest_url = storage.join(cfg.out, shards.MANIFEST)
    if not todo:
        markers = [done[u["shard"]] for u in plan]
        manifest = build_manifest(cfg, encoder, source, n, markers)
        if storage.exists(manifest_url) and same_manifest(storage.read_json(manifest_url), manifest):
            print(f"features: {cfg.out} is complete ({manifest['total']} samples); nothing to do", flush=True)
            return _summary(manifest, 0, len(plan), t0, {}, noop=True)
    else:
        storage.remove(manifest_url)  # the set is incomplete until this run writes a new one
        n_done = sum(u["stop"] - u["start"] for u in plan if u["shard"] in done)
        bar = Progress(n, n_done, progress)
        started = cfg.engine == "ray" and _start_ray(cfg)
        engine = encode_shards if cfg.engine == "ray" else encode_shards_local
        try:
            new = engine(cfg, source, todo, int(encoder["input_size"]), bar)
        finally:
            bar.close()
            if started:
                import ray

                ray.shutdown()
        forget_listings(cfg.out)
        done.update({m["shard"]: m for m in new})
        markers = [done[u["shard"]] for u in plan]
        manifest = build_manifest(cfg, encoder, source, n, markers)
    finish(cfg, manifest, markers)
    summary = _summary(manifest, len(todo), len(plan), t0, bar.rates() if todo else {})
    print(
        f"features: {summary['total']} samples in {len(manifest['shards'])} shards "
        f"({summary['written_shards']} written, {len(plan) - len(todo)} reused), {summary['errors']} inputs skipped"
        + (f" (see {storage.join(cfg.out, shards.ERRORS)})" if summary["errors"] else "")
        + (f", {summary['images_per_s']:.1f} img/s" if todo else "")
        + f", {summary['seconds']:.1f} s -> {manifest_url}",
        flush=True,
    )
    return summary


def _summary(
    manifest: dict[str, Any],
    written: int,
    planned: int,
    t0: float,
    rates: dict[str, float],
    noop: bool = False,
) -> dict[str, Any]:
    return {
        "total": manifest["total"],
        "errors": manifest["errors"]["count"],
        "shards": len(manifest["shards"]),
        "written_shards": written,
        "planned_shards": planned,
        "seconds": time.perf_counter() - t0,
        "noop": noop,
        **rates,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m stages.features",
        description="Stage one: encoder features of an image collection as WebDataset shards (Ray).",
    )
    add_config_args(parser, str(CONFIGS_DIR / "features" / "default.yaml"))
    cfg = config_from_args(FeaturesConfig, parser.parse_args(argv))
    try:
        run(cfg)
    except FeaturesError as e:
        fail(str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
