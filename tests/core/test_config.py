"""Strict typed configs: unknown keys and wrong types are clear errors."""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Literal

import pytest

from geomerase.core.config import ConfigError, add_config_args, config_keys_help, field_docs, load_config, to_dict
from geomerase.core.trainer import RunConfig, TrainConfig
from geomerase.train import main as train_main


def test_shipped_config_loads_with_overrides():
    cfg = load_config(RunConfig, "configs/tiny_cpu.yaml", ["train.max_steps=5", "out_dir=/tmp/x", "train.lr=1"])
    assert cfg.train.max_steps == 5 and cfg.out_dir == "/tmp/x"
    assert isinstance(cfg.train.lr, float) and cfg.train.lr == 1.0  # ints widen to float
    assert to_dict(cfg)["model"]["size"] == "tiny"


def test_unknown_key_names_file_and_key(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("train:\n  max_stepz: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(RunConfig, p)
    assert "train.max_stepz" in str(e.value) and str(p) in str(e.value)


def test_unknown_override_key():
    with pytest.raises(ConfigError, match="model.sise"):
        load_config(RunConfig, "configs/tiny_cpu.yaml", ["model.sise=tiny"])


def test_wrong_types_are_errors():
    with pytest.raises(ConfigError, match="train.max_steps"):
        load_config(RunConfig, "configs/tiny_cpu.yaml", ["train.max_steps=abc"])
    with pytest.raises(ConfigError, match="train.mode"):
        load_config(RunConfig, "configs/tiny_cpu.yaml", ["train.mode=full"])
    with pytest.raises(ConfigError, match="captions.shuffle_cells"):
        load_config(RunConfig, "configs/tiny_cpu.yaml", ["captions.shuffle_cells=3"])
    with pytest.raises(ConfigError):
        load_config(RunConfig, "configs/tiny_cpu.yaml", ["train=5"])


def test_partial_section_keeps_the_fields_default_not_the_class_default():
    # DemoConfig.captions defaults to tuned values (a default_factory); overriding one key
    # must keep the others. Before the fix, captions.concept_only_prob=0.3 silently reset
    # concept_first_prob to 0 and shuffle_cells to False (CaptionConfig's own defaults).
    from geomerase.demo import DemoConfig

    default = DemoConfig().captions
    assert default.concept_first_prob > 0 and default.shuffle_cells
    cfg = load_config(DemoConfig, None, ["captions.concept_only_prob=0.3"])
    assert cfg.captions.concept_only_prob == 0.3
    assert cfg.captions.concept_first_prob == default.concept_first_prob
    assert cfg.captions.shuffle_cells is True and cfg.captions.mode == default.mode
    # Nested unknown keys are still errors, named with their path.
    with pytest.raises(ConfigError, match="captions.concept_only"):
        load_config(DemoConfig, None, ["captions.concept_only=0.3"])


def test_missing_file():
    with pytest.raises(ConfigError, match="not found"):
        load_config(RunConfig, "configs/nope.yaml")


def test_every_config_field_is_documented():
    from geomerase.core.captions import CaptionConfig
    from geomerase.core.models import ModelConfig
    from geomerase.data.loader import DataConfig

    for cls in (RunConfig, TrainConfig, ModelConfig, DataConfig, CaptionConfig):
        import dataclasses

        names = {f.name for f in dataclasses.fields(cls)}
        assert names <= set(field_docs(cls)), f"{cls.__name__} fields without docstring: {names - set(field_docs(cls))}"


def test_train_cli_reports_bad_key(capsys):
    assert train_main(["--config", "configs/tiny_cpu.yaml", "train.bogus=1"]) == 2
    assert "train.bogus" in capsys.readouterr().err


@dataclass
class _Inner:
    depth: int = 2
    """How deep."""


@dataclass
class _Knobs:
    steps: int = 25
    """Denoising steps."""
    scale: float = 3.0
    """Guidance scale (100% is 1)."""
    mode: Literal["cells", "corner"] = "cells"
    """Which cells count."""
    address: str | None = None
    """Cluster to join."""
    fast: bool = False
    """Skip the slow part."""
    names: list[str] = field(default_factory=lambda: ["a", "b"])
    """Names in order."""
    inner: _Inner = field(default_factory=lambda: _Inner(depth=5))
    """A section."""


def test_add_config_args_takes_type_default_choices_and_help_from_the_field():
    ap = argparse.ArgumentParser()
    add_config_args(ap, _Knobs, ["steps", "scale", "mode", "address", "fast"], dest_prefix="k_")
    a = ap.parse_args([])
    assert (a.k_steps, a.k_scale, a.k_mode, a.k_address, a.k_fast) == (25, 3.0, "cells", None, False)
    a = ap.parse_args(["--steps", "7", "--scale", "2", "--mode", "corner", "--address", "auto", "--fast"])
    assert (a.k_steps, a.k_scale, a.k_mode, a.k_address, a.k_fast) == (7, 2.0, "corner", "auto", True)
    assert isinstance(a.k_scale, float)
    help_text = " ".join(ap.format_help().split())
    for text in ("--steps STEPS Denoising steps. (default: 25)", "Guidance scale (100% is 1). (default: 3.0)",
                 "--mode {cells,corner} Which cells count. (default: cells)", "Cluster to join. (default: None)",
                 "--fast, --no-fast Skip the slow part."):
        assert text in help_text
    for bad in (["--mode", "rows"], ["--steps", "2.5"]):
        with pytest.raises(SystemExit):
            ap.parse_args(bad)
    with pytest.raises(KeyError, match="no field 'stepz'"):
        add_config_args(argparse.ArgumentParser(), _Knobs, ["stepz"])
    with pytest.raises(TypeError, match="_Knobs.names"):
        add_config_args(argparse.ArgumentParser(), _Knobs, ["names"])


def test_config_keys_help_lists_every_key_with_the_fields_default():
    text = config_keys_help(_Knobs)
    for line in ("  steps=25", "      Denoising steps.", "  address=null", "  fast=false", "  names=[a, b]",
                 "  inner.depth=5", "      How deep."):  # the field's default_factory, not _Inner's own
        assert line in text.splitlines()
    assert "train.max_steps=1000" in config_keys_help(RunConfig)
