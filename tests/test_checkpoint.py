"""rcdm.checkpoint: atomic saves, the latest pointer, safe loading, our and released UNet weights."""

from __future__ import annotations

import os
import pickle
import urllib.error

import pytest
import torch

from rcdm import checkpoint as ckpt
from rcdm.config import from_dict, to_dict

TINY = {
    "image_size": 16,
    "num_channels": 32,
    "num_res_blocks": 1,
    "attention_resolutions": [8],
    "num_heads": 2,
    "channel_mult": [1, 2],
    "learn_sigma": True,
    "use_scale_shift_norm": True,
    "resblock_updown": True,
    "feature_dim": 6,
}


def _tiny(**changes):
    from rcdm.unet import UNet, UNetConfig

    torch.manual_seed(0)
    cfg = from_dict(UNetConfig, {**TINY, **changes})
    return UNet(cfg), cfg


def _state(model, cfg, step):
    return {
        "step": step,
        "model": model.state_dict(),
        "ema": {"0.9999": {k: v + 1 for k, v in model.state_dict().items()}},
        "optimizer": {},
        "config": {"model": to_dict(cfg)},
        "encoder": {"name": "mobilenet_v2", "head": False, "feature_dim": 6},
    }


def test_save_load_round_trip_latest_and_pruning(tmp_path):
    model, cfg = _tiny()
    run = str(tmp_path / "run")
    for step in (10, 20, 30):
        url = ckpt.save_checkpoint(run, _state(model, cfg, step), keep_last=2)
    assert [s for s, _ in ckpt.list_checkpoints(run)] == [20, 30]
    assert ckpt.latest_checkpoint(run) == url
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "ckpt_0000030.pt"
    loaded = ckpt.load_checkpoint(url)
    assert loaded["format"] == ckpt.FORMAT and loaded["step"] == 30
    for k, v in model.state_dict().items():
        assert torch.equal(loaded["model"][k], v)


def test_crash_during_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    model, cfg = _tiny()
    run = str(tmp_path / "run")
    ckpt.save_checkpoint(run, _state(model, cfg, 1))
    real_save = torch.save

    def dying_save(obj, f, *a, **k):
        f.write(b"partial bytes")
        raise KeyboardInterrupt  # the process is being killed mid-write

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(run, _state(model, cfg, 2))
    monkeypatch.setattr(torch, "save", real_save)
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["ckpt_0000001.pt", "latest"]
    assert ckpt.load_checkpoint(ckpt.latest_checkpoint(run))["step"] == 1
    stale = tmp_path / "run" / "checkpoints" / ".ckpt_0000002.pt.abc.tmp"
    stale.write_bytes(b"left by a killed save")
    ckpt.save_checkpoint(run, _state(model, cfg, 3))
    assert not stale.exists()


class _Payload:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    bad = tmp_path / "bad.pt"
    with open(bad, "wb") as f:
        pickle.dump({"model": _Payload(marker)}, f)
    with pytest.raises(ckpt.CheckpointError, match="refused") as e:
        ckpt.load_checkpoint(str(bad))
    assert not marker.exists()
    assert "weights_only=False" not in str(e.value)  # torch's advice to load it unsafely is not passed on
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint")
    with pytest.raises(ckpt.CheckpointError, match="(is refused|is not a readable checkpoint)") as e:
        ckpt.load_checkpoint(str(text))
    assert str(text) in str(e.value) and "weights_only=False" not in str(e.value)


def test_load_unet_from_our_checkpoint_uses_stored_config_and_ema(tmp_path):
    model, cfg = _tiny()
    run = str(tmp_path / "run")
    ckpt.save_checkpoint(run, _state(model, cfg, 5))
    loaded, info = ckpt.load_unet(run)  # a run folder means its newest checkpoint
    assert info["kind"] == "ours" and info["step"] == 5 and info["encoder"]["name"] == "mobilenet_v2"
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, model.state_dict()[k] + 1)  # the EMA weights, not the raw ones
    raw, _ = ckpt.load_unet(run, ema_rate=None)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in raw.state_dict().items())


def test_released_layout_state_dict_loads_and_infers_feature_dim(tmp_path):
    model, cfg = _tiny(feature_dim=11)
    path = tmp_path / "rcdm_ema_tiny.pt"
    torch.save(model.state_dict(), path)
    _, cfg_other_dim = _tiny(feature_dim=None)
    assert ckpt.released_config(model.state_dict(), base=cfg_other_dim) == cfg
    assert ckpt.released_config(model.state_dict()).num_channels == 256  # the rcdm128 preset by default
    loaded, info = ckpt.load_unet(str(path), config=cfg)
    assert info["kind"] == "released"
    x, t, f = torch.randn(2, 3, 16, 16), torch.tensor([3, 500]), torch.randn(2, 11)
    with torch.no_grad():
        assert torch.allclose(loaded(x, t, f), model.eval()(x, t, f))


def test_wrong_config_names_the_mismatch(tmp_path):
    model, cfg = _tiny(feature_dim=11)
    path = tmp_path / "w.pt"
    torch.save(model.state_dict(), path)
    _, wrong = _tiny(feature_dim=7, num_channels=64)
    with pytest.raises(ckpt.CheckpointError, match=r"shape mismatches: .*ssl_emb.weight") as e:
        ckpt.load_unet(str(path), config=wrong)
    assert len(str(e.value)) < 2000  # a short message, not 400 lines


def test_released_name_offline_says_url_and_path(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    def offline(url, dst, progress=True):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(ckpt.CheckpointError) as e:
        ckpt.load_unet("dino-head")
    msg = str(e.value)
    assert "https://dl.fbaipublicfiles.com/rcdm/rcdm_ema_dino_head.pt" in msg
    assert str(tmp_path / "hub" / "checkpoints" / "rcdm_ema_dino_head.pt") in msg and "CC-BY-NC" in msg
    with pytest.raises(ckpt.CheckpointError, match="neither a checkpoint file"):
        ckpt.load_unet("dino-middle")


def test_s3_checkpoints(s3_bucket):
    model, cfg = _tiny()
    run = f"{s3_bucket}/runs/a"
    ckpt.save_checkpoint(run, _state(model, cfg, 3))
    ckpt.save_checkpoint(run, _state(model, cfg, 4), keep_last=1)
    assert [s for s, _ in ckpt.list_checkpoints(run)] == [4]
    loaded, info = ckpt.load_unet(run)
    assert info["step"] == 4
