"""rcdm.diffusion: schedules, respacing, q / posterior / p moments and the hybrid loss, against closed forms.

Reference values come from Ho et al. 2020 (linear schedule 1e-4..0.02 over T=1000), Nichol & Dhariwal 2021
(cosine schedule, learned-range variance, hybrid loss) and guided-diffusion's respace.py docstrings.
The independent reference tables below are recomputed with numpy in float64.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.distributions import Normal, kl_divergence

from rcdm.config import load_config, preset_path, to_dict
from rcdm.diffusion import (
    DiffusionConfig,
    GaussianDiffusion,
    approx_standard_normal_cdf,
    build_diffusion,
    cosine_alpha_bar,
    discretized_gaussian_log_likelihood,
    linear_betas,
    named_betas,
    normal_kl,
    space_timesteps,
)


def ref_linear_alpha_bar(T: int = 1000) -> np.ndarray:
    """alpha_bar_t = prod_{s<=t} (1 - beta_s), beta = linspace(1e-4, 0.02, T) * 1000/T (Ho et al. 2020)."""
    scale = 1000.0 / T
    return np.cumprod(1.0 - np.linspace(scale * 1e-4, scale * 0.02, T))


class FixedOutput(torch.nn.Module):
    """A "model" that returns a given tensor whatever its input, and records the timesteps it saw."""

    def __init__(self, output: torch.Tensor) -> None:
        super().__init__()
        self.output = torch.nn.Parameter(output.clone())
        self.seen: list[torch.Tensor] = []

    def forward(self, x, t, feat=None):
        self.seen.append(t.clone())
        return self.output


# --- schedules -------------------------------------------------------------------------------------


def test_linear_schedule_values():
    betas = linear_betas(1000)
    assert betas.dtype == torch.float64 and betas.shape == (1000,)
    # Ho et al. 2020 sec. 4: beta_1 = 1e-4, beta_T = 0.02 for T = 1000.
    assert betas[0].item() == pytest.approx(1e-4, rel=1e-12)
    assert betas[-1].item() == pytest.approx(0.02, rel=1e-12)
    # guided-diffusion scales both ends by 1000/T: T=4000 -> 2.5e-5 .. 5e-3.
    b4000 = linear_betas(4000)
    assert (b4000[0].item(), b4000[-1].item()) == pytest.approx((2.5e-5, 5e-3), rel=1e-12)
    with pytest.raises(ValueError, match="beta_T"):
        linear_betas(10)  # beta_T = 0.02 * 100 = 2 > 1


def test_cosine_schedule_matches_alpha_bar_formula():
    T = 1000
    betas = named_betas("cosine", T)
    ab = torch.cumprod(1 - betas, 0).numpy()

    def f(t):  # Nichol & Dhariwal eq. 17, s = 0.008
        return math.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2

    expected = np.array([f(t + 1) / f(0) for t in range(T)])
    # Every beta but the last is below the 0.999 clip, so alpha_bar is exactly f(t+1)/f(0) there.
    np.testing.assert_allclose(ab[:-1], expected[:-1], rtol=1e-10)
    # f(1) = cos(pi/2)^2 = 0 would give beta = 1: clipped to 0.999.
    assert betas[-1].item() == 0.999
    assert cosine_alpha_bar(0.0) == pytest.approx(f(0))


def test_tables_are_float64_and_clipped_log_variance():
    d = GaussianDiffusion()
    assert d.betas.dtype == torch.float64 and d.alphas_cumprod.dtype == torch.float64
    np.testing.assert_allclose(d.alphas_cumprod.numpy(), ref_linear_alpha_bar(), rtol=1e-12)
    assert d.posterior_variance[0].item() == 0.0  # beta_tilde_0 = beta_0 (1 - 1) / (1 - ab_0)
    assert d.posterior_log_variance_clipped[0].item() == math.log(d.posterior_variance[1].item())
    # gathered coefficients are float32
    x = torch.zeros(2, 3, 4, 4)
    mean, var, logvar = d.q_mean_variance(x, torch.tensor([0, 999]))
    assert mean.dtype == var.dtype == logvar.dtype == torch.float32


# --- forward process and posterior -----------------------------------------------------------------


def test_q_sample_exact_with_fixed_noise():
    d = GaussianDiffusion()
    ab = ref_linear_alpha_bar()
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 3, 8, 8, generator=g) * 2 - 1
    noise = torch.randn(4, 3, 8, 8, generator=g)
    t = torch.tensor([0, 1, 500, 999])
    xt = d.q_sample(x0, t, noise)
    a = torch.tensor(ab[t.numpy()], dtype=torch.float64).view(-1, 1, 1, 1)
    expected = a.sqrt() * x0.double() + (1 - a).sqrt() * noise.double()
    torch.testing.assert_close(xt.double(), expected, rtol=1e-6, atol=1e-6)


def test_q_sample_monte_carlo_moments():
    d = GaussianDiffusion()
    torch.manual_seed(1)
    x0 = torch.full((20000, 1, 1, 1), 0.5)
    t = torch.full((20000,), 300)
    xt = d.q_sample(x0, t)
    mean, var, logvar = d.q_mean_variance(x0[:1], t[:1])
    # standard errors for n = 20000: mean sd/141, variance var*sqrt(2/n) = var/100; allow 5 of them
    assert abs(xt.mean().item() - mean.item()) < 5 * math.sqrt(var.item()) / math.sqrt(20000)
    assert abs(xt.var().item() - var.item()) < 5 * var.item() / 100
    assert logvar.item() == pytest.approx(math.log(var.item()), rel=1e-6)
    assert var.item() == pytest.approx(1 - ref_linear_alpha_bar()[300], rel=1e-6)


def test_posterior_is_gaussian_conditioning():
    """q(x_{t-1} | x_t, x0) from the joint Gaussian of (x_{t-1}, x_t) given x0:
    x_{t-1} ~ N(sqrt(ab') x0, 1-ab'), x_t = sqrt(alpha_t) x_{t-1} + sqrt(beta_t) z, so
    mean = sqrt(ab') x0 + c/v (x_t - sqrt(ab) x0), var = (1-ab') - c^2/v, c = sqrt(alpha_t)(1-ab'), v = 1-ab."""
    d = GaussianDiffusion()
    ab = ref_linear_alpha_bar()
    g = torch.Generator().manual_seed(2)
    x0 = torch.rand(3, 2, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    xt = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([1, 250, 999])
    mean, var, logvar = d.q_posterior_mean_variance(x0.float(), xt.float(), t)
    for i, k in enumerate(t.tolist()):
        abp, abt = ab[k - 1], ab[k]
        alpha = abt / abp
        c, v = math.sqrt(alpha) * (1 - abp), 1 - abt
        exp_mean = math.sqrt(abp) * x0[i] + c / v * (xt[i] - math.sqrt(abt) * x0[i])
        exp_var = (1 - abp) - c * c / v
        torch.testing.assert_close(mean[i].double(), exp_mean, rtol=1e-5, atol=1e-5)
        assert var[i].flatten()[0].item() == pytest.approx(exp_var, rel=1e-5)
        assert logvar[i].flatten()[0].item() == pytest.approx(math.log(exp_var), rel=1e-5)


# --- respacing -------------------------------------------------------------------------------------


def test_space_timesteps_strings():
    s100 = space_timesteps(1000, "100")
    # guided-diffusion: "100" -> 0, 10, ..., 989, 999 (stride 999/99 with rounding)
    assert len(s100) == 100 and s100[:3] == [0, 10, 20] and s100[-2:] == [989, 999]
    # "ddim25": the smallest integer stride giving 25 steps is 40 -> 0..960
    assert space_timesteps(1000, "ddim25") == list(range(0, 1000, 40))
    assert space_timesteps(1000, "ddim25")[-1] == 960
    # respace.py docstring example: 300 steps, counts [10, 15, 20] per 100-step section
    s = space_timesteps(300, "10,15,20")
    assert len(s) == 45
    assert [sum(a <= x < a + 100 for x in s) for a in (0, 100, 200)] == [10, 15, 20]
    assert s[0] == 0 and s[9] == 99 and s[10] == 100 and s[-1] == 299
    assert space_timesteps(300, [10, 15, 20]) == s
    with pytest.raises(ValueError, match="no integer stride"):
        space_timesteps(1000, "ddim1")
    with pytest.raises(ValueError, match="cannot keep"):
        space_timesteps(10, "20")
    with pytest.raises(ValueError, match="not understood"):
        space_timesteps(1000, "fast")


def test_respaced_diffusion_keeps_alpha_bar_and_maps_timesteps():
    base = GaussianDiffusion(learn_sigma=False)
    d = GaussianDiffusion(learn_sigma=False, timestep_respacing="ddim25")
    assert d.num_timesteps == 25
    assert d.timestep_map.tolist() == list(range(0, 1000, 40))
    torch.testing.assert_close(d.alphas_cumprod, base.alphas_cumprod[d.timestep_map], rtol=1e-12, atol=0)
    ab = base.alphas_cumprod
    assert d.betas[1].item() == pytest.approx(1 - ab[40].item() / ab[0].item(), rel=1e-12)
    # the model sees original timesteps although callers pass respaced indices
    model = FixedOutput(torch.zeros(2, 3, 4, 4))
    d.p_mean_variance(model, torch.zeros(2, 3, 4, 4), torch.tensor([24, 3]))
    assert model.seen[-1].tolist() == [960, 120]


def test_config_normalises_respacing_and_preset_builds():
    assert DiffusionConfig(timestep_respacing=100).timestep_respacing == "100"
    assert DiffusionConfig(timestep_respacing=(10, 15, 20)).timestep_respacing == "10,15,20"
    with pytest.raises(ValueError, match="learn_sigma"):
        DiffusionConfig(learn_sigma=False, model_var_type="learned_range")
    cfg = load_config(DiffusionConfig, preset_path("diffusion", "default"))
    assert cfg == DiffusionConfig()
    cfg = load_config(DiffusionConfig, data={}, overrides=["timestep_respacing=250"])
    assert cfg.timestep_respacing == "250"
    d = build_diffusion(cfg)
    assert d.num_timesteps == 250 and d.config == cfg and d.model_var_type == "learned_range"
    assert build_diffusion(cfg, respacing="ddim50").num_timesteps == 50
    assert to_dict(d.config)["timestep_respacing"] == "250"


# --- p moments -------------------------------------------------------------------------------------


def test_learned_range_and_fixed_variances():
    d = GaussianDiffusion()
    t = torch.tensor([0, 10, 999])
    x = torch.zeros(3, 1, 2, 2)
    for v, name in ((1.0, "betas"), (-1.0, "posterior_log_variance_clipped")):
        out = d.p_mean_variance(FixedOutput(torch.cat([torch.zeros_like(x), torch.full_like(x, v)], 1)), x, t)
        table = d.betas.log() if name == "betas" else d.posterior_log_variance_clipped
        torch.testing.assert_close(out["log_variance"][:, 0, 0, 0].double(), table[t], rtol=1e-6, atol=0)
    large = GaussianDiffusion(learn_sigma=False)
    assert large.model_var_type == "fixed_large"
    out = large.p_mean_variance(FixedOutput(torch.zeros_like(x)), x, t)
    # ADM: fixed_large uses beta_t, except posterior_variance[1] at t = 0
    expected = torch.stack([large.posterior_variance[1], large.betas[10], large.betas[999]])
    torch.testing.assert_close(out["variance"][:, 0, 0, 0].double(), expected, rtol=1e-6, atol=0)


def test_p_mean_variance_eps_and_xstart_parameterisations_agree():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 4, 4, generator=g)
    eps = torch.randn(2, 3, 4, 4, generator=g)
    t = torch.tensor([5, 700])
    d_eps = GaussianDiffusion(learn_sigma=False)
    d_x0 = GaussianDiffusion(learn_sigma=False, predict_xstart=True)
    out_eps = d_eps.p_mean_variance(FixedOutput(eps), x, t, clip_denoised=False)
    x0 = d_eps.xstart_from_eps(x, t, eps)
    out_x0 = d_x0.p_mean_variance(FixedOutput(x0), x, t, clip_denoised=False)
    for key in ("mean", "pred_xstart", "eps", "log_variance"):
        torch.testing.assert_close(out_eps[key], out_x0[key], rtol=1e-4, atol=1e-4)
    clipped = d_eps.p_mean_variance(FixedOutput(eps), x, t, clip_denoised=True)
    assert clipped["pred_xstart"].abs().max() <= 1.0
    torch.testing.assert_close(clipped["eps"], eps)


def test_model_with_wrong_channel_count_is_refused():
    d = GaussianDiffusion(learn_sigma=True)
    with pytest.raises(ValueError, match="learn_sigma"):
        d.p_mean_variance(FixedOutput(torch.zeros(1, 3, 4, 4)), torch.zeros(1, 3, 4, 4), torch.tensor([3]))


# --- likelihood terms ------------------------------------------------------------------------------


def test_normal_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(4)
    m1, m2 = (
        torch.randn(100, generator=g, dtype=torch.float64),
        torch.randn(100, generator=g, dtype=torch.float64),
    )
    lv1, lv2 = (
        torch.randn(100, generator=g, dtype=torch.float64),
        torch.randn(100, generator=g, dtype=torch.float64),
    )
    expected = kl_divergence(Normal(m1, (0.5 * lv1).exp()), Normal(m2, (0.5 * lv2).exp()))
    torch.testing.assert_close(normal_kl(m1, lv1, m2, lv2), expected, rtol=1e-10, atol=1e-12)


# Largest |approx - Phi| of the tanh approximation over [-6, 6], checked in the test below.
CDF_APPROX_ERROR = 2e-4


def test_approx_cdf_error_bound():
    z = torch.linspace(-6, 6, 20001, dtype=torch.float64)
    assert (approx_standard_normal_cdf(z) - torch.special.ndtr(z)).abs().max() < CDF_APPROX_ERROR


def exact_discretized_log_likelihood(x, means, scales):
    """log P(pixel) with the exact normal CDF: bins [x - 1/255, x + 1/255], open-ended at -1 and +1."""
    phi = torch.special.ndtr
    upper = phi((x - means + 1 / 255) / scales)
    lower = phi((x - means - 1 / 255) / scales)
    p = torch.where(x < -0.999, upper, torch.where(x > 0.999, 1 - lower, upper - lower))
    return p.log()


def test_discretized_gaussian_log_likelihood_vs_exact_cdf():
    g = torch.Generator().manual_seed(5)
    x = torch.randint(0, 256, (4000,), generator=g).double() / 127.5 - 1
    x[:2] = torch.tensor([-1.0, 1.0])  # both open-ended edge bins
    scales = torch.full_like(x, 0.01)
    means = x + 0.01 * torch.randn(4000, generator=g, dtype=torch.float64)  # within a few scales
    approx = discretized_gaussian_log_likelihood(x, means, scales.log())
    exact = exact_discretized_log_likelihood(x, means, scales)
    # each probability is a difference of two CDF values, each off by at most CDF_APPROX_ERROR
    assert (approx.exp() - exact.exp()).abs().max() < 2 * CDF_APPROX_ERROR
    # far outside the bin the 1e-12 clamp applies: log(1e-12)
    far = discretized_gaussian_log_likelihood(torch.zeros(1), torch.ones(1), torch.full((1,), math.log(1e-3)))
    assert far.item() == pytest.approx(math.log(1e-12), rel=1e-6)


def _hybrid_setup(t, seed=6):
    g = torch.Generator().manual_seed(seed)
    n = t.shape[0]
    x0 = torch.randint(0, 256, (n, 3, 4, 4), generator=g).float() / 127.5 - 1
    noise = torch.randn(n, 3, 4, 4, generator=g)
    eps_pred = noise + 0.5 * torch.randn(n, 3, 4, 4, generator=g)
    v = torch.rand(n, 3, 4, 4, generator=g) * 2 - 1
    return x0, noise, eps_pred, v


def test_vb_term_matches_direct_gaussian_kl():
    d = GaussianDiffusion()
    ab = torch.tensor(ref_linear_alpha_bar(), dtype=torch.float64)
    t = torch.tensor([1, 10, 500, 999])
    x0, noise, eps_pred, v = _hybrid_setup(t)
    model = FixedOutput(torch.cat([eps_pred, v], 1))
    vb = d.training_losses(model, x0, t, noise=noise)["vb"]
    x0d, nd, ed, vd = (a.double() for a in (x0, noise, eps_pred, v))
    for i, k in enumerate(t.tolist()):
        abt, abp = ab[k], ab[k - 1]
        beta = 1 - abt / abp
        xt = abt.sqrt() * x0d[i] + (1 - abt).sqrt() * nd[i]
        x0_hat = (xt - (1 - abt).sqrt() * ed[i]) / abt.sqrt()  # no clipping in the loss

        def post_mean(x_start, abt=abt, abp=abp, beta=beta, xt=xt):
            return (beta * abp.sqrt() * x_start + (1 - abp) * (1 - beta).sqrt() * xt) / (1 - abt)

        post_var = beta * (1 - abp) / (1 - abt)
        frac = (vd[i] + 1) / 2
        model_logvar = frac * beta.log() + (1 - frac) * post_var.log()
        kl = kl_divergence(
            Normal(post_mean(x0d[i]), post_var.sqrt()), Normal(post_mean(x0_hat), (0.5 * model_logvar).exp())
        )
        assert vb[i].item() == pytest.approx(kl.mean().item() / math.log(2), rel=1e-3, abs=1e-6)
    assert (vb >= 0).all()


def test_vb_at_t0_is_decoder_nll():
    d = GaussianDiffusion()
    t = torch.zeros(4, dtype=torch.long)
    x0, noise, eps_pred, v = _hybrid_setup(t, seed=7)
    eps_pred = noise + 0.3 * (eps_pred - noise)  # x0_hat within ~1 decoder scale of x0
    vb = d.training_losses(FixedOutput(torch.cat([eps_pred, v], 1)), x0, t, noise=noise)["vb"]
    ab0 = ref_linear_alpha_bar()[0]
    xt = math.sqrt(ab0) * x0.double() + math.sqrt(1 - ab0) * noise.double()
    x0_hat = (xt - math.sqrt(1 - ab0) * eps_pred.double()) / math.sqrt(ab0)  # posterior mean at t=0 is x0_hat
    frac = (v.double() + 1) / 2
    logvar = frac * math.log(1 - ab0) + (1 - frac) * d.posterior_log_variance_clipped[0].item()
    exact = -exact_discretized_log_likelihood(x0.double(), x0_hat, (0.5 * logvar).exp())
    exact_bits = exact.mean(dim=(1, 2, 3)) / math.log(2)
    # the tanh-CDF approximation costs 3e-4 bits/dim here (measured); a wrong variance or bin edge costs > 0.01
    torch.testing.assert_close(vb.double(), exact_bits, rtol=0, atol=2e-3)


def test_training_losses_shapes_mse_and_gradient_routing():
    d = GaussianDiffusion()
    t = torch.tensor([0, 3, 400, 999])
    x0, noise, eps_pred, v = _hybrid_setup(t, seed=8)
    model = FixedOutput(torch.cat([eps_pred, v], 1))
    out = d.training_losses(model, x0, t, noise=noise)
    assert set(out) == {"loss", "mse", "vb"} and all(o.shape == (4,) for o in out.values())
    torch.testing.assert_close(out["mse"], ((eps_pred - noise) ** 2).mean(dim=(1, 2, 3)))
    torch.testing.assert_close(out["loss"], out["mse"] + out["vb"])
    (g_vb,) = torch.autograd.grad(out["vb"].sum(), model.output, retain_graph=True)
    assert (g_vb[:, :3] == 0).all() and (g_vb[:, 3:] != 0).any()  # vb trains only the variance channels
    (g_mse,) = torch.autograd.grad(out["mse"].sum(), model.output)
    assert (g_mse[:, 3:] == 0).all() and (g_mse[:, :3] != 0).any()


def test_loss_variants():
    t = torch.tensor([2, 50])
    x0, noise, eps_pred, v = _hybrid_setup(t, seed=9)
    plain = GaussianDiffusion(steps=100).training_losses(
        FixedOutput(torch.cat([eps_pred, v], 1)), x0, t, noise=noise
    )
    rescaled = GaussianDiffusion(steps=100, rescale_learned_sigmas=True)
    out = rescaled.training_losses(FixedOutput(torch.cat([eps_pred, v], 1)), x0, t, noise=noise)
    torch.testing.assert_close(out["vb"], plain["vb"] * 100 / 1000)  # num_timesteps / 1000
    kl = GaussianDiffusion(steps=100, use_kl=True)
    out = kl.training_losses(FixedOutput(torch.cat([eps_pred, v], 1)), x0, t, noise=noise)
    torch.testing.assert_close(out["vb"], plain["vb"])
    torch.testing.assert_close(out["loss"], plain["vb"] * 100)  # the rescaled bound: vb * num_timesteps
    fixed = GaussianDiffusion(steps=100, learn_sigma=False)
    model = FixedOutput(eps_pred)
    out = fixed.training_losses(model, x0, t, noise=noise)
    torch.testing.assert_close(out["loss"], out["mse"])
    assert not out["vb"].requires_grad and (out["vb"] >= 0).all()


def test_calc_bpd_loop_sums_terms_and_prior():
    d = GaussianDiffusion(learn_sigma=False, timestep_respacing="10")
    x0 = torch.tensor([-1.0, 0.0, 0.5, 1.0]).view(1, 1, 2, 2)
    model = FixedOutput(torch.zeros(1, 1, 2, 2))
    out = d.calc_bpd_loop(model, x0, generator=torch.Generator().manual_seed(0))
    assert out["vb"].shape == (1, 10) and out["mse"].shape == (1, 10)
    torch.testing.assert_close(out["total_bpd"], out["vb"].sum(1) + out["prior_bpd"])
    # KL(N(sqrt(ab) x0, 1-ab) || N(0, 1)) = 0.5 (-1 - log(1-ab) + (1-ab) + ab x0^2), ab = alpha_bar[999]
    ab = ref_linear_alpha_bar()[-1]
    prior = 0.5 * (-1 - math.log(1 - ab) + (1 - ab) + ab * (x0.double() ** 2)).mean() / math.log(2)
    assert out["prior_bpd"].item() == pytest.approx(prior.item(), rel=1e-3)


def test_min_snr_weight_closed_form():
    """Hang et al. 2023: the x0-error weight is min(SNR_t, gamma), SNR_t = alpha_bar / (1 - alpha_bar)."""
    d = GaussianDiffusion(steps=1000, noise_schedule="cosine", min_snr_gamma=5.0)
    t = torch.arange(1000)
    ab = np.cumprod(1.0 - named_betas("cosine", 1000).numpy())
    snr = ab / (1.0 - ab)
    w = d.mse_weight(t).double().numpy()
    np.testing.assert_allclose(w, np.minimum(snr, 5.0) / snr, rtol=1e-5)  # eps target
    assert (w[snr <= 5.0] == 1.0).all() and (w[snr > 5.0] < 1.0).all() and w[0] < 1e-3
    x0_target = GaussianDiffusion(steps=1000, noise_schedule="cosine", predict_xstart=True, min_snr_gamma=5.0)
    np.testing.assert_allclose(x0_target.mse_weight(t).double().numpy(), np.minimum(snr, 5.0), rtol=1e-5)
    assert torch.equal(GaussianDiffusion().mse_weight(t), torch.ones(1000))


def test_min_snr_weights_only_the_mse_term():
    t = torch.tensor([0, 3, 400, 999])
    x0, noise, eps_pred, v = _hybrid_setup(t, seed=10)
    plain = GaussianDiffusion().training_losses(FixedOutput(torch.cat([eps_pred, v], 1)), x0, t, noise=noise)
    d = GaussianDiffusion(min_snr_gamma=5.0)
    out = d.training_losses(FixedOutput(torch.cat([eps_pred, v], 1)), x0, t, noise=noise)
    torch.testing.assert_close(out["mse"], plain["mse"] * d.mse_weight(t))
    torch.testing.assert_close(out["vb"], plain["vb"])
    torch.testing.assert_close(out["loss"], out["mse"] + out["vb"])
    with pytest.raises(ValueError, match="min_snr_gamma must be > 0"):
        DiffusionConfig(min_snr_gamma=0.0)
    with pytest.raises(ValueError, match="use_kl"):
        DiffusionConfig(min_snr_gamma=5.0, use_kl=True)
