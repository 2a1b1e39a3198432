"""The notebook API: load an RCDM, encode images, sample from representations, interpolate, manipulate.

    from rcdm.api import RCDM

    rcdm = RCDM.from_pretrained("runs/demo/train")          # our run folder (its newest checkpoint)
    rcdm = RCDM.from_pretrained("dino-trunk")               # a released model (needs its weight files)
    x = rcdm.sample(["cat.jpg", "dog.jpg"], n=8, seed=0)     # (2, 8, 3, H, W) in [-1, 1]
    row = rcdm.interpolate("cat.jpg", "dog.jpg", steps_r=9)  # (1, 9, 3, H, W): r = 0, 1/8, ..., 1
    edit = rcdm.manipulate("cat.jpg", "dog.jpg", "photos/")  # edit.samples (3, n, 3, H, W)

Inputs: an image is a path or fsspec URL, a PIL image, or a folder (all its images, sorted); a
tensor or array is taken as features, (D,) or (N, D). The encoder is the one the checkpoint names:
ours store ``Encoder.describe()`` (so a ``weights="random"`` encoder is re-created bit for bit, with
the stored ``input_size``); released names imply theirs (``dino-trunk`` -> DINO ResNet-50 trunk).
A released state dict given as a file names no encoder: pass ``encoder=``.

Seeds: sample j of conditioning item i gets ``sample_seed(seed, i, j)`` (rcdm.samplers), one
generator per sample, so a sample does not depend on the batch it was drawn in (up to float rounding:
batched convolutions and matrix products may sum in a different order for another batch size).
Interpolation and manipulation share x_T across the edited conditionings: column j of every row
uses ``sample_seed(seed, 0, j)``, so the pictures differ only through the conditioning.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Union

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from rcdm import editing, images, samplers, shards, storage
from rcdm.checkpoint import diffusion_config_of, load_unet
from rcdm.config import load_config, preset_path
from rcdm.diffusion import GaussianDiffusion, build_diffusion
from rcdm.encoders import Encoder, get_spec, load_encoder

ImageLike = Union[str, os.PathLike, Image.Image]
Inputs = Union[ImageLike, Sequence[ImageLike], Tensor, np.ndarray]
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class RCDMError(ValueError):
    """Bad input to the API: a missing image, features of the wrong size, a checkpoint/encoder mismatch."""


# --- inputs ---------------------------------------------------------------------------------------


def _is_url(s: str) -> bool:
    return s.startswith(("http://", "https://"))


def list_images(spec: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Image files of ``spec``: files and URLs as given, folders expanded (recursively, sorted).

    Raises RCDMError for a path that does not exist and for a folder without images.
    """
    specs = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    out: list[str] = []
    for s in map(str, specs):
        if _is_url(s):
            out.append(s)
            continue
        fs, path = storage.url_to_fs(s)
        if fs.isdir(path):
            found = sorted(p for p in fs.find(path) if images.is_image_name(p))
            if not found:
                raise RCDMError(
                    f"folder {s} holds no images (looked for {', '.join(images.IMAGE_EXTENSIONS)})"
                )
            out += found if storage.is_local(s) else [fs.unstrip_protocol(p) for p in found]
        elif fs.exists(path):
            out.append(s)
        else:
            raise RCDMError(f"image {s} does not exist")
    return out


def open_image(source: ImageLike) -> Image.Image:
    """A PIL image from a path/URL (RCDMError when missing, ImageError when not decodable) or PIL."""
    if isinstance(source, Image.Image):
        return images.to_rgb(source)
    try:
        return images.open_image(str(source))
    except FileNotFoundError:
        raise RCDMError(f"image {source} does not exist") from None


def _sources(x: ImageLike | Sequence[ImageLike]) -> list[ImageLike]:
    items = [x] if isinstance(x, (str, os.PathLike, Image.Image)) else list(x)
    out: list[ImageLike] = []
    for item in items:
        if isinstance(item, Image.Image):
            out.append(item)
        elif isinstance(item, (str, os.PathLike)):
            out += list_images(item)
        else:
            raise RCDMError(
                f"cannot use a {type(item).__name__} as an image: give paths, URLs, folders or PIL images "
                "(tensors and arrays are taken as features)"
            )
    if not out:
        raise RCDMError("no images given")
    return out


def _key(source: ImageLike, i: int) -> str:
    return f"image{i}" if isinstance(source, Image.Image) else str(source)


@dataclass
class Conditioning:
    """Conditioning items: features (N, D) float32, their real crops (N, 3, H, W) uint8 (or None), keys."""

    features: Tensor
    reals: Tensor | None
    keys: list[str]
    skipped: list[str] = field(default_factory=list)


def load_shard_features(
    root: str,
    keys: Sequence[str] | None = None,
    n_items: int = 8,
    *,
    image_size: int | None = None,
    expect: dict[str, Any] | None = None,
) -> Conditioning:
    """Stored features (and crops) of a feature-shard dataset: the samples named ``keys``, in that order,
    or the first ``n_items`` in shard order. ``expect``: an encoder description the manifest must match
    (name, head, feature_dim, weights_id where present). Crops are resized to ``image_size`` if needed.
    """
    manifest = shards.read_manifest(root)
    _check_description(manifest["encoder"], expect, f"feature shards at {root}")
    wanted = list(dict.fromkeys(keys)) if keys else None
    if wanted is None and n_items < 1:
        raise RCDMError(f"n_items must be at least 1, got {n_items}")
    found: dict[str, shards.FeatureSample] = {}
    for url in shards.shard_urls(root, manifest):
        for s in shards.read_shard(url):
            if wanted is None or s.key in wanted:
                found.setdefault(s.key, s)
            if len(found) == (n_items if wanted is None else len(wanted)):
                break
        if len(found) == (n_items if wanted is None else len(wanted)):
            break
    if wanted is not None:
        missing = [k for k in wanted if k not in found]
        if missing:
            raise RCDMError(
                f"{len(missing)} of the {len(wanted)} keys are not in the feature shards at {root}: "
                f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}"
            )
    order = wanted if wanted is not None else list(found)
    if not order:
        raise RCDMError(f"the feature shards at {root} hold no samples")
    crops = []
    for k in order:
        img = found[k].image
        if image_size is not None and img.shape[0] != image_size:
            img = images.center_crop_arr(Image.fromarray(img), image_size)
        crops.append(torch.from_numpy(np.array(img)).permute(2, 0, 1))  # a writable copy
    feats = torch.from_numpy(np.stack([found[k].feature for k in order])).float()
    return Conditioning(features=feats, reals=torch.stack(crops), keys=order)


def _check_description(found: dict[str, Any], expect: dict[str, Any] | None, what: str) -> None:
    """Refuse features made by another encoder than ``expect`` (name, head, dim, weights)."""
    if not expect:
        return
    problems = []
    name = expect.get("name")
    if name and found.get("name") and _canonical(found["name"]) != _canonical(name):
        problems.append(f"encoder {found['name']!r} (the model's is {name!r})")
    if "head" in expect and expect["head"] is not None and bool(found.get("head")) != bool(expect["head"]):
        problems.append("head features" if found.get("head") else "trunk features")
    dim = expect.get("feature_dim")
    if dim is not None and found.get("feature_dim") is not None and int(found["feature_dim"]) != int(dim):
        problems.append(f"{found['feature_dim']}-d features (the model takes {dim}-d)")
    wid, fwid = expect.get("weights_id"), found.get("weights_id")
    if wid and fwid and wid != fwid:
        problems.append(f"encoder weights {fwid[:16]}... (the model's encoder had {wid[:16]}...)")
    if problems:
        raise RCDMError(
            f"{what} hold {', '.join(problems)}: use features made with the encoder the checkpoint was trained on"
        )


def _canonical(name: str) -> str:
    try:
        return get_spec(name).name
    except ValueError:
        return name


# --- seeds ----------------------------------------------------------------------------------------


def sample_seeds(seed: int, n_items: int, n: int) -> list[int]:
    """Seeds of ``sample``, item-major: sample j of item i -> sample_seed(seed, i, j)."""
    return [samplers.sample_seed(seed, i, j) for i in range(n_items) for j in range(n)]


def shared_noise_seeds(seed: int, rows: int, cols: int, along: str) -> list[int]:
    """Row-major seeds of a (rows, cols) grid whose x_T is shared ``along`` "rows" or "cols".

    along="rows": every entry of row j gets sample_seed(seed, 0, j) (interpolation: one x_T per row);
    along="cols": every entry of column j gets sample_seed(seed, 0, j) (manipulation: one per column).
    """
    if along == "rows":
        return [samplers.sample_seed(seed, 0, r) for r in range(rows) for _ in range(cols)]
    if along == "cols":
        return [samplers.sample_seed(seed, 0, c) for _ in range(rows) for c in range(cols)]
    raise ValueError(f"along must be 'rows' or 'cols', got {along!r}")


# --- the model ------------------------------------------------------------------------------------


class _Autocast:
    """The UNet under torch.autocast (bf16/fp16 matmuls and convolutions); outputs stay float32."""

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype) -> None:
        self.model, self.dtype = model, dtype

    def null_feature(self, n: int) -> Tensor:
        return self.model.null_feature(n)

    def __call__(self, x: Tensor, t: Tensor, feat: Tensor | None = None) -> Tensor:
        with torch.autocast(device_type=x.device.type, dtype=self.dtype):
            return self.model(x, t, feat).float()


@dataclass
class Manipulation:
    """The result of ``RCDM.manipulate``: rows follow ``editing.MANIPULATION_LABELS``."""

    samples: Tensor  # (3, n, 3, H, W) in [-1, 1]: source, common dims zeroed, common dims from target
    features: Tensor  # (3, D) the three conditionings
    dims: list[int]  # the common dims
    neighbours: list[str]  # keys (bank) or paths (folder) of the k nearest neighbours, nearest first
    similarities: list[float]  # their cosine similarity to the source
    zero_fraction: float  # fraction of exact zeros in the neighbours' features
    skipped: list[str] = field(default_factory=list)  # unreadable images of a neighbour folder


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class RCDM:
    """A loaded representation-conditional diffusion model with its encoder and sampler defaults."""

    def __init__(
        self,
        model: torch.nn.Module,
        diffusion: GaussianDiffusion,
        info: dict[str, Any],
        encoder_args: dict[str, Any] | None,
        *,
        encoder: Encoder | None = None,
        device: str | torch.device | None = None,
        sampler: str = "ddim",
        steps: int | str = 50,
        eta: float = 0.0,
        batch_size: int = 16,
        precision: str = "fp32",
    ) -> None:
        if precision not in PRECISIONS:
            raise RCDMError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
        if sampler not in samplers.SAMPLERS:
            raise RCDMError(f"unknown sampler '{sampler}': use one of {list(samplers.SAMPLERS)}")
        if batch_size < 1:
            raise RCDMError(f"batch_size must be at least 1, got {batch_size}")
        self.device = torch.device(device) if device not in (None, "auto") else _default_device()
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.diffusion = diffusion
        self.info = info
        self.sampler, self.steps, self.eta = sampler, steps, float(eta)
        self.batch_size = int(batch_size)
        self.precision = precision
        self._encoder = encoder
        self._encoder_args = encoder_args
        if self.feature_dim is None:
            raise RCDMError(
                f"{info.get('source')} is an unconditional model (feature_dim unset): RCDM sampling needs a "
                "representation-conditional checkpoint"
            )

    # -- loading --

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        encoder: str | Encoder | None = None,
        weights: str | None = None,
        device: str | torch.device | None = None,
        sampler: str = "ddim",
        steps: int | str = 50,
        *,
        head: bool | None = None,
        input_size: int | None = None,
        model_config: Any | None = None,
        ema_rate: str | float | None = "auto",
        eta: float = 0.0,
        batch_size: int = 16,
        precision: str = "fp32",
    ) -> RCDM:
        """Load a checkpoint file, a training run folder (its newest checkpoint) or a released name.

        ``encoder``: a zoo name (``"dino"``, ``"dino/head"``, ...) or an Encoder; None = the one the
        checkpoint names. ``weights``: the encoder's weights (a path, a URL or ``"random"``); None = what
        the checkpoint used (random stays random, else the official file, verified by SHA-256).
        ``model_config``: a UNetConfig or a preset name, for state dicts not in the rcdm128 layout.
        ``device``: None or "auto" = CUDA when available.
        The encoder itself is built on first use (conditioning on stored features needs none).
        """
        from rcdm.unet import UNetConfig

        if isinstance(model_config, str):
            model_config = load_config(UNetConfig, preset_path("model", model_config))
        model, info = load_unet(name_or_path, config=model_config, ema_rate=ema_rate)
        diffusion = build_diffusion(diffusion_config_of(info))
        feature_dim = model.cfg.feature_dim
        if isinstance(encoder, Encoder):
            if feature_dim is not None and encoder.feature_dim != feature_dim:
                raise RCDMError(_dim_message(info, feature_dim, encoder.key, encoder.feature_dim))
            encoder_args = None
        else:
            encoder_args = _encoder_args(info, encoder, weights, head, input_size, feature_dim)
            encoder = None
        return cls(
            model, diffusion, info, encoder_args, encoder=encoder, device=device, sampler=sampler,
            steps=steps, eta=eta, batch_size=batch_size, precision=precision,
        )  # fmt: skip

    @property
    def image_size(self) -> int:
        return int(self.model.cfg.image_size)

    @property
    def feature_dim(self) -> int | None:
        return self.model.cfg.feature_dim

    @property
    def encoder(self) -> Encoder:
        """The encoder, built on first use and checked against the checkpoint."""
        if self._encoder is None:
            args = dict(self._encoder_args or {})
            expected_id = args.pop("expected_weights_id", None)
            enc = load_encoder(device=self.device, **args)
            if enc.feature_dim != self.feature_dim:
                raise RCDMError(_dim_message(self.info, self.feature_dim, enc.key, enc.feature_dim))
            if expected_id and enc.weights_id != expected_id:
                raise RCDMError(
                    f"{self.info['source']} was trained on features of {enc.key} with weights "
                    f"{expected_id[:16]}..., but the weights loaded now are {enc.weights_id[:16]}...: pass the "
                    "original file (encoder.weights=<path>)"
                )
            self._encoder = enc
        return self._encoder

    def encoder_description(self) -> dict[str, Any]:
        """The encoder's describe() once built, else what the checkpoint says about it."""
        if self._encoder is not None:
            return self._encoder.describe()
        stored = dict(self.info.get("encoder") or {})
        if self._encoder_args:
            stored.setdefault("name", self._encoder_args["name"])
            stored.setdefault("head", self._encoder_args["head"])
        stored.setdefault("feature_dim", self.feature_dim)
        return stored

    def expected_encoder(self) -> dict[str, Any]:
        """What stored features must have been made with: name, head, dim and weights where known."""
        desc = self.encoder_description()
        expected = {"name": desc.get("name"), "head": desc.get("head"), "feature_dim": self.feature_dim}
        if desc.get("weights_id"):
            expected["weights_id"] = desc["weights_id"]
        return expected

    # -- encoding --

    def prepare(
        self, images_: ImageLike | Sequence[ImageLike], skip_unreadable: bool = False, crops: bool = True
    ) -> Conditioning:
        """Encode images: features (N, D), the real ADM crops at the model's size (N, 3, H, W) uint8, keys.

        The feature comes from the encoder's own crop (``Encoder.preprocess``) of the same original, as
        in training. ``skip_unreadable`` records undecodable files in ``skipped`` instead of raising;
        ``crops=False`` leaves ``reals`` None (a large neighbour pool needs only its features).
        """
        sources = _sources(images_)
        enc = self.encoder
        feats, reals, keys, skipped = [], [], [], []
        for start in range(0, len(sources), self.batch_size):
            xs = []
            for i, src in enumerate(sources[start : start + self.batch_size], start):
                try:
                    pil = open_image(src)
                except images.ImageError:
                    if not skip_unreadable:
                        raise
                    skipped.append(_key(src, i))
                    continue
                xs.append(enc.preprocess(pil))
                if crops:
                    crop = np.array(images.center_crop_arr(pil, self.image_size))  # (H, W, 3), writable
                    reals.append(torch.from_numpy(crop).permute(2, 0, 1))
                keys.append(_key(src, i))
            if xs:
                feats.append(enc.encode(torch.stack(xs)).float().cpu())
        if skipped:
            warnings.warn(f"skipped {len(skipped)} unreadable images, e.g. {skipped[0]}", stacklevel=2)
        if not feats:
            raise RCDMError("none of the images could be read")
        return Conditioning(torch.cat(feats), torch.stack(reals) if crops else None, keys, skipped)

    def encode(self, images_: ImageLike | Sequence[ImageLike]) -> Tensor:
        """Features (N, D) float32 of images (paths, URLs, folders, PIL)."""
        return self.prepare(images_).features

    def as_features(self, x: Inputs) -> Tensor:
        """(N, D) features: tensors/arrays ((D,) or (N, D), or a list of (D,)) are checked and passed
        through; anything else is taken as images and encoded."""
        if isinstance(x, (list, tuple)) and x and all(isinstance(v, (Tensor, np.ndarray)) for v in x):
            f = torch.stack([torch.as_tensor(v) for v in x])
        elif isinstance(x, (Tensor, np.ndarray)):
            f = torch.as_tensor(x)
        else:
            return self.encode(x)
        f = f[None] if f.ndim == 1 else f
        if f.ndim != 2 or f.shape[1] != self.feature_dim:
            raise RCDMError(
                f"features must be (D,) or (N, D) with D = {self.feature_dim} for this model, got {tuple(f.shape)}"
            )
        return f.float().cpu()

    # -- sampling --

    def generate(
        self,
        feats: Tensor,
        seeds: Sequence[int],
        *,
        sampler: str | None = None,
        steps: int | str | None = None,
        eta: float | None = None,
        guidance: float = 0.0,
        progress: bool = False,
    ) -> Tensor:
        """One sample per row of feats (M, D) with seeds[m]: (M, 3, H, W) float32 in [-1, 1], on the CPU.

        Drawn in batches of ``batch_size``; ``progress`` shows one bar over every sampling step.
        """
        sampler = sampler or self.sampler
        steps = self.steps if steps is None else steps
        eta = self.eta if eta is None else float(eta)
        if sampler not in samplers.SAMPLERS:
            raise RCDMError(f"unknown sampler '{sampler}': use one of {list(samplers.SAMPLERS)}")
        if len(seeds) != feats.shape[0]:
            raise RCDMError(f"{len(seeds)} seeds for {feats.shape[0]} features")
        try:
            n_steps = samplers.respace(self.diffusion, steps).num_timesteps
        except ValueError as e:
            raise RCDMError(f"steps={steps!r}: {e}") from None
        from tqdm.auto import tqdm

        dtype = PRECISIONS[self.precision]
        net = self.model if dtype is None else _Autocast(self.model, dtype)
        size, channels = self.image_size, self.model.cfg.in_channels
        n_batches = -(-feats.shape[0] // self.batch_size)
        out = []
        with tqdm(
            total=n_batches * n_steps, disable=not progress, desc=f"{sampler}-{n_steps}", unit="step"
        ) as bar:
            for start in range(0, feats.shape[0], self.batch_size):
                f = feats[start : start + self.batch_size].to(self.device, torch.float32)  # (B, D)
                x = samplers.sample(
                    net, self.diffusion, (f.shape[0], channels, size, size), f, sampler=sampler, steps=steps,
                    eta=eta, guidance=guidance, seeds=list(seeds[start : start + self.batch_size]),
                    callback=lambda _: bar.update(1), device=self.device,
                )  # fmt: skip
                out.append(images.to_channels(x.float().cpu(), 3))  # a grey model's samples as RGB
        return torch.cat(out)

    def _generate_grid(self, grid: Tensor, seeds: Sequence[int], **sampling: Any) -> Tensor:
        """One sample per cell of the feature grid (R, C, D), seeds in row-major order: (R, C, 3, H, W).

        ``sampling``: the keyword arguments of ``generate`` (sampler, steps, eta, guidance, progress).
        """
        rows, cols = grid.shape[:2]
        x = self.generate(grid.flatten(0, 1), seeds, **sampling)  # (R * C, 3, H, W)
        return x.reshape(rows, cols, 3, self.image_size, self.image_size)

    def sample(
        self,
        images_or_features: Inputs,
        n: int = 8,
        seed: int = 0,
        guidance: float = 0.0,
        sampler: str | None = None,
        steps: int | str | None = None,
        eta: float | None = None,
        return_pil: bool = False,
        progress: bool = False,
    ) -> Tensor | list[list[Image.Image]]:
        """n samples per conditioning item: (len, n, 3, H, W) in [-1, 1], or len lists of n PIL images.

        Sample j of item i uses seed ``sample_seed(seed, i, j)``.
        """
        if n < 1:
            raise RCDMError(f"n must be at least 1, got {n}")
        feats = self.as_features(images_or_features)  # (L, D)
        x = self._generate_grid(
            feats[:, None].expand(-1, n, -1), sample_seeds(seed, feats.shape[0], n), sampler=sampler,
            steps=steps, eta=eta, guidance=guidance, progress=progress,
        )  # fmt: skip
        return to_pil(x) if return_pil else x

    def interpolate(
        self,
        a: Inputs,
        b: Inputs,
        steps_r: int = 9,
        mode: str = "linear",
        seed: int = 0,
        n: int = 1,
        guidance: float = 0.0,
        sampler: str | None = None,
        steps: int | str | None = None,
        eta: float | None = None,
        return_pil: bool = False,
        progress: bool = False,
    ) -> Tensor | list[list[Image.Image]]:
        """Samples along the path from a's feature to b's: (n, steps_r, 3, H, W), r = 0, ..., 1.

        Row j uses the same x_T (seed ``sample_seed(seed, 0, j)``) for every r, so column r = 0 is
        ``sample(a, n, seed)[0]`` and column r = 1 is ``sample(b, n, seed)[0]`` (bit for bit with
        ``batch_size=1``, else up to the float rounding of batched kernels).
        """
        fa, fb = self.as_features(a), self.as_features(b)
        if fa.shape[0] != 1 or fb.shape[0] != 1:
            raise RCDMError(f"interpolate takes one item at each end, got {fa.shape[0]} and {fb.shape[0]}")
        path = editing.interpolate_features(fa[0], fb[0], editing.ratios(steps_r), mode)  # (R, D)
        x = self._generate_grid(
            path[None].expand(n, -1, -1), shared_noise_seeds(seed, n, steps_r, "rows"), sampler=sampler,
            steps=steps, eta=eta, guidance=guidance, progress=progress,
        )  # fmt: skip
        return to_pil(x) if return_pil else x

    # -- manipulation --

    def neighbours(
        self, source: Tensor, pool: Any, k: int
    ) -> tuple[Tensor, list[str], list[float], list[str]]:
        """The k nearest neighbours (cosine) of feature source (D,) in ``pool``: a bank.h5 path or
        FeatureBank, a folder / list of images, or features (M, D).

        Returns (their features (k, D), keys, similarities, skipped unreadable images).
        """
        from rcdm.bank import FeatureBank

        if isinstance(pool, (str, os.PathLike)) and str(pool).endswith(".h5"):
            pool = FeatureBank(str(pool))
        if isinstance(pool, FeatureBank):
            _check_description(pool.encoder, self.expected_encoder(), f"feature bank {pool.url}")
            if len(pool) < k:
                raise RCDMError(
                    f"k = {k} neighbours asked for, but the bank {pool.url} holds {len(pool)} items"
                )
            scores, idx = pool.knn(source[None].numpy(), k, "cosine", device=self.device)
            keys = pool.keys
            return torch.from_numpy(pool.get(idx[0])), [keys[i] for i in idx[0]], scores[0].tolist(), []
        if isinstance(pool, (Tensor, np.ndarray)):
            feats, keys, skipped = self.as_features(pool), [f"row{i}" for i in range(len(pool))], []
        else:
            cond = self.prepare(pool, skip_unreadable=True, crops=False)
            feats, keys, skipped = cond.features, cond.keys, cond.skipped
        sims, idx = editing.knn_exact(source[None].to(self.device), feats.to(self.device), k)
        return feats[idx[0].cpu()], [keys[i] for i in idx[0].tolist()], sims[0].tolist(), skipped

    def manipulate(
        self,
        source: Inputs,
        target: Inputs,
        neighbours: Any,
        k: int = 20,
        common: int = 14,
        rule: str = "nonzero",
        top_m: int | None = None,
        n: int = 4,
        seed: int = 0,
        guidance: float = 0.0,
        sampler: str | None = None,
        steps: int | str | None = None,
        eta: float | None = None,
        progress: bool = False,
    ) -> Manipulation:
        """RCDM's attribute transfer (rcdm.editing): samples of the source, of the source with the dims
        common to its k nearest neighbours zeroed, and with those dims taken from the target.

        Column j of the three rows shares x_T (seed ``sample_seed(seed, 0, j)``).
        """
        fs, ft = self.as_features(source), self.as_features(target)
        if fs.shape[0] != 1 or ft.shape[0] != 1:
            raise RCDMError(
                f"manipulate takes one source and one target, got {fs.shape[0]} and {ft.shape[0]}"
            )
        nb_feats, nb_keys, sims, skipped = self.neighbours(fs[0], neighbours, k)
        dims = editing.common_dims(editing.l2_normalize(nb_feats), common, rule, top_m)
        conds = editing.manipulated_features(fs[0], ft[0], dims.cpu())  # (3, D)
        x = self._generate_grid(
            conds[:, None].expand(-1, n, -1), shared_noise_seeds(seed, 3, n, "cols"), sampler=sampler,
            steps=steps, eta=eta, guidance=guidance, progress=progress,
        )  # fmt: skip
        return Manipulation(
            samples=x, features=conds, dims=dims.tolist(), neighbours=nb_keys, similarities=sims,
            zero_fraction=editing.zero_fraction(nb_feats), skipped=skipped,
        )  # fmt: skip

    def __repr__(self) -> str:
        desc = self.encoder_description()
        return (
            f"RCDM({self.info.get('source')}, {self.image_size}px, {self.feature_dim}-d "
            f"{desc.get('name')}/{'head' if desc.get('head') else 'trunk'}, {self.sampler}-{self.steps}, "
            f"{self.device})"
        )


def to_pil(x: Tensor) -> list[list[Image.Image]]:
    """(R, C, 3, H, W) in [-1, 1] -> R lists of C PIL images (pixels rounded, never rescaled)."""
    u8 = images.to_uint8(x)
    return [[Image.fromarray(images.to_hwc(row)[j]) for j in range(row.shape[0])] for row in u8]


# --- checkpoint helpers ---------------------------------------------------------------------------


def _dim_message(info: dict[str, Any], feature_dim: int | None, key: str, dim: int) -> str:
    return (
        f"{info.get('source')} takes {feature_dim}-d features but encoder {key} gives {dim}-d: use the encoder "
        "the checkpoint was trained with (encoder.name / encoder.head), or the matching checkpoint"
    )


def _encoder_args(
    info: dict[str, Any],
    name: str | None,
    weights: str | None,
    head: bool | None,
    input_size: int | None,
    feature_dim: int | None,
) -> dict[str, Any]:
    """load_encoder arguments for this checkpoint; mismatches with what it was trained on are errors."""
    stored = info.get("encoder") or {}
    source = info.get("source")
    if name is not None and name.endswith(("/head", "/trunk")):
        name, _, which = name.rpartition("/")
        head = which == "head" if head is None else head
    if name is None:
        name = stored.get("name")
        if name is None:
            raise RCDMError(
                f"{source} does not name the encoder its features came from (a plain state dict): pass it "
                "(encoder.name=<zoo name>, e.g. dino, or encoder=... in Python)"
            )
    elif stored.get("name") and _canonical(name) != _canonical(stored["name"]):
        raise RCDMError(
            f"{source} was trained on {stored['name']} features, not {name}: drop encoder.name (the checkpoint "
            "names its encoder) or load the checkpoint trained on that encoder"
        )
    if head is None:
        head = bool(stored.get("head", False))
    elif "head" in stored and bool(stored["head"]) != bool(head):
        raise RCDMError(
            f"{source} was trained on {'head' if stored['head'] else 'trunk'} features of {stored.get('name')}, "
            f"not {'head' if head else 'trunk'} features: drop encoder.head"
        )
    stored_id = stored.get("weights_id")
    if weights is None and stored_id == "random":
        weights = "random"
    if input_size is None:
        input_size = stored.get("input_size")
    if ":" not in name and feature_dim is not None:
        spec = get_spec(name)
        dim = spec.head_dim if head else spec.trunk_dim
        if head and spec.head is None:
            raise RCDMError(f"encoder {spec.name} has no projection head: set encoder.head=false")
        if dim != feature_dim:
            raise RCDMError(
                _dim_message(info, feature_dim, f"{spec.name}/{'head' if head else 'trunk'}", dim)
            )
    return {
        "name": name,
        "head": bool(head),
        "weights": weights,
        "input_size": input_size,
        "precision": stored.get("precision", "fp32"),
        "expected_weights_id": stored_id,
    }
