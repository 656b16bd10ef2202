"""Metrics against independent computations, and `samcache eval` end to end (cache and run only)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from pycocotools import mask as mask_utils

from samcache.cache.reader import EmbeddingCache
from samcache.cli import main
from samcache.config import EvalConfig
from samcache.data.metrics import boundary, boundary_f, dice, iou
from samcache.errors import RunError
from samcache.evaluate.evaluator import evaluate
from samcache.evaluate.report import model_titles
from samcache.models.preprocess import transform_boxes
from samcache.models.prompts import box_fill
from samcache.models.weights import load_sam
from samcache.train.runs import RunCheckpoint
from tests.helpers import SHARED_EMBED, copy_tree, embed, micro_weights, rect_mask


# -------------------------------------------------------------------------------------- metrics
def test_iou_and_dice_on_hand_built_squares():
    a = rect_mask(50, 50, 0, 0, 10, 10)  # 100 px
    b = rect_mask(50, 50, 5, 0, 15, 10)  # 100 px, 50 shared
    assert iou(a, b) == pytest.approx(50 / 150) and dice(a, b) == pytest.approx(100 / 200)
    assert iou(a, a) == 1.0 and dice(a, np.zeros_like(a)) == 0.0
    empty = np.zeros_like(a)
    assert iou(empty, empty) == 1.0 and dice(empty, empty) == 1.0


def test_iou_agrees_with_pycocotools_on_rle_masks():
    rng = np.random.default_rng(0)
    for _ in range(20):
        a = rng.random((40, 60)) > 0.6
        b = rng.random((40, 60)) > 0.5
        expected = mask_utils.iou([mask_utils.encode(np.asfortranarray(a.astype(np.uint8)))],
                                  [mask_utils.encode(np.asfortranarray(b.astype(np.uint8)))], [0])[0][0]
        assert iou(a, b) == pytest.approx(expected)


def test_boundary_of_a_square():
    square = rect_mask(30, 30, 5, 5, 25, 25)
    assert boundary(square).sum() == 4 * 20 - 4


def test_boundary_f_with_derivable_answers():
    truth = rect_mask(200, 200, 20, 20, 40, 40)  # boundary: 76 px
    assert boundary_f(truth, truth) == 1.0
    assert boundary_f(np.zeros_like(truth), truth) == 0.0
    # A far-away extra blob: recall 1, precision 76 / (76 + 16).
    pred = truth | rect_mask(200, 200, 150, 150, 155, 155)
    precision, recall = 76 / 92, 1.0
    assert boundary_f(pred, truth, tolerance=2) == pytest.approx(2 * precision * recall / (precision + recall))
    # A one-pixel shift is within a 1.5 px tolerance everywhere; a 10-pixel shift is not.
    shifted = rect_mask(200, 200, 21, 20, 41, 40)
    assert boundary_f(shifted, truth, tolerance=1.5) == 1.0
    assert boundary_f(rect_mask(200, 200, 30, 20, 50, 40), truth, tolerance=1.5) < 0.6


# -------------------------------------------------------------------------------------- eval
@pytest.fixture(scope="module")
def imageless_cache(stamps, tmp_path_factory) -> Path:
    """Its own cache (the shared one points at images that exist): of a copy of the stamps pages, then deleted."""
    root = tmp_path_factory.mktemp("eval")
    data = copy_tree(stamps, root / "stamps")
    embed(data, root / "cache", **SHARED_EMBED)
    shutil.rmtree(data)  # eval must not need the images
    assert not any(Path(info.file.path).exists() for info in EmbeddingCache(root / "cache").images)
    return root / "cache"


@pytest.fixture
def cache_and_run(imageless_cache, stamps_run_copy):
    """The imageless cache and a private copy of the shared run (eval writes eval-SPLIT.json into the run)."""
    return imageless_cache, stamps_run_copy


def test_eval_writes_the_report_from_cache_and_run_only(cache_and_run, tmp_path):
    cache_dir, run_dir = cache_and_run
    assert not (run_dir / "eval-test.json").exists()
    summary = evaluate(cache_dir, tmp_path / "report", EvalConfig(split="test"), run_dir=run_dir)
    report = tmp_path / "report"
    for name in ("summary.json", "objects.csv", "report.md", "overlays_worst.png", "overlays_best.png",
                 "overlays_random.png", "iou_histogram.png", "iou_scatter.png"):
        assert (report / name).is_file(), name
    written = json.loads((report / "summary.json").read_text())
    cache = EmbeddingCache(cache_dir)
    n_objects = sum(len(cache.images[i].objects) for i in cache.annotated_indices("test"))
    for model in ("zero_shot", "fine_tuned"):
        assert {"miou", "mdice", "boundary_f", "objects", "per_category"} <= set(written[model])
        assert written[model]["objects"] == n_objects
    rows = list(csv.DictReader((report / "objects.csv").open()))
    assert len(rows) == n_objects
    assert np.mean([float(r["fine_tuned_iou"]) for r in rows]) == pytest.approx(summary["fine_tuned"]["miou"], abs=1e-5)
    text = (report / "report.md").read_text()
    assert "![overlays_worst.png](overlays_worst.png)" in text
    # samcache's own models (the tiny, the micro) are named in the report, and never called SAM.
    assert "zero-shot (micro) mIoU" in text and "fine-tuned (micro) mIoU" in text and "SAM" not in text
    assert (run_dir / "eval-test.json").is_file()


def test_model_titles_name_the_model():
    assert model_titles("tiny")["zero_shot"] == "zero-shot (tiny)"
    assert model_titles("vit_b") == {"truth": "ground truth", "zero_shot": "zero-shot SAM (vit_b)",
                                     "fine_tuned": "fine-tuned (SAM vit_b)"}


def test_zero_shot_scores_equal_an_independent_stock_computation(imageless_cache, tmp_path):
    cache_dir = imageless_cache
    evaluate(cache_dir, tmp_path / "r", EvalConfig(split="test"))
    rows = list(csv.DictReader((tmp_path / "r" / "objects.csv").open()))
    assert "fine_tuned_iou" not in rows[0]
    cache = EmbeddingCache(cache_dir)
    sam = load_sam(cache.provenance.model_type).sam  # the cache's weights (seeded)
    row = rows[0]
    info = cache.images[cache.index_of(row["image"])]
    obj = next(o for o in info.objects if o.object_id == int(row["object_id"]))
    embedding = torch.from_numpy(cache.embedding(info.index)).float()[None]
    box = torch.as_tensor(transform_boxes(np.array([obj.box]), info.original_size), dtype=torch.float32)
    with torch.no_grad():
        sparse, dense = sam.prompt_encoder(points=None, boxes=box, masks=None)
        low_res, _ = sam.mask_decoder(image_embeddings=embedding, image_pe=sam.prompt_encoder.get_dense_pe(),
                                      sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                      multimask_output=False)
        pred = (sam.postprocess_masks(low_res, info.input_size, info.original_size) > 0)[0, 0].numpy()
    expected = mask_utils.iou([mask_utils.encode(np.asfortranarray(pred.astype(np.uint8)))],
                              [{"size": obj.rle["size"], "counts": obj.rle["counts"].encode()}], [0])[0][0]
    assert float(row["zero_shot_iou"]) == pytest.approx(expected, abs=1e-5)


def test_the_box_fill_baseline_equals_an_independent_computation(imageless_cache, tmp_path):
    summary = evaluate(imageless_cache, tmp_path / "r", EvalConfig(split="test"))
    cache = EmbeddingCache(imageless_cache)
    ious = []
    for index in cache.annotated_indices("test"):
        info = cache.images[index]
        for obj in info.objects:
            x0, y0, x1, y1 = obj.box
            filled = mask_utils.frPyObjects(np.array([[x0, y0, x1 - x0, y1 - y0]], np.float64),
                                            *info.original_size)  # COCO's own box raster
            truth = {"size": obj.rle["size"], "counts": obj.rle["counts"].encode()}
            ious.append(mask_utils.iou(filled, [truth], [0])[0][0])
    baseline = summary["baselines"]["box_fill"]
    assert baseline["objects"] == len(ious) == summary["zero_shot"]["objects"]
    assert baseline["miou"] == pytest.approx(float(np.mean(ious)), abs=1e-4)
    assert 0.05 < baseline["miou"] < 0.95  # stamps are round or ragged: a filled box is a poor mask
    rows = list(csv.DictReader((tmp_path / "r" / "objects.csv").open()))
    assert np.mean([float(r["box_fill_iou"]) for r in rows]) == pytest.approx(baseline["miou"], abs=1e-5)
    report = (tmp_path / "r" / "report.md").read_text()
    assert "box_fill" in report and "trivial baseline" in report


def test_box_fill_fills_the_pixels_whose_centres_lie_in_the_box():
    filled = box_fill([1.0, 2.0, 4.0, 3.6], (5, 6))
    expected = np.zeros((5, 6), bool)
    expected[2:4, 1:4] = True  # rows 2, 3 (centres 2.5, 3.5), columns 1-3 (centres 1.5-3.5)
    np.testing.assert_array_equal(filled, expected)
    assert not box_fill([2.2, 2.2, 2.4, 2.4], (5, 6)).any()  # no centre inside


def test_several_prompt_kinds_in_one_eval_score_as_each_alone(cache_and_run, tmp_path):
    cache_dir, run_dir = cache_and_run
    both = evaluate(cache_dir, tmp_path / "both", EvalConfig(prompt="point,box"), run_dir=run_dir)
    point = evaluate(cache_dir, tmp_path / "point", EvalConfig(prompt=["point"]), run_dir=run_dir)
    box = evaluate(cache_dir, tmp_path / "box", EvalConfig(), run_dir=run_dir)
    assert both["prompt"] == "point" and list(both["by_prompt"]) == ["point", "box"]
    for kind, alone in (("point", point), ("box", box)):
        for model in ("zero_shot", "fine_tuned"):
            assert both["by_prompt"][kind][model]["miou"] == pytest.approx(alone[model]["miou"], abs=1e-6)
    assert both["fine_tuned"]["miou"] == pytest.approx(point["fine_tuned"]["miou"], abs=1e-6)  # the lead kind
    assert "baselines" not in both  # the lead kind is points: no box to fill
    assert both["by_prompt"]["box"]["baselines"]["box_fill"]["miou"] == box["baselines"]["box_fill"]["miou"]
    rows = list(csv.DictReader((tmp_path / "both" / "objects.csv").open()))
    assert {"fine_tuned_iou", "box_fine_tuned_iou", "box_box_fill_iou"} <= set(rows[0])
    assert np.mean([float(r["box_fine_tuned_iou"]) for r in rows]) == pytest.approx(box["fine_tuned"]["miou"],
                                                                                     abs=1e-5)
    report = (tmp_path / "both" / "report.md").read_text()
    assert "prompt: point" in report and "prompt: box" in report


def test_eval_clicks_reports_both_models_per_click(cache_and_run, tmp_path):
    cache_dir, run_dir = cache_and_run
    summary = evaluate(cache_dir, tmp_path / "r", EvalConfig(clicks=3), run_dir=run_dir)
    for model in ("zero_shot", "fine_tuned"):
        result = summary["clicks"][model]
        assert len(result["miou"]) == 3 and result["objects"] == summary[model]["objects"]
        assert all(0 <= v <= 1 for v in result["miou"]) and 1 <= result["noc85"] <= 3 and 1 <= result["noc90"] <= 3
    written = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert written["clicks"] == summary["clicks"]
    assert (tmp_path / "r" / "iou_vs_clicks.png").is_file()
    assert "iou_vs_clicks.png" in (tmp_path / "r" / "report.md").read_text()


def test_eval_cli_prints_the_table_and_refuses_bad_input(cache_and_run, tmp_path):
    cache_dir, run_dir = cache_and_run
    runner = CliRunner()
    result = runner.invoke(main, ["eval", str(cache_dir), "--run", str(run_dir), "--out", str(tmp_path / "r"),
                                  "--prompt", "point"])
    assert result.exit_code == 0, result.output
    assert "zero_shot" in result.output and "fine_tuned" in result.output and "report.md" in result.output
    assert "box_fill" not in result.output  # filling a box is a baseline for box prompts only
    boxes = runner.invoke(main, ["eval", str(cache_dir), "--run", str(run_dir), "--out", str(tmp_path / "b")])
    assert boxes.exit_code == 0, boxes.output
    table = {line.split()[0]: line.split()[1:] for line in boxes.output.splitlines() if line.split()}
    written = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert float(table["box_fill"][1]) == pytest.approx(written["baselines"]["box_fill"]["miou"], abs=1e-4)
    empty = runner.invoke(main, ["eval", str(cache_dir), "--out", str(tmp_path / "s"), "--split", "nope"])
    assert empty.exit_code == 1 and "no objects in split 'nope'" in empty.output
    missing = runner.invoke(main, ["eval", str(cache_dir), "--run", str(tmp_path), "--out", str(tmp_path / "t")])
    assert missing.exit_code == 1 and "best.pt does not exist" in missing.output


def test_training_validation_and_eval_make_the_same_masks(stamps_cache, stamps_run, tmp_path):
    """One inference path: the run's validation mIoU before and after training is what eval scores
    on the same split with the zero-shot and the fine-tuned decoder."""
    state = RunCheckpoint.read(stamps_run / "last.pt").state
    summary = evaluate(stamps_cache, tmp_path / "r", EvalConfig(split="val", weights="last", overlays=0),
                       run_dir=copy_tree(stamps_run, tmp_path / "run"))
    assert summary["zero_shot"]["miou"] == pytest.approx(state.history[0], abs=1e-9)
    assert summary["fine_tuned"]["miou"] == pytest.approx(state.history[-1], abs=1e-9)
    assert summary["zero_shot"]["miou"] != summary["fine_tuned"]["miou"]


def test_a_run_refuses_a_cache_of_other_weights(stamps, stamps_cache, stamps_run_copy, tmp_path):
    other = tmp_path / "other"
    embed(stamps, other, checkpoint=micro_weights(tmp_path, seed=1))  # the same images, another encoder's weights
    assert EmbeddingCache(other).provenance.weights_sha256 != EmbeddingCache(stamps_cache).provenance.weights_sha256
    with pytest.raises(RunError, match="do not belong together"):
        evaluate(other, tmp_path / "r", EvalConfig(split="val"), run_dir=stamps_run_copy)
    assert not (tmp_path / "r").exists()
