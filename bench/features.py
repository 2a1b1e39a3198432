"""Stage one throughput and memory: the whole Ray stage vs the encoder alone, and peak memory vs size.

(a) the encoder alone on pre-decoded tensors doing the stage's work per image (the crop and its mirror,
    ``--batch`` images per call), with all cores and, on CPU, with the stage actor's torch threads
    (``(cores - 1)``: the stage leaves a core to decoding);
(b) the whole stage (``stages.features.run``: read JPEG files, decode, crop, encode, PNG + tar, write)
    over ``--images`` generated JPEGs, same encoder and batch, Ray already started; its img/s from the
    first finished batch (steady) and over the whole call (encoder start-up included).
(c) the same stage with ``engine=local`` (one process, no Ray; (b) is skipped where Ray is not
    installed);
(d) the stage's decoding alone (read, decode, both crops) on one thread and, split as engine=local
    splits a batch, on all cores: the ceiling of a stage whose encoder is faster than that.
The ratio (b)/(a) is how much of the encoder's speed the stage keeps. Then the peak memory (summed PSS
of the stage's process tree: driver, raylet, workers, actor; shared pages counted once) of
``python -m stages.features`` over the first 1k and over 10k images with a small encoder: it should
not grow with the number of images.

    python bench/features.py                                     # CPU, ~4-5 minutes on 2 cores
    python bench/features.py --images 4096 --batch 256           # GPU node
    python bench/features.py --skip-memory --encoder dino_vits16
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from bench.machine import cpu_model  # noqa: E402
from rcdm import images  # noqa: E402
from rcdm.encoders import load_encoder  # noqa: E402
from rcdm.sources import list_source  # noqa: E402
from stages.features import EncoderChoice, FeaturesConfig, decode_parallel, run  # noqa: E402


def make_jpegs(folder: Path, n: int, size: tuple[int, int], seed: int = 0) -> None:
    """``n`` smooth random JPEGs (w, h) = ``size``, quality 90, in a flat folder."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        small = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
        small.resize(size, Image.BICUBIC).save(folder / f"{i:07d}.jpg", quality=90)


def encoder_alone(name: str, input_size: int, batch: int, n: int, threads: int, device: str) -> float:
    """img/s of encode(crops + mirrors) on pre-decoded uint8 crops, ``n`` images in batches."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        enc = load_encoder(name, weights="random", device=device, input_size=input_size)
        rng = np.random.default_rng(0)
        crops = rng.integers(0, 256, (batch, input_size, input_size, 3), dtype=np.uint8)
        x = images.to_model(crops)  # (B, 3, S, S), what the actor builds from decoded crops
        enc.encode(torch.cat([x, x.flip(-1)]))  # warm-up
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        done = 0
        while done < n:
            x = images.to_model(crops)
            enc.encode(torch.cat([x, x.flip(-1)])).cpu()
            done += batch
        sync()
        return done / (time.perf_counter() - t0)
    finally:
        torch.set_num_threads(old)


def decode_alone(data: Path, input_size: int, batch: int, threads: int) -> float:
    """img/s of the stage's decoding (read, decode, ADM crop at 128 + encoder crop) on its own, each batch
    split over ``threads`` threads by engine=local's own ``decode_parallel``."""
    from concurrent.futures import ThreadPoolExecutor

    inputs = list(list_source(str(data)))
    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        for i in range(0, len(inputs), batch):
            decode_parallel(inputs[i : i + batch], pool, threads, 128, input_size, images.DEFAULT_MAX_PIXELS)
    return len(inputs) / (time.perf_counter() - t0)


def stage(
    data: Path, out: Path, name: str, input_size: int, batch: int, threads: int, engine: str = "ray"
) -> dict:
    cfg = FeaturesConfig(
        data=str(data), out=str(out), encoder=EncoderChoice(name, weights="random", input_size=input_size),
        image_size=128, shard_size=1000, batch_size=batch, bank=False, encoder_threads=threads, engine=engine,
    )  # fmt: skip
    return run(cfg, progress=False)


# --- memory: summed PSS of a process tree ---------------------------------------------------------


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        kids.setdefault(ppid, []).append(int(entry))
    return kids


def _rollup(pid: int) -> dict[str, int]:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        rows = [line.split() for line in f if line.endswith("kB\n")]
    return {r[0].rstrip(":"): int(r[1]) * 1024 for r in rows}


def tree_memory(root: int) -> tuple[int, int]:
    """(summed PSS of ``root`` and its descendants, private memory (USS) of ``root``) in bytes.

    PSS splits shared pages (libraries, the object store) among the processes mapping them, so the
    sum counts each page once; the driver's USS is what it alone holds (its PSS would move with the
    number of processes sharing torch's libraries).
    """
    kids = _children()
    todo, total, own = [root], 0, 0
    while todo:
        pid = todo.pop()
        todo.extend(kids.get(pid, []))
        try:
            m = _rollup(pid)
        except OSError:
            continue
        total += m.get("Pss", 0)
        if pid == root:
            own = m.get("Private_Clean", 0) + m.get("Private_Dirty", 0)
    return total, own


def peak_memory(data: Path, out: Path, limit: int, input_size: int, cpus: int) -> dict:
    """Run the stage CLI on the first ``limit`` images; sample its tree's memory every 0.25 s.

    Sampling stops when the stage prints its summary line (the bank and manifest are written by then),
    so interpreter shut-down is not counted.
    """
    sets = [
        f"data={data}", f"out={out}", "encoder.name=mobilenet_v2", "encoder.weights=random",
        f"encoder.input_size={input_size}", "image_size=32", "shard_size=1000", "batch_size=64",
        f"limit={limit}", f"num_cpus={cpus}",
    ]  # fmt: skip
    cmd = [sys.executable, "-m", "stages.features", "--config", str(REPO / "configs/features/default.yaml")]
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [*cmd, "--set", *sets], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    peak = {"total": 0, "driver": 0}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            total, own = tree_memory(proc.pid)
            peak["total"], peak["driver"] = max(peak["total"], total), max(peak["driver"], own)
            time.sleep(0.25)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("features:") and "samples in" in line:
                stop.set()
        proc.wait()
    finally:
        stop.set()
        sampler.join()
        if proc.poll() is None:  # interrupted: let the stage shut its Ray down
            proc.terminate()
            proc.wait()
    if proc.returncode != 0:
        raise RuntimeError(f"stage failed ({proc.returncode}): {''.join(lines)[-2000:]}")
    return {**peak, "seconds": time.perf_counter() - t0}


def throughput(
    args: argparse.Namespace, device: str, batch: int, cpus: int, actor_threads: int, tmp: Path
) -> tuple[str, list[tuple[str, str, str]]]:
    """Rows (a), (a'), (d), (d'), (b), (c) of the throughput table; (b) only where Ray is installed."""
    make_jpegs(tmp / "jpegs", args.images, tuple(args.jpeg_size))
    a_all = encoder_alone(args.encoder, args.input_size, batch, args.images, cpus, device)
    a_actor = None
    if device == "cpu" and actor_threads != cpus:
        a_actor = encoder_alone(args.encoder, args.input_size, batch, args.images, actor_threads, device)
    d1 = decode_alone(tmp / "jpegs", args.input_size, batch, 1)
    dn = decode_alone(tmp / "jpegs", args.input_size, batch, cpus)
    b = None
    if ray_version() is not None:
        import ray

        ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False)
        try:
            b = stage(tmp / "jpegs", tmp / "out", args.encoder, args.input_size, batch, actor_threads)
        finally:
            ray.shutdown()
    # the in-process engine: decoding on a thread beside the encoder, which gets every core
    c = stage(tmp / "jpegs", tmp / "out_local", args.encoder, args.input_size, batch, cpus, engine="local")
    w, h = args.jpeg_size
    what = f"{args.encoder} @{args.input_size}, batch {batch}, {args.images} JPEGs {w}x{h}"
    rows = [(f"(a) encoder alone, crop + mirror, pre-decoded, {cpus} threads", f"{a_all:.1f} img/s", "")]
    if a_actor is not None:
        rows.append((f"(a') the same with the actor's {actor_threads} threads", f"{a_actor:.1f} img/s",
                     f"(a')/(a) = {a_actor / a_all:.2f}"))  # fmt: skip
    rows.append(("(d) decoding alone (read, decode, 2 crops), 1 thread", f"{d1:.1f} img/s", ""))
    rows.append((f"(d') decoding alone, {cpus} threads", f"{dn:.1f} img/s", f"(d')/(d) = {dn / d1:.2f}"))
    if b is not None:
        rows.append(("(b) whole stage, steady (from the first batch)", f"{b['steady_images_per_s']:.1f} img/s",
                     f"(b)/(a) = {b['steady_images_per_s'] / a_all:.2f}"))  # fmt: skip
        rows.append(("(b) whole stage, run() incl. encoder start-up", f"{b['images_per_s']:.1f} img/s",
                     f"(b)/(a) = {b['images_per_s'] / a_all:.2f}"))  # fmt: skip
    else:
        rows.append(("(b) whole stage with Ray", "not measured", "Ray is not installed"))
    c_vs_b = "" if b is None else f", (c)/(b) = {c['steady_images_per_s'] / b['steady_images_per_s']:.2f}"
    rows.append(("(c) engine=local, steady (from the first batch)", f"{c['steady_images_per_s']:.1f} img/s",
                 f"(c)/(a) = {c['steady_images_per_s'] / a_all:.2f}{c_vs_b}"))  # fmt: skip
    rows.append(("(c) engine=local, run() incl. encoder start-up", f"{c['images_per_s']:.1f} img/s",
                 f"(c)/(a) = {c['images_per_s'] / a_all:.2f}"))  # fmt: skip
    return what, rows


def ray_version() -> str | None:
    """Ray's version, or None where it is not installed (engine=local still runs)."""
    try:
        import ray
    except ImportError:
        return None
    return ray.__version__


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--encoder", default="resnet50")
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--images", type=int, default=256, help="JPEGs for (a) and (b)")
    parser.add_argument("--jpeg-size", type=int, nargs=2, default=[400, 350], help="w h (ImageNet-like)")
    parser.add_argument("--batch", type=int, default=None, help="default: 256 on GPU, 32 on CPU")
    parser.add_argument("--mem-images", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--mem-input-size", type=int, default=64)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-throughput", action="store_true")
    args = parser.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    batch = args.batch or (256 if device == "cuda" else 32)
    cpus = os.cpu_count() or 1
    actor_threads = 1 if device == "cuda" else max(1, cpus - 1)  # the stage's default
    tmp = Path(tempfile.mkdtemp(prefix="bench-features-"))
    what, rows, mem_rows = "", [], []
    try:
        if not args.skip_throughput:
            what, rows = throughput(args, device, batch, cpus, actor_threads, tmp)
        if not args.skip_memory:
            n_max = max(args.mem_images)
            make_jpegs(tmp / "small", n_max, (96, 80), seed=1)
            for n in sorted(args.mem_images):
                shutil.rmtree(tmp / f"mem{n}", ignore_errors=True)
                m = peak_memory(tmp / "small", tmp / f"mem{n}", n, args.mem_input_size, cpus)
                mem_rows.append((n, m))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    now = datetime.datetime.now().isoformat(timespec="minutes")
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    gpu = f", {torch.cuda.get_device_name()}" if device == "cuda" else ""
    print(
        f"\nbench/features.py, {now}, {cpu_model()} ({cpus} cores{gpu}), torch {torch.__version__}, ray {ray_version() or 'not installed'}, load average at the end {load}"
    )
    if rows:
        print(f"\nThroughput: {what}, random weights, {device}\n")
        print("| measurement | rate | ratio |\n|---|---|---|")
        for r in rows:
            print(f"| {r[0]} | {r[1]} | {r[2]} |")
    if mem_rows:
        print(f"\nPeak memory of `python -m stages.features` (mobilenet_v2 @{args.mem_input_size}, 32px crops, "
              "96x80 JPEGs, shards of 1000, batch 64, bank on): summed PSS of its process tree, private memory "
              "of the driver\n")  # fmt: skip
        print("| images | peak PSS, all processes | peak USS, driver | wall time |\n|---|---|---|---|")
        for n, m in mem_rows:
            print(
                f"| {n} | {m['total'] / 2**20:.0f} MiB | {m['driver'] / 2**20:.0f} MiB | {m['seconds']:.0f} s |"
            )


if __name__ == "__main__":
    main()
