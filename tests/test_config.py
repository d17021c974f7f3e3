"""Typed config: YAML + overrides, one-line errors naming file and key."""

import pytest

from posttrain.config import SFTConfig, apply_override, config_to_yaml, load_config
from posttrain.errors import ConfigError


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_yaml_and_overrides_resolve(tmp_path):
    path = write(tmp_path, "data:\n  train: a.jsonl\noptim:\n  lr: 2.0e-5\n")
    config = load_config(SFTConfig, path, ["optim.lr=3e-4", "train.max_steps=7", "lora.target_modules=[q_proj,v_proj]"])
    assert config.optim.lr == 3e-4
    assert config.train.max_steps == 7
    assert config.lora.target_modules == ["q_proj", "v_proj"]
    assert config.data.train == "a.jsonl"
    assert "lr: 0.0003" in config_to_yaml(config)


def test_misspelt_key_names_file_key_and_suggestion(tmp_path):
    path = write(tmp_path, "data:\n  train: a.jsonl\noptim:\n  lrate: 1e-5\n")
    with pytest.raises(ConfigError) as info:
        load_config(SFTConfig, path)
    message = str(info.value)
    assert str(path) in message and "optim.lrate" in message and "did you mean 'optim.lr'" in message
    assert "\n" not in message


def test_unknown_section_and_override_key(tmp_path):
    path = write(tmp_path, "data:\n  train: a.jsonl\n")
    with pytest.raises(ConfigError, match="unknown key 'trian'"):
        load_config(SFTConfig, path, ["trian.max_steps=3"])


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("optim.lr=-1", "optim.lr"),
        ("optim.lr=fast", "optim.lr"),
        ("train.loss_agg_mode=mean", "train.loss_agg_mode"),
        ("data.max_length=0", "data.max_length"),
        ("optim.warmup_ratio=1.5", "optim.warmup_ratio"),
    ],
)
def test_wrong_types_and_impossible_values(tmp_path, override, fragment):
    path = write(tmp_path, "data:\n  train: a.jsonl\n")
    with pytest.raises(ConfigError) as info:
        load_config(SFTConfig, path, [override])
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_missing_file_bad_yaml_and_bad_override(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(SFTConfig, tmp_path / "none.yaml")
    with pytest.raises(ConfigError, match=r"c.yaml:\d+: invalid YAML"):
        load_config(SFTConfig, write(tmp_path, "data:\n  train: [a\n"))
    with pytest.raises(ConfigError, match="key.sub=value"):
        apply_override({}, "no-equals-sign")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(SFTConfig, write(tmp_path, "- 1\n- 2\n"))


def test_training_data_required():
    with pytest.raises(ConfigError, match="data.train"):
        load_config(SFTConfig, None, [])


def test_a_directory_is_not_called_missing(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "b.yaml").write_text("data:\n  train: x.jsonl\n")
    (tmp_path / "mine" / "a.yaml").write_text("data:\n  train: y.jsonl\n")
    with pytest.raises(ConfigError) as info:
        load_config(SFTConfig, tmp_path / "mine")
    assert str(info.value) == (f"config file {tmp_path / 'mine'} is a directory; give one YAML config file "
                               f"(e.g. {tmp_path / 'mine' / 'a.yaml'}, {tmp_path / 'mine' / 'b.yaml'})")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"empty is a directory; give one YAML config file$"):
        load_config(SFTConfig, tmp_path / "empty")
    with pytest.raises(ConfigError, match=r"nothing\.yaml does not exist$"):
        load_config(SFTConfig, tmp_path / "nothing.yaml")


def test_precision_auto_picks_bf16_only_where_the_hardware_computes_it(monkeypatch):
    """Emulated bf16 autocast is ~10x slower than fp32 on a CPU without AVX512-BF16/AMX."""
    import torch

    from posttrain.config import SFTConfig, resolve_precision, validate_config

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    assert resolve_precision("auto") == "fp32"
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    assert resolve_precision("auto") == "bf16"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_precision("auto") == "fp32"
    assert resolve_precision("bf16") == "bf16" and resolve_precision("fp32") == "fp32"
    config = validate_config(SFTConfig, {"data": {"train": "x.jsonl"}, "train": {"precision": "auto"}})
    assert config.train.precision == "fp32"  # resolved at load: config.yaml records what ran


@pytest.mark.parametrize("reward,message", [
    (5, "reward: Input should be a valid dictionary"),
    ({"name": "composite", "terms": {}}, "reward.terms: Dictionary should have at least 1 item"),
    ({"name": "composite", "terms": {"math": {"weight": "x"}}}, "reward.terms.math.weight: Input should be a valid number"),
    ({"params": {}}, "reward.name: required"),
])
def test_reward_spec_is_a_typed_union_refused_in_one_line(reward, message):
    from posttrain.config import CompositeReward, NamedReward, RLConfig, plain_reward_spec, validate_config

    with pytest.raises(ConfigError) as info:
        validate_config(RLConfig, {"data": {"train": "p.jsonl"}, "reward": reward})
    assert message in str(info.value) and "\n" not in str(info.value)
    composite = {"name": "composite", "terms": {"math": {"weight": 1}, "format": {"weight": 0.2, "pattern": "x"}}}
    config = validate_config(RLConfig, {"data": {"train": "p.jsonl"}, "reward": composite})
    assert isinstance(config.reward, CompositeReward) and plain_reward_spec(config.reward) == composite
    named = validate_config(RLConfig, {"data": {"train": "p.jsonl"}, "reward": {"name": "math", "extract": ["hash"]}})
    assert isinstance(named.reward, NamedReward) and plain_reward_spec(named.reward) == {"name": "math", "extract": ["hash"]}
    assert validate_config(RLConfig, {"data": {"train": "p.jsonl"}, "reward": "code"}).reward == "code"


def test_a_reward_spec_survives_the_resolved_config_yaml(tmp_path):
    """A stage's config.yaml (every default written out, ``reward: null`` in each term) loads
    back into a reward that builds: the pipeline hands RL its config that way."""
    from posttrain.config import RLConfig, config_to_yaml, load_config, plain_reward_spec, validate_config
    from posttrain.rewards.registry import build_reward

    composite = {"name": "composite", "terms": {"math": {"weight": 1.0}, "format": {"weight": 0.2, "pattern": "x$"}}}
    config = validate_config(RLConfig, {"data": {"train": "p.jsonl"}, "reward": composite})
    path = tmp_path / "config.yaml"
    path.write_text(config_to_yaml(config))
    again = load_config(RLConfig, path, [])
    assert plain_reward_spec(again.reward) == composite
    scores = build_reward(again.reward)(["q"], ["The answer is 3."], [{"answer": "3"}]).scores
    assert scores == [pytest.approx(1.0)]
