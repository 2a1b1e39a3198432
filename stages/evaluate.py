"""Evaluate a representation-conditional model in its encoder's feature space.

    python -m stages.evaluate --config configs/evaluate/default.yaml \\
        --set checkpoint=runs/demo/train heldout=runs/demo/features/test \\
              bank=runs/demo/features/train/bank.h5 out=runs/demo/eval

For ``n_items`` held-out items (a seeded random subset of a pool of ``retrieval_pool`` items of the
held-out feature set), draw ``samples_per_item`` samples conditioned on each item's stored feature
f_i, encode every sample with the checkpoint's own encoder (rebuilt from the ``describe()`` stored in
the checkpoint; the sample goes through the encoder's ADM crop/resize exactly as an image would), and
report (formulas in ``rcdm.metrics``):

* ``class_agreement``: k-NN over the train ``bank`` predicts each sample's class; the fraction equal
  to the conditioning image's label. ``knn_ceiling``: the same classifier on the items' stored real
  features (what a perfect generator reaches); ``knn_ceiling_crops``: on the re-encoded real
  training-resolution crops (the same pixels-to-feature path as the samples); ``chance``.
* ``retrieval_top1``, ``mean_rank``, ``median_rank``: rank of the conditioning item's stored feature
  among the ``retrieval_pool`` held-out features, ordered by similarity to the sample's feature.
* ``frechet_distance``: between Gaussians fitted to the samples' features and to the re-encoded
  real crops of the pool (same path); comparable only between runs with equal sample counts.
* ``feature_precision`` / ``feature_recall``: improved precision and recall (k = 3) of the samples'
  features against the re-encoded real crops: fidelity (samples inside the real manifold) and
  coverage (real crops inside the samples' manifold).
* the shuffled control, ``shuffled_class_agreement`` / ``shuffled_retrieval_top1``: the samples are
  scored against a derangement of their conditioning (the samples drawn from item pi(i) are
  scored as if drawn from item i). This is the same in distribution as sampling from permuted
  features, at no extra sampling cost; it must fall to ``chance`` and ~1 / ``retrieval_pool``.
* Inception FID / IS / precision / recall: only with ``inception_weights`` = a local file of torchvision's Inception-v3
  ImageNet weights (``inception_v3_google-0cc3c7bd.pth``, normally in the torch hub cache); nothing is
  downloaded. Without it these keys say ``"absent"``. The samples are also written as
  ``samples_NxHxWx3.npz`` (``arr_0``, uint8 NHWC), the input of the standard ADM evaluator.

Outputs in ``out``: ``metrics.json`` (written last), ``report.md``, ``samples.png`` (rows: the real
crop, then its samples), the npz, ``evaluate_config.yaml``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Literal, Optional, Union

import numpy as np
import torch
from PIL import Image

from rcdm import images, metrics, shards, storage
from rcdm.bank import FeatureBank
from rcdm.checkpoint import CheckpointError, diffusion_config_of, load_unet
from rcdm.config import to_yaml
from rcdm.diffusion import build_diffusion
from rcdm.dist import native_bf16
from rcdm.encoders import Encoder, EncoderError, load_encoder
from rcdm.samplers import sample, sample_seed
from stages.cli import add_config_args, config_from_args, fail

ABSENT = "absent"


@dataclass(frozen=True)
class EvaluateConfig:
    checkpoint: str = ""  # a checkpoint file, a training run folder (its newest), or a released name
    heldout: str = ""  # root of the held-out feature set (its manifest.json)
    bank: str = ""  # bank.h5 of the train feature set (k-NN classifier)
    out: str = "runs/evaluate"
    n_items: int = 200  # conditioning items (a subset of the retrieval pool)
    samples_per_item: int = 2
    retrieval_pool: int = 200  # held-out items the conditioning item is ranked among
    k: int = 10  # k-NN neighbours
    metric: Literal["cosine", "l2"] = "cosine"
    sampler: Literal["ddim", "ancestral", "dpm++"] = "ddim"
    steps: int = 20
    eta: float = 1.0
    guidance: float = 0.0  # classifier-free guidance scale w
    ema: Union[str, float, None] = "auto"  # "auto" = the checkpoint's first EMA, a rate (0.9999), null = raw
    seed: int = 0
    batch_size: int = 64
    grid_items: int = 8  # rows of samples.png
    precision: Literal["fp32", "bf16"] = "fp32"  # sampling; bf16 autocasts where the device has native bf16
    device: str = "auto"  # "auto" = cuda when available
    inception_weights: Optional[str] = None  # local Inception-v3 weights file; None = FID/IS "absent"

    def __post_init__(self) -> None:
        for name in ("n_items", "samples_per_item", "retrieval_pool", "k", "steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.n_items < 2:
            raise ValueError(
                f"n_items must be at least 2, got {self.n_items}: the shuffled control scores each item's "
                "samples against another item's conditioning"
            )
        if self.n_items > self.retrieval_pool:
            raise ValueError(
                f"n_items ({self.n_items}) must not exceed retrieval_pool ({self.retrieval_pool}): the "
                "conditioning items are ranked among the pool"
            )


# --- inputs ---------------------------------------------------------------------------------------


@dataclass
class HeldOut:
    """The pool of held-out items; the first ``n_items`` rows are the conditioning items."""

    keys: list[str]
    crops: np.ndarray  # (P, H, W, 3) uint8
    feats: torch.Tensor  # (P, D) stored features
    labels: torch.Tensor  # (P,) long, -1 unknown


def select_pool(total: int, pool: int, seed: int) -> np.ndarray:
    """A seeded random subset of ``pool`` indices of ``range(total)`` (held-out sets are class-sorted)."""
    if pool > total:
        raise ValueError(f"retrieval_pool {pool} is larger than the {total} held-out items: lower it")
    return np.random.default_rng(seed).permutation(total)[:pool]


def load_heldout(root: str, manifest: dict[str, Any], chosen: np.ndarray) -> HeldOut:
    """Read the chosen global indices (shard order) from the held-out shards, in ``chosen`` order."""
    where = {int(g): i for i, g in enumerate(chosen)}
    rows: list[shards.FeatureSample | None] = [None] * len(chosen)
    start = 0
    for entry, url in zip(manifest["shards"], shards.shard_urls(root, manifest)):
        count = int(entry["count"])
        if any(start <= g < start + count for g in where):
            for j, s in enumerate(shards.read_shard(url)):
                if start + j in where:
                    rows[where[start + j]] = s
        start += count
    missing = [int(chosen[i]) for i, r in enumerate(rows) if r is None]
    if missing:
        raise shards.ManifestError(
            f"{root}: items {missing[:5]} listed by the manifest are not in its shards"
        )
    return HeldOut(
        keys=[r.key for r in rows],
        crops=np.stack([r.image for r in rows]),
        feats=torch.from_numpy(np.stack([r.feature for r in rows])).float(),
        labels=torch.tensor([-1 if r.label is None else r.label for r in rows], dtype=torch.long),
    )


def encoder_from_description(desc: dict[str, Any], device: str) -> Encoder:
    """Rebuild the encoder a checkpoint was trained with and check it is the same function."""
    weights = "random" if desc.get("weights_id") == "random" else None
    enc = load_encoder(
        desc["name"],
        head=bool(desc.get("head")),
        weights=weights,
        device=device,
        input_size=desc.get("input_size"),
        precision=desc.get("precision", "fp32"),
    )
    want = desc.get("weights_id")
    if want and want != "random" and enc.weights_id != want:
        raise ValueError(
            f"the checkpoint's encoder {desc['name']} used weights {want[:16]}..., but the file found now "
            f"has {enc.weights_id[:16]}...: put the original weights file in place"
        )
    return enc


def check_consistency(enc: Encoder, bank: FeatureBank, manifest: dict, image_size: int, cfg: EvaluateConfig):
    hint = "evaluate with the feature sets the checkpoint was trained on (same encoder and preprocessing)"
    shards.check_manifest(
        manifest, feature_dim=enc.feature_dim, image_size=image_size, encoder=enc.name, head=enc.head,
        root=f"held-out shards at {cfg.heldout}", fix_hint=hint,
    )  # fmt: skip
    be = bank.encoder
    if be.get("name") != enc.name or int(be.get("feature_dim", -1)) != enc.feature_dim:
        raise ValueError(
            f"bank {cfg.bank} holds {be.get('name')} {be.get('feature_dim')}-d features but the checkpoint's "
            f"encoder is {enc.name} {enc.feature_dim}-d: {hint}"
        )
    for name, d in (("bank", be), ("held-out shards", manifest["encoder"])):
        wid = d.get("weights_id")
        if wid and wid != enc.weights_id:
            raise ValueError(f"the {name} were made with encoder weights {wid[:16]}..., the checkpoint's "
                             f"encoder has {enc.weights_id[:16]}...: {hint}")  # fmt: skip


# --- sampling and encoding ------------------------------------------------------------------------


def sampling_precision(cfg: EvaluateConfig, device: str) -> str:
    """The precision sampling runs in: bf16 falls back to fp32 where the device has no native bf16."""
    return "bf16" if cfg.precision == "bf16" and native_bf16(torch.device(device)) else "fp32"


def draw_samples(
    model, diffusion, feats: torch.Tensor, image_size: int, cfg: EvaluateConfig, device: str
) -> torch.Tensor:
    """uint8 (n_items, samples_per_item, 3, H, W): sample j of item i has seed sample_seed(seed, i, j)."""
    n, s = feats.shape[0], cfg.samples_per_item
    pairs = [(i, j) for i in range(n) for j in range(s)]
    size, channels = image_size, model.cfg.in_channels
    out = []
    t0 = time.time()
    bf16 = sampling_precision(cfg, device) == "bf16"
    if cfg.precision == "bf16" and not bf16:
        print(f"note: precision bf16: this {device} has no native bf16; sampling in fp32", flush=True)
    for b in range(0, len(pairs), cfg.batch_size):
        batch = pairs[b : b + cfg.batch_size]
        f = feats[[i for i, _ in batch]].to(device)  # (B, D)
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
            x = sample(
                model, diffusion, (len(batch), channels, size, size), f, sampler=cfg.sampler, steps=cfg.steps,
                eta=cfg.eta, guidance=cfg.guidance, seeds=[sample_seed(cfg.seed, i, j) for i, j in batch],
                device=device,
            )  # fmt: skip
        out.append(images.to_uint8(images.to_channels(x, 3)).cpu())  # grey models: back to RGB
        done = b + len(batch)
        print(f"sampled {done}/{len(pairs)} ({time.time() - t0:.0f}s)", flush=True)
    return torch.cat(out).reshape(n, s, 3, size, size)


def encode_uint8(enc: Encoder, batch: torch.Tensor | np.ndarray, chunk: int = 256) -> torch.Tensor:
    """Features (N, D) of uint8 images (N, 3, H, W) or (N, H, W, 3), through ``enc.preprocess``."""
    arr = batch.permute(0, 2, 3, 1).numpy() if isinstance(batch, torch.Tensor) else np.asarray(batch)
    out = []
    for b in range(0, len(arr), chunk):
        x = torch.stack([enc.preprocess(Image.fromarray(a)) for a in arr[b : b + chunk]])
        out.append(enc.encode(x).cpu())
    return torch.cat(out) if out else torch.zeros(0, enc.feature_dim)


# --- metrics --------------------------------------------------------------------------------------


def knn_predict(
    bank: FeatureBank, queries: torch.Tensor, k: int, metric: str, num_classes: int
) -> torch.Tensor:
    scores, idx = bank.knn(queries.numpy(), k, metric)
    sims = torch.from_numpy(scores) if metric == "cosine" else -torch.from_numpy(scores)  # larger = closer
    labels = torch.from_numpy(bank.labels[idx])  # (Q, k)
    if (labels < 0).any():
        raise ValueError(f"bank {bank.url} has unlabelled rows: class agreement needs a labelled train set")
    return metrics.knn_vote(labels, sims, num_classes)


def derangement(n: int, seed: int) -> torch.Tensor:
    """A permutation pi of range(n) with no fixed point (one n-cycle through a random order)."""
    if n < 2:
        raise ValueError("the shuffled control needs at least 2 conditioning items")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    pi = torch.empty(n, dtype=torch.long)
    pi[order] = order.roll(-1)
    return pi


def compute_metrics(
    predict,
    sample_feats: torch.Tensor,
    held: HeldOut,
    crop_feats: torch.Tensor,
    n_items: int,
    metric: str,
    num_classes: int,
    seed: int,
) -> dict[str, Any]:
    """All feature-space metrics. ``predict(feats) -> labels``; ``sample_feats`` (n_items, S, D)."""
    n, s, d = sample_feats.shape
    flat = sample_feats.reshape(n * s, d)
    item = torch.arange(n).repeat_interleave(s)  # (n * S,) conditioning item of each sample
    y = held.labels[:n]
    pred = predict(flat)
    ceiling = metrics.agreement(predict(held.feats[:n]), y)
    ceiling_crops = metrics.agreement(predict(crop_feats[:n]), y)
    ranks = metrics.retrieval_ranks(flat, item, held.feats, metric)
    retrieval = metrics.retrieval_summary(ranks)

    pi = derangement(n, seed)
    # the samples of item pi(i) scored against item i: samples of item m stand for item pi^-1(m)
    inv = torch.empty_like(pi)
    inv[pi] = torch.arange(n)
    shuffled_item = inv[item]
    shuffled_ranks = metrics.retrieval_ranks(flat, shuffled_item, held.feats, metric)
    shuffled_retrieval = metrics.retrieval_summary(shuffled_ranks)
    return {
        "class_agreement": metrics.agreement(pred, y[item]),
        "knn_ceiling": ceiling,
        "knn_ceiling_crops": ceiling_crops,
        "chance": metrics.chance_agreement(pred, y[item], num_classes),
        "retrieval_top1": retrieval["top1"],
        "retrieval_pool": int(held.feats.shape[0]),
        "mean_rank": retrieval["mean_rank"],
        "median_rank": retrieval["median_rank"],
        "frechet_distance": metrics.frechet_distance(flat, crop_feats),
        **dict(zip(("feature_precision", "feature_recall"), precision_recall(crop_feats, flat))),
        "shuffled_class_agreement": metrics.agreement(pred, y[shuffled_item]),
        "shuffled_retrieval_top1": shuffled_retrieval["top1"],
        "shuffled_mean_rank": shuffled_retrieval["mean_rank"],
    }


PR_K = 3  # the k of the k-NN manifolds of precision and recall (the ADM evaluator's)


def precision_recall(
    real: torch.Tensor, fake: torch.Tensor, device: str | torch.device = "cpu"
) -> tuple[float | str, float | str]:
    """Improved precision and recall with k = PR_K, or "absent" for sets too small for k-NN radii."""
    if min(len(real), len(fake)) <= PR_K:
        return ABSENT, ABSENT
    return metrics.precision_recall(real, fake, k=PR_K, device=device)


# --- Inception FID / IS (optional, offline) --------------------------------------------------------


def inception_metrics(samples: torch.Tensor, reference: torch.Tensor, weights: str, device: str) -> dict:
    """FID (samples vs reference) and IS of uint8 (N, 3, H, W) images with torchvision's Inception-v3.

    Pool features (2048-d) for FID, logits (1008 or 1000 classes) for IS; images are resized
    bilinearly to 299 and fed in [-1, 1] (what ``transform_input=True`` makes of ImageNet-normalised
    input). Not bit-identical to the TensorFlow graph of the ADM evaluator: compare like with like.
    """
    import torchvision

    state = torch.load(weights, map_location="cpu", weights_only=True)
    num_classes = int(state["fc.weight"].shape[0])
    net = torchvision.models.inception_v3(
        weights=None, aux_logits="AuxLogits.fc.weight" in state, init_weights=False, num_classes=num_classes,
        transform_input=False,
    )  # fmt: skip
    net.load_state_dict(state)
    net.eval().to(device)
    pooled: dict[str, torch.Tensor] = {}
    net.avgpool.register_forward_hook(lambda m, i, o: pooled.__setitem__("x", o.flatten(1)))

    @torch.no_grad()
    def run(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats, logits = [], []
        for b in range(0, len(x), 32):
            xb = x[b : b + 32].to(device).float() / 127.5 - 1
            xb = torch.nn.functional.interpolate(xb, size=(299, 299), mode="bilinear", align_corners=False)
            out = net(xb)
            logits.append(out.cpu())
            feats.append(pooled["x"].cpu())
        return torch.cat(feats), torch.cat(logits)

    f_s, logits = run(samples)
    f_r, _ = run(reference)
    # ImageNet-scale sets: the k-NN distances on the GPU where there is one
    precision, recall = precision_recall(f_r, f_s, device)
    return {
        "inception_fid": metrics.frechet_distance(f_s, f_r),
        "inception_score": metrics.inception_score(logits),
        "inception_precision": precision,
        "inception_recall": recall,
    }


# --- report ---------------------------------------------------------------------------------------


def write_report(out: str, result: dict[str, Any], grid_name: str) -> None:
    def pct(x: Any) -> str:
        return f"{100 * x:.1f}%" if isinstance(x, (int, float)) else str(x)

    r = result
    lines = [
        "# Evaluation",
        "",
        f"Checkpoint `{r['checkpoint']}` (step {r['step']}), encoder `{r['encoder']}`; "
        f"{r['n_items']} held-out items x {r['samples_per_item']} samples ({r['sampler']}, {r['steps']} steps, "
        f"eta {r['eta']}, guidance {r['guidance']}); k-NN: k={r['k']}, {r['metric']}.",
        "",
        "| metric | value | meaning |",
        "|---|---|---|",
        f"| class agreement | {pct(r['class_agreement'])} | k-NN class of a sample = label of its conditioning image |",
        f"| k-NN ceiling | {pct(r['knn_ceiling'])} | same classifier on the real features (perfect generator) |",
        f"| k-NN ceiling, re-encoded crops | {pct(r['knn_ceiling_crops'])} | real crops through the samples' path |",
        f"| chance | {pct(r['chance'])} | agreement of conditioning-independent predictions |",
        f"| retrieval top-1 | {pct(r['retrieval_top1'])} | conditioning image ranked first among {r['retrieval_pool']} |",
        f"| mean / median rank | {r['mean_rank']:.1f} / {r['median_rank']:.0f} | of {r['retrieval_pool']} (chance: {(r['retrieval_pool'] + 1) / 2:.0f}) |",
        f"| Frechet distance (features) | {r['frechet_distance']:.2f} | samples vs real crops, encoder space |",
        f"| shuffled: class agreement | {pct(r['shuffled_class_agreement'])} | must be about chance |",
        f"| shuffled: retrieval top-1 | {pct(r['shuffled_retrieval_top1'])} | must be about 1/{r['retrieval_pool']} |",
        f"| precision / recall (features) | {pct(r['feature_precision'])} / {pct(r['feature_recall'])} | samples in the real crops' k=3 manifold / real crops in the samples' |",
        f"| Inception FID / IS | {r['inception_fid']} / {r['inception_score']} | needs `inception_weights` |",
        f"| Inception precision / recall | {pct(r['inception_precision'])} / {pct(r['inception_recall'])} | needs `inception_weights` |",
        "",
        f"![samples]({grid_name})",
        "",
        f"`{grid_name}`: each row is a held-out real crop followed by samples drawn from its representation.",
        "",
    ]  # fmt: skip
    storage.write_text_atomic(storage.join(out, "report.md"), "\n".join(lines))


# --- main -----------------------------------------------------------------------------------------


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def evaluate(cfg: EvaluateConfig) -> dict[str, Any]:
    for key in ("checkpoint", "heldout", "bank"):
        if not getattr(cfg, key):
            raise ValueError(f"'{key}' is not set: pass --set {key}=...")
    t0 = time.time()
    device = resolve_device(cfg.device)
    model, info = load_unet(cfg.checkpoint, ema_rate=cfg.ema, map_location=device)
    model.to(device)
    diffusion = build_diffusion(diffusion_config_of(info))
    if not info.get("encoder"):
        raise ValueError(f"{info['source']} does not say which encoder it was trained with")
    enc = encoder_from_description(info["encoder"], device)
    image_size = int(info["config"]["image_size"])

    manifest = shards.read_manifest(cfg.heldout)
    bank = FeatureBank(cfg.bank)
    check_consistency(enc, bank, manifest, image_size, cfg)
    total = int(sum(int(s["count"]) for s in manifest["shards"]))
    held = load_heldout(cfg.heldout, manifest, select_pool(total, cfg.retrieval_pool, cfg.seed))
    if (held.labels[: cfg.n_items] < 0).any():
        raise ValueError(f"held-out items at {cfg.heldout} have no labels: class agreement needs them")
    num_classes = len(bank.classes) if bank.classes else int(max(bank.labels.max(), held.labels.max())) + 1
    print(f"evaluating {info['source']} on {cfg.n_items} items of {cfg.heldout} ({device})", flush=True)

    samples = draw_samples(
        model, diffusion, held.feats[: cfg.n_items], image_size, cfg, device
    )  # (n, S, 3, H, W)
    n, s = samples.shape[:2]
    flat = samples.reshape(n * s, *samples.shape[2:])
    sample_feats = encode_uint8(enc, flat).reshape(n, s, -1)
    crop_feats = encode_uint8(enc, held.crops)

    def predict(q: torch.Tensor) -> torch.Tensor:
        return knn_predict(bank, q, cfg.k, cfg.metric, num_classes)

    result: dict[str, Any] = compute_metrics(
        predict, sample_feats, held, crop_feats, cfg.n_items, cfg.metric, num_classes, cfg.seed
    )
    real = torch.from_numpy(held.crops).permute(0, 3, 1, 2)  # (P, 3, H, W) uint8
    if cfg.inception_weights:
        if not os.path.isfile(cfg.inception_weights):
            raise FileNotFoundError(
                f"inception_weights {cfg.inception_weights} does not exist: put torchvision's "
                "inception_v3_google-0cc3c7bd.pth there, or leave inception_weights unset"
            )
        result.update(inception_metrics(flat, real, cfg.inception_weights, device))
    else:
        result.update(
            inception_fid=ABSENT, inception_score=ABSENT, inception_precision=ABSENT, inception_recall=ABSENT
        )

    storage.makedirs(cfg.out)
    grid_rows = []
    for i in range(min(cfg.grid_items, n)):
        grid_rows.append(real[i : i + 1])
        grid_rows.append(samples[i])
    grid = images.make_grid(torch.cat(grid_rows), nrow=1 + s)
    images.save_png(grid, storage.join(cfg.out, "samples.png"))
    npz_name = f"samples_{n * s}x{image_size}x{image_size}x3.npz"
    buf = io.BytesIO()
    np.savez(buf, arr_0=images.to_hwc(flat))
    storage.write_bytes_atomic(storage.join(cfg.out, npz_name), buf.getvalue())
    storage.write_text_atomic(storage.join(cfg.out, "evaluate_config.yaml"), to_yaml(cfg))

    result.update(
        n_items=n, samples_per_item=s, n_samples=n * s, num_classes=num_classes, k=cfg.k, metric=cfg.metric,
        sampler=cfg.sampler, steps=cfg.steps, eta=cfg.eta, guidance=cfg.guidance, seed=cfg.seed, precision=sampling_precision(cfg, device),
        checkpoint=info["source"], step=info.get("step"), encoder=enc.key, heldout=cfg.heldout, bank=cfg.bank,
        samples_npz=npz_name, samples_grid="samples.png", seconds=round(time.time() - t0, 1),
    )  # fmt: skip
    write_report(cfg.out, result, "samples.png")
    storage.write_json_atomic(storage.join(cfg.out, "metrics.json"), result)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.evaluate", description=__doc__.split("\n\n")[0])
    add_config_args(parser, "configs/evaluate/default.yaml")
    args = parser.parse_args(argv)
    cfg = config_from_args(EvaluateConfig, args)
    try:
        result = evaluate(cfg)
    except (ValueError, FileNotFoundError, CheckpointError, EncoderError) as e:
        fail(str(e))
    keys = (
        "class_agreement",
        "knn_ceiling",
        "chance",
        "retrieval_top1",
        "mean_rank",
        "shuffled_class_agreement",
    )
    print(json.dumps({k: result[k] for k in keys}), flush=True)
    print(f"wrote {storage.join(cfg.out, 'metrics.json')} and report.md", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
