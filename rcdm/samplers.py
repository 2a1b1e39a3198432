"""Samplers for a GaussianDiffusion: ancestral (DDPM), DDIM and DPM-Solver++(2M), one signature.

    x0 = sample(model, diffusion, shape, feat, sampler="ddim", steps=50, seeds=[...])

* ``steps`` respaces the given diffusion (built from its config, cached); the model is always called
  with ORIGINAL timestep indices (the diffusion maps them).
* One ``torch.Generator`` per sample, seeded with ``seeds[i]``: x_T and every per-step noise of sample i
  come from its own generator, so a sample does not depend on the batch it was drawn in. Use
  ``sample_seed(base, item, j)`` to derive seeds.
* Classifier-free guidance (Ho & Salimans 2022) with scale w: eps = (1 + w) eps(x, feat) - w eps(x, null),
  both branches in one batched model call; the variance channels come from the conditional branch.

Every loop evaluates the model once per respaced step, at t_{K-1} > ... > t_0, and the last step
returns the x0 prediction at t_0 (DDIM and DPM-Solver++ step to alpha_bar = 1; ancestral adds no noise).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Optional, Union, get_args

import torch
from torch import Tensor

from rcdm.diffusion import DiffusionConfig, GaussianDiffusion, Model, build_diffusion

SamplerName = Literal["ddim", "ancestral", "dpm++"]
SAMPLERS: tuple[str, ...] = get_args(SamplerName)
Callback = Callable[[dict], None]
NoiseFn = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class SamplerConfig:
    """How each sample is drawn (``sample``'s keyword arguments): sampler, respaced steps, DDIM eta, CFG scale."""

    name: SamplerName = "ddim"
    steps: Union[int, str] = 50  # an int keeps that many evenly spaced steps; or a spec such as "ddim25"
    eta: float = 0.0  # DDIM noise scale
    guidance: float = 0.0  # classifier-free guidance scale w (needs a model trained with dropped features)


def sample_seed(base: int, item: int, j: int) -> int:
    """The seed of sample j of conditioning item i in a run with base seed s: s * 1_000_003 + i * 1009 + j."""
    return base * 1_000_003 + item * 1009 + j


# --- per-sample randomness --------------------------------------------------------------------------


def make_generators(seeds: Sequence[int], device: torch.device | str) -> list[torch.Generator]:
    """One generator per sample, on ``device``, seeded with seeds[i]."""
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]


def per_sample_randn(generators: Sequence[torch.Generator], like: Tensor) -> Tensor:
    """Standard normal noise shaped like ``like`` (N, ...), row i drawn from generators[i]."""
    if len(generators) != like.shape[0]:
        raise ValueError(f"{len(generators)} generators for a batch of {like.shape[0]}")
    return torch.stack(
        [torch.randn(like.shape[1:], generator=g, device=like.device, dtype=like.dtype) for g in generators]
    )


def _noise_fn(generators: Optional[Sequence[torch.Generator]]) -> NoiseFn:
    if generators is None:
        return torch.randn_like
    return functools.partial(per_sample_randn, generators)


# --- classifier-free guidance -----------------------------------------------------------------------


class GuidedModel:
    """model with classifier-free guidance: output = ((1 + w) eps_cond - w eps_null, v_cond).

    ``null_feat``: the unconditional feature, (D,) or (N, D); None means ``model.null_feature(n)`` when the
    model has that method, else zeros. The guidance is applied to the first C channels whatever they
    predict: eps and x0 are affine in each other at fixed (x_t, t) and the weights (1 + w, -w) sum to 1,
    so guiding x0 is the same as guiding eps.
    """

    def __init__(self, model: Model, guidance: float, null_feat: Optional[Tensor] = None) -> None:
        self.model = model
        self.guidance = float(guidance)
        self.null_feat = null_feat

    def null(self, feat: Tensor) -> Tensor:
        n = feat.shape[0]
        if self.null_feat is not None:
            null = self.null_feat.to(device=feat.device, dtype=feat.dtype)
            if null.shape not in (feat.shape[1:], feat.shape):
                raise ValueError(
                    f"null_feat has shape {tuple(null.shape)}; expected {tuple(feat.shape[1:])} or {tuple(feat.shape)}"
                )
            return null.expand_as(feat)
        null_feature = getattr(self.model, "null_feature", None)
        if callable(null_feature):
            return null_feature(n).to(device=feat.device, dtype=feat.dtype)
        return torch.zeros_like(feat)

    def __call__(self, x: Tensor, t: Tensor, feat: Optional[Tensor] = None, **kwargs) -> Tensor:
        if feat is None:
            raise ValueError("classifier-free guidance needs a conditioning feature: pass feat or guidance=0")
        n, c = x.shape[0], x.shape[1]
        out = self.model(
            torch.cat([x, x]), torch.cat([t, t]), feat=torch.cat([feat, self.null(feat)]), **kwargs
        )
        cond, uncond = out[:n], out[n:]  # (N, C or 2C, H, W) each
        w = self.guidance
        guided = (1.0 + w) * cond[:, :c] - w * uncond[:, :c]
        return torch.cat([guided, cond[:, c:]], dim=1)


# --- the step loops ---------------------------------------------------------------------------------


def _indices(diffusion: GaussianDiffusion, progress: bool):
    indices = list(range(diffusion.num_timesteps))[::-1]
    if progress:
        from tqdm.auto import tqdm

        return tqdm(indices)
    return indices


def _report(
    callback: Optional[Callback], i: int, diffusion: GaussianDiffusion, k: int, x: Tensor, x0: Tensor
):
    if callback is not None:
        callback({"i": i, "t": int(diffusion.timestep_map[k]), "x": x, "pred_xstart": x0})


def _ancestral(model, diffusion, x, feat, noise_fn, clip_denoised, progress, callback) -> Tensor:
    """Ho et al. Algorithm 2: x_{t-1} = mu(x_t, t) + Sigma^(1/2) z, no noise at the last step."""
    for i, k in enumerate(_indices(diffusion, progress)):
        t = torch.full((x.shape[0],), k, device=x.device, dtype=torch.long)
        out = diffusion.p_mean_variance(model, x, t, feat, clip_denoised)
        x = out["mean"]
        if k > 0:
            x = x + torch.exp(0.5 * out["log_variance"]) * noise_fn(x)
        _report(callback, i, diffusion, k, x, out["pred_xstart"])
    return x


def _ddim(model, diffusion, x, feat, eta, noise_fn, clip_denoised, progress, callback) -> Tensor:
    """Song et al. eq. 12: x_{t-1} = sqrt(ab_prev) x0 + sqrt(1 - ab_prev - sigma^2) eps + sigma z,

    sigma = eta sqrt((1 - ab_prev) / (1 - ab)) sqrt(1 - ab / ab_prev), eps re-derived from the clipped x0.
    """
    for i, k in enumerate(_indices(diffusion, progress)):
        t = torch.full((x.shape[0],), k, device=x.device, dtype=torch.long)
        out = diffusion.p_mean_variance(model, x, t, feat, clip_denoised)
        x0 = out["pred_xstart"]
        eps = diffusion.eps_from_xstart(x, t, x0)
        ab = diffusion.extract("alphas_cumprod", t, x.ndim)
        ab_prev = diffusion.extract("alphas_cumprod_prev", t, x.ndim)
        sigma = eta * torch.sqrt((1 - ab_prev) / (1 - ab)) * torch.sqrt(1 - ab / ab_prev)
        x = x0 * torch.sqrt(ab_prev) + torch.sqrt(1 - ab_prev - sigma**2) * eps
        if eta > 0 and k > 0:
            x = x + sigma * noise_fn(x)
        _report(callback, i, diffusion, k, x, x0)
    return x


def _dpm_solver_pp(model, diffusion, x, feat, clip_denoised, progress, callback) -> Tensor:
    """DPM-Solver++(2M), Lu et al. 2022 Algorithm 2 (data prediction, multistep, second order).

    Time points are the respaced DISCRETE timesteps with their exact alpha_bar (no continuous-time
    interpolation), taken from noise to data: s_0 = t_{K-1} > s_1 > ... > s_{K-1} = t_0. With
    alpha_s = sqrt(ab_s), sigma_s = sqrt(1 - ab_s), lambda_s = log(alpha_s / sigma_s),
    h_i = lambda_{s_i} - lambda_{s_{i-1}} and x0_i the x0 prediction at s_i (clipped when ``clip_denoised``):

        i = 1:   x_{s_1} = (sigma_{s_1} / sigma_{s_0}) x_{s_0} - alpha_{s_1} (e^{-h_1} - 1) x0_0
        i >= 2:  D_i = (1 + 1/(2 r_i)) x0_{i-1} - 1/(2 r_i) x0_{i-2},   r_i = h_{i-1} / h_i
                 x_{s_i} = (sigma_{s_i} / sigma_{s_{i-1}}) x_{s_{i-1}} - alpha_{s_i} (e^{-h_i} - 1) D_i

    The last solver step (into s_{K-1} = t_0) is first order ("lower_order_final" of the reference
    implementation): on evenly spaced discrete steps its lambda gap is several times the previous one
    (r ~ 0.23 at 20 steps of the linear schedule) and the second-order extrapolation overshoots there.
    The final step goes from t_0 to alpha_bar = 1 (lambda = +inf), where the first-order update reduces
    to x = x0 prediction. So the solver spends one model call per kept timestep, like DDIM, whose update
    is the first-order case of this one.
    """
    ab_all = diffusion.alphas_cumprod  # (K,) float64
    lam_all = 0.5 * (torch.log(ab_all) - torch.log1p(-ab_all))
    x0_prev: Optional[Tensor] = None
    h_prev = 0.0
    for i, k in enumerate(_indices(diffusion, progress)):
        t = torch.full((x.shape[0],), k, device=x.device, dtype=torch.long)
        x0 = diffusion.p_mean_variance(model, x, t, feat, clip_denoised)["pred_xstart"]
        if k == 0:
            x = x0
        else:
            h = float(lam_all[k - 1] - lam_all[k])
            sigma_ratio = float(torch.sqrt((1 - ab_all[k - 1]) / (1 - ab_all[k])))
            alpha_next = float(torch.sqrt(ab_all[k - 1]))
            if x0_prev is None or k == 1:
                d = x0
            else:
                r = h_prev / h
                d = (1 + 0.5 / r) * x0 - (0.5 / r) * x0_prev
            x = sigma_ratio * x - alpha_next * math.expm1(-h) * d
            x0_prev, h_prev = x0, h
        _report(callback, i, diffusion, k, x, x0)
    return x


def _run(
    model: Model,
    diffusion: GaussianDiffusion,
    noise: Tensor,
    feat: Optional[Tensor],
    *,
    sampler: str,
    eta: float,
    guidance: float,
    null_feat: Optional[Tensor],
    generators: Optional[Sequence[torch.Generator]],
    clip_denoised: bool,
    progress: bool,
    callback: Optional[Callback],
) -> Tensor:
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler '{sampler}': use one of {list(SAMPLERS)}")
    if feat is not None and feat.shape[0] != noise.shape[0]:
        raise ValueError(
            f"feat has {feat.shape[0]} rows for a batch of {noise.shape[0]}: repeat it per sample"
        )
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    net = GuidedModel(model, guidance, null_feat) if guidance != 0 else model
    noise_fn = _noise_fn(generators)
    with torch.no_grad():
        if sampler == "ancestral":
            return _ancestral(net, diffusion, noise, feat, noise_fn, clip_denoised, progress, callback)
        if sampler == "ddim":
            return _ddim(net, diffusion, noise, feat, eta, noise_fn, clip_denoised, progress, callback)
        return _dpm_solver_pp(net, diffusion, noise, feat, clip_denoised, progress, callback)


# --- public API -------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=32)
def _respaced(cfg: DiffusionConfig, respacing: str) -> GaussianDiffusion:
    return build_diffusion(cfg, respacing=respacing)


def respace(diffusion: GaussianDiffusion, steps: int | str | None) -> GaussianDiffusion:
    """``diffusion`` respaced from its original steps: an int N keeps N evenly spaced steps (ends included,
    guided-diffusion's "N"); a string is any respacing spec ("ddim25", "10,15,20"). None keeps it as is."""
    if steps is None:
        return diffusion
    spec = str(steps).strip()
    if spec == diffusion.config.timestep_respacing:
        return diffusion
    return _respaced(diffusion.config, spec)


def _default_device(model: Model, feat: Optional[Tensor]) -> torch.device:
    if feat is not None:
        return feat.device
    if isinstance(model, torch.nn.Module):
        param = next(model.parameters(), None)
        if param is not None:
            return param.device
    return torch.device("cpu")


def sample(
    model: Model,
    diffusion: GaussianDiffusion,
    shape: Sequence[int],
    feat: Optional[Tensor] = None,
    *,
    sampler: SamplerName = "ddim",
    steps: int | str | None = None,
    eta: float = 0.0,
    guidance: float = 0.0,
    null_feat: Optional[Tensor] = None,
    seeds: Sequence[int],
    progress: bool = False,
    callback: Optional[Callback] = None,
    clip_denoised: bool = True,
    device: torch.device | str | None = None,
) -> Tensor:
    """Draw x0 (N, C, H, W) from ``model`` with ``sampler``.

    ``shape`` = (N, C, H, W); ``feat`` (N, D) or None (unconditional); ``steps`` respaces ``diffusion``
    (see ``respace``; None = use it as given); ``eta`` is DDIM's noise scale (0 = deterministic);
    ``guidance`` the classifier-free guidance scale w; ``seeds`` one int per sample; ``callback`` gets
    dict(i, t, x, pred_xstart) after each step (t = the original timestep index).
    """
    shape = tuple(int(s) for s in shape)
    if len(seeds) != shape[0]:
        raise ValueError(
            f"got {len(seeds)} seeds for {shape[0]} samples: pass one seed per sample (sample_seed)"
        )
    device = torch.device(device) if device is not None else _default_device(model, feat)
    if feat is not None:
        feat = feat.to(device)
    spaced = respace(diffusion, steps)
    generators = make_generators(seeds, device)
    x_T = per_sample_randn(generators, torch.empty(shape, device=device))  # (N, C, H, W)
    return _run(
        model,
        spaced,
        x_T,
        feat,
        sampler=sampler,
        eta=eta,
        guidance=guidance,
        null_feat=null_feat,
        generators=generators,
        clip_denoised=clip_denoised,
        progress=progress,
        callback=callback,
    )


def _loop_generators(seeds: Optional[Sequence[int]], noise: Tensor) -> Optional[list[torch.Generator]]:
    if seeds is None:
        return None
    if len(seeds) != noise.shape[0]:
        raise ValueError(f"got {len(seeds)} seeds for a batch of {noise.shape[0]}")
    return make_generators(seeds, noise.device)


def p_sample_loop(
    model: Model,
    diffusion: GaussianDiffusion,
    noise: Tensor,
    feat: Optional[Tensor] = None,
    *,
    seeds: Optional[Sequence[int]] = None,
    guidance: float = 0.0,
    null_feat: Optional[Tensor] = None,
    clip_denoised: bool = True,
    progress: bool = False,
    callback: Optional[Callback] = None,
) -> Tensor:
    """Ancestral sampling from x_T = ``noise`` over every step of ``diffusion`` (respace it beforehand).

    Per-step noise comes from one generator per sample when ``seeds`` is given, else from torch's global RNG.
    """
    return _run(
        model,
        diffusion,
        noise,
        feat,
        sampler="ancestral",
        eta=0.0,
        guidance=guidance,
        null_feat=null_feat,
        generators=_loop_generators(seeds, noise),
        clip_denoised=clip_denoised,
        progress=progress,
        callback=callback,
    )


def ddim_sample_loop(
    model: Model,
    diffusion: GaussianDiffusion,
    noise: Tensor,
    feat: Optional[Tensor] = None,
    eta: float = 0.0,
    *,
    seeds: Optional[Sequence[int]] = None,
    guidance: float = 0.0,
    null_feat: Optional[Tensor] = None,
    clip_denoised: bool = True,
    progress: bool = False,
    callback: Optional[Callback] = None,
) -> Tensor:
    """DDIM from x_T = ``noise`` over every step of ``diffusion``; see ``p_sample_loop``."""
    return _run(
        model,
        diffusion,
        noise,
        feat,
        sampler="ddim",
        eta=eta,
        guidance=guidance,
        null_feat=null_feat,
        generators=_loop_generators(seeds, noise),
        clip_denoised=clip_denoised,
        progress=progress,
        callback=callback,
    )


def dpm_solver_pp_sample_loop(
    model: Model,
    diffusion: GaussianDiffusion,
    noise: Tensor,
    feat: Optional[Tensor] = None,
    *,
    guidance: float = 0.0,
    null_feat: Optional[Tensor] = None,
    clip_denoised: bool = True,
    progress: bool = False,
    callback: Optional[Callback] = None,
) -> Tensor:
    """DPM-Solver++(2M) from x_T = ``noise`` over every step of ``diffusion`` (deterministic)."""
    return _run(
        model,
        diffusion,
        noise,
        feat,
        sampler="dpm++",
        eta=0.0,
        guidance=guidance,
        null_feat=null_feat,
        generators=None,
        clip_denoised=clip_denoised,
        progress=progress,
        callback=callback,
    )
