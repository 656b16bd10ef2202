"""Every whole-number option is bounded on both sides by what the code that consumes it accepts: a
value past a bound is one line naming the option and the allowed range, before any work starts."""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Annotated, Union

import pytest
import torch
import yaml
from click.testing import CliRunner
from pydantic import BaseModel

from samcache.cli import main
from samcache.config import (
    EPOCH_SEED_STRIDE,
    FLAGS,
    MAX_COUNT,
    MAX_EPOCHS,
    MAX_SEED,
    EmbedConfig,
    EvalConfig,
    PredictConfig,
    TrainConfig,
    field_annotation,
    field_bounds,
    parse,
)
from samcache.errors import ConfigError
from samcache.models.prompts import rng_for
from samcache.train.samples import EpochBatches
from tests.helpers import EMBED_FLAGS


def _base(annotation):
    """int for int, Optional[int] and Annotated[int, ...] options."""
    while True:
        origin = typing.get_origin(annotation)
        if origin is Annotated:
            annotation = typing.get_args(annotation)[0]
        elif origin is Union:
            annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
        else:
            return annotation


def _paths(cls: type[BaseModel], prefix: str = "") -> list[str]:
    """Every option of `cls`, nested settings by dotted path."""
    paths = []
    for name, field in cls.model_fields.items():
        nested = field.annotation
        if isinstance(nested, type) and issubclass(nested, BaseModel):
            paths += _paths(nested, f"{prefix}{name}.")
        else:
            paths.append(f"{prefix}{name}")
    return paths


def _options_of(kind: type) -> list[tuple[type[BaseModel], str]]:
    return [(cls, path) for cls in FLAGS for path in _paths(cls) if _base(field_annotation(cls, path)) is kind]


def _past(cls: type[BaseModel], path: str) -> list[tuple[str, int]]:
    """("low", the largest value below the range), ("high", the smallest above it)."""
    (low_kind, low), (high_kind, high) = field_bounds(cls, path)
    return [("low", low - 1 if low_kind == "ge" else low), ("high", high + 1 if high_kind == "le" else high)]


def _range(cls: type[BaseModel], path: str) -> str:
    (_, low), (_, high) = field_bounds(cls, path)
    return f"input should be from {low} to {high}"


INT_OPTIONS = _options_of(int)
FLAGGED = [(cls, path, side, value) for cls, path in INT_OPTIONS if path in FLAGS[cls] for side, value in
           _past(cls, path)]
TRAIN_FILE_ONLY = [(path, side, value) for cls, path in INT_OPTIONS if cls is TrainConfig and path not in FLAGS[cls]
                   for side, value in _past(cls, path)]
FLOAT_FLAGS = [(cls, path) for cls, path in _options_of(float) if path in FLAGS[cls]]


def _command(cls: type[BaseModel], tmp_path: Path) -> list[str]:
    """The command of `cls` on inputs that do not exist: only the options can be checked."""
    out = str(tmp_path / "out")
    if cls is EmbedConfig:
        return ["embed", str(tmp_path / "no-data"), "--out", out]
    if cls is TrainConfig:
        return ["train", str(tmp_path / "no-cache"), "--out", out]
    if cls is EvalConfig:
        return ["eval", str(tmp_path / "no-cache"), "--out", out]
    assert cls is PredictConfig, cls
    image = tmp_path / "page.png"
    image.write_bytes(b"")  # click checks it exists; nothing reads it
    return ["predict", str(image), "--checkpoint", str(tmp_path / "no.pth"), "--everything", "--out", out]


def _assert_refused_in_one_line(result, expected: str, out: Path) -> None:
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit) and "Traceback" not in result.output
    assert result.output.strip().splitlines() == [f"Error: invalid option: {expected}"]
    assert not out.exists()


def test_every_whole_number_option_has_both_bounds():
    unbounded = [f"{cls.__name__}.{path}" for cls, path in INT_OPTIONS if None in field_bounds(cls, path)]
    assert INT_OPTIONS and not unbounded


@pytest.mark.parametrize("cls, path, side, value", FLAGGED,
                         ids=[f"{c.__name__}{FLAGS[c][p]}-{side}" for c, p, side, _ in FLAGGED])
def test_a_flag_past_its_bound_is_one_line_naming_flag_and_range(tmp_path, cls, path, side, value):
    result = CliRunner().invoke(main, [*_command(cls, tmp_path), FLAGS[cls][path], str(value)])
    _assert_refused_in_one_line(result, f"{FLAGS[cls][path]} {value}: {_range(cls, path)}", tmp_path / "out")


@pytest.mark.parametrize("path, side, value", TRAIN_FILE_ONLY, ids=[f"{p}-{side}" for p, side, _ in TRAIN_FILE_ONLY])
def test_a_config_file_value_past_its_bound_is_one_line_naming_option_and_range(tmp_path, path, side, value):
    *parents, name = path.split(".")
    values: dict = {name: value}
    for parent in reversed(parents):
        values = {parent: values}
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump(values))
    result = CliRunner().invoke(main, [*_command(TrainConfig, tmp_path), "--config", str(config)])
    _assert_refused_in_one_line(result, f"{path} = {value} (in {config}): {_range(TrainConfig, path)}",
                                tmp_path / "out")


@pytest.mark.parametrize("path", [p for cls, p in INT_OPTIONS if cls is EvalConfig and p not in FLAGS[cls]])
def test_eval_options_without_a_flag_are_bounded_too(path):
    for _, value in _past(EvalConfig, path):
        with pytest.raises(ConfigError, match=rf"^invalid option: {path} = {value}: {_range(EvalConfig, path)}$"):
            parse(EvalConfig, {path: value})


@pytest.mark.parametrize("cls, path", FLOAT_FLAGS, ids=[f"{c.__name__}{FLAGS[c][p]}" for c, p in FLOAT_FLAGS])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e400"])
def test_float_flags_refuse_nan_and_infinity(tmp_path, cls, path, value):
    result = CliRunner().invoke(main, [*_command(cls, tmp_path), FLAGS[cls][path], value])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"{FLAGS[cls][path]} " in result.output and "finite number" in result.output
    assert not (tmp_path / "out").exists()


def test_the_largest_seed_is_the_largest_torchs_generator_takes_at_the_last_epoch():
    torch.Generator().manual_seed(MAX_SEED * EPOCH_SEED_STRIDE + MAX_EPOCHS - 1)
    batches = EpochBatches(list(range(5)), 2, MAX_SEED)
    batches.set_epoch(MAX_EPOCHS - 1)
    assert sorted(i for batch in batches.global_batches() for i in batch) == list(range(5))
    assert rng_for(MAX_SEED, MAX_EPOCHS - 1, 2**32 - 1, 7).integers(10) in range(10)
    # One more and the last epoch's shuffle could not be seeded: the bound is the consumer's own.
    past = EpochBatches(list(range(5)), 2, MAX_SEED + 1)
    past.set_epoch(MAX_EPOCHS - 1)
    with pytest.raises((ValueError, RuntimeError)):
        past.global_batches()


def test_train_runs_with_the_largest_seed_and_counts(stamps_cache, tmp_path):
    run, most = tmp_path / "run", str(MAX_COUNT)
    result = CliRunner().invoke(main, [
        "train", str(stamps_cache), "--out", str(run), "--epochs", "1", "--workers", "0", "--seed", str(MAX_SEED),
        "--batch-size", most, "--objects-per-image", most, "--warmup-steps", most, "--val-max-images", most,
        "--save-every", most,
    ])
    assert result.exit_code == 0, result.output
    assert (run / "last.pt").is_file()


def test_eval_runs_with_the_largest_seed(stamps_cache, stamps_run_copy, tmp_path):
    report = tmp_path / "report"
    result = CliRunner().invoke(main, ["eval", str(stamps_cache), "--run", str(stamps_run_copy), "--out", str(report),
                                       "--split", "val", "--seed", str(MAX_SEED), "--box-jitter", "0.1"])
    assert result.exit_code == 0, result.output
    assert (report / "summary.json").is_file()


def test_embed_runs_with_the_largest_batch_and_shard(stamps, tmp_path):
    flags = [*EMBED_FLAGS[:-2], "--batch-size", str(MAX_COUNT), "--shard-images", str(MAX_COUNT)]
    result = CliRunner().invoke(main, ["embed", str(stamps), "--out", str(tmp_path / "cache"), *flags])
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "cache" / "shards").glob("*.h5"))) == 1  # every image in one shard
