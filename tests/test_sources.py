"""rcdm.sources: the four input layouts, sorted deterministic listings, labels, ranged reads."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
from PIL import Image

from rcdm import images, sources, storage


def _png(value: int, size: tuple[int, int] = (6, 5)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((size[1], size[0], 3), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _write(root, rel: str, data: bytes) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def test_class_tree_is_sorted_and_labelled_by_folder_index(tmp_path):
    # written out of order, with a non-image file, a hidden file and an empty class folder
    for rel, v in [("b_dog/2.png", 1), ("a_cat/x/9.JPEG", 2), ("b_dog/10.png", 3), ("a_cat/1.png", 4)]:
        _write(tmp_path, rel, _png(v))
    _write(tmp_path, "a_cat/notes.txt", b"hello")
    _write(tmp_path, "b_dog/.hidden.png", _png(0))
    (tmp_path / "c_emu").mkdir()
    src = sources.list_source(str(tmp_path))
    assert src.kind == "tree" and src.classes == ["a_cat", "b_dog", "c_emu"] and src.num_classes == 3
    assert [i.source for i in src] == ["a_cat/1.png", "a_cat/x/9.JPEG", "b_dog/10.png", "b_dog/2.png"]
    assert [i.label for i in src] == [0, 0, 1, 1]
    assert src.ignored == 2
    assert sources.read_input(src[3]) == (tmp_path / "b_dog/2.png").read_bytes()
    assert src.digest(0, 2) == sources.list_source(str(tmp_path)).digest(0, 2) != src.digest(1, 3)
    unlabelled = sources.list_source(str(tmp_path), labels=False)
    assert not unlabelled.has_labels and [i.label for i in unlabelled] == [None] * 4


def test_plain_folder_has_no_labels(tmp_path):
    for rel in ("z.png", "a.png", "sub/m.jpg"):
        _write(tmp_path, rel, _png(1))
    src = sources.list_source(f"file://{tmp_path}")
    assert src.kind == "folder" and not src.has_labels
    assert [i.source for i in src] == ["a.png", "sub/m.jpg", "z.png"]


def test_list_file_with_int_labels_names_and_header(tmp_path):
    for name in ("a.png", "b.png", "c.png"):
        _write(tmp_path / "img", name, _png(2))
    abs_c = str(tmp_path / "img" / "c.png")
    (tmp_path / "list.csv").write_text(f"path,label\n# comment\nimg/b.png,7\n\nimg/a.png, 3\n{abs_c},0\n")
    src = sources.list_source(str(tmp_path / "list.csv"))
    assert src.kind == "list" and [i.source for i in src] == [abs_c, "img/a.png", "img/b.png"]
    assert [i.label for i in src] == [0, 3, 7] and src.classes is None and src.num_classes == 8
    assert sources.read_input(src[1]) == (tmp_path / "img" / "a.png").read_bytes()
    (tmp_path / "named.txt").write_text("img/a.png,dog\nimg/b.png,cat\nimg/c.png\n")
    named = sources.list_source(str(tmp_path / "named.txt"))
    assert named.classes == ["cat", "dog"] and [i.label for i in named] == [1, 0, None]


def test_list_file_errors(tmp_path):
    (tmp_path / "dup.txt").write_text("a.png\na.png\n")
    with pytest.raises(sources.SourceError, match="more than once"):
        sources.list_source(str(tmp_path / "dup.txt"))
    (tmp_path / "wide.csv").write_text("a.png,1,2\n")
    with pytest.raises(sources.SourceError, match="wide.csv:1: expected 'path' or 'path,label'"):
        sources.list_source(str(tmp_path / "wide.csv"))


def _tar(path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_webdataset_tars_img2dataset_layout(tmp_path):
    _tar(
        tmp_path / "00001.tar",
        [("000010000.jpg", _png(5)), ("000010000.txt", b"a cap"), ("000010000.cls", b"4")],
    )
    _tar(
        tmp_path / "00000.tar",
        [
            ("000000001.jpg", _png(7)),
            ("000000001.json", b"{}"),
            ("000000001.cls", b"2"),
            ("000000002.txt", b"failed download: no image"),
            ("000000003.png", _png(9, (3, 4))),
        ],
    )
    src = sources.list_source(str(tmp_path))
    assert src.kind == "tars"
    assert [i.source for i in src] == [
        "00000.tar/000000001.jpg",
        "00000.tar/000000003.png",
        "00001.tar/000010000.jpg",
    ]
    assert [i.label for i in src] == [2, None, 4]
    # one ranged read returns exactly the member's bytes
    assert sources.read_input(src[0]) == _png(7) and sources.read_input(src[2]) == _png(5)
    assert images.open_image(sources.read_input(src[1])).size == (3, 4)
    single = sources.list_source(str(tmp_path / "00001.tar"))
    assert [i.source for i in single] == ["00001.tar/000010000.jpg"]


def test_missing_and_empty_inputs_are_clear_errors(tmp_path):
    with pytest.raises(sources.SourceError, match="does not exist"):
        sources.list_source(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(sources.SourceError, match="no images found"):
        sources.list_source(str(tmp_path / "empty"))
    (tmp_path / "x.bin").write_bytes(b"1")
    with pytest.raises(sources.SourceError, match="neither a list"):
        sources.list_source(str(tmp_path / "x.bin"))


def test_tree_on_s3(s3_bucket):
    for rel, v in [("n02/b.JPEG", 1), ("n01/a.JPEG", 2), ("n01/c.JPEG", 3)]:
        storage.write_bytes_atomic(f"{s3_bucket}/train/{rel}", _png(v))
    src = sources.list_source(f"{s3_bucket}/train")
    assert src.kind == "tree" and src.classes == ["n01", "n02"]
    assert [(i.source, i.label) for i in src] == [("n01/a.JPEG", 0), ("n01/c.JPEG", 0), ("n02/b.JPEG", 1)]
    assert src[2].url == f"{s3_bucket}/train/n02/b.JPEG" and sources.read_input(src[2]) == _png(1)
