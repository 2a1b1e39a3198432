"""rcdm.metrics against closed forms, hand-worked examples and the two limiting generators."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rcdm import metrics as M


def clustered(n_per_class: int, num_classes: int = 10, dim: int = 32, noise: float = 1.0, seed: int = 0):
    """Features = class centre (norm ~ 4 * sqrt(dim), fixed) + isotropic noise seeded by ``seed``."""
    centres = 4 * torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(1234))
    labels = torch.arange(num_classes).repeat_interleave(n_per_class)
    g = torch.Generator().manual_seed(seed)
    feats = centres[labels] + noise * torch.randn(len(labels), dim, generator=g)
    return feats, labels


def test_similarity_forms():
    a, b = torch.randn(5, 7), torch.randn(4, 7)
    torch.testing.assert_close(M.similarity(a, b, "l2"), -torch.cdist(a, b).pow(2), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(M.similarity(a, b, "dot"), a @ b.T)
    cos = torch.nn.functional.cosine_similarity(a[:, None], b[None], dim=2)
    torch.testing.assert_close(M.similarity(a, b, "cosine"), cos)
    with pytest.raises(ValueError, match="unknown similarity"):
        M.similarity(a, b, "manhattan")


def test_chunked_topk_equals_brute_force():
    bank, queries = torch.randn(103, 8), torch.randn(17, 8)
    s, i = M.topk_neighbours(bank, queries, k=5, metric="l2", chunk=10)  # 11 bank chunks, 2 query chunks
    s_ref, i_ref = M.similarity(queries, bank, "l2").topk(5, dim=1)
    torch.testing.assert_close(s, s_ref)
    assert torch.equal(i, i_ref)


def test_knn_vote_majority_then_summed_similarity():
    labels = torch.tensor([[0, 0, 1], [0, 1, 2], [2, 1, 1]])
    sims = torch.tensor([[0.1, 0.1, 0.9], [0.5, 0.6, 0.55], [0.99, 0.2, 0.1]])
    # row 0: 2 votes for class 0 beat one stronger vote for 1; row 1: a 3-way tie, class 1 has the
    # largest similarity; row 2: class 1 has 2 votes, class 2 one (larger) -> 1
    assert M.knn_vote(labels, sims, num_classes=3).tolist() == [0, 1, 1]
    # a tie on votes (1 each) broken by the summed similarity: class 1 (0.7) over class 0 (0.3)
    assert M.knn_vote(torch.tensor([[0, 1]]), torch.tensor([[0.3, 0.7]]), 2).tolist() == [1]


def test_knn_classify_on_separated_clusters():
    train, train_y = clustered(50, seed=0)
    test, test_y = clustered(20, seed=1)
    pred = M.knn_classify(train, train_y, test, k=10, metric="cosine", chunk=64)
    assert M.agreement(pred, test_y) == 1.0  # clusters 4 sqrt(D) apart with unit noise never mix


def test_perfect_and_shuffled_generators():
    """g_ij = f_i reaches the kNN ceiling and top-1 = 1; permuted conditioning falls to chance."""
    train, train_y = clustered(100, noise=6.0, seed=3)  # heavy noise: a ceiling below 1
    held, held_y = clustered(100, noise=6.0, seed=4)
    ceiling = M.agreement(M.knn_classify(train, train_y, held, k=10), held_y)
    assert 0.3 < ceiling < 1.0

    perfect = held.clone()  # samples whose features equal their conditioning's
    pred = M.knn_classify(train, train_y, perfect, k=10)
    assert M.agreement(pred, held_y) == ceiling
    ranks = M.retrieval_ranks(perfect, torch.arange(len(held)), held)
    summary = M.retrieval_summary(ranks)
    assert summary == {"top1": 1.0, "mean_rank": 1.0, "median_rank": 1.0}

    perm = torch.randperm(len(held), generator=torch.Generator().manual_seed(0))
    shuffled_pred = M.knn_classify(train, train_y, held[perm], k=10)
    shuffled = M.agreement(shuffled_pred, held_y)
    chance = M.chance_agreement(shuffled_pred, held_y, 10)
    # balanced labels: chance = sum_c 0.1 p_pred(c) = 0.1 exactly; the shuffled agreement is a binomial
    # proportion around it with sd sqrt(0.1 * 0.9 / 1000) = 0.0095: 0.05 is over 5 sd
    assert chance == pytest.approx(0.1)
    assert abs(shuffled - chance) < 0.05
    shuffled_ranks = M.retrieval_summary(M.retrieval_ranks(held[perm], torch.arange(len(held)), held))
    assert shuffled_ranks["top1"] < 0.01  # a fixed point of the permutation is the only way to rank 1
    assert shuffled_ranks["mean_rank"] > 100  # independent of conditioning: ~ (P + 1) / 2 = 500.5 if uniform


def test_retrieval_ranks_hand_example():
    pool = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    samples = torch.tensor([[1.0, 0.1], [1.0, 0.1], [0.2, 1.0]])
    # sample 0 from pool 0: cosine to pool 0 is the largest -> rank 1
    # sample 1 from pool 1: pool 0 (0.995) and pool 2 (0.77) beat pool 1 (0.0995) -> rank 3
    # sample 2 from pool 2: pool 1 (0.98) beats pool 2 (0.83) -> rank 2
    ranks = M.retrieval_ranks(samples, torch.tensor([0, 1, 2]), pool)
    assert ranks.tolist() == [1, 3, 2]
    assert M.retrieval_summary(ranks) == {"top1": 1 / 3, "mean_rank": 2.0, "median_rank": 2.0}


def test_chance_agreement_formula():
    labels = torch.tensor([0, 0, 0, 1])  # p_true = (0.75, 0.25)
    pred = torch.tensor([1, 1, 0, 0])  # p_pred = (0.5, 0.5)
    assert M.chance_agreement(pred, labels, 2) == pytest.approx(0.75 * 0.5 + 0.25 * 0.5)


def test_frechet_diagonal_closed_form():
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    s1, s2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 1.0])
    # ||mu1 - mu2||^2 + sum (s1 + s2 - 2 sqrt(s1 s2)) = 5 + (1 + 1 + 4) = 11
    expected = ((mu1 - mu2) ** 2).sum() + (s1 + s2 - 2 * np.sqrt(s1 * s2)).sum()
    assert expected == 11.0
    assert M.frechet_distance_from_stats(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(11.0, abs=1e-10)


def test_frechet_full_covariance_matches_scipy_sqrtm():
    linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(6, 6)), rng.normal(size=(6, 6))
    s1, s2 = a @ a.T + 0.1 * np.eye(6), b @ b.T + 0.1 * np.eye(6)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    covmean = linalg.sqrtm(s1 @ s2).real  # FID reference implementation's route
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean)
    assert M.frechet_distance_from_stats(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)
    # commuting case: S1 = 4 S2 -> Tr(S1 + S2 - 2 * 2 S2) = Tr(S2), distance = Tr(S2) at equal means
    assert M.frechet_distance_from_stats(mu1, 4 * s2, mu1, s2) == pytest.approx(np.trace(s2), rel=1e-9)


def test_frechet_from_samples():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20000, 4, generator=g) * torch.tensor([1.0, 2.0, 1.0, 1.0])
    y = torch.randn(20000, 4, generator=g) + torch.tensor([3.0, 0.0, 0.0, 0.0])
    # closed form: 3^2 + (1 + 1 - 2) + (4 + 1 - 2 * 2) + 0 + 0 = 10
    assert M.frechet_distance(x, y) == pytest.approx(10.0, abs=0.3)
    assert M.frechet_distance(x, x) == pytest.approx(0.0, abs=1e-6)
    # fewer samples than dimensions: singular covariances stay finite and non-negative
    assert M.frechet_distance(torch.randn(5, 50), torch.randn(5, 50)) >= 0.0


def test_manifold_radii_closed_form():
    x = torch.tensor([[0.0], [1.0], [2.0], [3.0]])
    assert M.manifold_radii(x, k=1).tolist() == [1.0, 1.0, 1.0, 1.0]
    assert M.manifold_radii(x, k=2).tolist() == [2.0, 1.0, 1.0, 2.0]  # 2nd nearest other point
    assert M.manifold_radii(x, k=3, chunk=3).tolist() == [3.0, 2.0, 2.0, 3.0]  # chunked rows agree
    with pytest.raises(ValueError, match="more than k=3"):
        M.manifold_radii(x[:3], k=3)


def test_precision_recall_closed_form():
    real = torch.tensor([[0.0], [1.0], [2.0], [3.0]])  # k=1 balls of radius 1 around each
    fake = torch.tensor([[3.9], [4.5], [-0.5], [1.5]])  # 4.5 is 1.5 from 3: outside; the rest inside
    # fake radii (k=1): -0.5 -> 2.0, 1.5 -> 2.0, 3.9 -> 0.6, 4.5 -> 0.6: every real point is covered
    assert M.precision_recall(real, fake, k=1) == (0.75, 1.0)
    # mode collapse: every sample next to one real point -> full precision, recall 1/N
    line = torch.arange(100.0)[:, None]
    collapsed = 50.0 + 1e-3 * torch.arange(10.0)[:, None]
    assert M.precision_recall(line, collapsed, k=3) == (1.0, 0.01)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 8, generator=g)
    assert M.precision_recall(x, x.numpy()) == (1.0, 1.0)  # a perfect generator; numpy input too
    assert M.precision_recall(x, x + 100.0) == (0.0, 0.0)  # disjoint sets


def test_inception_score_limits():
    # N confident predictions spread evenly over C classes: KL = log C for each -> IS = C
    logits = 50.0 * torch.eye(4).repeat(3, 1)  # 12 samples, 4 classes, near one-hot
    assert M.inception_score(logits) == pytest.approx(4.0, rel=1e-6)
    # identical predictions for every sample: p(y|x) = p(y) -> KL = 0 -> IS = 1
    assert M.inception_score(torch.randn(1, 5).repeat(8, 1)) == pytest.approx(1.0, abs=1e-9)
