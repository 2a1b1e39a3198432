"""stages.train: DDP training with torchrun (gloo, 2 CPU processes), resume after kill -9, SIGTERM,
shards and outputs on S3, and clear errors before training. Tiny 16x16 model, 8-d features."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from test_data import write_feature_set

from rcdm import checkpoint, storage
from rcdm.config import load_config
from rcdm.ema import EMA
from stages.train import StopRun, TrainConfig, Trainer, batch_split, check_compatible, step_seed

REPO = Path(__file__).resolve().parent.parent
TIMEOUT = 150  # seconds for one torchrun launch; a hang fails the test instead of the suite

TINY = [
    "model.image_size=16",
    "model.num_channels=32",
    "model.channel_mult=[1,1]",
    "model.attention_resolutions=[8]",
    "model.num_heads=1",
    "model.feature_dim=8",
    "data.batch_size=8",
    "data.num_workers=0",
    "data.shuffle_buffer=16",
    "lr=0.002",
    "ema_rates=[0.9,0.99]",
    "log_every=1",
    "sample_every=0",
]

# Stalls a checkpoint write inside the atomic save (after the data, before fsync + rename) and leaves
# a marker, so a test can kill -9 the run in the middle of writing a checkpoint.
STALL_HOOK = """
import os, runpy, sys, time
target, marker = os.environ["RCDM_TEST_STALL"], os.environ["RCDM_TEST_STALL_MARKER"]
_fsync = os.fsync
def fsync(fd):
    try:
        name = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        name = ""
    if target in name:
        open(marker, "w").close()
        time.sleep(600)
    _fsync(fd)
os.fsync = fsync
sys.argv[0] = "stages.train"
runpy.run_module("stages.train", run_name="__main__", alter_sys=True)
"""


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra or {})
    return env


def launch(
    sets: list[str], nproc: int = 2, env: dict | None = None, script: str | None = None
) -> subprocess.Popen:
    """torchrun (or one plain process when nproc is 0) running stages.train in its own process group."""
    target = [script] if script else ["-m", "stages.train"]
    if nproc:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            *target,
        ]
    else:
        cmd = [sys.executable, *target]
    cmd += ["--config", "configs/train/tiny.yaml", "--set", *TINY, *sets]
    return subprocess.Popen(
        cmd,
        cwd=REPO,
        env=_env(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def finish(proc: subprocess.Popen, timeout: float = TIMEOUT) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        pytest.fail(f"training did not finish within {timeout} s (hang?)")
    return proc.returncode, out


def _children(pid: int) -> list[int]:
    found = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                found += [int(c) for c in f.read().split()]
    except FileNotFoundError:  # it has just ended
        pass
    return found


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (torchrun starts each rank in a session of its own)."""
    found = []
    for child in _children(pid):
        found += [child, *descendants(child)]
    return found


def kill_group(proc: subprocess.Popen) -> None:
    """kill -9 the launcher, every rank and every DataLoader worker at once."""
    pids = [proc.pid, *descendants(proc.pid)]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.communicate()


def wait_for(predicate, proc: subprocess.Popen, what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if proc.poll() is not None:
            pytest.fail(
                f"the run ended (rc {proc.returncode}) before {what}:\n{proc.communicate()[0][-3000:]}"
            )
        if time.time() > deadline:
            kill_group(proc)
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def metrics(out: str) -> list[dict]:
    return [json.loads(line) for line in storage.read_text(storage.join(out, "metrics.jsonl")).splitlines()]


def run_args(shards: str, out: str, *extra: str) -> list[str]:
    return [f"data.shards={shards}", f"out={out}", *extra]


# --- a 2-process run on uneven shards: the reference for the resume test ----------------------------

REF = [
    "data.num_workers=2",
    "steps=21",
    "ckpt_every=7",
    "sample_every=21",
    "sample_count=2",
    "sample_steps=3",
]


@pytest.fixture(scope="module")
def feats(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("feats"))
    write_feature_set(root, [10, 10, 10, 3])  # uneven: 4 streams (2 ranks x 2 workers) of 10, 10, 10, 3
    return root


@pytest.fixture(scope="module")
def reference(feats, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ref"))
    start = time.time()
    rc, log = finish(launch(run_args(feats, out, *REF)))
    return {"out": out, "rc": rc, "log": log, "seconds": time.time() - start}


def test_uneven_shards_two_ranks_two_workers_finish(reference):
    assert reference["rc"] == 0, reference["log"][-3000:]
    assert [m["step"] for m in metrics(reference["out"])] == list(range(1, 22))
    assert "global batch 8 = 2 x 1 x 4" in reference["log"]


def test_loss_is_finite_and_decreases(reference):
    losses = [m["loss"] for m in metrics(reference["out"])]
    assert all(torch.isfinite(torch.tensor(losses)))
    # the zero-initialised output layer predicts eps = 0 at first: mse = E[eps^2] = 1
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert first > 0.7 and last < 0.75 * first, losses


def test_outputs_of_a_run(reference, feats):
    out = reference["out"]
    m = metrics(out)[-1]
    assert {"step", "loss", "mse", "vb", "lr", "images_per_sec", "elapsed"} <= set(m)
    assert m["lr"] == 0.002 and m["images_per_sec"] > 0
    assert (
        "step 21/21 | loss" in reference["log"] and "img/s" in reference["log"] and "ETA" in reference["log"]
    )
    cfg = load_config(TrainConfig, os.path.join(out, "config.yaml"))
    assert cfg.steps == 21 and cfg.model.feature_dim == 8 and cfg.data.shards == feats
    # the tiny preset keeps the last 2
    assert [s for s, _ in checkpoint.list_checkpoints(out)] == [14, 21]
    model, info = checkpoint.load_unet(out, ema_rate="0.99")
    assert info["step"] == 21 and info["train_config"]["steps"] == 21 and info["encoder"]["name"] == "toy"
    ckpt = checkpoint.load_checkpoint(checkpoint.latest_checkpoint(out))
    assert sorted(ckpt["ema"]) == ["0.9", "0.99"] and ckpt["world_size"] == 2
    # the sample grid: 2 rows (held-out features) of 1 real + 3 samples, 16 px with 2 px gaps
    from PIL import Image

    grid = Image.open(os.path.join(out, "samples", "step_0000021.png"))
    assert grid.size == (4 * 18 + 2, 2 * 18 + 2)


def _read_marker(path: str) -> bool:
    return os.path.exists(path)


def test_resume_after_kill_matches_the_uninterrupted_run(reference, feats, tmp_path):
    out = str(tmp_path / "run")
    args = run_args(feats, out, *REF)
    ckpts = os.path.join(out, "checkpoints")

    # 1. kill -9 (every process) once the step-7 checkpoint exists
    proc = launch(args)
    wait_for(lambda: os.path.exists(os.path.join(ckpts, "ckpt_0000007.pt")), proc, "the step-7 checkpoint")
    kill_group(proc)

    # 2. rerun; kill -9 while it is inside the write of the step-14 checkpoint
    marker = str(tmp_path / "stalled")
    hook = tmp_path / "stall_hook.py"
    hook.write_text(STALL_HOOK)
    proc = launch(
        args, env={"RCDM_TEST_STALL": "ckpt_0000014", "RCDM_TEST_STALL_MARKER": marker}, script=str(hook)
    )
    wait_for(lambda: _read_marker(marker), proc, "the stalled write of the step-14 checkpoint")
    kill_group(proc)
    assert any(".ckpt_0000014.pt." in name for name in os.listdir(ckpts))  # the half-written temp file
    assert [s for s, _ in checkpoint.list_checkpoints(out)] == [7]
    latest = storage.read_text(os.path.join(ckpts, checkpoint.LATEST)).strip()
    assert (
        latest == "ckpt_0000007.pt" and checkpoint.load_checkpoint(os.path.join(ckpts, latest))["step"] == 7
    )

    # 3. rerun to the end: every logged value equals the uninterrupted run's
    rc, log = finish(launch(args))
    assert rc == 0, log[-3000:]
    assert "resumed from" in log and "at step 7" in log
    keys = ("step", "loss", "mse", "vb", "lr")
    assert [{k: m[k] for k in keys} for m in metrics(out)] == [
        {k: m[k] for k in keys} for m in metrics(reference["out"])
    ]
    a = checkpoint.load_checkpoint(checkpoint.latest_checkpoint(out))
    b = checkpoint.load_checkpoint(checkpoint.latest_checkpoint(reference["out"]))
    for part in ("model", "ema"):
        flat_a = a[part] if part == "model" else a[part]["0.99"]
        flat_b = b[part] if part == "model" else b[part]["0.99"]
        assert all(torch.equal(flat_a[k], flat_b[k]) for k in flat_b)


def _rank_of(pid: int) -> int | None:
    with open(f"/proc/{pid}/environ", "rb") as f:
        env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
    return int(env[b"RANK"]) if b"RANK" in env else None


def test_sigterm_to_one_rank_checkpoints_and_exits_0(feats, tmp_path):
    out = str(tmp_path / "run")
    proc = launch(run_args(feats, out, "steps=1000", "ckpt_every=1000"))
    wait_for(
        lambda: os.path.exists(os.path.join(out, "metrics.jsonl")) and len(metrics(out)) >= 2,
        proc,
        "two steps",
    )
    rank1 = [p for p in _children(proc.pid) if _rank_of(p) == 1]
    assert len(rank1) == 1
    os.kill(rank1[0], signal.SIGTERM)  # only rank 1: the ranks must agree on where to stop
    rc, log = finish(proc)
    assert rc == 0, log[-3000:]
    step = int(log.split("stopping at step ")[1].split()[0])
    assert 2 <= step < 1000 and "on a stop signal" in log
    assert checkpoint.list_checkpoints(out)[-1][0] == step and metrics(out)[-1]["step"] == step


def test_shards_and_outputs_on_s3(s3_server, s3_bucket):
    feats, out = storage.join(s3_bucket, "feats"), storage.join(s3_bucket, "run")
    write_feature_set(feats, [6, 6, 4])
    sets = run_args(
        feats, out, "steps=4", "micro_batch=2", "data.num_workers=1", "ckpt_every=2", "keep_last=1"
    )
    sets += ["sample_every=4", "sample_count=1", "sample_steps=2"]
    rc, log = finish(launch(sets, env=s3_server["env"]))
    assert rc == 0, log[-3000:]
    assert "global batch 8 = 2 x 2 x 2" in log
    assert [s for s, _ in checkpoint.list_checkpoints(out)] == [4]  # keep_last 1
    assert [m["step"] for m in metrics(out)] == [1, 2, 3, 4]
    assert storage.exists(storage.join(out, "samples", "step_0000004.png"))
    model, info = checkpoint.load_unet(out)
    assert info["step"] == 4 and model.cfg.feature_dim == 8


def test_nan_feature_stops_before_training_with_its_key(tmp_path):
    feats = str(tmp_path / "feats")
    write_feature_set(feats, [4, 4], nan_key="s0_0001")
    out = str(tmp_path / "run")
    rc, log = finish(launch(run_args(feats, out, "steps=5", "data.batch_size=8"), nproc=0))
    assert rc == 2 and "s0_0001" in log and "non-finite feat" in log
    assert checkpoint.list_checkpoints(out) == [] and "step 1/" not in log


# --- in-process checks (one process, no torchrun) ---------------------------------------------------


def tiny_config(feats: str, out: str, *extra: str) -> TrainConfig:
    return load_config(TrainConfig, REPO / "configs/train/tiny.yaml", [*TINY, *run_args(feats, out, *extra)])


def test_errors_before_training_are_clear(tmp_path):
    feats = str(tmp_path / "feats")
    write_feature_set(feats, [4, 4])
    with pytest.raises(StopRun, match=r"8-d features \(expected 1280-d\).*--set model.feature_dim=8"):
        Trainer(tiny_config(feats, str(tmp_path / "o"), "model.feature_dim=1280"), _single())
    storage.remove(storage.join(feats, "shards/000001.tar"))
    with pytest.raises(StopRun, match=r"shards .* are missing: .*000001.tar"):
        Trainer(tiny_config(feats, str(tmp_path / "o")), _single())
    manifest = storage.read_json(storage.join(feats, "manifest.json"))
    storage.write_json_atomic(storage.join(feats, "manifest.json"), {**manifest, "shards": []})
    with pytest.raises(StopRun, match="lists no shards"):
        Trainer(tiny_config(feats, str(tmp_path / "o")), _single())
    with pytest.raises(StopRun, match="no manifest.json"):
        Trainer(tiny_config(str(tmp_path / "none"), str(tmp_path / "o")), _single())


def test_check_refuses_in_one_process_what_the_workers_would(tmp_path, capsys):
    # `make train` runs `--check NPROC` before torchrun: the same refusals, one line each, no training
    from stages.train import check, main

    feats = str(tmp_path / "feats")
    write_feature_set(feats, [4, 4])
    out = str(tmp_path / "o")
    assert check(tiny_config(feats, out, "model.feature_dim=8"), 2) == 0
    assert "8 samples in 2 shards" in capsys.readouterr().out and not storage.exists(out)
    assert check(tiny_config(feats, out, "model.feature_dim=8"), 3) == 2  # batch 8 over 3 processes
    assert "not divisible by the 3 processes" in capsys.readouterr().err
    assert check(tiny_config(feats, out, "model.feature_dim=1280"), 2) == 2
    assert "8-d features (expected 1280-d)" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["--config", str(REPO / "configs/train/tiny.yaml"), "--check", "2", "--set",
              *run_args(str(tmp_path / "none"), out)])  # fmt: skip
    assert e.value.code == 2 and "no manifest.json" in capsys.readouterr().err


def _single():
    from rcdm import dist

    return dist.init(device="cpu")


def test_cfg_dropout_trains_the_learned_null_feature_and_resume_is_a_no_op_at_the_end(tmp_path):
    feats = str(tmp_path / "feats")
    write_feature_set(feats, [8])
    out = str(tmp_path / "run")
    # 3 steps: ADM's zero-initialised output convolutions pass no gradient to emb before step 3
    cfg = tiny_config(feats, out, "steps=3", "p_uncond=0.5", "model.learned_null_feature=true")
    assert Trainer(cfg, _single()).run() == 0
    state = checkpoint.load_checkpoint(checkpoint.latest_checkpoint(out))
    assert state["step"] == 3 and state["model"]["null_feat"].abs().sum() > 0  # started at zeros
    trainer = Trainer(cfg, _single())
    assert trainer.step == 3 and trainer.run() == 0
    with pytest.raises(StopRun, match=r"another model \(model.num_channels: 32 in the checkpoint, 64 now"):
        check_compatible(state["config"], tiny_config(feats, out, "model.num_channels=64"), "x")


def test_standardize_stores_the_training_feature_statistics(tmp_path):
    from rcdm.data import feature_statistics, open_shards

    feats = str(tmp_path / "feats")
    write_feature_set(feats, [8, 4])
    out = str(tmp_path / "run")
    cfg = tiny_config(feats, out, "steps=2", "model.feature_norm=standardize")
    assert Trainer(cfg, _single()).run() == 0
    mean, std = feature_statistics(open_shards(feats, feature_dim=8, image_size=16))
    state = checkpoint.load_checkpoint(checkpoint.latest_checkpoint(out))
    for sd in [state["model"], *state["ema"].values()]:
        assert torch.equal(sd["feat_mean"], mean) and torch.equal(sd["feat_std"], std)
    model, _ = checkpoint.load_unet(out)
    assert torch.equal(model.feat_std, std)


def test_sorted_shards_with_a_small_shuffle_buffer_get_a_note(tmp_path, capsys):
    feats = str(tmp_path / "feats")
    write_feature_set(feats, [8, 8])  # a manifest without "order": written in listing order
    cfg = tiny_config(feats, str(tmp_path / "run"), "steps=1", "data.shuffle_buffer=8")
    assert Trainer(cfg, _single()).run() == 0
    assert "written in listing order and data.shuffle_buffer 8 < 16 samples" in capsys.readouterr().out
    manifest = storage.read_json(storage.join(feats, "manifest.json"))
    storage.write_json_atomic(
        storage.join(feats, "manifest.json"), {**manifest, "order": {"kind": "shuffled", "seed": 0}}
    )
    cfg = tiny_config(feats, str(tmp_path / "run2"), "steps=1", "data.shuffle_buffer=8")
    assert Trainer(cfg, _single()).run() == 0
    assert "shuffle_buffer" not in capsys.readouterr().out


def test_bf16_autocasts_only_where_the_device_has_native_bf16(monkeypatch):
    from rcdm import dist
    from stages import train

    cfg = TrainConfig(precision="bf16")
    monkeypatch.setattr(dist, "native_bf16", lambda device: True)
    ctx = train.autocast_context(cfg, torch.device("cpu"))
    with ctx:
        assert torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.bfloat16
    monkeypatch.setattr(dist, "native_bf16", lambda device: False)
    with pytest.warns(UserWarning, match="no native bf16"):
        ctx = train.autocast_context(cfg, torch.device("cpu"))
    with ctx:
        assert torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.float32


def test_channels_last_trains_the_same_model(tmp_path):
    """NHWC memory format changes only the layout: same losses as NCHW up to rounding, and the
    checkpoint loads into a plain UNet."""
    feats = str(tmp_path / "feats")
    write_feature_set(feats, [8])
    runs = {}
    for fmt in ("false", "true"):
        out = str(tmp_path / f"run_{fmt}")
        assert (
            Trainer(
                tiny_config(feats, out, "steps=3", "log_every=1", f"channels_last={fmt}"), _single()
            ).run()
            == 0
        )
        runs[fmt] = [m["loss"] for m in metrics(out)]
    assert runs["true"] == pytest.approx(runs["false"], rel=1e-4)
    model, _ = checkpoint.load_unet(str(tmp_path / "run_true"))
    assert model.input_blocks[0][0].weight.is_contiguous()


def test_time_limit_stops_with_a_checkpoint(tmp_path, capsys):
    feats = str(tmp_path / "feats")
    write_feature_set(feats, [8])
    out = str(tmp_path / "run")
    assert Trainer(tiny_config(feats, out, "steps=50", "time_limit_minutes=0.0"), _single()).run() == 0
    assert [s for s, _ in checkpoint.list_checkpoints(out)] == [0]
    assert "learning rate did not decay" not in capsys.readouterr().out  # no decay asked for
    cfg = tiny_config(
        feats, str(tmp_path / "run2"), "steps=50", "time_limit_minutes=0.0", "decay_fraction=0.2"
    )
    assert Trainer(cfg, _single()).run() == 0
    assert "the time box ended before its end step was planned" in capsys.readouterr().out


def test_batch_split_and_seeds():
    cfg = load_config(TrainConfig, REPO / "configs/train/rcdm128.yaml", ["micro_batch=8"])
    assert batch_split(cfg, 8) == (32, 8, 4)  # 256 = 8 ranks x 4 passes x 8
    from rcdm.config import ConfigError

    with pytest.raises(ConfigError, match="not divisible by the 3 processes"):
        batch_split(cfg, 3)
    with pytest.raises(ConfigError, match="micro_batch 8 does not divide the per-rank batch 4"):
        batch_split(cfg, 64)
    seeds = {step_seed(0, 2, r, s) for r in range(2) for s in range(50)}
    assert len(seeds) == 100 and step_seed(0, 2, 1, 3) == step_seed(0, 2, 1, 3)


def test_ema_closed_form():
    """With the weights held at theta, k updates give theta_ema = theta + r^k (theta_0 - theta)."""
    model = torch.nn.Linear(3, 2)
    theta0 = [p.detach().clone() for p in model.parameters()]
    ema = EMA(model, [0.9, 0.5])
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    for _ in range(3):
        ema.update()
    sd = ema.state_dict()
    for r in (0.9, 0.5):
        for (name, p), p0 in zip(model.named_parameters(), theta0):
            expected = p.detach() + r**3 * (p0 - p.detach())
            assert torch.allclose(sd[repr(r)][name], expected, atol=1e-6)
    copy = torch.nn.Linear(3, 2)
    ema.copy_to(copy, 0.5)
    assert torch.equal(copy.weight, sd["0.5"]["weight"])
    fresh = EMA(model, [0.9, 0.5])
    fresh.load_state_dict(sd)
    assert torch.equal(fresh.shadow[0.9][0], ema.shadow[0.9][0])
    with pytest.raises(ValueError, match="distinct numbers in"):
        EMA(model, [0.9, 1.0])


def test_ema_warmup_closed_form():
    """Warm-up rates r_n = min(r, (1 + n) / (10 + n)): with the weights held at theta, n updates leave
    theta_ema = theta + prod_n r_n (theta_0 - theta)."""
    model = torch.nn.Linear(3, 2)
    theta0 = [p.detach().clone() for p in model.parameters()]
    ema = EMA(model, [0.9999, 0.2])
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    for n in range(4):
        ema.update(n)
    sd = ema.state_dict()
    # 0.9999: rates 0.1, 2/11, 3/12, 4/13; 0.2: rates 0.1, 2/11, then capped at 0.2
    for r, factor in ((0.9999, 0.1 * 2 / 11 * 3 / 12 * 4 / 13), (0.2, 0.1 * 2 / 11 * 0.2**2)):
        for (name, p), p0 in zip(model.named_parameters(), theta0):
            expected = p.detach() + factor * (p0 - p.detach())
            assert torch.allclose(sd[repr(r)][name], expected, atol=1e-6)
    assert EMA.warmup_rate(0.9999, None) == 0.9999


def test_presets_load():
    for name in ("tiny", "rcdm128"):
        cfg = load_config(TrainConfig, REPO / f"configs/train/{name}.yaml")
        assert cfg.model.learn_sigma and cfg.diffusion.steps == 1000
    cfg = load_config(TrainConfig, REPO / "configs/train/rcdm128.yaml")
    # upstream's released recipe (reference/upstream-facts.md)
    assert (cfg.lr, cfg.weight_decay, cfg.data.batch_size, cfg.ema_rates, cfg.grad_clip) == (
        1e-4,
        0.0,
        256,
        (0.9999,),
        None,
    )
    assert cfg.model.feature_dim == 2048 and cfg.precision == "fp32"


def test_grey_model_trains_on_the_luma_and_samples_rgb(tmp_path):
    """model.in_channels=1: the RGB crops become their BT.601 luma, samples go back to RGB (R = G = B)."""
    feats = str(tmp_path / "feats")
    write_feature_set(feats, [8])
    out = str(tmp_path / "run")
    extra = ("steps=2", "model.in_channels=1", "sample_every=2", "sample_count=2", "sample_per_row=2")
    assert Trainer(tiny_config(feats, out, *extra), _single()).run() == 0
    model, _ = checkpoint.load_unet(out)
    assert model.cfg.in_channels == 1 and model.out[-1].out_channels == 2  # eps and v, one channel each
    from PIL import Image

    grid = np.asarray(Image.open(os.path.join(out, "samples", "step_0000002.png")).convert("RGB"))
    samples = grid[2:-2, 20:]  # right of the real column: two sample columns of 16 px with 2 px gaps
    assert (samples[..., 0] == samples[..., 1]).all() and (samples[..., 1] == samples[..., 2]).all()
    with pytest.raises(ValueError, match="model.in_channels must be 3 .* or 1"):
        tiny_config(feats, out, "model.in_channels=2")


def test_lr_schedule_closed_form():
    from stages.train import lr_at, planned_end

    cfg = TrainConfig(lr=1.0, warmup_steps=4, steps=20, decay_fraction=0.25)  # decay over the last 5 steps
    lrs = [lr_at(cfg, s) for s in range(20)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0] and lrs[4:15] == [1.0] * 11
    assert lrs[15:] == [5 / 5, 4 / 5, 3 / 5, 2 / 5, 1 / 5]  # lr * (end - step) / n
    assert lr_at(cfg, 7, end=8) == 1 / 2  # round(0.25 * 8) = 2 decay steps
    assert [lr_at(TrainConfig(lr=1.0, steps=20), s) for s in (0, 19)] == [1.0, 1.0]
    # warm-up and decay overlap in a short run: the smaller factor, never above the decay line
    short = TrainConfig(lr=1.0, warmup_steps=10, steps=12, decay_fraction=0.5)  # decay over steps 6..11
    assert [lr_at(short, s) for s in range(4, 12)] == pytest.approx(
        [0.5, 0.6, 0.7, 0.8, 4 / 6, 3 / 6, 2 / 6, 1 / 6]  # min((step + 1) / 10, (12 - step) / 6)
    )
    # 100 s left at 0.5 s/step: 0.97 * 200 = 194 more steps, bounded by steps and by the next step
    assert planned_end(50, 0.5, 100.0, 10_000) == 244
    assert planned_end(50, 0.5, 100.0, 100) == 100 and planned_end(50, 0.5, -3.0, 100) == 51
    with pytest.raises(ValueError, match="decay_fraction"):
        TrainConfig(decay_fraction=1.5)


def test_time_box_plans_its_end_and_decays_the_lr_to_it(tmp_path, monkeypatch, capsys):
    from stages import train

    monkeypatch.setattr(train, "SPEED_SKIP", 1)
    monkeypatch.setattr(train, "SPEED_STEPS", 2)
    monkeypatch.setattr(train, "planned_end", lambda step, per_step, left, steps: step + 5)
    feats = str(tmp_path / "feats")
    write_feature_set(feats, [8])
    out = str(tmp_path / "run")
    extra = ("steps=1000000", "time_limit_minutes=30", "decay_fraction=0.5", "warmup_steps=0", "log_every=1")
    cfg = tiny_config(feats, out, *extra)
    assert Trainer(cfg, _single()).run() == 0
    log = capsys.readouterr().out
    assert re.search(r"step 1/1000000 \|.*ETA 0:(29|30):\d\d", log)  # the box, not a million steps, bounds it
    assert "step 8/8 |" in log
    # timed over steps 1..3, the plan at step 3 puts the end at 8; lr falls over round(0.5 * 8) = 4 steps
    m = metrics(out)
    assert [r["step"] for r in m] == list(range(1, 9))
    lrs = [r["lr"] / cfg.lr for r in m]
    assert lrs == pytest.approx([1, 1, 1, 1, 1, 0.75, 0.5, 0.25])
    state = checkpoint.load_checkpoint(checkpoint.latest_checkpoint(out))
    assert state["step"] == 8 and state["end_step"] == 8
    trainer = Trainer(cfg, _single())  # a resumed run keeps the plan: nothing left to do
    assert trainer.end_step == 8 and trainer.run() == 0
    assert "the end its time box planned (step 8" in capsys.readouterr().out
    # the way on that the message names: a constant lr, a fresh time box, the run's steps
    more = tiny_config(feats, out, "steps=10", "time_limit_minutes=30", "decay_fraction=0", "log_every=1")
    trainer = Trainer(more, _single())
    assert trainer.end_step == 10 and trainer.run() == 0
    assert [r["step"] for r in metrics(out)][-2:] == [9, 10] and metrics(out)[-1]["lr"] == more.lr
