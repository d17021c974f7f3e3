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
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)  # says so on plain AVX512
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    assert resolve_precision("auto") == "fp32"
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
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


# ----------------------------------------------------------------------------- YAML that says less than it seems
@pytest.mark.parametrize("text, line, key, first", [
    ("data: {train: a.jsonl}\ntrain:\n  global_batch_size: 4\noptim:\n  lr: 1.0e-5\ntrain:\n  max_steps: 3\n",
     6, "train", 2),
    ("data: {train: a.jsonl}\noptim:\n  lr: 1.0e-5\n  warmup_steps: 2\n  lr: 5.0\n", 5, "optim.lr", 3),
    ("data: {train: a.jsonl}\nlora: {enabled: true, r: 8, r: 64}\n", 2, "lora.r", 2),
    ("data: {train: a.jsonl}\nreward_like:\n  - {a: 1}\n  - {b: 2,\n     b: 3}\n", 5, "reward_like[1].b", 4),
])
def test_a_key_given_twice_is_refused_naming_both_lines(tmp_path, text, line, key, first):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(SFTConfig, path)
    assert str(info.value) == (f"{path}:{line}: duplicate key '{key}' (first at line {first}): YAML would keep only "
                               f"the last value; give each key once")


def test_a_merge_may_be_overridden_and_an_anchor_reused(tmp_path):
    from posttrain.config import read_config_file

    path = tmp_path / "anchors.yaml"
    path.write_text("data: {train: a.jsonl}\nbase: &b {lr: 1.0e-5, weight_decay: 0.1}\nother: *b\n")
    text = "data: {train: a.jsonl}\noptim:\n  <<: {lr: 1.0e-5, weight_decay: 0.1}\n  lr: 2.0e-5\n"
    assert load_config(SFTConfig, write(tmp_path, text)).optim.lr == 2.0e-5
    shared = "data: {train: &f a.jsonl, val: *f}\nlora: {target_modules: &m [q_proj, v_proj]}\n"
    assert load_config(SFTConfig, write(tmp_path, shared)).data.val == "a.jsonl"
    assert read_config_file(path)["other"] == {"lr": 1.0e-5, "weight_decay": 0.1}


def laughs(levels: int, indent: str = "") -> str:
    """A "billion laughs" ladder: level k is ten aliases of level k-1 (10**levels values)."""
    lines = [f'{indent}l0: &l0 ["x", "x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    lines += [f"{indent}l{k}: &l{k} [" + ", ".join([f"*l{k - 1}"] * 10) + "]" for k in range(1, levels)]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("schema_name, text, line, key", [
    ("SFTConfig", "data: {train: a.jsonl}\nx-anchors:\n" + laughs(4, "  ") + "lora:\n  target_modules: ["
     + ", ".join(["*l3"] * 10) + "]\n", 8, "lora.target_modules"),
    ("RLConfig", "data: {train: p.jsonl}\nreward:\n  name: format\n  params:\n" + laughs(9, "    "), 9,
     "reward.params.l4"),
    ("SFTConfig", "data: {train: a.jsonl}\nrun: &r {name: x, extra: [1, *r]}\n", 2, "run.extra"),
])
def test_alias_expansion_is_bounded_and_named_at_once(tmp_path, schema_name, text, line, key):
    """A few lines of aliases standing for millions to billions of values (or a value that holds
    itself) are refused before anything expands them: in well under a second, one short line."""
    import time

    import posttrain.config as config_module

    path = write(tmp_path, text)
    started = time.perf_counter()
    with pytest.raises(ConfigError) as info:
        load_config(getattr(config_module, schema_name), path)
    assert time.perf_counter() - started < 2
    assert str(info.value).startswith(f"{path}:{line}: '{key}'") and len(str(info.value)) < 300


def test_an_override_is_bounded_too_and_a_long_value_makes_a_short_error(tmp_path):
    path = write(tmp_path, "data: {train: a.jsonl}\n")
    bomb = "[" + ", ".join(["&a [x, x, x, x, x, x, x, x, x, x]"] + [f"&{c} [" + ", ".join([f"*{p}"] * 10) + "]"
                                                                     for p, c in zip("abcde", "bcdef")]) + "]"
    with pytest.raises(ConfigError, match=r"^override: 'lora.target_modules\[4\]' expands through YAML aliases"):
        load_config(SFTConfig, path, [f"lora.target_modules={bomb}"])
    many = "[" + ", ".join(str(n) for n in range(90_000)) + "]"  # within the bound, yet the wrong type
    with pytest.raises(ConfigError) as info:
        load_config(SFTConfig, path, [f"train.max_steps={many}"])
    assert str(info.value).startswith("override 'train.max_steps=[0, 1, 2, ") and len(str(info.value)) < 600


def test_any_user_error_stays_short():
    from posttrain.errors import MAX_MESSAGE_CHARS, DataError

    message = str(DataError("f.jsonl:3: 'weight' must be a non-negative number, got " + repr("9" * 10_000_000)))
    assert len(message) <= MAX_MESSAGE_CHARS and message.startswith("f.jsonl:3: 'weight'") and "characters cut" in message


@pytest.mark.parametrize("override, fragment", [
    ("train.seed=123456789012345678901234567890", "train.seed: Input should be less than or equal to 4294967295"),
    ("train.seed=18446744073709551616", "train.seed: Input should be less than or equal to 4294967295"),
    ("train.seed=-1", "train.seed: Input should be greater than or equal to 0"),
    ("run.name=", "run.name: must not be empty"),
    ("run.name='  '", "run.name: must not be empty"),
    ("run.name=..", "run.name: must be one directory name inside run.output_dir"),
    ("run.name=../x", "run.name: must be one directory name inside run.output_dir"),
    ("run.name=/tmp/elsewhere", "run.name: must be one directory name inside run.output_dir"),
    ("run.name=a\\..\\..\\b", "run.name: must be one directory name inside run.output_dir"),
])
def test_seeds_and_run_names_that_break_later_are_refused_at_load(override, fragment):
    """The error names the override that set the key (the config file is not to blame)."""
    import re

    shown = " ".join(override.split())  # on one line
    with pytest.raises(ConfigError, match="^" + re.escape(f"override '{shown}': {fragment}")):
        load_config(SFTConfig, None, ["data.train=a.jsonl", override])


def test_every_seed_a_config_accepts_seeds_torch_and_the_derived_rl_seeds():
    """The largest accepted seed works wherever posttrain seeds a generator, derived seeds included."""
    import torch

    from posttrain.config import MAX_SEED, RLConfig, EvalConfig
    from posttrain.train.loop import seed_everything
    from posttrain.train.rl_rollouts import RANK_SEED_STRIDE

    config = load_config(RLConfig, None, ["data.train=p.jsonl", f"train.seed={MAX_SEED}"])
    seed_everything(config.train.seed + 7)
    torch.manual_seed(config.train.seed * 1_000_003 + 10**6 + RANK_SEED_STRIDE * 1023)
    assert load_config(EvalConfig, None, ["tasks=[{name: humaneval, seed: 4294967295}]"]).tasks[0].seed == MAX_SEED


def test_posttrain_sft_refuses_a_duplicate_section_and_an_escaping_run_name_in_one_line(tmp_path, capsys):
    from posttrain.cli import main

    path = write(tmp_path, "data:\n  train: rows.jsonl\ntrain:\n  global_batch_size: 4\ntrain:\n  max_steps: 3\n")
    assert main(["sft", str(path)]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: {path}:5: duplicate key 'train' (first at line 3): YAML would keep only the last value; give each key once")
    path = write(tmp_path, f"data:\n  train: rows.jsonl\nrun:\n  output_dir: {tmp_path / 'runs'}\n  name: ../outside\n")
    assert main(["sft", str(path)]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(
        f"error: {path}: run.name: must be one directory name inside run.output_dir")
    assert not (tmp_path / "outside").exists()


@pytest.mark.parametrize("text, line, key, char", [
    ('data: {train: p.jsonl, system: "be \\ud800 brief"}\n', 1, "data.system", "\\ud800"),
    ('data: {train: p.jsonl}\nreward:\n  name: format\n  params: {"tag\\udfff": 1}\n', 4,
     "reward.params.tag\\udfff (the key)", "\\udfff"),
])
def test_config_text_with_a_lone_surrogate_is_refused_naming_line_and_key(tmp_path, text, line, key, char):
    """YAML's ``\\ud800`` escape loads, but no tokenizer can encode it (a system prompt would end
    the run in a tokenizer traceback)."""
    from posttrain.config import RLConfig

    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(RLConfig, path)
    assert str(info.value) == (f"{path}:{line}: '{key}' holds a lone surrogate ({char}): not Unicode text, so no "
                               f"tokenizer can encode it")


def test_an_override_that_is_not_utf8_is_refused():
    """Bytes that are not UTF-8 on the command line reach Python as lone surrogates (PEP 383)."""
    import os

    from posttrain.config import RLConfig

    override = os.fsdecode(b"data.system=a\xffb")
    with pytest.raises(ConfigError, match=r"^override 'data\.system': holds bytes that are not UTF-8 text"):
        load_config(RLConfig, None, ["data.train=p.jsonl", override])
