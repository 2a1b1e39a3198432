"""Stage one end to end on a local Ray: round trip against direct encoding, determinism, resume after
kill -9, bad inputs, refusals, and the same on S3 (moto on loopback).

One Ray session serves the whole module; the stage runs in-process through ``run(cfg)``, except the
kill -9 test, which runs it as a subprocess.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rcdm import images, shards, storage
from rcdm.bank import FeatureBank
from rcdm.config import load_config
from rcdm.encoders import load_encoder
from stages import features
from stages.features import EncoderChoice, FeaturesConfig, FeaturesError, run

REPO = Path(__file__).resolve().parent.parent
ENCODER = EncoderChoice(name="mobilenet_v2", weights="random", input_size=32)
CLASSES = ["a_cat", "b_dog", "c_emu"]


def _cfg(data: str, out: str, **kw) -> FeaturesConfig:
    base = dict(
        data=data, out=out, encoder=ENCODER, image_size=16, shard_size=4, batch_size=3,
        feature_dtype="float32", num_actors=1, decode_tasks=2, encoder_threads=1, order="sorted",
    )  # fmt: skip
    base.update(kw)
    return FeaturesConfig(**base)


def _image(seed: int, size: tuple[int, int]) -> Image.Image:
    """A smooth random RGB image (w, h): JPEG keeps it recognisable, and crops differ per seed."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return Image.fromarray(small).resize(size, Image.BILINEAR)


def make_tree(root: Path, per_class: int = 3) -> list[str]:
    """CLASSES x per_class JPEGs/PNGs of varied sizes; returns the relative paths in sorted order."""
    rels = []
    for c, name in enumerate(CLASSES):
        for j in range(per_class):
            ext = "JPEG" if j % 2 == 0 else "png"
            rel = f"{name}/img{j}.{ext}"
            path = root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            _image(10 * c + j, (24 + 7 * j, 20 + 5 * c)).save(path)
            rels.append(rel)
    return sorted(rels)


@pytest.fixture(scope="module")
def ray_session(s3_server):
    """One local Ray for the module, started after the S3 fixture so its workers see the endpoint."""
    import ray

    ray.init(address="local", num_cpus=2, object_store_memory=100_000_000, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def tree_run(ray_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("tree")
    rels = make_tree(root / "data")
    cfg = _cfg(str(root / "data"), str(root / "out"))
    summary = run(cfg, progress=False)
    return {"root": root, "rels": rels, "cfg": cfg, "summary": summary}


def _read_all(out: str) -> list[shards.FeatureSample]:
    manifest = shards.read_manifest(out)
    return [s for url in shards.shard_urls(out, manifest) for s in shards.read_shard(url)]


def _files(folder: Path) -> dict[str, tuple[int, bytes]]:
    return {
        str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes())
        for p in folder.rglob("*")
        if p.is_file()
    }


def _direct_features(originals: list[Image.Image]) -> tuple[np.ndarray, np.ndarray]:
    """Features of ``encoder.preprocess(pil)`` and of its mirror, straight from the encoder.

    With one torch thread, as the stage's actor has with ``encoder_threads=1``, so both sides round
    their reductions in the same order.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        encoder = load_encoder("mobilenet_v2", weights="random", device="cpu", input_size=32)
        x = torch.stack([encoder.preprocess(pil) for pil in originals])  # (N, 3, 32, 32)
        return encoder.encode(x).numpy(), encoder.encode(x.flip(-1)).numpy()
    finally:
        torch.set_num_threads(threads)


# --- round trip, determinism, no-op rerun ---------------------------------------------------------


@pytest.mark.filterwarnings("ignore:The given NumPy array is not writable")
def test_round_trip_matches_direct_encoding(tree_run):
    out, data, rels = tree_run["cfg"].out, tree_run["cfg"].data, tree_run["rels"]
    manifest = shards.read_manifest(out)
    assert manifest["total"] == 9 and [s["count"] for s in manifest["shards"]] == [4, 4, 1]
    assert manifest["shards"][2]["name"] == "shards/000002.tar"
    assert manifest["labels"]["classes"] == CLASSES
    enc = manifest["encoder"]
    assert (enc["name"], enc["head"], enc["feature_dim"], enc["input_size"], enc["weights_id"]) == (
        "mobilenet_v2", False, 1280, 32, "random",
    )  # fmt: skip
    assert manifest["image"] == {"size": 16, "format": "png"}
    assert manifest["preprocessing"]["crop"] == "adm_center"
    assert manifest["errors"] == {"file": "errors.jsonl", "count": 0}
    assert manifest["source"]["kind"] == "tree" and manifest["source"]["num_inputs"] == 9
    assert set(manifest["versions"]) >= {"rcdm", "torch", "webdataset", "ray", "python"}
    shards.check_manifest(manifest, feature_dim=1280, image_size=16, encoder="mobilenet_v2", head=False)

    originals = [images.open_image(os.path.join(data, rel)) for rel in rels]
    want, want_flip = _direct_features(originals)
    samples = _read_all(out)
    assert [s.key for s in samples] == [shards.make_key(rel) for rel in rels]
    assert [s.label for s in samples] == [CLASSES.index(rel.split("/")[0]) for rel in rels]
    for i, (s, pil) in enumerate(zip(samples, originals)):
        assert np.array_equal(s.image, images.center_crop_arr(pil, 16))
        assert s.meta == {"source": rels[i], "orig_size": list(pil.size)}
        np.testing.assert_allclose(s.feature, want[i], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(s.feature_flip, want_flip[i], rtol=1e-4, atol=1e-5)
    assert not np.allclose(want, want_flip, atol=1e-3)  # the mirror is a different input

    with FeatureBank(storage.join(out, "bank.h5")) as bank:
        assert len(bank) == 9 and bank.classes == CLASSES
        assert bank.labels.tolist() == [s.label for s in samples]
        assert np.array_equal(bank.get(range(9)), np.stack([s.feature for s in samples]))


def test_rerun_over_finished_output_is_a_noop(tree_run):
    out = Path(tree_run["cfg"].out)
    before = _files(out)
    summary = run(tree_run["cfg"], progress=False)
    assert summary["noop"] and summary["total"] == 9 and summary["written_shards"] == 0
    assert _files(out) == before  # nothing rewritten: same bytes, same modification times


def test_local_engine_writes_what_the_ray_engine_writes(tree_run, tmp_path):
    """engine=local (no Ray): the same shard bytes, markers and bank; a rerun after losing a shard
    rewrites only that shard."""
    cfg = tree_run["cfg"]
    out = tmp_path / "local"
    summary = run(_cfg(cfg.data, str(out), engine="local"), progress=False)
    assert summary["total"] == 9 and summary["written_shards"] == 3
    ray_out = Path(cfg.out)
    for rel in ["shards/000000.tar", "shards/000001.tar", "shards/000002.tar", "errors.jsonl"]:
        assert (out / rel).read_bytes() == (ray_out / rel).read_bytes(), rel
    for name in ["000000.json", "000001.json", "000002.json"]:
        assert json.loads((out / "_progress" / name).read_text()) == json.loads(
            (ray_out / "_progress" / name).read_text()
        )
    with FeatureBank(str(out / "bank.h5")) as a, FeatureBank(str(ray_out / "bank.h5")) as b:
        assert np.array_equal(a.get(range(9)), b.get(range(9))) and a.keys == b.keys

    (out / "shards" / "000001.tar").unlink()
    (out / "_progress" / "000001.json").unlink()
    before = {k: v for k, v in _files(out).items() if k.startswith("shards/")}
    summary = run(_cfg(cfg.data, str(out), engine="local"), progress=False)
    assert summary["written_shards"] == 1 and summary["total"] == 9
    after = _files(out)
    assert all(after[k] == v for k, v in before.items())  # the others untouched
    assert after["shards/000001.tar"][1] == (ray_out / "shards/000001.tar").read_bytes()


def test_shuffled_order_is_a_seeded_permutation_and_part_of_the_identity(tree_run, tmp_path):
    cfg, rels = tree_run["cfg"], tree_run["rels"]
    out = str(tmp_path / "shuffled")
    summary = run(_cfg(cfg.data, out, engine="local", order="shuffled", seed=3), progress=False)
    assert summary["total"] == 9
    perm = np.random.default_rng(3).permutation(len(rels))
    samples = _read_all(out)
    assert [s.key for s in samples] == [shards.make_key(rels[i]) for i in perm]
    by_key = {s.key: s for s in _read_all(cfg.out)}  # the sorted run: same samples, other places
    for s in samples:
        assert np.array_equal(s.feature, by_key[s.key].feature) and s.label == by_key[s.key].label
    assert shards.read_manifest(out)["order"] == {"kind": "shuffled", "seed": 3}
    assert shards.read_manifest(cfg.out)["order"] == {"kind": "sorted", "seed": None}
    with pytest.raises(FeaturesError, match="order.seed: 3 there, 4 now"):
        run(_cfg(cfg.data, out, engine="local", order="shuffled", seed=4), progress=False)


# --- refusals -------------------------------------------------------------------------------------


def test_out_of_a_different_run_is_refused(tree_run):
    out = Path(tree_run["cfg"].out)
    before = _files(out)
    other = _cfg(
        tree_run["cfg"].data,
        str(out),
        image_size=24,
        encoder=EncoderChoice("resnet50", weights="random", input_size=32),
    )
    with pytest.raises(FeaturesError) as err:
        run(other, progress=False)
    msg = str(err.value)
    assert "image_size: 16 there, 24 now" in msg
    assert "encoder.name: 'mobilenet_v2' there, 'supervised' now" in msg
    assert "encoder.feature_dim: 1280 there, 2048 now" in msg
    assert _files(out) == before


def test_empty_input_is_refused_before_any_work(ray_session, tmp_path):
    (tmp_path / "data").mkdir()
    with pytest.raises(FeaturesError, match="no images found"):
        run(_cfg(str(tmp_path / "data"), str(tmp_path / "out")), progress=False)
    assert not (tmp_path / "out").exists()


def test_absent_ssl_weights_stop_at_once_without_traceback(tmp_path, monkeypatch, capsys):
    """dino offline: the zoo's message, exit 2, nothing written, no Ray started."""
    import ray
    import torch.hub

    def offline(*args, **kwargs):
        raise OSError("Name or service not known")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    make_tree(tmp_path / "data", per_class=1)
    argv = ["--config", str(REPO / "configs/features/default.yaml"), "--set", "encoder.name=dino",
            f"data={tmp_path / 'data'}", f"out={tmp_path / 'out'}"]  # fmt: skip
    was_running = ray.is_initialized()
    with pytest.raises(SystemExit) as exit_info:
        features.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: weights file for 'dino_resnet50' is not present") and "Traceback" not in err
    assert "dino_resnet50_pretrain_full_checkpoint.pth" in err
    assert not (tmp_path / "out").exists() and ray.is_initialized() == was_running


# --- bad inputs -----------------------------------------------------------------------------------


def _save(img: Image.Image, path: Path, **kw) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kw)


def test_bad_inputs_are_recorded_and_skipped(ray_session, tmp_path):
    data = tmp_path / "data"
    rgb = _image(1, (30, 20))
    _save(rgb, data / "ok_rgb.jpg")
    _save(rgb.convert("CMYK"), data / "ok_cmyk.jpg")
    _save(rgb.convert("L"), data / "ok_gray.png")
    _save(rgb.convert("P"), data / "ok_palette.png")
    _save(rgb.convert("RGBA"), data / "ok_rgba.png")
    _save(Image.fromarray(np.arange(600, dtype=np.uint16).reshape(20, 30) * 100), data / "ok_16bit.png")
    buf = io.BytesIO()
    _image(2, (64, 64)).save(buf, format="JPEG")
    (data / "bad_truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (data / "bad_empty.jpg").write_bytes(b"")
    (data / "bad_text.JPEG").write_text("this is not an image\n")
    _save(_image(3, (80, 80)), data / "bad_huge.png")  # 6400 pixels > max_pixels below
    (data / "bad_link.png").symlink_to(data / "missing.png")  # listed, unreadable
    expected_bad = {"bad_truncated.jpg", "bad_empty.jpg", "bad_text.JPEG", "bad_huge.png", "bad_link.png"}
    if os.geteuid() != 0:  # root reads any file: permissions cannot make it unreadable
        _save(rgb, data / "bad_noperm.png")
        os.chmod(data / "bad_noperm.png", 0)
        expected_bad.add("bad_noperm.png")

    out = tmp_path / "out"
    summary = run(_cfg(str(data), str(out), max_pixels=5000, shard_size=3), progress=False)
    assert summary["total"] == 6 and summary["errors"] == len(expected_bad)
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert {e["source"] for e in errors} == expected_bad
    why = {e["source"]: e["error"] for e in errors}
    assert "empty file" in why["bad_empty.jpg"]
    assert "over the limit of 5000" in why["bad_huge.png"]
    assert "cannot decode" in why["bad_text.JPEG"] and "cannot decode" in why["bad_truncated.jpg"]
    assert "FileNotFoundError" in why["bad_link.png"]
    assert "BytesIO" not in json.dumps(errors)  # no object addresses: errors.jsonl is deterministic
    samples = _read_all(str(out))
    assert sorted(s.meta["source"] for s in samples) == sorted(
        f"ok_{k}" for k in ["rgb.jpg", "cmyk.jpg", "gray.png", "palette.png", "rgba.png", "16bit.png"]
    )
    for s in samples:
        assert s.label is None and s.image.shape == (16, 16, 3)
        assert np.array_equal(
            s.image, images.center_crop_arr(images.open_image(str(data / s.meta["source"])), 16)
        )
    assert shards.read_manifest(str(out))["labels"] is None

    # engine=local, each batch split over 4 decode threads, good and bad inputs mixed: the same bytes
    local = tmp_path / "local"
    cfg = _cfg(str(data), str(local), max_pixels=5000, shard_size=3, engine="local", decode_tasks=4)
    assert run(cfg, progress=False)["total"] == 6
    tars = sorted(p.name for p in (out / "shards").glob("*.tar"))
    assert len(tars) == 3 and sorted(p.name for p in (local / "shards").glob("*.tar")) == tars
    for rel in ["errors.jsonl", *(f"shards/{name}" for name in tars)]:
        assert (local / rel).read_bytes() == (out / rel).read_bytes(), rel


def test_all_invalid_input_is_an_error(ray_session, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for name in ("a.jpg", "b.png"):
        (data / name).write_bytes(b"garbage")
    with pytest.raises(FeaturesError, match="none of the 2 inputs .* could be used"):
        run(_cfg(str(data), str(tmp_path / "out")), progress=False)
    assert len((tmp_path / "out" / "errors.jsonl").read_text().splitlines()) == 2
    assert not (tmp_path / "out" / "manifest.json").exists()


# --- resume after kill -9 -------------------------------------------------------------------------


def _complete_tar(path: Path) -> int:
    with tarfile.open(path) as tar:
        return sum(len(tar.extractfile(m).read()) >= 0 for m in tar if m.isfile())


def test_resume_after_kill_9(ray_session, tmp_path):
    """A driver killed mid-way (it joins the module's Ray, as a job on a cluster would), then a rerun."""
    import ray

    rels = make_tree(tmp_path / "data", per_class=8)  # 24 inputs, 12 shards of 2
    out = tmp_path / "out"
    sets = [f"data={tmp_path / 'data'}", f"out={out}", "encoder.weights=random", "encoder.input_size=32",
            "image_size=16", "shard_size=2", "batch_size=2", "feature_dtype=float32", "decode_tasks=1", "encoder_threads=1",
            "order=sorted"]  # fmt: skip
    address = ray.get_runtime_context().gcs_address
    cmd = [sys.executable, "-m", "stages.features", "--config", str(REPO / "configs/features/demo.yaml"),
           "--set", *sets, f"ray_address={address}"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first_marker = out / "_progress" / "000000.json"
    deadline = time.time() + 120
    while not first_marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert first_marker.exists(), proc.stderr.read().decode()[-2000:]
    markers = sorted(p.name for p in (out / "_progress").glob("0*.json"))
    assert 1 <= len(markers) < 12, f"the run was not killed mid-way ({len(markers)} of 12 shards done)"
    assert not (out / "manifest.json").exists()
    for tar in (out / "shards").glob("*.tar"):  # every visible shard is whole
        assert _complete_tar(tar) == 2 * 5, tar

    summary = run(load_config(FeaturesConfig, REPO / "configs/features/demo.yaml", sets), progress=False)
    # (tasks the dead driver had in flight may still have finished a shard or two meanwhile)
    assert summary["total"] == 24 and 0 < summary["written_shards"] <= 12 - len(markers)
    keys = [s.key for s in _read_all(str(out))]
    assert keys == [shards.make_key(rel) for rel in rels]  # every input exactly once, in order
    assert not [p for p in out.rglob("*.tmp")]


# --- S3 -------------------------------------------------------------------------------------------


def test_s3_round_trip_and_resume(tree_run, s3_bucket):
    fs, _ = storage.url_to_fs(s3_bucket)
    local = tree_run["cfg"]
    for rel in tree_run["rels"]:
        storage.write_bytes_atomic(f"{s3_bucket}/data/{rel}", (Path(local.data) / rel).read_bytes())
    out = f"{s3_bucket}/feats"
    cfg = _cfg(f"{s3_bucket}/data", out)
    assert run(cfg, progress=False)["total"] == 9
    # Determinism and the S3 round trip at once: a second run over the same inputs (same relative
    # paths, so the same keys) writes the local run's shards byte for byte.
    names = [f"shards/{i:06d}.tar" for i in range(3)]
    for name in names:
        assert storage.read_bytes(f"{out}/{name}") == (Path(local.out) / name).read_bytes(), name
    with FeatureBank(f"{out}/bank.h5") as bank:
        assert len(bank) == 9 and bank.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]

    # lose shard 1 and its marker (a crash before its marker was written): only it is redone
    storage.remove(f"{out}/_progress/000001.json")
    storage.remove(f"{out}/shards/000001.tar")
    summary = run(cfg, progress=False)
    assert summary["written_shards"] == 1 and summary["total"] == 9
    assert storage.read_bytes(f"{out}/{names[1]}") == (Path(local.out) / names[1]).read_bytes()
    assert run(cfg, progress=False)["noop"]
    assert not fs.exists(f"{out}/shards/000003.tar")
