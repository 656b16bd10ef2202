"""Nothing a user owns is deleted or replaced: output folders are new, empty or samcache's own of
the same kind (outputs.py), a run resumes only on its own images, a cache follows one dataset."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from samcache.cli import main
from samcache.outputs import MARKER_NAME
from tests.helpers import EMBED_FLAGS, copy_tree, micro_weights, tree_fingerprint

QUICK = ["--epochs", "1", "--batch-size", "2", "--objects-per-image", "2", "--workers", "0"]


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _page(dataset: Path) -> Path:
    return sorted((dataset / "images").iterdir())[0]


# ---------------------------------------------------------------------------------- train --out
def test_train_refuses_a_folder_it_did_not_write_and_deletes_nothing(stamps_cache, stamps, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    for name in ("config.yaml", "metrics.jsonl", "run.json", "curves.png", "best.pt"):
        (mine / name).write_text(f"my own {name}")
    before = tree_fingerprint(mine)
    result = _run("train", stamps_cache, "--out", mine, *QUICK)
    assert result.exit_code == 1
    assert result.output.count("\n") == 1 and "holds files samcache did not write (best.pt and 4 more)" in result.output
    assert tree_fingerprint(mine) == before
    assert sorted(p.name for p in mine.iterdir()) == sorted(before)  # not even a lock file went in

    cache_before = tree_fingerprint(stamps_cache)
    for out, said in ((stamps_cache, "is a samcache cache"), (stamps_cache / "shards", "did not write (g0"),
                      (stamps, "another kind (stamps dataset, not run)")):
        refused = _run("train", stamps_cache, "--out", out, *QUICK)
        assert refused.exit_code == 1 and said in refused.output, refused.output
    assert tree_fingerprint(stamps_cache) == cache_before


def test_a_run_that_stopped_before_its_first_checkpoint_starts_over_in_place(stamps_cache, stamps_run_copy):
    for name in ("last.pt", "best.pt"):
        (stamps_run_copy / name).unlink()
    (stamps_run_copy / "notes.txt").write_text("the user's")
    assert _run("train", stamps_cache, "--out", stamps_run_copy, *QUICK).exit_code == 0
    assert (stamps_run_copy / "last.pt").is_file() and (stamps_run_copy / "notes.txt").read_text() == "the user's"
    marker = json.loads((stamps_run_copy / MARKER_NAME).read_text())
    assert marker["kind"] == "run"


def test_a_run_written_before_runs_carried_the_marker_is_still_a_run(stamps_cache, stamps_run_copy):
    (stamps_run_copy / MARKER_NAME).unlink()
    result = _run("train", stamps_cache, "--out", stamps_run_copy, *QUICK[:1], "2", *QUICK[2:], "--resume")
    assert result.exit_code == 0, result.output
    assert (stamps_run_copy / MARKER_NAME).is_file()


# ------------------------------------------------------------------------------------- resume
def test_resume_refuses_another_cache_and_says_when_the_same_one_grew(stamps_cache, stamps_run_copy, stamps_copy,
                                                                      tmp_path):
    trained_on = sorted(json.loads((stamps_run_copy / "images.json").read_text())["train"])
    images = stamps_copy / "images"
    shutil.copy(images / trained_on[1], images / trained_on[0])  # other pixels under one of the run's names
    other = tmp_path / "other"
    assert _run("embed", stamps_copy, "--out", other, *EMBED_FLAGS).exit_code == 0
    last = (stamps_run_copy / "last.pt").read_bytes()
    result = _run("train", other, "--out", stamps_run_copy, "--epochs", "2", "--batch-size", "2",
                  "--objects-per-image", "2", "--workers", "0", "--resume")
    assert result.exit_code == 1
    assert f"it was trained from the cache {stamps_cache.resolve()}" in result.output
    assert "changed" in result.output and "start a new run" in result.output
    assert (stamps_run_copy / "last.pt").read_bytes() == last

    grown = copy_tree(stamps_cache, tmp_path / "grown_cache")
    run = copy_tree(stamps_run_copy, tmp_path / "run_on_grown")
    images = json.loads((run / "images.json").read_text())
    dropped = sorted(images["train"])[0]
    del images["train"][dropped]  # as if the image came into the cache after the run started
    (run / "images.json").write_text(json.dumps(images))
    info = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**info, "cache": str(grown.resolve())}))
    result = _run("train", grown, "--out", run, "--epochs", "2", "--batch-size", "2", "--objects-per-image", "2",
                  "--workers", "0", "--resume")
    assert result.exit_code == 1
    assert "the cache it started from has changed, and 1 train images were added to it since" in result.output


def test_resume_on_a_moved_copy_of_the_same_cache_goes_on(stamps_cache, stamps_run_copy, tmp_path):
    moved = copy_tree(stamps_cache, tmp_path / "moved")
    result = _run("train", moved, "--out", stamps_run_copy, "--epochs", "2", "--batch-size", "2",
                  "--objects-per-image", "2", "--workers", "0", "--resume")
    assert result.exit_code == 0, result.output


# ------------------------------------------------------------------------------------ predict
def test_predict_never_writes_over_an_input_or_a_file_it_did_not_write(stamps_run, stamps, tmp_path):
    q = tmp_path / "q"
    q.mkdir()
    shutil.copy(_page(stamps), q / "x.jpg")
    (q / "x_overlay.png").write_bytes(b"the user's own picture")
    before = tree_fingerprint(q)
    for extra in ([], ["--overwrite"]):
        result = _run("predict", q / "x_overlay.png", q / "x.jpg", "--run", stamps_run, "--box", "10,10,100,100",
                      "--out", q, *extra)
        assert result.exit_code == 1 and "holds files samcache did not write (x.jpg and 1 more)" in result.output
    assert tree_fingerprint(q) == before

    out = tmp_path / "out"
    first = _run("predict", q / "x.jpg", "--run", stamps_run, "--box", "10,10,100,100", "--out", out)
    assert first.exit_code == 0, first.output
    again = _run("predict", q / "x.jpg", "--run", stamps_run, "--box", "10,10,100,100", "--out", out)
    assert again.exit_code == 1 and "pass --overwrite" in again.output
    # An earlier output taken as an input: --overwrite would remove it before reading it.
    overlay = out / "x_overlay.png"
    taken = _run("predict", overlay, q / "x.jpg", "--run", stamps_run, "--box", "10,10,100,100", "--out", out,
                 "--overwrite")
    assert taken.exit_code == 1 and f"{overlay} is an input of this command" in taken.output
    assert overlay.is_file()


def test_predict_overwrite_leaves_only_the_new_files_and_the_users(stamps_run, stamps, tmp_path):
    pages = sorted((stamps / "images").iterdir())[:2]
    out = tmp_path / "out"
    assert _run("predict", *pages, "--run", stamps_run, "--box", "10,10,100,100", "--out", out).exit_code == 0
    (out / "notes.txt").write_text("mine")
    result = _run("predict", pages[0], "--run", stamps_run, "--box", "10,10,100,100", "--out", out, "--overwrite")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir() if p.name != MARKER_NAME) == sorted(
        ["notes.txt", "predictions.json", f"{pages[0].stem}_mask0.png", f"{pages[0].stem}_overlay.png"])


def test_a_failed_predict_leaves_a_folder_marked_incomplete_that_the_retry_takes(stamps_run, stamps, tmp_path,
                                                                                  monkeypatch):
    from samcache.deploy import predict

    out, page = tmp_path / "out", _page(stamps)
    monkeypatch.setattr(predict, "atomic_write_json", lambda *a, **k: (_ for _ in ()).throw(OSError(28, "No space")))
    failed = _run("predict", page, "--run", stamps_run, "--box", "10,10,100,100", "--out", out)
    assert failed.exit_code != 0
    assert json.loads((out / MARKER_NAME).read_text())["complete"] is False
    monkeypatch.undo()
    retry = _run("predict", page, "--run", stamps_run, "--box", "10,10,100,100", "--out", out)
    assert retry.exit_code == 0, retry.output
    assert json.loads((out / MARKER_NAME).read_text())["complete"] is True


@pytest.mark.parametrize("prompt", [["--box", "0,0,3e9,3e9"], ["--point", "1e308,1e308"],
                                    ["--box", "10,10,100,100", "--point", "-1e300,5"]])
def test_predict_takes_far_out_prompts_onto_the_image_with_a_warning(stamps_run, stamps, tmp_path, prompt):
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["predict", str(_page(stamps)), "--run", str(stamps_run), *prompt,
                                       "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "warning:" in result.output and ("clipped to" in result.output or "moved to its edge" in result.output)
    predictions = json.loads((out / "predictions.json").read_text())["predictions"]
    assert len(predictions) == 1 and (out / predictions[0]["mask_png"]).is_file()


def test_predict_boxes_that_name_none_of_the_images_is_an_error(stamps_run, stamps, tmp_path):
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps({"images": [{"id": 1, "file_name": "elsewhere.jpg"}],
                                 "annotations": [{"image_id": 1, "bbox": [1, 1, 20, 20]}]}))
    result = _run("predict", _page(stamps), "--run", stamps_run, "--boxes", boxes, "--out", tmp_path / "out")
    assert result.exit_code == 1
    assert "--boxes names no image given here: its images are elsewhere.jpg" in result.output
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------- eval
def test_eval_overwrite_replaces_only_its_own_report(stamps_cache, stamps_run_copy, tmp_path):
    stamps_run = stamps_run_copy
    report = tmp_path / "report"
    flags = ["--run", stamps_run, "--split", "val"]
    assert _run("eval", stamps_cache, *flags, "--out", report).exit_code == 0
    (report / "stale.png").write_text("a file the earlier report did not list")  # the user's
    assert _run("eval", stamps_cache, *flags, "--out", report, "--overwrite").exit_code == 0
    assert (report / "stale.png").is_file() and (report / "summary.json").is_file()

    dataset_like = tmp_path / "dataset"
    dataset_like.mkdir()
    (dataset_like / "summary.json").write_text("{}")  # not samcache's
    refused = _run("eval", stamps_cache, *flags, "--out", dataset_like, "--overwrite")
    assert refused.exit_code == 1 and "did not write (summary.json)" in refused.output
    assert (dataset_like / "summary.json").read_text() == "{}"
    into_run = _run("eval", stamps_cache, *flags, "--out", stamps_run, "--overwrite")
    assert into_run.exit_code == 1 and "another kind (run" in into_run.output


def test_a_failed_eval_is_marked_incomplete_and_the_retry_needs_no_overwrite(stamps_cache, stamps_run_copy,
                                                                             tmp_path, monkeypatch):
    stamps_run = stamps_run_copy
    from samcache.errors import OutputError
    from samcache.evaluate import evaluator

    def disk_full(report_dir, *args, **kwargs):
        (Path(report_dir) / "report.md").write_text("half a rep")
        raise OutputError(f"could not write {report_dir}/report.md: No space left on device")

    report = tmp_path / "report"
    monkeypatch.setattr(evaluator, "write_eval_report", disk_full)
    failed = _run("eval", stamps_cache, "--run", stamps_run, "--split", "val", "--out", report)
    assert failed.exit_code == 1 and "No space left" in failed.output
    assert json.loads((report / MARKER_NAME).read_text())["complete"] is False
    monkeypatch.undo()
    retry = _run("eval", stamps_cache, "--run", stamps_run, "--split", "val", "--out", report)
    assert retry.exit_code == 0, retry.output
    assert (report / "report.md").read_text() != "half a rep"
    assert json.loads((report / MARKER_NAME).read_text())["complete"] is True


# -------------------------------------------------------------------------------------- embed
def test_a_cache_follows_one_dataset_and_switches_only_when_asked(stamps, stamps_copy, tmp_path):
    cache = tmp_path / "cache"
    assert _run("embed", stamps, "--out", cache, *EMBED_FLAGS).exit_code == 0
    followed = json.loads((cache / "dataset.json").read_text())
    assert followed["path"] == str(stamps.resolve())

    other = tmp_path / "other"
    other.mkdir()
    shutil.copytree(stamps_copy / "images", other / "images")
    (other / "train.json").write_text((stamps_copy / "train.json").read_text())  # train only: val, test gone
    shards = tree_fingerprint(cache / "shards")
    refused = _run("embed", other, "--out", cache, *EMBED_FLAGS)
    assert refused.exit_code == 1
    assert f"follows the dataset {stamps.resolve()}" in refused.output and "--switch-dataset" in refused.output
    assert tree_fingerprint(cache / "shards") == shards

    switched = _run("embed", other, "--out", cache, *EMBED_FLAGS, "--switch-dataset")
    assert switched.exit_code == 0 and "dropped 2 no longer in the dataset" in switched.output
    record = json.loads((cache / "dataset.json").read_text())
    assert record["path"] == str(other.resolve()) and record["switched_from"] == [str(stamps.resolve())]

    back = _run("embed", stamps, "--out", cache, *EMBED_FLAGS, "--switch-dataset")
    assert back.exit_code == 0 and "embedded 0 images" in back.output and "restored 2 from earlier shards" in back.output


@pytest.mark.slow
def test_two_datasets_embedded_into_one_cache_at_once_leave_one_dataset(stamps, tmp_path):
    import subprocess
    import sys

    other = tmp_path / "other"
    assert _run("data", "stamps", "--out", other, "--n", "4", "--seed", "5").exit_code == 0
    cache = tmp_path / "cache"
    processes = [subprocess.Popen([sys.executable, "-m", "samcache", "embed", str(dataset), "--out", str(cache),
                                   *EMBED_FLAGS], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for dataset in (stamps, other)]
    outcomes = [(p.wait(timeout=600), p.stdout.read()) for p in processes]
    assert sorted(code for code, _ in outcomes) == [0, 1], outcomes
    winner = (stamps, other)[[code for code, _ in outcomes].index(0)]
    assert json.loads((cache / "dataset.json").read_text())["path"] == str(winner.resolve())
    info = json.loads(_run("info", cache, "--json").output)
    assert info["images"] == len(list((winner / "images").iterdir()))


def test_a_cache_from_before_datasets_were_recorded_drops_nothing_unasked(stamps_copy, stamps_cache_copy):
    (stamps_cache_copy / "dataset.json").unlink()
    train = json.loads((stamps_copy / "train.json").read_text())
    train["images"] = train["images"][1:]
    (stamps_copy / "train.json").write_text(json.dumps(train))
    refused = _run("embed", stamps_copy, "--out", stamps_cache_copy, *EMBED_FLAGS)
    assert refused.exit_code == 1 and "was made before caches recorded their dataset" in refused.output
    adopted = _run("embed", stamps_copy, "--out", stamps_cache_copy, *EMBED_FLAGS, "--switch-dataset")
    assert adopted.exit_code == 0 and "dropped 1 no longer in the dataset" in adopted.output
    assert json.loads((stamps_cache_copy / "dataset.json").read_text())["path"] == str(stamps_copy.resolve())


def test_a_moved_dataset_is_followed_without_asking(stamps, tmp_path):
    cache = tmp_path / "cache"
    assert _run("embed", stamps, "--out", cache, *EMBED_FLAGS).exit_code == 0
    moved = copy_tree(stamps, tmp_path / "moved")
    result = _run("embed", moved, "--out", cache, *EMBED_FLAGS)
    assert result.exit_code == 0 and "nothing to embed" in result.output
    assert json.loads((cache / "dataset.json").read_text())["path"] == str(moved.resolve())


@pytest.mark.parametrize("content", ["garbage", "empty", "pickle", "truncated", "other model"])
def test_embed_with_weights_that_do_not_load_writes_nothing(stamps, tmp_path, content):
    import pickle

    import torch

    from samcache.models.weights import build_seeded

    folder = tmp_path / "weights"
    folder.mkdir()
    weights = folder / "w.pth"
    if content in ("truncated", "other model"):
        good = micro_weights(folder, seed=3)
        if content == "truncated":
            weights.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
        else:
            torch.save(build_seeded("tiny").state_dict(), weights)  # SAM's widths where micro has 32
    else:
        weights.write_bytes({"garbage": b"garbage", "empty": b"",
                             "pickle": pickle.dumps({"x": print}, protocol=2)}[content])
    cache = tmp_path / "cache"
    result = _run("embed", stamps, "--out", cache, *EMBED_FLAGS, "--checkpoint", weights)
    assert result.exit_code == 1 and str(weights) in result.output and "Traceback" not in result.output
    assert not cache.exists()
    fixed = _run("embed", stamps, "--out", cache, *EMBED_FLAGS)  # the corrected command is not refused
    assert fixed.exit_code == 0, fixed.output


# -------------------------------------------------------------------------------- data stamps
def test_data_stamps_overwrite_leaves_only_the_new_pages(tmp_path):
    out = tmp_path / "stamps"
    assert _run("data", "stamps", "--out", out, "--n", "5").exit_code == 0
    (out / "notes.txt").write_text("mine")
    again = _run("data", "stamps", "--out", out, "--n", "3")
    assert again.exit_code == 1 and "pass --overwrite" in again.output
    assert _run("data", "stamps", "--out", out, "--n", "3", "--overwrite").exit_code == 0
    assert sorted(p.name for p in (out / "images").iterdir()) == [f"page_0000{i}.jpg" for i in range(3)]
    assert (out / "notes.txt").read_text() == "mine"

    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"jpeg")
    refused = _run("data", "stamps", "--out", foreign, "--n", "3", "--overwrite")
    assert refused.exit_code == 1 and "did not write (holiday.jpg)" in refused.output
    assert [p.name for p in foreign.iterdir()] == ["holiday.jpg"]
