"""Encoder throughput: images/s of ``Encoder.encode`` in fp32 vs the fast path, side by side, one run.

The fast path is ``precision="bf16"``: the network in channels_last memory format under bf16 autocast
(features returned as float32). Rows: ResNet-50 (RCDM's encoders) and ViT-S/16 (DINO), random
weights (throughput does not depend on the values), 224x224 inputs, after ``--warmup`` batches; the
time is the median over ``--iters`` batches. The last column is the cosine similarity between the
fp32 and the fast features of the same batch (worst image). Untrained networks amplify rounding, so
it is lower than for trained weights.

    python bench/encoders.py                         # CPU: batch 64, 2 timed batches (~2-3 minutes)
    python bench/encoders.py --iters 20 --warmup 5   # GPU
    python bench/encoders.py --encoders mobilenet_v2 --batch 256
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
import torch.nn.functional as F  # noqa: E402

from bench.machine import machine  # noqa: E402
from rcdm.encoders import load_encoder  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def throughput(name: str, precision: str, x: torch.Tensor, device: torch.device, warmup: int, iters: int):
    """(images/s, features of x) for one encoder and precision."""
    enc = load_encoder(name, weights="random", device=device, precision=precision)
    for _ in range(warmup):
        enc.encode(x)
    _sync(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        f = enc.encode(x)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return x.shape[0] / statistics.median(times), f.cpu()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--encoders", nargs="+", default=["supervised", "dino_vits16"])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--iters", type=int, default=None, help="timed batches (default: 2 on CPU, 20 on GPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed batches (default: 1 on CPU, 5 on GPU)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    iters = args.iters or (20 if gpu else 2)
    warmup = args.warmup if args.warmup is not None else (5 if gpu else 1)
    if gpu:
        torch.backends.cudnn.benchmark = True

    print(f"# Encoder throughput ({datetime.date.today()})\n")
    print(
        f"machine: {machine(device)}; device {device}; batch {args.batch}; median of {iters} after {warmup} warm-up\n"
    )
    print("| encoder | fp32 img/s | bf16 + channels_last img/s | speed-up | cos(fp32, bf16) min |")
    print("|---|---|---|---|---|")
    for name in args.encoders:
        x = torch.rand(args.batch, 3, 224, 224, generator=torch.Generator().manual_seed(0)) * 2 - 1
        x = x.to(device)
        r32, f32 = throughput(name, "fp32", x, device, warmup, iters)
        r16, f16 = throughput(name, "bf16", x, device, warmup, iters)
        cos = F.cosine_similarity(f32, f16).min().item()
        print(f"| {name} | {r32:.1f} | {r16:.1f} | {r16 / r32:.2f}x | {cos:.4f} |", flush=True)


if __name__ == "__main__":
    main()
