"""CUDA checks of the model, the loss and the samplers (marked gpu: `pytest -m gpu tests/test_gpu.py`).

They hold the CUDA path to the CPU path that the rest of the suite tests: same weights, same inputs,
outputs within the tolerance of the arithmetic that differs (cuDNN convolutions in TF32 by default,
bf16 autocast), and per-sample seeds that do not depend on what else is in the batch.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rcdm import metrics
from rcdm.config import load_config
from rcdm.diffusion import DiffusionConfig, build_diffusion
from rcdm.samplers import sample, sample_seed
from rcdm.unet import UNet, UNetConfig
from tests.test_unet import SMALL, inputs, randomized

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

REPO = Path(__file__).resolve().parent.parent
CUDA = torch.device("cuda")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def pair(**changes) -> tuple[UNet, UNet]:
    """The same randomised SMALL UNet on the CPU and on CUDA, in eval mode."""
    cpu = randomized(UNet(SMALL.replace(**changes))).eval()
    gpu = UNet(cpu.cfg).to(CUDA).eval()
    gpu.load_state_dict(cpu.state_dict())
    return cpu, gpu


@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_cuda_forward_matches_cpu(backend):
    cpu, gpu = pair(attention_backend=backend)
    x, t, feat = inputs()
    with torch.no_grad():
        ref = cpu(x, t, feat)
        out = gpu(x.to(CUDA), t.to(CUDA), feat.to(CUDA)).cpu()
    # TF32 convolutions keep 10 mantissa bits (unit roundoff ~5e-4): well under 1% after the network
    assert rel(out, ref) < 1e-2


def test_cuda_bf16_autocast_is_close_to_fp32():
    _, gpu = pair()
    x, t, feat = (v.to(CUDA) for v in inputs())
    with torch.no_grad():
        ref = gpu(x, t, feat)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = gpu(x, t, feat)
    assert out.dtype == torch.float32
    assert 0 < rel(out, ref) < 0.05  # bf16: unit roundoff 2^-8, a few % after ~20 layers (as on the CPU)


def test_cuda_training_loss_and_gradients_match_cpu():
    diffusion = build_diffusion(DiffusionConfig(learn_sigma=True, min_snr_gamma=5.0))
    cpu, gpu = pair(learn_sigma=True)
    cpu.train(), gpu.train()
    x, t, feat = inputs(n=4)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    losses = []
    for model, dev in ((cpu, "cpu"), (gpu, CUDA)):
        out = diffusion.training_losses(model, x.to(dev), t.to(dev), feat.to(dev), noise=noise.to(dev))
        out["loss"].mean().backward()
        losses.append(out["loss"].detach().cpu())
    assert rel(losses[1], losses[0]) < 1e-2
    g_cpu = torch.cat([p.grad.flatten() for p in cpu.parameters()])
    g_gpu = torch.cat([p.grad.flatten() for p in gpu.parameters()]).cpu()
    assert rel(g_gpu, g_cpu) < 2e-2


@pytest.mark.parametrize("sampler,eta", [("ddim", 1.0), ("dpm++", 0.0)])
def test_cuda_sample_depends_only_on_its_seed(sampler, eta):
    # A sample's seed fixes it whatever else shares its batch (the contract batch sampling relies on).
    _, gpu = pair()
    diffusion = build_diffusion(DiffusionConfig())
    _, _, feat = inputs(n=3)
    seeds = [sample_seed(7, i, 0) for i in range(3)]
    kw = dict(sampler=sampler, steps=10, eta=eta)
    with torch.no_grad():
        batch = sample(gpu, diffusion, (3, 3, 32, 32), feat.to(CUDA), seeds=seeds, **kw)
        alone = sample(gpu, diffusion, (1, 3, 32, 32), feat[1:2].to(CUDA), seeds=seeds[1:2], **kw)
        again = sample(gpu, diffusion, (3, 3, 32, 32), feat.to(CUDA), seeds=seeds, **kw)
    assert batch.device.type == "cuda" and batch.shape == (3, 3, 32, 32)
    assert batch.abs().max() <= 1.0 + 1e-6
    torch.testing.assert_close(again, batch)  # repeatable
    # Batch-independent up to arithmetic: cuDNN picks its convolution algorithm per batch size, and
    # the rounding differences grow over the steps (measured on an H200 with TF32: 1% of pixels off
    # by more than 5e-3, the worst by 0.028, about 4/255)
    diff = (alone[0] - batch[1]).abs()
    assert diff.mean() < 1e-3 and diff.max() < 0.05, (diff.mean(), diff.max())
    assert (batch[0] - batch[2]).abs().mean() > 0.05  # and different seeds give different samples


def test_rcdm128_preset_runs_on_cuda_in_bf16():
    # The released checkpoints' architecture at its size: forward + backward under autocast.
    cfg = load_config(UNetConfig, REPO / "configs" / "model" / "rcdm128.yaml")
    model = UNet(cfg).to(CUDA).to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 128, 128, device=CUDA).contiguous(memory_format=torch.channels_last)
    t = torch.tensor([10, 900], device=CUDA)
    feat = torch.randn(2, cfg.feature_dim, device=CUDA)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(x, t, feat)
    assert out.shape == (2, 6, 128, 128) and out.dtype == torch.float32
    out.float().square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert len(grads) == len(list(model.parameters()))
    assert all(torch.isfinite(g).all() for g in grads)


def test_precision_recall_on_cuda_matches_the_cpu():
    # float32 distances on the GPU against float64 on the CPU: same verdicts away from ties
    g = torch.Generator().manual_seed(0)
    real, fake = torch.randn(3000, 64, generator=g), 1.1 * torch.randn(2000, 64, generator=g) + 0.2
    cpu = metrics.precision_recall(real, fake)
    gpu = metrics.precision_recall(real, fake, device="cuda")
    assert 0.05 < cpu[0] < 0.99 and 0.05 < cpu[1] < 0.99  # a case that is neither trivial nor empty
    assert gpu == pytest.approx(cpu, abs=2e-3)  # at most a few points on a sphere's surface may flip
