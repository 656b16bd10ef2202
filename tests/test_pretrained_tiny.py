"""The shipped pretrained tiny model (synthetic shapes, never stamps), fine-tuned on stamps with the demo's own
training flags: on held-out pages it clearly beats its zero-shot self and the filled prompt box.

This is the offline stand-in for the product's story with Meta's SAM: a pretrained generalist,
zero-shot on a new domain, then its decoder fine-tuned from the cache. It needs the shipped
weights (samcache/weights/tiny_shapes.safetensors): pretrained quality cannot come from random
weights, so nothing here falls back to them.
"""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from samcache.cli import main
from samcache.config import EmbedConfig, EvalConfig
from samcache.data.datasets import load_dataset
from samcache.data.stamps import generate_stamps
from samcache.embed.pipeline import embed_dataset
from samcache.evaluate.evaluator import evaluate
from samcache.models import weights as models
from tests.helpers import demo_train_flags

pytestmark = pytest.mark.slow

# Seen on a 2-core AMD EPYC with AVX512-BF16 (constraints.txt's versions, fp32 embeddings; 40 pages, 12 test
# pages, 27 objects; the demo's flags, --loss sam): test mIoU zero-shot 0.752, box fill 0.762, fine-tuned 0.802;
# boundary F 0.419 -> 0.632. The margin leaves room for other CPUs and versions without letting a model that
# does not beat both through.
MARGIN = 0.02
PAGES = 40


def test_fine_tuned_tiny_beats_zero_shot_and_the_filled_box_on_held_out_stamps(tmp_path):
    assert models.tiny_pretrained_available(), f"{models.TINY_PRETRAINED} is not installed"
    data = tmp_path / "stamps"
    generate_stamps(data, PAGES, seed=7, progress=False, fractions=(0.6, 0.1, 0.3))
    # fp32 embeddings: the same numbers on CPUs with and without native bf16.
    embed_dataset(load_dataset(data), tmp_path / "cache",
                  EmbedConfig(workers=0, progress=False, precision="fp32", backend="torch"))
    cache_provenance = json.loads((tmp_path / "cache" / "cache.json").read_text())["provenance"]
    assert cache_provenance["weights_sha256"] == models.TINY_PRETRAINED_SHA256  # the default is the pretrained model

    flags = demo_train_flags()
    result = CliRunner().invoke(main, ["train", str(tmp_path / "cache"), "--out", str(tmp_path / "run"), *flags,
                                       "--workers", "0"])
    assert result.exit_code == 0, result.output
    summary = evaluate(tmp_path / "cache", tmp_path / "report", EvalConfig(split="test"), run_dir=tmp_path / "run")
    zero_shot, fine_tuned = summary["zero_shot"], summary["fine_tuned"]
    box_fill = summary["baselines"]["box_fill"]
    assert fine_tuned["objects"] >= 10
    figures = {name: round(s["miou"], 4) for name, s in
               (("zero_shot", zero_shot), ("fine_tuned", fine_tuned), ("box_fill", box_fill))}
    assert fine_tuned["miou"] > box_fill["miou"] + MARGIN, figures
    assert fine_tuned["miou"] > zero_shot["miou"] + MARGIN, figures
    assert fine_tuned["boundary_f"] > zero_shot["boundary_f"], (zero_shot["boundary_f"], fine_tuned["boundary_f"])
