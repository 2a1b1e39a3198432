"""Sampling cost per image: ancestral-100 vs DDIM-50 vs DDIM-25 vs DPM-Solver++-20, one model, one run.

Every row draws the same images (same conditioning features, seeds sample_seed(0, i, 0)) with the same
randomly initialised UNet through ``RCDM.generate`` (the path the sampling stages use), after one
warm-up batch; the time is the median over ``--repeats`` runs, divided by the number of images. The
last column is the speed-up over ancestral-100 (guided-diffusion's usual setting), from the process
CPU time on a CPU (the steady figure on a shared machine; use ``--threads 1``) and from wall time on a GPU. The cost is the
number of network evaluations (one per step; two with guidance) plus a small per-step overhead.

    python bench/sample.py                                  # CPU, the tiny preset (32x32), ~1 minute
    python bench/sample.py --preset rcdm128 --batch 16      # the released 128x128 model (GPU)
    python bench/sample.py --guidance 1.0                   # classifier-free guidance doubles the cost
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from bench.machine import machine  # noqa: E402
from rcdm.api import RCDM, sample_seeds  # noqa: E402
from rcdm.config import load_config, preset_path  # noqa: E402
from rcdm.diffusion import DiffusionConfig, build_diffusion  # noqa: E402
from rcdm.unet import UNet, UNetConfig  # noqa: E402

ROWS = [("ancestral", 100), ("ddim", 50), ("ddim", 25), ("dpm++", 20)]
LABELS = {"ancestral": "ancestral", "ddim": "DDIM", "dpm++": "DPM-Solver++(2M)"}


def build(preset: str, device: torch.device, batch: int, precision: str) -> RCDM:
    cfg = load_config(UNetConfig, preset_path("model", preset))
    torch.manual_seed(0)
    model = UNet(cfg)
    with torch.no_grad():  # non-zero output convs, so every layer does its work
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    diffusion = build_diffusion(load_config(DiffusionConfig, preset_path("diffusion", "default")))
    info = {"source": f"random {preset}"}
    return RCDM(model, diffusion, info, None, device=device, batch_size=batch, precision=precision)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny", help="model preset (configs/model/<name>.yaml) or a YAML file")
    p.add_argument("--images", type=int, default=8, help="images per timed run")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--guidance", type=float, default=0.0)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )
    rcdm = build(args.preset, device, args.batch, args.precision)
    g = torch.Generator().manual_seed(0)
    feats = torch.rand(args.images, rcdm.feature_dim, generator=g)  # (N, D), non-negative like trunk features
    seeds = sample_seeds(0, args.images, 1)

    def run(sampler: str, steps: int) -> tuple[float, float]:
        """(wall seconds, process CPU seconds) of one run over all images."""
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        rcdm.generate(feats, seeds, sampler=sampler, steps=steps, guidance=args.guidance)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0, time.process_time() - c0

    rcdm.generate(feats[: args.batch], seeds[: args.batch], sampler="ddim", steps=2)  # warm-up
    results = []
    for sampler, steps in ROWS:
        runs = [run(sampler, steps) for _ in range(args.repeats)]
        wall = statistics.median(w for w, _ in runs) / args.images
        cpu = statistics.median(c for _, c in runs) / args.images
        results.append((sampler, steps, wall, cpu))
    evals = 2 if args.guidance else 1
    # speed-ups from CPU time on the CPU (steady on shared machines), from wall time on a GPU
    col, basis = (3, "CPU time") if device.type == "cpu" else (2, "wall time")
    params = sum(p.numel() for p in rcdm.model.parameters()) / 1e6
    print(f"\nSampling cost, preset `{args.preset}` ({rcdm.image_size}x{rcdm.image_size}, {params:.1f}M params), "
          f"batch {args.batch}, {args.images} images, {args.precision}, guidance {args.guidance}, "
          f"median of {args.repeats}")  # fmt: skip
    print(f"Machine: {machine(device)}; {datetime.date.today().isoformat()}\n")
    header = ["sampler", "steps", "network evals / image", "s / image", "CPU s / image"]
    print("| " + " | ".join(header + [f"speed-up vs ancestral-100 ({basis})"]) + " |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in results:
        sampler, steps, wall, cpu = r
        row = [
            LABELS[sampler],
            steps,
            steps * evals,
            f"{wall:.4f}",
            f"{cpu:.4f}",
            f"{results[0][col] / r[col]:.2f}x",
        ]
        print("| " + " | ".join(map(str, row)) + " |")


if __name__ == "__main__":
    main()
