"""Interpolate between two images in representation space and sample along the path.

    python -m stages.interpolate --config configs/interpolate/default.yaml \\
        --set checkpoint=runs/demo/train first=a.png second=b.png steps_r=9 mode=linear out=runs/interpolate

For r = 0, 1/(steps_r - 1), ..., 1 the model is conditioned on f(r) (``mode=linear``: (1 - r) f1 + r f2;
``mode=slerp``: spherical, see rcdm.editing). Each of the ``n`` rows uses ONE x_T for every r (seed
``sample_seed(seed, 0, row)``), so the row changes only through the representation, and its ends are
exactly the samples ``stages.sample`` draws from the two images with the same seed.

Writes into ``out``: ``grid.png`` (each row: the first real crop, the samples for r = 0 ... 1, the second
real crop), ``samples_{N}x{H}x{W}x3.npz`` (``keys`` hold "r=<value>"), ``samples.json`` (ratios too).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal, Optional

from rcdm.api import RCDMError, shared_noise_seeds
from rcdm.editing import ratios
from stages.sample import RunConfig, load_model, run_meta, run_stage, write_outputs


@dataclass(frozen=True)
class InterpolateConfig(RunConfig):
    out: str = "runs/interpolate"
    n: int = 2  # rows, each with its own x_T
    first: Optional[str] = None
    second: Optional[str] = None
    steps_r: int = 9  # points on the path, ends included
    mode: Literal["linear", "slerp"] = "linear"


def interpolate_stage(cfg: InterpolateConfig) -> dict[str, str]:
    if not cfg.first or not cfg.second:
        raise RCDMError("give the two end images: first=<image> second=<image>")
    started = time.time()
    rcdm = load_model(cfg)
    ends = rcdm.prepare([cfg.first, cfg.second])
    sampling_started = time.time()
    x = rcdm.interpolate(
        ends.features[0],
        ends.features[1],
        steps_r=cfg.steps_r,
        mode=cfg.mode,
        seed=cfg.seed,
        n=cfg.n,
        guidance=cfg.sampler.guidance,
        progress=cfg.progress,
    )  # (n, steps_r, 3, H, W)
    r = [round(float(v), 6) for v in ratios(cfg.steps_r)]
    meta = run_meta(rcdm, cfg, started, sampling_started, x.shape[0] * x.shape[1])
    meta.update(stage="interpolate", first=ends.keys[0], second=ends.keys[1], mode=cfg.mode, ratios=r)
    written = write_outputs(
        cfg.out, x, keys=[f"r={v:g}" for _ in range(cfg.n) for v in r],
        seeds=shared_noise_seeds(cfg.seed, cfg.n, cfg.steps_r, "rows"), meta=meta,
        lead=ends.reals[:1].expand(cfg.n, -1, -1, -1), tail=ends.reals[1:].expand(cfg.n, -1, -1, -1),
        save_individual=cfg.save_individual,
    )  # fmt: skip
    print(
        f"wrote {cfg.n} x {cfg.steps_r} interpolation samples to {cfg.out} ({meta['time']['seconds']:.1f}s)"
    )
    return written


def main(argv: list[str] | None = None) -> int:
    return run_stage(interpolate_stage, InterpolateConfig, "interpolate", argv, __doc__)


if __name__ == "__main__":
    raise SystemExit(main())
