"""Sample images from representations: n samples per conditioning image (or per stored feature).

    python -m stages.sample --config configs/sample/default.yaml \\
        --set checkpoint=runs/demo/train images=photos/ out=runs/samples n=8 \\
              sampler.name=ddim sampler.steps=50 seed=0

    # condition on stored features of a feature-shard dataset, without re-encoding
    python -m stages.sample --set checkpoint=runs/demo/train features=runs/demo/features/test \\
        keys=[key1,key2] out=runs/samples

``checkpoint``: one of our checkpoint files, a training run folder (its newest checkpoint) or a released
name (``dino-trunk``, ...). The encoder is the one the checkpoint names (``encoder.*`` overrides it, and
must be given for a released state dict loaded from a file).

Writes into ``out``: ``grid.png`` (one row per conditioning item: its real crop, then its samples;
raw pixels, never rescaled), ``samples_{N}x{H}x{W}x3.npz`` (``arr_0`` uint8 NHWC, the ADM evaluator's
format, plus ``keys`` and ``seeds`` per sample), ``individual/`` PNGs with ``save_individual=true``,
and ``samples.json`` (written last): checkpoint, encoder, sampler settings, seeds, timings.

This module also holds what the interpolate and manipulate stages share (RunConfig, load_model,
write_outputs).
"""

from __future__ import annotations

import argparse
import datetime
import io
import time
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

import numpy as np
import torch

from rcdm import images, storage
from rcdm.api import RCDM, RCDMError, load_shard_features, sample_seeds
from rcdm.checkpoint import CheckpointError
from rcdm.config import CONFIGS_DIR, ConfigError, to_dict
from rcdm.editing import EditingError
from rcdm.encoders import EncoderError
from rcdm.samplers import SamplerConfig
from rcdm.shards import ManifestError
from rcdm.unet import UNetConfig
from rcdm.weights import WeightsError
from stages.cli import add_config_args, config_from_args, fail

# Errors caused by the user's inputs: reported in one line, without a traceback.
USER_ERRORS = (
    RCDMError, EditingError, CheckpointError, EncoderError, WeightsError, images.ImageError, ManifestError,
    ConfigError, FileNotFoundError,
)  # fmt: skip


@dataclass(frozen=True)
class EncoderOptions:
    name: Optional[str] = None  # None = the encoder the checkpoint names
    head: Optional[bool] = None  # None = the checkpoint's choice
    weights: Optional[str] = None  # a path, a URL or "random"; None = the checkpoint's (official or random)
    input_size: Optional[int] = None  # None = the checkpoint's, else the encoder's own (224)


@dataclass(frozen=True)
class RunConfig:
    """What every sampling stage shares."""

    checkpoint: Optional[str] = None  # checkpoint file, training run folder, or released name
    out: str = "runs/samples"
    n: int = 8  # samples per conditioning item (per row)
    seed: int = 0
    encoder: EncoderOptions = field(default_factory=EncoderOptions)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    model: Optional[UNetConfig] = field(default=None, metadata={"preset": "model"})  # for foreign state dicts
    ema_rate: Union[str, float, None] = "auto"  # "auto" = first EMA, a rate such as "0.9999", null = raw
    batch_size: int = 16
    device: Optional[str] = None  # None or "auto" = cuda when available
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    save_individual: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("n", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class SampleConfig(RunConfig):
    images: Union[str, list[str], None] = None  # image files, folders or URLs
    features: Optional[str] = None  # a feature-shard dataset root (instead of images)
    keys: Union[str, list[str], None] = None  # sample keys in the shards; None = the first n_items
    n_items: int = 8


# --- shared by the sampling stages ----------------------------------------------------------------


def load_model(cfg: RunConfig) -> RCDM:
    """The RCDM of ``cfg.checkpoint`` with the config's encoder and sampler options."""
    if not cfg.checkpoint:
        raise RCDMError("no checkpoint given: set checkpoint=<file | run folder | released name>")
    return RCDM.from_pretrained(
        cfg.checkpoint,
        encoder=cfg.encoder.name,
        weights=cfg.encoder.weights,
        device=cfg.device,
        sampler=cfg.sampler.name,
        steps=cfg.sampler.steps,
        head=cfg.encoder.head,
        input_size=cfg.encoder.input_size,
        model_config=cfg.model,
        ema_rate=cfg.ema_rate,
        eta=cfg.sampler.eta,
        batch_size=cfg.batch_size,
        precision=cfg.precision,
    )


def _npz_bytes(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def write_outputs(
    out: str,
    samples: torch.Tensor,
    *,
    keys: list[str],
    seeds: list[int],
    meta: dict[str, Any],
    lead: torch.Tensor | None = None,
    tail: torch.Tensor | None = None,
    save_individual: bool = False,
) -> dict[str, str]:
    """Write a stage's results; returns {what: url}.

    ``samples`` (R, C, 3, H, W) in [-1, 1]; ``keys`` and ``seeds`` one per sample, row-major; ``lead``
    and ``tail`` (R, 3, H, W) uint8 real crops put before / after each grid row. ``meta`` goes into the
    JSON sidecar, which is written last.
    """
    rows, cols, _, h, w = samples.shape
    u8 = images.to_uint8(samples)  # (R, C, 3, H, W) uint8, rounded, never rescaled
    storage.makedirs(out)
    parts = (
        ([lead[:, None]] if lead is not None else []) + [u8] + ([tail[:, None]] if tail is not None else [])
    )
    grid_rows = torch.cat(parts, dim=1)  # (R, C', 3, H, W)
    written = {"grid": storage.join(out, "grid.png")}
    images.save_png(images.make_grid(grid_rows.flatten(0, 1), nrow=grid_rows.shape[1]), written["grid"])
    flat = u8.flatten(0, 1)  # (N, 3, H, W)
    written["npz"] = storage.join(out, f"samples_{flat.shape[0]}x{h}x{w}x3.npz")
    storage.write_bytes_atomic(
        written["npz"],
        _npz_bytes(
            arr_0=images.to_hwc(flat), keys=np.asarray(keys, dtype=str), seeds=np.asarray(seeds, np.int64)
        ),
    )
    if save_individual:
        for i in range(rows):
            for j in range(cols):
                images.save_png(
                    images.to_hwc(u8[i, j][None])[0], storage.join(out, "individual", f"{i:03d}_{j:03d}.png")
                )
    written["json"] = storage.join(out, "samples.json")
    storage.write_json_atomic(written["json"], {**meta, "keys": keys, "seeds": seeds, "files": written})
    return written


def run_meta(
    rcdm: RCDM, cfg: RunConfig, started: float, sampling_started: float, n_samples: int
) -> dict[str, Any]:
    """The JSON sidecar's common part: checkpoint, encoder, sampler settings, timing (the whole run,
    and the sampling alone per image)."""
    now = time.time()
    return {
        "checkpoint": {k: rcdm.info.get(k) for k in ("source", "kind", "step")},
        "model": rcdm.info.get("config"),
        "encoder": rcdm.encoder_description(),
        "sampler": cfg.sampler.name,
        "steps": cfg.sampler.steps,
        "eta": cfg.sampler.eta,
        "guidance": cfg.sampler.guidance,
        "seed": cfg.seed,
        "precision": cfg.precision,
        "device": str(rcdm.device),
        "config": to_dict(cfg),
        "time": {
            "started": datetime.datetime.fromtimestamp(started, datetime.timezone.utc).isoformat(),
            "seconds": round(now - started, 3),
            "sampling_seconds_per_image": round((now - sampling_started) / max(1, n_samples), 4),
        },
    }


def run_stage(main_fn, cfg_cls: type, stage: str, argv: list[str] | None, doc: str | None) -> int:
    """Parse ``--config/--set``, run ``main_fn(cfg)``; bad input ends with a one-line error, exit 2."""
    default_config = str(CONFIGS_DIR / stage / "default.yaml")
    parser = argparse.ArgumentParser(
        prog=f"python -m stages.{stage}", description=(doc or "").split("\n\n")[0]
    )
    add_config_args(parser, default_config)
    cfg = config_from_args(cfg_cls, parser.parse_args(argv))
    try:
        main_fn(cfg)
    except USER_ERRORS as e:
        fail(" ".join(str(e).split()))  # one line, even for messages that list a URL and a path
    return 0


def _as_list(value: Union[str, list[str], None]) -> list[str] | None:
    return [value] if isinstance(value, str) else value


# --- this stage -----------------------------------------------------------------------------------


def sample_stage(cfg: SampleConfig) -> dict[str, str]:
    if (cfg.images is None) == (cfg.features is None):
        raise RCDMError("give either images=<files | folder | url> or features=<feature-shard dataset root>")
    started = time.time()
    rcdm = load_model(cfg)
    if cfg.features is not None:
        cond = load_shard_features(
            cfg.features, _as_list(cfg.keys), cfg.n_items, image_size=rcdm.image_size,
            expect=rcdm.expected_encoder(),
        )  # fmt: skip
    else:
        cond = rcdm.prepare(_as_list(cfg.images))
    sampling_started = time.time()
    x = rcdm.sample(
        cond.features, n=cfg.n, seed=cfg.seed, guidance=cfg.sampler.guidance, progress=cfg.progress
    )  # (L, n, 3, H, W)
    meta = run_meta(rcdm, cfg, started, sampling_started, x.shape[0] * x.shape[1])
    meta["stage"] = "sample"
    meta["items"] = cond.keys
    written = write_outputs(
        cfg.out, x, keys=[k for k in cond.keys for _ in range(cfg.n)],
        seeds=sample_seeds(cfg.seed, len(cond.keys), cfg.n), meta=meta, lead=cond.reals,
        save_individual=cfg.save_individual,
    )  # fmt: skip
    print(
        f"wrote {x.shape[0] * x.shape[1]} samples of {len(cond.keys)} items to {cfg.out} ({meta['time']['seconds']:.1f}s)"
    )
    return written


def main(argv: list[str] | None = None) -> int:
    return run_stage(sample_stage, SampleConfig, "sample", argv, __doc__)


if __name__ == "__main__":
    raise SystemExit(main())
