"""MobileSAM (`--model vit_t`) end to end, checked against MobileSAM's own package (`mobile_sam`, or
the same code in mobilesam-lite): weights in mobile_sam.pt's layout load key for key and encode as
its image encoder does, `samcache embed` preprocesses as its SamPredictor, and a fine-tuned run
exports to files its registry and predictor load and that predict what `samcache predict` and
`samcache eval` report. Random weights (quality is not the point) on 2 stamps pages: the encoder
runs on as few images as the fixtures below can share."""

from __future__ import annotations

import csv
import json
import re
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from samcache.cache.reader import EmbeddingCache
from samcache.cli import main
from samcache.data import masks
from samcache.data.images import read_image
from samcache.deploy.export import import_mobile_sam
from samcache.models.families import MobileSamFamily, family_of, recognise_model_type
from samcache.models.specs import OFFICIAL_WEIGHTS
from samcache.models.weights import build_sam, build_seeded, load_sam
from tests.helpers import RUN_TRAIN, copy_tree, left_unchanged

EMBED_VIT_T = ["--model", "vit_t", "--workers", "0", "--batch-size", "1", "--precision", "fp32", "--backend", "torch"]
TRAIN_FLAGS = ["--epochs", str(RUN_TRAIN["epochs"]), "--batch-size", str(RUN_TRAIN["batch_size"]),
               "--objects-per-image", str(RUN_TRAIN["objects_per_image"]), "--workers", "0",
               "--lr", str(RUN_TRAIN["lr"])]
# The cache holds fp16: an embedding equals an fp32 one within fp16's rounding (2**-11 relative).
FP16_RTOL, FP16_ATOL = 1e-3, 1e-4


def cli(*args) -> str:
    result = CliRunner().invoke(main, [str(arg) for arg in args])
    assert result.exit_code == 0, result.output
    return result.output


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def mobile_sam():
    return import_mobile_sam()


@pytest.fixture(scope="module")
def vit_t_checkpoint(tmp_path_factory) -> Path:
    """A random-weight vit_t state dict saved as mobile_sam.pt is: a plain dict of tensors, its keys.
    TinyViT initialises its attention biases to zero; random ones make a stale eval-mode copy of them
    (mobile_sam.refresh_attention_biases) change the embedding, where the tests see it."""
    state_dict = build_seeded("vit_t", 0).state_dict()
    generator = torch.Generator().manual_seed(1)
    for key, tensor in state_dict.items():
        if key.endswith(".attention_biases"):
            tensor.copy_(torch.randn(tensor.shape, generator=generator))
    path = tmp_path_factory.mktemp("vit_t_weights") / "mobile_sam_random.pt"
    torch.save(state_dict, path)
    return path


@pytest.fixture(scope="module")
def vit_t_cache(vit_t_checkpoint, tmp_path_factory) -> Path:
    """2 stamps pages (train, val) embedded by `samcache embed --model vit_t`: ROOT/ds, ROOT/cache."""
    from samcache.data.stamps import generate_stamps

    root = tmp_path_factory.mktemp("vit_t")
    generate_stamps(root / "ds", 2, seed=2, progress=False, fractions=(0.5, 0.5, 0.0))
    cli("embed", root / "ds", "--out", root / "cache", "--checkpoint", vit_t_checkpoint, *EMBED_VIT_T)
    with left_unchanged(root, "vit_t stamps cache"):
        yield root


@pytest.fixture(scope="module")
def reference_features(vit_t_cache, vit_t_checkpoint, mobile_sam) -> dict[str, torch.Tensor]:
    """{image name: mobile_sam's SamPredictor(...).set_image(raw image).features} of the base weights."""
    sam = mobile_sam.sam_model_registry["vit_t"](checkpoint=str(vit_t_checkpoint))
    predictor = mobile_sam.SamPredictor(sam.eval())  # .eval() after loading: TinyViT's cached biases
    features = {}
    for path in sorted((vit_t_cache / "ds" / "images").iterdir()):
        predictor.set_image(read_image(path))
        features[path.name] = predictor.features.clone()
    return features


@pytest.fixture(scope="module")
def vit_t_run(vit_t_cache, vit_t_checkpoint, tmp_path_factory) -> Path:
    """One epoch of `samcache train` on the vit_t cache, and its `samcache export` (pth): ROOT/run, ROOT/export.pth."""
    root = tmp_path_factory.mktemp("vit_t_run")
    cli("train", vit_t_cache / "cache", "--out", root / "run", "--checkpoint", vit_t_checkpoint, *TRAIN_FLAGS)
    cli("export", "--run", root / "run", "--out", root / "export.pth")
    with left_unchanged(root, "vit_t run"):
        yield root


def val_image(cache_dir: Path):
    """The cache's record of its one val page."""
    (info,) = [info for info in EmbeddingCache(cache_dir).images if info.split == "val"]
    assert info.objects, "the val page has objects"
    return info


# ------------------------------------------------------------------------------------ family facts
def test_vit_t_family_and_recognised_weights(vit_t_checkpoint):
    family = family_of("vit_t")
    assert isinstance(family, MobileSamFamily) and family.export_reader == "mobile_sam"
    assert recognise_model_type(torch.load(vit_t_checkpoint, weights_only=True)) == "vit_t"
    for other in ("vit_b", "hq_vit_b"):
        with torch.device("meta"):  # the keys and shapes are all recognition reads
            state_dict = build_sam(other).state_dict()
        assert recognise_model_type(state_dict) == other
    assert recognise_model_type(build_seeded("hq_vit_tiny", 0).state_dict()) == "hq_vit_tiny"  # same TinyViT


def test_official_mobile_sam_weights_are_listed_and_pinned(vit_t_checkpoint, monkeypatch):
    official = OFFICIAL_WEIGHTS["vit_t"]
    assert official.url.endswith("/mobile_sam.pt") and re.fullmatch(r"[0-9a-f]{64}", official.sha256)
    # a file of MobileSAM's tensors is the pinned size, up to torch.save's archive bookkeeping
    assert abs(vit_t_checkpoint.stat().st_size - official.size_bytes) < 0.005 * official.size_bytes
    (listed,) = [line for line in cli("models").splitlines() if line.split()[:1] == ["vit_t"]]
    assert f"mobile_sam.pt ({official.size_bytes / 1e9:.2f} GB, not downloaded)" in listed

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network in tests")

    monkeypatch.setattr("urllib.request.urlopen", offline)
    result = CliRunner().invoke(main, ["fetch", "vit_t"])
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1, result.output
    assert official.url in result.output and official.sha256 in result.output


# ------------------------------------------------------------------------------------------ weights
def test_weights_load_strictly_in_mobile_sam_and_encode_alike(vit_t_cache, vit_t_checkpoint, mobile_sam,
                                                              reference_features):
    state_dict = torch.load(vit_t_checkpoint, weights_only=True)
    theirs = mobile_sam.sam_model_registry["vit_t"]()
    loaded = theirs.load_state_dict(state_dict, strict=True)
    assert not loaded.missing_keys and not loaded.unexpected_keys
    assert sorted(theirs.state_dict()) == sorted(state_dict)
    ours = load_sam("vit_t", vit_t_checkpoint).sam
    assert sorted(ours.state_dict()) == sorted(state_dict)
    for key, tensor in ours.state_dict().items():
        assert torch.equal(tensor, state_dict[key]), key

    # set_image's own steps to its encoder's input, on the first page; its features are the reference's
    name = sorted(reference_features)[0]
    predictor = mobile_sam.SamPredictor(theirs.eval())
    resized = torch.as_tensor(predictor.transform.apply_image(read_image(vit_t_cache / "ds" / "images" / name)))
    model_input = theirs.preprocess(resized.permute(2, 0, 1)[None].float())
    with torch.no_grad():
        embedding = ours.image_encoder(model_input)
    torch.testing.assert_close(embedding, reference_features[name], rtol=1e-5, atol=1e-5)


def test_a_vit_b_checkpoint_is_refused_for_vit_t(vit_b_checkpoint, coco_dir, tmp_path):
    result = CliRunner().invoke(main, ["embed", str(coco_dir), "--out", str(tmp_path / "cache"),
                                       "--checkpoint", str(vit_b_checkpoint), *EMBED_VIT_T])
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1, result.output
    assert f"{vit_b_checkpoint} does not fit the vit_t model; it looks like a vit_b checkpoint" in result.output
    assert not (tmp_path / "cache").exists()


# ----------------------------------------------------------------------------------- preprocessing
def test_embed_equals_mobile_sam_predictor_features(vit_t_cache, reference_features):
    cache = EmbeddingCache(vit_t_cache / "cache")
    assert cache.provenance.model_type == "vit_t"
    assert sorted(info.name for info in cache.images) == sorted(reference_features)
    for index, info in enumerate(cache.images):
        expected = reference_features[info.name][0].numpy()
        cached = cache.embedding(index).astype(np.float32)
        np.testing.assert_allclose(cached, expected, rtol=FP16_RTOL, atol=FP16_ATOL, err_msg=info.name)
        assert cosine(cached, expected) >= 0.9999, info.name


# ------------------------------------------------------------------------- train, eval and export
@pytest.mark.slow
def test_export_loads_in_mobile_sam_and_matches_predict_and_eval(vit_t_cache, vit_t_run, mobile_sam, tmp_path):
    exported = vit_t_run / "export.pth"
    assert json.loads(exported.with_suffix(".json").read_text())["model_type"] == "vit_t"
    sam = mobile_sam.sam_model_registry["vit_t"](checkpoint=str(exported))
    predictor = mobile_sam.SamPredictor(sam.eval())
    info = val_image(vit_t_cache / "cache")
    predictor.set_image(read_image(info.file.path))
    expected = {}
    for obj in info.objects:
        mask, score, _ = predictor.predict(box=np.array(obj.box), multimask_output=False)
        expected[obj.object_id] = (mask[0], float(score[0]))

    first = info.objects[0]
    mask, score = expected[first.object_id]
    assert 0.001 < mask.mean() < 0.999  # a mask with pixels on both sides, or agreement would prove nothing
    box = ",".join(map(str, first.box))
    for source, args in (("cache", ["--run", vit_t_run / "run", "--cache", vit_t_cache / "cache"]),
                         ("encoder", ["--checkpoint", exported])):
        out = tmp_path / source
        cli("predict", info.file.path, *args, "--box", box, "--out", out)
        (prediction,) = json.loads((out / "predictions.json").read_text())["predictions"]
        assert prediction["embedding_from"] == source
        agreement = (masks.decode(prediction["segmentation"]) == mask).mean()
        # the encoder path is SamPredictor's computation; the cache's differs by fp16 rounding only
        assert agreement == 1.0 if source == "encoder" else agreement >= 0.995, (source, agreement)
        assert abs(prediction["score"] - score) < 1e-3, source

    run = copy_tree(vit_t_run / "run", tmp_path / "run")  # eval records its summary in the run
    cli("eval", vit_t_cache / "cache", "--run", run, "--split", "val", "--out", tmp_path / "report")
    with open(tmp_path / "report" / "objects.csv", newline="") as f:
        rows = {int(row["object_id"]): row for row in csv.DictReader(f)}
    assert sorted(rows) == sorted(expected)
    for obj in info.objects:
        mask, score = expected[obj.object_id]
        truth = masks.decode(obj.rle)
        iou = (mask & truth).sum() / (mask | truth).sum()
        assert abs(float(rows[obj.object_id]["fine_tuned_iou"]) - iou) < 0.005, obj.object_id
        assert abs(float(rows[obj.object_id]["fine_tuned_score"]) - score) < 1e-3, obj.object_id


@pytest.mark.slow
def test_safetensors_export_loads_in_mobile_sam(vit_t_run, mobile_sam, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "mobile_sam_stamps.safetensors"
    cli("export", "--run", vit_t_run / "run", "--out", out, "--format", "safetensors")
    metadata = json.loads(out.with_suffix(".json").read_text())
    assert metadata["format"] == "safetensors" and "mobile_sam.sam_model_registry['vit_t']" in metadata["load_with"]
    sam = mobile_sam.sam_model_registry["vit_t"]()
    sam.load_state_dict(load_file(str(out)), strict=True)
    pth = torch.load(vit_t_run / "export.pth", weights_only=True)
    assert sorted(sam.state_dict()) == sorted(pth)
    for key, tensor in sam.state_dict().items():
        assert torch.equal(tensor, pth[key]), key


@pytest.mark.slow
def test_onnx_export_equals_predict_on_the_cache(vit_t_cache, vit_t_run, tmp_path):
    from tests.test_onnx import check_against_predict

    out = tmp_path / "onnx"
    cli("export", "--run", vit_t_run / "run", "--format", "onnx", "--out", out)
    metadata = json.loads((out / "export.json").read_text())
    assert metadata["model_type"] == "vit_t"
    assert sorted(metadata["files"]) == ["decoder.onnx", "decoder_single_mask.onnx", "encoder.onnx"]
    assert 'name: "samcache_run_vit_t"' in (out / "xanylabeling.yaml").read_text()
    # decoder.onnx on the cached embedding equals `samcache predict` for a box; encoder.onnx gives that embedding
    check_against_predict(out, vit_t_run / "run", vit_t_cache / "cache", tmp_path, images=1, kinds=("box",))
