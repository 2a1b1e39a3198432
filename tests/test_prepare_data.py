"""stages.prepare_data on a tiny synthetic FashionMNIST (idx files written here, never downloaded)."""

from __future__ import annotations

import gzip
import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stages import prepare_data as pd
from tests.conftest import REPO

# per split: 3 items of each class, labels in a shuffled but fixed order
N_PER_CLASS = 3


def _write_idx(path: Path, arr: np.ndarray) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def make_source(folder: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Idx files where image i is filled with the value i % 256 (so a PNG tells which index it is)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    data = {}
    for split, prefix in pd.SPLIT_FILES.items():
        labels = rng.permutation(np.repeat(np.arange(10), N_PER_CLASS)).astype(np.uint8)
        images = (
            np.zeros((len(labels), 28, 28), np.uint8) + np.arange(len(labels), dtype=np.uint8)[:, None, None]
        )
        _write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images)
        _write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels)
        data[split] = (images, labels)
    return data


def test_read_idx_round_trip(tmp_path):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / "x.gz", arr)
    np.testing.assert_array_equal(pd.read_idx(tmp_path / "x.gz"), arr)


def test_read_idx_rejects_truncated(tmp_path):
    header = struct.pack(">BBBB", 0, 0, 0x08, 1) + struct.pack(">I", 10)
    with gzip.open(tmp_path / "bad.gz", "wb") as f:
        f.write(header + b"\x00" * 7)  # 7 of the 10 bytes the header announces
    with pytest.raises(pd.DataError, match="truncated"):
        pd.read_idx(tmp_path / "bad.gz")


def test_balanced_subset_takes_first_per_class():
    labels = np.array([1, 0, 1, 0, 0, 1])
    # first 2 of class 0: indices 1, 3; first 2 of class 1: indices 0, 2
    np.testing.assert_array_equal(pd.balanced_subset(labels, 4, num_classes=2), [0, 1, 2, 3])
    with pytest.raises(pd.DataError, match="fewer"):
        pd.balanced_subset(labels, 8, num_classes=2)
    with pytest.raises(pd.DataError, match="multiple"):
        pd.balanced_subset(labels, 3, num_classes=2)


def test_prepare_writes_balanced_tree_and_is_idempotent(tmp_path):
    source = make_source(tmp_path / "src")
    out = tmp_path / "fm"
    marker = pd.prepare_fashion_mnist(
        out, train=20, test=10, source=tmp_path / "src", allow_download=False, size=0
    )
    assert marker["size"] == 28
    assert sorted(p.name for p in (out / "train").iterdir()) == list(pd.FASHION_MNIST_CLASSES)
    for split, per_class in (("train", 2), ("test", 1)):
        images, labels = source[split]
        for c, name in enumerate(pd.FASHION_MNIST_CLASSES):
            files = sorted((out / split / name).iterdir())
            expected = np.flatnonzero(labels == c)[:per_class]  # first items of class c in file order
            assert [int(f.stem) for f in files] == list(expected)
            for f in files:
                img = Image.open(f)
                assert img.mode == "L" and img.size == (28, 28)
                np.testing.assert_array_equal(np.asarray(img), images[int(f.stem)])
        assert marker["counts"][split] == {name: per_class for name in pd.FASHION_MNIST_CLASSES}
    assert not list(tmp_path.glob("fm.partial-*"))

    mtime = (out / pd.MARKER).stat().st_mtime_ns
    again = pd.prepare_fashion_mnist(
        out, train=20, test=10, source=tmp_path / "nowhere", allow_download=False, size=0
    )
    assert again == marker and (out / pd.MARKER).stat().st_mtime_ns == mtime  # nothing re-read or re-written
    with pytest.raises(pd.DataError, match="already holds"):
        pd.prepare_fashion_mnist(out, train=10, test=10, source=tmp_path / "src", allow_download=False)
    with pytest.raises(pd.DataError, match="already holds"):  # same subset, another size
        pd.prepare_fashion_mnist(out, train=20, test=10, source=tmp_path / "src", allow_download=False)


def test_resized_images_are_what_the_adm_crop_makes_and_stage_one_keeps_them(tmp_path):
    """At size 32 each PNG is the ADM center crop of the 28x28 original; stage one's 32x32 crop of it
    is the image itself, so a stored crop and a generated sample reach the encoder by the same path."""
    from rcdm import images

    rng = np.random.default_rng(1)
    originals = rng.integers(0, 256, (4, 28, 28), dtype=np.uint8)
    pd.write_split(tmp_path / "s", originals, np.arange(4, dtype=np.uint8), np.arange(4), size=32)
    for i, name in enumerate(pd.FASHION_MNIST_CLASSES[:4]):
        img = Image.open(tmp_path / "s" / name / f"{i:05d}.png")
        assert img.mode == "L" and img.size == (32, 32)
        adm = images.center_crop_arr(Image.fromarray(originals[i]).convert("RGB"), 32)
        np.testing.assert_array_equal(np.asarray(img), adm[..., 0])
        np.testing.assert_array_equal(images.center_crop_arr(img.convert("RGB"), 32), adm)


def test_failure_leaves_no_output(tmp_path):
    make_source(tmp_path / "src")
    out = tmp_path / "fm"
    with pytest.raises(pd.DataError, match="fewer"):  # 3 per class exist, 4 asked for the test split
        pd.prepare_fashion_mnist(out, train=20, test=40, source=tmp_path / "src", allow_download=False)
    assert not out.exists() and not list(tmp_path.glob("fm.partial-*"))


def test_missing_source_says_how_to_install(tmp_path, monkeypatch):
    def offline(download_dir):
        raise OSError("network unreachable")

    monkeypatch.setattr(pd, "download_torchvision", offline)
    with pytest.raises(pd.DataError, match="apt-get install dataset-fashion-mnist") as e:
        pd.prepare_fashion_mnist(tmp_path / "fm", source=tmp_path / "none")
    assert "network unreachable" in str(e.value)


def test_previous_torchvision_download_is_used(tmp_path):
    make_source(tmp_path / "dl" / "FashionMNIST" / "raw")  # torchvision's layout
    marker = pd.prepare_fashion_mnist(
        tmp_path / "fm",
        train=10,
        test=10,
        source=tmp_path / "none",
        download_dir=tmp_path / "dl",
        allow_download=False,
    )
    assert marker["source"] == str(tmp_path / "dl" / "FashionMNIST" / "raw")


def test_cli(tmp_path):
    make_source(tmp_path / "src")
    cmd = [
        sys.executable,
        "-m",
        "stages.prepare_data",
        "fashion-mnist",
        "--out",
        str(tmp_path / "fm"),
        "--train",
        "10",
        "--test",
        "10",
        "--source",
        str(tmp_path / "src"),
        "--no-download",
    ]
    first = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert first.returncode == 0, first.stderr
    second = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert second.returncode == 0 and "nothing to do" in second.stdout
    assert json.loads((tmp_path / "fm" / pd.MARKER).read_text())["train"] == 10
    bad = subprocess.run(
        cmd[:-3] + ["--source", str(tmp_path / "x"), "--no-download", "--out", str(tmp_path / "o")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "dataset-fashion-mnist" in bad.stderr
