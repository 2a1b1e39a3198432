"""Training throughput: precomputed features from shards (stage two) vs upstream RCDM's online encoder.

Both modes train the same UNet with the same batch, optimizer and loss; only the source of the
conditioning feature differs:

    precomputed   FeatureStream over feature shards (PNG crop + stored feature, rcdm/data.py)
    online        upstream RCDM: every step decodes the JPEG, takes the 224 encoder crop and the
                  training crop (same field of view, same random flip) and runs the frozen encoder

The data loaders are also timed alone (no training), and the one-off stage-one cost of the shards
(encode every crop and its mirror) is reported, so the break-even number of epochs can be read off.
Rows are measured interleaved ``--repeats`` times and the best of each is kept (robust to other load).

    python bench/train.py                                         # CPU: tiny UNet, mobilenet_v2, ~2 min
    python bench/train.py --encoder supervised                    # RCDM's ResNet-50 (2048-d) encoder
    python bench/train.py --device cuda --model rcdm128 --batch 32 --image-size 128 --workers 8
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

from rcdm import data, images, shards, storage  # noqa: E402
from rcdm.config import load_config, preset_path  # noqa: E402
from rcdm.diffusion import DiffusionConfig, build_diffusion  # noqa: E402
from rcdm.encoders import load_encoder  # noqa: E402
from rcdm.unet import UNet, UNetConfig  # noqa: E402


def make_jpegs(folder: Path, n: int, seed: int = 0) -> list[Path]:
    """n photo-sized JPEGs (400x350, quality 90): smooth colour fields plus grain, so they compress
    like photographs rather than like flat colour or pure noise."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        coarse = rng.integers(0, 256, (6, 7, 3), dtype=np.uint8)
        field = np.asarray(Image.fromarray(coarse).resize((400, 350), Image.BICUBIC), dtype=np.int16)
        grain = rng.integers(-20, 21, field.shape, dtype=np.int16)
        arr = np.clip(field + grain, 0, 255).astype(np.uint8)
        path = folder / f"img_{i:05d}.jpg"
        Image.fromarray(arr).save(path, quality=90)
        paths.append(path)
    return paths


def crops(path: Path, encoder_size: int, image_size: int, flip: bool) -> tuple[np.ndarray, np.ndarray]:
    """The encoder crop and the training crop of one JPEG (ADM center crops of one decode)."""
    pil = images.open_image(path.read_bytes())
    big, small = images.center_crop_arr(pil, encoder_size), images.center_crop_arr(pil, image_size)
    if flip:
        big, small = big[:, ::-1], small[:, ::-1]
    return np.ascontiguousarray(big), np.ascontiguousarray(small)


def write_shards(
    root: Path, paths: list[Path], encoder, image_size: int, per_shard: int, batch: int
) -> float:
    """Stage one in miniature: crops, features of each crop and its mirror, shards + manifest.
    Returns images per second of this one-off cost."""
    start = time.perf_counter()
    samples = []
    for i in range(0, len(paths), batch):
        chunk = paths[i : i + batch]
        pairs = [crops(p, encoder.input_size, image_size, False) for p in chunk]
        x = images.to_model(np.stack([b for b, _ in pairs]))  # (n, 3, 224, 224)
        feat, feat_flip = encoder.encode(x), encoder.encode(x.flip(-1))  # (n, D) each
        for p, (_, small), f, ff in zip(chunk, pairs, feat, feat_flip):
            key = shards.make_key(p.name)
            samples.append(shards.encode_sample(key, small, f.cpu().numpy(), ff.cpu().numpy()))
    seconds = time.perf_counter() - start
    entries = []
    for s in range(0, len(samples), per_shard):
        name = shards.shard_name(s // per_shard)
        storage.write_bytes_atomic(str(root / name), shards.write_tar(samples[s : s + per_shard]))
        entries.append({"name": name, "count": len(samples[s : s + per_shard])})
    manifest = {
        "format": shards.FORMAT,
        "encoder": encoder.describe(),
        "image": {"size": image_size, "format": "png"},
        "shards": entries,
    }
    storage.write_json_atomic(str(root / shards.MANIFEST), manifest)
    return len(paths) / seconds


class JpegDataset(Dataset):
    """Upstream RCDM's loader: decode, crop twice, random flip, every time a sample is drawn."""

    def __init__(self, paths: list[Path], encoder_size: int, image_size: int) -> None:
        self.paths, self.encoder_size, self.image_size = paths, encoder_size, image_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        flip = bool(torch.rand(()) < 0.5)  # torch's RNG: seeded per DataLoader worker
        big, small = crops(self.paths[i], self.encoder_size, self.image_size, flip)
        return images.to_model(big), images.to_model(small)


def endless(loader: DataLoader):
    while True:
        yield from loader


@dataclasses.dataclass
class Trainer:
    model: UNet
    opt: torch.optim.Optimizer
    device: torch.device

    def step(self, diffusion, x0: torch.Tensor, feat: torch.Tensor) -> None:
        # a grey model (in_channels 1) trains on the crops' luma, as stage two does
        x0 = images.to_channels(x0.to(self.device), self.model.cfg.in_channels)
        feat = feat.to(self.device)
        t = torch.randint(0, diffusion.num_timesteps, (x0.shape[0],), device=self.device)
        loss = diffusion.training_losses(self.model, x0, t, feat)["loss"].mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_loader(it, n: int, batch: int) -> float:
    next(it)  # workers started, first batch ready
    start = time.perf_counter()
    for _ in range(n):
        next(it)
    return n * batch / (time.perf_counter() - start)


def time_training(make_batch, trainer: Trainer, diffusion, n: int, warmup: int, batch: int) -> float:
    for _ in range(warmup):
        trainer.step(diffusion, *make_batch())
    sync(trainer.device)
    start = time.perf_counter()
    for _ in range(n):
        trainer.step(diffusion, *make_batch())
    sync(trainer.device)
    return n * batch / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--encoder",
        default="mobilenet_v2",
        help="encoder name (random weights): mobilenet_v2, supervised, ...",
    )
    ap.add_argument("--model", default="tiny", help="UNet preset (configs/model)")
    ap.add_argument("--image-size", type=int, default=None, help="training crop size (default: the preset's)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=6, help="timed training steps per row and repeat")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--loader-batches", type=int, default=20, help="timed batches of the loader-only rows")
    ap.add_argument("--images", type=int, default=64, help="source JPEGs")
    ap.add_argument("--workers", type=int, default=1, help="DataLoader workers of both pipelines")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = ap.parse_args()

    device = (
        torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if args.device == "auto"
        else torch.device(args.device)
    )
    encoder = load_encoder(args.encoder, weights="random", device=device)
    mcfg = load_config(UNetConfig, preset_path("model", args.model))
    mcfg = dataclasses.replace(
        mcfg, feature_dim=encoder.feature_dim, image_size=args.image_size or mcfg.image_size
    )
    size = mcfg.image_size
    diffusion = build_diffusion(DiffusionConfig())
    torch.manual_seed(0)
    model = UNet(mcfg).to(device)
    trainer = Trainer(model, torch.optim.AdamW(model.parameters(), lr=1e-4), device)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "jpeg").mkdir()
        paths = make_jpegs(tmp / "jpeg", args.images)
        stage_one_ips = write_shards(tmp / "feats", paths, encoder, size, per_shard=32, batch=args.batch)
        shard_set = data.open_shards(str(tmp / "feats"), feature_dim=encoder.feature_dim, image_size=size)
        stream = data.FeatureStream(
            shard_set, micro_batch=args.batch, rank=0, world_size=1, seed=0, shuffle_buffer=64, flip=True,
            feature_dim=encoder.feature_dim, image_size=size,
        )  # fmt: skip
        shard_it = endless(data.make_loader(stream, args.workers, pin_memory=device.type == "cuda"))
        jpeg_loader = DataLoader(
            JpegDataset(paths, encoder.input_size, size), batch_size=args.batch, shuffle=True, drop_last=True,
            num_workers=args.workers, persistent_workers=args.workers > 0, pin_memory=device.type == "cuda",
        )  # fmt: skip
        jpeg_it = endless(jpeg_loader)

        def precomputed():
            b = next(shard_it)
            return b["x"], b["feat"]

        def online():
            big, small = next(jpeg_it)
            return small, encoder.encode(big)  # the encoder runs every step, as upstream

        best: dict[str, float] = {}
        rows = {
            "loader only: feature shards": lambda: time_loader(shard_it, args.loader_batches, args.batch),
            "loader only: JPEG decode + 2 crops": lambda: time_loader(jpeg_it, args.loader_batches, args.batch),
            "train: precomputed features": lambda: time_training(precomputed, trainer, diffusion, args.steps, args.warmup, args.batch),
            "train: online encoder (upstream)": lambda: time_training(online, trainer, diffusion, args.steps, args.warmup, args.batch),
        }  # fmt: skip
        for _ in range(args.repeats):
            for name, fn in rows.items():
                best[name] = max(best.get(name, 0.0), fn())

    ratio = best["train: precomputed features"] / best["train: online encoder (upstream)"]
    n_params = sum(p.numel() for p in model.parameters()) / 1e6
    print(
        f"\nRCDM training throughput ({device.type}: {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__})\n"
        f"UNet '{args.model}' {size}px, {n_params:.2f}M params; encoder {encoder.key} ({encoder.feature_dim}-d, "
        f"random weights, {encoder.input_size}px); batch {args.batch}; {args.workers} loader worker(s); "
        f"best of {args.repeats}\n"
    )
    width = max(len(k) for k in best) + 2
    print(f"{'row':<{width}}{'img/s':>10}")
    for name, ips in best.items():
        print(f"{name:<{width}}{ips:>10.1f}")
    print(f"{'speed-up, precomputed / online':<{width}}{ratio:>9.2f}x")
    print(f"{'one-off stage-one cost (crop + mirror)':<{width}}{stage_one_ips:>10.1f}")
    online_ips = best["train: online encoder (upstream)"]
    saved_per_epoch = 1 / online_ips - 1 / best["train: precomputed features"]  # seconds per image
    if saved_per_epoch > 0:
        print(f"stage one pays for itself after {(1 / stage_one_ips) / saved_per_epoch:.2f} epochs")
    if args.json:
        result = {"rows": best, "ratio": ratio, "stage_one_images_per_sec": stage_one_ips, "args": vars(args)}
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    sys.stdout.flush()
    os._exit(0)  # DataLoader workers of the endless iterators need no orderly teardown


if __name__ == "__main__":
    main()
