"""rcdm.config: typed YAML loading, presets, overrides and the errors they give."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest

from rcdm.config import ConfigError, apply_overrides, from_dict, load_config, to_dict


@dataclass(frozen=True)
class Inner:
    width: int = 8
    mult: tuple[int, ...] = (1, 2)
    dim: int | None = None


@dataclass(frozen=True)
class Outer:
    name: str = "x"
    lr: float = 1e-4
    mode: Literal["a", "b"] = "a"
    flag: bool = False
    inner: Inner = field(default_factory=Inner)


def test_from_dict_converts_lists_and_ints():
    cfg = from_dict(Outer, {"lr": 1, "inner": {"mult": [1, 2, 4]}})
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)
    assert cfg.inner.mult == (1, 2, 4)


def test_unknown_key_names_key_and_source(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("inner:\n  widht: 3\n")
    with pytest.raises(ConfigError, match=r"c.yaml: unknown key 'inner.widht' for Inner"):
        load_config(Outer, path)


@pytest.mark.parametrize(
    "data, message",
    [
        ({"lr": "fast"}, "'lr' must be a number"),
        ({"flag": 1}, "'flag' must be true or false"),
        ({"mode": "c"}, r"'mode' must be one of \['a', 'b'\]"),
        ({"inner": {"width": 2.5}}, "'inner.width' must be an integer"),
        ({"inner": {"mult": "1,2"}}, "'inner.mult' must be a list"),
    ],
)
def test_type_errors(data, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(Outer, data)


def test_overrides_are_parsed_as_yaml_and_type_checked(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: base\n")
    cfg = load_config(Outer, path, ["inner.mult=[4, 8]", "inner.dim=null", "flag=true", "name=run1"])
    assert cfg.inner.mult == (4, 8) and cfg.inner.dim is None and cfg.flag and cfg.name == "run1"
    with pytest.raises(ConfigError, match="unknown key 'inner.depth'"):
        load_config(Outer, path, ["inner.depth=3"])
    with pytest.raises(ConfigError, match="must be an integer"):
        load_config(Outer, path, ["inner.width=wide"])
    with pytest.raises(ConfigError, match="key.path=value"):
        load_config(Outer, path, ["inner.width"])


def test_round_trip_through_dict():
    cfg = Outer(name="y", inner=Inner(width=3, mult=(5,), dim=7))
    assert from_dict(Outer, to_dict(cfg)) == cfg
    assert to_dict(cfg)["inner"]["mult"] == [5]


def test_presets_expand_and_then_override(tmp_path, monkeypatch):
    import rcdm.config as config

    (tmp_path / "inner").mkdir()
    (tmp_path / "inner" / "big.yaml").write_text("width: 64\nmult: [1, 2, 4]\n")
    monkeypatch.setattr(config, "CONFIGS_DIR", tmp_path)
    cfg = from_dict(Outer, {"inner": "big"})
    assert cfg.inner == Inner(width=64, mult=(1, 2, 4))
    data = apply_overrides(Outer, {"inner": "big"}, ["inner.width=32"])
    assert from_dict(Outer, data).inner.width == 32
    data = apply_overrides(Outer, {}, ["inner=big", "inner.dim=5"])
    assert from_dict(Outer, data).inner == Inner(width=64, mult=(1, 2, 4), dim=5)
    with pytest.raises(ConfigError, match=r"unknown inner preset 'huge': known presets are \['big'\]"):
        from_dict(Outer, {"inner": "huge"})


def test_dry_run_prints_resolved_config(tmp_path, capsys):
    import argparse

    from stages.cli import add_config_args, config_from_args

    path = tmp_path / "c.yaml"
    path.write_text("name: base\n")
    parser = argparse.ArgumentParser()
    add_config_args(parser, str(path))
    args = parser.parse_args(["--set", "lr=0.5", "inner.width=3", "--dry-run"])
    with pytest.raises(SystemExit) as e:
        config_from_args(Outer, args)
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "lr: 0.5" in out and "width: 3" in out and "name: base" in out


def test_config_error_exits_2_with_one_line_from_rank_0_only(tmp_path, capsys, monkeypatch):
    import argparse

    from stages.cli import add_config_args, config_from_args

    path = tmp_path / "c.yaml"
    path.write_text("name: base\n")
    parser = argparse.ArgumentParser()
    add_config_args(parser, str(path))
    args = parser.parse_args(["--set", "lr=fast"])
    for rank, says in (("0", True), ("1", False)):
        monkeypatch.setenv("RANK", rank)  # as torchrun sets it
        with pytest.raises(SystemExit) as e:
            config_from_args(Outer, args)
        assert e.value.code == 2
        err = capsys.readouterr().err
        # the value came from --set, and the message says so
        expected = f"config error: {path} with --set lr=fast: 'lr' must be a number, got 'fast'\n"
        assert err == (expected if says else "")
