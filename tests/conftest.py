"""Shared fixtures: a real S3 server on loopback (moto), a tiny checkpoint with images, repository paths.

The tiny-checkpoint helpers (``TINY``, ``save_tiny_run``, ``write_images``, ``write_feature_set``) and the
``tiny_world`` fixture serve tests/test_api.py and tests/test_sample_stages.py.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from rcdm import bank, checkpoint, shards, storage
from rcdm.config import to_dict
from rcdm.diffusion import DiffusionConfig
from rcdm.unet import UNet, UNetConfig

# Tests run tiny models: one thread avoids OpenMP spin-waiting, which costs far more than it gains on
# small tensors, and subprocesses (torchrun, Ray workers) inherit the setting.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on 127.0.0.1; fsspec (in this process and in subprocesses) points at it.

    Yields a dict with ``endpoint`` and ``env`` (the variables a subprocess needs).
    """
    pytest.importorskip("moto")
    import fsspec.config
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {
        "FSSPEC_S3_ENDPOINT_URL": endpoint,
        "FSSPEC_S3_KEY": "test",
        "FSSPEC_S3_SECRET": "test",
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved_env = {k: os.environ.get(k) for k in env}
    saved_conf = dict(fsspec.config.conf.get("s3", {}))
    os.environ.update(env)
    fsspec.config.conf["s3"] = {"endpoint_url": endpoint, "key": "test", "secret": "test"}
    try:
        yield {"endpoint": endpoint, "env": env}
    finally:
        fsspec.config.conf["s3"] = saved_conf
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """A fresh, empty bucket on the loopback S3 server; returns ``s3://<bucket>``."""
    import s3fs

    fs = s3fs.S3FileSystem(
        endpoint_url=s3_server["endpoint"], key="test", secret="test", skip_instance_cache=True
    )
    name = f"test-{uuid.uuid4().hex[:12]}"
    fs.mkdir(name)
    return f"s3://{name}"


# --- a tiny checkpoint ----------------------------------------------------------------------------

SIZE = 16  # model image size
ENC_SIZE = 32  # encoder input size
TINY = UNetConfig(
    image_size=SIZE, num_channels=32, num_res_blocks=1, attention_resolutions=(8,), num_heads=2,
    channel_mult=(1, 2), feature_dim=1280,
)  # fmt: skip


def tiny_unet(cfg: UNetConfig = TINY, seed: int = 0) -> UNet:
    """A UNet with every parameter perturbed: a fresh one has zero last convs and ignores its input."""
    torch.manual_seed(seed)
    model = UNet(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def tiny_encoder():
    """The encoder of the tiny checkpoint: mobilenet_v2 (1280-d) with seeded random weights."""
    from rcdm.encoders import load_encoder

    return load_encoder("mobilenet_v2", weights="random", input_size=ENC_SIZE, device="cpu")


def save_tiny_run(run: str) -> str:
    """One of our checkpoints (step 7), in the trainer's format, trained on a random-weight mobilenet_v2."""
    model = tiny_unet()
    sd = model.state_dict()
    state = {
        "step": 7,
        "model": sd,
        "ema": {"0.9999": sd},
        "optimizer": {},
        "config": {"model": to_dict(TINY), "diffusion": to_dict(DiffusionConfig())},
        "encoder": tiny_encoder().describe(),
    }
    return checkpoint.save_checkpoint(run, state)


def write_images(folder: Path, n: int, seed: int = 0) -> list[str]:
    """n random RGB images of different shapes (so the ADM crop matters)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        arr = rng.integers(0, 256, (36 + 4 * i, 44, 3), dtype=np.uint8)
        paths.append(str(folder / f"img{i}.png"))
        Image.fromarray(arr).save(paths[-1])
    return paths


def write_feature_set(root: str, crops: np.ndarray, feats: np.ndarray, encoder: dict) -> dict:
    """A one-shard feature dataset (manifest + bank) holding crops (N, H, W, 3) and feats (N, D)."""
    rows = [
        shards.encode_sample(f"item{i}", crops[i], feats[i], feats[i], dtype="float32")
        for i in range(len(crops))
    ]
    storage.write_bytes_atomic(storage.join(root, shards.shard_name(0)), shards.write_tar(rows))
    manifest = {
        "format": shards.FORMAT,
        "encoder": encoder,
        "feature_dtype": "float32",
        "image": {"size": int(crops.shape[1]), "format": "png"},
        "shards": [{"name": shards.shard_name(0), "count": len(rows)}],
    }
    storage.write_json_atomic(storage.join(root, shards.MANIFEST), manifest)
    bank.build_bank(root, manifest)
    return manifest


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread (and OpenMP threads spin when the cores are shared)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory) -> Callable[..., dict[str, Any]]:
    """Make a folder with the tiny training run, ``n_images`` images and the RCDM loaded from the run.

    ``tiny_world(name, n_images, **rcdm_kwargs)`` returns {"tmp", "run", "paths", "folder", "rcdm"};
    ``rcdm_kwargs`` go to ``RCDM.from_pretrained`` (which runs on the CPU).
    """

    def make(name: str, n_images: int, **rcdm_kwargs: Any) -> dict[str, Any]:
        from rcdm.api import RCDM

        tmp = tmp_path_factory.mktemp(name)
        run = str(tmp / "run")
        save_tiny_run(run)
        paths = write_images(tmp / "images", n_images)
        rcdm = RCDM.from_pretrained(run, device="cpu", **rcdm_kwargs)
        return {"tmp": tmp, "run": run, "paths": paths, "folder": str(tmp / "images"), "rcdm": rcdm}

    return make
