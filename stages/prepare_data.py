"""Prepare the embedded default dataset: FashionMNIST as an ImageNet-style folder tree of PNGs.

    python -m stages.prepare_data fashion-mnist --out data/fashion-mnist-32 --train 10000 --test 1000

Writes::

    OUT/train/<class>/<index:05d>.png     SxS grayscale PNGs (``--size``, default 32; 0 keeps the
                                          native 28x28), <index> = position in the source file
    OUT/test/<class>/<index:05d>.png
    OUT/prepared.json                     the done-marker: what was written, from which files

Class folders are ``0_tshirt_top`` ... ``9_ankle_boot``: sorted folder order = FashionMNIST label.

Source, in this order: the idx files of Debian's ``dataset-fashion-mnist`` package
(``/usr/share/datasets/fashion-mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz``, or ``--source
DIR``), else torchvision's FashionMNIST downloader (needs network) into ``--download-dir``.

Subset (deterministic, class balanced): the first ``N / 10`` images of every class in file order, so
``--train 10000`` takes, for each label, the 1000 lowest indices of ``train-*`` with that label.

The images are resized once (bicubic, as the ADM crop resizes) to the training resolution S. Stage
one's image crop of an SxS input at ``image_size`` S is then the image itself, and its encoder crop is
resized from those same pixels, exactly the path a generated SxS sample takes to the encoder: real and
generated images are compared through one function.

The tree is written into ``OUT.partial-<pid>`` and renamed to ``OUT`` when complete, so ``OUT`` is
either absent or whole; a second run with the same arguments finds the marker and does nothing.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

DEFAULT_SOURCE = "/usr/share/datasets/fashion-mnist"
MARKER = "prepared.json"
FASHION_MNIST_CLASSES = (
    "0_tshirt_top",
    "1_trouser",
    "2_pullover",
    "3_dress",
    "4_coat",
    "5_sandal",
    "6_shirt",
    "7_sneaker",
    "8_bag",
    "9_ankle_boot",
)
SPLIT_FILES = {  # our split name -> prefix of the idx files
    "train": "train",
    "test": "t10k",
}
# idx type codes (http://yann.lecun.com/exdb/mnist/, "THE IDX FILE FORMAT"): only unsigned bytes here
_IDX_UBYTE = 0x08


class DataError(RuntimeError):
    """The source dataset is missing, malformed, or too small for the requested subset."""


# --- idx files ------------------------------------------------------------------------------------


def read_idx(path: str | Path) -> np.ndarray:
    """An idx file (gzip or plain) as a uint8 array of the shape in its header.

    Format: 2 zero bytes, a type byte (0x08 = unsigned byte), the number of dimensions, then each
    dimension as a big-endian uint32, then the data in C order.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DataError(f"{path} is not an idx file (bad magic {data[:4].hex()})")
    if data[2] != _IDX_UBYTE:
        raise DataError(f"{path}: idx type 0x{data[2]:02x} is not supported (only 0x08, unsigned bytes)")
    ndim = data[3]
    header = 4 + 4 * ndim
    shape = tuple(int(d) for d in np.frombuffer(data[4:header], dtype=">u4"))
    count = int(np.prod(shape))
    if len(data) - header != count:
        raise DataError(
            f"{path}: header says shape {shape} ({count} bytes) but the file holds {len(data) - header}; "
            "the file is truncated or corrupt (re-install it)"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def idx_paths(source: Path, split: str) -> tuple[Path, Path]:
    prefix = SPLIT_FILES[split]
    return source / f"{prefix}-images-idx3-ubyte.gz", source / f"{prefix}-labels-idx1-ubyte.gz"


def has_idx_files(source: Path) -> bool:
    return all(p.is_file() for split in SPLIT_FILES for p in idx_paths(source, split))


def load_split(source: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 28, 28) uint8, labels (N,) uint8) of one split."""
    img_path, lbl_path = idx_paths(source, split)
    images, labels = read_idx(img_path), read_idx(lbl_path)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(
            f"{img_path} {images.shape} and {lbl_path} {labels.shape} do not form an (N, H, W) / (N,) pair"
        )
    if labels.size and int(labels.max()) >= len(FASHION_MNIST_CLASSES):
        raise DataError(f"{lbl_path} holds label {int(labels.max())}; FashionMNIST has 10 classes (0-9)")
    return images, labels


def download_torchvision(download_dir: Path) -> Path:
    """Fetch FashionMNIST with torchvision (network needed); returns the folder of its idx .gz files."""
    from torchvision.datasets import FashionMNIST

    for train in (True, False):
        FashionMNIST(str(download_dir), train=train, download=True)
    return download_dir / "FashionMNIST" / "raw"


def find_source(source: Path, download_dir: Path, allow_download: bool = True) -> Path:
    """The folder holding the four idx files: ``source``, a previous download, or a fresh download."""
    if has_idx_files(source):
        return source
    raw = download_dir / "FashionMNIST" / "raw"
    if has_idx_files(raw):
        return raw
    reason = "downloads are disabled (--no-download)"
    if allow_download:
        try:
            raw = download_torchvision(download_dir)
            if has_idx_files(raw):
                return raw
            reason = f"torchvision's download left no idx files in {raw}"
        except Exception as e:  # noqa: BLE001 - any failure here means "no network"; reported below
            reason = f"torchvision's downloader failed ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
    raise DataError(
        f"FashionMNIST idx files are not in {source} and {reason}. Install Debian's package "
        "(`apt-get install dataset-fashion-mnist`, which puts them in /usr/share/datasets/fashion-mnist) "
        "or pass --source DIR holding {train,t10k}-{images-idx3,labels-idx1}-ubyte.gz"
    )


# --- the subset and the tree ----------------------------------------------------------------------


def balanced_subset(labels: np.ndarray, total: int, num_classes: int = 10) -> np.ndarray:
    """Indices of the first ``total / num_classes`` items of every class, in increasing order."""
    if total % num_classes != 0:
        raise DataError(f"subset size {total} must be a multiple of {num_classes} (one share per class)")
    per_class = total // num_classes
    chosen = []
    for c in range(num_classes):
        idx = np.flatnonzero(labels == c)
        if len(idx) < per_class:
            raise DataError(
                f"class {c} has only {len(idx)} items, fewer than the {per_class} per class that a subset "
                f"of {total} needs; ask for at most {num_classes * len(idx)}"
            )
        chosen.append(idx[:per_class])
    return np.sort(np.concatenate(chosen))


def write_split(
    out: Path, images: np.ndarray, labels: np.ndarray, indices: np.ndarray, size: int = 0
) -> dict[str, int]:
    """PNG per chosen index under ``out/<class>/<index:05d>.png`` (resized to size x size unless size is
    0); returns per-class counts."""
    counts = {name: 0 for name in FASHION_MNIST_CLASSES}
    for name in FASHION_MNIST_CLASSES:
        (out / name).mkdir(parents=True, exist_ok=True)
    for i in indices:
        name = FASHION_MNIST_CLASSES[int(labels[i])]
        img = Image.fromarray(np.ascontiguousarray(images[i]))
        if size:
            img = img.resize((size, size), Image.BICUBIC)
        img.save(out / name / f"{int(i):05d}.png", compress_level=6)
        counts[name] += 1
    return counts


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def prepare_fashion_mnist(
    out: str | Path,
    train: int = 10000,
    test: int = 1000,
    source: str | Path = DEFAULT_SOURCE,
    download_dir: str | Path | None = None,
    allow_download: bool = True,
    size: int = 32,
) -> dict:
    """Write the FashionMNIST subset tree at ``out`` (see the module docstring); returns the marker.

    A no-op when ``out`` already holds a finished tree with the same request; an error when it holds
    a different one (remove it or choose another ``out``).
    """
    out = Path(out)
    if size < 0:
        raise DataError(f"size must be 0 (native 28x28) or a positive side length, got {size}")
    request = {"dataset": "fashion-mnist", "train": int(train), "test": int(test), "size": int(size) or 28}
    marker_path = out / MARKER
    if marker_path.is_file():
        marker = json.loads(marker_path.read_text())
        if {k: marker.get(k) for k in request} == request:
            return marker
        raise DataError(
            f"{out} already holds a prepared dataset made with "
            f"{ {k: marker.get(k) for k in request} }, not {request}: remove {out} or choose another --out"
        )
    if out.exists() and any(out.iterdir()):
        raise DataError(f"{out} exists, is not empty and has no {MARKER}: remove it or choose another --out")
    download_dir = Path(download_dir) if download_dir is not None else out.parent / ".downloads"
    src = find_source(Path(source), download_dir, allow_download)

    tmp = out.parent / f"{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        marker = dict(request)
        marker.update(
            classes=list(FASHION_MNIST_CLASSES),
            subset="first N/10 items of each class in file order",
            source=str(src),
            files={},
            counts={},
        )
        for split, total in (("train", train), ("test", test)):
            images, labels = load_split(src, split)
            indices = balanced_subset(labels, total)
            marker["counts"][split] = write_split(tmp / split, images, labels, indices, size)
            for p in idx_paths(src, split):
                marker["files"][p.name] = _sha256(p)
        marker["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return marker


DATASETS = {"fashion-mnist": prepare_fashion_mnist}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m stages.prepare_data", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("dataset", choices=sorted(DATASETS))
    parser.add_argument("--out", required=True, help="output folder (local path)")
    parser.add_argument("--train", type=int, default=10000, help="train images, a multiple of 10")
    parser.add_argument("--test", type=int, default=1000, help="test images, a multiple of 10")
    parser.add_argument("--size", type=int, default=32, help="side of the written images; 0 = native 28")
    parser.add_argument("--source", default=os.environ.get("FASHION_DIR", DEFAULT_SOURCE), help="idx folder")
    parser.add_argument(
        "--download-dir", default=None, help="torchvision download folder (OUT/../.downloads)"
    )
    parser.add_argument("--no-download", action="store_true", help="never try the network")
    args = parser.parse_args(argv)
    out = Path(args.out)
    already = (out / MARKER).is_file()
    t0 = time.time()
    try:
        marker = DATASETS[args.dataset](
            out, args.train, args.test, args.source, args.download_dir, not args.no_download, args.size
        )
    except DataError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    if already:
        print(f"{out}: already prepared ({marker['train']} train, {marker['test']} test); nothing to do")
    else:
        print(
            f"{out}: wrote {marker['train']} train and {marker['test']} test images from {marker['source']} "
            f"in {time.time() - t0:.1f}s"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
