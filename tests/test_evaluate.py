"""stages.evaluate: the metric assembly on known generators, and the CLI on a tiny world made here."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from rcdm import bank as bank_mod
from rcdm import images, metrics, shards, storage
from rcdm.checkpoint import save_checkpoint
from rcdm.config import to_dict
from rcdm.diffusion import DiffusionConfig
from rcdm.encoders import load_encoder
from rcdm.unet import UNet, UNetConfig
from stages import evaluate as ev
from tests.conftest import REPO

SIZE = 16  # training resolution of the tiny world
CLASSES = 10


def _crops(n_per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Class c = a solid colour from a fixed palette + pixel noise: (N, 16, 16, 3) uint8, (N,) labels."""
    palette = np.random.default_rng(99).integers(0, 256, (CLASSES, 3))
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(CLASSES), n_per_class)
    noise = rng.normal(0, 20, (len(labels), SIZE, SIZE, 3))
    crops = np.clip(palette[labels][:, None, None, :] + noise, 0, 255).astype(np.uint8)
    return crops, labels


def _feature_set(root, crops, labels, enc) -> dict:
    """A feature set in the shard format (two shards) with its manifest and bank."""
    feats = ev.encode_uint8(enc, crops).numpy()
    flips = ev.encode_uint8(enc, crops[:, :, ::-1].copy()).numpy()
    entries, half = [], (len(crops) + 1) // 2
    for s, lo in enumerate(range(0, len(crops), half)):
        rows = [
            shards.encode_sample(
                f"item{i:04d}", crops[i], feats[i], flips[i], int(labels[i]), {"source": str(i)}
            )
            for i in range(lo, min(lo + half, len(crops)))
        ]
        storage.write_bytes_atomic(storage.join(str(root), shards.shard_name(s)), shards.write_tar(rows))
        entries.append({"name": shards.shard_name(s), "count": len(rows)})
    manifest = {
        "format": shards.FORMAT,
        "encoder": enc.describe(),
        "feature_dtype": "float16",
        "image": {"size": SIZE, "format": "png"},
        "labels": {"classes": [f"c{c}" for c in range(CLASSES)]},
        "shards": entries,
    }
    storage.write_json_atomic(storage.join(str(root), shards.MANIFEST), manifest)
    bank_mod.build_bank(str(root), manifest)
    return manifest


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("world")
    enc = load_encoder("mobilenet_v2", weights="random", input_size=32, device="cpu")
    train_crops, train_labels = _crops(4, seed=0)
    test_crops, test_labels = _crops(2, seed=1)
    _feature_set(tmp / "train", train_crops, train_labels, enc)
    _feature_set(tmp / "test", test_crops, test_labels, enc)
    ucfg = UNetConfig(
        image_size=SIZE, num_channels=32, num_res_blocks=1, attention_resolutions=(), num_heads=1,
        channel_mult=(1, 2), feature_dim=enc.feature_dim,
    )  # fmt: skip
    torch.manual_seed(0)
    sd = UNet(ucfg).state_dict()
    config = {"model": to_dict(ucfg), "diffusion": to_dict(DiffusionConfig())}
    save_checkpoint(str(tmp / "run"), {"step": 7, "model": sd, "ema": {"0.9999": sd}, "config": config,
                                       "encoder": enc.describe()})  # fmt: skip
    return {"root": tmp, "enc": enc, "train_labels": train_labels}


def _held(feats: torch.Tensor, labels: torch.Tensor) -> ev.HeldOut:
    return ev.HeldOut(
        [str(i) for i in range(len(feats))], np.zeros((len(feats), 4, 4, 3), np.uint8), feats, labels
    )


def test_compute_metrics_perfect_and_ignoring_generators():
    g = torch.Generator().manual_seed(0)
    centres = 3 * torch.randn(CLASSES, 16, generator=g)
    train_y = torch.arange(CLASSES).repeat(20)
    train = centres[train_y] + 2 * torch.randn(len(train_y), 16, generator=g)
    pool_y = torch.arange(CLASSES).repeat(10)  # a pool of 100, the first 50 are conditioning items
    pool = centres[pool_y] + 2 * torch.randn(len(pool_y), 16, generator=g)
    held = _held(pool, pool_y)

    def predict(q):
        return metrics.knn_classify(train, train_y, q, k=5)

    n = 50
    perfect = pool[:n, None].repeat(1, 3, 1)  # every sample's feature = its conditioning feature
    r = ev.compute_metrics(predict, perfect, held, pool, n, "cosine", CLASSES, seed=0)
    assert r["class_agreement"] == r["knn_ceiling"] == r["knn_ceiling_crops"]
    assert r["retrieval_top1"] == 1.0 and r["mean_rank"] == 1.0 and r["retrieval_pool"] == 100
    # the derangement scores the samples of item pi(i) against item i: the sample's own item (another
    # pool row, identical to the sample) always outranks item i -> rank >= 2, top-1 exactly 0
    assert r["shuffled_retrieval_top1"] == 0.0
    assert r["shuffled_class_agreement"] < r["class_agreement"]

    # a generator that ignores its conditioning: every sample is the same class-0 feature
    ignoring = pool[0].expand(n, 3, 16).clone()
    r0 = ev.compute_metrics(predict, ignoring, held, pool, n, "cosine", CLASSES, seed=0)
    # all predictions are one class and 5 of the 50 items have each label: agreement = chance = 0.1
    assert r0["class_agreement"] == pytest.approx(0.1) and r0["chance"] == pytest.approx(0.1)
    # precision / recall tell the two apart: every sample is a real point (precision 1 for both), but
    # the collapsed samples' balls have radius 0 and cover at most pool[0] (recall <= 1/100; whether the
    # point on the sphere's surface counts rests on rounding)
    assert r["feature_precision"] == 1.0 and r["feature_recall"] >= 0.5  # the 50 conditioning items at least
    assert r0["feature_precision"] == 1.0 and r0["feature_recall"] <= 0.01
    # too few samples for k=3 radii (2 items x 1 sample): reported absent, the rest still computed
    r2 = ev.compute_metrics(predict, perfect[:2, :1], held, pool, 2, "cosine", CLASSES, seed=0)
    assert r2["feature_precision"] == r2["feature_recall"] == "absent" and r2["retrieval_top1"] == 1.0


def test_inception_metrics_with_a_weights_file(tmp_path):
    # a file in the layout of torchvision's inception_v3_google-0cc3c7bd.pth (random values)
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    net = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=True)
    torch.save(net.state_dict(), tmp_path / "inception.pth")
    g = torch.Generator().manual_seed(1)
    a = torch.randint(0, 256, (6, 3, 16, 16), generator=g, dtype=torch.uint8)
    b = torch.randint(0, 256, (6, 3, 16, 16), generator=g, dtype=torch.uint8)
    same = ev.inception_metrics(a, a, str(tmp_path / "inception.pth"), "cpu")
    assert same["inception_fid"] == pytest.approx(0.0, abs=1e-3)
    assert same["inception_precision"] == same["inception_recall"] == 1.0
    assert same["inception_score"] >= 1.0 - 1e-9
    other = ev.inception_metrics(a, b, str(tmp_path / "inception.pth"), "cpu")
    assert other["inception_fid"] > same["inception_fid"]


def test_derangement_has_no_fixed_point():
    for seed in range(5):
        pi = ev.derangement(7, seed)
        assert sorted(pi.tolist()) == list(range(7)) and not (pi == torch.arange(7)).any()


def test_select_pool_is_seeded_and_spread():
    a, b = ev.select_pool(1000, 200, seed=0), ev.select_pool(1000, 200, seed=0)
    assert np.array_equal(a, b) and len(set(a.tolist())) == 200
    assert np.bincount(a // 100, minlength=10).min() > 5  # class-sorted input: every block of 100 sampled
    with pytest.raises(ValueError, match="larger than"):
        ev.select_pool(10, 20, 0)


def test_cli_end_to_end(world, tmp_path):
    root = world["root"]
    out = tmp_path / "eval"
    cmd = [
        sys.executable, "-m", "stages.evaluate", "--set", f"checkpoint={root / 'run'}",
        f"heldout={root / 'test'}", f"bank={root / 'train' / 'bank.h5'}", f"out={out}", "n_items=6",
        "samples_per_item=2", "retrieval_pool=12", "steps=2", "batch_size=8", "grid_items=3", "device=cpu",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    for key in ("class_agreement", "knn_ceiling", "chance", "retrieval_top1", "shuffled_class_agreement",
                "shuffled_retrieval_top1", "knn_ceiling_crops"):  # fmt: skip
        assert 0.0 <= m[key] <= 1.0, key
    assert m["retrieval_pool"] == 12 and m["n_samples"] == 12 and m["step"] == 7
    assert 1.0 <= m["median_rank"] <= 12 and 1.0 <= m["mean_rank"] <= 12 and m["frechet_distance"] >= 0
    assert m["inception_fid"] == "absent" and m["encoder"] == "mobilenet_v2/trunk"
    assert 0.0 <= m["feature_precision"] <= 1.0 and 0.0 <= m["feature_recall"] <= 1.0
    assert m["inception_precision"] == m["inception_recall"] == "absent"

    # the ceiling is the k-NN accuracy of the stored features of the chosen items: recompute it here
    enc = world["enc"]
    pool = ev.select_pool(20, 12, seed=0)[:6]
    manifest = shards.read_manifest(str(root / "test"))
    held = ev.load_heldout(str(root / "test"), manifest, pool)
    with bank_mod.FeatureBank(str(root / "train" / "bank.h5")) as b:
        train = torch.from_numpy(b.get(np.arange(len(b))))
        pred = metrics.knn_classify(train, torch.from_numpy(b.labels), held.feats, k=10, num_classes=CLASSES)
    assert m["knn_ceiling"] == metrics.agreement(pred, held.labels)
    assert held.labels.tolist() == [int(p) // 2 for p in pool]  # items are class-sorted, 2 per class
    assert enc.feature_dim == 1280

    grid = np.asarray(Image.open(out / "samples.png"))
    assert grid.shape == (3 * (SIZE + 2) + 2, 3 * (SIZE + 2) + 2, 3)  # 3 rows of (real + 2 samples)
    np.testing.assert_array_equal(grid[2 : 2 + SIZE, 2 : 2 + SIZE], held.crops[0])  # row 0 starts real
    arr = np.load(out / f"samples_12x{SIZE}x{SIZE}x3.npz")["arr_0"]
    assert arr.shape == (12, SIZE, SIZE, 3) and arr.dtype == np.uint8
    np.testing.assert_array_equal(grid[2 : 2 + SIZE, 4 + SIZE : 4 + 2 * SIZE], arr[0])
    report = (out / "report.md").read_text()
    assert "samples.png" in report and "absent" in report


def test_mismatched_bank_is_refused(world, tmp_path):
    root = world["root"]
    other = load_encoder("mobilenet_v2", weights="random", input_size=32, device="cpu")
    manifest = shards.read_manifest(str(root / "test"))
    with bank_mod.FeatureBank(str(root / "train" / "bank.h5")) as b:
        b.encoder = {**b.encoder, "name": "dino", "feature_dim": 256}
        cfg = ev.EvaluateConfig(checkpoint="x", heldout=str(root / "test"), bank="the-bank")
        with pytest.raises(ValueError, match="bank the-bank holds dino 256-d"):
            ev.check_consistency(other, b, manifest, SIZE, cfg)
    with pytest.raises(shards.ManifestError, match="32px"):
        ev.check_consistency(other, bank_mod.FeatureBank(str(root / "train" / "bank.h5")), manifest, 32, cfg)


def test_config_rejects_items_beyond_pool():
    with pytest.raises(ValueError, match="must not exceed retrieval_pool"):
        ev.EvaluateConfig(n_items=10, retrieval_pool=5)
    with pytest.raises(ValueError, match="n_items must be at least 2"):
        ev.EvaluateConfig(n_items=1)


def test_uint8_encoding_matches_preprocess(world):
    enc = world["enc"]
    crops, _ = _crops(1, seed=5)
    direct = enc.encode(torch.stack([enc.preprocess(Image.fromarray(c)) for c in crops]))
    chw = torch.from_numpy(crops).permute(0, 3, 1, 2)
    # batch composition changes float summation order: equal up to ~1e-4
    torch.testing.assert_close(ev.encode_uint8(enc, chw, chunk=3), direct, rtol=1e-2, atol=1e-3)
    assert images.to_hwc(chw).shape == crops.shape


def test_bf16_sampling_autocasts_only_with_native_bf16(monkeypatch):
    """precision=bf16 runs the UNet under bf16 autocast where the device has native bf16, else fp32."""
    from rcdm.diffusion import build_diffusion

    ucfg = UNetConfig(
        image_size=16, num_channels=32, num_res_blocks=1, attention_resolutions=(), num_heads=1,
        channel_mult=(1, 2), feature_dim=4,
    )  # fmt: skip
    torch.manual_seed(0)
    model = UNet(ucfg).eval()
    seen = []
    model.register_forward_hook(lambda m, i, o: seen.append(torch.is_autocast_enabled("cpu")))
    diffusion = build_diffusion(DiffusionConfig())
    feats = torch.randn(2, 4)
    cfg = ev.EvaluateConfig(
        checkpoint="x", heldout="x", bank="x", samples_per_item=1, steps=2, precision="bf16"
    )
    for native in (True, False):
        monkeypatch.setattr(ev, "native_bf16", lambda device, native=native: native)
        seen.clear()
        out = ev.draw_samples(model, diffusion, feats, 16, cfg, "cpu")
        assert out.shape == (2, 1, 3, 16, 16) and out.dtype == torch.uint8
        assert seen and all(s is native for s in seen)


def test_a_grey_models_samples_reach_the_encoder_as_rgb():
    from rcdm.diffusion import build_diffusion

    ucfg = UNetConfig(
        image_size=16, in_channels=1, num_channels=32, num_res_blocks=1, attention_resolutions=(),
        num_heads=1, channel_mult=(1, 2), feature_dim=4,
    )  # fmt: skip
    torch.manual_seed(0)
    cfg = ev.EvaluateConfig(checkpoint="x", heldout="x", bank="x", samples_per_item=2, steps=2)
    out = ev.draw_samples(
        UNet(ucfg).eval(), build_diffusion(DiffusionConfig()), torch.randn(2, 4), 16, cfg, "cpu"
    )
    assert out.shape == (2, 2, 3, 16, 16)
    assert (out[:, :, 0] == out[:, :, 1]).all() and (out[:, :, 1] == out[:, :, 2]).all()
    assert out.float().std() > 0
