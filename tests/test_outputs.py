"""Never clobber what the user did not ask to replace: existing outputs are refused
unless --overwrite (tests/test_ownership.py: what --overwrite may replace), sidecars never land on the main output or another file, predict names are unique."""

from __future__ import annotations

import json
import shutil

from click.testing import CliRunner

from samcache.cli import main
from tests.helpers import tree_fingerprint


def _run(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_export_refuses_to_write_its_metadata_over_its_weights_or_a_dataset(stamps_run, stamps_copy, tmp_path):
    same = _run("export", "--run", stamps_run, "--out", tmp_path / "w.json")
    assert same.exit_code == 1 and "w.json, the very file asked for" in same.output
    assert not (tmp_path / "w.json").exists()
    dataset = tree_fingerprint(stamps_copy)
    for extra in ([], ["--overwrite"]):
        into = _run("export", "--run", stamps_run, "--out", stamps_copy / "train.pth", *extra)
        assert into.exit_code == 1 and "train.json, which is not a samcache export's metadata" in into.output
    assert tree_fingerprint(stamps_copy) == dataset  # train.json untouched, no train.pth written


def test_export_and_eval_replace_their_outputs_only_when_asked(stamps_cache, stamps_run_copy, tmp_path):
    out = tmp_path / "model.pth"
    assert _run("export", "--run", stamps_run_copy, "--out", out).exit_code == 0
    written = out.read_bytes()
    again = _run("export", "--run", stamps_run_copy, "--out", out)
    assert again.exit_code == 1 and "already exists" in again.output and "--overwrite" in again.output
    assert out.read_bytes() == written
    assert _run("export", "--run", stamps_run_copy, "--out", out, "--overwrite").exit_code == 0
    assert json.loads((tmp_path / "model.json").read_text())["file"] == "model.pth"

    report = tmp_path / "report"
    assert _run("eval", stamps_cache, "--out", report, "--split", "val").exit_code == 0
    before = (report / "summary.json").read_bytes()
    refused = _run("eval", stamps_cache, "--out", report, "--split", "test")
    assert refused.exit_code == 1 and "already holds samcache output (evaluation report)" in refused.output
    assert (report / "summary.json").read_bytes() == before
    replaced = _run("eval", stamps_cache, "--out", report, "--split", "test", "--overwrite")
    assert replaced.exit_code == 0 and json.loads((report / "summary.json").read_text())["split"] == "test"


def test_data_stamps_does_not_overwrite_a_folder(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    for extra in ([], ["--overwrite"]):  # --overwrite replaces samcache's own output only
        refused = _run("data", "stamps", "--out", out, "--n", "3", *extra)
        assert refused.exit_code == 1 and "holds files samcache did not write (notes.txt)" in refused.output
        assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert _run("data", "stamps", "--out", tmp_path / "empty_is_fine", "--n", "3").exit_code == 0


def test_predict_names_each_input_apart_and_keeps_earlier_predictions(stamps, stamps_run, tmp_path):
    page = sorted((stamps / "images").iterdir())[0]
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        shutil.copy(page, tmp_path / folder / "x.jpg")
    out = tmp_path / "pred"
    args = ["predict", tmp_path / "a" / "x.jpg", tmp_path / "b" / "x.jpg", "--run", stamps_run,
            "--box", "10,10,200,200", "--out", out]
    result = _run(*args)
    assert result.exit_code == 0, result.output
    predictions = json.loads((out / "predictions.json").read_text())["predictions"]
    assert sorted(p["mask_png"] for p in predictions) == ["x-1_mask0.png", "x-2_mask0.png"]
    assert all((out / p["mask_png"]).is_file() for p in predictions)
    refused = _run(*args)
    assert refused.exit_code == 1 and "already holds samcache output (predictions)" in refused.output
    assert _run(*args, "--overwrite").exit_code == 0


def test_predict_refuses_bad_boxes_before_writing_and_warns_about_boxes_off_the_image(stamps, stamps_run, tmp_path):
    page = sorted((stamps / "images").iterdir())[0]
    out = tmp_path / "pred"
    for box in ("nan,0,10,10", "0,0,inf,10"):
        refused = _run("predict", page, "--run", stamps_run, "--box", box, "--out", out)
        assert refused.exit_code == 1 and "must be finite" in refused.output and not out.exists()
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps({"images": [{"id": 1, "file_name": page.name}],
                                 "annotations": [{"id": 1, "image_id": 1, "bbox": [float("nan"), 0, 5, 5]}]}))
    refused = _run("predict", page, "--run", stamps_run, "--boxes", boxes, "--out", out)
    assert refused.exit_code == 1 and "annotation 1" in refused.output and not out.exists()
    off = _run("predict", page, "--run", stamps_run, "--box", "100000,100000,100010,100010", "--out", out)
    assert off.exit_code == 0 and "lies outside the" in off.output


def test_a_text_file_as_checkpoint_is_a_message(stamps, tmp_path):
    text = tmp_path / "notes.pth"
    text.write_text("these are my notes, not weights\n")
    page = sorted((stamps / "images").iterdir())[0]
    result = _run("predict", page, "--checkpoint", text, "--model", "tiny", "--box", "0,0,10,10",
                  "--out", tmp_path / "pred")
    assert result.exit_code == 1 and "is not a PyTorch checkpoint (neither the zip archive" in result.output
    assert "Traceback" not in result.output
