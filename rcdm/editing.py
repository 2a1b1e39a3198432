"""Editing in representation space: interpolation between two features, and RCDM's attribute transfer.

Interpolation (RCDM section 4.2; upstream spans only r in 0.5..0.7, here the whole range r in [0, 1]):

* ``linear``: f(r) = (1 - r) f1 + r f2, in the raw feature space the model was trained on;
* ``slerp`` (Shoemake 1985): f(r) = sin((1 - r) theta) / sin(theta) f1 + sin(r theta) / sin(theta) f2,
  theta = the angle between f1 and f2. It follows the great circle between the two directions, and
  for vectors of unequal norms interpolates the norm smoothly too; it falls back to ``linear`` when the
  vectors are (anti)parallel to within 1e-7 rad. Both rules give exactly f1 at r = 0 and f2 at r = 1.

Attribute transfer (RCDM section 4.3, "manipulation"):

1. L2-normalise the features of a pool of images and find the k nearest neighbours of the source
   (cosine similarity; the source itself counts when it is in the pool, as upstream);
2. ``rule="nonzero"`` (RCDM's): the "common" dims are the dims that are non-zero in MORE than ``common``
   of the k neighbours (k = 20, common = 14 upstream). It relies on sparse features: ResNet trunks
   pool after the last ReLU, so many dims are exactly zero and "non-zero in most neighbours" marks the
   attributes the neighbourhood shares. Dense features (projection heads, ViT CLS tokens, BatchNorm'ed
   outputs) have no exact zeros: every dim is non-zero in every neighbour, every dim is "common", and
   the edit would wipe the whole feature. ``common_dims`` refuses that: when fewer than 1% of the
   neighbours' values are exactly zero it raises :class:`EditingError` pointing to ``top_magnitude``;
3. ``rule="top_magnitude"`` (this project's rule for dense features): each neighbour votes for its
   ``top_m`` dims of largest |value| (default 10% of the dims); the common dims are those voted for by
   MORE than ``common`` of the k neighbours, i.e. the dims that are strongly active across the
   neighbourhood rather than merely non-zero. Setting a dense feature's dim to 0 is still a change
   of value rather than a removal, so read its "zeroed" row as "these dims pushed to 0".
4. Three conditionings: the source; the source with the common dims set to 0; the source with the
   common dims replaced by the target image's values (raw, un-normalised features, as upstream).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

InterpolationMode = Literal["linear", "slerp"]
CommonRule = Literal["nonzero", "top_magnitude"]
INTERPOLATION_MODES: tuple[str, ...] = ("linear", "slerp")
COMMON_RULES: tuple[str, ...] = ("nonzero", "top_magnitude")
DENSE_ZERO_FRACTION = 0.01  # below this fraction of exact zeros, features count as dense
DEFAULT_TOP_FRACTION = 0.1  # top_magnitude: default top_m = 10% of the dims (the project's choice)
MANIPULATION_LABELS: tuple[str, ...] = ("source", "common_zeroed", "common_from_target")


class EditingError(ValueError):
    """An edit that cannot give a meaningful result (dense features with the non-zero rule, k too small...)."""


# --- interpolation ------------------------------------------------------------------------------------


def ratios(steps_r: int) -> Tensor:
    """(steps_r,) float64 ratios r = 0, 1/(steps_r - 1), ..., 1 (both ends exact)."""
    if steps_r < 2:
        raise EditingError(f"steps_r must be at least 2 (r = 0 and r = 1), got {steps_r}")
    return torch.linspace(0.0, 1.0, steps_r, dtype=torch.float64)


def lerp(f1: Tensor, f2: Tensor, r: Tensor) -> Tensor:
    """(D,), (D,), (R,) -> (R, D): (1 - r) f1 + r f2."""
    r = r.to(torch.float64)[:, None]  # (R, 1)
    out = (1.0 - r) * f1.to(torch.float64) + r * f2.to(torch.float64)
    return out.to(f1.dtype)


def slerp(f1: Tensor, f2: Tensor, r: Tensor) -> Tensor:
    """(D,), (D,), (R,) -> (R, D): sin((1-r) theta)/sin(theta) f1 + sin(r theta)/sin(theta) f2."""
    a, b = f1.to(torch.float64), f2.to(torch.float64)
    na, nb = a.norm(), b.norm()
    if na == 0 or nb == 0:
        raise EditingError(
            "slerp needs non-zero features (the angle to a zero vector is undefined): use mode=linear"
        )
    theta = torch.arccos(torch.clamp(torch.dot(a / na, b / nb), -1.0, 1.0))
    if float(torch.sin(theta)) < 1e-7:
        return lerp(f1, f2, r)
    r = r.to(torch.float64)[:, None]  # (R, 1)
    w1 = torch.sin((1.0 - r) * theta) / torch.sin(theta)
    w2 = torch.sin(r * theta) / torch.sin(theta)
    return (w1 * a + w2 * b).to(f1.dtype)


def interpolate_features(f1: Tensor, f2: Tensor, r: Tensor, mode: InterpolationMode = "linear") -> Tensor:
    """Features along the path from f1 (D,) to f2 (D,) at ratios r (R,): (R, D)."""
    if f1.shape != f2.shape or f1.ndim != 1:
        raise EditingError(
            f"interpolation needs two (D,) features of one size, got {tuple(f1.shape)}, {tuple(f2.shape)}"
        )
    if mode == "linear":
        return lerp(f1, f2, r)
    if mode == "slerp":
        return slerp(f1, f2, r)
    raise EditingError(f"unknown interpolation mode '{mode}': use one of {list(INTERPOLATION_MODES)}")


# --- attribute transfer ---------------------------------------------------------------------------


def l2_normalize(x: Tensor, eps: float = 1e-12) -> Tensor:
    """Rows of x (..., D) divided by their L2 norm (zero rows stay zero)."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(eps)


def zero_fraction(x: Tensor) -> float:
    """The fraction of entries of x that are exactly 0."""
    return float((x == 0).float().mean()) if x.numel() else 0.0


def knn_exact(queries: Tensor, pool: Tensor, k: int, chunk_size: int = 65536) -> tuple[Tensor, Tensor]:
    """Exact cosine k-nearest neighbours of queries (Q, D) in pool (M, D), in chunks of the pool.

    Returns (similarities (Q, k) descending, indices (Q, k) long). Memory is O(Q * (chunk_size + k)).
    Ties keep the lower pool index first (a stable sort), so the result does not depend on chunking.
    """
    if pool.ndim != 2 or queries.ndim != 2 or pool.shape[1] != queries.shape[1]:
        raise EditingError(
            f"queries {tuple(queries.shape)} and pool {tuple(pool.shape)} must be (Q, D) and (M, D)"
        )
    if not 1 <= k <= pool.shape[0]:
        raise EditingError(
            f"k = {k} neighbours asked for, but the neighbour pool holds {pool.shape[0]} items"
        )
    q = l2_normalize(queries.float())
    best_s = torch.full((q.shape[0], 0), -math.inf, device=q.device)
    best_i = torch.zeros((q.shape[0], 0), dtype=torch.long, device=q.device)
    for start in range(0, pool.shape[0], chunk_size):
        chunk = l2_normalize(pool[start : start + chunk_size].to(q.device, torch.float32))  # (C, D)
        s = q @ chunk.T  # (Q, C)
        idx = torch.arange(start, start + chunk.shape[0], device=q.device).expand_as(s)
        best_s, order = torch.sort(torch.cat([best_s, s], 1), dim=1, descending=True, stable=True)
        best_i = torch.gather(torch.cat([best_i, idx], 1), 1, order)
        best_s, best_i = best_s[:, :k], best_i[:, :k]
    return best_s, best_i


def default_top_m(feature_dim: int) -> int:
    return max(1, round(DEFAULT_TOP_FRACTION * feature_dim))


def common_dims(
    neighbours: Tensor, common: int, rule: CommonRule = "nonzero", top_m: int | None = None
) -> Tensor:
    """The dims shared by the neighbourhood (see the module docstring): sorted long tensor of dim indices.

    ``neighbours`` (k, D): the features of the k nearest neighbours (normalised or not: neither rule
    depends on a positive per-row scale). A dim is common when MORE than ``common`` neighbours vote for
    it: non-zero (``rule="nonzero"``) or among their ``top_m`` largest |values| (``"top_magnitude"``).
    """
    if neighbours.ndim != 2:
        raise EditingError(f"neighbour features must be (k, D), got {tuple(neighbours.shape)}")
    k, d = neighbours.shape
    if not 0 <= common < k:
        raise EditingError(
            f"common = {common} must be in [0, k) with k = {k}: a dim can be shared by at most k neighbours, "
            "and the rule keeps dims shared by MORE than `common` of them"
        )
    if rule == "nonzero":
        zeros = zero_fraction(neighbours)
        if zeros < DENSE_ZERO_FRACTION:
            raise EditingError(
                f"the neighbours' features are dense ({100 * zeros:.2f}% exact zeros, under "
                f"{100 * DENSE_ZERO_FRACTION:.0f}%): RCDM's rule (dims non-zero in more than {common} of {k} "
                "neighbours) needs sparse post-ReLU features such as ResNet trunks; here it would mark every "
                "dim as common and erase the whole feature. Use rule=top_magnitude (dims among each "
                "neighbour's top-m |values|) for heads and ViT features"
            )
        votes = (neighbours != 0).sum(0)  # (D,)
    elif rule == "top_magnitude":
        m = default_top_m(d) if top_m is None else int(top_m)
        if not 1 <= m <= d:
            raise EditingError(f"top_m = {m} must be in [1, {d}] (the feature dim)")
        top = neighbours.abs().topk(m, dim=1).indices  # (k, m)
        votes = torch.zeros(d, dtype=torch.long, device=neighbours.device)
        votes.scatter_add_(
            0, top.flatten(), torch.ones(top.numel(), dtype=torch.long, device=neighbours.device)
        )
    else:
        raise EditingError(f"unknown rule '{rule}': use one of {list(COMMON_RULES)}")
    return torch.nonzero(votes > common).flatten()


def manipulated_features(source: Tensor, target: Tensor, dims: Tensor) -> Tensor:
    """(D,), (D,), dims -> (3, D): [source, source with dims zeroed, source with dims from target]."""
    if source.shape != target.shape or source.ndim != 1:
        raise EditingError(f"source and target must be (D,) features of one size, got {tuple(source.shape)}, "
                           f"{tuple(target.shape)}")  # fmt: skip
    dims = dims.to(source.device)
    zeroed = source.clone()
    zeroed[dims] = 0
    moved = source.clone()
    moved[dims] = target.to(source.dtype)[dims]
    return torch.stack([source, zeroed, moved])
