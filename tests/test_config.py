"""Options: nested configs, YAML and flags merged, every value checked before any work starts."""

from __future__ import annotations

import pytest
import yaml
from click.testing import CliRunner

from samcache.cli import main
from samcache.config import DEVICES, LOSSES, PROMPT_MODES, EvalConfig, PromptSettings, TrainConfig, from_sources, parse
from samcache.errors import ConfigError
from samcache.models.specs import MODEL_TYPES
from samcache.train.runs import RunFolder

# (YAML line, option, value as the message shows it)
REFUSED = [
    ("grad_clip: -1", "grad_clip", "-1"),  # would turn training into gradient ascent
    ("epochs: true", "epochs", "True"),
    ("epochs: 1.5", "epochs", "1.5"),
    ("seed: abc", "seed", "'abc'"),
    ("lr: .nan", "lr", "nan"),
    ("lr: -0.01", "lr", "-0.01"),
    ("warmup_steps: -5", "warmup_steps", "-5"),
    ("save_every: 0", "save_every", "0"),
    ("prompts: {point_ratio: 7}", "prompts.point_ratio", "7"),
    ("loss: focal", "loss", "'focal'"),
    ("train: [mask_decoder, encoder]", "train", "'encoder'"),
    ("batch_size: 0", "batch_size", "0"),
]


@pytest.mark.parametrize("line, option, value", REFUSED)
def test_bad_values_are_refused_naming_option_and_value(line, option, value):
    with pytest.raises(ConfigError) as info:
        parse(TrainConfig, yaml.safe_load(line), source="train.yaml")
    message = str(info.value)
    assert f"{option} = {value}" in message and "train.yaml" in message
    assert "\n" not in message


def test_yaml_strings_that_are_numbers_are_numbers():
    config = parse(TrainConfig, yaml.safe_load("lr: 1e-4\nweight_decay: 5e-2\nepochs: '3'"))
    assert isinstance(yaml.safe_load("lr: 1e-4")["lr"], str)  # YAML 1.1 reads it as a string...
    assert config.lr == 0.0001 and config.weight_decay == 0.05 and config.epochs == 3  # ...samcache as a number


def test_train_as_a_string_is_one_part_never_letters():
    assert parse(TrainConfig, {"train": "mask_decoder"}).trainable == ["mask_decoder"]
    assert parse(TrainConfig, {"train": "mask_decoder,prompt_encoder"}).trainable == ["mask_decoder", "prompt_encoder"]
    with pytest.raises(ConfigError, match="train names a part twice"):
        parse(TrainConfig, {"train": "mask_decoder,mask_decoder"})


def test_eval_prompt_kinds_are_a_comma_list_of_known_kinds_each_once():
    assert parse(EvalConfig, {}).prompt == ["box"]
    assert parse(EvalConfig, {"prompt": "box,point"}).prompt == ["box", "point"]
    assert parse(EvalConfig, {"prompt": "point"}).prompt == ["point"]
    with pytest.raises(ConfigError, match="prompt names a kind twice"):
        parse(EvalConfig, {"prompt": "box,box"})
    with pytest.raises(ConfigError, match="prompt"):
        parse(EvalConfig, {"prompt": "box,scribble"})


def test_prompt_settings_are_nested_and_flat_keys_point_there():
    config = parse(TrainConfig, yaml.safe_load("prompts:\n  mode: mixed\n  point_ratio: 0.3"))
    assert config.prompts == PromptSettings(mode="mixed", point_ratio=0.3)
    assert TrainConfig().model_dump()["prompts"] == PromptSettings().model_dump()
    with pytest.raises(ConfigError, match=r"unknown option box_jitter .*did you mean prompts\.box_jitter"):
        parse(TrainConfig, {"box_jitter": 0.2})
    with pytest.raises(ValueError, match=r"at most 8"):
        PromptSettings(positive_points=5, negative_points=4)


def test_configs_are_keyword_only_and_checked_on_assignment():
    with pytest.raises(TypeError):
        TrainConfig(10)  # type: ignore[misc]
    config = TrainConfig()
    with pytest.raises(ValueError):
        config.epochs = 0


def test_file_then_flags_merge_into_the_nested_config(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text("epochs: 3\nprompts:\n  mode: mixed\n  point_ratio: 0.2\n")
    config = from_sources(TrainConfig, file=path, overrides={"prompts.box_jitter": 0.05, "epochs": None, "lr": 2e-4})
    assert (config.epochs, config.lr) == (3, 2e-4)
    assert config.prompts == PromptSettings(mode="mixed", point_ratio=0.2, box_jitter=0.05)
    with pytest.raises(ConfigError, match=r"--lr -0\.01: input should be greater than 0"):
        from_sources(TrainConfig, file=path, overrides={"lr": -0.01}, flags={"lr": "--lr"})


@pytest.mark.parametrize("line, option, value", REFUSED[:6])
def test_cli_refuses_bad_yaml_before_any_work(tmp_path, line, option, value):
    config = tmp_path / "train.yaml"
    config.write_text(line + "\n")
    run = tmp_path / "run"
    # The cache does not even exist: the options are checked first, and nothing is written.
    result = CliRunner().invoke(main, ["train", str(tmp_path / "no-cache"), "--out", str(run), "--config", str(config)])
    assert result.exit_code == 1
    assert f"{option} = {value}" in result.output and "Traceback" not in result.output
    assert not run.exists()


@pytest.mark.parametrize("argv, shown", [
    (["--lr", "-0.01"], "--lr -0.01"),
    (["--grad-clip", "-1"], "--grad-clip -1.0"),
    (["--point-ratio", "7"], "--point-ratio 7.0"),
    (["--train", "mask_decoder,letters"], "--train 'letters'"),
])
def test_cli_refuses_bad_flags_naming_the_flag(tmp_path, argv, shown):
    result = CliRunner().invoke(main, ["train", str(tmp_path / "no-cache"), "--out", str(tmp_path / "run"), *argv])
    assert result.exit_code == 1 and shown in result.output and "Traceback" not in result.output


def test_eval_and_embed_options_are_checked_too(tmp_path):
    result = CliRunner().invoke(main, ["eval", str(tmp_path / "no-cache"), "--out", str(tmp_path / "r"),
                                       "--box-jitter", "-1"])
    assert result.exit_code == 1 and "--box-jitter -1.0" in result.output
    result = CliRunner().invoke(main, ["embed", str(tmp_path / "no-data"), "--out", str(tmp_path / "c"),
                                       "--workers", "-1"])
    assert result.exit_code == 1 and "--workers -1" in result.output
    assert not (tmp_path / "c").exists()


def test_help_shows_the_configs_choices_and_defaults():
    runner = CliRunner()
    train_help = runner.invoke(main, ["train", "--help"], terminal_width=200).output
    defaults = TrainConfig()
    for choice in (*LOSSES, *PROMPT_MODES, *DEVICES):
        assert choice in train_help
    assert f"[default: {defaults.epochs}]" in train_help and f"[default: {defaults.lr}]" in train_help
    assert f"[default: {defaults.prompts.box_jitter}]" in train_help
    embed_help = runner.invoke(main, ["embed", "--help"], terminal_width=200).output
    assert "[" + "|".join(MODEL_TYPES) + "]" in embed_help
    eval_help = runner.invoke(main, ["eval", "--help"], terminal_width=200).output
    assert f"[default: {EvalConfig().split}]" in eval_help


def test_yaml_run_resolves_strings_and_single_parts(stamps_cache, tmp_path):
    config = tmp_path / "train.yaml"
    config.write_text("epochs: 1\nbatch_size: 2\nobjects_per_image: 1\nworkers: 0\nlr: 1e-4\n"
                      "train: mask_decoder\nprompts:\n  mode: point\nsave_every: null\n")
    run = tmp_path / "run"
    result = CliRunner().invoke(main, ["train", str(stamps_cache), "--out", str(run), "--config", str(config),
                                       "--box-jitter", "0.05"])
    assert result.exit_code == 0, result.output
    saved = RunFolder(run).saved_config()
    assert saved["lr"] == 0.0001 and saved["trainable"] == ["mask_decoder"]
    assert saved["prompts"]["mode"] == "point" and saved["prompts"]["box_jitter"] == 0.05
    checkpoint = RunFolder(run).read_checkpoint("last")
    assert checkpoint.trained == ["mask_decoder"] and checkpoint.config == saved


def test_the_readme_example_config_is_valid():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme.split("**Options and `--config`.**", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0]
    config = parse(TrainConfig, yaml.safe_load(block), source="README.md")
    assert config.lr == 1e-3 and config.trainable == ["mask_decoder"] and config.prompts.mode == "mixed"


def test_a_nested_flag_over_a_non_group_is_one_line(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text("prompts: box\n")
    with pytest.raises(ConfigError, match=r"prompts = 'box' \(in .*train.yaml\): a group of settings is needed"):
        from_sources(TrainConfig, file=path, overrides={"prompts.box_jitter": 0.05})
    with pytest.raises(ConfigError, match=r"prompts = 'box'"):
        from_sources(TrainConfig, file=path)
    with pytest.raises(ConfigError, match=r"seed = -1"):
        parse(TrainConfig, {"seed": -1})  # the prompt generators take non-negative seeds only


def test_the_train_flag_overrides_a_files_train_key(tmp_path):
    from samcache.config import FLAGS, from_sources

    path = tmp_path / "train.yaml"
    path.write_text("train: mask_decoder\nlr: 1e-3\n")  # the spelling of YAML files and saved runs
    assert from_sources(TrainConfig, file=path, flags=FLAGS[TrainConfig]).trainable == ["mask_decoder"]
    both = from_sources(TrainConfig, file=path, overrides={"trainable": "mask_decoder,prompt_encoder"},
                        flags=FLAGS[TrainConfig])
    assert both.trainable == ["mask_decoder", "prompt_encoder"] and both.lr == 1e-3


def test_options_that_do_not_go_together_are_usage_errors_with_the_usage_line(tmp_path):
    from click.testing import CliRunner

    from samcache.cli import main

    image = tmp_path / "x.png"
    image.write_bytes(b"")
    result = CliRunner().invoke(main, ["predict", str(image), "--out", str(tmp_path / "o"), "--box", "1,1,9,9"])
    assert result.exit_code == 2 and "give either --run or --checkpoint" in result.output
    assert "Usage: main predict" in result.output and not (tmp_path / "o").exists()
    onnx_only = CliRunner().invoke(main, ["export", "--run", str(tmp_path), "--out", str(tmp_path / "m.pth"),
                                          "--quantize"])
    assert onnx_only.exit_code == 2 and "--return-single-mask and --quantize are options of --format onnx" in \
        onnx_only.output
