"""Configs: presets load, unknown keys are named, dotted overrides apply and are typed."""

from pathlib import Path

import pytest

from steerray.artifacts import config_hash
from steerray.config import PRESETS_DIR, ConfigError, PrepareConfig, RewardConfig, load_config


def test_overrides_are_typed_and_nested():
    config = load_config(RewardConfig, None, ["train.max_steps=17", "lora.enabled=true", "optim.lr=3e-4"])
    assert config.train.max_steps == 17 and config.lora.enabled is True and config.optim.lr == 3e-4


def test_unknown_key_is_named(tmp_path: Path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  max_stepz: 3\n")
    with pytest.raises(ConfigError, match=r"train\.max_stepz: unknown key"):
        load_config(RewardConfig, path)
    with pytest.raises(ConfigError, match="not of the form key=value"):
        load_config(RewardConfig, None, ["train.max_steps"])


def test_missing_preset_lists_known_ones():
    with pytest.raises(ConfigError, match="does not exist; presets: .*demo/prepare"):
        load_config(PrepareConfig, "nope/prepare")


def test_hash_is_stable_and_sensitive():
    a, b = PrepareConfig(), PrepareConfig()
    assert config_hash(a) == config_hash(b)
    b.seed = 11
    assert config_hash(a) != config_hash(b)


def test_every_preset_yaml_parses():
    import yaml

    files = sorted(PRESETS_DIR.rglob("*.yaml"))
    assert files
    for path in files:
        assert isinstance(yaml.safe_load(path.read_text()), dict), path


def test_sft_label_attributes_and_sample_steering_are_checked_before_training():
    from steerray.config import SFTConfig

    with pytest.raises(ConfigError, match=r"label_attributes.*unknown attribute 'wit'"):
        load_config(SFTConfig, "demo/sft", ["label_attributes=[verbosity,wit]"])
    # samples are drawn after training: a steering the trained label cannot carry must fail now, by key
    with pytest.raises(ConfigError, match=r"sample_steering\[1\]: cannot steer 'helpfulness'"):
        load_config(SFTConfig, "demo/sft", ["sample_steering=[{verbosity: 0}, {helpfulness: 2}]"])
    with pytest.raises(ConfigError, match=r"sample_steering\[0\].*outside 0..4"):
        load_config(SFTConfig, "tiny/sft", ["sample_steering=[{verbosity: 7}]"])
    assert load_config(SFTConfig, "demo/sft").label_attributes == ["toxicity", "humor", "creativity", "verbosity"]
