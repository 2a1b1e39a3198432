"""stages.sample / interpolate / manipulate end to end on a tiny checkpoint: files, pixels, seeds, errors."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

from rcdm import editing, images, shards, storage
from rcdm.api import sample_seeds
from rcdm.config import to_dict, to_yaml
from rcdm.samplers import sample_seed
from rcdm.unet import UNetConfig
from stages import interpolate, manipulate, sample
from tests.conftest import SIZE, TINY, tiny_unet, write_feature_set

REPO_ROOT = Path(__file__).resolve().parent.parent
FAST = ["sampler.steps=2", "progress=false", "device=cpu", "batch_size=4"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def world(tiny_world):
    world = tiny_world("stages", 3, steps=2, batch_size=4)
    rcdm, feats = world["rcdm"], str(world["tmp"] / "feats")
    cond = rcdm.prepare(world["paths"])
    write_feature_set(
        feats, cond.reals.permute(0, 2, 3, 1).numpy(), cond.features.numpy(), rcdm.encoder.describe()
    )
    return {**world, "feats": feats}


def crop(path: str) -> torch.Tensor:
    """The real ADM crop of an image at the model's size: uint8 (3, H, W)."""
    return torch.from_numpy(np.array(images.center_crop_arr(images.open_image(path), SIZE))).permute(2, 0, 1)


def read_outputs(out, n_samples: int):
    npz = np.load(out / f"samples_{n_samples}x{SIZE}x{SIZE}x3.npz")
    grid = images.decode_png((out / "grid.png").read_bytes())
    return npz, grid, json.loads((out / "samples.json").read_text())


def expected_grid(
    lead: torch.Tensor | None, samples: np.ndarray, tail: torch.Tensor | None = None
) -> np.ndarray:
    """lead/tail (R, 3, H, W) uint8 around samples (R, C, H, W, 3) uint8, as write_outputs lays them out."""
    body = torch.from_numpy(samples).permute(0, 1, 4, 2, 3)  # (R, C, 3, H, W)
    parts = (
        ([lead[:, None]] if lead is not None else []) + [body] + ([tail[:, None]] if tail is not None else [])
    )
    rows = torch.cat(parts, 1)
    return images.make_grid(rows.flatten(0, 1), nrow=rows.shape[1])


def fails(main, args, capsys) -> str:
    """Run a stage that must fail on bad input: exit code 2, one line on stderr, no traceback."""
    with pytest.raises(SystemExit) as exc:
        main(args)
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    return err


def test_sample_stage_writes_raw_pixels_grid_npz_and_sidecar(world, tmp_path):
    out = tmp_path / "out"
    args = [f"checkpoint={world['run']}", f"images={world['folder']}", f"out={out}", "n=2", "seed=4"]
    assert sample.main(["--set", *args, *FAST, "save_individual=true"]) == 0
    npz, grid, meta = read_outputs(out, 6)
    arr = npz["arr_0"]
    assert arr.shape == (6, SIZE, SIZE, 3) and arr.dtype == np.uint8
    assert npz["keys"].tolist() == [p for p in world["paths"] for _ in range(2)]
    assert npz["seeds"].tolist() == sample_seeds(4, 3, 2) == meta["seeds"]
    # the saved pixels are the samples, rounded, never rescaled
    x = world["rcdm"].sample(world["paths"], n=2, seed=4)  # (3, 2, 3, H, W), same batch size
    assert np.array_equal(arr, images.to_hwc(images.to_uint8(x.flatten(0, 1))))
    reals = torch.stack([crop(p) for p in world["paths"]])
    assert np.array_equal(grid, expected_grid(reals, arr.reshape(3, 2, SIZE, SIZE, 3)))
    assert np.array_equal(images.decode_png((out / "individual" / "001_000.png").read_bytes()), arr[2])
    assert meta["encoder"]["weights_id"] == "random" and meta["encoder"]["input_size"] == 32
    assert meta["checkpoint"]["source"].endswith("ckpt_0000007.pt") and meta["checkpoint"]["step"] == 7
    assert (meta["sampler"], meta["steps"], meta["eta"], meta["guidance"]) == ("ddim", 2, 0.0, 0.0)
    assert meta["time"]["seconds"] > 0 and meta["stage"] == "sample"


def test_stored_features_give_the_samples_of_their_images(world, tmp_path):
    common = [f"checkpoint={world['run']}", "n=1", "seed=2", *FAST]
    assert sample.main(["--set", *common, f"images={world['folder']}", f"out={tmp_path / 'img'}"]) == 0
    assert sample.main(["--set", *common, f"features={world['feats']}", f"out={tmp_path / 'feat'}"]) == 0
    from_images, grid_i, _ = read_outputs(tmp_path / "img", 3)
    from_feats, grid_f, meta = read_outputs(tmp_path / "feat", 3)
    # stored float32 features = the features of the same crops: same seeds, same samples, same grid
    assert np.array_equal(from_feats["arr_0"], from_images["arr_0"]) and np.array_equal(grid_f, grid_i)
    assert meta["items"] == ["item0", "item1", "item2"]
    out = tmp_path / "keys"
    assert (
        sample.main(["--set", *common, f"features={world['feats']}", "keys=[item2,item0]", f"out={out}"]) == 0
    )
    npz, grid, _ = read_outputs(out, 2)
    assert npz["keys"].tolist() == ["item2", "item0"]
    stored = {s.key: s.image for s in shards.read_shard(storage.join(world["feats"], shards.shard_name(0)))}
    lead = torch.stack([torch.from_numpy(np.array(stored[k])).permute(2, 0, 1) for k in ("item2", "item0")])
    assert np.array_equal(grid, expected_grid(lead, npz["arr_0"].reshape(2, 1, SIZE, SIZE, 3)))


def test_interpolate_stage_rows_share_x_t_and_show_both_ends(world, tmp_path):
    out = tmp_path / "out"
    a, b = world["paths"][0], world["paths"][1]
    args = [f"checkpoint={world['run']}", f"first={a}", f"second={b}", "steps_r=3", "n=2", "mode=slerp"]
    assert interpolate.main(["--set", *args, f"out={out}", "seed=1", *FAST]) == 0
    npz, grid, meta = read_outputs(out, 6)
    assert npz["keys"].tolist() == ["r=0", "r=0.5", "r=1"] * 2 and meta["ratios"] == [0.0, 0.5, 1.0]
    assert npz["seeds"].tolist() == [sample_seed(1, 0, 0)] * 3 + [sample_seed(1, 0, 1)] * 3
    lead, tail = crop(a)[None].expand(2, -1, -1, -1), crop(b)[None].expand(2, -1, -1, -1)
    assert np.array_equal(grid, expected_grid(lead, npz["arr_0"].reshape(2, 3, SIZE, SIZE, 3), tail))
    assert meta["mode"] == "slerp" and meta["first"] == a and meta["second"] == b


def test_manipulate_stage_from_a_folder_and_from_a_bank(world, tmp_path):
    rcdm = world["rcdm"]
    src, tgt = world["paths"][0], world["paths"][1]
    base = [f"checkpoint={world['run']}", f"source={src}", f"target={tgt}", "k=3", "common=1", "n=1", *FAST]
    assert manipulate.main(["--set", *base, f"neighbours={world['folder']}", f"out={tmp_path / 'f'}"]) == 0
    npz, grid, meta = read_outputs(tmp_path / "f", 3)
    # the rule by hand: the 3 nearest (cosine) of the source among the folder's features
    pool = rcdm.encode(world["paths"])
    _, idx = editing.knn_exact(pool[:1], pool, 3)
    expected = editing.common_dims(editing.l2_normalize(pool[idx[0]]), common=1).tolist()
    assert meta["common_dims"] == expected and 0 < len(expected) < 1280
    assert [n["key"] for n in meta["neighbours"]] == [world["paths"][i] for i in idx[0].tolist()]
    assert meta["neighbours"][0] == {"key": src, "similarity": pytest.approx(1.0, abs=1e-5)}
    assert npz["keys"].tolist() == list(editing.MANIPULATION_LABELS)
    assert npz["seeds"].tolist() == [sample_seed(0, 0, 0)] * 3
    lead = torch.stack([crop(src), crop(src), crop(tgt)])
    assert np.array_equal(grid, expected_grid(lead, npz["arr_0"].reshape(3, 1, SIZE, SIZE, 3)))
    bank_url = storage.join(world["feats"], shards.BANK)
    assert manipulate.main(["--set", *base, f"neighbours={bank_url}", f"out={tmp_path / 'b'}"]) == 0
    _, _, meta_b = read_outputs(tmp_path / "b", 3)
    assert meta_b["common_dims"] == expected
    assert [n["key"] for n in meta_b["neighbours"]] == [f"item{i}" for i in idx[0].tolist()]


def test_manipulate_stage_refuses_dense_features_with_the_nonzero_rule(world, tmp_path, capsys):
    dense = str(tmp_path / "dense")
    feats = np.random.default_rng(0).standard_normal((4, 1280)).astype(np.float32)
    crops = np.zeros((4, SIZE, SIZE, 3), np.uint8)
    write_feature_set(dense, crops, feats, world["rcdm"].encoder.describe())
    base = [f"checkpoint={world['run']}", f"source={world['paths'][0]}", f"target={world['paths'][1]}",
            f"neighbours={dense}/bank.h5", "k=4", "common=2", "n=1", *FAST]  # fmt: skip
    err = fails(manipulate.main, ["--set", *base, f"out={tmp_path / 'o'}"], capsys)
    assert "dense" in err and "rule=top_magnitude" in err
    assert manipulate.main(["--set", *base, "rule=top_magnitude", "top_m=8", f"out={tmp_path / 'o'}"]) == 0
    meta = json.loads((tmp_path / "o" / "samples.json").read_text())
    expected = editing.common_dims(torch.from_numpy(feats), 2, "top_magnitude", top_m=8).tolist()
    assert meta["common_dims"] == expected and meta["rule"] == "top_magnitude"


def test_bad_inputs_fail_with_one_line(world, tmp_path, capsys, monkeypatch):
    ok = [f"checkpoint={world['run']}", f"out={tmp_path / 'o'}", *FAST]
    err = fails(sample.main, ["--set", *ok, f"images={tmp_path / 'missing.png'}"], capsys)
    assert "missing.png does not exist" in err
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8 truncated")
    assert "cannot decode image" in fails(
        sample.main, ["--set", *ok, f"images={tmp_path / 'bad.jpg'}"], capsys
    )
    err = fails(sample.main, ["--set", *ok, f"images={world['folder']}", "encoder.name=dino"], capsys)
    assert "trained on mobilenet_v2 features, not dino" in err
    assert "give either images" in fails(sample.main, ["--set", *ok], capsys)
    err = fails(interpolate.main, ["--set", *ok, f"first={world['paths'][0]}"], capsys)
    assert "first=<image> second=<image>" in err
    # a released-layout state dict whose feature size is not the encoder's
    small = UNetConfig(**{**to_dict(TINY), "feature_dim": 6})
    torch.save(tiny_unet(small).state_dict(), tmp_path / "small.pt")
    (tmp_path / "small.yaml").write_text(to_yaml(small))
    args = [f"checkpoint={tmp_path / 'small.pt'}", f"model={tmp_path / 'small.yaml'}", "encoder.name=mobilenet_v2",
            f"images={world['folder']}", f"out={tmp_path / 'o'}", *FAST]  # fmt: skip
    assert "takes 6-d features but encoder mobilenet_v2/trunk gives 1280-d" in fails(
        sample.main, ["--set", *args], capsys
    )
    # released names: unknown, and known but absent from the cache with no network
    ok[0] = "checkpoint=dino-trunc"
    assert "nor a released model name" in fails(
        sample.main, ["--set", *ok, f"images={world['folder']}"], capsys
    )
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_cache"))

    def offline(*a, **k):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    ok[0] = "checkpoint=dino-trunk"
    err = fails(sample.main, ["--set", *ok, f"images={world['folder']}"], capsys)
    assert "not in the cache and could not be downloaded" in err and "rcdm_ema_dino_trunk.pt" in err


def test_cli_exit_code_and_message_in_a_subprocess(world, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "stages.sample", "--set", f"checkpoint={world['run']}",
           f"images={tmp_path / 'nope.png'}", f"out={tmp_path / 'o'}", "device=cpu"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == f"error: image {tmp_path / 'nope.png'} does not exist\n"
    assert not (tmp_path / "o").exists()


def test_sample_stage_reads_and_writes_object_storage(world, s3_bucket):
    for i, path in enumerate(world["paths"][:2]):
        storage.write_bytes_atomic(f"{s3_bucket}/in/img{i}.png", Path(path).read_bytes())
    out = f"{s3_bucket}/out"
    args = [f"checkpoint={world['run']}", f"images={s3_bucket}/in", f"out={out}", "n=1", *FAST]
    assert sample.main(["--set", *args]) == 0
    assert storage.listdir(out) == ["grid.png", "samples.json", f"samples_2x{SIZE}x{SIZE}x3.npz"]
    npz = np.load(io.BytesIO(storage.read_bytes(f"{out}/samples_2x{SIZE}x{SIZE}x3.npz")))
    assert npz["keys"].tolist() == [f"{s3_bucket}/in/img0.png", f"{s3_bucket}/in/img1.png"]
    local = world["rcdm"].sample(world["paths"][:2], n=1, seed=0)  # the same pixels, read locally
    assert np.array_equal(npz["arr_0"], images.to_hwc(images.to_uint8(local.flatten(0, 1))))
