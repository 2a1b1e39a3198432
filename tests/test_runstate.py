"""rcdm.runstate: claiming an output folder by run identity, temp-file cleanup, done markers (local and S3)."""

from __future__ import annotations

import json

import pytest

from rcdm import runstate, storage


class StageError(ValueError):
    pass


def _claim(out: str, identity: dict, config: dict | None = None) -> None:
    runstate.claim_output(
        out, identity, config or {}, manifest="manifest.json", pieces_dir="pieces", holds="pieces",
        writer="the test stage", error=StageError,
    )  # fmt: skip


def test_identity_differences_name_each_nested_leaf():
    stored = {"n": 2, "encoder": {"name": "dino", "dim": 2048}}
    now = {"n": 2, "encoder": {"name": "simclr", "dim": 2048}, "seed": 1}
    assert runstate.identity_differences(stored, now) == [
        "encoder.name: 'dino' there, 'simclr' now",
        "seed: None there, 1 now",
    ]
    assert runstate.identity_differences(now, now) == []


def test_claim_output_records_then_accepts_the_same_run_and_refuses_another(tmp_path):
    out = str(tmp_path / "out")
    identity = {"n": 2, "sampler": {"name": "ddim", "steps": 10}}
    _claim(out, identity, {"out": out})
    url = storage.join(out, runstate.PROGRESS_DIR, runstate.IDENTITY)
    assert storage.read_json(url) == {"identity": identity, "config": {"out": out}}
    _claim(out, identity)  # a rerun of the same run resumes
    other = {"n": 2, "sampler": {"name": "ddim", "steps": 25}}
    with pytest.raises(
        StageError, match=r"holds pieces of a different run \(sampler.steps: 10 there, 25 now\)"
    ):
        _claim(out, other)
    assert storage.read_json(url)["identity"] == identity  # left as it was


def test_claim_output_refuses_a_folder_of_an_unknown_writer(tmp_path):
    (tmp_path / "pieces").mkdir()
    (tmp_path / "pieces" / "000000.tar").write_bytes(b"x")
    with pytest.raises(StageError, match="already holds pieces but no _progress/config.json"):
        _claim(str(tmp_path), {"n": 1})
    (tmp_path / "pieces" / "000000.tar").unlink()
    (tmp_path / "manifest.json").write_text("{}")
    with pytest.raises(StageError, match="not written by the test stage"):
        _claim(str(tmp_path), {"n": 1})
    assert not (tmp_path / runstate.PROGRESS_DIR).exists()


def test_remove_temp_files_removes_only_temp_names(tmp_path):
    kept = ["a.tar", "pieces/000000.tar", "_progress/000000.json", "pieces/notes.tmp", "other/.x.abc.tmp"]
    temps = [".manifest.json.abc.tmp", "pieces/.000001.tar.def.tmp", "_progress/.000001.json.ghi.tmp"]
    for rel in kept + temps:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    runstate.remove_temp_files(str(tmp_path), ["pieces"])
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()) == sorted(kept)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_read_markers_fetches_each_by_name(where, tmp_path, request):
    out = str(tmp_path) if where == "local" else request.getfixturevalue("s3_bucket") + "/out"
    markers = {"000000.json": {"shard": 0, "count": 3}, "000002.json": {"shard": 2, "count": 1}}
    for name, marker in markers.items():
        storage.write_bytes_atomic(
            storage.join(out, runstate.PROGRESS_DIR, name), json.dumps(marker).encode()
        )
    runstate.forget_listings(out)
    names = storage.listdir(storage.join(out, runstate.PROGRESS_DIR))
    assert names == sorted(markers)
    assert runstate.read_markers(out, names) == markers
    assert runstate.read_markers(out, ["000002.json"]) == {"000002.json": markers["000002.json"]}
    assert runstate.read_markers(out, []) == {}
