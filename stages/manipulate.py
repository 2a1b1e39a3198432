"""RCDM's attribute transfer: remove or replace what a source image shares with its neighbours.

    python -m stages.manipulate --config configs/manipulate/default.yaml \\
        --set checkpoint=runs/demo/train source=a.png target=b.png neighbours=photos/ k=20 common=14

The neighbour pool is a folder of images (encoded in batches, then an exact cosine search in chunks)
or a feature bank (``.../bank.h5``, searched chunk by chunk: CPU or GPU, no faiss). The "common" dims
are those non-zero in more than ``common`` of the source's ``k`` nearest neighbours (``rule=nonzero``,
RCDM's rule for sparse ResNet trunk features; refused with an explanation on dense features) or among
the neighbours' top-``top_m`` |values| (``rule=top_magnitude``, for heads and ViTs); see rcdm.editing.

Writes into ``out``: ``grid.png`` with three rows sharing x_T column by column: the source crop then
samples of the source feature; the source crop then samples with the common dims zeroed; the target
crop then samples with the common dims taken from the target. Also the npz (``keys`` hold the row
labels) and ``samples.json`` (common dims, neighbours and their similarities).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal, Optional

import torch

from rcdm.api import RCDMError, shared_noise_seeds
from rcdm.editing import MANIPULATION_LABELS
from stages.sample import RunConfig, load_model, run_meta, run_stage, write_outputs


@dataclass(frozen=True)
class ManipulateConfig(RunConfig):
    out: str = "runs/manipulate"
    n: int = 4  # samples per conditioning (columns)
    source: Optional[str] = None  # the image whose shared attributes are edited
    target: Optional[str] = None  # the image the replacement values come from
    neighbours: Optional[str] = None  # a folder of images, or a feature bank (bank.h5)
    k: int = 20
    common: int = 14
    rule: Literal["nonzero", "top_magnitude"] = "nonzero"
    top_m: Optional[int] = None  # top_magnitude only; None = 10% of the feature dims


def manipulate_stage(cfg: ManipulateConfig) -> dict[str, str]:
    if not (cfg.source and cfg.target and cfg.neighbours):
        raise RCDMError("give source=<image> target=<image> neighbours=<folder of images | bank.h5>")
    started = time.time()
    rcdm = load_model(cfg)
    ends = rcdm.prepare([cfg.source, cfg.target])
    sampling_started = time.time()  # includes the neighbour search
    result = rcdm.manipulate(
        ends.features[0], ends.features[1], cfg.neighbours, k=cfg.k, common=cfg.common, rule=cfg.rule,
        top_m=cfg.top_m, n=cfg.n, seed=cfg.seed, guidance=cfg.sampler.guidance, progress=cfg.progress,
    )  # fmt: skip
    meta = run_meta(rcdm, cfg, started, sampling_started, 3 * cfg.n)
    meta.update(
        stage="manipulate", source=ends.keys[0], target=ends.keys[1], rows=list(MANIPULATION_LABELS),
        k=cfg.k, common=cfg.common, rule=cfg.rule, top_m=cfg.top_m, common_dims=result.dims,
        neighbours=[{"key": k, "similarity": round(s, 6)} for k, s in zip(result.neighbours, result.similarities)],
        neighbour_zero_fraction=round(result.zero_fraction, 6), skipped=result.skipped,
    )  # fmt: skip
    lead = torch.stack([ends.reals[0], ends.reals[0], ends.reals[1]])  # (3, 3, H, W)
    written = write_outputs(
        cfg.out, result.samples, keys=[label for label in MANIPULATION_LABELS for _ in range(cfg.n)],
        seeds=shared_noise_seeds(cfg.seed, 3, cfg.n, "cols"), meta=meta, lead=lead,
        save_individual=cfg.save_individual,
    )  # fmt: skip
    print(
        f"{len(result.dims)} common dims among the {cfg.k} neighbours; wrote 3 x {cfg.n} samples to {cfg.out}"
    )
    return written


def main(argv: list[str] | None = None) -> int:
    return run_stage(manipulate_stage, ManipulateConfig, "manipulate", argv, __doc__)


if __name__ == "__main__":
    raise SystemExit(main())
