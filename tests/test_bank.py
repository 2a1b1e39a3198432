"""rcdm.bank: building a bank from shards (row mapping) and exact chunked k-NN against brute force."""

from __future__ import annotations

import numpy as np
import pytest

from rcdm import bank, shards, storage

DIM = 12


def _write_shard_set(root: str, counts: list[int], dtype: str = "float32", seed: int = 0) -> dict:
    """Shards with known features (sample j of shard s has label (s + j) % 3, or none when j == 1)."""
    rng = np.random.default_rng(seed)
    entries = []
    for s, count in enumerate(counts):
        samples = []
        for j in range(count):
            feat = rng.standard_normal(DIM).astype(np.float32)
            image = np.full((4, 4, 3), s * 16 + j, np.uint8)
            label = None if j == 1 else (s + j) % 3
            samples.append(shards.encode_sample(f"s{s}_j{j}", image, feat, -feat, label=label, dtype=dtype))
        storage.write_bytes_atomic(storage.join(root, shards.shard_name(s)), shards.write_tar(samples))
        entries.append({"name": shards.shard_name(s), "count": count})
    return {
        "format": shards.FORMAT,
        "encoder": {"name": "test", "head": False, "feature_dim": DIM},
        "feature_dtype": dtype,
        "labels": {"classes": ["a", "b", "c"]},
        "shards": entries,
        "total": sum(counts),
    }


def _expected_rows(counts: list[int], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([rng.standard_normal(DIM).astype(np.float32) for c in counts for _ in range(c)])


def test_bank_of_three_shards_maps_rows_to_shard_and_offset(tmp_path):
    counts = [3, 5, 2]
    manifest = _write_shard_set(str(tmp_path), counts)
    url = bank.build_bank(str(tmp_path), manifest, include_flip=True)
    assert url == str(tmp_path / "bank.h5")
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    with bank.FeatureBank(url) as b:
        assert len(b) == 10 and b.dim == DIM and b.classes == ["a", "b", "c"]
        assert b.encoder["name"] == "test"
        assert b.shard.tolist() == [0, 0, 0, 1, 1, 1, 1, 1, 2, 2]
        assert b.offset.tolist() == [0, 1, 2, 0, 1, 2, 3, 4, 0, 1]
        assert b.keys == [f"s{s}_j{j}" for s, c in enumerate(counts) for j in range(c)]
        assert b.labels.tolist() == [
            -1 if j == 1 else (s + j) % 3 for s, c in enumerate(counts) for j in range(c)
        ]
        expected = _expected_rows(counts)
        assert np.array_equal(np.concatenate([c for _, c in b.chunks(chunk=4)]), expected)
        assert [start for start, _ in b.chunks(chunk=4)] == [0, 4, 8]
        assert np.array_equal(b.get([7, 0, 7]), expected[[7, 0, 7]])
        assert np.array_equal(b.get([2], flip=True), -expected[[2]])
        # each row agrees with the sample found through (shard, offset)
        for row in (0, 4, 9):
            url_s = storage.join(str(tmp_path), manifest["shards"][b.shard[row]]["name"])
            sample = list(shards.read_shard(url_s))[b.offset[row]]
            assert sample.key == b.keys[row] and np.array_equal(sample.feature, expected[row])


def test_bank_refuses_a_shard_with_the_wrong_count(tmp_path):
    manifest = _write_shard_set(str(tmp_path), [2, 2])
    manifest["shards"][1]["count"] = 3
    with pytest.raises(shards.ManifestError, match="holds 2 samples but the manifest says 3"):
        bank.build_bank(str(tmp_path), manifest)
    assert not (tmp_path / "bank.h5").exists()


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_knn_matches_brute_force(tmp_path, metric):
    counts = [13, 9, 11]
    manifest = _write_shard_set(str(tmp_path), counts, seed=1)
    data = _expected_rows(counts, seed=1).astype(np.float64)  # (33, D)
    queries = np.random.default_rng(2).standard_normal((7, DIM))
    if metric == "cosine":
        unit = data / np.linalg.norm(data, axis=1, keepdims=True)
        scores = (queries / np.linalg.norm(queries, axis=1, keepdims=True)) @ unit.T
        order = np.argsort(-scores, axis=1)
    else:
        scores = np.linalg.norm(queries[:, None] - data[None], axis=2)
        order = np.argsort(scores, axis=1)
    k = 10  # more than a chunk of 4 rows: exercises merging across chunks
    with bank.FeatureBank(bank.build_bank(str(tmp_path), manifest)) as b:
        got_s, got_i = b.knn(queries.astype(np.float32), k=k, metric=metric, chunk=4)
        assert got_s.shape == got_i.shape == (7, k)
        assert np.array_equal(got_i, order[:, :k])
        np.testing.assert_allclose(got_s, np.take_along_axis(scores, order[:, :k], 1), rtol=1e-4, atol=1e-5)
        # k larger than the bank gives every row once
        _, all_i = b.knn(queries[:1], k=100, metric=metric)
        assert sorted(all_i[0].tolist()) == list(range(33))


def test_knn_rejects_wrong_dims(tmp_path):
    manifest = _write_shard_set(str(tmp_path), [2])
    with bank.FeatureBank(bank.build_bank(str(tmp_path), manifest)) as b:
        with pytest.raises(ValueError, match=f"queries must be \\(Q, {DIM}\\)"):
            b.knn(np.zeros((2, DIM + 1)), k=1)


def test_bank_on_s3(s3_bucket):
    root = f"{s3_bucket}/feats"
    manifest = _write_shard_set(root, [3, 2], dtype="float16")
    url = bank.build_bank(root, manifest)
    with bank.FeatureBank(url) as b:
        assert len(b) == 5 and b.shard.tolist() == [0, 0, 0, 1, 1]
        expected = _expected_rows([3, 2]).astype(np.float16).astype(np.float32)
        assert np.array_equal(b.get(range(5)), expected)
