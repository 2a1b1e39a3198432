"""UNet: guided-diffusion's state-dict layout, RCDM's conditioning path, attention numerics, autocast."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from rcdm.config import ConfigError, from_dict, load_config, to_dict
from rcdm.unet import (
    AttentionBlock,
    ResBlock,
    UNet,
    UNetConfig,
    qkv_attention,
    timestep_embedding,
)

REPO = Path(__file__).resolve().parent.parent
# The released RCDM-128 state dict (494 keys); a copy of shared/reference/ kept with the tests.
REFERENCE_TSV = REPO / "tests" / "data" / "rcdm128-state-dict.tsv"
SHARED_TSV = REPO.parent / "shared" / "reference" / "rcdm128-state-dict.tsv"

# Small enough for CPU, large enough to exercise every path: 3 levels, attention at 16 and 8, 2 heads.
SMALL = UNetConfig(
    image_size=32,
    num_channels=32,
    num_res_blocks=1,
    attention_resolutions=(16, 8),
    num_heads=2,
    channel_mult=(1, 2, 2),
    feature_dim=12,
)


def randomized(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter random values: a fresh UNet's zero-initialised last convs output zeros.

    Matrices ~ N(0, 1/fan_in), 1-D weights (norm gains) ~ 1 + N(0, 0.3^2), biases ~ N(0, 0.3^2).
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.ndim > 1:
                p.copy_(noise / math.sqrt(p[0].numel()))
            else:
                p.copy_(noise * 0.3 + (1.0 if name.endswith("weight") else 0.0))
    return model


def small_model(seed: int = 0, **changes) -> UNet:
    return randomized(UNet(SMALL.replace(**changes)), seed).eval()


def inputs(cfg: UNetConfig = SMALL, n: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cfg.in_channels, cfg.image_size, cfg.image_size, generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    feat = torch.randn(n, cfg.feature_dim, generator=g) if cfg.feature_dim else None
    return x, t, feat


# --- config ---------------------------------------------------------------------------------------


def test_presets_load_with_tuples_and_default_channel_mult():
    cfg = load_config(UNetConfig, REPO / "configs" / "model" / "rcdm128.yaml")
    assert cfg.attention_resolutions == (32, 16, 8)
    assert cfg.channel_mult is None
    assert cfg.resolved_channel_mult == (1, 1, 2, 3, 4)  # guided-diffusion's default for 128
    assert cfg.level_channels == (256, 256, 512, 768, 1024)
    assert cfg.out_channels == 6
    tiny = load_config(UNetConfig, REPO / "configs" / "model" / "tiny.yaml", overrides=["learn_sigma=false"])
    assert tiny.channel_mult == (1.0, 2.0, 2.0) and isinstance(tiny.attention_resolutions, tuple)
    assert tiny.out_channels == 3
    assert from_dict(UNetConfig, to_dict(cfg)) == cfg  # the form stored in checkpoints
    assert UNetConfig(image_size=512).resolved_channel_mult == (0.5, 1, 1, 2, 2, 4, 4)
    assert UNetConfig(image_size=64, attention_resolutions=(16, 8)).resolved_channel_mult == (1, 2, 3, 4)


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(attention_resolutions=(32, 48)), r"attention_resolutions \[48\] are not reached"),
        (dict(attention_resolutions=(4,)), r"reachable resolutions are \[128, 64, 32, 16, 8\]"),
        (dict(num_heads=3), "3 attention heads do not divide the attention width 512"),
        (dict(num_heads_upsample=5), "5 attention heads do not divide"),
        (dict(num_head_channels=96), "num_head_channels 96 does not divide the attention width 512"),
        (dict(num_channels=48), "is not a multiple of 32"),
        (dict(image_size=96), "no default channel_mult for image_size 96"),
        (dict(image_size=72, channel_mult=(1, 2, 2, 2, 2)), "not divisible by 16"),
        (dict(learned_null_feature=True), "need a conditional model: set feature_dim"),
        (dict(attention_backend="flash"), "attention_backend must be 'sdpa' or 'math'"),
        (dict(dropout=1.0), r"dropout must be in \[0, 1\)"),
    ],
)
def test_config_rejects_inconsistent_flags(changes, message):
    with pytest.raises(ValueError, match=message):
        UNetConfig(**changes)


def test_config_error_through_the_loader_names_the_file():
    with pytest.raises(ConfigError, match="rcdm128.yaml.*num_heads"):
        load_config(UNetConfig, REPO / "configs" / "model" / "rcdm128.yaml", overrides=["num_heads=3"])


# --- layout ---------------------------------------------------------------------------------------


def test_rcdm128_state_dict_matches_released_layout():
    path = REFERENCE_TSV if REFERENCE_TSV.is_file() else SHARED_TSV
    assert path.is_file(), f"reference state-dict listing missing: expected {REFERENCE_TSV}"
    expected = [tuple(line.split("\t")) for line in path.read_text().splitlines() if line]
    assert len(expected) == 494  # upstream-facts.md: guided-diffusion's 492 keys + ssl_emb.{weight,bias}
    cfg = load_config(UNetConfig, REPO / "configs" / "model" / "rcdm128.yaml")
    with torch.device("meta"):
        model = UNet(cfg)
    got = [(k, str(list(v.shape))) for k, v in model.state_dict().items()]
    assert got == expected  # keys, shapes and order
    n_adm = sum(p.numel() for name, p in model.named_parameters() if not name.startswith("ssl_emb"))
    # upstream-facts.md: 420.5M parameters for ADM-128 plus the ssl_emb layer (2048 * 1024 + 1024).
    assert round(n_adm / 1e6, 1) == 420.5
    assert model.ssl_emb.weight.numel() + model.ssl_emb.bias.numel() == 2048 * 1024 + 1024


def test_learned_null_feature_is_an_extra_parameter_and_optional():
    model = UNet(SMALL.replace(learned_null_feature=True))
    keys = list(model.state_dict())
    # PyTorch lists a module's own parameters before its children's, so null_feat comes first.
    assert keys[0] == "null_feat" and keys[1:] == list(UNet(SMALL).state_dict())
    assert model.null_feature(3).shape == (3, 12)
    with torch.no_grad():
        model.null_feat.fill_(0.5)
    assert torch.equal(model.null_feature(2), torch.full((2, 12), 0.5))
    assert torch.equal(UNet(SMALL).null_feature(4), torch.zeros(4, 12))
    with pytest.raises(ValueError, match="unconditional"):
        UNet(SMALL.replace(feature_dim=None)).null_feature(1)


def test_conv_resampling_uses_guided_diffusion_names():
    model = UNet(SMALL.replace(resblock_updown=False))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    # Level 0 of SMALL: conv, one ResBlock, then the Downsample as input block 2; the first upsampling
    # output block holds ResBlock, AttentionBlock (at 8px), Upsample.
    assert shapes["input_blocks.2.0.op.weight"] == (32, 32, 3, 3)
    assert shapes["output_blocks.1.2.conv.weight"] == (64, 64, 3, 3)


# --- forward semantics ----------------------------------------------------------------------------


def test_output_shapes_and_zero_init():
    x, t, feat = inputs()
    fresh = UNet(SMALL)
    out = fresh(x, t, feat)
    assert out.shape == (2, 6, 32, 32)
    assert torch.count_nonzero(out) == 0  # ADM zero-initialises the output conv
    no_sigma = small_model(learn_sigma=False)
    assert no_sigma(x, t, feat).shape == (2, 3, 32, 32)


def test_feat_none_is_plain_adm_and_feat_changes_the_output():
    cond = small_model()
    plain = UNet(SMALL.replace(feature_dim=None)).eval()
    state = {k: v for k, v in cond.state_dict().items() if not k.startswith("ssl_emb")}
    plain.load_state_dict(state, strict=True)
    x, t, feat = inputs()
    with torch.no_grad():
        assert torch.equal(cond(x, t), plain(x, t))
        assert (cond(x, t, feat) - plain(x, t)).abs().max() > 1e-2


def test_feature_enters_only_as_an_offset_of_the_time_embedding():
    """ssl_emb(f) is added to time_embed's output, so for one sample it is the same as adding it to the
    bias of time_embed's last Linear in the plain model (and nothing else depends on f)."""
    cond = small_model()
    x, t, feat = inputs(n=2)
    with torch.no_grad():
        out = cond(x, t, feat)
        offsets = cond.ssl_emb(feat)  # (N, E)
        for i in range(2):
            plain = UNet(SMALL.replace(feature_dim=None)).eval()
            state = {k: v.clone() for k, v in cond.state_dict().items() if not k.startswith("ssl_emb")}
            state["time_embed.2.bias"] += offsets[i]
            plain.load_state_dict(state)
            torch.testing.assert_close(
                plain(x[i : i + 1], t[i : i + 1]), out[i : i + 1], rtol=1e-5, atol=1e-5
            )
        # A zero ssl_emb weight leaves only its bias: the output no longer depends on the feature.
        cond.ssl_emb.weight.zero_()
        assert torch.equal(cond(x, t, feat), cond(x, t, torch.randn_like(feat)))


def test_layernorm_features_ignore_per_sample_affine_changes():
    model = small_model(feature_norm="layernorm")
    x, t, feat = inputs()
    scale = torch.tensor([[3.0], [0.5]])
    # Exact up to layer_norm's eps = 1e-5 added to the variance (~1 here): relative changes ~1e-5.
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, feat * scale + 5.0), model(x, t, feat), rtol=1e-3, atol=1e-3)
        assert (model(x, t, feat) - model(x, t, feat.flip(1))).abs().max() > 1e-3


def test_standardized_features_equal_raw_features_of_the_z_scores():
    """feature_norm="standardize" with stats (m, s) on f == the same weights without norm on (f - m) / s."""
    model = small_model(feature_norm="standardize")
    plain = UNet(SMALL)
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("feat_")})
    x, t, feat = inputs()
    mean, std = torch.randn(12), torch.rand(12) + 0.5
    model.set_feature_stats(mean, std)
    assert set(model.state_dict()) - set(plain.state_dict()) == {"feat_mean", "feat_std"}
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, feat), plain.eval()(x, t, (feat - mean) / std))
    with pytest.raises(ValueError, match="std > 0"):
        model.set_feature_stats(mean, torch.zeros(12))
    with pytest.raises(ValueError, match=r"must be \(12,\)"):
        model.set_feature_stats(mean[:3], std[:3])
    with pytest.raises(ValueError, match="need feature_norm='standardize'"):
        plain.set_feature_stats(mean, std)


def test_input_errors_say_what_is_wrong():
    model = UNet(SMALL)
    x, t, feat = inputs()
    with pytest.raises(ValueError, match=r"feat must be \(N, D\) = \(2, 12\), got shape \(2, 7\)"):
        model(x, t, torch.zeros(2, 7))
    with pytest.raises(ValueError, match="unconditional"):
        UNet(SMALL.replace(feature_dim=None))(x, t, feat)
    with pytest.raises(ValueError, match="multiples of 4"):
        model(x[:, :, :30, :30], t, feat)
    with pytest.raises(ValueError, match=r"t must be \(N,\)"):
        model(x, t[:1], feat)


def test_timestep_embedding_closed_form():
    # dim 4: half = 2, frequencies 10000^(-0/2) = 1 and 10000^(-1/2) = 0.01; layout [cos..., sin...].
    emb = timestep_embedding(torch.tensor([0, 1, 250]), 4)
    expected = torch.tensor(
        [[1.0, 1.0, 0.0, 0.0]]
        + [[math.cos(s), math.cos(s * 0.01), math.sin(s), math.sin(s * 0.01)] for s in (1.0, 250.0)]
    )
    torch.testing.assert_close(emb, expected, rtol=0, atol=1e-5)
    odd = timestep_embedding(torch.tensor([2.5]), 5)  # odd dim: one zero column appended
    assert odd.shape == (1, 5) and odd[0, 4] == 0.0
    torch.testing.assert_close(odd[0, 0], torch.tensor(math.cos(2.5)))


# --- blocks against direct re-computations --------------------------------------------------------


@pytest.mark.parametrize("scale_shift", [True, False])
@pytest.mark.parametrize("resample", [None, "up", "down"])
def test_resblock_matches_adm_formula(scale_shift, resample):
    out_ch = 64 if resample is None else 32  # resampling blocks keep the width in ADM
    block = randomized(
        ResBlock(32, 16, 0.0, out_ch, scale_shift, up=resample == "up", down=resample == "down"), seed=3
    )
    p = dict(block.named_parameters())
    x, emb = torch.randn(2, 32, 8, 8), torch.randn(2, 16)

    def resize(z):
        if resample == "up":
            return F.interpolate(z, scale_factor=2, mode="nearest")
        return F.avg_pool2d(z, 2) if resample == "down" else z

    h = resize(F.silu(F.group_norm(x, 32, p["in_layers.0.weight"], p["in_layers.0.bias"])))
    h = F.conv2d(h, p["in_layers.2.weight"], p["in_layers.2.bias"], padding=1)
    e = F.linear(F.silu(emb), p["emb_layers.1.weight"], p["emb_layers.1.bias"])[:, :, None, None]
    if scale_shift:
        scale, shift = e[:, :out_ch], e[:, out_ch:]
        h = F.group_norm(h, 32, p["out_layers.0.weight"], p["out_layers.0.bias"]) * (1 + scale) + shift
    else:
        h = F.group_norm(h + e, 32, p["out_layers.0.weight"], p["out_layers.0.bias"])
    h = F.conv2d(F.silu(h), p["out_layers.3.weight"], p["out_layers.3.bias"], padding=1)
    skip = resize(x)
    if out_ch != 32:
        skip = F.conv2d(skip, p["skip_connection.weight"], p["skip_connection.bias"])
    with torch.no_grad():
        torch.testing.assert_close(block(x, emb), skip + h, rtol=1e-5, atol=1e-5)


def legacy_attention_reference(qkv: torch.Tensor, heads: int) -> torch.Tensor:
    """guided-diffusion's QKVAttentionLegacy: per head [q; k; v] rows, q and k each scaled by ch^-1/4."""
    n, width, length = qkv.shape
    ch = width // (3 * heads)
    q, k, v = qkv.reshape(n * heads, 3 * ch, length).split(ch, dim=1)
    s = 1 / math.sqrt(math.sqrt(ch))
    w = torch.softmax(torch.einsum("bct,bcs->bts", q * s, k * s), dim=-1)
    return torch.einsum("bts,bcs->bct", w, v).reshape(n, heads * ch, length)


def new_order_attention_reference(qkv: torch.Tensor, heads: int) -> torch.Tensor:
    """guided-diffusion's QKVAttention: all q rows, then all k, then all v; heads split inside each."""
    n, width, length = qkv.shape
    ch = width // (3 * heads)
    q, k, v = (z.reshape(n * heads, ch, length) for z in qkv.chunk(3, dim=1))
    w = torch.softmax(torch.einsum("bct,bcs->bts", q, k) / math.sqrt(ch), dim=-1)
    return torch.einsum("bts,bcs->bct", w, v).reshape(n, heads * ch, length)


@pytest.mark.parametrize("new_order", [False, True])
@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_attention_block_matches_reference(new_order, backend):
    block = randomized(AttentionBlock(64, 4, None, new_order, backend), seed=5)
    p = dict(block.named_parameters())
    x = torch.randn(2, 64, 4, 4)
    flat = x.reshape(2, 64, 16)
    qkv = F.conv1d(F.group_norm(flat, 32, p["norm.weight"], p["norm.bias"]), p["qkv.weight"], p["qkv.bias"])
    ref = new_order_attention_reference if new_order else legacy_attention_reference
    expected = flat + F.conv1d(ref(qkv, 4), p["proj_out.weight"], p["proj_out.bias"])
    with torch.no_grad():
        torch.testing.assert_close(block(x), expected.reshape(2, 64, 4, 4), rtol=1e-5, atol=1e-5)
    # The two layouts really differ on the same qkv (so the test above can tell them apart).
    assert (legacy_attention_reference(qkv, 4) - new_order_attention_reference(qkv, 4)).abs().max() > 1e-2


@pytest.mark.parametrize("new_order", [False, True])
def test_sdpa_equals_math_attention(new_order):
    qkv = torch.randn(3, 3 * 4 * 16, 64) * 2
    torch.testing.assert_close(
        qkv_attention(qkv, 4, new_order, "sdpa"),
        qkv_attention(qkv, 4, new_order, "math"),
        rtol=1e-5,
        atol=1e-5,
    )
    math_model = small_model(use_new_attention_order=new_order, attention_backend="math")
    sdpa_model = UNet(math_model.cfg.replace(attention_backend="sdpa")).eval()
    sdpa_model.load_state_dict(math_model.state_dict())
    x, t, feat = inputs()
    with torch.no_grad():
        torch.testing.assert_close(sdpa_model(x, t, feat), math_model(x, t, feat), rtol=1e-5, atol=1e-5)


# --- precision, memory layout, checkpointing ------------------------------------------------------


@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_bf16_autocast_is_close_to_fp32(backend):
    model = small_model(attention_backend=backend)
    x, t, feat = inputs()
    with torch.no_grad():
        ref = model(x, t, feat)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x, t, feat)
    assert out.dtype == torch.float32  # cast back to x's dtype
    # bf16 keeps 8 significant bits (unit roundoff 2^-8 = 0.4%); a few % relative error after ~20 layers.
    rel = (out - ref).norm() / ref.norm()
    assert 0 < rel < 0.05, rel


def test_channels_last_gives_the_same_output():
    model = small_model()
    x, t, feat = inputs()
    with torch.no_grad():
        ref = model(x, t, feat)
        model = model.to(memory_format=torch.channels_last)
        out = model(x.contiguous(memory_format=torch.channels_last), t, feat)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_gradient_checkpointing_gives_the_same_gradients():
    # Dropout on: checkpointing must replay the same dropout masks during recomputation.
    plain = small_model(dropout=0.3).train()
    ckpt = UNet(plain.cfg.replace(use_checkpoint=True)).train()
    ckpt.load_state_dict(plain.state_dict())
    x, t, feat = inputs()
    grads = []
    for model in (plain, ckpt):
        torch.manual_seed(7)
        model(x, t, feat).square().mean().backward()
        grads.append({k: p.grad for k, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-5, atol=1e-6, msg=k)
    assert grads[0]["ssl_emb.weight"].abs().max() > 0


@pytest.mark.slow
def test_torch_compile_matches_eager():
    model = small_model()
    x, t, feat = inputs()
    compiled = torch.compile(model)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, t, feat), model(x, t, feat), rtol=1e-4, atol=1e-4)
