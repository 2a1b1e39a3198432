"""rcdm.data: the order of the training stream (coverage, determinism, resume), flips, and bad data."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from rcdm import data, shards, storage
from rcdm.data import DataError, FeatureStream, ShardSet


def write_feature_set(
    root: str,
    counts: list[int],
    *,
    dim: int = 8,
    size: int = 16,
    encoder: str = "toy",
    nan_key: str | None = None,
    with_counts: bool = True,
    seed: int = 0,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """A stage-one output at ``root`` (local or s3://): shards of ``counts`` samples and a manifest.

    Features are stored as float32 and ``feat_flip = -feat`` so a test can tell them apart. Returns
    {key: (image, feat)}.
    """
    rng = np.random.default_rng(seed)
    entries, stored = [], {}
    for s, n in enumerate(counts):
        samples = []
        for i in range(n):
            key = f"s{s}_{i:04d}"
            image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            feat = rng.standard_normal(dim).astype(np.float32)
            if key == nan_key:
                feat[dim // 2] = np.nan
            samples.append(shards.encode_sample(key, image, feat, -feat, dtype="float32"))
            stored[key] = (image, feat)
        storage.write_bytes_atomic(storage.join(root, shards.shard_name(s)), shards.write_tar(samples))
        entry = {"name": shards.shard_name(s)}
        if with_counts:
            entry["count"] = n
        entries.append(entry)
    manifest = {
        "format": shards.FORMAT,
        "encoder": {"name": encoder, "head": False, "feature_dim": dim},
        "image": {"size": size},
        "shards": entries,
    }
    storage.write_json_atomic(storage.join(root, shards.MANIFEST), manifest)
    return stored


def _stream(shard_set: ShardSet, rank: int = 0, world: int = 1, micro: int = 3, start: int = 0, **kw):
    opts = dict(seed=7, shuffle_buffer=8, flip=False, feature_dim=8, image_size=16)
    opts.update(kw)
    return FeatureStream(shard_set, micro_batch=micro, rank=rank, world_size=world, start_batch=start, **opts)


def _rank_batches(stream: FeatureStream, num_workers: int, n: int) -> list[dict]:
    """The first n batches of a rank, as a DataLoader with ``num_workers`` hands them out (in turn)."""
    its = [stream.batches(w, num_workers) for w in range(num_workers)]
    return [next(its[b % num_workers]) for b in range(n)]


# --- the order, without data ----------------------------------------------------------------------


@pytest.mark.parametrize("counts, streams", [([10, 10, 10, 3], 4), ([10, 10, 10, 3], 2), ([5, 7], 4)])
def test_every_epoch_reads_each_sample_exactly_once(counts, streams):
    """Shard split (>= as many shards as streams) and sample split (fewer) both partition an epoch."""
    for epoch in range(3):
        seen = []
        for j in range(streams):
            for u in data.epoch_units(counts, 1, epoch, j, streams):
                seen += [(u.shard, i) for i in range(u.start, counts[u.shard], u.step)]
                assert u.count == len(range(u.start, counts[u.shard], u.step))
        assert sorted(seen) == [(s, i) for s, n in enumerate(counts) for i in range(n)]


def test_epochs_permute_shards_differently():
    orders = {tuple(u.shard for u in data.epoch_units([5] * 8, 3, e, 0, 1)) for e in range(4)}
    assert len(orders) > 1


def test_groups_hold_at_least_the_shuffle_buffer():
    units = data.epoch_units([10, 10, 10, 3], 0, 0, 0, 1)
    groups = data.group_units(units, 15)
    sizes = [sum(u.count for u in g) for g in groups]
    assert sum(sizes) == 33 and all(s >= 15 for s in sizes[:-1])
    assert [len(g) for g in data.group_units(units, 0)] == [1, 1, 1, 1]  # no mixing across shards


@pytest.mark.parametrize("counts, streams", [([10, 10, 10, 3], 2), ([5, 7], 4)])
def test_locate_walks_epoch_lengths(counts, streams):
    lengths = [data.epoch_length(counts, 5, e, 1, streams) for e in range(6)]
    for skip in (0, 1, lengths[0] - 1, lengths[0], sum(lengths[:3]) + 2):
        epoch, offset = data.locate(counts, 5, 1, streams, skip)
        assert sum(lengths[:epoch]) + offset == skip and 0 <= offset < lengths[epoch]


# --- the stream over real shards ------------------------------------------------------------------


@pytest.fixture(scope="module")
def uneven(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("uneven"))
    stored = write_feature_set(root, [10, 10, 10, 3])
    return data.open_shards(root, feature_dim=8, image_size=16), stored


def test_open_shards_reads_counts(uneven):
    shard_set, _ = uneven
    assert shard_set.counts == (10, 10, 10, 3) and shard_set.total == 33
    assert shard_set.urls[0].endswith("shards/000000.tar")


def test_batches_have_the_contract_shapes_and_values(uneven):
    shard_set, stored = uneven
    batch = next(_stream(shard_set, micro=5).batches(0, 1))
    assert batch["x"].shape == (5, 3, 16, 16) and batch["x"].dtype == torch.float32
    assert batch["feat"].shape == (5, 8) and batch["feat"].dtype == torch.float32
    for i, key in enumerate(batch["keys"]):
        image, feat = stored[key]
        # to_model: pixel / 127.5 - 1 (guided-diffusion's range)
        expected = torch.from_numpy(image).permute(2, 0, 1).float() / 127.5 - 1
        assert torch.equal(batch["x"][i], expected) and torch.equal(batch["feat"][i], torch.from_numpy(feat))


def test_two_ranks_two_workers_see_each_sample_once_per_epoch(uneven):
    """With as many streams as shards, each stream reads one shard per epoch: 33 samples, each once."""
    shard_set, _ = uneven
    keys = []
    for rank in range(2):
        s = _stream(shard_set, rank=rank, world=2, micro=1, shuffle_buffer=0)
        for w in range(2):
            stream = rank * 2 + w
            n = data.epoch_length(shard_set.counts, 7, 0, stream, 4)
            keys += [raw["__key__"] for raw, _ in itertools.islice(s.samples(stream, 4), n)]
    assert sorted(keys) == sorted(f"s{s}_{i:04d}" for s, n in enumerate([10, 10, 10, 3]) for i in range(n))


def test_stream_is_deterministic_and_resumes_exactly(uneven):
    """A rank that has consumed k batches continues with batch k of the uninterrupted stream, also when
    the DataLoader worker that serves it changes (k odd with 2 workers)."""
    shard_set, _ = uneven
    full = _rank_batches(_stream(shard_set, rank=1, world=2), 2, 14)
    again = _rank_batches(_stream(shard_set, rank=1, world=2), 2, 14)
    assert [b["keys"] for b in full] == [b["keys"] for b in again]
    for k in (1, 4, 7):
        resumed = _rank_batches(_stream(shard_set, rank=1, world=2, start=k), 2, 14 - k)
        assert [b["keys"] for b in resumed] == [b["keys"] for b in full[k:]]
        assert all(torch.equal(a["x"], b["x"]) for a, b in zip(resumed, full[k:]))
    # 14 batches x 3 = 42 samples from rank 1's ~16-sample epochs: the stream wrapped into new epochs
    # with a new order
    assert len({k for b in full for k in b["keys"]}) < 42


def test_dataloader_hands_out_worker_batches_in_turn(uneven):
    shard_set, _ = uneven
    stream = _stream(shard_set, rank=0, world=2, start=3)
    loader = data.make_loader(stream, num_workers=2)
    got = [b["keys"] for b in itertools.islice(iter(loader), 6)]
    assert got == [b["keys"] for b in _rank_batches(_stream(shard_set, rank=0, world=2), 2, 9)[3:]]


def test_flip_mirrors_the_image_and_uses_feat_flip(uneven):
    shard_set, stored = uneven
    batch = next(_stream(shard_set, micro=33, flip=True).batches(0, 1))
    flipped = 0
    for i, key in enumerate(batch["keys"]):
        image, feat = stored[key]
        x = ((batch["x"][i] + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
        if np.array_equal(x, image):
            assert np.array_equal(batch["feat"][i].numpy(), feat)
        else:
            assert np.array_equal(x, image[:, ::-1]) and np.array_equal(batch["feat"][i].numpy(), -feat)
            flipped += 1
    assert 5 < flipped < 28  # Binomial(33, 1/2): outside this range with probability < 1e-4


def test_nan_feature_stops_the_stream_with_its_key(tmp_path):
    write_feature_set(str(tmp_path), [6, 6], nan_key="s1_0002")
    shard_set = data.open_shards(str(tmp_path), feature_dim=8, image_size=16)
    batches = list(itertools.islice(iter(_stream(shard_set, micro=4)), 5))
    assert "error" in batches[-1] and len(batches) <= 4
    assert "s1_0002" in batches[-1]["error"] and "non-finite feat" in batches[-1]["error"]


# --- refusing bad data ----------------------------------------------------------------------------


def test_manifest_mismatch_names_the_fix(tmp_path):
    write_feature_set(str(tmp_path), [3], dim=8, size=16, encoder="mobilenet_v2")
    with pytest.raises(shards.ManifestError, match=r"8-d features \(expected 1280-d\).*model.feature_dim=8"):
        data.open_shards(str(tmp_path), feature_dim=1280, image_size=16)
    with pytest.raises(shards.ManifestError, match=r"16px images \(expected 32px\).*model.image_size=16"):
        data.open_shards(str(tmp_path), feature_dim=8, image_size=32)
    with pytest.raises(shards.ManifestError, match=r"encoder 'mobilenet_v2' \(expected 'dino'\)"):
        data.open_shards(str(tmp_path), feature_dim=8, image_size=16, encoder="dino")


def test_missing_empty_and_stale_shards_are_refused(tmp_path):
    with pytest.raises(shards.ManifestError, match="stage one has not finished"):
        data.open_shards(str(tmp_path / "nothing"), feature_dim=8, image_size=16)
    with pytest.raises(DataError, match="set data.shards"):
        data.open_shards("", feature_dim=8, image_size=16)
    root = str(tmp_path / "a")
    write_feature_set(root, [3, 4, 5])
    storage.remove(storage.join(root, shards.shard_name(1)))
    with pytest.raises(DataError, match=r"1 of the 3 shards .* missing: .*000001.tar"):
        data.open_shards(root, feature_dim=8, image_size=16)
    manifest = storage.read_json(storage.join(root, shards.MANIFEST))
    storage.write_json_atomic(storage.join(root, shards.MANIFEST), {**manifest, "shards": []})
    with pytest.raises(DataError, match="lists no shards"):
        data.open_shards(root, feature_dim=8, image_size=16)
    # a manifest whose count disagrees with its shard: found when the shard is read
    manifest["shards"] = [{"name": shards.shard_name(0), "count": 4}]
    storage.write_json_atomic(storage.join(root, shards.MANIFEST), manifest)
    shard_set = data.open_shards(root, feature_dim=8, image_size=16)
    batch = next(iter(_stream(shard_set, micro=2)))
    assert "holds 3 samples but the manifest says 4" in batch["error"]


def test_counts_are_read_from_the_shards_when_the_manifest_has_none(tmp_path):
    write_feature_set(str(tmp_path), [3, 5], with_counts=False)
    assert data.open_shards(str(tmp_path), feature_dim=8, image_size=16).counts == (3, 5)


def test_stream_from_s3(s3_bucket):
    root = storage.join(s3_bucket, "feats")
    stored = write_feature_set(root, [4, 4, 4])
    shard_set = data.open_shards(root, feature_dim=8, image_size=16)
    assert shard_set.urls[0].startswith("s3://")
    batch = next(_stream(shard_set, micro=12).batches(0, 1))
    assert sorted(batch["keys"]) == sorted(stored)


# --- feature statistics -----------------------------------------------------------------------------


def test_feature_statistics_from_bank_and_from_shards_match_numpy(tmp_path):
    from rcdm.bank import build_bank

    root = str(tmp_path / "feats")
    stored = write_feature_set(root, [5, 7, 4], seed=3)
    feats = np.stack([f for _, f in stored.values()])
    both = np.concatenate([feats, -feats]).astype(np.float64)  # the stored mirrors are -feat
    shard_set = data.open_shards(root, feature_dim=8, image_size=16)
    mean, std = data.feature_statistics(shard_set)
    np.testing.assert_allclose(mean.numpy(), both.mean(0), atol=1e-6)
    np.testing.assert_allclose(std.numpy(), both.std(0, ddof=1), rtol=1e-5)

    manifest = shards.read_manifest(root)
    manifest["bank"] = shards.BANK
    manifest["feature_dtype"] = "float32"  # the bank stores the manifest's dtype (float16 by default)
    storage.write_json_atomic(storage.join(root, shards.MANIFEST), manifest)
    build_bank(root, manifest, include_flip=True)
    from_bank = data.feature_statistics(data.open_shards(root, feature_dim=8, image_size=16))
    torch.testing.assert_close(from_bank, (mean, std))
    _, sub_std = data.feature_statistics(data.open_shards(root, feature_dim=8, image_size=16), max_samples=2)
    ends = np.concatenate([feats[[0, -1]], -feats[[0, -1]]]).astype(np.float64)  # the first and last rows
    np.testing.assert_allclose(sub_std.numpy(), ends.std(0, ddof=1), rtol=1e-5)


def test_feature_statistics_floor_constant_dimensions(tmp_path):
    root = str(tmp_path / "feats")
    samples = [
        shards.encode_sample(
            f"k{i}",
            np.zeros((16, 16, 3), np.uint8),
            np.array([float(i), 0.0, 2.0 * i], np.float32),
            np.array([float(i), 0.0, 2.0 * i], np.float32),
            dtype="float32",
        )
        for i in range(4)
    ]
    storage.write_bytes_atomic(storage.join(root, shards.shard_name(0)), shards.write_tar(samples))
    manifest = {"format": shards.FORMAT, "encoder": {"name": "toy", "head": False, "feature_dim": 3},
                "image": {"size": 16}, "shards": [{"name": shards.shard_name(0), "count": 4}]}  # fmt: skip
    storage.write_json_atomic(storage.join(root, shards.MANIFEST), manifest)
    mean, std = data.feature_statistics(data.open_shards(root, feature_dim=3, image_size=16))
    s1 = float(np.std([0, 0, 1, 1, 2, 2, 3, 3], ddof=1))
    torch.testing.assert_close(mean, torch.tensor([1.5, 0.0, 3.0]))
    torch.testing.assert_close(std, torch.tensor([s1, 0.01 * s1, 2 * s1]))  # floor: 1% of the median, s1
