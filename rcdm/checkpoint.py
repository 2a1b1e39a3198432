"""Checkpoints: our training checkpoints, and the released RCDM weights.

Our checkpoint is ONE file per save, ``<run>/checkpoints/ckpt_<step:07d>.pt``, holding plain tensors and
containers only (so ``torch.load(weights_only=True)`` reads it and a checkpoint can never execute code)::

    {"format": "rcdm-checkpoint/1", "step": int, "model": state_dict, "ema": {"0.9999": state_dict},
     "optimizer": state_dict, "rng": {...}, "config": resolved TrainConfig as a dict, "encoder": {...}}

The file is written to a temporary name and renamed (locally) or uploaded whole (object stores); the
``latest`` pointer (a text file naming the checkpoint) is written after it, so a reader following the
pointer always finds a complete file, and a crash during a save leaves the previous checkpoint intact.

The released RCDM models (Bordes et al., 2022) are plain state dicts of EMA weights in guided-diffusion's
layout plus ``ssl_emb``. Their weights are released under the CC-BY-NC 4.0 licence (non-commercial use).
"""

from __future__ import annotations

import io
import os
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from rcdm import storage
from rcdm.config import from_dict, load_config, preset_path
from rcdm.diffusion import DiffusionConfig
from rcdm.ema import rate_key
from rcdm.weights import load_failure

FORMAT = "rcdm-checkpoint/1"
CKPT_DIR = "checkpoints"
LATEST = "latest"
_CKPT_RE = re.compile(r"^ckpt_(\d{7,})\.pt$")

RELEASED_BASE_URL = "https://dl.fbaipublicfiles.com/rcdm/"
RELEASED_LICENCE = "CC-BY-NC 4.0 (non-commercial use only)"
# name -> (file, encoder name, head)
RELEASED: dict[str, tuple[str, str, bool]] = {
    "simclr-trunk": ("rcdm_ema_simclr_trunk.pt", "simclr", False),
    "simclr-head": ("rcdm_ema_simclr_head.pt", "simclr", True),
    "barlow-trunk": ("rcdm_ema_barlow_trunk.pt", "barlow", False),
    "barlow-head": ("rcdm_ema_barlow_head.pt", "barlow", True),
    "vicreg-trunk": ("rcdm_ema_vicreg_trunk.pt", "vicreg", False),
    "vicreg-head": ("rcdm_ema_vicreg_head.pt", "vicreg", True),
    "dino-trunk": ("rcdm_ema_dino_trunk.pt", "dino", False),
    "dino-head": ("rcdm_ema_dino_head.pt", "dino", True),
    "supervised": ("rcdm_ema_supervised.pt", "supervised", False),
}


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable, or does not fit the model it is loaded into."""


# --- our training checkpoints ---------------------------------------------------------------------


def checkpoint_url(run: str, step: int) -> str:
    return storage.join(run, CKPT_DIR, f"ckpt_{step:07d}.pt")


def _save_atomic(obj: Any, url: str) -> None:
    """torch.save ``obj`` to ``url`` without ever exposing a partial file."""
    with storage.atomic_local_path(url) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)


def list_checkpoints(run: str) -> list[tuple[int, str]]:
    """(step, url) of every complete checkpoint in ``run``, oldest first."""
    folder = storage.join(run, CKPT_DIR)
    found = []
    for name in storage.listdir(folder):
        m = _CKPT_RE.match(name)
        if m:
            found.append((int(m.group(1)), storage.join(folder, name)))
    return sorted(found)


def save_checkpoint(run: str, state: dict[str, Any], keep_last: int | None = None) -> str:
    """Write ``state`` (must hold "step") as a new checkpoint of ``run``; update ``latest``; prune.

    Returns the checkpoint's URL. ``keep_last`` keeps only that many newest checkpoints.
    """
    step = int(state["step"])
    url = checkpoint_url(run, step)
    _save_atomic({"format": FORMAT, **state}, url)
    storage.write_text_atomic(storage.join(run, CKPT_DIR, LATEST), os.path.basename(url) + "\n")
    _remove_stale_temps(run)
    if keep_last is not None and keep_last > 0:
        for _, old in list_checkpoints(run)[:-keep_last]:
            storage.remove(old)
    return url


def _remove_stale_temps(run: str) -> None:
    """Delete temp files a killed save left behind (never visible as checkpoints, but they take space)."""
    folder = storage.local_path(storage.join(run, CKPT_DIR))
    if folder is None or not os.path.isdir(folder):
        return
    for name in os.listdir(folder):
        if name.startswith(".ckpt_") and storage.is_temp_name(name):
            try:
                os.unlink(os.path.join(folder, name))
            except FileNotFoundError:
                pass


def latest_checkpoint(run: str) -> str | None:
    """The newest complete checkpoint of ``run`` (None when there is none).

    Every listed file is complete (writes are atomic); the ``latest`` pointer may lag one save behind
    the newest file after a crash between the two writes, so the listing decides.
    """
    found = list_checkpoints(run)
    return found[-1][1] if found else None


def load_checkpoint(url: str, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint file with ``weights_only=True``: tensors and plain containers, never code."""
    if not storage.exists(url):
        raise CheckpointError(f"checkpoint {url} does not exist")
    data = storage.read_bytes(url)
    try:
        return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - unpickling errors have many types
        raise CheckpointError(load_failure(url, e)) from None


# --- released RCDM weights ------------------------------------------------------------------------


def released_cache_path(name: str) -> Path:
    """Where the released file ``name`` is looked for (and downloaded to): the torch hub cache."""
    return Path(torch.hub.get_dir()) / "checkpoints" / RELEASED[name][0]


def fetch_released(name: str) -> Path:
    """The local path of released model ``name``, downloading it when absent and the network allows."""
    if name not in RELEASED:
        raise CheckpointError(f"unknown released RCDM model '{name}': known names are {sorted(RELEASED)}")
    path = released_cache_path(name)
    if path.is_file():
        return path
    url = RELEASED_BASE_URL + RELEASED[name][0]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(url, str(path), progress=True)
    except Exception as e:  # noqa: BLE001 - any network failure means "offline"
        raise CheckpointError(
            f"released model '{name}' is not in the cache and could not be downloaded ({type(e).__name__}). "
            f"Fetch {url} and put it at {path} (weights licence: {RELEASED_LICENCE})"
        ) from None
    return path


# --- building a UNet from a checkpoint ------------------------------------------------------------


def _strip_prefix(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    if sd and all(k.startswith(prefix) for k in sd):
        return {k[len(prefix) :]: v for k, v in sd.items()}
    return sd


def check_state_dict(
    model: torch.nn.Module, sd: dict[str, torch.Tensor], source: str, hint: str = ""
) -> None:
    """Raise a short CheckpointError naming missing, unexpected and mis-shaped keys."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    shapes = [
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in sd and tuple(sd[k].shape) != tuple(v.shape)
    ]
    if not (missing or unexpected or shapes):
        return

    def show(items: list[str]) -> str:
        return ", ".join(items[:5]) + (f" (+{len(items) - 5} more)" if len(items) > 5 else "")

    parts = []
    if shapes:
        parts.append(f"{len(shapes)} shape mismatches: {show(shapes)}")
    if missing:
        parts.append(f"{len(missing)} keys missing from the checkpoint: {show(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys: {show(unexpected)}")
    raise CheckpointError(
        f"{source} does not fit the model config: " + "; ".join(parts) + (f". {hint}" if hint else "")
    )


def released_config(sd: dict[str, torch.Tensor], base: Any | None = None) -> Any:
    """The UNetConfig of a released state dict: ``base`` (default: the rcdm128 preset) with
    ``feature_dim`` read from ``ssl_emb.weight`` (None when the state dict has no ``ssl_emb``)."""
    from rcdm.unet import UNetConfig

    if base is None:
        base = load_config(UNetConfig, preset_path("model", "rcdm128"))
    dim = int(sd["ssl_emb.weight"].shape[1]) if "ssl_emb.weight" in sd else None
    return replace(base, feature_dim=dim)


def resolve_checkpoint(path_or_name: str, fetch: bool = True) -> str:
    """The one checkpoint file ``path_or_name`` stands for, fixed now: a checkpoint file as given, a training
    run folder's newest complete checkpoint (so later loads see these weights even while training saves
    more), or a released name's cached file (downloaded when absent); with ``fetch=False`` a released
    name is returned as is, for each loader to fetch where it runs (``load_unet`` takes both)."""
    if path_or_name in RELEASED:
        return str(fetch_released(path_or_name)) if fetch else path_or_name
    if storage.exists(storage.join(path_or_name, CKPT_DIR)):
        latest = latest_checkpoint(path_or_name)
        if latest is None:
            raise CheckpointError(f"training run {path_or_name} has no complete checkpoint yet")
        return latest
    exists = storage.exists(path_or_name)
    if exists and not path_or_name.endswith("/"):
        fs, p = storage.url_to_fs(path_or_name)
        if not fs.isdir(p):
            return path_or_name
    what = "is a folder without checkpoints" if exists else "does not exist"
    raise CheckpointError(
        f"{path_or_name} {what}: it is neither a checkpoint file, a training run folder, nor a released "
        f"model name ({', '.join(sorted(RELEASED))})"
    )


def diffusion_config_of(info: dict[str, Any]) -> DiffusionConfig:
    """The diffusion the model of ``load_unet``'s ``info`` was trained with, unrespaced (sampling respaces
    it): ours store it (a dict, or a preset name); released RCDM models use ADM's, the ``default`` preset."""
    stored = (info.get("train_config") or {}).get("diffusion")
    if isinstance(stored, dict):
        cfg = from_dict(DiffusionConfig, stored, source=f"{info['source']} (stored diffusion config)")
    else:
        cfg = load_config(DiffusionConfig, preset_path("diffusion", stored or "default"))
    learn_sigma = bool(info["config"]["learn_sigma"])
    if cfg.learn_sigma != learn_sigma:
        raise CheckpointError(
            f"{info['source']}: the model has learn_sigma={learn_sigma} but its diffusion config says "
            f"{cfg.learn_sigma}; the checkpoint is inconsistent"
        )
    return replace(cfg, timestep_respacing="")


def load_unet(
    path_or_name: str,
    config: Any | None = None,
    ema_rate: str | float | None = "auto",
    map_location: str | torch.device = "cpu",
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """A UNet with weights from one of our checkpoints, a run folder (its newest) or a released model.

    ``config`` (a UNetConfig) overrides the architecture; by default ours come with their own and
    released state dicts use the ``rcdm128`` preset with ``feature_dim`` read from ``ssl_emb.weight``.
    ``ema_rate``: "auto" = the first EMA of our checkpoints, a rate (0.9999 or its key "0.9999"), or None
    for the raw (non-EMA) weights. Returns (model in eval mode, info) where info holds ``kind`` ("ours" or
    "released"), ``source``, ``step``, ``config`` (the model config dict), ``encoder`` (dict or None) and,
    for ours, the full training ``train_config``.
    """
    from rcdm.unet import UNet, UNetConfig

    if ema_rate is not None and not isinstance(ema_rate, str):
        ema_rate = rate_key(ema_rate)
    released = path_or_name if path_or_name in RELEASED else None
    url = resolve_checkpoint(path_or_name)
    ckpt = load_checkpoint(url, map_location)
    info: dict[str, Any] = {"source": url, "step": None, "encoder": None, "train_config": None}
    if isinstance(ckpt, dict) and ckpt.get("format") == FORMAT:
        info["kind"] = "ours"
        info["step"] = ckpt.get("step")
        info["train_config"] = ckpt.get("config")
        info["encoder"] = ckpt.get("encoder")
        if config is None:
            config = from_dict(UNetConfig, ckpt["config"]["model"], source=f"{url} (stored config)")
        emas = ckpt.get("ema") or {}
        if ema_rate == "auto":
            sd = emas[next(iter(emas))] if emas else ckpt["model"]
        elif ema_rate is None:
            sd = ckpt["model"]
        elif ema_rate in emas:
            sd = emas[ema_rate]
        else:
            raise CheckpointError(f"{url} has no EMA at rate {ema_rate}; it has {sorted(emas)}")
        hint = "its stored config describes it; do not override the model config"
    else:
        if not isinstance(ckpt, dict) or not all(isinstance(v, torch.Tensor) for v in ckpt.values()):
            raise CheckpointError(f"{url} is neither an RCDM training checkpoint nor a plain state dict")
        info["kind"] = "released"
        sd = _strip_prefix(ckpt, "module.")
        if config is None:
            config = released_config(sd)
        if released is not None:
            _, enc, head = RELEASED[released]
            info["encoder"] = {"name": enc, "head": head}
        hint = "pass the model config it was trained with (e.g. --set model=<preset> or model.<key>=...)"
    model = UNet(config)
    check_state_dict(model, sd, url, hint)
    model.load_state_dict(sd, strict=True)
    model.eval()
    info["config"] = _config_dict(config)
    return model, info


def _config_dict(config: Any) -> dict[str, Any]:
    from rcdm.config import to_dict

    return to_dict(config)
