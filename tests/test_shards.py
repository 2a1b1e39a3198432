"""rcdm.shards and rcdm.storage: sample encoding round trips, manifests, atomic writes, S3."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
import webdataset as wds

from rcdm import shards, storage


def _sample(i: int, dim: int = 6, label: int | None = 3):
    rng = np.random.default_rng(i)
    image = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    feat = rng.standard_normal(dim).astype(np.float32)
    return image, feat, -feat


def test_key_is_stable_unique_and_dot_free():
    a, b = shards.make_key("train/n01/img.a.JPEG"), shards.make_key("train/n01/img_a_JPEG")
    assert a == shards.make_key("train/n01/img.a.JPEG") and a != b
    assert "." not in a and "/" not in a


def test_sample_round_trip_through_tar_and_webdataset(tmp_path):
    encoded = []
    for i in range(3):
        image, feat, flip = _sample(i)
        encoded.append(shards.encode_sample(f"k{i}", image, feat, flip, label=i, meta={"source": f"s{i}"}))
    data = shards.write_tar(encoded)
    assert data == shards.write_tar(encoded)  # deterministic bytes
    path = tmp_path / "000000.tar"
    path.write_bytes(data)
    ours = [shards.decode_sample(r) for r in shards.iter_tar(data)]
    theirs = [shards.decode_sample(r) for r in wds.WebDataset(str(path), shardshuffle=False)]
    for i, (a, b) in enumerate(zip(ours, theirs)):
        image, feat, flip = _sample(i)
        assert a.key == b.key == f"k{i}" and a.label == b.label == i
        assert np.array_equal(a.image, image) and np.array_equal(b.image, image)
        # stored as float16: equal to the float16 rounding of the input
        assert np.array_equal(a.feature, feat.astype(np.float16).astype(np.float32))
        assert np.array_equal(b.feature_flip, flip.astype(np.float16).astype(np.float32))
        assert a.meta == {"source": f"s{i}"}


def test_float32_storage_is_exact():
    image, feat, flip = _sample(0)
    raw = shards.encode_sample("k", image, feat, flip, dtype="float32")
    assert np.array_equal(shards.decode_sample(raw).feature, feat)


def test_sample_without_label():
    image, feat, flip = _sample(0)
    assert shards.decode_sample(shards.encode_sample("k", image, feat, flip)).label is None


def test_bad_samples_are_refused():
    image, feat, flip = _sample(0)
    with pytest.raises(ValueError, match="must not contain dots"):
        shards.encode_sample("a.b", image, feat, flip)
    with pytest.raises(ValueError, match="uint8"):
        shards.encode_sample("k", image.astype(np.float32), feat, flip)
    with pytest.raises(shards.ManifestError, match="not an RCDM feature shard"):
        shards.decode_sample({"__key__": "k", "jpg": b""})


def _manifest(**enc):
    base = {"name": "dino", "head": False, "feature_dim": 2048}
    base.update(enc)
    return {
        "format": shards.FORMAT,
        "encoder": base,
        "image": {"size": 128},
        "shards": [{"name": "shards/000000.tar"}],
    }


def test_check_manifest_names_what_differs():
    m = _manifest()
    shards.check_manifest(m, feature_dim=2048, image_size=128, encoder="dino", head=False)
    with pytest.raises(shards.ManifestError, match=r"dino/trunk and hold 2048-d features \(expected 256-d\)"):
        shards.check_manifest(
            m, feature_dim=256, root="shards at X", fix_hint="pass --set model.feature_dim=2048"
        )
    with pytest.raises(shards.ManifestError, match=r"128px images \(expected 32px\)"):
        shards.check_manifest(m, image_size=32)


def test_missing_manifest_is_a_clear_error(tmp_path):
    with pytest.raises(shards.ManifestError, match="stage one has not finished"):
        shards.read_manifest(str(tmp_path))
    storage.write_json_atomic(str(tmp_path / "manifest.json"), _manifest())
    m = shards.read_manifest(str(tmp_path))
    assert shards.shard_urls(str(tmp_path), m) == [f"{tmp_path}/shards/000000.tar"]


def test_atomic_write_leaves_no_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "sub" / "f.bin"
    storage.write_bytes_atomic(str(target), b"old")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError, match="disk full"):
        storage.write_bytes_atomic(str(target), b"new contents")
    assert target.read_bytes() == b"old"
    assert os.listdir(target.parent) == ["f.bin"]  # the temp file was removed


def test_atomic_local_path_renames_on_exit_and_removes_the_temp_on_error(tmp_path):
    target = tmp_path / "sub" / "bank.h5"
    with storage.atomic_local_path(str(target)) as tmp:
        assert os.path.dirname(tmp) == str(target.parent)  # same folder: the rename is atomic
        assert storage.is_temp_name(os.path.basename(tmp))
        with open(tmp, "wb") as f:
            f.write(b"v1")
        assert not target.exists()  # nothing visible until the block ends
    assert target.read_bytes() == b"v1" and os.listdir(target.parent) == ["bank.h5"]
    with pytest.raises(RuntimeError, match="writer failed"):
        with storage.atomic_local_path(f"file://{target}") as tmp:
            with open(tmp, "wb") as f:
                f.write(b"partial")
            raise RuntimeError("writer failed")
    assert target.read_bytes() == b"v1" and os.listdir(target.parent) == ["bank.h5"]


def test_atomic_local_path_uploads_one_whole_object(s3_bucket):
    url = storage.join(s3_bucket, "run", "ckpt.pt")
    with storage.atomic_local_path(url) as tmp:
        with open(tmp, "wb") as f:
            f.write(b"weights")
        assert not storage.exists(url)
    assert storage.read_bytes(url) == b"weights" and not os.path.exists(tmp)
    with pytest.raises(RuntimeError, match="writer failed"):
        with storage.atomic_local_path(storage.join(s3_bucket, "run", "other.pt")) as tmp:
            with open(tmp, "wb") as f:
                f.write(b"partial")
            raise RuntimeError("writer failed")
    assert not os.path.exists(tmp)
    assert storage.listdir(storage.join(s3_bucket, "run")) == ["ckpt.pt"]


def test_npy_bytes_round_trip():
    arr = np.arange(6, dtype=np.float16).reshape(2, 3)
    back = np.load(io.BytesIO(shards.npy_bytes(arr)), allow_pickle=False)
    assert back.dtype == np.float16 and np.array_equal(back, arr)


def test_retry_retries_transient_remote_errors_only():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("connection reset")
        return "ok"

    assert storage.retry(flaky, "s3://b/k", base_delay=0) == "ok" and len(calls) == 3
    with pytest.raises(FileNotFoundError):
        storage.retry(lambda: (_ for _ in ()).throw(FileNotFoundError("x")), "s3://b/k", base_delay=0)


def test_s3_round_trip_and_webdataset(s3_bucket):
    image, feat, flip = _sample(5)
    data = shards.write_tar([shards.encode_sample("k5", image, feat, flip, label=1)])
    url = storage.join(s3_bucket, "feats", "shards", "000000.tar")
    storage.write_bytes_atomic(url, data)
    storage.write_json_atomic(storage.join(s3_bucket, "feats", "manifest.json"), _manifest())
    assert storage.listdir(storage.join(s3_bucket, "feats")) == ["manifest.json", "shards"]
    got = list(shards.read_shard(url))
    assert got[0].key == "k5" and np.array_equal(got[0].image, image)
    storage.register_webdataset_fsspec()
    via_wds = [shards.decode_sample(r) for r in wds.WebDataset(url, shardshuffle=False)]
    assert via_wds[0].label == 1
    assert io.BytesIO(storage.read_bytes(url)).getvalue() == data
