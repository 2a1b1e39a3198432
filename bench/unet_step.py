"""UNet training-step throughput: eager fp32 vs the fast path, side by side in one run.

Each row adds one change to the row above, ending at the fast path:

    eager fp32      math attention (explicit softmax), NCHW tensors, float32, no compile
    + sdpa          F.scaled_dot_product_attention
    + channels_last model and input in NHWC memory format
    + bf16 autocast where the device has native bf16 (CUDA bf16, CPU AVX512-BF16/AMX)
    + torch.compile the fast path; a compile failure is reported in the table, not raised

and alternatives to the last two rows: bf16 in NCHW tensors (bf16 GroupNorm then takes the native CPU
kernel, which is slow on channels-last input; on CUDA too, NCHW measured faster), NCHW with the einsum
("math") attention, and torch.compile of the bf16 NCHW model. ``--variants`` runs a subset.

A step is forward + backward of an MSE loss (no optimizer). Throughput is the median over
``--rounds`` blocks of ``--iters`` steps, which resists bursts of load from other processes (the load
average is printed with the table). Every row runs in a fresh subprocess so its peak-memory figure is
its own: on CUDA the allocator's peak (``max_memory_allocated``, weights and gradients included); on
CPU the peak resident-set growth over the timed steps, sampled every millisecond from
/proc/self/statm, relative to the process before its first step.

    python bench/unet_step.py                                     # CPU: tiny preset, about a minute
    python bench/unet_step.py --preset rcdm128 --batch 16         # the released 128x128 model (GPU)
    python bench/unet_step.py --preset configs/model/tiny.yaml --iters 20 --compile on

The torch.compile row runs by default on CUDA only: compiling the forward+backward graph takes
minutes on a small CPU (``--compile on`` includes it there too).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.machine import cpu_model  # noqa: E402
from rcdm.config import load_config, preset_path  # noqa: E402
from rcdm.dist import native_bf16  # noqa: E402
from rcdm.unet import UNet, UNetConfig  # noqa: E402

# name -> (attention_backend, channels_last, bf16, compile)
VARIANTS = {
    "eager fp32": ("math", False, False, False),
    "+ sdpa": ("sdpa", False, False, False),
    "+ channels_last": ("sdpa", True, False, False),
    "+ bf16 autocast": ("sdpa", True, True, False),
    "+ torch.compile": ("sdpa", True, True, True),
    # CPU alternatives to the fast path: NCHW lets bf16 GroupNorm use the native kernel (channels-last
    # bf16 GroupNorm is slow on the CPU), and at 8x8 the einsum attention beats the fused kernel there
    "bf16 autocast, NCHW": ("sdpa", False, True, False),
    "bf16 autocast, NCHW, math attention": ("math", False, True, False),
    "bf16 autocast, NCHW, torch.compile": ("sdpa", False, True, True),
}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def machine_description(device: torch.device) -> str:
    if device.type == "cuda":
        what = f"GPU {torch.cuda.get_device_name(device)}"
    else:
        what = f"CPU {cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
    return f"{what}; torch {torch.__version__}; Python {platform.python_version()}"


def load_preset(preset: str) -> UNetConfig:
    return load_config(UNetConfig, preset_path("model", preset))


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Samples the resident set size in a background thread; ``peak`` is the largest value seen."""

    def __init__(self, interval_s: float = 0.001):
        self.interval_s, self.peak, self._stop = interval_s, rss_bytes(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval_s)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def run_variant(args: argparse.Namespace) -> dict:
    """One row, in this process: build, warm up (timing the first step), then time ``iters`` steps."""
    device = resolve_device(args.device)
    backend, channels_last, bf16, use_compile = VARIANTS[args.worker]
    bf16 = bf16 and args.bf16 != "off" and (args.bf16 == "on" or native_bf16(device))
    cfg = load_preset(args.preset).replace(attention_backend=backend)
    torch.manual_seed(0)
    model = UNet(cfg).to(device).train()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    n, s = args.batch, cfg.image_size
    x = torch.randn(n, cfg.in_channels, s, s, device=device).contiguous(memory_format=fmt)
    t = torch.randint(0, 1000, (n,), device=device)
    feat = torch.randn(n, cfg.feature_dim, device=device) if cfg.feature_dim else None
    target = torch.randn(n, cfg.out_channels, s, s, device=device).contiguous(memory_format=fmt)
    net = torch.compile(model) if use_compile else model

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = F.mse_loss(net(x, t, feat), target)
        loss.backward()
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    row = {"variant": args.worker, "bf16": bf16, "note": ""}
    if VARIANTS[args.worker][2] and not bf16:
        row["note"] = "bf16 off (no native bf16 or --bf16 off): ran fp32"
    base_rss = rss_bytes()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        start = time.perf_counter()
        step()
        row["first_step_s"] = time.perf_counter() - start
    except Exception as e:  # a failed compile is a result to report, not a crash
        if not use_compile:
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        row["note"] = f"compile failed: {type(e).__name__}: {first[:120]}"
        return row
    for _ in range(args.warmup - 1):
        step()
    rates = []
    with PeakRSS() as rss:
        for _ in range(args.rounds):
            start = time.perf_counter()
            for _ in range(args.iters):
                step()
            rates.append(n * args.iters / (time.perf_counter() - start))
    row["images_per_s"] = statistics.median(rates)
    if device.type == "cuda":
        row["peak_mem_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        row["peak_mem_mib"] = (rss.peak - base_rss) / 2**20
    return row


def run_all(args: argparse.Namespace) -> list[dict]:
    rows = []
    for name in args.variants:
        if VARIANTS[name][3] and not args.compile_row:
            rows.append(
                {"variant": name, "note": f"skipped (--compile {args.compile} on {args.device_type})"}
            )
            continue
        cmd = [sys.executable, __file__, "--worker", name, *args.passthrough]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode != 0 or not lines:
            err = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            rows.append({"variant": name, "note": f"worker failed (exit {proc.returncode}): {err[:120]}"})
        else:
            rows.append(json.loads(lines[-1]))
        print(f"  {name}: done", file=sys.stderr, flush=True)
    return rows


def markdown(rows: list[dict], header: str, gpu: bool) -> str:
    timed = [r for r in rows if "images_per_s" in r]
    # speed-ups are against eager fp32, or against the first timed row when --variants leaves it out
    ref = next((r for r in timed if r["variant"] == "eager fp32"), timed[0] if timed else None)
    base = ref["images_per_s"] if ref else None
    vs = "" if ref is None or ref["variant"] == "eager fp32" else f" vs {ref['variant']}"
    mem_label = "peak GPU mem (MiB)" if gpu else "peak RSS growth (MiB)"
    out = [
        header,
        "",
        f"| variant | images/s | speed-up{vs} | first step (s) | {mem_label} | note |",
        "|---" * 6 + "|",
    ]
    for r in rows:
        ips = r.get("images_per_s")
        cells = [
            r["variant"],
            f"{ips:.1f}" if ips else "-",
            f"{ips / base:.2f}x" if ips and base else "-",
            f"{r['first_step_s']:.1f}" if "first_step_s" in r else "-",
            f"{r['peak_mem_mib']:.0f}" if "peak_mem_mib" in r else "-",
            r.get("note", ""),
        ]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--preset", default=None, help="model preset name or YAML path (tiny on CPU, rcdm128 on GPU)")
    add("--batch", type=int, default=None, help="images per step (8 on CPU, 16 on GPU)")
    add("--iters", type=int, default=None, help="steps per timed block (5 on CPU, 20 on GPU)")
    add("--rounds", type=int, default=3, help="timed blocks per variant; the median is reported")
    add("--warmup", type=int, default=2, help="untimed steps first (the first one is reported)")
    add("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    add(
        "--bf16", choices=("auto", "on", "off"), default="auto", help="auto: where the device has native bf16"
    )
    add(
        "--compile", choices=("auto", "on", "off"), default="auto", help="torch.compile row (auto: CUDA only)"
    )
    add("--variants", nargs="+", choices=tuple(VARIANTS), default=list(VARIANTS), metavar="NAME",
        help="rows to run, by name (default: all): " + "; ".join(VARIANTS))  # fmt: skip
    add("--worker", choices=tuple(VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    device = resolve_device(args.device)
    gpu = device.type == "cuda"
    args.preset = args.preset or ("rcdm128" if gpu else "tiny")
    args.batch = args.batch or (16 if gpu else 8)
    args.iters = args.iters or (20 if gpu else 5)
    if min(args.warmup, args.iters, args.rounds, args.batch) < 1:
        parser.error("--warmup, --iters, --rounds and --batch must be >= 1")
    if args.worker:
        print(json.dumps(run_variant(args)))
        return

    cfg = load_preset(args.preset)  # fail here, once, on a bad preset
    args.compile_row = args.compile == "on" or (args.compile == "auto" and gpu)
    args.device_type = device.type
    args.passthrough = [
        *("--preset", args.preset, "--batch", str(args.batch), "--iters", str(args.iters)),
        *("--rounds", str(args.rounds), "--warmup", str(args.warmup), "--device", args.device),
        *("--bf16", args.bf16),
    ]
    with torch.device("meta"):
        n_params = sum(p.numel() for p in UNet(cfg).parameters())
    print(f"UNet step benchmark on {device}: preset {args.preset}, batch {args.batch}", file=sys.stderr)
    load_before = os.getloadavg()[0]
    rows = run_all(args)
    header = (
        f"UNet forward+backward, preset `{args.preset}` ({n_params / 1e6:.2f}M params, {cfg.image_size}px), "
        f"batch {args.batch}, median of {args.rounds} x {args.iters} timed steps after {args.warmup} warm-up"
        f"\n\nMachine: {machine_description(device)}; "
        f"load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after"
    )
    print(markdown(rows, header, gpu))


if __name__ == "__main__":
    main()
