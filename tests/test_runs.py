"""The run folder (runs.py): checkpoints read back as typed objects, bad files named, old configs resumed."""

from __future__ import annotations

import math

import pytest
import torch
import yaml

from samcache.cache.reader import EmbeddingCache
from samcache.config import TrainConfig, from_sources
from samcache.errors import RunError
from samcache.models.weights import load_sam
from samcache.train.runs import RunCheckpoint, RunFolder, TrainState, apply_weights


def test_a_checkpoint_reads_back_as_what_training_saved(stamps_run):
    run = RunFolder(stamps_run)
    last = run.read_checkpoint("last")
    assert isinstance(last.state, TrainState) and last.state.epoch == 1 and len(last.state.history) == 2
    assert last.trained == ["mask_decoder"] and last.model_type == "micro"
    assert TrainConfig(**last.config) == from_sources(TrainConfig, base=run.saved_config())
    assert run.cache_dir() and run.result()["epochs_run"] == 1
    round_trip = RunCheckpoint.read(stamps_run / "last.pt")
    assert all(torch.equal(round_trip.state_dict[k], v) for k, v in last.state_dict.items())


def test_apply_weights_puts_the_run_decoder_into_sam(stamps_run):
    sam = load_sam("micro").sam
    checkpoint = RunFolder(stamps_run).read_checkpoint("best")
    apply_weights(sam, checkpoint)
    for key, value in sam.mask_decoder.state_dict().items():
        assert torch.equal(value, checkpoint.state_dict[f"mask_decoder.{key}"])
    checkpoint.state_dict.pop("mask_decoder.iou_token.weight")
    with pytest.raises(RunError, match="best.pt: its mask_decoder does not fit the micro model"):
        apply_weights(sam, checkpoint)


def test_bad_checkpoint_files_are_named(tmp_path):
    run = RunFolder(tmp_path)
    with pytest.raises(RunError, match=r"best.pt does not exist: is .* a samcache run"):
        run.read_checkpoint("best")
    (tmp_path / "last.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(RunError, match="last.pt is not a readable samcache checkpoint"):
        run.read_checkpoint("last")
    torch.save({"format": "something else"}, tmp_path / "last.pt")
    with pytest.raises(RunError, match="last.pt is not a samcache run checkpoint"):
        run.read_checkpoint("last")
    with pytest.raises(RunError, match="best or last"):
        run.checkpoint_path("middle")


def test_a_run_saved_with_flat_prompt_keys_reads_nested(stamps_run_copy):
    run = RunFolder(stamps_run_copy)
    nested = run.saved_config()
    flat = {k: v for k, v in nested.items() if k != "prompts"}
    flat.update(prompt=nested["prompts"]["mode"], box_jitter=nested["prompts"]["box_jitter"], save_every=0)
    run.config_path.write_text(yaml.safe_dump(flat))
    migrated = run.saved_config()
    assert migrated["prompts"] == {"mode": nested["prompts"]["mode"], "box_jitter": nested["prompts"]["box_jitter"]}
    assert migrated["save_every"] is None and "prompt" not in migrated
    assert from_sources(TrainConfig, base=migrated).prompts.mode == nested["prompts"]["mode"]


def _train_cli(*args: str):
    from click.testing import CliRunner

    from samcache.cli import main

    return CliRunner().invoke(main, ["train", *args])


def test_resume_refuses_changes_that_would_make_another_run(stamps_cache, stamps_run_copy):
    run = RunFolder(stamps_run_copy)
    before = run.config_path.read_bytes()
    result = _train_cli(str(stamps_cache), "--out", str(run.path), "--resume", "--lr", "5e-3", "--loss", "dice-bce",
                        "--prompt", "point")
    assert result.exit_code == 1
    for change in ("lr (0.001 -> 0.005)", "loss ('sam' -> 'dice-bce')", "prompts.mode ('box' -> 'point')"):
        assert change in result.output
    assert "Only epochs, workers, device" in result.output and "Traceback" not in result.output
    assert run.config_path.read_bytes() == before and run.read_checkpoint("last").state.epoch == 1


def test_resume_may_train_more_epochs_and_records_them(stamps_cache, stamps_run_copy):
    run = RunFolder(stamps_run_copy)
    result = _train_cli(str(stamps_cache), "--out", str(run.path), "--resume", "--epochs", "2", "--workers", "0")
    assert result.exit_code == 0, result.output
    assert run.saved_config()["epochs"] == 2 and run.read_checkpoint("last").state.epoch == 2
    fewer = _train_cli(str(stamps_cache), "--out", str(run.path), "--resume", "--epochs", "1")
    assert fewer.exit_code == 1 and "already trained 2 epochs" in fewer.output


def test_a_run_that_failed_before_any_checkpoint_starts_over(stamps_cache, tmp_path, monkeypatch):
    import samcache.models.decoder as step_module  # where SAM's PromptDecoder finds its loss
    from samcache.errors import TrainingError
    from samcache.train.trainer import train

    real = step_module.compute_loss

    def exploding(*args, **kwargs):
        parts = real(*args, **kwargs)
        parts.total = parts.total * float("nan")
        return parts

    config = TrainConfig(epochs=1, batch_size=2, objects_per_image=1, workers=0, save_every=None)
    monkeypatch.setattr(step_module, "compute_loss", exploding)
    with pytest.raises(TrainingError, match="No checkpoint was saved yet.*run the same command again"):
        train(stamps_cache, tmp_path / "run", config, progress=False)
    assert not (tmp_path / "run" / "last.pt").exists()
    monkeypatch.setattr(step_module, "compute_loss", real)
    result = train(stamps_cache, tmp_path / "run", config, progress=False)  # the same command, no --resume
    assert result.epochs_run == 1 and RunFolder(tmp_path / "run").read_checkpoint("last").state.epoch == 1
    steps = math.ceil(len(EmbeddingCache(stamps_cache).annotated_indices("train")) / config.batch_size)
    assert [r["global_step"] for r in RunFolder(tmp_path / "run").metrics() if r["type"] == "epoch"] == [0, steps]


def test_weights_given_at_embed_time_are_found_again(stamps, tmp_path):
    from click.testing import CliRunner

    from samcache.cli import main
    from samcache.fileio import sha256_file
    from samcache.models.weights import build_tiny
    from tests.helpers import FAST_EMBED, embed

    weights = tmp_path / "weights" / "my_tiny.pth"
    weights.parent.mkdir()
    torch.save(build_tiny(5).state_dict(), weights)
    embed(stamps, tmp_path / "cache", checkpoint=weights,
          **{**{k: v for k, v in FAST_EMBED.items() if k != "batch_size"}, "model_type": "tiny"})
    runner = CliRunner()
    result = runner.invoke(main, ["train", str(tmp_path / "cache"), "--out", str(tmp_path / "run"), "--epochs", "1",
                                  "--batch-size", "2", "--objects-per-image", "1", "--workers", "0"])
    assert result.exit_code == 0, result.output  # no --checkpoint: the cache's own record finds the file
    weights.rename(tmp_path / "elsewhere.pth")
    moved = runner.invoke(main, ["eval", str(tmp_path / "cache"), "--out", str(tmp_path / "report")])
    assert moved.exit_code == 1 and "Traceback" not in moved.output
    assert str(weights.resolve()) in moved.output and "not there any more" in moved.output
    assert sha256_file(tmp_path / "elsewhere.pth") in moved.output
    found = runner.invoke(main, ["eval", str(tmp_path / "cache"), "--out", str(tmp_path / "report"),
                                 "--checkpoint", str(tmp_path / "elsewhere.pth")])
    assert found.exit_code == 0, found.output
