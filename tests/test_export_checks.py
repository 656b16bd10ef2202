"""`samcache export` replaces only its own earlier exports, checks what it wrote before it is put in
place, and removes what killed exports left beside their --out."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from samcache.cli import main
from samcache.models.families import MicroFamily
from tests.helpers import RUN_TRAIN, SHARED_EMBED, embed, micro_weights, train_run, tree_fingerprint


def _export(*args):
    return CliRunner().invoke(main, ["export", *map(str, args)])


def _one_line_error(result, *words: str) -> None:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1, result.output
    for word in words:
        assert word in result.output, result.output


def _dead_pid() -> int:
    """The id of a process that has ended (what a killed export's staging name holds)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# ------------------------------------------------------------------ what --overwrite may replace
@pytest.mark.parametrize("which", ["best", "last"])
def test_export_never_replaces_the_runs_checkpoint(stamps_run_copy, which):
    run = stamps_run_copy
    checkpoint = run / f"{which}.pt"
    before = tree_fingerprint(run)
    for extra in (["--overwrite"], []):
        result = _export("--run", run, "--out", checkpoint, *extra)
        _one_line_error(result, str(checkpoint), f"is the run's checkpoint ({which}.pt)", "choose another --out")
    assert tree_fingerprint(run) == before  # the checkpoint as it was, and no metadata beside it


def test_export_never_replaces_a_cache_or_dataset_file(stamps_run_copy, stamps_cache_copy, stamps_copy):
    shard = sorted(stamps_cache_copy.rglob("*.h5"))[0]
    page = sorted((stamps_copy / "images").glob("*.jpg"))[0]
    cache, dataset = tree_fingerprint(stamps_cache_copy), tree_fingerprint(stamps_copy)
    for target in (shard, page):
        result = _export("--run", stamps_run_copy, "--out", target, "--overwrite")
        _one_line_error(result, str(target), "is not a samcache export",
                        "samcache replaces only its own earlier exports; choose another --out")
    assert tree_fingerprint(stamps_cache_copy) == cache and tree_fingerprint(stamps_copy) == dataset


def test_export_never_replaces_the_base_weights(coco_dir, tmp_path):
    weights = micro_weights(tmp_path, seed=1)
    embed(coco_dir, tmp_path / "cache", **SHARED_EMBED, checkpoint=weights)
    train_run(tmp_path / "cache", tmp_path / "run", **RUN_TRAIN, checkpoint=str(weights))
    before = weights.read_bytes()
    # given with --checkpoint, and found by the run itself (the file it recorded) without it
    for extra, what in ((["--checkpoint", weights], "is the base weights file given with --checkpoint"),
                        ([], "is the run's base weights file")):
        result = _export("--run", tmp_path / "run", "--out", weights, "--overwrite", *extra)
        _one_line_error(result, str(weights), what, "choose another --out")
    assert weights.read_bytes() == before and not weights.with_suffix(".json").exists()
    assert _export("--run", tmp_path / "run", "--out", tmp_path / "model.pth").exit_code == 0


def test_overwrite_replaces_only_an_unchanged_earlier_export(stamps_run_copy, tmp_path):
    out = tmp_path / "model.pth"
    assert _export("--run", stamps_run_copy, "--out", out).exit_code == 0
    replaced = _export("--run", stamps_run_copy, "--out", out, "--overwrite", "--weights", "last")
    assert replaced.exit_code == 0, replaced.output
    metadata = json.loads(out.with_suffix(".json").read_text())
    assert metadata["run_weights"] == "last"

    out.write_bytes(out.read_bytes() + b"edited")  # something else at --out since: no longer the export
    edited = out.read_bytes()
    result = _export("--run", stamps_run_copy, "--out", out, "--overwrite")
    _one_line_error(result, str(out), "is not the samcache export model.json describes", "choose another --out")
    assert out.read_bytes() == edited and json.loads(out.with_suffix(".json").read_text()) == metadata

    mine = tmp_path / "mine.pth"  # no metadata beside it
    torch.save({"x": torch.ones(1)}, mine)
    kept = mine.read_bytes()
    _one_line_error(_export("--run", stamps_run_copy, "--out", mine, "--overwrite"), "is not a samcache export")
    assert mine.read_bytes() == kept and not mine.with_suffix(".json").exists()


# ---------------------------------------------------------------------- the check of the file
@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_export_is_read_back_and_predicts_the_runs_mask(stamps_run_copy, tmp_path, fmt):
    out = tmp_path / "exports" / f"model.{fmt}"
    result = _export("--run", stamps_run_copy, "--out", out, "--format", fmt)
    assert result.exit_code == 0, result.output
    check = json.loads(out.with_suffix(".json").read_text())["check"]
    assert check["loaded_with"] == "samcache.models.weights.load_sam('micro', checkpoint=FILE)"
    assert check["mask_agreement"] >= 0.999 and check["score_difference"] <= 1e-3
    assert sorted(p.name for p in out.parent.iterdir()) == sorted([out.name, "model.json"])  # no staging file left


@pytest.mark.slow
@pytest.mark.parametrize("which, fmt, loader", [
    ("vit_b", "pth", "segment_anything.sam_model_registry['vit_b'](checkpoint=FILE)"),
    ("sam2", "pth", "sam2.build_sam.build_sam2('configs/sam2.1/sam2.1_hiera_t.yaml', FILE)"),
    ("sam2", "safetensors", "sam2.build_sam.build_sam2('configs/sam2.1/sam2.1_hiera_t.yaml', None).load_state_dict("),
], ids=["vit_b-pth", "sam2-pth", "sam2-safetensors"])
def test_sam_and_sam2_exports_are_read_back_by_their_own_code(request, tmp_path, which, fmt, loader):
    run = request.getfixturevalue("vit_b_run") / "run" if which == "vit_b" else request.getfixturevalue("sam2_run")
    out = tmp_path / f"model.{fmt}"
    result = _export("--run", run, "--out", out, "--format", fmt)
    assert result.exit_code == 0, result.output
    check = json.loads(out.with_suffix(".json").read_text())["check"]
    assert check["loaded_with"].startswith(loader)
    assert check["mask_agreement"] >= 0.999 and check["score_difference"] <= 1e-3


def _drop(state_dict: dict) -> dict:
    return {k: v for k, v in state_dict.items() if k != "mask_decoder.iou_token.weight"}


def _rename(state_dict: dict) -> dict:
    return {k.replace("mask_decoder.iou_token.", "mask_decoder.iou_tokens."): v for k, v in state_dict.items()}


def _perturb(state_dict: dict) -> dict:
    return {k: v + 1e-3 if k == "mask_decoder.iou_token.weight" else v for k, v in state_dict.items()}


@pytest.mark.parametrize("corrupt, words", [
    (_drop, ["cannot load the export", "mask_decoder.iou_token.weight"]),
    (_rename, ["cannot load the export", "mask_decoder.iou_token"]),
    (_perturb, ["holds another mask_decoder.iou_token.weight than the run's model"]),
])
def test_a_corrupted_export_is_refused_and_leaves_nothing(stamps_run_copy, tmp_path, monkeypatch, corrupt, words):
    folder = tmp_path / "exports"
    earlier = folder / "earlier.pth"
    assert _export("--run", stamps_run_copy, "--out", earlier).exit_code == 0
    before = tree_fingerprint(folder)
    monkeypatch.setattr(MicroFamily, "checkpoint_payload", lambda self, state_dict: corrupt(state_dict))
    out = folder / "model.pth"
    _one_line_error(_export("--run", stamps_run_copy, "--out", out), f"{out} was not written", *words)
    _one_line_error(_export("--run", stamps_run_copy, "--out", earlier, "--overwrite"), *words)
    assert tree_fingerprint(folder) == before  # no file, no metadata, no staging file; the earlier export kept
    assert _hidden(folder) == []


# ------------------------------------------------------------------ what killed exports leave
def test_the_next_export_removes_what_a_killed_export_left(stamps_run_copy, tmp_path):
    out = tmp_path / "model.pth"
    dead = _dead_pid()
    left = [tmp_path / f".model.pth.samcache-export-{dead}-0123abcd.pth",  # the staging file
            tmp_path / ".model.pth.k2x9_q7a.tmp", tmp_path / ".model.json.a1b2c3d4.tmp"]  # atomic writes' temp files
    for path in left:
        path.write_bytes(os.urandom(1000))
    running = tmp_path / f".model.pth.samcache-export-{os.getppid()}-0123abcd.pth"  # an export still at work
    others = [running, tmp_path / ".model.pth.notes", tmp_path / ".other.pth.samcache-export-1-0123abcd.pth"]
    for path in others:
        path.write_text("not this export's leftover")
    result = _export("--run", stamps_run_copy, "--out", out)
    assert result.exit_code == 0, result.output
    assert out.is_file() and not any(path.exists() for path in left)
    assert all(path.read_text() == "not this export's leftover" for path in others)


def test_a_killed_export_leaves_a_staging_file_the_next_export_removes(stamps_run_copy, tmp_path):
    out = tmp_path / "exports" / "model.pth"
    killed = subprocess.run([sys.executable, "-m", "samcache", "export", "--run", str(stamps_run_copy), "--out",
                             str(out)], env={**os.environ, "SAMCACHE_CRASH_AT": "export-staged"},
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr
    (staging,) = out.parent.iterdir()  # the whole file under its staging name, never at --out
    assert staging.name.startswith(".model.pth.samcache-export-") and staging.stat().st_size > 0
    result = _export("--run", stamps_run_copy, "--out", out)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.json", "model.pth"]


def test_the_next_onnx_export_removes_a_killed_exports_staging_folder(tiny_run, tmp_path):
    out = tmp_path / "onnx"
    out.mkdir()
    # samcache's staging name, and `.export-` + tempfile's 8 characters (recognised by what it holds)
    for name in (f".samcache-export-{_dead_pid()}-k2x9_q7a", ".export-ab12cd34"):
        (out / name).mkdir()
        (out / name / "decoder.onnx").write_bytes(os.urandom(1000))
        (out / name / ".encoder.onnx.a1b2c3d4").mkdir()  # torch.onnx's own folder, inside
    mine = out / ".export-mynotes1"  # someone else's folder under that name
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    result = _export("--run", tiny_run, "--format", "onnx", "--out", out)
    assert result.exit_code == 0, result.output
    assert _hidden(out) == [mine.name] and (mine / "notes.txt").read_text() == "mine"
    listed = json.loads((out / "export.json").read_text())["files"]
    assert sorted(p.name for p in out.glob("*.onnx")) == sorted(listed)


@pytest.mark.slow
def test_a_killed_onnx_export_leaves_a_staging_folder_the_next_export_removes(tiny_run, tmp_path):
    out = tmp_path / "onnx"
    killed = subprocess.run([sys.executable, "-m", "samcache", "export", "--run", str(tiny_run), "--format", "onnx",
                             "--out", str(out)], env={**os.environ, "SAMCACHE_CRASH_AT": "export-staged"},
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr
    (staging,) = out.iterdir()
    assert staging.name.startswith(".samcache-export-") and (staging / "encoder.onnx").stat().st_size > 1 << 20
    result = _export("--run", tiny_run, "--format", "onnx", "--out", out, "--overwrite")
    assert result.exit_code == 0, result.output
    assert _hidden(out) == []


# ----------------------------------------------------------------------------------- ONNX
def test_onnx_overwrite_replaces_only_its_own_files(tiny_run, tmp_path):
    out = tmp_path / "onnx"
    assert _export("--run", tiny_run, "--format", "onnx", "--out", out).exit_code == 0
    metadata = json.loads((out / "export.json").read_text())
    for name in ("decoder.onnx", "decoder_single_mask.onnx"):
        assert metadata["check"][name]["mask_agreement"] >= 0.999, metadata["check"]
    (out / "README.md").write_text("my notes")  # edited since: not the export's any more
    before = tree_fingerprint(out)
    result = _export("--run", tiny_run, "--format", "onnx", "--out", out, "--overwrite")
    _one_line_error(result, str(out / "README.md"), "is not the file the samcache export beside it wrote")
    assert tree_fingerprint(out) == before

    foreign = tmp_path / "foreign"  # someone's own decoder.onnx, no export.json
    foreign.mkdir()
    (foreign / "decoder.onnx").write_bytes(b"theirs")
    result = _export("--run", tiny_run, "--format", "onnx", "--out", foreign, "--overwrite")
    _one_line_error(result, str(foreign / "decoder.onnx"), "is not a samcache export")
    assert [p.name for p in foreign.iterdir()] == ["decoder.onnx"]
    assert (foreign / "decoder.onnx").read_bytes() == b"theirs"


def test_a_wrong_onnx_graph_is_refused_and_leaves_nothing(tiny_run, tmp_path, monkeypatch):
    from samcache.deploy.onnx import OfficialDecoder

    real = OfficialDecoder.mask_postprocessing
    monkeypatch.setattr(OfficialDecoder, "mask_postprocessing", lambda self, masks, size: -real(self, masks, size))
    out = tmp_path / "onnx"
    result = _export("--run", tiny_run, "--format", "onnx", "--out", out)
    _one_line_error(result, f"{out / 'decoder.onnx'} was not written", "predicts another mask than the run")
    assert not out.exists()  # not even the folder it made
