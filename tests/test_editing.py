"""rcdm.editing: interpolation closed forms, RCDM's common-dims rule, the dense-feature guard, exact k-NN."""

from __future__ import annotations

import math

import pytest
import torch

from rcdm import editing


def test_ratios_cover_the_whole_range():
    assert editing.ratios(5).tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    with pytest.raises(editing.EditingError, match="at least 2"):
        editing.ratios(1)


@pytest.mark.parametrize("mode", ["linear", "slerp"])
def test_interpolation_ends_are_exactly_the_endpoint_features(mode):
    g = torch.Generator().manual_seed(0)
    f1, f2 = torch.rand(64, generator=g), torch.rand(64, generator=g) * 3
    path = editing.interpolate_features(f1, f2, editing.ratios(7), mode)
    assert path.shape == (7, 64) and path.dtype == torch.float32
    assert torch.equal(path[0], f1) and torch.equal(path[-1], f2)


def test_lerp_midpoint():
    f = editing.interpolate_features(torch.tensor([0.0, 2.0]), torch.tensor([2.0, 0.0]), torch.tensor([0.5]))
    assert f.tolist() == [[1.0, 1.0]]  # (1 - 0.5) * (0, 2) + 0.5 * (2, 0)


def test_slerp_of_orthogonal_unit_vectors_stays_on_the_circle():
    r = torch.tensor([0.0, 1 / 3, 0.5, 1.0], dtype=torch.float64)
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    path = editing.interpolate_features(e1, e2, r, "slerp")
    # theta = pi/2: slerp(r) = (cos(r pi/2), sin(r pi/2)), a point of the unit circle
    expected = torch.stack([torch.cos(r * math.pi / 2), torch.sin(r * math.pi / 2)], 1).float()
    torch.testing.assert_close(path, expected, atol=1e-7, rtol=0)
    torch.testing.assert_close(path.norm(dim=1), torch.ones(4), atol=1e-6, rtol=0)


def test_slerp_of_parallel_vectors_is_linear_and_of_zero_is_refused():
    f1 = torch.tensor([1.0, 2.0])
    r = torch.tensor([0.25])
    assert editing.slerp(f1, 3 * f1, r).tolist() == editing.lerp(f1, 3 * f1, r).tolist() == [[1.5, 3.0]]
    with pytest.raises(editing.EditingError, match="mode=linear"):
        editing.slerp(f1, torch.zeros(2), r)
    with pytest.raises(editing.EditingError, match="unknown interpolation mode"):
        editing.interpolate_features(f1, f1, r, "cubic")


# A hand-made neighbourhood: k = 5 neighbours, D = 6 dims. Non-zero counts per dim: 5, 4, 3, 1, 0, 4.
NEIGHBOURS = torch.tensor(
    [
        [1.0, 0.5, 0.2, 0.0, 0.0, 0.1],
        [2.0, 0.1, 0.3, 0.0, 0.0, 0.2],
        [0.5, 0.7, 0.0, 0.0, 0.0, 0.3],
        [1.5, 0.0, 0.0, 0.9, 0.0, 0.4],
        [0.2, 0.3, 0.4, 0.0, 0.0, 0.0],
    ]
)


def test_nonzero_rule_keeps_dims_non_zero_in_more_than_common_neighbours():
    # more than 3 of 5: dims 0 (5) and 1, 5 (4 each); dim 2 (exactly 3) is not "more than 3"
    assert editing.common_dims(NEIGHBOURS, common=3).tolist() == [0, 1, 5]
    assert editing.common_dims(NEIGHBOURS, common=4).tolist() == [0]
    assert editing.common_dims(NEIGHBOURS, common=0).tolist() == [0, 1, 2, 3, 5]
    # a positive per-row scale (the L2 normalisation) changes nothing
    assert editing.common_dims(editing.l2_normalize(NEIGHBOURS), common=3).tolist() == [0, 1, 5]


def test_nonzero_rule_refuses_dense_features_and_points_to_top_magnitude():
    dense = torch.randn(20, 64, generator=torch.Generator().manual_seed(0))  # no exact zeros
    with pytest.raises(editing.EditingError, match="rule=top_magnitude") as err:
        editing.common_dims(dense, common=14)
    assert "dense" in str(err.value) and "0.00% exact zeros" in str(err.value)


def test_top_magnitude_rule_counts_each_neighbours_top_m_dims():
    # top-2 |values| per row: {0,1}, {0,2}, {1,0}, {0,3}, {2,1}: dim 0 x4, dim 1 x3, dim 2 x2, dim 3 x1
    assert editing.common_dims(NEIGHBOURS, common=3, rule="top_magnitude", top_m=2).tolist() == [0]
    assert editing.common_dims(NEIGHBOURS, common=2, rule="top_magnitude", top_m=2).tolist() == [0, 1]
    dense = torch.randn(20, 50, generator=torch.Generator().manual_seed(1))
    dense[:, 7] = 10.0  # one dim strongly active in every neighbour
    dims = editing.common_dims(dense, common=14, rule="top_magnitude")  # top_m = 10% of 50 = 5
    assert dims.tolist() == [7]


def test_common_must_be_below_k_and_rule_must_be_known():
    with pytest.raises(editing.EditingError, match=r"\[0, k\) with k = 5"):
        editing.common_dims(NEIGHBOURS, common=5)
    with pytest.raises(editing.EditingError, match="unknown rule"):
        editing.common_dims(NEIGHBOURS, common=3, rule="largest")
    with pytest.raises(editing.EditingError, match="top_m = 7"):
        editing.common_dims(NEIGHBOURS, common=3, rule="top_magnitude", top_m=7)


def test_manipulated_features_zero_and_transplant_the_common_dims():
    source, target = torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([9.0, 8.0, 7.0, 6.0])
    rows = editing.manipulated_features(source, target, torch.tensor([1, 3]))
    assert rows.tolist() == [[1, 2, 3, 4], [1, 0, 3, 0], [1, 8, 3, 6]]
    assert source.tolist() == [1, 2, 3, 4]  # inputs untouched


def test_knn_exact_matches_a_full_sort_whatever_the_chunk_size():
    g = torch.Generator().manual_seed(3)
    pool, queries = torch.randn(50, 8, generator=g), torch.randn(4, 8, generator=g)
    pool[10] = pool[3] * 2  # a tie in cosine similarity: the lower index must come first
    cos = editing.l2_normalize(queries) @ editing.l2_normalize(pool).T  # (4, 50)
    expected = torch.sort(cos, dim=1, descending=True, stable=True)
    for chunk in (7, 50, 1000):
        sims, idx = editing.knn_exact(queries, pool, k=6, chunk_size=chunk)
        assert torch.equal(idx, expected.indices[:, :6])
        torch.testing.assert_close(sims, expected.values[:, :6])
    _, idx = editing.knn_exact(pool[3:4], pool, k=2, chunk_size=4)
    assert idx.tolist() == [[3, 10]]
    with pytest.raises(editing.EditingError, match="pool holds 50"):
        editing.knn_exact(queries, pool, k=51)
