"""Metrics of a representation-conditional generator, computed in the encoder's feature space.

Notation: f_i (D,) is the feature of held-out image i (label y_i), x_ij the j-th sample drawn from
f_i, g_ij = encoder(x_ij) its feature; a "bank" is a set of labelled train features (b_n, c_n).

* k-NN classification (Wu et al. 2018, DINO's evaluation): the k bank features most similar to a
  query vote for their labels; the class with the most votes wins, ties broken by the larger summed
  similarity of its voters.
* class agreement = mean_ij [kNN(g_ij) == y_i]: does a sample keep the class of its conditioning
  image? Its ceiling is the kNN accuracy on the real features, mean_i [kNN(f_i) == y_i] (a perfect
  generator, g_ij = f_i, reaches it exactly). Chance = sum_c p_true(c) p_pred(c), the agreement of
  predictions drawn independently of the conditioning with the same class frequencies (1/C when
  balanced).
* retrieval rank (RCDM, Bordes et al. 2022, Sec. 4): over a pool of P held-out features, rank_ij =
  1 + #{p : s(g_ij, f_p) > s(g_ij, f_i)}; top-1 rate = mean [rank == 1], plus mean and median rank.
  A generator that ignores its conditioning gets mean rank ~ (P + 1) / 2 and top-1 ~ 1 / P.
* Inception score (Salimans et al. 2016): IS = exp(mean_x KL(p(y|x) || p(y))), p(y) = mean_x p(y|x).
* Frechet distance between Gaussians fitted to two feature sets (Heusel et al. 2017, FID's formula):
  d^2 = ||mu_1 - mu_2||^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2)).
* Improved precision and recall (Kynkaanniemi et al. 2019; k = 3 in the ADM evaluator): the manifold of
  a set is the union of balls around its points, each of radius r_k(x) = the distance from x to its
  k-th nearest other point of the set. Precision = the fraction of generated points inside the real
  manifold (fidelity), recall = the fraction of real points inside the generated one (coverage).

Similarities s(a, b): "cosine" = <a, b> / (||a|| ||b||), "dot" = <a, b>, "l2" = -||a - b||^2 (so larger
is always more similar). All functions are pure: tensors in, tensors or floats out.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
from torch import Tensor

Metric = Literal["cosine", "dot", "l2"]
METRICS: tuple[str, ...] = ("cosine", "dot", "l2")


def similarity(a: Tensor, b: Tensor, metric: Metric = "cosine") -> Tensor:
    """s(a_i, b_j) for a (N, D) and b (M, D) -> (N, M), larger = more similar (see module docstring)."""
    a, b = a.float(), b.float()
    if metric == "cosine":
        a = torch.nn.functional.normalize(a, dim=1)
        b = torch.nn.functional.normalize(b, dim=1)
        return a @ b.T
    if metric == "dot":
        return a @ b.T
    if metric == "l2":
        # -||a - b||^2 = 2 <a, b> - ||a||^2 - ||b||^2
        return 2 * (a @ b.T) - a.pow(2).sum(1, keepdim=True) - b.pow(2).sum(1)[None, :]
    raise ValueError(f"unknown similarity metric {metric!r}; use one of {list(METRICS)}")


def topk_neighbours(
    bank: Tensor, queries: Tensor, k: int, metric: Metric = "cosine", chunk: int = 4096
) -> tuple[Tensor, Tensor]:
    """(similarities (Q, k), indices (Q, k)) of the k bank rows most similar to each query, best first.

    Memory is bounded by ``chunk``: queries and bank are both processed ``chunk`` rows at a time, with
    a running top-k merged across bank chunks.
    """
    if bank.ndim != 2 or queries.ndim != 2 or bank.shape[1] != queries.shape[1]:
        raise ValueError(
            f"bank {tuple(bank.shape)} and queries {tuple(queries.shape)} must be (N, D), (Q, D)"
        )
    k = min(k, bank.shape[0])
    out_s, out_i = [], []
    for q0 in range(0, queries.shape[0], chunk):
        q = queries[q0 : q0 + chunk]
        best_s = torch.full((q.shape[0], 0), float("-inf"))
        best_i = torch.zeros((q.shape[0], 0), dtype=torch.long)
        for b0 in range(0, bank.shape[0], chunk):
            s = similarity(q, bank[b0 : b0 + chunk], metric)  # (q, b)
            s_k, i_k = s.topk(min(k, s.shape[1]), dim=1)
            cat_s = torch.cat([best_s, s_k], 1)
            cat_i = torch.cat([best_i, i_k + b0], 1)
            best_s, pos = cat_s.topk(min(k, cat_s.shape[1]), dim=1)
            best_i = cat_i.gather(1, pos)
        out_s.append(best_s)
        out_i.append(best_i)
    return torch.cat(out_s), torch.cat(out_i)


def knn_vote(neighbour_labels: Tensor, neighbour_sims: Tensor, num_classes: int) -> Tensor:
    """Majority vote of (Q, k) neighbour labels -> (Q,) predicted class.

    score_c = votes_c + (summed similarity of c's voters) / (1 + sum |similarities|): the fraction is
    strictly below 1 in magnitude, so it only breaks ties between classes with equal votes.
    """
    labels = neighbour_labels.long()
    sims = neighbour_sims.double()
    q = labels.shape[0]
    votes = torch.zeros(q, num_classes, dtype=torch.float64).scatter_add_(1, labels, torch.ones_like(sims))
    summed = torch.zeros(q, num_classes, dtype=torch.float64).scatter_add_(1, labels, sims)
    scale = 1.0 + sims.abs().sum(1, keepdim=True)
    score = votes + summed / scale
    score = score.masked_fill(votes == 0, float("-inf"))  # a class nobody voted for never wins
    return score.argmax(1)


def knn_classify(
    train_feats: Tensor,
    train_labels: Tensor,
    queries: Tensor,
    k: int = 10,
    metric: Metric = "cosine",
    chunk: int = 4096,
    num_classes: int | None = None,
) -> Tensor:
    """k-NN class predictions (Q,) for ``queries`` (Q, D) from the labelled bank (N, D), (N,)."""
    if train_feats.shape[0] != train_labels.shape[0]:
        raise ValueError(f"{train_feats.shape[0]} bank features but {train_labels.shape[0]} labels")
    if num_classes is None:
        num_classes = int(train_labels.max()) + 1
    sims, idx = topk_neighbours(train_feats, queries, k, metric, chunk)
    return knn_vote(train_labels.long()[idx], sims, num_classes)


def agreement(pred: Tensor, labels: Tensor) -> float:
    """mean [pred == labels], a fraction in [0, 1]."""
    if pred.shape != labels.shape:
        raise ValueError(f"predictions {tuple(pred.shape)} and labels {tuple(labels.shape)} differ in shape")
    return float((pred.long() == labels.long()).double().mean()) if pred.numel() else float("nan")


def chance_agreement(pred: Tensor, labels: Tensor, num_classes: int) -> float:
    """sum_c p_true(c) p_pred(c): the agreement of predictions independent of the conditioning."""
    p_true = torch.bincount(labels.long(), minlength=num_classes).double() / max(labels.numel(), 1)
    p_pred = torch.bincount(pred.long(), minlength=num_classes).double() / max(pred.numel(), 1)
    return float((p_true * p_pred).sum())


def retrieval_ranks(
    sample_feats: Tensor, cond_index: Tensor, pool: Tensor, metric: Metric = "cosine"
) -> Tensor:
    """rank_i = 1 + #{p : s(g_i, pool_p) > s(g_i, pool_{cond_index_i})}, (N,) long, 1 = retrieved first.

    ``sample_feats`` (N, D) are the samples' features, ``cond_index`` (N,) the pool row each was drawn
    from, ``pool`` (P, D). Ties count in the sample's favour (strictly greater only).
    """
    sims = similarity(sample_feats, pool, metric)  # (N, P)
    own = sims.gather(1, cond_index.long()[:, None])  # (N, 1)
    return 1 + (sims > own).sum(1)


def retrieval_summary(ranks: Tensor) -> dict[str, float]:
    """top1 = mean [rank == 1], mean_rank, median_rank (torch's lower median for an even count)."""
    r = ranks.double()
    return {
        "top1": float((ranks == 1).double().mean()),
        "mean_rank": float(r.mean()),
        "median_rank": float(r.median()),
    }


def gaussian_stats(feats: Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mu (D,), Sigma (D, D)) in float64; Sigma is the unbiased sample covariance (N - 1)."""
    x = np.asarray(feats.detach().cpu() if isinstance(feats, Tensor) else feats, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"need at least 2 feature vectors (N, D) for a covariance, got shape {x.shape}")
    return x.mean(0), np.cov(x, rowvar=False)


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    """The symmetric square root of a positive semi-definite matrix (negative eigenvalues clipped)."""
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance_from_stats(mu1: np.ndarray, s1: np.ndarray, mu2: np.ndarray, s2: np.ndarray) -> float:
    """d^2 = ||mu1 - mu2||^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^(1/2)).

    Tr((S1 S2)^(1/2)) = Tr((S1^(1/2) S2 S1^(1/2))^(1/2)) (same eigenvalues), and the latter matrix is
    symmetric PSD, so its trace is sum sqrt(eigvalsh) - stable for the singular covariances that arise
    when there are fewer samples than dimensions.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.atleast_2d(np.asarray(s1, np.float64)), np.atleast_2d(np.asarray(s2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"mismatched stats: mu {mu1.shape}, {mu2.shape}; Sigma {s1.shape}, {s2.shape}")
    r1 = _psd_sqrt(s1)
    m = r1 @ s2 @ r1
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    d2 = float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt)
    return max(d2, 0.0)


def frechet_distance(feats1: Tensor | np.ndarray, feats2: Tensor | np.ndarray) -> float:
    """Frechet distance (squared, as FID reports it) between Gaussians fitted to two (N, D) sets."""
    return frechet_distance_from_stats(*gaussian_stats(feats1), *gaussian_stats(feats2))


def inception_score(logits: Tensor) -> float:
    """exp(mean_x KL(p(y|x) || p(y))) from classifier logits (N, C), one split."""
    log_p = torch.log_softmax(logits.double(), dim=1)  # (N, C) log p(y|x)
    log_marginal = torch.logsumexp(log_p, dim=0) - math.log(log_p.shape[0])  # (C,) log p(y)
    kl = (log_p.exp() * (log_p - log_marginal)).sum(1)  # (N,)
    return float(kl.mean().exp())


def _as_tensor(x: Tensor | np.ndarray, device: torch.device) -> Tensor:
    """Float64 on the CPU (exact enough for closed-form checks); float32 on accelerators."""
    t = x.detach() if isinstance(x, Tensor) else torch.from_numpy(np.asarray(x))
    return t.to(device, torch.float64 if device.type == "cpu" else torch.float32)


def manifold_radii(
    feats: Tensor | np.ndarray, k: int = 3, chunk: int = 1024, device: str | torch.device = "cpu"
) -> Tensor:
    """r_k (N,) on ``device``: the Euclidean distance from each of feats (N, D) to its k-th nearest other point.

    Rows go ``chunk`` at a time: memory of a few chunk x N blocks (about 1.2 GB for 50,000 points in float64)."""
    x = _as_tensor(feats, torch.device(device))
    if x.ndim != 2 or x.shape[0] <= k:
        raise ValueError(f"the k-NN radii need more than k={k} points (N, D), got shape {tuple(x.shape)}")
    # column 0 of each sorted row is the point itself (distance 0), column k its k-th neighbour
    return torch.cat(
        [torch.cdist(x[i : i + chunk], x).kthvalue(k + 1, dim=1).values for i in range(0, len(x), chunk)]
    )


def inside_manifold(
    queries: Tensor | np.ndarray, points: Tensor | np.ndarray, radii: Tensor, chunk: int = 1024
) -> Tensor:
    """(Q,) bool on radii's device: query q lies in the ball of some point p, ||q - p|| <= r(p)."""
    q, p = _as_tensor(queries, radii.device), _as_tensor(points, radii.device)
    return torch.cat(
        [(torch.cdist(q[i : i + chunk], p) <= radii).any(dim=1) for i in range(0, len(q), chunk)]
    )


def precision_recall(
    real: Tensor | np.ndarray, fake: Tensor | np.ndarray, k: int = 3, device: str | torch.device = "cpu"
) -> tuple[float, float]:
    """(precision, recall) of generated features ``fake`` (M, D) against real features ``real`` (N, D).

    ``device="cuda"`` computes the distances there in float32 (large sets: 50,000 Inception features)."""
    precision = inside_manifold(fake, real, manifold_radii(real, k, device=device)).double().mean()
    recall = inside_manifold(real, fake, manifold_radii(fake, k, device=device)).double().mean()
    return float(precision), float(recall)
