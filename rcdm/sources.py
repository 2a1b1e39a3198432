"""Image collections as a deterministic, sorted list of inputs (stage one's work list).

``list_source(url)`` recognises four layouts, all through fsspec URLs (local paths, ``s3://``, ...):

* ``tree``: an ImageNet-style class tree ``URL/<class>/**/<image>``. The label of an image is the
  index of its class folder in the sorted list of the (non-hidden) sub-folders of ``URL``, as
  torchvision's ``ImageFolder`` numbers them, so a train and a val tree with the same classes agree.
* ``folder``: a folder with images at its top level (searched recursively), no labels.
* ``list``: a text/CSV file (``.txt``, ``.csv``, ``.lst``, ``.tsv``) with one path or URL per line
  and an optional second column ``,label``. Relative paths are relative to the list file's folder.
  Labels are integers, or class names (then numbered in sorted order of the names). A first line
  ``path,label`` (or ``url``/``file``/``filename``/``image`` as first column) is a header. Empty
  lines and lines starting with ``#`` are skipped.
* ``tars``: WebDataset tars of images (img2dataset's layout: ``KEY.jpg`` + ``KEY.txt``/``KEY.json``/
  ``KEY.cls``): a ``.tar`` file, or a folder holding only ``.tar`` files. One input per key that has
  an image member; its label is ``KEY.cls`` when present. Members are located once by their byte
  offset, so a worker reads one image with one ranged read.

Inputs are sorted by their path relative to ``URL`` (tars: tar order inside sorted tar names), so a
listing is the same on every run and input ``i`` always lands in the same shard. Only the paths (and
for tars, offsets) are held in memory: a few hundred bytes per input, fine at ImageNet's 1.28M.

Files whose names do not end in an image extension (``rcdm.images.IMAGE_EXTENSIONS``) and hidden files
are not inputs (they are counted in ``Source.ignored``); a file named like an image that does not
decode is an input that stage one records as an error.
"""

from __future__ import annotations

import copy
import csv
import hashlib
import io
import posixpath
import tarfile
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np

from rcdm import images, storage

Kind = Literal["tree", "folder", "list", "tars"]
LIST_EXTENSIONS = (".txt", ".csv", ".lst", ".tsv")
_HEADER_NAMES = ("path", "url", "file", "filename", "image", "image_path")
_NO_LABEL = -1


class SourceError(ValueError):
    """An input location that does not exist, holds no images, or has an unreadable layout."""


@dataclass(frozen=True)
class Input:
    """One input image: where to read it and what to call it."""

    index: int  # position in the sorted list
    source: str  # stable id: path relative to the source URL (tars: "<tar>/<member>")
    url: str  # fsspec URL to read
    label: int | None = None
    start: int | None = None  # byte range inside ``url`` (members of tars), else the whole file
    end: int | None = None


class Source:
    """A sorted list of inputs. Build it with :func:`list_source`; :meth:`shuffled` gives the same
    inputs in a seeded random order (``Input.index`` stays the position in the sorted list)."""

    def __init__(
        self,
        url: str,
        kind: Kind,
        names: list[str],
        *,
        base: str,
        classes: list[str] | None = None,
        labels: array | None = None,
        tars: list[str] | None = None,
        tar_index: array | None = None,
        offsets: array | None = None,
        sizes: array | None = None,
        ignored: int = 0,
        order: np.ndarray | None = None,
    ) -> None:
        self.url = url
        self.kind = kind
        self.classes = classes
        self.ignored = ignored
        self._names = names  # relative ids, sorted
        self._base = base  # URL the relative names are joined to
        self._labels = labels  # per input, -1 = unknown; None = no labels at all
        self._tars, self._tar_index, self._offsets, self._sizes = tars, tar_index, offsets, sizes
        self._order = order  # position i of this view = sorted input order[i]; None = sorted

    def shuffled(self, seed: int) -> Source:
        """The same inputs in the order of ``numpy.random.default_rng(seed).permutation(len(self))``."""
        view = copy.copy(self)
        view._order = np.random.default_rng(seed).permutation(len(self._names))
        return view

    def __len__(self) -> int:
        return len(self._names)

    @property
    def has_labels(self) -> bool:
        return self._labels is not None

    @property
    def num_classes(self) -> int | None:
        """Number of classes (class names, else 1 + the largest integer label), None without labels."""
        if self.classes is not None:
            return len(self.classes)
        if self._labels is None or len(self._labels) == 0:
            return None
        return max(self._labels) + 1

    def _url(self, name: str) -> str:
        if "://" in name or name.startswith("/"):
            return name
        return storage.join(self._base, name)

    def __getitem__(self, i: int) -> Input:
        if not 0 <= i < len(self._names):
            raise IndexError(f"input {i} out of range (the source has {len(self._names)} inputs)")
        if self._order is not None:
            i = int(self._order[i])
        name = self._names[i]
        label = None
        if self._labels is not None and self._labels[i] != _NO_LABEL:
            label = int(self._labels[i])
        if self._tars is not None:
            tar = self._tars[self._tar_index[i]]
            start = self._offsets[i]
            return Input(i, name, self._url(tar), label, start, start + self._sizes[i])
        return Input(i, name, self._url(name), label)

    def slice(self, start: int, stop: int) -> list[Input]:
        return [self[i] for i in range(start, min(stop, len(self)))]

    def __iter__(self) -> Iterator[Input]:
        return (self[i] for i in range(len(self)))

    def digest(self, start: int, stop: int) -> str:
        """SHA-1 of the ids and labels of inputs [start, stop) (in this view's order): identifies a
        shard's work unit."""
        h = hashlib.sha1()
        for inp in self.slice(start, stop):
            h.update(f"{inp.source}\t{inp.label}\n".encode())
        return h.hexdigest()

    def describe(self) -> dict:
        return {"url": self.url, "kind": self.kind, "num_inputs": len(self), "ignored": self.ignored}


def read_input(inp: Input) -> bytes:
    """The raw bytes of one input (a ranged read for members of tars)."""
    if inp.start is None:
        return storage.read_bytes(inp.url)
    fs, path = storage.url_to_fs(inp.url)
    return storage.retry(lambda: fs.cat_file(path, start=inp.start, end=inp.end), inp.url)


# --- listing --------------------------------------------------------------------------------------


def _hidden(rel: str) -> bool:
    return any(part.startswith(".") for part in rel.split("/"))


def _relative(root: str, path: str) -> str:
    return path[len(root) :].lstrip("/")


def list_source(url: str, labels: bool = True) -> Source:
    """List the inputs at ``url`` (layouts in the module docstring); ``labels=False`` drops labels."""
    fs, root = storage.url_to_fs(url)
    root = root.rstrip("/")
    if not storage.retry(lambda: fs.exists(root), url):
        raise SourceError(f"input {url} does not exist (give data=<folder, list file or tar>)")
    if not storage.retry(lambda: fs.isdir(root), url):
        lower = root.lower()
        if lower.endswith(".tar"):
            return _list_tars(url, [url.rstrip("/").rsplit("/", 1)[-1]], _parent_url(url), labels)
        if lower.endswith(LIST_EXTENSIONS):
            return _list_file(url, labels)
        raise SourceError(
            f"input {url} is a file but neither a list ({', '.join(LIST_EXTENSIONS)}) nor a .tar: "
            "give a folder of images, a class tree, a list file or WebDataset tars"
        )
    entries = storage.retry(lambda: fs.ls(root, detail=True), url)
    top_files, top_dirs = [], []
    for e in entries:
        rel = _relative(root, e["name"].rstrip("/"))
        if not rel or _hidden(rel):
            continue
        (top_dirs if e["type"] == "directory" else top_files).append(rel)
    tars = sorted(f for f in top_files if f.lower().endswith(".tar"))
    if tars and not any(images.is_image_name(f) for f in top_files):
        return _list_tars(url, tars, url, labels)
    if top_dirs and not any(images.is_image_name(f) for f in top_files):
        return _list_tree(url, fs, root, sorted(top_dirs), labels)
    return _list_folder(url, fs, root)


def _parent_url(url: str) -> str:
    head, _, _ = url.rstrip("/").rpartition("/")
    return head or "."


def _find_images(fs, root: str, url: str) -> tuple[list[str], int]:
    found = storage.retry(lambda: fs.find(root, withdirs=False), url)
    names, ignored = [], 0
    for path in found:
        rel = _relative(root, path)
        if _hidden(rel) or not images.is_image_name(rel):
            ignored += 1
            continue
        names.append(rel)
    names.sort()
    return names, ignored


def _list_folder(url: str, fs, root: str) -> Source:
    names, ignored = _find_images(fs, root, url)
    if not names:
        raise SourceError(f"no images found in {url} (looked for {', '.join(images.IMAGE_EXTENSIONS)})")
    return Source(url, "folder", names, base=url, ignored=ignored)


def _list_tree(url: str, fs, root: str, classes: list[str], labels: bool) -> Source:
    index = {c: i for i, c in enumerate(classes)}
    names, ignored = _find_images(fs, root, url)
    if not names:
        raise SourceError(
            f"no images found under the class folders of {url} ({len(classes)} folders: "
            f"{classes[:5]}...; looked for {', '.join(images.IMAGE_EXTENSIONS)})"
        )
    label_arr = None
    if labels:
        label_arr = array("l", (index[n.split("/", 1)[0]] for n in names))
    return Source(
        url,
        "tree",
        names,
        base=url,
        classes=classes if labels else None,
        labels=label_arr,
        ignored=ignored,
    )


def _list_file(url: str, labels: bool) -> Source:
    text = storage.read_text(url)
    names: list[str] = []
    raw_labels: list[str] = []
    for lineno, row in enumerate(csv.reader(io.StringIO(text), skipinitialspace=True), start=1):
        row = [c.strip() for c in row]
        if not row or not row[0] or row[0].startswith("#"):
            continue
        if not names and row[0].lower() in _HEADER_NAMES:
            continue
        if len(row) > 2:
            raise SourceError(f"{url}:{lineno}: expected 'path' or 'path,label', got {len(row)} columns")
        names.append(row[0])
        raw_labels.append(row[1] if len(row) == 2 else "")
    if not names:
        raise SourceError(f"list file {url} names no inputs")
    classes = None
    label_arr = None
    given = [lab for lab in raw_labels if lab]
    if labels and given:
        if all(_is_int(lab) for lab in given):
            label_arr = array("l", (int(lab) if lab else _NO_LABEL for lab in raw_labels))
        else:
            classes = sorted(set(given))
            index = {c: i for i, c in enumerate(classes)}
            label_arr = array("l", (index[lab] if lab else _NO_LABEL for lab in raw_labels))
    order = sorted(range(len(names)), key=names.__getitem__)
    sorted_names = [names[i] for i in order]
    dupes = [a for a, b in zip(sorted_names, sorted_names[1:]) if a == b]
    if dupes:
        raise SourceError(f"list file {url} names {dupes[0]!r} more than once ({len(dupes)} duplicates)")
    if label_arr is not None:
        label_arr = array("l", (label_arr[i] for i in order))
    return Source(url, "list", sorted_names, base=_parent_url(url), classes=classes, labels=label_arr)


def _is_int(text: str) -> bool:
    try:
        return int(text) >= 0
    except ValueError:
        return False


def _list_tars(url: str, tar_names: list[str], base: str, labels: bool) -> Source:
    names: list[str] = []
    tar_index, offsets, sizes, label_arr = array("l"), array("q"), array("q"), array("l")
    any_label = False
    for t, tar_name in enumerate(tar_names):
        tar_url = storage.join(base, tar_name)
        for image_member, cls in _scan_tar(tar_url):
            names.append(f"{tar_name}/{image_member.name}")
            tar_index.append(t)
            offsets.append(image_member.offset_data)
            sizes.append(image_member.size)
            label_arr.append(cls if cls is not None else _NO_LABEL)
            any_label |= cls is not None
    if not names:
        raise SourceError(f"no images found in the tars at {url} ({len(tar_names)} tars)")
    return Source(
        url,
        "tars",
        names,
        base=base,
        labels=label_arr if (labels and any_label) else None,
        tars=tar_names,
        tar_index=tar_index,
        offsets=offsets,
        sizes=sizes,
    )


def _scan_tar(tar_url: str) -> Iterator[tuple[tarfile.TarInfo, int | None]]:
    """(image member, label) per sample of one tar, reading headers and ``.cls`` members only."""
    fs, path = storage.url_to_fs(tar_url)
    with storage.retry(lambda: fs.open(path, "rb"), tar_url) as f, tarfile.open(fileobj=f, mode="r:") as tar:
        key, image, cls = None, None, None
        for member in tar:
            if not member.isfile():
                continue
            folder, base = posixpath.split(member.name)
            stem, _, ext = base.partition(".")
            k = posixpath.join(folder, stem)
            if k != key:
                if image is not None:
                    yield image, cls
                key, image, cls = k, None, None
            if image is None and images.is_image_name(base) and ext.lower().count(".") == 0:
                image = member
            elif ext.lower() == "cls":
                text = tar.extractfile(member).read().decode("ascii", "replace").strip()
                cls = int(text) if _is_int(text) else None
        if image is not None:
            yield image, cls
