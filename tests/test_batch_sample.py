"""pipelines.batch_sample: values against direct sampling, resume after kill -9, a real `ray job submit`.

A tiny random UNet (16 px, 8-d features) is saved as one of our checkpoints; a feature dataset in the
stage-one format holds 3 shards of 3, 2 and 3 samples (8 items). Runs draw n = 2 samples per item.
"""

from __future__ import annotations

import collections
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from ray_head import RayHead

from pipelines import batch_sample as bs
from rcdm import images, shards, storage
from rcdm.checkpoint import load_unet, save_checkpoint
from rcdm.config import load_config, to_dict
from rcdm.diffusion import DiffusionConfig, build_diffusion
from rcdm.samplers import sample, sample_seed
from rcdm.unet import UNet, UNetConfig

REPO = Path(__file__).resolve().parent.parent
CONFIG = str(REPO / bs.DEFAULT_CONFIG)
SHARD_COUNTS = (3, 2, 3)
ITEMS = sum(SHARD_COUNTS)
DIM = 8
N = 2
STEPS = 10


def _save_tiny_checkpoint(run: Path, feature_dim: int) -> str:
    torch.manual_seed(0)
    cfg = UNetConfig(
        image_size=16,
        num_channels=32,
        num_res_blocks=1,
        channel_mult=(1, 2),
        attention_resolutions=(8,),
        num_heads=2,
        feature_dim=feature_dim,
    )
    model = UNet(cfg)
    with torch.no_grad():  # the zero-initialised output layer would make samples ignore the features
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    state = {
        "step": 0,
        "model": model.state_dict(),
        "ema": {},
        "config": {"model": to_dict(cfg), "diffusion": to_dict(DiffusionConfig())},
    }
    return save_checkpoint(str(run), state)


def _write_features(root: Path, dim: int = DIM) -> None:
    """A feature dataset in stage one's format: shards/*.tar + manifest.json (written last)."""
    rng = np.random.default_rng(0)
    entries = []
    for s, count in enumerate(SHARD_COUNTS):
        samples = []
        for i in range(count):
            image = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
            feat = rng.standard_normal(dim).astype(np.float32)
            samples.append(
                shards.encode_sample(f"s{s}_k{i}", image, feat, -feat, label=s, meta={"source": f"{s}/{i}"})
            )
        storage.write_bytes_atomic(str(root / shards.shard_name(s)), shards.write_tar(samples))
        entries.append({"name": shards.shard_name(s), "count": count})
    manifest = {
        "format": shards.FORMAT,
        "encoder": {"name": "test-random", "head": False, "feature_dim": dim, "weights_id": "random"},
        "feature_dtype": "float16",
        "image": {"size": 16, "format": "png"},
        "shards": entries,
        "totals": {"samples": ITEMS, "errors": 0},
    }
    storage.write_json_atomic(str(root / shards.MANIFEST), manifest)


def _input_features(root: Path) -> tuple[list[str], np.ndarray]:
    """Keys and features of every item, in input order (as decoded: float16 -> float32)."""
    rows = [
        s
        for url in shards.shard_urls(str(root), shards.read_manifest(str(root)))
        for s in shards.read_shard(url)
    ]
    return [s.key for s in rows], np.stack([s.feature for s in rows])


def _cfg(**overrides) -> bs.BatchSampleConfig:
    items = [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in overrides.items()]
    return load_config(bs.BatchSampleConfig, CONFIG, items)


def _read_outputs(out: Path) -> list[dict]:
    """Every sample of every output tar, in file order."""
    found = []
    for tar in sorted((out / bs.SAMPLES_DIR).glob("*.tar")):
        for raw in shards.iter_tar(tar.read_bytes(), str(tar)):
            meta = json.loads(raw["json"])
            found.append(
                {
                    "key": raw["__key__"],
                    "meta": meta,
                    "pixels": images.decode_png(raw["png"]),
                    "feature": np.load(io.BytesIO(raw["feat.npy"])),
                    "seed": int(raw["seed"]),
                    "cls": int(raw["cls"]) if "cls" in raw else None,
                }
            )
    return found


def _npz(out: Path) -> np.ndarray:
    manifest = json.loads((out / bs.MANIFEST).read_text())
    with np.load(out / manifest["npz"]["name"]) as f:
        return f["arr_0"]


def _assert_same_pixels(a: np.ndarray, b: np.ndarray) -> None:
    """Same samples drawn in other batches: equal up to a float rounding that flips a level (rare)."""
    assert a.shape == b.shape and a.dtype == b.dtype == np.uint8
    diff = np.abs(a.astype(int) - b.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.001


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("batch_sample")
    ckpt = _save_tiny_checkpoint(root / "run", DIM)
    other = _save_tiny_checkpoint(root / "run6", 6)
    _write_features(root / "feats")
    return {"root": root, "ckpt": ckpt, "ckpt6": other, "feats": root / "feats"}


@pytest.fixture(scope="module")
def local_ray(s3_server):
    """Ray in this process; started after the S3 server so its workers inherit the endpoint variables."""
    import ray

    ray.init(address="local", num_cpus=2, object_store_memory=100_000_000, include_dashboard=False)
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def reference(tiny, local_ray):
    """One complete in-process run (units of 2 items, batches of 3 samples crossing item boundaries)."""
    out = tiny["root"] / "ref"
    cfg = _cfg(
        checkpoint=tiny["ckpt"], features=str(tiny["feats"]), out=str(out), n=N, unit_size=2, batch_size=3,
        **{"sampler.steps": STEPS, "progress_interval": 0.5},
    )  # fmt: skip
    lines: list[str] = []
    manifest = bs.run(cfg, log=lines.append)
    return {"out": out, "manifest": manifest, "log": lines, "cfg": cfg}


# --- no Ray ---------------------------------------------------------------------------------------


def test_units_partition_the_input_deterministically(tiny):
    src = bs.open_features(str(tiny["feats"]), unit_size=2)
    # shards of 3, 2, 3 items in units of at most 2 rows that never cross a shard
    assert [(u.start, u.count, u.first_item) for u in src.units] == [
        (0, 2, 0),
        (2, 1, 2),
        (0, 2, 3),
        (0, 2, 5),
        (2, 1, 7),
    ]
    assert src.items == ITEMS and src.feature_dim == DIM
    whole = bs.open_features(str(tiny["feats"]))  # unit_size None: one unit per shard
    assert [u.count for u in whole.units] == list(SHARD_COUNTS)
    limited = bs.open_features(str(tiny["feats"]), unit_size=2, limit=4)
    assert [(u.count, u.first_item) for u in limited.units] == [(2, 0), (1, 2), (1, 3)]
    keys, feats = _input_features(tiny["feats"])
    unit = bs.read_unit(src.units[2])
    assert unit.keys == keys[3:5] and np.array_equal(unit.features, feats[3:5]) and unit.labels == [1, 1]


def test_write_npz_streams_the_evaluator_format(tmp_path):
    rng = np.random.default_rng(1)
    parts = [rng.integers(0, 256, (k, 4, 4, 3), dtype=np.uint8) for k in (2, 3)]
    url = str(tmp_path / "s.npz")
    bs.write_npz(url, (5, 4, 4, 3), iter(parts))
    with np.load(url) as f:
        assert f.files == ["arr_0"] and np.array_equal(f["arr_0"], np.concatenate(parts))
    with pytest.raises(RuntimeError, match="for 6 samples got 5"):
        bs.write_npz(str(tmp_path / "t.npz"), (6, 4, 4, 3), iter(parts))
    assert sorted(os.listdir(tmp_path)) == ["s.npz"]  # the failed write left nothing behind


def test_bad_input_is_a_clear_error_before_any_work(tiny, capsys, tmp_path):
    def error_of(*sets: str) -> str:
        with pytest.raises(SystemExit) as exc:
            bs.main(["--config", CONFIG, "--set", *sets])
        assert exc.value.code == 2
        return capsys.readouterr().err

    base = [f"checkpoint={tiny['ckpt']}", f"out={tmp_path / 'o'}"]
    assert "features is required: --set features=" in error_of(*base)
    assert f"no feature dataset at {tmp_path / 'nope'}" in error_of(*base, f"features={tmp_path / 'nope'}")
    missing = error_of(
        f"checkpoint={tmp_path / 'no.pt'}", f"features={tiny['feats']}", f"out={tmp_path / 'o'}"
    )
    assert f"checkpoint: {tmp_path / 'no.pt'} does not exist" in missing
    assert not (tmp_path / "o").exists()


# --- local Ray ------------------------------------------------------------------------------------


def test_samples_equal_direct_sampling_with_the_same_seeds(tiny, reference):
    out, manifest = reference["out"], reference["manifest"]
    keys, feats = _input_features(tiny["feats"])
    found = _read_outputs(out)
    assert len(list((out / bs.SAMPLES_DIR).glob("*.tar"))) == 5 == len(manifest["units"])
    assert [s["key"] for s in found] == [bs.sample_key(i, j) for i in range(ITEMS) for j in range(N)]
    for s in found:
        i, j = s["meta"]["item"], s["meta"]["j"]
        assert s["meta"]["key"] == keys[i] and s["seed"] == s["meta"]["seed"] == sample_seed(0, i, j)
        assert np.array_equal(s["feature"], feats[i]) and s["feature"].dtype == np.float32
        assert s["cls"] == int(keys[i][1])  # labels of the input (the shard index here)

    # the same samples drawn directly, all 16 in one batch (the run used batches of 3 on 2 actors)
    model, _ = load_unet(tiny["ckpt"])
    rows = [i for i in range(ITEMS) for _ in range(N)]
    seeds = [sample_seed(0, i, j) for i in range(ITEMS) for j in range(N)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the actors; also spares a busy 2-core machine from OpenMP spinning
    try:
        x0 = sample(
            model, build_diffusion(DiffusionConfig()), (len(rows), 3, 16, 16), torch.from_numpy(feats[rows]),
            sampler="ddim", steps=STEPS, seeds=seeds,
        )  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    levels = ((x0 + 1) * 127.5).clamp(0, 255).permute(0, 2, 3, 1).numpy()  # (N, H, W, 3) float
    got = np.stack([s["pixels"] for s in found]).astype(np.float64)
    # each stored pixel is the rounding of the direct float value (to 1e-3 of a level, ~1e-5 in [-1, 1])
    assert np.abs(got - levels).max() <= 0.5 + 1e-3
    assert not np.array_equal(got[0], got[1])  # j = 0 and j = 1 of one item are different draws

    arr = _npz(out)
    assert arr.dtype == np.uint8 and arr.shape == (ITEMS * N, 16, 16, 3)
    assert np.array_equal(arr, got.astype(np.uint8))  # the npz holds the tars' samples in order
    assert manifest["samples"] == ITEMS * N and manifest["npz"]["shape"] == [ITEMS * N, 16, 16, 3]
    assert any("16/16 samples (100.0%)" in line and "samples/s" in line for line in reference["log"])


def test_complete_output_is_not_redrawn_and_other_runs_are_refused(tiny, reference):
    out = reference["out"]
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    lines: list[str] = []
    assert bs.run(reference["cfg"], log=lines.append)["samples"] == ITEMS * N
    assert "complete, nothing to do" in lines[-1]
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before
    other = _cfg(checkpoint=tiny["ckpt"], features=str(tiny["feats"]), out=str(out), n=3, unit_size=2)
    with pytest.raises(bs.BatchSampleError, match=r"holds samples of a different run \(n: 2 there, 3 now"):
        bs.run(other)


def test_feature_dim_mismatch_is_a_clear_error(tiny, local_ray, capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        bs.main(
            [
                "--set",
                f"checkpoint={tiny['ckpt6']}",
                f"features={tiny['feats']}",
                f"out={tmp_path / 'o'}",
                "actors=1",
            ]
        )
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "hold 8-d features (test-random/trunk) but checkpoint" in err and "expects 6-d features" in err


def test_bank_input_gives_the_same_samples(tiny, reference, tmp_path):
    from rcdm.bank import build_bank

    bank = build_bank(str(tiny["feats"]), shards.read_manifest(str(tiny["feats"])), str(tmp_path / "bank.h5"))
    cfg = _cfg(
        checkpoint=tiny["ckpt"], features=bank, out=str(tmp_path / "o"), n=1, limit=5, unit_size=3, actors=1,
        **{"sampler.steps": STEPS},
    )  # fmt: skip
    bs.run(cfg, log=lambda s: None)
    # bank rows are the items in input order, so sample 0 of item i has the same seed and pixels
    _assert_same_pixels(_npz(tmp_path / "o"), _npz(reference["out"])[0 : 5 * N : N])


def test_features_and_output_on_s3(tiny, reference, s3_bucket):
    feats = f"{s3_bucket}/feats"
    fs, path = storage.url_to_fs(feats)
    fs.put(str(tiny["feats"]), path, recursive=True)
    out = f"{s3_bucket}/samples"
    cfg = _cfg(
        checkpoint=tiny["ckpt"], features=feats, out=out, n=N, limit=3, actors=1, **{"sampler.steps": STEPS}
    )  # fmt: skip
    manifest = bs.run(cfg, log=lambda s: None)
    assert storage.listdir(storage.join(out, bs.SAMPLES_DIR)) == ["000000.tar"]  # 3 items: shard 0 only
    arr = np.load(io.BytesIO(storage.read_bytes(storage.join(out, manifest["npz"]["name"]))))["arr_0"]
    _assert_same_pixels(arr, _npz(reference["out"])[: 3 * N])
    lines: list[str] = []
    bs.run(cfg, log=lines.append)
    assert "complete, nothing to do" in lines[-1]


def test_kill_9_mid_run_then_rerun_loses_and_duplicates_nothing(tiny, reference, local_ray, tmp_path):
    out = tmp_path / "killed"
    sets = [
        f"checkpoint={tiny['ckpt']}", f"features={tiny['feats']}", f"out={out}", f"n={N}", "unit_size=1",
        "batch_size=3", f"sampler.steps={STEPS}", "actors=1", "progress_interval=0.2",
    ]  # fmt: skip
    # the killed driver joins this module's Ray (as under `ray job submit`): Ray ends its actors when it dies
    address = local_ray.get_runtime_context().gcs_address
    cmd = [
        sys.executable,
        "-m",
        "pipelines.batch_sample",
        "--config",
        CONFIG,
        "--set",
        *sets,
        f"ray_address={address}",
    ]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 90
        while proc.poll() is None and time.monotonic() < deadline:
            if len(list((out / bs.PROGRESS_DIR).glob("[0-9]*.json"))) >= 2:
                break
            time.sleep(0.02)
        assert proc.poll() is None, (
            f"the run ended before it could be killed:\n{proc.communicate()[0][-3000:]}"
        )
        os.kill(proc.pid, signal.SIGKILL)
        log = proc.communicate(timeout=30)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    del log  # the kill may come before the first progress interval; the rerun below checks progress lines
    # Ray ends the dead driver's actor; one may finish the unit it was drawing first: wait for quiet
    previous, quiet_since = None, time.monotonic()
    while time.monotonic() - quiet_since < 1.5 and time.monotonic() < deadline:
        now = sorted(os.listdir(out / bs.PROGRESS_DIR))
        previous, quiet_since = now, (quiet_since if now == previous else time.monotonic())
        time.sleep(0.1)
    assert not (out / bs.MANIFEST).exists() and not list(out.glob("*.npz"))
    kept = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in (out / bs.SAMPLES_DIR).glob("*.tar")}
    markers = sorted(p.stem for p in (out / bs.PROGRESS_DIR).glob("[0-9]*.json"))
    assert 2 <= len(markers) < ITEMS
    kept = {k: v for k, v in kept.items() if Path(k).stem in markers}

    # rerun (in this process, on the module's Ray): draws the rest only
    cfg = load_config(bs.BatchSampleConfig, CONFIG, sets)
    lines: list[str] = []
    manifest = bs.run(cfg, log=lines.append)
    assert f"{len(markers)} units ({len(markers) * N} samples) already done" in lines[0]
    assert any("samples/s" in line for line in lines)  # progress lines (the last one when all is done)
    for name, (mtime, data) in kept.items():  # units finished before the kill were not drawn again
        tar = out / bs.SAMPLES_DIR / name
        assert tar.stat().st_mtime_ns == mtime and tar.read_bytes() == data

    found = _read_outputs(out)
    counts = collections.Counter((s["meta"]["key"], s["meta"]["j"]) for s in found)
    keys, _ = _input_features(tiny["feats"])
    assert set(counts) == {(k, j) for k in keys for j in range(N)} and set(counts.values()) == {1}
    assert manifest["samples"] == ITEMS * N and len(manifest["units"]) == ITEMS
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    # other unit sizes, batch compositions and actor counts, same seeds: the reference's pixels
    _assert_same_pixels(_npz(out), _npz(reference["out"]))


# --- a real Ray head and `ray job submit` -----------------------------------------------------------


def test_ray_job_submit_on_a_local_head(tiny, reference, tmp_path):
    out = tmp_path / "job"
    sets = [
        f"checkpoint={tiny['ckpt']}", f"features={tiny['feats']}", f"out={out}", f"n={N}", "unit_size=2",
        f"sampler.steps={STEPS}", "actors=1", "progress_interval=1",
    ]  # fmt: skip
    with RayHead.start(num_cpus=2) as head:
        # absolute paths, no runtime_env upload: the entrypoint runs this venv's python on the head
        result = head.submit(
            [sys.executable, "-m", "pipelines.batch_sample", "--config", CONFIG, "--set", *sets]
        )
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    assert "Connecting to existing Ray cluster" in log  # the job used the head, not a Ray of its own
    assert "16/16 samples (100.0%)" in log
    manifest = json.loads((out / bs.MANIFEST).read_text())
    assert manifest["samples"] == ITEMS * N
    _assert_same_pixels(_npz(out), _npz(reference["out"]))
