"""Stage two: train the feature-conditioned diffusion model (RCDM) with DDP from feature shards.

Launch (one process per GPU; on CPU the processes talk gloo)::

    torchrun --nproc_per_node=8 -m stages.train --config configs/train/rcdm128.yaml \\
        --set data.shards=s3://bucket/features out=s3://bucket/runs/rcdm128
    torchrun --nnodes=$NNODES --node_rank=$NODE_RANK --nproc_per_node=8 \\
        --master_addr=$MASTER_ADDR --master_port=29500 -m stages.train --config ...   # on every node
    python -m stages.train --config configs/train/tiny.yaml --set data.shards=runs/features

Rerunning the same command resumes from the newest complete checkpoint in ``out`` (``resume: auto``)
and continues exactly as the uninterrupted run would have: the model, EMAs and optimizer come from the
checkpoint, the data order is a pure function of the number of batches consumed (rcdm/data.py), and the
noise, timesteps and dropout of step s on rank r come from a generator seeded by (seed * world + r, s).

One step: every rank draws its micro-batches, t ~ U{0..T-1}, eps ~ N(0, I), replaces each feature by
``model.null_feature`` with probability ``p_uncond`` (classifier-free guidance), and back-propagates the
hybrid loss ``mse + vb`` (GaussianDiffusion.training_losses); DDP averages the gradients; AdamW steps;
every EMA moves towards the new weights. SIGTERM/SIGINT (and ``time_limit_minutes``) end the run after
the current step with a checkpoint and exit code 0, on every rank at the same step. ``min_snr_gamma``
(diffusion) weights the mse term by Min-SNR-gamma; ``model.in_channels: 1`` trains a grey model on the
luma of the crops.

Outputs in ``out``: config.yaml, checkpoints/ckpt_<step>.pt + checkpoints/latest, metrics.jsonl (one JSON
line per logged step), samples/step_<step>.png (EMA samples; each row the real image then samples of
its feature), tb/ (TensorBoard events, when tensorboard is installed and out is local).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from rcdm import checkpoint as ckpt_lib
from rcdm import dist, storage
from rcdm.config import ConfigError, to_dict, to_yaml
from rcdm.data import (
    DataConfig,
    DataError,
    FeatureStream,
    ShardSet,
    feature_statistics,
    heldout,
    make_loader,
    open_shards,
)
from rcdm.diffusion import DiffusionConfig, GaussianDiffusion, build_diffusion
from rcdm.ema import EMA
from rcdm.images import make_grid, save_png, to_channels, to_uint8
from rcdm.samplers import sample, sample_seed
from rcdm.shards import ManifestError
from rcdm.unet import UNet, UNetConfig
from stages.cli import add_config_args, config_from_args

DEFAULT_CONFIG = "configs/train/tiny.yaml"


@dataclass(frozen=True)
class TrainConfig:
    """Everything one training run needs; saved to out/config.yaml and into every checkpoint.

    ``data.batch_size`` is the global batch (over all ranks); ``micro_batch`` (per rank, None = the
    whole per-rank batch) accumulates gradients over per_rank / micro_batch passes. ``grad_clip`` None
    = no clipping (as upstream). ``resume``: "auto" (the newest complete checkpoint in out, if any),
    "none" (start over), or a checkpoint URL. ``sample_every`` 0 = no sample grids; the grid conditions
    on the first ``sample_count`` samples of ``sample_shard`` (None = the last shard). ``decay_fraction``
    f > 0 lets the lr fall linearly to 0 over the last f of the run (``lr_at``); a run bounded by
    ``time_limit_minutes`` first times its steps, then plans the step where the box will end (saved in
    its checkpoints, kept on resume) and decays towards that step.
    """

    model: UNetConfig = field(default_factory=UNetConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    out: str = "runs/train"
    steps: int = 1000
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    decay_fraction: float = 0.0  # the last fraction of the run: lr falls linearly to 0 (0 = constant lr)
    grad_clip: float | None = None
    ema_rates: tuple[float, ...] = (0.9999,)
    ema_warmup: bool = False  # rate of update n = min(r, (1 + n) / (10 + n)); off as upstream
    precision: Literal["fp32", "bf16"] = "fp32"
    micro_batch: int | None = None
    p_uncond: float = 0.0
    compile: bool = False
    channels_last: bool = False  # NHWC activations and weights (faster convolutions on some CPUs and GPUs)
    ckpt_every: int = 1000
    keep_last: int = 3
    log_every: int = 10
    sample_every: int = 0
    sample_count: int = 8
    sample_per_row: int = 3
    sample_steps: int = 25
    sample_shard: str | None = None
    seed: int = 0
    resume: str = "auto"
    time_limit_minutes: float | None = None

    def __post_init__(self) -> None:
        positive = ("steps", "ckpt_every", "log_every", "sample_count", "sample_per_row", "sample_steps")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "sample_every", "keep_last", "seed"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.decay_fraction <= 1.0:
            raise ValueError(f"decay_fraction must be in [0, 1], got {self.decay_fraction}")
        if not 0.0 <= self.p_uncond < 1.0:
            raise ValueError(f"p_uncond must be in [0, 1), got {self.p_uncond}")
        if self.p_uncond > 0 and self.model.feature_dim is None:
            raise ValueError("p_uncond > 0 needs a conditional model: set model.feature_dim")
        if self.micro_batch is not None and self.micro_batch < 1:
            raise ValueError(f"micro_batch must be >= 1 or null, got {self.micro_batch}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ValueError(f"grad_clip must be > 0 or null (off), got {self.grad_clip}")
        if self.model.in_channels not in (1, 3):
            raise ValueError(
                f"model.in_channels must be 3 (RGB) or 1 (the luma, for grey data such as the demo's), got "
                f"{self.model.in_channels}: the shards hold RGB crops"
            )
        if self.model.learn_sigma != self.diffusion.learn_sigma:
            raise ValueError(
                f"model.learn_sigma={self.model.learn_sigma} but diffusion.learn_sigma="
                f"{self.diffusion.learn_sigma}: set both alike"
            )


class StopRun(Exception):
    """End the run with exit ``code``; ``message`` (if any) is printed by the rank that knows it."""

    def __init__(self, code: int, message: str = "") -> None:
        super().__init__(message)
        self.code, self.message = code, message


# --- set-up -----------------------------------------------------------------------------------------


def batch_split(cfg: TrainConfig, world_size: int) -> tuple[int, int, int]:
    """(per-rank batch, micro-batch, accumulation passes) for the global data.batch_size."""
    global_batch = cfg.data.batch_size
    if global_batch % world_size:
        raise ConfigError(
            f"data.batch_size {global_batch} (the global batch) is not divisible by the {world_size} "
            f"processes: use a multiple of {world_size}"
        )
    per_rank = global_batch // world_size
    micro = cfg.micro_batch or per_rank
    if per_rank % micro:
        raise ConfigError(
            f"micro_batch {micro} does not divide the per-rank batch {per_rank} (= {global_batch} / "
            f"{world_size} processes): choose a divisor of {per_rank}"
        )
    return per_rank, micro, per_rank // micro


def open_run_shards(cfg: TrainConfig) -> ShardSet:
    """The run's shard set, checked against the model's feature dim and image size and the expected encoder."""
    return open_shards(
        cfg.data.shards,
        feature_dim=cfg.model.feature_dim,
        image_size=cfg.model.image_size,
        encoder=cfg.data.expect_encoder,
    )


def preflight(cfg: TrainConfig, info: dist.DistInfo) -> ShardSet:
    """Rank 0 reads and checks the manifest and the shard list; every rank gets the same answer."""
    result: ShardSet | str | None = None
    if info.is_main:
        try:
            result = open_run_shards(cfg)
        except (DataError, ManifestError) as e:
            result = str(e)
    result = dist.broadcast_object(result, info)
    if isinstance(result, str):
        raise StopRun(2, result if info.is_main else "")
    return result


def step_seed(seed: int, world_size: int, rank: int, step: int) -> int:
    """The seed of step ``step`` on ``rank``: DiT's per-rank seed ``seed * world + rank``, mixed with the step."""
    return int(np.random.SeedSequence([seed * world_size + rank, step]).generate_state(1, np.uint64)[0] >> 1)


def lr_at(cfg: TrainConfig, step: int, end: int | None = None) -> float:
    """The learning rate of step ``step`` (0-based) in a run of ``end`` steps (default ``cfg.steps``).

    Linear warm-up over ``warmup_steps``, then constant (upstream: constant 1e-4). With ``decay_fraction``
    f > 0 the last n = round(f * end) steps fall linearly towards 0, ``lr * (end - step) / n``
    (warm-up, stable, decay: the final decay buys most of what a cosine schedule gives, and the stable
    part does not depend on where the run ends). Where warm-up and decay overlap (a short run), the
    smaller factor holds, so the lr never exceeds the decay line.
    """
    end = cfg.steps if end is None else end
    factor = 1.0
    if cfg.warmup_steps and step < cfg.warmup_steps:
        factor = (step + 1) / cfg.warmup_steps
    if cfg.decay_fraction > 0:
        n = decay_steps(cfg, end)
        if step >= end - n:
            factor = min(factor, max(end - step, 0) / n)
    return cfg.lr * factor


def decay_steps(cfg: TrainConfig, end: int) -> int:
    """n = round(decay_fraction * end), at least 1: the steps over which the lr falls to 0."""
    return max(1, round(cfg.decay_fraction * end))


# The time-boxed run measures its speed over these steps (after the first few, which are slow) to place
# its end step, so that a decaying learning rate reaches its end inside the box.
SPEED_SKIP, SPEED_STEPS, SPEED_MARGIN = 10, 40, 0.97


def planned_end(step: int, seconds_per_step: float, seconds_left: float, steps: int) -> int:
    """The step a time-boxed run will reach: ``SPEED_MARGIN`` of the time left at the measured speed,
    never beyond ``steps`` and never before the next step."""
    return max(step + 1, min(steps, step + int(SPEED_MARGIN * seconds_left / max(seconds_per_step, 1e-9))))


def autocast_context(cfg: TrainConfig, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast for ``precision=bf16`` where the device has native bf16 (CUDA, or a CPU with
    AVX512-BF16/AMX: 1.5x the fp32 step of the demo UNet on such a 2-core CPU); fp32 elsewhere."""
    if cfg.precision == "bf16":
        if dist.native_bf16(device):
            return torch.autocast(device.type, dtype=torch.bfloat16)
        warnings.warn(
            f"precision bf16: this {device.type} has no native bf16 (CPUs need AVX512-BF16 or AMX); "
            "training in fp32",
            stacklevel=2,
        )
    return contextlib.nullcontext()


# --- resume -----------------------------------------------------------------------------------------


def find_resume(cfg: TrainConfig) -> str | None:
    if cfg.resume == "none":
        return None
    if cfg.resume == "auto":
        return ckpt_lib.latest_checkpoint(cfg.out)
    return cfg.resume


def check_compatible(stored: dict[str, Any], cfg: TrainConfig, url: str) -> list[str]:
    """Refuse a checkpoint of another model or diffusion; return warnings about a changed data order."""
    for section in ("model", "diffusion"):
        old, new = stored.get(section, {}), to_dict(getattr(cfg, section))
        diff = [
            f"{section}.{k}: {old.get(k)!r} in the checkpoint, {v!r} now"
            for k, v in new.items()
            if old.get(k) != v
        ]
        if diff:
            raise StopRun(
                2,
                f"{url} was trained with another {section} ({'; '.join(diff[:3])}): use another out, "
                "--set resume=none to start over, or the checkpoint's settings",
            )
    notes = []
    if stored.get("seed") != cfg.seed:
        notes.append(f"seed {stored.get('seed')} -> {cfg.seed}")
    old_data, new_data = stored.get("data", {}), to_dict(cfg.data)
    for key in ("batch_size", "num_workers", "shuffle_buffer", "flip", "shards"):
        if old_data.get(key) != new_data[key]:
            notes.append(f"data.{key} {old_data.get(key)!r} -> {new_data[key]!r}")
    if stored.get("micro_batch") != cfg.micro_batch:
        notes.append(f"micro_batch {stored.get('micro_batch')} -> {cfg.micro_batch}")
    return notes


# --- logging ----------------------------------------------------------------------------------------


class MetricsLog:
    """out/metrics.jsonl: one JSON object per logged step. On resume, lines after the resumed step
    (written by a run that crashed before its next checkpoint) are dropped, so no step appears twice."""

    def __init__(self, out: str, resume_step: int | None) -> None:
        self.url = storage.join(out, "metrics.jsonl")
        self.local = storage.local_path(self.url)
        kept: list[str] = []
        if resume_step is not None and storage.exists(self.url):
            for line in storage.read_text(self.url).splitlines():
                with contextlib.suppress(json.JSONDecodeError):  # a line cut by a crash
                    if json.loads(line)["step"] <= resume_step:
                        kept.append(line)
        self.lines = kept
        storage.write_text_atomic(self.url, "".join(f"{line}\n" for line in kept))
        self.writer = None
        try:
            if self.local is not None:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(
                    storage.join(self.local.rsplit("/", 1)[0], "tb"), purge_step=resume_step
                )
        except ImportError:
            pass

    def append(self, record: dict[str, Any]) -> None:
        line = json.dumps(record)
        self.lines.append(line)
        if self.local is not None:
            with open(self.local, "a") as f:
                f.write(line + "\n")
        if self.writer is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.writer.add_scalar(f"train/{k}", v, record["step"])

    def flush(self) -> None:
        """Object stores cannot append: the whole file is rewritten at checkpoints and at the end."""
        if self.local is None:
            storage.write_text_atomic(self.url, "".join(f"{line}\n" for line in self.lines))
        if self.writer is not None:
            self.writer.flush()


def fmt_time(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


# --- the run ----------------------------------------------------------------------------------------


class Trainer:
    """One run: checks, model, EMA, optimizer, resume and data in ``__init__``; the loop in ``run``."""

    def __init__(self, cfg: TrainConfig, info: dist.DistInfo) -> None:
        self.cfg, self.info = cfg, info
        self.device = info.device
        self.start_time = time.time()
        self.stop_signal: int | None = None
        self.speed_mark: float | None = None  # when plan_end began timing steps
        self.per_rank, self.micro, self.accum = batch_split(cfg, info.world_size)
        self.shard_set = preflight(cfg, info)

        torch.manual_seed(cfg.seed)  # every rank builds the same initial weights
        self.model = UNet(cfg.model).to(self.device)
        self.memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
        self.model.to(memory_format=self.memory_format)
        self.ema = EMA(self.model, cfg.ema_rates)
        self.opt = torch.optim.AdamW(
            self.model.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay
        )
        self.diffusion: GaussianDiffusion = build_diffusion(cfg.diffusion)
        self.step, self.elapsed_before = 0, 0.0
        self.end_step, self.end_planned = cfg.steps, False  # a time box with lr decay plans its end step
        resumed = self.resume()
        if cfg.model.feature_norm == "standardize" and not resumed:  # a resumed run has them in its weights
            self.model.set_feature_stats(*(t.to(self.device) for t in feature_statistics(self.shard_set)))
        self.saved_step = self.step if resumed else -1
        if info.is_main:
            storage.makedirs(cfg.out)
            storage.write_text_atomic(storage.join(cfg.out, "config.yaml"), to_yaml(cfg))
        self.metrics = MetricsLog(cfg.out, self.step) if info.is_main else None

        net: torch.nn.Module = torch.compile(self.model) if cfg.compile else self.model
        if info.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            net = DDP(net, device_ids=ids, find_unused_parameters=False, gradient_as_bucket_view=True)
        self.net = net
        self.autocast = autocast_context(cfg, self.device)

        stream = FeatureStream(
            self.shard_set,
            micro_batch=self.micro,
            rank=info.rank,
            world_size=info.world_size,
            seed=cfg.seed,
            shuffle_buffer=cfg.data.shuffle_buffer,
            flip=cfg.data.flip,
            feature_dim=cfg.model.feature_dim,
            image_size=cfg.model.image_size,
            start_batch=self.step * self.accum,
        )
        self.loader = make_loader(stream, cfg.data.num_workers, pin_memory=self.device.type == "cuda")
        self.heldout: tuple[torch.Tensor, torch.Tensor] | None = None
        self.sample_model: UNet | None = None

    # --- checkpoints ---

    def resume(self) -> bool:
        cfg = self.cfg
        url = find_resume(cfg)
        if url is None:
            return False
        state = ckpt_lib.load_checkpoint(url, map_location=self.device)
        try:
            notes = check_compatible(state["config"], cfg, url)
        except StopRun as e:
            raise StopRun(e.code, e.message if self.info.is_main else "") from None
        if state.get("world_size") != self.info.world_size:
            notes.append(f"world size {state.get('world_size')} -> {self.info.world_size}")
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.opt.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        self.elapsed_before = float(state.get("elapsed", 0.0))
        if self.plans_end() and state.get("end_step") is not None:  # the interrupted run's plan holds
            self.end_step, self.end_planned = min(cfg.steps, int(state["end_step"])), True
        if self.info.is_main:
            print(f"resumed from {url} at step {self.step}", flush=True)
            if notes:
                print(
                    "note: the data order / randomness differs from the interrupted run ("
                    + ", ".join(notes)
                    + ")",
                    flush=True,
                )
        return True

    def save(self) -> None:
        if self.step == self.saved_step:
            return
        if self.info.is_main:
            state = {
                "step": self.step,
                "model": self.model.state_dict(),
                "ema": self.ema.state_dict(),
                "optimizer": self.opt.state_dict(),
                "rng": {"rule": "step_seed(seed, world_size, rank, step)", "seed": self.cfg.seed},
                "world_size": self.info.world_size,
                "samples_seen": self.step * self.cfg.data.batch_size,
                "elapsed": self.elapsed(),
                "end_step": self.end_step if self.end_planned else None,
                "config": to_dict(self.cfg),
                "encoder": self.shard_set.manifest.get("encoder"),
            }
            url = ckpt_lib.save_checkpoint(self.cfg.out, state, keep_last=self.cfg.keep_last or None)
            self.metrics.flush()
            print(f"saved {url}", flush=True)
        dist.barrier(self.info)
        self.saved_step = self.step

    def elapsed(self) -> float:
        return self.elapsed_before + time.time() - self.start_time

    # --- one step ---

    def fetch(self, it) -> tuple[list[dict[str, Any]], str | None]:
        batches = []
        for _ in range(self.accum):
            try:
                mb = next(it)
            except Exception as e:  # noqa: BLE001 - every rank must learn that this one cannot go on
                return batches, f"reading the training data failed: {type(e).__name__}: {e}"
            if "error" in mb:
                return batches, mb["error"]
            batches.append(mb)
        return batches, None

    def train_step(self, batches: list[dict[str, Any]]) -> tuple[float, float, float]:
        cfg, device = self.cfg, self.device
        seed = step_seed(cfg.seed, self.info.world_size, self.info.rank, self.step)
        torch.manual_seed(seed)  # dropout
        gen = torch.Generator(device=device)
        gen.manual_seed(seed)  # timesteps, noise, feature dropout
        lr = lr_at(cfg, self.step, self.end_step)
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.opt.zero_grad(set_to_none=True)
        sums = torch.zeros(3, dtype=torch.float64, device=device)
        for i, mb in enumerate(batches):
            x0 = to_channels(mb["x"].to(device, non_blocking=True), cfg.model.in_channels)
            x0 = x0.contiguous(memory_format=self.memory_format)  # (n, C, H, W): C = 1 trains on the luma
            n = x0.shape[0]
            t = torch.randint(0, self.diffusion.num_timesteps, (n,), generator=gen, device=device)
            noise = torch.randn(x0.shape, generator=gen, device=device)
            feat = None
            if cfg.model.feature_dim is not None:
                feat = mb["feat"].to(device, non_blocking=True)  # (n, D)
                if cfg.p_uncond > 0 or cfg.model.learned_null_feature:
                    # torch.where keeps a learned null feature in the graph even when no row is dropped
                    drop = torch.rand(n, generator=gen, device=device) < cfg.p_uncond
                    feat = torch.where(drop[:, None], self.model.null_feature(n), feat)
            last = i == len(batches) - 1
            sync = self.net.no_sync() if isinstance(self.net, DDP) and not last else contextlib.nullcontext()
            with sync:
                with self.autocast:
                    losses = self.diffusion.training_losses(self.net, x0, t, feat, noise=noise)
                    loss = losses["loss"].mean()
                (loss / len(batches)).backward()
            sums += torch.stack(
                [loss.detach(), losses["mse"].detach().mean(), losses["vb"].detach().mean()]
            ).double()
        if cfg.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.opt.step()
        self.ema.update(self.step if cfg.ema_warmup else None)
        self.step += 1
        loss, mse, vb = (sums / len(batches)).tolist()
        return loss, mse, vb

    # --- samples ---

    def save_samples(self) -> None:
        cfg = self.cfg
        if self.heldout is None:
            url = cfg.sample_shard or self.shard_set.urls[-1]
            x, feat, _ = heldout(url, cfg.sample_count, cfg.model.feature_dim, cfg.model.image_size)
            self.heldout = (x, feat)
            self.sample_model = UNet(cfg.model).to(self.device).eval()
        x_real, feat = self.heldout
        n, k = x_real.shape[0], cfg.sample_per_row
        model = self.ema.copy_to(self.sample_model)
        cond = feat.repeat_interleave(k, 0).to(self.device) if cfg.model.feature_dim is not None else None
        seeds = [sample_seed(cfg.seed, i, j) for i in range(n) for j in range(k)]
        shape = (n * k, cfg.model.in_channels, x_real.shape[2], x_real.shape[3])
        with torch.no_grad():
            xs = sample(
                model, self.diffusion, shape, cond, sampler="ddim", steps=cfg.sample_steps, seeds=seeds
            )
        xs = to_channels(xs.cpu(), 3).view(n, k, 3, *shape[2:])
        rows = torch.cat([x_real[:, None], xs], dim=1)  # (n, 1 + k, 3, H, W)
        grid = make_grid(to_uint8(rows.flatten(0, 1)), nrow=k + 1)
        url = storage.join(cfg.out, "samples", f"step_{self.step:07d}.png")
        save_png(grid, url)
        print(f"samples -> {url}", flush=True)

    # --- the loop ---

    def on_signal(self, signum: int, frame: Any) -> None:
        if self.stop_signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.stop_signal = signum

    def run(self) -> int:
        cfg, info = self.cfg, self.info
        if self.step >= self.end_step:
            if info.is_main:
                if self.end_step < cfg.steps:  # a resumed time box's plan, saved in its checkpoint
                    why = (
                        f"the end its time box planned (step {self.end_step}, kept in the checkpoint: its "
                        f"learning rate has decayed to 0); to train on, resume with decay_fraction=0 (the "
                        f"full lr from here) or start a new out"
                    )
                else:
                    why = f"steps {cfg.steps}"
                print(f"{cfg.out} is already at step {self.step}, {why}: nothing to do", flush=True)
            return 0
        previous = {sig: signal.signal(sig, self.on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        if info.is_main:
            n_params = sum(p.numel() for p in self.model.parameters())
            print(
                f"training {n_params / 1e6:.2f}M parameters on {info.world_size} x {self.device.type}; "
                f"{self.shard_set.total} samples in {len(self.shard_set.urls)} shards; global batch "
                f"{cfg.data.batch_size} = {info.world_size} x {self.accum} x {self.micro}; "
                f"steps {self.step} -> {self.end_step}",
                flush=True,
            )
            streams = info.world_size * max(1, cfg.data.num_workers)
            if len(self.shard_set.urls) < streams:
                print(
                    f"note: {len(self.shard_set.urls)} shards for {streams} data streams (ranks x workers): every "
                    "stream reads every shard and keeps its share; write more, smaller shards in stage one",
                    flush=True,
                )
            order = (self.shard_set.manifest.get("order") or {}).get("kind")
            if order != "shuffled" and cfg.data.shuffle_buffer < self.shard_set.total:
                print(
                    f"note: these shards were written in {order or 'listing'} order and data.shuffle_buffer "
                    f"{cfg.data.shuffle_buffer} < {self.shard_set.total} samples: each shuffle group spans a few "
                    "consecutive shards, which in a class-sorted tree hold few classes, so batches will too. "
                    "Re-run stage one with order=shuffled (its default), or raise data.shuffle_buffer",
                    flush=True,
                )
        it = iter(self.loader)
        try:
            return self.loop(it)
        finally:
            del it  # stops the DataLoader workers before the process leaves
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def loop(self, it) -> int:
        cfg, info = self.cfg, self.info
        window = np.zeros(4)  # loss, mse, vb sums and step count since the last log line
        window_start, window_step = time.time(), self.step
        loop_start = self.step
        batches, error = self.fetch(it)
        while True:
            limit = cfg.time_limit_minutes
            over_time = limit is not None and self.elapsed_since_start() > limit * 60
            flags = dist.all_reduce_sum(
                [float(error is not None), float(self.stop_signal is not None), float(over_time)], info
            )
            if flags[0]:
                raise StopRun(2, error or "")
            if flags[1] or flags[2]:
                why = "a stop signal" if flags[1] else f"the time limit of {limit} minutes"
                if info.is_main:
                    print(f"stopping at step {self.step} on {why}", flush=True)
                    if flags[2] and self.plans_end() and not self.end_planned:
                        print(
                            f"note: the time box ended before its end step was planned (after "
                            f"{SPEED_SKIP + SPEED_STEPS} steps), so the learning rate did not decay",
                            flush=True,
                        )
                self.save()
                return 0
            loss, mse, vb = self.train_step(batches)
            window += (loss, mse, vb, 1)
            if self.step % cfg.log_every == 0 or self.step == self.end_step:
                sums = dist.all_reduce_sum(window.tolist(), info)
                self.log(sums, time.time() - window_start, self.step - window_step)
                window[:] = 0
                window_start, window_step = time.time(), self.step
            if self.step % cfg.ckpt_every == 0 or self.step == self.end_step:
                self.save()
            if cfg.sample_every and self.step % cfg.sample_every == 0 and info.is_main:
                self.save_samples()
            if self.step >= self.end_step:
                return 0
            if self.plans_end() and not self.end_planned:
                self.plan_end(loop_start)
            batches, error = self.fetch(it)

    def plans_end(self) -> bool:
        """A time box with a decaying lr: the run must know where it ends to decay towards it."""
        return self.cfg.time_limit_minutes is not None and self.cfg.decay_fraction > 0

    def plan_end(self, first_step: int) -> None:
        """Place the time-boxed run's end step from its speed over SPEED_STEPS steps (means over ranks,
        so every rank plans the same step); it is saved with every checkpoint and kept on resume."""
        done = self.step - first_step
        if done == SPEED_SKIP:
            self.speed_mark = time.time()
        elif done == SPEED_SKIP + SPEED_STEPS and self.speed_mark is not None:
            per_step = (time.time() - self.speed_mark) / SPEED_STEPS
            left = self.cfg.time_limit_minutes * 60 - self.elapsed_since_start()
            sums = dist.all_reduce_sum([per_step, left], self.info)
            per_step, left = (v / self.info.world_size for v in sums)
            self.end_step, self.end_planned = planned_end(self.step, per_step, left, self.cfg.steps), True
            if self.info.is_main:
                start = self.end_step - decay_steps(self.cfg, self.end_step)
                print(
                    f"time box: {per_step:.3f} s/step, so the run ends at step {self.end_step}; the learning "
                    f"rate falls linearly to 0 from step {max(start, self.step)}",
                    flush=True,
                )

    def elapsed_since_start(self) -> float:
        return time.time() - self.start_time

    def log(self, sums: list[float], seconds: float, steps: int) -> None:
        if not self.info.is_main:
            return
        count = sums[3]  # steps x ranks
        loss, mse, vb = (s / count for s in sums[:3])
        ips = steps * self.cfg.data.batch_size / max(seconds, 1e-9)
        eta = (self.end_step - self.step) * seconds / max(steps, 1)
        if self.cfg.time_limit_minutes is not None:  # a time box ends the run first
            eta = min(eta, self.cfg.time_limit_minutes * 60 - self.elapsed_since_start())
        record = {
            "step": self.step,
            "loss": loss,
            "mse": mse,
            "vb": vb,
            "lr": lr_at(self.cfg, self.step - 1, self.end_step),
            "images_per_sec": ips,
            "elapsed": self.elapsed(),
            "epoch": self.step * self.cfg.data.batch_size / self.shard_set.total,
        }
        self.metrics.append(record)
        print(
            f"step {self.step}/{self.end_step} | loss {loss:.4f} mse {mse:.4f} vb {vb:.4f} | "
            f"lr {record['lr']:.2e} | {ips:.1f} img/s | elapsed {fmt_time(record['elapsed'])} | ETA {fmt_time(eta)}",
            flush=True,
        )


def check(cfg: TrainConfig, world_size: int) -> int:
    """Exit code of ``--check``: the batch split for ``world_size`` processes and the shards (manifest,
    dims, encoder), in this one process, so that a bad run is refused before torchrun starts workers."""
    try:
        batch_split(cfg, world_size)
        shard_set = open_run_shards(cfg)
    except (ConfigError, DataError, ManifestError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    print(
        f"train: checked for {world_size} process(es): {shard_set.total} samples in {len(shard_set.urls)} shards "
        f"at {cfg.data.shards}",
        flush=True,
    )
    return 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m stages.train", description=__doc__.split("\n\n")[0])
    add_config_args(parser, DEFAULT_CONFIG)
    parser.add_argument(
        "--check", type=int, metavar="NPROC", default=None,
        help="check the config for NPROC processes and the shards, then exit without training",
    )  # fmt: skip
    args = parser.parse_args(argv)
    cfg = config_from_args(TrainConfig, args)
    if args.check is not None:
        sys.exit(check(cfg, args.check))
    info = dist.init()
    code = 1
    try:
        code = Trainer(cfg, info).run()
    except StopRun as e:
        if e.message:
            print(f"error: {e.message}", file=sys.stderr, flush=True)
        code = e.code
    except (ConfigError, ckpt_lib.CheckpointError) as e:
        if info.is_main:
            print(f"error: {e}", file=sys.stderr, flush=True)
        code = 2
    except KeyboardInterrupt:
        code = 130
    except BaseException:  # noqa: BLE001 - report, then leave through dist.shutdown
        traceback.print_exc()
        code = 1
    dist.shutdown(code)


if __name__ == "__main__":
    main()
