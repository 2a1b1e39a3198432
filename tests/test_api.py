"""rcdm.api: loading our and released checkpoints with their encoders, seeds, interpolation, manipulation.

The tiny checkpoint, its images and feature sets come from tests/conftest.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rcdm import checkpoint, editing, images, samplers, shards, storage
from rcdm.api import RCDM, RCDMError, list_images, load_shard_features, sample_seeds
from rcdm.config import to_dict
from rcdm.diffusion import DiffusionConfig, build_diffusion
from rcdm.unet import UNetConfig
from tests.conftest import ENC_SIZE, SIZE, TINY, tiny_encoder, tiny_unet, write_feature_set

STEPS = 3  # sampler steps: enough to exercise the loops, cheap on CPU
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def world(tiny_world):
    return tiny_world("api", 4, steps=STEPS, batch_size=1)


def test_our_checkpoint_recreates_its_random_encoder(world):
    rcdm = world["rcdm"]
    assert rcdm.info["kind"] == "ours" and rcdm.info["step"] == 7
    assert rcdm.image_size == SIZE and rcdm.feature_dim == 1280
    assert rcdm.encoder.describe() == tiny_encoder().describe()  # weights "random", input_size 32
    feats = rcdm.encode(world["paths"][:2])  # batch_size 1: one image per encoder call
    enc = tiny_encoder()
    direct = [enc.encode(enc.preprocess(images.open_image(p))[None]) for p in world["paths"][:2]]
    assert torch.equal(feats, torch.cat(direct))
    cond = rcdm.prepare(world["paths"][0])
    crop = images.center_crop_arr(images.open_image(world["paths"][0]), SIZE)  # (16, 16, 3)
    assert (
        torch.equal(cond.reals[0], torch.from_numpy(crop).permute(2, 0, 1))
        and cond.keys == world["paths"][:1]
    )


def test_sample_uses_one_seed_per_sample(world):
    rcdm = world["rcdm"]
    feats = rcdm.encode(world["paths"][:2])
    x = rcdm.sample(feats, n=2, seed=3)
    assert x.shape == (2, 2, 3, SIZE, SIZE) and x.min() >= -1 and x.max() <= 1
    # sample j of item i is the sampler's output with seed sample_seed(3, i, j) (same batch size: exact)
    direct = samplers.sample(
        rcdm.model, rcdm.diffusion, (1, 3, SIZE, SIZE), feats[1:2], sampler="ddim", steps=STEPS,
        seeds=[samplers.sample_seed(3, 1, 0)],
    )  # fmt: skip
    assert torch.equal(x[1, 0], direct[0])
    assert sample_seeds(3, 2, 2) == [3 * 1_000_003 + i * 1009 + j for i in range(2) for j in range(2)]
    assert torch.equal(rcdm.sample(feats, n=2, seed=3), x)  # same seed, same samples
    assert not torch.allclose(x[0, 0], x[0, 1]) and not torch.allclose(x[0, 0], x[1, 0])
    pil = rcdm.sample(feats[0], n=1, seed=3, return_pil=True)
    assert np.array_equal(np.asarray(pil[0][0]), images.to_hwc(images.to_uint8(x[0, :1]))[0])


def test_samples_do_not_depend_on_the_batch_size(world):
    rcdm = world["rcdm"]
    feats = rcdm.encode(world["paths"][:3])
    one = rcdm.sample(feats, n=2, seed=1)  # batch_size 1
    rcdm.batch_size = 4  # batches of 4, 2: every sample sits elsewhere in another batch
    try:
        four = rcdm.sample(feats, n=2, seed=1)
    finally:
        rcdm.batch_size = 1
    # same x_T and per-step noise; only the summation order of batched kernels differs (about 1e-5 on
    # CPU, measured), so the saved uint8 pixels differ by at most one level
    torch.testing.assert_close(four, one, atol=1e-3, rtol=0)
    assert (images.to_uint8(four).int() - images.to_uint8(one).int()).abs().max() <= 1


def test_interpolation_ends_equal_sampling_the_endpoints(world):
    rcdm = world["rcdm"]
    a, b = world["paths"][0], world["paths"][1]
    row = rcdm.interpolate(a, b, steps_r=3, seed=5, n=2, sampler="dpm++")
    assert row.shape == (2, 3, 3, SIZE, SIZE)
    assert torch.equal(row[:, 0], rcdm.sample(a, n=2, seed=5, sampler="dpm++")[0])
    assert torch.equal(row[:, -1], rcdm.sample(b, n=2, seed=5, sampler="dpm++")[0])
    assert not torch.allclose(row[:, 1], row[:, 0]) and not torch.allclose(row[:, 1], row[:, 2])


def test_manipulation_rows_share_noise_and_follow_the_rule(world):
    rcdm = world["rcdm"]
    fs, ft = rcdm.encode(world["paths"][:2])
    pool = torch.zeros(6, 1280)
    pool[:, :3] = 1.0  # dims 0-2 non-zero in all six neighbours
    pool[:4, 3] = 2.0  # dim 3 in four of them
    pool[4:, 4] = 1.0  # dim 4 in two
    result = rcdm.manipulate(fs, ft, pool, k=6, common=3, n=2, seed=2)
    assert result.dims == [0, 1, 2, 3]  # shared by more than 3 of the 6
    assert torch.equal(result.features[1, :4], torch.zeros(4)) and torch.equal(result.features[2, :4], ft[:4])
    assert torch.equal(result.features[1, 4:], fs[4:]) and torch.equal(result.features[0], fs)
    assert result.samples.shape == (3, 2, 3, SIZE, SIZE)
    # row 0 is the plain sample of the source with the same seeds
    assert torch.equal(result.samples[0], rcdm.sample(fs, n=2, seed=2)[0])
    with pytest.raises(editing.EditingError, match="top_magnitude"):
        rcdm.manipulate(fs, ft, torch.randn(6, 1280), k=6, common=3, n=1)


def test_manipulation_searches_a_bank_and_checks_its_encoder(world):
    rcdm = world["rcdm"]
    root = str(world["tmp"] / "feats")
    cond = rcdm.prepare(world["paths"])
    crops = cond.reals.permute(0, 2, 3, 1).numpy()
    write_feature_set(root, crops, cond.features.numpy(), rcdm.encoder.describe())
    fs = cond.features[0]
    nb, keys, sims, _ = rcdm.neighbours(fs, storage.join(root, shards.BANK), k=3)
    assert keys[0] == "item0" and sims[0] == pytest.approx(1.0, abs=1e-6) and nb.shape == (3, 1280)
    _, exact_i = editing.knn_exact(fs[None], cond.features, 3)
    assert keys == [f"item{i}" for i in exact_i[0].tolist()]
    # stored features come back with their crops, in key order
    stored = load_shard_features(root, ["item2", "item0"], image_size=SIZE, expect=rcdm.expected_encoder())
    assert stored.keys == ["item2", "item0"] and torch.equal(stored.features, cond.features[[2, 0]])
    assert torch.equal(stored.reals, cond.reals[[2, 0]])
    with pytest.raises(RCDMError, match="not in the feature shards"):
        load_shard_features(root, ["item9"])
    with pytest.raises(RCDMError, match="encoder 'mobilenet_v2'"):
        load_shard_features(root, expect={"name": "dino", "feature_dim": 1280})


def test_bad_inputs_are_clear_errors(world, tmp_path):
    rcdm = world["rcdm"]
    with pytest.raises(RCDMError, match="does not exist"):
        rcdm.encode(str(tmp_path / "missing.png"))
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(images.ImageError, match="cannot decode"):
        rcdm.encode(str(tmp_path / "bad.png"))
    with pytest.raises(RCDMError, match="D = 1280"):
        rcdm.sample(torch.zeros(2, 12))
    (tmp_path / "empty").mkdir()
    with pytest.raises(RCDMError, match="holds no images"):
        list_images(str(tmp_path / "empty"))
    with pytest.raises(RCDMError, match="trained on mobilenet_v2 features, not dino"):
        RCDM.from_pretrained(world["run"], encoder="dino", device="cpu")
    with pytest.raises(RCDMError, match="trunk features"):
        RCDM.from_pretrained(world["run"], encoder="mobilenet_v2/head", device="cpu")


def _released_file(path, cfg: UNetConfig) -> str:
    """A released-layout checkpoint: a plain state dict of EMA weights, nothing else."""
    torch.save(tiny_unet(cfg, seed=1).state_dict(), path)
    return str(path)


def test_released_state_dict_file_loads_with_an_explicit_config(world, tmp_path):
    cfg = UNetConfig(**{**to_dict(TINY), "feature_dim": 1280})
    path = _released_file(tmp_path / "rcdm_ema_custom.pt", cfg)
    with pytest.raises(RCDMError, match="does not name the encoder"):
        RCDM.from_pretrained(path, model_config=cfg, device="cpu")
    rcdm = RCDM.from_pretrained(
        path, encoder="mobilenet_v2", weights="random", input_size=ENC_SIZE, model_config=cfg, device="cpu",
        steps=STEPS,
    )  # fmt: skip
    assert rcdm.info["kind"] == "released"
    x = rcdm.sample(world["paths"][0], n=2)
    assert x.shape == (1, 2, 3, SIZE, SIZE)
    small = UNetConfig(**{**to_dict(TINY), "feature_dim": 6})
    with pytest.raises(RCDMError, match="takes 6-d features but encoder mobilenet_v2/trunk gives 1280-d"):
        RCDM.from_pretrained(_released_file(tmp_path / "small.pt", small), encoder="mobilenet_v2",
                             model_config=small, device="cpu")  # fmt: skip


def test_released_name_implies_its_encoder(world, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cfg = UNetConfig(**{**to_dict(TINY), "feature_dim": 2048})  # ResNet-50 trunk features
    target = checkpoint.released_cache_path("supervised")
    target.parent.mkdir(parents=True)
    _released_file(target, cfg)
    rcdm = RCDM.from_pretrained("supervised", weights="random", input_size=ENC_SIZE, model_config=cfg, device="cpu",
                                steps=STEPS)  # fmt: skip
    assert rcdm.info["encoder"] == {"name": "supervised", "head": False}
    assert rcdm.encoder.key == "supervised/trunk" and rcdm.encoder.feature_dim == 2048
    assert rcdm.sample(world["paths"][0], n=1).shape == (1, 1, 3, SIZE, SIZE)
    with pytest.raises(RCDMError, match="trained on trunk features of supervised, not head features"):
        RCDM.from_pretrained("supervised", encoder="supervised/head", model_config=cfg, device="cpu")
    with pytest.raises(RCDMError, match="supervised has no projection head"):
        RCDM.from_pretrained(str(target), encoder="supervised/head", model_config=cfg, device="cpu")


def test_diffusion_comes_from_the_checkpoint(tmp_path):
    run = str(tmp_path / "run")
    sd = tiny_unet().state_dict()
    diffusion = DiffusionConfig(steps=200, noise_schedule="cosine")
    checkpoint.save_checkpoint(run, {
        "step": 1, "model": sd, "ema": {}, "optimizer": {},
        "config": {"model": to_dict(TINY), "diffusion": to_dict(diffusion)}, "encoder": tiny_encoder().describe(),
    })  # fmt: skip
    rcdm = RCDM.from_pretrained(run, device="cpu")
    expected = build_diffusion(diffusion)
    assert rcdm.diffusion.num_timesteps == 200
    assert torch.equal(rcdm.diffusion.alphas_cumprod, expected.alphas_cumprod)


def test_grey_model_samples_reach_the_user_as_rgb(world, tmp_path):
    # A one-channel model (model.in_channels: 1) draws one-channel samples; sample, interpolate and
    # manipulate hand back RGB with R = G = B, the form pictures and encoders take.
    run = str(tmp_path / "grey")
    grey = TINY.replace(in_channels=1)
    sd = tiny_unet(grey).state_dict()
    checkpoint.save_checkpoint(run, {
        "step": 1, "model": sd, "ema": {}, "optimizer": {},
        "config": {"model": to_dict(grey), "diffusion": to_dict(DiffusionConfig())},
        "encoder": tiny_encoder().describe(),
    })  # fmt: skip
    rcdm = RCDM.from_pretrained(run, device="cpu", steps=STEPS)
    a, b = world["paths"][0], world["paths"][1]
    x = rcdm.sample(a, n=2, seed=1)
    row = rcdm.interpolate(a, b, steps_r=3, seed=1)
    pool = torch.zeros(6, 1280)
    pool[:, :3] = 1.0  # sparse, like a ReLU trunk's features
    edit = rcdm.manipulate(a, b, pool, k=6, common=3, n=1, seed=1)
    for out in (x, row, edit.samples):
        assert out.shape[-3:] == (3, SIZE, SIZE)
        assert torch.equal(out[..., 0, :, :], out[..., 1, :, :]) and torch.equal(
            out[..., 0, :, :], out[..., 2, :, :]
        )
    # the grey channel is the model's own sample, repeated
    direct = samplers.sample(
        rcdm.model, rcdm.diffusion, (1, 1, SIZE, SIZE), rcdm.encode(a), sampler="ddim", steps=STEPS,
        seeds=[samplers.sample_seed(1, 0, 0)],
    )  # fmt: skip
    torch.testing.assert_close(x[0, 0, :1], direct[0], atol=1e-3, rtol=0)  # batched here, alone there
