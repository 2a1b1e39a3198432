"""The self-supervised encoder zoo: frozen networks mapping an image crop to the feature RCDM is given.

``load_encoder(name, head=False, weights=None, device=None, input_size=None, precision="fp32")``
returns an :class:`Encoder`::

    enc = load_encoder("dino", head=True)            # DINO ResNet-50, 256-d bottleneck of its head
    x = torch.stack([enc.preprocess(img) for img in pil_images])   # (N, 3, 224, 224) in [-1, 1]
    f = enc.encode(x)                                 # (N, 256) float32
    enc.describe()                                    # JSON-able, stored in manifests and checkpoints

Names (see :data:`ENCODERS`; ``python -m stages.encoders list`` prints the table):

* RCDM's set, ResNet-50 in torchvision layout with ``fc = Identity``; trunk = the 2048-d average
  pool after the last ReLU (so >= 0): ``supervised`` (alias ``resnet50``), ``simclr``, ``barlow``,
  ``vicreg``, ``dino``. Heads: ``dino`` 256 (the bottleneck output of DINO's projection MLP, before
  the L2 normalisation and the 60000-way ``last_layer``, as RCDM used it), ``simclr`` 128, ``barlow``
  8192, ``vicreg`` 8192 (the projector outputs). ``supervised`` has no head.
* ``dino_vits16``, ``dino_vitb16``, ``dinov2_vits14``, ``dinov2_vitb14``: the CLS token after the
  final LayerNorm (``x_norm_clstoken`` in DINOv2), official checkpoint layouts, timm's
  ``VisionTransformer`` (its state dict is the official one up to DINOv2's unused ``mask_token``).
  Position embeddings are resampled once at load time for the input size with the official bicubic
  rule (``scale_factor = (grid + 0.1) / grid0``, no antialias).
* ``mobilenet_v2``: torchvision's ImageNet MobileNetV2; trunk = global average pool of ``features``
  (1280-d, after ReLU6, so in [0, 6]); any ``input_size`` works (the embedded demo uses small crops).

Input scaling (``normalize`` in each :class:`EncoderSpec`): ``preprocess`` always returns the ADM
center crop scaled to [-1, 1]. RCDM fed its ResNets that directly (``normalize="none"``), and the
released RCDM models were trained on those features, so the RCDM set keeps it, although these
ResNets were themselves trained on ImageNet mean/std-normalised inputs (torchvision, VISSL, DINO and
VICReg recipes all normalise). torchvision's MobileNetV2 and the DINO/DINOv2 ViTs get
``normalize="imagenet"``: ``encode`` maps [-1, 1] back to [0, 1] and applies that normalisation
inside the network, so the stored feature is the genuine representation of the released model.
``load_encoder(..., normalize="imagenet")`` does the same for the RCDM set (new models only: the
released RCDM checkpoints expect ``"none"``). ``describe()`` records the choice.

``weights``: ``None`` = the official file of that name (:mod:`rcdm.weights`: verified by SHA-256,
downloaded into the torch hub cache if absent and the network allows); a path or URL = that file in
the official layout of that name; ``"random"`` = deterministic random init seeded from the encoder
name (``weights_id = "random"``), so stage one and sampling compute the same function; BatchNorm
statistics are then set from one batch of seeded noise (:func:`calibrate_batchnorm`).

Custom encoders: a name ``"package.module:factory"`` imports ``package.module`` and calls
``factory()``. The factory returns either an :class:`Encoder`, or an ``nn.Module`` that maps
``(N, 3, S, S)`` in [-1, 1] to ``(N, D)`` and has integer attributes ``feature_dim`` (D) and
``input_size`` (S). Such a module is wrapped with ADM center-crop preprocessing; its ``weights_id``
is ``"custom:<sha256 of its state dict>"`` so manifests can tell two sets of weights apart.
"""

from __future__ import annotations

import hashlib
import importlib
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from rcdm import weights as wts

Normalize = Literal["none", "imagenet"]
Precision = Literal["fp32", "bf16"]
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # torchvision / DINO / DINOv2 training normalisation
IMAGENET_STD = (0.229, 0.224, 0.225)


class EncoderError(ValueError):
    """An unknown encoder name, an impossible option, or a weights file of the wrong layout."""


@dataclass(frozen=True)
class ViTArch:
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    layer_scale: bool  # DINOv2 blocks have LayerScale (ls1/ls2.gamma); DINO v1 blocks do not
    pretrain_size: int  # size the official pos_embed was trained for (DINOv2: 518 = 37 * 14)


@dataclass(frozen=True)
class EncoderSpec:
    """One named encoder of the zoo."""

    name: str
    arch: Literal["resnet50", "mobilenet_v2", "vit"]
    trunk_dim: int
    head_dim: int | None
    input_size: int
    normalize: Normalize
    weights: str  # key in rcdm.weights.WEIGHTS
    layout: Literal["torchvision", "vissl", "dino_resnet", "vicreg", "vit"]
    head: Literal["dino", "simclr", "barlow", "vicreg"] | None = None
    head_hidden: int | None = None  # width of the head's hidden layers
    vit: ViTArch | None = None
    description: str = ""


_RESNET = dict(arch="resnet50", trunk_dim=2048, input_size=224, normalize="none")
_VIT_S16 = ViTArch(16, 384, 12, 6, layer_scale=False, pretrain_size=224)
_VIT_B16 = ViTArch(16, 768, 12, 12, layer_scale=False, pretrain_size=224)
_VIT_S14 = ViTArch(14, 384, 12, 6, layer_scale=True, pretrain_size=518)
_VIT_B14 = ViTArch(14, 768, 12, 12, layer_scale=True, pretrain_size=518)

ENCODERS: dict[str, EncoderSpec] = {
    s.name: s
    for s in [
        EncoderSpec("supervised", **_RESNET, head_dim=None, weights="resnet50_imagenet1k_v1",
                    layout="torchvision", description="ResNet-50, supervised ImageNet (torchvision V1)"),
        EncoderSpec("simclr", **_RESNET, head_dim=128, weights="simclr_resnet50", layout="vissl",
                    head="simclr", head_hidden=2048, description="ResNet-50, SimCLR 1000 ep (VISSL)"),
        EncoderSpec("barlow", **_RESNET, head_dim=8192, weights="barlow_resnet50", layout="vissl",
                    head="barlow", head_hidden=8192, description="ResNet-50, Barlow Twins 1000 ep (VISSL)"),
        EncoderSpec("vicreg", **_RESNET, head_dim=8192, weights="vicreg_resnet50", layout="vicreg",
                    head="vicreg", head_hidden=8192, description="ResNet-50, VICReg 1000 ep"),
        EncoderSpec("dino", **_RESNET, head_dim=256, weights="dino_resnet50", layout="dino_resnet",
                    head="dino", head_hidden=4096, description="ResNet-50, DINO (teacher)"),
        EncoderSpec("dino_vits16", "vit", 384, None, 224, "imagenet", "dino_vits16", "vit",
                    vit=_VIT_S16, description="ViT-S/16, DINO, CLS token"),
        EncoderSpec("dino_vitb16", "vit", 768, None, 224, "imagenet", "dino_vitb16", "vit",
                    vit=_VIT_B16, description="ViT-B/16, DINO, CLS token"),
        EncoderSpec("dinov2_vits14", "vit", 384, None, 224, "imagenet", "dinov2_vits14", "vit",
                    vit=_VIT_S14, description="ViT-S/14, DINOv2, CLS token"),
        EncoderSpec("dinov2_vitb14", "vit", 768, None, 224, "imagenet", "dinov2_vitb14", "vit",
                    vit=_VIT_B14, description="ViT-B/14, DINOv2, CLS token"),
        EncoderSpec("mobilenet_v2", "mobilenet_v2", 1280, None, 224, "imagenet",
                    "mobilenet_v2_imagenet1k_v1", "torchvision",
                    description="MobileNetV2, supervised ImageNet (torchvision V1), pooled features"),
    ]
}  # fmt: skip
ALIASES = {"resnet50": "supervised"}


def encoder_names() -> list[str]:
    return list(ENCODERS)


def get_spec(name: str) -> EncoderSpec:
    name = ALIASES.get(name, name)
    if name not in ENCODERS:
        raise EncoderError(
            f"unknown encoder '{name}': known encoders are {list(ENCODERS)} (aliases {list(ALIASES)}), "
            "or give a custom one as 'package.module:factory'"
        )
    return ENCODERS[name]


# --- networks -------------------------------------------------------------------------------------


class MobileNetV2Trunk(nn.Module):
    """torchvision MobileNetV2 ``features`` + global average pool: (N, 3, S, S) -> (N, 1280)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = torchvision.models.mobilenet_v2(weights=None).features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(self.features(x), 1).flatten(1)  # (N, 1280)


def resnet50_trunk() -> nn.Module:
    """torchvision ResNet-50 with ``fc = Identity``: (N, 3, S, S) -> (N, 2048) pooled after the last ReLU."""
    net = torchvision.models.resnet50(weights=None)
    net.fc = nn.Identity()
    return net


def vit_trunk(arch: ViTArch, input_size: int) -> nn.Module:
    """timm ViT returning the CLS token after the final norm: (N, 3, S, S) -> (N, embed_dim)."""
    from timm.models.vision_transformer import VisionTransformer

    if input_size % arch.patch_size:
        raise EncoderError(f"input_size {input_size} is not a multiple of the patch size {arch.patch_size}")
    return VisionTransformer(
        img_size=input_size,
        patch_size=arch.patch_size,
        embed_dim=arch.embed_dim,
        depth=arch.depth,
        num_heads=arch.num_heads,
        mlp_ratio=4.0,
        qkv_bias=True,
        init_values=1.0 if arch.layer_scale else None,
        num_classes=0,
        global_pool="token",
    )


class VisslMLP(nn.Module):
    """One VISSL ``MLP`` head: its layers live in ``.clf``."""

    def __init__(self, layers: list[nn.Module]) -> None:
        super().__init__()
        self.clf = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.clf(x)


class VisslHead(nn.Sequential):
    """VISSL's list of heads applied in turn (state-dict keys ``<i>.clf.<j>.*``)."""

    def __init__(self, stages: list[list[nn.Module]]) -> None:
        super().__init__(*[VisslMLP(layers) for layers in stages])


class DinoHead(nn.Module):
    """DINO's projection MLP up to the bottleneck (keys ``mlp.{0,1,3}``): (N, 2048) -> (N, 256)."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.GELU(), nn.Linear(hidden, out_dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


def build_head(kind: str, in_dim: int, hidden: int, out_dim: int) -> nn.Module:
    """The projection head of an RCDM-set encoder, in the layout of its official checkpoint.

    Layouts as RCDM loads them (facebookresearch/RCDM ``guided_diffusion/get_ssl_models.py``) and as
    VISSL's configs build them (``heads: [["mlp", {dims...}], ...]``).
    """
    if kind == "dino":  # DINOHead(nlayers=2, use_bn=True) without last_layer
        return DinoHead(in_dim, hidden, out_dim)
    # VISSL simclr_8node_resnet.yaml: [["mlp", {dims: [2048, 2048], use_relu: True}], ["mlp", {dims: [2048, 128]}]];
    # the 2020 zoo model predates MLP's skip_last_layer_relu_bn, so the ReLU is there (RCDM adds it too)
    if kind == "simclr":
        return VisslHead([[nn.Linear(in_dim, hidden), nn.ReLU(inplace=True)], [nn.Linear(hidden, out_dim)]])
    if kind == "barlow":  # VISSL: 3 x Linear(bias=False), BN + ReLU after the first two
        return VisslHead(
            [
                [nn.Linear(in_dim, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True)],
                [nn.Linear(hidden, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True)],
                [nn.Linear(hidden, out_dim, bias=False)],
            ]
        )
    if kind == "vicreg":  # VICReg projector "8192-8192-8192": keys 0, 1, 3, 4, 6; last Linear without bias
        return nn.Sequential(
            nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, out_dim, bias=False),
        )  # fmt: skip
    raise EncoderError(f"no head of kind '{kind}'")


class EncoderNet(nn.Module):
    """Input scaling + trunk (+ head): (N, 3, S, S) in [-1, 1] -> (N, D)."""

    def __init__(self, trunk: nn.Module, head: nn.Module | None, normalize: Normalize) -> None:
        super().__init__()
        self.trunk = trunk
        self.head = head
        self.normalize = normalize
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, 3, S, S) in [-1, 1]
        if self.normalize == "imagenet":
            x = ((x + 1.0) * 0.5 - self.mean) / self.std
        f = self.trunk(x)  # (N, trunk_dim)
        return self.head(f) if self.head is not None else f


def _name_seed(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little") % (2**63)


@torch.no_grad()
def calibrate_batchnorm(net: nn.Module, input_size: int, seed: int, n: int = 4, max_size: int = 96) -> None:
    """Set every BatchNorm's running statistics from one batch of seeded noise images in [-1, 1].

    A freshly initialised network in eval mode uses mean 0 / variance 1 statistics that do not match
    its activations: a random MobileNetV2 then gives features of about 1e-9 and a random ResNet-50
    features of about 20. One train-mode pass over ``n`` seeded noise images (cumulative averages,
    ``momentum=None``) keeps activations of order one, so "random" encoders give usable features.
    The pass runs at ``min(input_size, max_size)`` pixels to stay cheap (a fully convolutional trunk
    accepts any size; only the scale of the statistics matters here).
    """
    bns = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    g = torch.Generator().manual_seed(seed)
    size = min(input_size, max_size)
    x = torch.rand(n, 3, size, size, generator=g) * 2 - 1  # (n, 3, s, s)
    # One thread: reductions then sum in one order, so every process (whatever its thread count)
    # computes the same statistics and the same "random" encoder.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        net.train()(x)
    finally:
        torch.set_num_threads(threads)
    for m in bns:
        m.momentum = 0.1
    net.eval()


def _build(spec: EncoderSpec, head: bool, input_size: int) -> tuple[nn.Module, nn.Module | None]:
    if spec.arch == "resnet50":
        trunk = resnet50_trunk()
    elif spec.arch == "mobilenet_v2":
        trunk = MobileNetV2Trunk()
    else:
        assert spec.vit is not None
        trunk = vit_trunk(spec.vit, input_size)
    if not (head and spec.head):
        return trunk, None
    assert spec.head_hidden is not None and spec.head_dim is not None
    return trunk, build_head(spec.head, spec.trunk_dim, spec.head_hidden, spec.head_dim)


# --- official checkpoint layouts ------------------------------------------------------------------


def _strip(sd: dict[str, Any], prefixes: tuple[str, ...]) -> dict[str, Any]:
    out = {}
    for k, v in sd.items():
        changed = True
        while changed:
            changed = False
            for p in prefixes:
                if k.startswith(p):
                    k, changed = k[len(p) :], True
        out[k] = v
    return out


def _as_dict(obj: Any, what: str, path: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise EncoderError(f"{path}: expected {what} to be a dict, found {type(obj).__name__}")
    return obj


def split_checkpoint(spec: EncoderSpec, ckpt: Any, path: str) -> tuple[dict, dict]:
    """(trunk state dict, head state dict) of an official checkpoint of ``spec``'s layout."""
    ckpt = _as_dict(ckpt, "the checkpoint", path)
    if spec.layout == "torchvision":
        sd = ckpt.get("state_dict", ckpt)
        if spec.arch == "mobilenet_v2":
            return {k: v for k, v in sd.items() if not k.startswith("classifier.")}, {}
        return {k: v for k, v in sd.items() if not k.startswith("fc.")}, {}
    if spec.layout == "vissl":
        try:
            model = ckpt["classy_state_dict"]["base_model"]["model"]
        except (KeyError, TypeError) as e:
            raise EncoderError(
                f"{path}: not a VISSL checkpoint (no ['classy_state_dict']['base_model']['model'])"
            ) from e
        trunk = _strip(_as_dict(model["trunk"], "the VISSL trunk", path), ("_feature_blocks.",))
        return trunk, dict(_as_dict(model.get("heads", {}), "the VISSL heads", path))
    if spec.layout == "dino_resnet":
        if "teacher" not in ckpt:
            raise EncoderError(
                f"{path}: not a DINO full checkpoint (no 'teacher' key; keys {list(ckpt)[:8]})"
            )
        sd = _strip(_as_dict(ckpt["teacher"], "'teacher'", path), ("module.", "backbone."))
        trunk = {k: v for k, v in sd.items() if not k.startswith(("head.", "fc."))}
        head = {
            k[5:]: v for k, v in sd.items() if k.startswith("head.") and not k.startswith("head.last_layer")
        }
        return trunk, head
    if spec.layout == "vicreg":
        if "model" not in ckpt:
            raise EncoderError(
                f"{path}: not a VICReg full checkpoint (no 'model' key; keys {list(ckpt)[:8]})"
            )
        sd = _strip(_as_dict(ckpt["model"], "'model'", path), ("module.", "backbone."))
        trunk = {k: v for k, v in sd.items() if not k.startswith(("projector.", "classifier.", "fc."))}
        head = {k[10:]: v for k, v in sd.items() if k.startswith("projector.")}
        return trunk, head
    if spec.layout == "vit":
        sd = _strip(ckpt.get("teacher", ckpt.get("model", ckpt)), ("module.", "backbone."))
        sd = {k: v for k, v in sd.items() if k != "mask_token" and not k.startswith("head.")}
        return sd, {}
    raise EncoderError(f"unknown layout '{spec.layout}'")


def resample_pos_embed(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """(1, 1 + g0^2, C) -> (1, 1 + grid^2, C): DINO/DINOv2's bicubic rule with the 0.1 offset."""
    cls, patch = pos_embed[:, :1], pos_embed[:, 1:]
    g0 = math.isqrt(patch.shape[1])
    if g0 * g0 != patch.shape[1]:
        raise EncoderError(f"pos_embed with {patch.shape[1]} patch positions is not a square grid")
    if g0 == grid:
        return pos_embed
    c = patch.shape[-1]
    scale = (grid + 0.1) / g0
    patch = F.interpolate(
        patch.float().reshape(1, g0, g0, c).permute(0, 3, 1, 2),
        scale_factor=(scale, scale),
        mode="bicubic",
        align_corners=False,
    )  # (1, C, grid, grid)
    if patch.shape[-1] != grid:
        raise EncoderError(f"pos_embed resampling gave a {patch.shape[-1]}-grid, expected {grid}")
    return torch.cat([cls, patch.permute(0, 2, 3, 1).reshape(1, grid * grid, c).to(pos_embed.dtype)], 1)


def _load_strict(module: nn.Module, sd: dict, what: str, path: str) -> None:
    expected = module.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    wrong = [f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
             if k in sd and tuple(sd[k].shape) != tuple(v.shape)]  # fmt: skip
    if missing or unexpected or wrong:
        raise EncoderError(
            f"{path}: the {what} does not fit the expected layout: missing {missing[:5]} "
            f"({len(missing)}), unexpected {unexpected[:5]} ({len(unexpected)}), wrong shapes {wrong[:5]}. "
            "Is this the right file for this encoder name?"
        )
    module.load_state_dict(sd, strict=True)


def _load_official(
    spec: EncoderSpec, trunk: nn.Module, head: nn.Module | None, path: str, loader: str
) -> None:
    ckpt = wts.load_checkpoint(path, loader)  # type: ignore[arg-type]
    trunk_sd, head_sd = split_checkpoint(spec, ckpt, path)
    if spec.arch == "vit" and "pos_embed" in trunk_sd:
        grid = trunk.patch_embed.grid_size[0]  # type: ignore[union-attr]
        trunk_sd["pos_embed"] = resample_pos_embed(trunk_sd["pos_embed"], grid)
    _load_strict(trunk, trunk_sd, "trunk", path)
    if head is not None:
        if not head_sd:
            raise EncoderError(f"{path}: no head weights in this file, but head=True was asked for")
        _load_strict(head, head_sd, "head", path)


# --- the Encoder ----------------------------------------------------------------------------------


class Encoder:
    """A frozen encoder: ``preprocess(pil) -> (3, S, S)``, ``encode((N, 3, S, S)) -> (N, D)`` float32."""

    def __init__(
        self,
        name: str,
        net: nn.Module,
        *,
        head: bool,
        feature_dim: int,
        input_size: int,
        weights_id: str,
        normalize: Normalize = "none",
        weights_file: str | None = None,
        arch: str = "custom",
        device: str | torch.device | None = None,
        precision: Precision = "fp32",
    ) -> None:
        if precision not in ("fp32", "bf16"):
            raise EncoderError(f"precision must be 'fp32' or 'bf16', got '{precision}'")
        self.name = name
        self.head = head
        self.feature_dim = int(feature_dim)
        self.input_size = int(input_size)
        self.weights_id = weights_id
        self.normalize = normalize
        self.weights_file = weights_file
        self.arch = arch
        self.precision = precision
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.net = net.eval().requires_grad_(False).to(self.device)
        if precision == "bf16":
            self.net = self.net.to(memory_format=torch.channels_last)

    @property
    def key(self) -> str:
        """``<name>/head`` or ``<name>/trunk``."""
        return f"{self.name}/{'head' if self.head else 'trunk'}"

    def preprocess(self, pil: Any) -> torch.Tensor:
        """PIL image (any mode) -> float32 (3, S, S) in [-1, 1]: ADM center crop, then scaling."""
        from rcdm import images

        return images.to_model(images.center_crop_arr(pil, self.input_size))

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) in [-1, 1] -> (N, D) float32 (bf16 autocast + channels_last if precision='bf16')."""
        if x.ndim != 4 or x.shape[1] != 3 or x.shape[-2:] != (self.input_size, self.input_size):
            raise EncoderError(
                f"encoder {self.key} expects (N, 3, {self.input_size}, {self.input_size}), got {tuple(x.shape)}"
            )
        x = x.to(self.device, torch.float32, non_blocking=True)
        if self.precision == "bf16":
            x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16):
                f = self.net(x)
        else:
            f = self.net(x)
        return f.float()  # (N, D)

    def to(self, device: str | torch.device) -> Encoder:
        self.device = torch.device(device)
        self.net.to(self.device)
        return self

    def describe(self) -> dict[str, Any]:
        """JSON-able description stored in manifests and checkpoints."""
        return {
            "name": self.name,
            "head": self.head,
            "key": self.key,
            "arch": self.arch,
            "feature_dim": self.feature_dim,
            "input_size": self.input_size,
            "weights_id": self.weights_id,
            "weights_file": self.weights_file,
            "preprocess": {"crop": "adm_center", "range": [-1.0, 1.0], "normalize": self.normalize},
            "precision": self.precision,
        }

    def __repr__(self) -> str:
        return (
            f"Encoder({self.key}, {self.feature_dim}-d, {self.input_size}px, weights={self.weights_id[:12]})"
        )


def _state_dict_sha256(module: nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _load_custom(name: str, head: bool, device: Any, input_size: int | None, precision: Precision) -> Encoder:
    module_name, _, factory_name = name.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), factory_name)
    except (ImportError, AttributeError) as e:
        raise EncoderError(
            f"custom encoder '{name}': cannot import {factory_name} from {module_name} ({e})"
        ) from e
    obj = factory()
    if isinstance(obj, Encoder):
        return obj
    if not isinstance(obj, nn.Module):
        raise EncoderError(f"custom encoder '{name}': factory returned {type(obj).__name__}, expected an "
                           "Encoder or an nn.Module")  # fmt: skip
    for attr in ("feature_dim", "input_size"):
        if not isinstance(getattr(obj, attr, None), int):
            raise EncoderError(f"custom encoder '{name}': the module needs an int attribute '{attr}'")
    if head:
        raise EncoderError(f"custom encoder '{name}' has no separate head: use head=False")
    if input_size is not None and input_size != obj.input_size:
        raise EncoderError(f"custom encoder '{name}' takes input_size {obj.input_size}, not {input_size}")
    return Encoder(name, obj, head=False, feature_dim=obj.feature_dim, input_size=obj.input_size,
                   weights_id=f"custom:{_state_dict_sha256(obj)}", device=device, precision=precision)  # fmt: skip


def _weights_path(spec: EncoderSpec, weights: str | os.PathLike | None) -> tuple[Path, str]:
    """(local file, its SHA-256) for ``weights`` = None (the official file), a path or a URL."""
    if weights is None:
        return wts.resolve(spec.weights)
    w = str(weights)
    path = wts.download_url(w) if w.startswith(("http://", "https://")) else Path(w)
    if not path.is_file():
        raise EncoderError(f"weights file {path} for encoder '{spec.name}' does not exist")
    official = wts.WEIGHTS[spec.weights]
    if path.name == official.filename:  # the official file from elsewhere: the same checks apply
        return path, wts.verify(path, official.sha256, official.sha256_prefix)
    return path, wts.sha256_file(path)


def load_encoder(
    name: str,
    head: bool = False,
    weights: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    input_size: int | None = None,
    precision: Precision = "fp32",
    normalize: Normalize | None = None,
) -> Encoder:
    """Build encoder ``name`` (see the module docstring for names, ``weights`` and custom encoders).

    ``name`` may carry the feature choice as ``"dino/head"`` / ``"dino/trunk"``. ``device=None`` picks
    CUDA when available. ``input_size=None`` is the encoder's own size (224). ``normalize=None`` is the
    registry's input scaling (RCDM's choice for its set); ``"imagenet"`` / ``"none"`` override it.
    """
    if ":" in name:
        return _load_custom(name, head, device, input_size, precision)
    if name.endswith(("/head", "/trunk")):
        name, _, which = name.rpartition("/")
        head = head or which == "head"
    spec = get_spec(name)
    if head and spec.head is None:
        raise EncoderError(f"encoder '{spec.name}' has no projection head: use head=False (its trunk)")
    if precision not in ("fp32", "bf16"):
        raise EncoderError(f"precision must be 'fp32' or 'bf16', got '{precision}'")
    if normalize not in (None, "none", "imagenet"):
        raise EncoderError(f"normalize must be 'none' or 'imagenet', got '{normalize}'")
    norm: Normalize = normalize or spec.normalize
    size = int(input_size or spec.input_size)
    if weights == "random":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_name_seed(spec.name))
            trunk, head_net = _build(spec, head, size)
        weights_id, weights_file = "random", None
    else:
        path, weights_id = _weights_path(spec, weights)
        trunk, head_net = _build(spec, head, size)
        _load_official(spec, trunk, head_net, str(path), wts.WEIGHTS[spec.weights].loader)
        weights_file = path.name
    if weights == "random":  # statistics of the weights themselves: independent of the input scaling
        calibrate_batchnorm(EncoderNet(trunk, head_net, "none"), size, _name_seed(spec.name))
    net = EncoderNet(trunk, head_net, norm)
    return Encoder(
        spec.name,
        net,
        head=head_net is not None,
        feature_dim=spec.head_dim if head_net is not None else spec.trunk_dim,  # type: ignore[arg-type]
        input_size=size,
        weights_id=weights_id,
        normalize=norm,
        weights_file=weights_file,
        arch=spec.arch if spec.vit is None else f"vit-p{spec.vit.patch_size}-d{spec.vit.embed_dim}",
        device=device,
        precision=precision,
    )
