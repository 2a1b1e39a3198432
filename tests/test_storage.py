"""rcdm.storage: atomic writes publish whole files with the mode a plain open() would give."""

from __future__ import annotations

import os

import pytest

from rcdm import storage


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_atomic_writes_take_the_umask_mode(tmp_path, mask):
    old = os.umask(mask)
    try:
        storage.write_bytes_atomic(str(tmp_path / "a.bin"), b"abc")
        storage.write_json_atomic(str(tmp_path / "b.json"), {"x": 1})
        with open(tmp_path / "plain", "wb"):
            pass
    finally:
        os.umask(old)
    expected = 0o666 & ~mask
    assert (tmp_path / "plain").stat().st_mode & 0o777 == expected  # what open() gives
    for name in ("a.bin", "b.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == expected, name
    assert (tmp_path / "a.bin").read_bytes() == b"abc"
    assert [p.name for p in tmp_path.iterdir() if storage.is_temp_name(p.name)] == []
