"""The run folder (runs.py): checkpoints read back as typed objects, bad files named, old configs resumed."""

from __future__ import annotations

import pytest
import torch
import yaml

from samcache.config import TrainConfig, from_sources
from samcache.errors import RunError
from samcache.models import load_sam
from samcache.runs import RunCheckpoint, RunFolder, TrainState, apply_weights


def test_a_checkpoint_reads_back_as_what_training_saved(stamps_run):
    run = RunFolder(stamps_run)
    last = run.read_checkpoint("last")
    assert isinstance(last.state, TrainState) and last.state.epoch == 1 and len(last.state.history) == 2
    assert last.trained == ["mask_decoder"] and last.model_type == "tiny"
    assert TrainConfig(**last.config) == from_sources(TrainConfig, base=run.saved_config())
    assert run.cache_dir() and run.result()["epochs_run"] == 1
    round_trip = RunCheckpoint.read(stamps_run / "last.pt")
    assert all(torch.equal(round_trip.state_dict[k], v) for k, v in last.state_dict.items())


def test_apply_weights_puts_the_run_decoder_into_sam(stamps_run):
    sam = load_sam("tiny").sam
    checkpoint = RunFolder(stamps_run).read_checkpoint("best")
    apply_weights(sam, checkpoint)
    for key, value in sam.mask_decoder.state_dict().items():
        assert torch.equal(value, checkpoint.state_dict[f"mask_decoder.{key}"])
    checkpoint.state_dict.pop("mask_decoder.iou_token.weight")
    with pytest.raises(RunError, match="best.pt: its mask_decoder does not fit the tiny model"):
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
