"""The shipped pretrained tiny model (synthetic shapes, never stamps), fine-tuned on stamps: it fits them, keeps the rest.

This is the offline stand-in for the product's story with Meta's SAM: a pretrained generalist,
zero-shot on a new domain, then its decoder fine-tuned from the cache. It needs the shipped
weights (samcache/weights/tiny_shapes.safetensors): pretrained quality cannot come from random
weights, so nothing here falls back to them.
"""

from __future__ import annotations

import json

import pytest

from samcache import models
from samcache.config import EmbedConfig, EvalConfig, TrainConfig
from samcache.datasets import load_dataset
from samcache.datasets.stamps import generate_stamps
from samcache.embed import embed_dataset
from samcache.evaluate import evaluate
from samcache.train import train

pytestmark = pytest.mark.slow

# 14 train pages at 4 images a step are 4 steps an epoch: 10 epochs with a short warmup give the decoder 40
# steps (6 epochs with the default 20-step warmup were nearly all warmup and moved it by chance).
# Seen here (constraints.txt's versions, fp32 embeddings): train split mIoU 0.557 zero-shot -> 0.648
# fine-tuned (28 objects); test split 0.593 -> 0.589 (11 objects): on 14 pages it fits its domain's
# masks and does not lose the held-out ones. A held-out gain needs more pages (issue 15).
FINE_TUNE = dict(epochs=10, warmup_steps=5, loss="dice-bce", lr=5e-4)
FIT_MARGIN = 0.04
HELD_OUT_TOLERANCE = 0.03


def test_fine_tuning_the_pretrained_tiny_decoder_fits_stamps_and_keeps_the_held_out_ones(tmp_path):
    assert models.tiny_pretrained_available(), f"{models.TINY_PRETRAINED} is not installed"
    data = tmp_path / "stamps"
    # Its own 24 pages with a larger test split: the figures above were seen on this data (the shared set has 7).
    generate_stamps(data, 24, seed=7, progress=False, fractions=(0.6, 0.15, 0.25))
    # fp32 embeddings: the same numbers on CPUs with and without native bf16.
    embed_dataset(load_dataset(data), tmp_path / "cache",
                  EmbedConfig(workers=0, progress=False, precision="fp32", backend="torch"))
    cache_provenance = json.loads((tmp_path / "cache" / "cache.json").read_text())["provenance"]
    assert cache_provenance["weights_sha256"] == models.TINY_PRETRAINED_SHA256  # the default is the pretrained model

    config = TrainConfig(batch_size=4, objects_per_image=4, workers=0, save_every=None, **FINE_TUNE)
    train(tmp_path / "cache", tmp_path / "run", config, progress=False)
    scores = {}
    for split in ("train", "test"):
        summary = evaluate(tmp_path / "cache", tmp_path / f"report-{split}", EvalConfig(split=split),
                           run_dir=tmp_path / "run")
        scores[split] = summary["zero_shot"]["miou"], summary["fine_tuned"]["miou"]
        assert summary["fine_tuned"]["objects"] >= 10
    zero_shot, fine_tuned = scores["train"]
    assert zero_shot > 0.3  # pretrained: far above a random decoder (about 0.03 on stamps)
    assert fine_tuned > zero_shot + FIT_MARGIN, scores
    zero_shot, fine_tuned = scores["test"]
    assert fine_tuned > zero_shot - HELD_OUT_TOLERANCE, scores
