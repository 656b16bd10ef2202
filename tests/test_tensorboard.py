"""Training curves in TensorBoard: every scalar of metrics.jsonl, resume without duplicates, optional."""

import json
import sys

import pytest
from helpers import QUICK_TRAIN, train_run

from samcache.train.runs import tensorboard_scalars

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402


def scalars(run_dir) -> dict[str, dict[int, float]]:
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def expected(run_dir) -> dict[str, dict[int, float]]:
    out: dict[str, dict[int, float]] = {}
    for record in metrics(run_dir):
        for tag, value in tensorboard_scalars(record).items():
            out.setdefault(tag, {})[record["global_step"]] = value
    return out


def assert_same(got, want):
    assert set(got) == set(want)
    for tag in want:
        assert set(got[tag]) == set(want[tag]), tag
        for step, value in want[tag].items():
            assert got[tag][step] == pytest.approx(value, rel=1e-6), (tag, step)  # stored as float32


def test_record_tags():
    step = {"type": "step", "epoch": 1, "step": 2, "global_step": 5, "loss": 0.5, "lr": 1e-4, "prompts": 8}
    assert tensorboard_scalars(step) == {"train/loss": 0.5, "train/lr": 1e-4, "train/prompts": 8.0}
    epoch = {"type": "epoch", "epoch": 1, "global_step": 5, "val_miou": 0.7, "miou_by_click": [0.5, 0.6]}
    assert tensorboard_scalars(epoch) == {"val/miou": 0.7, "val/miou_by_click/1": 0.5, "val/miou_by_click/2": 0.6}


def test_every_scalar_of_the_metrics_goes_to_tensorboard(stamps_run):
    got = scalars(stamps_run)
    assert {"train/loss", "train/lr", "val/miou"} <= set(got)
    assert_same(got, expected(stamps_run))


def test_resume_replaces_the_events_an_interrupted_run_wrote_after_its_checkpoint(stamps_cache, tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    from samcache.config import TrainConfig
    from samcache.train.trainer import train

    run = tmp_path / "run"
    train_run(stamps_cache, run, **{**QUICK_TRAIN, "epochs": 1})
    last = metrics(run)[-1]["global_step"]
    # As if the run had gone on after last.pt and been killed: events the resumed run must hide.
    stale = SummaryWriter(str(run / "tensorboard"))
    for step in (last + 1, last + 2):
        stale.add_scalar("train/loss", 999.0, step)
    stale.close()
    train(stamps_cache, run, TrainConfig(**{**QUICK_TRAIN, "epochs": 2}), resume=True, progress=False)
    got = scalars(run)
    assert 999.0 not in got["train/loss"].values()
    assert max(got["train/loss"]) > last  # the second epoch's steps are there
    assert_same(got, expected(run))
    # What hides them in any reader: the resumed writer's purge marker at its first new step.
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.compat.proto.event_pb2 import SessionLog

    starts = [e.step for f in sorted((run / "tensorboard").glob("events.*"))
              for e in EventFileLoader(str(f)).Load() if e.session_log.status == SessionLog.START]
    assert starts == [last + 1]


def test_training_works_without_tensorboard(stamps_cache, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # its import now fails
    run = tmp_path / "run"
    train_run(stamps_cache, run)
    assert (run / "metrics.jsonl").exists() and (run / "best.pt").exists()
    assert not (run / "tensorboard").exists()
