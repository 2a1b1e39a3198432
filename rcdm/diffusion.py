"""Gaussian diffusion with guided-diffusion (ADM) semantics: schedules, q, p, hybrid loss, likelihood.

Notation (Ho et al. 2020; Nichol & Dhariwal 2021):

* forward process  q(x_t | x_0) = N(sqrt(alpha_bar_t) x0, (1 - alpha_bar_t) I),
  alpha_bar_t = prod_{s<=t} (1 - beta_s), t = 0..T-1 (index 0 is the first noising step);
* the network predicts eps (or x0 with ``predict_xstart``) and, with ``learn_sigma``, a second block of
  channels v in [-1, 1] that interpolates the reverse-process log variance between the posterior
  variance beta_tilde_t and beta_t ("learned range");
* the reverse step p(x_{t-1} | x_t) = N(mu_tilde(x0_hat, x_t), Sigma) uses the posterior mean of
  q(x_{t-1} | x_t, x0) evaluated at the predicted x0_hat.

All coefficient tables are float64 and are cast to float32 when gathered for a batch of timesteps.

A diffusion built with ``timestep_respacing`` keeps a subset of the original T steps (``timestep_map``
lists them). Callers always pass respaced indices 0..num_timesteps-1; the model is always called with
the ORIGINAL timestep index ``timestep_map[t]``, which this object does itself (``model_output``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Literal, Optional, Union

import torch
from torch import Tensor

NoiseSchedule = Literal["linear", "cosine"]
ModelVarType = Literal["learned_range", "fixed_large", "fixed_small"]
Model = Callable[..., Tensor]

# --- noise schedules (pure functions, float64) ------------------------------------------------------


def linear_betas(num_timesteps: int) -> Tensor:
    """Ho et al.'s linear schedule stretched to any T: beta = linspace(s*1e-4, s*0.02, T), s = 1000/T."""
    scale = 1000.0 / num_timesteps
    betas = torch.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=torch.float64)
    if betas[-1] > 1:
        raise ValueError(
            f"the linear schedule with {num_timesteps} steps has beta_T = {float(betas[-1]):.3f} > 1: "
            "use at least 20 steps or the cosine schedule"
        )
    return betas


def cosine_alpha_bar(t: float) -> float:
    """Nichol & Dhariwal eq. 17 with s = 0.008: alpha_bar(t) = cos^2((t + s) / (1 + s) * pi / 2), t in [0, 1]."""
    return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2


def betas_for_alpha_bar(
    num_timesteps: int, alpha_bar: Callable[[float], float], max_beta: float = 0.999
) -> Tensor:
    """beta_i = min(1 - alpha_bar((i+1)/T) / alpha_bar(i/T), max_beta): discretises a continuous alpha_bar."""
    betas = [
        min(1.0 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), max_beta)
        for i in range(num_timesteps)
    ]
    return torch.tensor(betas, dtype=torch.float64)


def named_betas(name: str, num_timesteps: int) -> Tensor:
    """The (T,) float64 betas of schedule ``name`` ("linear" or "cosine")."""
    if name == "linear":
        return linear_betas(num_timesteps)
    if name == "cosine":
        return betas_for_alpha_bar(num_timesteps, cosine_alpha_bar)
    raise ValueError(f"unknown noise_schedule '{name}': use 'linear' or 'cosine'")


# --- timestep respacing -----------------------------------------------------------------------------


def space_timesteps(num_timesteps: int, section_counts: str | Sequence[int]) -> list[int]:
    """The sorted original timesteps kept by a respacing spec (guided-diffusion's ``space_timesteps``).

    * ``"ddimN"``: ``range(0, T, stride)`` with the smallest integer stride giving exactly N steps
      (``"ddim25"`` for T=1000: stride 40, 0..960);
    * ``"a,b,c"`` or ``[a, b, c]``: the T steps are cut into len(counts) near-equal sections and
      section i keeps counts[i] steps evenly spaced with rounding, ends included
      (``"100"`` for T=1000: 0, 10, 20, ..., 989, 999).
    """
    if isinstance(section_counts, str):
        spec = section_counts.strip()
        if spec.startswith("ddim"):
            desired = int(spec[len("ddim") :])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return list(range(0, num_timesteps, stride))
            raise ValueError(
                f"respacing '{spec}': no integer stride gives exactly {desired} of {num_timesteps} steps; "
                "pick another count or use the plain form (e.g. '50')"
            )
        try:
            counts = [int(c) for c in spec.split(",")]
        except ValueError:
            raise ValueError(
                f"respacing '{section_counts}' is not understood: use '' (all steps), 'N', 'ddimN' or 'a,b,c'"
            ) from None
    else:
        counts = [int(c) for c in section_counts]
    size_per, extra = divmod(num_timesteps, len(counts))
    start, steps = 0, []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if not 1 <= count <= size:
            raise ValueError(
                f"respacing {section_counts!r}: section {i} has {size} steps and cannot keep {count} of them"
            )
        stride = 1.0 if count <= 1 else (size - 1) / (count - 1)
        steps += [start + round(j * stride) for j in range(count)]
        start += size
    return sorted(set(steps))


def respaced_betas(alphas_cumprod: Tensor, use_timesteps: Sequence[int]) -> Tensor:
    """beta'_i = 1 - alpha_bar[t_i] / alpha_bar[t_{i-1}] (alpha_bar[t_{-1}] = 1): same alpha_bar at kept steps."""
    kept = alphas_cumprod[torch.as_tensor(list(use_timesteps), dtype=torch.long)]
    prev = torch.cat([torch.ones(1, dtype=kept.dtype), kept[:-1]])
    return 1.0 - kept / prev


# --- likelihood helpers -----------------------------------------------------------------------------


def mean_flat(x: Tensor) -> Tensor:
    """Mean over every dimension but the first: (N, ...) -> (N,)."""
    return x.mean(dim=tuple(range(1, x.ndim)))


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats (broadcasting).

    KL = 0.5 * (-1 + logvar2 - logvar1 + e^(logvar1 - logvar2) + (mean1 - mean2)^2 e^-logvar2)
    """
    ref = next(v for v in (mean1, logvar1, mean2, logvar2) if isinstance(v, Tensor))
    logvar1, logvar2 = (v if isinstance(v, Tensor) else torch.tensor(v).to(ref) for v in (logvar1, logvar2))
    return 0.5 * (
        -1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
    )


def approx_standard_normal_cdf(x: Tensor) -> Tensor:
    """Phi(x) ~= 0.5 * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3))) (the approximation ADM uses)."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x: Tensor, means: Tensor, log_scales: Tensor) -> Tensor:
    """log P(x) in nats, elementwise, for x = uint8 pixels scaled to [-1, 1] under N(means, e^(2 log_scales)).

    Each pixel value owns the bin [x - 1/255, x + 1/255]; the edge bins extend to -inf (x < -0.999) and
    +inf (x > 0.999). Probabilities are clamped at 1e-12 before the log.
    """
    if not x.shape == means.shape == log_scales.shape:
        raise ValueError(
            f"shapes differ: x {tuple(x.shape)}, means {tuple(means.shape)}, log_scales {tuple(log_scales.shape)}"
        )
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


# --- configuration ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class DiffusionConfig:
    """The diffusion process; field names are guided-diffusion's flags.

    ``timestep_respacing`` is '' (all steps), 'N', 'ddimN' or 'a,b,c'; an integer or a list of section
    counts is accepted too and normalised to that string. ``model_var_type`` None means guided-diffusion's
    choice: 'learned_range' with ``learn_sigma``, else 'fixed_large'.
    """

    steps: int = 1000
    noise_schedule: NoiseSchedule = "linear"
    learn_sigma: bool = True
    timestep_respacing: Union[str, int, tuple[int, ...]] = ""
    rescale_learned_sigmas: bool = False
    use_kl: bool = False
    predict_xstart: bool = False
    model_var_type: Optional[ModelVarType] = None
    min_snr_gamma: Optional[float] = None

    def __post_init__(self) -> None:
        spacing = self.timestep_respacing
        if isinstance(spacing, int):
            spacing = str(spacing)
        elif not isinstance(spacing, str):
            spacing = ",".join(str(int(c)) for c in spacing)
        object.__setattr__(self, "timestep_respacing", spacing.strip())
        if self.steps < 2:
            raise ValueError(f"steps must be at least 2, got {self.steps}")
        if self.noise_schedule not in ("linear", "cosine"):
            raise ValueError(f"noise_schedule must be 'linear' or 'cosine', got {self.noise_schedule!r}")
        if self.model_var_type not in (None, "learned_range", "fixed_large", "fixed_small"):
            raise ValueError(
                f"model_var_type must be 'learned_range', 'fixed_large', 'fixed_small' or null, "
                f"got {self.model_var_type!r}"
            )
        if self.min_snr_gamma is not None and not self.min_snr_gamma > 0:
            raise ValueError(f"min_snr_gamma must be > 0 or null (uniform weights), got {self.min_snr_gamma}")
        if self.min_snr_gamma is not None and self.use_kl:
            raise ValueError("min_snr_gamma weights the mse term, which use_kl=true does not train: set one")
        if self.model_var_type == "learned_range" and not self.learn_sigma:
            raise ValueError(
                "model_var_type 'learned_range' needs the variance channels: set learn_sigma=true"
            )


def build_diffusion(
    cfg: DiffusionConfig, respacing: str | int | Sequence[int] | None = None
) -> GaussianDiffusion:
    """The diffusion of ``cfg``; ``respacing`` (e.g. '100', 'ddim25') replaces cfg.timestep_respacing."""
    kwargs = {f.name: getattr(cfg, f.name) for f in fields(cfg)}
    if respacing is not None:
        kwargs["timestep_respacing"] = respacing
    return GaussianDiffusion(**kwargs)


# --- the diffusion object ---------------------------------------------------------------------------


class GaussianDiffusion:
    """Training losses and reverse-process moments for an eps- (or x0-) predicting network.

    The model is an argument of every method (``model(x, t, feat=None) -> (N, C or 2C, H, W)``), never
    held, so one diffusion object serves any number of models. Not an nn.Module: it holds no weights.
    """

    def __init__(
        self,
        steps: int = 1000,
        noise_schedule: NoiseSchedule = "linear",
        learn_sigma: bool = True,
        timestep_respacing: str | int | Sequence[int] = "",
        model_var_type: Optional[ModelVarType] = None,
        rescale_learned_sigmas: bool = False,
        use_kl: bool = False,
        predict_xstart: bool = False,
        min_snr_gamma: Optional[float] = None,
    ) -> None:
        self.config = DiffusionConfig(
            steps=steps,
            noise_schedule=noise_schedule,
            learn_sigma=learn_sigma,
            timestep_respacing=timestep_respacing,
            rescale_learned_sigmas=rescale_learned_sigmas,
            use_kl=use_kl,
            predict_xstart=predict_xstart,
            model_var_type=model_var_type,
            min_snr_gamma=min_snr_gamma,
        )
        cfg = self.config
        self.original_num_steps = steps
        self.learn_sigma = learn_sigma
        self.model_var_type: ModelVarType = cfg.model_var_type or (
            "learned_range" if learn_sigma else "fixed_large"
        )
        self.predict_xstart = predict_xstart
        self.rescale_learned_sigmas = rescale_learned_sigmas
        self.use_kl = use_kl
        self.min_snr_gamma = min_snr_gamma

        base_betas = named_betas(noise_schedule, steps)  # (T,) float64
        if cfg.timestep_respacing:
            use = space_timesteps(steps, cfg.timestep_respacing)
            betas = respaced_betas(torch.cumprod(1.0 - base_betas, 0), use)
        else:
            use, betas = list(range(steps)), base_betas
        if len(use) < 2:
            raise ValueError(
                f"respacing '{cfg.timestep_respacing}' keeps {len(use)} step; sampling needs at least 2"
            )
        self.timestep_map = torch.tensor(use, dtype=torch.long)  # (T',) original index of each kept step
        self.num_timesteps = len(use)

        alphas = 1.0 - betas
        ab = torch.cumprod(alphas, 0)
        ab_prev = torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
        # q(x_{t-1} | x_t, x0) = N(coef1 x0 + coef2 x_t, beta_tilde_t), beta_tilde_t = beta_t (1-ab_prev)/(1-ab)
        posterior_variance = betas * (1.0 - ab_prev) / (1.0 - ab)
        # beta_tilde_0 = 0: its log is clipped to log(beta_tilde_1), as in ADM.
        posterior_log_variance_clipped = torch.log(
            torch.cat([posterior_variance[1:2], posterior_variance[1:]])
        )
        fixed_large_variance = torch.cat([posterior_variance[1:2], betas[1:]])
        self.betas = betas
        self.alphas_cumprod = ab
        self.alphas_cumprod_prev = ab_prev
        self.posterior_variance = posterior_variance
        self.posterior_log_variance_clipped = posterior_log_variance_clipped
        self._tables: dict[str, Tensor] = {
            "betas": betas,
            "log_betas": torch.log(betas),
            "alphas_cumprod": ab,
            "alphas_cumprod_prev": ab_prev,
            "sqrt_alphas_cumprod": ab.sqrt(),
            "one_minus_alphas_cumprod": 1.0 - ab,
            "sqrt_one_minus_alphas_cumprod": (1.0 - ab).sqrt(),
            "log_one_minus_alphas_cumprod": torch.log(1.0 - ab),
            "sqrt_recip_alphas_cumprod": (1.0 / ab).sqrt(),
            "sqrt_recipm1_alphas_cumprod": (1.0 / ab - 1.0).sqrt(),
            "posterior_variance": posterior_variance,
            "posterior_log_variance_clipped": posterior_log_variance_clipped,
            "posterior_mean_coef1": betas * ab_prev.sqrt() / (1.0 - ab),
            "posterior_mean_coef2": (1.0 - ab_prev) * alphas.sqrt() / (1.0 - ab),
            "fixed_large_variance": fixed_large_variance,
            "fixed_large_log_variance": torch.log(fixed_large_variance),
            "snr": ab / (1.0 - ab),
        }
        self._device_tables: dict[torch.device, dict[str, Tensor]] = {}

    def __repr__(self) -> str:
        return (
            f"GaussianDiffusion(steps={self.original_num_steps}, schedule={self.config.noise_schedule!r}, "
            f"num_timesteps={self.num_timesteps}, respacing={self.config.timestep_respacing!r}, "
            f"var={self.model_var_type!r}, predict_xstart={self.predict_xstart})"
        )

    # --- table lookup ---

    def extract(self, name: str, t: Tensor, ndim: int) -> Tensor:
        """Coefficient table ``name`` (float64) at timesteps t (N,), as float32 shaped (N, 1, ..., 1) to
        broadcast against an ndim-dimensional batch. Names: betas, log_betas, alphas_cumprod,
        alphas_cumprod_prev, (sqrt_)one_minus_alphas_cumprod, sqrt_alphas_cumprod, log_one_minus_alphas_cumprod,
        sqrt_recip(m1)_alphas_cumprod, posterior_variance, posterior_log_variance_clipped,
        posterior_mean_coef1/2, fixed_large_(log_)variance, snr (= alphas_cumprod / (1 - alphas_cumprod))."""
        if name not in self._tables:
            raise KeyError(f"no coefficient table '{name}'; known: {sorted(self._tables)}")
        tables = self._device_tables.get(t.device)
        if tables is None:
            dtype = torch.float32 if t.device.type == "mps" else torch.float64  # mps has no float64
            tables = {k: v.to(device=t.device, dtype=dtype) for k, v in self._tables.items()}
            self._device_tables[t.device] = tables
        return tables[name][t].float().view(-1, *([1] * (ndim - 1)))

    def original_timesteps(self, t: Tensor) -> Tensor:
        """The original step indices (0..steps-1) of respaced indices ``t``: (N,) long."""
        return self.timestep_map.to(t.device)[t]

    # --- forward process ---

    def q_mean_variance(self, x0: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q(x_t | x0): mean sqrt(alpha_bar_t) x0, variance 1 - alpha_bar_t, and its log."""
        mean = self.extract("sqrt_alphas_cumprod", t, x0.ndim) * x0
        variance = self.extract("one_minus_alphas_cumprod", t, x0.ndim).expand_as(x0)
        log_variance = self.extract("log_one_minus_alphas_cumprod", t, x0.ndim).expand_as(x0)
        return mean, variance, log_variance

    def q_sample(self, x0: Tensor, t: Tensor, noise: Optional[Tensor] = None) -> Tensor:
        """x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps, eps ~ N(0, I) (or ``noise``)."""
        if noise is None:
            noise = torch.randn_like(x0)
        if noise.shape != x0.shape:
            raise ValueError(f"noise has shape {tuple(noise.shape)} but x0 has {tuple(x0.shape)}")
        return (
            self.extract("sqrt_alphas_cumprod", t, x0.ndim) * x0
            + self.extract("sqrt_one_minus_alphas_cumprod", t, x0.ndim) * noise
        )

    def q_posterior_mean_variance(self, x0: Tensor, xt: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q(x_{t-1} | x_t, x0) = N(coef1_t x0 + coef2_t x_t, beta_tilde_t): (mean, variance, clipped log variance).

        coef1 = beta_t sqrt(alpha_bar_{t-1}) / (1 - alpha_bar_t),
        coef2 = (1 - alpha_bar_{t-1}) sqrt(alpha_t) / (1 - alpha_bar_t)   (Ho et al. eq. 7).
        """
        if x0.shape != xt.shape:
            raise ValueError(f"x0 {tuple(x0.shape)} and x_t {tuple(xt.shape)} must have the same shape")
        mean = (
            self.extract("posterior_mean_coef1", t, xt.ndim) * x0
            + self.extract("posterior_mean_coef2", t, xt.ndim) * xt
        )
        variance = self.extract("posterior_variance", t, xt.ndim).expand_as(xt)
        log_variance = self.extract("posterior_log_variance_clipped", t, xt.ndim).expand_as(xt)
        return mean, variance, log_variance

    # --- eps <-> x0 ---

    def xstart_from_eps(self, xt: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """x0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)."""
        return (
            self.extract("sqrt_recip_alphas_cumprod", t, xt.ndim) * xt
            - self.extract("sqrt_recipm1_alphas_cumprod", t, xt.ndim) * eps
        )

    def eps_from_xstart(self, xt: Tensor, t: Tensor, x0: Tensor) -> Tensor:
        """eps = (x_t / sqrt(alpha_bar_t) - x0) / sqrt(1 / alpha_bar_t - 1)."""
        return (self.extract("sqrt_recip_alphas_cumprod", t, xt.ndim) * xt - x0) / self.extract(
            "sqrt_recipm1_alphas_cumprod", t, xt.ndim
        )

    # --- the model ---

    def model_output(
        self,
        model: Model,
        x: Tensor,
        t: Tensor,
        feat: Optional[Tensor] = None,
        model_kwargs: Optional[dict] = None,
    ) -> Tensor:
        """model(x, timestep_map[t], feat=feat): (N, 2C, H, W) with learn_sigma, else (N, C, H, W)."""
        if t.shape != (x.shape[0],):
            raise ValueError(
                f"t must have shape ({x.shape[0]},) (one timestep per sample), got {tuple(t.shape)}"
            )
        kwargs = dict(model_kwargs or {})
        if feat is not None:
            kwargs["feat"] = feat
        out = model(x, self.original_timesteps(t), **kwargs)
        want = x.shape[1] * (2 if self.learn_sigma else 1)
        if out.shape != (x.shape[0], want, *x.shape[2:]):
            raise ValueError(
                f"the model returned shape {tuple(out.shape)} but this diffusion (learn_sigma={self.learn_sigma}) "
                f"expects {(x.shape[0], want, *x.shape[2:])}: build the diffusion with learn_sigma matching the model"
            )
        return out

    def split_output(self, output: Tensor, x: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        """(eps-or-x0 channels, variance channels v or None) of a model output for input x."""
        if self.learn_sigma:
            return output[:, : x.shape[1]], output[:, x.shape[1] :]
        return output, None

    def eps_from_output(self, output: Tensor, x: Tensor, t: Tensor) -> Tensor:
        """The model's eps prediction (converted from x0 with ``predict_xstart``), variance channels dropped."""
        mean_part, _ = self.split_output(output, x)
        return self.eps_from_xstart(x, t, mean_part) if self.predict_xstart else mean_part

    def p_mean_variance_from_output(
        self, output: Tensor, x: Tensor, t: Tensor, clip_denoised: bool = True
    ) -> dict[str, Tensor]:
        """Moments of p(x_{t-1} | x_t) from a model output; see ``p_mean_variance``."""
        mean_part, v = self.split_output(output, x)
        if self.model_var_type == "learned_range":
            # log Sigma = f log beta_t + (1 - f) log beta_tilde_t, f = (v + 1) / 2 (Nichol & Dhariwal eq. 15)
            frac = (v + 1.0) / 2.0
            max_log = self.extract("log_betas", t, x.ndim)
            min_log = self.extract("posterior_log_variance_clipped", t, x.ndim)
            log_variance = frac * max_log + (1.0 - frac) * min_log
        elif self.model_var_type == "fixed_large":
            log_variance = self.extract("fixed_large_log_variance", t, x.ndim).expand_as(x)
        else:
            log_variance = self.extract("posterior_log_variance_clipped", t, x.ndim).expand_as(x)
        if self.predict_xstart:
            x0_raw, eps = mean_part, self.eps_from_xstart(x, t, mean_part)
        else:
            x0_raw, eps = self.xstart_from_eps(x, t, mean_part), mean_part
        pred_xstart = x0_raw.clamp(-1.0, 1.0) if clip_denoised else x0_raw
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
        if self.model_var_type == "fixed_small":
            variance = self.extract("posterior_variance", t, x.ndim).expand_as(x)
        else:
            variance = torch.exp(log_variance)
        return {
            "mean": mean,
            "variance": variance,
            "log_variance": log_variance,
            "pred_xstart": pred_xstart,
            "eps": eps,
        }

    def p_mean_variance(
        self,
        model: Model,
        x: Tensor,
        t: Tensor,
        feat: Optional[Tensor] = None,
        clip_denoised: bool = True,
        model_kwargs: Optional[dict] = None,
    ) -> dict[str, Tensor]:
        """p(x_{t-1} | x_t) = N(mean, variance) and the model's predictions.

        Returns a dict of (N, C, H, W) tensors: ``mean`` = mu_tilde(x0_hat, x_t), ``variance``,
        ``log_variance``, ``pred_xstart`` = x0_hat (clipped to [-1, 1] when ``clip_denoised``) and ``eps``
        (the model's eps prediction, before any clipping).
        """
        output = self.model_output(model, x, t, feat, model_kwargs)
        return self.p_mean_variance_from_output(output, x, t, clip_denoised)

    # --- losses ---

    def vb_terms_bpd_from_output(
        self, output: Tensor, x0: Tensor, xt: Tensor, t: Tensor, clip_denoised: bool = True
    ) -> dict[str, Tensor]:
        """One term of the variational bound, in bits per dimension, from a model output: (N,) ``output``.

        t > 0: KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)); t = 0: -log p(x0 | x_1) under the discretised
        Gaussian decoder. Also returns ``pred_xstart``.
        """
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x0, xt, t)
        out = self.p_mean_variance_from_output(output, xt, t, clip_denoised)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])) / math.log(
            2.0
        )
        decoder_nll = -discretized_gaussian_log_likelihood(x0, out["mean"], 0.5 * out["log_variance"])
        decoder_nll = mean_flat(decoder_nll) / math.log(2.0)
        return {"output": torch.where(t == 0, decoder_nll, kl), "pred_xstart": out["pred_xstart"]}

    def vb_terms_bpd(
        self,
        model: Model,
        x0: Tensor,
        xt: Tensor,
        t: Tensor,
        feat: Optional[Tensor] = None,
        clip_denoised: bool = True,
        model_kwargs: Optional[dict] = None,
    ) -> dict[str, Tensor]:
        """``vb_terms_bpd_from_output`` with the model called on (x_t, t)."""
        output = self.model_output(model, xt, t, feat, model_kwargs)
        return self.vb_terms_bpd_from_output(output, x0, xt, t, clip_denoised)

    def training_losses(
        self,
        model: Model,
        x0: Tensor,
        t: Tensor,
        feat: Optional[Tensor] = None,
        noise: Optional[Tensor] = None,
        model_kwargs: Optional[dict] = None,
    ) -> dict[str, Tensor]:
        """Per-sample (N,) losses at timesteps t for clean images x0 (N, C, H, W) in [-1, 1].

        * ``mse`` = mean_flat((target - prediction)^2), target eps (or x0 with ``predict_xstart``); with
          ``min_snr_gamma`` it is weighted per sample by ``mse_weight(t)`` (Min-SNR-gamma, Hang et al. 2023);
        * ``vb``  = one variational-bound term in bits/dim (``vb_terms_bpd_from_output``, no clipping),
          computed with the eps channels DETACHED so the variance channels learn only from it
          (Nichol & Dhariwal's L_hybrid); times num_timesteps/1000 with ``rescale_learned_sigmas``;
        * ``loss`` = mse + vb when the variance is learned, mse for a fixed variance (``vb`` is then a
          gradient-free diagnostic), and vb * num_timesteps with ``use_kl`` (the rescaled full bound).
        """
        if noise is None:
            noise = torch.randn_like(x0)
        xt = self.q_sample(x0, t, noise)
        output = self.model_output(model, xt, t, feat, model_kwargs)
        prediction, v = self.split_output(output, xt)
        target = x0 if self.predict_xstart else noise
        mse = mean_flat((target - prediction) ** 2)
        if self.min_snr_gamma is not None:
            mse = mse * self.mse_weight(t)
        if self.use_kl:
            vb = self.vb_terms_bpd_from_output(output, x0, xt, t, clip_denoised=False)["output"]
            return {"loss": vb * self.num_timesteps, "mse": mse, "vb": vb}
        frozen = prediction.detach() if v is None else torch.cat([prediction.detach(), v], dim=1)
        if self.model_var_type == "learned_range":
            vb = self.vb_terms_bpd_from_output(frozen, x0, xt, t, clip_denoised=False)["output"]
            if self.rescale_learned_sigmas:
                vb = vb * (self.num_timesteps / 1000.0)
            return {"loss": mse + vb, "mse": mse, "vb": vb}
        with torch.no_grad():
            vb = self.vb_terms_bpd_from_output(frozen, x0, xt, t, clip_denoised=False)["output"]
        return {"loss": mse, "mse": mse, "vb": vb}

    def mse_weight(self, t: Tensor) -> Tensor:
        """Min-SNR-gamma weight of the mse term at timesteps t: (N,) float32 (Hang et al. 2023, eq. 8).

        With SNR_t = alphas_cumprod_t / (1 - alphas_cumprod_t): min(SNR_t, gamma) / SNR_t for an eps target
        (1 where SNR_t <= gamma, less at the nearly clean steps), min(SNR_t, gamma) for an x0 target. The
        weights of the x0 error are then min(SNR_t, gamma) in both cases: the many easy low-noise steps stop
        dominating the gradient, which speeds up training.
        """
        if self.min_snr_gamma is None:
            return torch.ones(t.shape, dtype=torch.float32, device=t.device)
        snr = self.extract("snr", t, 1)
        clipped = snr.clamp(max=self.min_snr_gamma)
        return clipped if self.predict_xstart else clipped / snr

    # --- likelihood ---

    def prior_bpd(self, x0: Tensor) -> Tensor:
        """KL(q(x_T | x0) || N(0, I)) in bits per dimension: (N,). Not trained; ~0 for a good schedule."""
        t = torch.full((x0.shape[0],), self.num_timesteps - 1, device=x0.device, dtype=torch.long)
        mean, _, log_variance = self.q_mean_variance(x0, t)
        return mean_flat(
            normal_kl(mean, log_variance, torch.zeros_like(mean), torch.zeros_like(mean))
        ) / math.log(2.0)

    @torch.no_grad()
    def calc_bpd_loop(
        self,
        model: Model,
        x0: Tensor,
        feat: Optional[Tensor] = None,
        clip_denoised: bool = True,
        model_kwargs: Optional[dict] = None,
        generator: Optional[torch.Generator] = None,
    ) -> dict[str, Tensor]:
        """The full variational bound in bits/dim: one model call per timestep (T calls).

        Returns ``total_bpd`` (N,) = prior_bpd + sum_t vb_t, ``prior_bpd`` (N,), ``vb`` (N, T),
        ``xstart_mse`` (N, T) and ``mse`` (N, T) (eps error).
        """
        n = x0.shape[0]
        vb, xstart_mse, mse = [], [], []
        for k in reversed(range(self.num_timesteps)):
            t = torch.full((n,), k, device=x0.device, dtype=torch.long)
            noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
            xt = self.q_sample(x0, t, noise)
            output = self.model_output(model, xt, t, feat, model_kwargs)
            terms = self.vb_terms_bpd_from_output(output, x0, xt, t, clip_denoised)
            vb.append(terms["output"])
            xstart_mse.append(mean_flat((terms["pred_xstart"] - x0) ** 2))
            mse.append(mean_flat((self.eps_from_xstart(xt, t, terms["pred_xstart"]) - noise) ** 2))
        vb_t = torch.stack(vb[::-1], dim=1)  # (N, T), column k = timestep k
        prior = self.prior_bpd(x0)
        return {
            "total_bpd": vb_t.sum(dim=1) + prior,
            "prior_bpd": prior,
            "vb": vb_t,
            "xstart_mse": torch.stack(xstart_mse[::-1], dim=1),
            "mse": torch.stack(mse[::-1], dim=1),
        }
