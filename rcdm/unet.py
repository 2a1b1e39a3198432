"""The ADM UNet of guided-diffusion (Dhariwal & Nichol 2021) with RCDM's representation conditioning.

RCDM (Bordes et al. 2022) adds one layer to ADM: ``ssl_emb = Linear(D, 4 * num_channels)``, and feeds
the representation through the timestep embedding,

    emb = time_embed(timestep_embedding(t)) + ssl_emb(feat),

which drives every ResBlock through the scale-shift GroupNorm ``h = norm(h) * (1 + scale) + shift``.
There is no other conditioning path; ``feat=None`` leaves out the ``ssl_emb`` term, i.e. plain ADM.

The module tree and parameter names are exactly guided-diffusion's ``UNetModel`` (``time_embed``,
``input_blocks``, ``middle_block``, ``output_blocks``, ``out``) with ``ssl_emb`` right after
``time_embed``, so the released RCDM state dicts load with ``strict=True``. The numerics are ADM's too:
GroupNorm with 32 groups computed in float32, zero-initialised last convolutions, cos-then-sin
timestep features, and the two QKV head layouts (legacy: heads split before q/k/v; new: after).
Attention goes through ``F.scaled_dot_product_attention`` (``attention_backend="sdpa"``) or the
explicit softmax of the original code (``"math"``), which compute the same function.

Usage::

    cfg = load_config(UNetConfig, "configs/model/rcdm128.yaml")
    model = UNet(cfg)
    out = model(x, t, feat)  # x (N, 3, H, W) in [-1, 1], t (N,) long in 0..T-1, feat (N, D)
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

AttentionBackend = Literal["sdpa", "math"]
FeatureNorm = Literal["none", "layernorm", "standardize"]

# guided-diffusion's channel_mult for each image size (script_util.create_model). 32 follows
# improved-diffusion's CIFAR-10 model and 16 is 32's without its last level: the project's choice.
DEFAULT_CHANNEL_MULT: dict[int, tuple[float, ...]] = {
    512: (0.5, 1, 1, 2, 2, 4, 4),
    256: (1, 1, 2, 2, 4, 4),
    128: (1, 1, 2, 3, 4),
    64: (1, 2, 3, 4),
    32: (1, 2, 2, 2),
    16: (1, 2, 2),
}
NORM_GROUPS = 32


@dataclass(frozen=True)
class UNetConfig:
    """Hyper-parameters of the UNet, named as guided-diffusion's flags.

    The defaults are the ADM 128x128 flags the released RCDM models use, without conditioning.
    ``attention_resolutions`` lists RESOLUTIONS (e.g. (32, 16, 8) at 128x128), not downsample factors.
    ``None`` means "unset": ``num_head_channels`` (use ``num_heads``), ``num_heads_upsample`` (=
    ``num_heads``), ``channel_mult`` (guided-diffusion's default for ``image_size``), ``feature_dim``
    (an unconditional ADM). ``feature_norm="layernorm"`` standardises each feature vector (zero mean,
    unit variance, no learned affine) before ``ssl_emb``; ``"standardize"`` z-scores each dimension with
    the training set's statistics, held in the buffers ``feat_mean`` and ``feat_std`` (set by the
    training stage, saved with the weights); RCDM feeds raw features (``"none"``).
    ``learned_null_feature`` adds a parameter ``null_feat`` used as the dropped conditioning for
    classifier-free guidance (zeros otherwise).
    """

    image_size: int = 128
    in_channels: int = 3
    num_channels: int = 256
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (32, 16, 8)
    num_heads: int = 4
    num_head_channels: int | None = None
    num_heads_upsample: int | None = None
    channel_mult: tuple[float, ...] | None = None
    dropout: float = 0.0
    learn_sigma: bool = True
    use_scale_shift_norm: bool = True
    resblock_updown: bool = True
    use_new_attention_order: bool = False
    feature_dim: int | None = None
    learned_null_feature: bool = False
    feature_norm: FeatureNorm = "none"
    use_checkpoint: bool = False
    attention_backend: AttentionBackend = "sdpa"

    def __post_init__(self) -> None:
        # Sequences given from Python (lists) become tuples so the config stays hashable and comparable.
        object.__setattr__(self, "attention_resolutions", tuple(self.attention_resolutions))
        if self.channel_mult is not None:
            object.__setattr__(self, "channel_mult", tuple(self.channel_mult))
        self._validate()

    def _validate(self) -> None:
        for name in ("image_size", "in_channels", "num_channels", "num_res_blocks", "num_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"UNetConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("num_head_channels", "num_heads_upsample", "feature_dim"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"UNetConfig.{name} must be >= 1 or None (unset), got {value}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"UNetConfig.dropout must be in [0, 1), got {self.dropout}")
        if self.feature_norm not in ("none", "layernorm", "standardize"):
            raise ValueError(
                "UNetConfig.feature_norm must be 'none', 'layernorm' or 'standardize', "
                f"got {self.feature_norm!r}"
            )
        if self.attention_backend not in ("sdpa", "math"):
            raise ValueError(
                f"UNetConfig.attention_backend must be 'sdpa' or 'math', got {self.attention_backend!r}"
            )
        if self.feature_dim is None and (self.learned_null_feature or self.feature_norm != "none"):
            raise ValueError(
                "learned_null_feature / feature_norm need a conditional model: set feature_dim "
                "(the encoder's feature size) or leave them at False / 'none'"
            )

        mult = self.resolved_channel_mult
        if not mult or any(m <= 0 for m in mult):
            raise ValueError(f"UNetConfig.channel_mult must be non-empty and positive, got {mult}")
        factor = 2 ** (len(mult) - 1)
        if self.image_size % factor:
            raise ValueError(
                f"image_size {self.image_size} is not divisible by {factor}, the total downsampling of "
                f"{len(mult)} levels (channel_mult {mult}): change image_size or channel_mult"
            )
        for width in self.level_channels:
            if width % NORM_GROUPS:
                raise ValueError(
                    f"level width {width} (= channel_mult x num_channels {self.num_channels}) is not a "
                    f"multiple of {NORM_GROUPS}, the GroupNorm group count: change num_channels or "
                    "channel_mult"
                )
        reachable = self.level_resolutions
        unreachable = [r for r in self.attention_resolutions if r not in reachable]
        if unreachable:
            raise ValueError(
                f"attention_resolutions {unreachable} are not reached by a {self.image_size}px UNet with "
                f"{len(mult)} levels; reachable resolutions are {list(reachable)}"
            )
        # Attention runs at the listed levels and always in the middle block (the last level's width).
        widths = {w for w, r in zip(self.level_channels, reachable) if r in self.attention_resolutions}
        widths.add(self.level_channels[-1])
        heads = {self.num_heads, self.num_heads_upsample or self.num_heads}
        for width in sorted(widths):
            if self.num_head_channels is not None:
                if width % self.num_head_channels:
                    raise ValueError(
                        f"num_head_channels {self.num_head_channels} does not divide the attention width "
                        f"{width}: choose a divisor of every attention level's width"
                    )
            else:
                for n in sorted(heads):
                    if width % n:
                        raise ValueError(
                            f"{n} attention heads do not divide the attention width {width}: change "
                            "num_heads / num_heads_upsample or set num_head_channels"
                        )

    @property
    def resolved_channel_mult(self) -> tuple[float, ...]:
        """``channel_mult``, or guided-diffusion's default for ``image_size`` when it is None."""
        if self.channel_mult is not None:
            return self.channel_mult
        if self.image_size not in DEFAULT_CHANNEL_MULT:
            raise ValueError(
                f"no default channel_mult for image_size {self.image_size} (defaults exist for "
                f"{sorted(DEFAULT_CHANNEL_MULT)}): set channel_mult, e.g. [1, 2, 2, 2]"
            )
        return DEFAULT_CHANNEL_MULT[self.image_size]

    @property
    def level_channels(self) -> tuple[int, ...]:
        """Width of each level, ``int(mult * num_channels)`` as guided-diffusion rounds it."""
        return tuple(int(m * self.num_channels) for m in self.resolved_channel_mult)

    @property
    def level_resolutions(self) -> tuple[int, ...]:
        """Spatial size at each level: image_size, image_size / 2, ..."""
        return tuple(self.image_size // 2**level for level in range(len(self.resolved_channel_mult)))

    @property
    def out_channels(self) -> int:
        """2 * in_channels with learn_sigma (eps and the variance interpolation v), else in_channels."""
        return self.in_channels * (2 if self.learn_sigma else 1)

    @property
    def emb_dim(self) -> int:
        return 4 * self.num_channels

    def replace(self, **changes) -> UNetConfig:
        return dataclasses.replace(self, **changes)


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal features ``[cos(t w_i), sin(t w_i)]``, ``w_i = max_period^(-i / half)``, i < dim // 2.

    t (N,) may be fractional; returns (N, dim) float32, zero-padded by one column when dim is odd.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]  # (N, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the input dtype (ADM's ``normalization``).

    A contiguous (NCHW) bfloat16 input on the CPU goes to the native kernel, which accumulates the
    statistics in float32 itself and returns bfloat16: the same statistics without two dtype copies of
    the activation (1.2x a bf16 training step of the demo UNet on a 2-core CPU). Channels-last bf16 input
    keeps the float32 route, the native kernel is slow in that layout.
    """

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.bfloat16 and x.device.type == "cpu" and x.is_contiguous():
            return super().forward(x)
        return super().forward(x.float()).type(x.dtype)


def normalization(channels: int) -> GroupNorm32:
    return GroupNorm32(NORM_GROUPS, channels)


def zero_module(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        p.detach().zero_()
    return module


class TimestepBlock(nn.Module):
    """A block whose forward takes the embedding ``emb`` as a second argument."""

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        raise NotImplementedError


class TimestepEmbedSequential(nn.Sequential, TimestepBlock):
    """Sequential that passes ``emb`` to the children that are TimestepBlocks."""

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        for layer in self:
            x = layer(x, emb) if isinstance(layer, TimestepBlock) else layer(x)
        return x


class Upsample(nn.Module):
    """Nearest 2x upsampling, then a 3x3 conv when ``use_conv``."""

    def __init__(self, channels: int, use_conv: bool):
        super().__init__()
        self.use_conv = use_conv
        if use_conv:
            self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    """Stride-2 3x3 conv when ``use_conv``, else 2x2 average pooling."""

    def __init__(self, channels: int, use_conv: bool):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1) if use_conv else nn.AvgPool2d(2)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class ResBlock(TimestepBlock):
    """ADM residual block, optionally resampling (``up``/``down``) and changing the width.

    With ``use_scale_shift_norm``: h = out_rest(out_norm(h) * (1 + scale) + shift), (scale, shift) =
    emb_layers(emb); otherwise h = out_layers(h + emb_layers(emb)). Output: skip(x) + h.
    """

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float,
        out_channels: int | None = None,
        use_scale_shift_norm: bool = False,
        use_checkpoint: bool = False,
        up: bool = False,
        down: bool = False,
    ):
        super().__init__()
        out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.use_checkpoint = use_checkpoint
        self.in_layers = nn.Sequential(
            normalization(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.updown = up or down
        if up:
            self.h_upd, self.x_upd = Upsample(channels, False), Upsample(channels, False)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False), Downsample(channels, False)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels)
        )
        self.out_layers = nn.Sequential(
            normalization(out_channels),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1)),
        )
        if out_channels == channels:
            self.skip_connection = nn.Identity()
        else:
            self.skip_connection = nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        if self.use_checkpoint and torch.is_grad_enabled():
            return checkpoint(self._forward, x, emb, use_reentrant=False)
        return self._forward(x, emb)

    def _forward(self, x: Tensor, emb: Tensor) -> Tensor:
        # x (N, C, H, W), emb (N, E)
        if self.updown:
            # Resample between the activation and the conv, as ADM does (and the skip path alike).
            h = self.h_upd(self.in_layers[:-1](x))
            x = self.x_upd(x)
            h = self.in_layers[-1](h)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)[:, :, None, None]  # (N, 2C' or C', 1, 1)
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


def qkv_attention(qkv: Tensor, num_heads: int, new_order: bool, backend: AttentionBackend) -> Tensor:
    """Multi-head self-attention over the T positions of ``qkv`` (N, 3 * heads * C, T) -> (N, heads * C, T).

    Channel layout: legacy (``new_order=False``) is [head][q|k|v][C]; new is [q|k|v][head][C].
    ``"math"`` is ADM's formula (q and k each scaled by C^-1/4, softmax in float32);
    ``"sdpa"`` computes the same softmax(q^T k / sqrt(C)) v with ``F.scaled_dot_product_attention``.
    """
    n, width, length = qkv.shape
    ch = width // (3 * num_heads)
    if new_order:
        q, k, v = qkv.reshape(n, 3, num_heads, ch, length).unbind(1)  # each (N, heads, C, T)
    else:
        q, k, v = qkv.reshape(n, num_heads, 3, ch, length).unbind(2)
    if backend == "math":
        scale = ch**-0.25
        weight = torch.einsum("nhct,nhcs->nhts", q * scale, k * scale)  # (N, heads, T, T)
        weight = torch.softmax(weight.float(), dim=-1).type(weight.dtype)
        out = torch.einsum("nhts,nhcs->nhct", weight, v)  # (N, heads, C, T)
        return out.reshape(n, num_heads * ch, length)
    # Fused kernels want (N, heads, T, C) with unit stride on C.
    q, k, v = (z.transpose(-1, -2).contiguous() for z in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v)  # (N, heads, T, C)
    return out.transpose(-1, -2).reshape(n, num_heads * ch, length)


class AttentionBlock(nn.Module):
    """Spatial self-attention with a residual connection: x + proj_out(attention(qkv(norm(x))))."""

    def __init__(
        self,
        channels: int,
        num_heads: int,
        num_head_channels: int | None,
        new_order: bool,
        backend: AttentionBackend,
        use_checkpoint: bool = False,
    ):
        super().__init__()
        self.num_heads = num_heads if num_head_channels is None else channels // num_head_channels
        self.new_order = new_order
        self.backend = backend
        self.use_checkpoint = use_checkpoint
        self.norm = normalization(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = zero_module(nn.Conv1d(channels, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        if self.use_checkpoint and torch.is_grad_enabled():
            return checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)

    def _forward(self, x: Tensor) -> Tensor:
        n, c, height, width = x.shape
        x = x.reshape(n, c, height * width)  # (N, C, T)
        h = qkv_attention(self.qkv(self.norm(x)), self.num_heads, self.new_order, self.backend)
        return (x + self.proj_out(h)).reshape(n, c, height, width)


class UNet(nn.Module):
    """ADM UNet, conditioned on a representation ``feat`` through ``ssl_emb`` (RCDM)."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        mc, emb_dim = cfg.num_channels, cfg.emb_dim
        heads_up = cfg.num_heads_upsample or cfg.num_heads
        attn_ds = {cfg.image_size // r for r in cfg.attention_resolutions}  # downsample factors

        def res_block(ch: int, out_ch: int | None = None, up: bool = False, down: bool = False) -> ResBlock:
            return ResBlock(
                ch, emb_dim, cfg.dropout, out_ch, cfg.use_scale_shift_norm, cfg.use_checkpoint, up, down
            )

        def attention(ch: int, heads: int) -> AttentionBlock:
            return AttentionBlock(
                ch,
                heads,
                cfg.num_head_channels,
                new_order=cfg.use_new_attention_order,
                backend=cfg.attention_backend,
                use_checkpoint=cfg.use_checkpoint,
            )

        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if cfg.feature_dim is not None:
            self.ssl_emb = nn.Linear(cfg.feature_dim, emb_dim)

        widths = cfg.level_channels
        ch = widths[0]
        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(nn.Conv2d(cfg.in_channels, ch, 3, padding=1))]
        )
        skip_widths = [ch]
        ds = 1
        for level, width in enumerate(widths):
            for _ in range(cfg.num_res_blocks):
                layers: list[nn.Module] = [res_block(ch, width)]
                ch = width
                if ds in attn_ds:
                    layers.append(attention(ch, cfg.num_heads))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_widths.append(ch)
            if level != len(widths) - 1:
                down = res_block(ch, down=True) if cfg.resblock_updown else Downsample(ch, use_conv=True)
                self.input_blocks.append(TimestepEmbedSequential(down))
                skip_widths.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(
            res_block(ch), attention(ch, cfg.num_heads), res_block(ch)
        )

        self.output_blocks = nn.ModuleList()
        for level, width in reversed(list(enumerate(widths))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [res_block(ch + skip_widths.pop(), width)]
                ch = width
                if ds in attn_ds:
                    layers.append(attention(ch, heads_up))
                if level and i == cfg.num_res_blocks:
                    layers.append(
                        res_block(ch, up=True) if cfg.resblock_updown else Upsample(ch, use_conv=True)
                    )
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            normalization(ch), nn.SiLU(), zero_module(nn.Conv2d(ch, cfg.out_channels, 3, padding=1))
        )
        if cfg.learned_null_feature:
            self.null_feat = nn.Parameter(torch.zeros(cfg.feature_dim))
        if cfg.feature_norm == "standardize":
            self.register_buffer("feat_mean", torch.zeros(cfg.feature_dim))
            self.register_buffer("feat_std", torch.ones(cfg.feature_dim))

    @torch.no_grad()
    def set_feature_stats(self, mean: Tensor, std: Tensor) -> None:
        """Per-dimension statistics of the training features, for ``feature_norm="standardize"``."""
        if self.cfg.feature_norm != "standardize":
            raise ValueError(
                f"feature statistics need feature_norm='standardize', not {self.cfg.feature_norm!r}"
            )
        d = self.cfg.feature_dim
        if mean.shape != (d,) or std.shape != (d,):
            raise ValueError(f"mean and std must be ({d},), got {tuple(mean.shape)} and {tuple(std.shape)}")
        if not bool(torch.isfinite(mean).all() and torch.isfinite(std).all() and (std > 0).all()):
            raise ValueError("feature statistics must be finite, with std > 0")
        self.feat_mean.copy_(mean)
        self.feat_std.copy_(std)

    def null_feature(self, n: int) -> Tensor:
        """The (n, D) feature standing for "no conditioning" in classifier-free guidance.

        Zeros, or the learned ``null_feat`` (expanded, so gradients reach it) when learned_null_feature.
        """
        if self.cfg.feature_dim is None:
            raise ValueError("this UNet is unconditional (feature_dim=None): it has no null feature")
        if self.cfg.learned_null_feature:
            return self.null_feat[None].expand(n, -1)
        w = self.ssl_emb.weight
        return torch.zeros(n, self.cfg.feature_dim, device=w.device, dtype=w.dtype)

    def embed(self, t: Tensor, feat: Tensor | None = None) -> Tensor:
        """emb (N, 4 * num_channels) = time_embed(timestep_embedding(t)) [+ ssl_emb(feat)]."""
        w = self.time_embed[0].weight
        emb = self.time_embed(timestep_embedding(t, self.cfg.num_channels).to(w.dtype))
        if feat is not None:
            if self.cfg.feature_norm == "layernorm":
                feat = F.layer_norm(feat.float(), feat.shape[-1:])
            elif self.cfg.feature_norm == "standardize":
                feat = (feat.float() - self.feat_mean) / self.feat_std
            emb = emb + self.ssl_emb(feat.to(self.ssl_emb.weight.dtype))
        return emb

    def forward(self, x: Tensor, t: Tensor, feat: Tensor | None = None) -> Tensor:
        """x (N, C, H, W), t (N,) timestep indices, feat (N, D) or None -> (N, out_channels, H, W).

        The output has x's dtype (also under autocast).
        """
        self._check_inputs(x, t, feat)
        emb = self.embed(t, feat)  # (N, E)
        skips = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h).to(x.dtype)

    def _check_inputs(self, x: Tensor, t: Tensor, feat: Tensor | None) -> None:
        cfg = self.cfg
        if x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"x must be (N, {cfg.in_channels}, H, W), got shape {tuple(x.shape)}")
        factor = 2 ** (len(cfg.level_channels) - 1)
        if x.shape[2] % factor or x.shape[3] % factor:
            raise ValueError(
                f"x is {x.shape[2]}x{x.shape[3]}: height and width must be multiples of {factor}"
            )
        if t.shape != (x.shape[0],):
            raise ValueError(f"t must be (N,) = ({x.shape[0]},), got shape {tuple(t.shape)}")
        if feat is None:
            return
        if cfg.feature_dim is None:
            raise ValueError(
                "this UNet is unconditional (feature_dim=None) but got feat: pass feat=None or build the "
                "model with feature_dim set to the encoder's feature size"
            )
        if feat.shape != (x.shape[0], cfg.feature_dim):
            raise ValueError(
                f"feat must be (N, D) = ({x.shape[0]}, {cfg.feature_dim}), got shape {tuple(feat.shape)}: "
                "features from a different encoder? check the model's feature_dim against the shards' "
                "manifest"
            )
