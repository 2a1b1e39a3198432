"""Shared fixtures: a real S3 server on loopback (moto), tiny images, repository paths."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest
import torch

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
