"""Export loads in SAM's own code; predict agrees with SamPredictor; both from the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from segment_anything import SamPredictor, sam_model_registry

from samcache.cli import main
from samcache.data.images import read_image
from samcache.models.weights import load_sam
from samcache.train.runs import RunCheckpoint
from tests.helpers import RUN_TRAIN

ONE_EPOCH = RUN_TRAIN  # what the shared run (conftest.stamps_run) was trained with
# `stamps` and `stamps_run` (trained on `stamps_cache`) are conftest.py's shared fixtures: only read here.


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_export_holds_the_run_decoder_and_metadata(stamps_run, tmp_path, fmt):
    run = stamps_run
    out = tmp_path / f"micro_stamps.{fmt}"
    result = CliRunner().invoke(main, ["export", "--run", str(run), "--out", str(out), "--format", fmt])
    assert result.exit_code == 0, result.output
    metadata = json.loads(out.with_suffix(".json").read_text())
    assert metadata["model_type"] == "micro" and metadata["fine_tuned"] == ["mask_decoder"]
    assert metadata["training_config"]["epochs"] == ONE_EPOCH["epochs"] and len(metadata["sha256"]) == 64
    exported = load_sam("micro", out)  # strict keys, weights_only / safetensors
    trained = RunCheckpoint.read(run / "best.pt").state_dict
    for key, value in exported.sam.state_dict().items():
        if key.startswith("mask_decoder."):
            assert torch.equal(value, trained[key])
        elif key.startswith("image_encoder."):
            assert torch.equal(value, load_sam("micro").sam.state_dict()[key])


def test_predict_with_run_uses_the_cache_and_writes_outputs(stamps, stamps_run, tmp_path):
    data, run = stamps, stamps_run  # the run names its cache, stamps_cache: predict finds the image there
    image = sorted((data / "images").glob("*.jpg"))[0]
    result = CliRunner().invoke(main, ["predict", str(image), "--run", str(run), "--box", "50,60,300,320",
                                       "--out", str(tmp_path / "p")])
    assert result.exit_code == 0, result.output
    assert "1 from cache" in result.output
    predictions = json.loads((tmp_path / "p" / "predictions.json").read_text())["predictions"]
    assert len(predictions) == 1 and predictions[0]["box"] == [50, 60, 300, 320]
    assert (tmp_path / "p" / f"{image.stem}_mask0.png").is_file()
    assert (tmp_path / "p" / f"{image.stem}_overlay.png").is_file()
    # Boxes from a COCO file, matched by file name; --cache given explicitly as a missing folder: encoder path.
    coco = json.loads((data / "train.json").read_text())
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps(coco))
    images = [data / "images" / im["file_name"] for im in coco["images"]]
    result = CliRunner().invoke(main, ["predict", *map(str, images), "--run", str(run), "--boxes", str(boxes),
                                       "--cache", str(tmp_path / "no-cache"), "--out", str(tmp_path / "q")])
    assert result.exit_code == 0, result.output
    predictions = json.loads((tmp_path / "q" / "predictions.json").read_text())["predictions"]
    assert len(predictions) == len(coco["annotations"]) and {p["embedding_from"] for p in predictions} == {"encoder"}


@pytest.mark.parametrize("with_box", [True, False])
def test_predict_with_points_equals_sam_predictor(stamps, tmp_path, with_box):
    """A box with a positive and a negative point (or the points alone), through the CLI and through
    SamPredictor on the exported-style checkpoint: the same mask."""
    image_path = sorted((stamps / "images").glob("*.jpg"))[0]
    checkpoint = tmp_path / "tiny.pth"
    sam = load_sam("tiny").sam
    torch.save(sam.state_dict(), checkpoint)
    box, points = [50, 60, 300, 320], [(150.0, 170.0, 1), (60.0, 70.0, 0)]
    args = ["predict", str(image_path), "--checkpoint", str(checkpoint), "--model", "tiny",
            *(["--box", ",".join(map(str, box))] if with_box else []),
            *[arg for x, y, label in points for arg in ("--point", f"{x},{y},{label}")], "--out", str(tmp_path / "p")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    written = json.loads((tmp_path / "p" / "predictions.json").read_text())["predictions"]
    assert len(written) == 1 and written[0]["points"] == [[x, y, label] for x, y, label in points]
    assert ("box" in written[0]) == with_box
    from samcache.data import masks

    ours = masks.decode(written[0]["segmentation"])
    predictor = SamPredictor(sam)
    predictor.set_image(read_image(image_path))
    with torch.no_grad():
        theirs, _, _ = predictor.predict(point_coords=np.array([p[:2] for p in points]),
                                         point_labels=np.array([p[2] for p in points]),
                                         box=np.array(box) if with_box else None, multimask_output=False)
    assert ours.shape == theirs[0].shape
    assert (ours != theirs[0]).mean() < 1e-3  # the encoder ran in both; fp rounding moves at most a few pixels


def test_predict_rejects_bad_arguments(stamps, stamps_run, tmp_path):
    data, run = stamps, stamps_run
    image = str(sorted((data / "images").glob("*.jpg"))[0])
    runner = CliRunner()
    assert runner.invoke(main, ["predict", image, "--run", str(run), "--out", str(tmp_path)]).exit_code == 2
    bad = runner.invoke(main, ["predict", image, "--run", str(run), "--box", "5,5,1,1", "--out", str(tmp_path)])
    assert bad.exit_code == 1 and "x1 must exceed x0" in bad.output
    point = runner.invoke(main, ["predict", image, "--run", str(run), "--point", "5,x", "--out", str(tmp_path)])
    assert point.exit_code == 1 and "--point takes x,y or x,y,label" in point.output
    label = runner.invoke(main, ["predict", image, "--run", str(run), "--point", "5,5,2", "--out", str(tmp_path)])
    assert label.exit_code == 1 and "a label of 1 (inside) or 0 (outside)" in label.output


@pytest.mark.slow
def test_vit_b_export_loads_in_sam_and_matches_samcache_predict(vit_b_run, tmp_path):
    """Real-checkpoint compatibility with random vit_b weights in Meta's layout (quality is not the point)."""
    data = vit_b_run / "ds"
    exported = tmp_path / "sam_vit_b_stamps.pth"
    result = CliRunner().invoke(main, ["export", "--run", str(vit_b_run / "run"), "--out", str(exported)])
    assert result.exit_code == 0, result.output

    sam = sam_model_registry["vit_b"](checkpoint=str(exported))  # Meta's own loader
    image_path = sorted((data / "images").glob("*.jpg"))[0]
    box = np.array([40.0, 50.0, 420.0, 380.0])
    predictor = SamPredictor(sam)
    predictor.set_image(read_image(image_path))
    expected, _, _ = predictor.predict(box=box, multimask_output=False)

    runner = CliRunner()
    for cache_args, source in (([], "encoder"), (["--cache", str(vit_b_run / "cache")], "cache")):
        out = tmp_path / f"pred_{source}"
        result = runner.invoke(main, ["predict", str(image_path), "--checkpoint", str(exported),
                                      "--box", ",".join(map(str, box)), "--out", str(out), *cache_args])
        assert result.exit_code == 0, result.output
        prediction = json.loads((out / "predictions.json").read_text())["predictions"][0]
        assert prediction["embedding_from"] == source
        from samcache.data import masks

        got = masks.decode(prediction["segmentation"])
        agreement = (got == expected[0]).mean()
        # The encoder path is SamPredictor's computation; the cache path differs by fp16 rounding only.
        assert agreement == 1.0 if source == "encoder" else agreement > 0.995, (source, agreement)
