"""Segment everything: equal to SamAutomaticMaskGenerator on the same embedding; from the cache in
`predict --everything`; scored with COCO mask AP in `eval --everything`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from segment_anything import SamAutomaticMaskGenerator, SamPredictor

from samcache.cli import main
from samcache.config import EverythingSettings
from samcache.data import masks
from samcache.data.images import read_image
from samcache.deploy.predict import predictor_from_run
from samcache.evaluate.automatic_masks import segment_everything
from samcache.models.families import family_of
from tests.helpers import copy_tree

# Lower thresholds than SAM's defaults, so that the one-epoch tiny of the shared run finds masks.
LOOSE = EverythingSettings(points_per_side=4, points_per_batch=10, pred_iou_thresh=0.3, stability_score_thresh=0.6)
LOOSE_FLAGS = ["--points-per-side", "4", "--pred-iou-thresh", "0.3", "--stability-score-thresh", "0.6"]


def test_equals_sam_automatic_mask_generator(stamps, tiny_run):
    sam = predictor_from_run(tiny_run).sam
    image = read_image(sorted((stamps / "images").glob("*.jpg"))[0])
    predictor = SamPredictor(sam)
    predictor.set_image(image)
    ours = segment_everything(family_of("tiny").decoder(sam, "tiny"), predictor.features, image.shape[:2], LOOSE)
    generator = SamAutomaticMaskGenerator(sam, points_per_side=LOOSE.points_per_side, points_per_batch=16,
                                          pred_iou_thresh=LOOSE.pred_iou_thresh,
                                          stability_score_thresh=LOOSE.stability_score_thresh,
                                          output_mode="coco_rle")
    with torch.no_grad():
        theirs = sorted(generator.generate(image), key=lambda r: -r["predicted_iou"])
    assert len(ours) == len(theirs) > 0
    for found, stock in zip(ours, theirs):
        assert abs(found.predicted_iou - stock["predicted_iou"]) < 1e-5
        assert abs(found.stability_score - stock["stability_score"]) < 1e-4
        assert (masks.decode(found.rle) == masks.decode(stock["segmentation"])).mean() > 0.9999
        x0, y0, x1, y1 = found.box_xyxy
        assert np.allclose([x0, y0, x1 - x0, y1 - y0], stock["bbox"])
        assert found.point == tuple(stock["point_coords"][0])


def test_predict_everything_from_the_cache(stamps, tiny_run, tmp_path):
    stamps_run = tiny_run  # the tiny's masks, which the generator's thresholds keep
    images = sorted((stamps / "images").glob("*.jpg"))[:2]
    result = CliRunner().invoke(main, ["predict", *map(str, images), "--run", str(stamps_run), "--everything",
                                       *LOOSE_FLAGS, "--out", str(tmp_path / "e")])
    assert result.exit_code == 0, result.output
    assert "masks/s" in result.output
    written = json.loads((tmp_path / "e" / "predictions.json").read_text())
    assert written["mode"] == "everything" and written["settings"]["points_per_side"] == 4
    assert [im["embedding_from"] for im in written["images"]] == ["cache", "cache"]
    assert written["predictions"], "no masks found"
    for p in written["predictions"]:
        assert p["image_id"] in (1, 2) and p["score"] == p["predicted_iou"] > 0.3 and p["stability_score"] >= 0.6
        image = written["images"][p["image_id"] - 1]
        assert tuple(p["segmentation"]["size"]) == (image["height"], image["width"])
        assert masks.area(p["segmentation"]) == p["area"] > 0
    assert all((tmp_path / "e" / f"{image.stem}_everything.png").is_file() for image in images)
    # the same image through the encoder (no cache) finds the same masks, up to fp16 storage of the cache
    again = CliRunner().invoke(main, ["predict", str(images[0]), "--run", str(stamps_run), "--everything",
                                      *LOOSE_FLAGS, "--cache", str(tmp_path / "none"), "--out", str(tmp_path / "f")])
    assert again.exit_code == 0, again.output
    from_encoder = json.loads((tmp_path / "f" / "predictions.json").read_text())
    assert from_encoder["images"][0]["embedding_from"] == "encoder"
    cached = [p for p in written["predictions"] if p["image_id"] == 1]
    assert abs(len(from_encoder["predictions"]) - len(cached)) <= 1


def test_nothing_found_is_an_empty_result_not_an_error(stamps, stamps_run, tmp_path):
    image = sorted((stamps / "images").glob("*.jpg"))[0]
    result = CliRunner().invoke(main, ["predict", str(image), "--run", str(stamps_run), "--everything",
                                       "--points-per-side", "2", "--pred-iou-thresh", "1", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "predictions.json").read_text())["predictions"] == []
    assert (tmp_path / f"{image.stem}_everything.png").is_file()


def test_predict_everything_refuses_prompts_and_stray_options(stamps, stamps_cache, stamps_run, tmp_path):
    image = str(sorted((stamps / "images").glob("*.jpg"))[0])
    both = CliRunner().invoke(main, ["predict", image, "--run", str(stamps_run), "--everything", "--box", "1,1,9,9",
                                     "--out", str(tmp_path)])
    assert both.exit_code == 2 and "--everything takes no --box" in both.output
    stray = CliRunner().invoke(main, ["predict", image, "--run", str(stamps_run), "--box", "1,1,9,9",
                                      "--points-per-side", "8", "--out", str(tmp_path)])
    assert stray.exit_code == 2 and "go with --everything" in stray.output
    bad = CliRunner().invoke(main, ["predict", image, "--run", str(stamps_run), "--everything",
                                    "--pred-iou-thresh", "2", "--out", str(tmp_path)])
    assert bad.exit_code != 0 and "--pred-iou-thresh" in bad.output
    stray_eval = CliRunner().invoke(main, ["eval", str(stamps_cache), "--points-per-side", "8",
                                           "--out", str(tmp_path / "r")])
    assert stray_eval.exit_code == 2 and "go with --everything" in stray_eval.output


def test_eval_everything_scores_coco_ap(tiny_cache, tiny_run, tmp_path):
    stamps_cache, stamps_run_copy = tiny_cache, copy_tree(tiny_run, tmp_path / "run")  # eval writes into the run
    result = CliRunner().invoke(main, ["eval", str(stamps_cache), "--run", str(stamps_run_copy), "--split", "val",
                                       "--out", str(tmp_path / "r"), "--everything", *LOOSE_FLAGS])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    everything = summary["everything"]
    assert summary["config"]["generator"]["points_per_side"] == 4 and set(everything) == {"zero_shot", "fine_tuned"}
    for model in ("zero_shot", "fine_tuned"):
        figures = everything[model]
        assert set(figures) >= {"ap", "ap50", "ar100", "masks"}
        assert 0.0 <= figures["ap"] <= figures["ap50"] <= 1.0 and 0.0 <= figures["ar100"] <= 1.0
    assert everything["fine_tuned"]["masks"] > 0
    assert "everything" in result.output and "AP50" in result.output
    report = (tmp_path / "r" / "report.md").read_text()
    assert "## Segment everything" in report and (tmp_path / "r" / "everything.png").is_file()


def test_coco_ap_of_the_ground_truth_itself_is_one(stamps_cache):
    """The scorer, checked: the ground truth as predictions scores AP 1, and nothing found scores 0."""
    from samcache.cache.reader import EmbeddingCache
    from samcache.evaluate.automatic_masks import EverythingMask
    from samcache.evaluate.evaluator import coco_mask_ap, coco_truth

    cache = EmbeddingCache(stamps_cache)
    indices = cache.annotated_indices("val")
    truth = coco_truth(cache, indices)
    perfect = [EverythingMask(o.rle, o.box, masks.area(o.rle), 1.0, 1.0, (0.0, 0.0)).coco_result(i + 1)
               for i in indices for o in cache.images[i].objects]
    assert coco_mask_ap(truth, perfect) == {"ap": 1.0, "ap50": 1.0, "ar100": 1.0}
    assert coco_mask_ap(truth, []) == {"ap": 0.0, "ap50": 0.0, "ar100": 0.0}
    half = perfect[::2]  # exact masks for every other object: recall (and AR100) is their share
    assert len(perfect) >= 2
    assert coco_mask_ap(truth, half)["ar100"] == pytest.approx(len(half) / len(perfect))
