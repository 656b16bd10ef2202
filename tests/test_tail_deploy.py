"""Runs that trained the encoder's tail (`--train tail`) in eval, predict, export, ONNX and serve:
cached images run the trained tail on the cache's tail tokens, new images the whole fine-tuned
encoder, and both give the same masks; exports carry the tail, LoRA merged, in the model's layout."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from samcache.cache.reader import EmbeddingCache
from samcache.cli import main
from samcache.config import EvalConfig, EverythingSettings
from samcache.data import masks
from samcache.data.images import read_image
from samcache.deploy.export import export_run
from samcache.deploy.predict import predict_images, predictor_from_checkpoint, predictor_from_run
from samcache.errors import RunError
from samcache.evaluate.evaluator import evaluate, load_decoders
from samcache.fileio import sha256_file
from samcache.models.weights import load_sam
from samcache.train.runs import RunFolder
from tests.helpers import FAST_EMBED, copy_tree, embed, left_unchanged, train_run

# The tail's training: a large tail learning rate, so that one epoch moves the encoder's last block
# well beyond the float tolerances the tests compare within (a tail that stayed the base's would let
# a path that forgot the tail pass).
TAIL_TRAIN = dict(trainable=["tail", "mask_decoder"], lora_rank=2, tail_lr=0.05, lr=1e-3, epochs=1, batch_size=1,
                  objects_per_image=1, workers=0, save_every=None)
BOX = (40.0, 50.0, 420.0, 380.0)
MIN_AGREEMENT = 0.995  # masks from cached fp16 tail tokens and from the image: fp16 rounding apart


def _pages(root: Path) -> Path:
    from samcache.data.stamps import generate_stamps

    generate_stamps(root / "ds", 2, seed=2, progress=False, fractions=(0.5, 0.5, 0.0))
    return root / "ds"


def _tail_run(root: Path, model_type: str):
    """2 stamps pages (train, val) embedded by `model_type` with --tail-blocks 1, and a run that trained
    the tail (LoRA rank 2) and the mask decoder: ROOT/ds, ROOT/cache, ROOT/run."""
    embed(_pages(root), root / "cache", **{**FAST_EMBED, "model_type": model_type, "tail_blocks": 1})
    train_run(root / "cache", root / "run", **TAIL_TRAIN)
    with left_unchanged(root, f"{model_type} tail run"):
        yield root


@pytest.fixture(scope="module")
def tiny_tail(tmp_path_factory) -> Path:
    """The tiny (SAM's widths: exports to ONNX, predicts as SAM's code does) with a trained tail."""
    yield from _tail_run(tmp_path_factory.mktemp("tiny_tail"), "tiny")


@pytest.fixture(scope="module")
def micro_tail(tmp_path_factory) -> Path:
    """The micro model with a trained tail: its decoder passes cost a fraction of the tiny's (eval)."""
    yield from _tail_run(tmp_path_factory.mktemp("micro_tail"), "micro")


def _image(root: Path) -> Path:
    return sorted((root / "ds" / "images").glob("*.jpg"))[0]


def _mask(out: Path) -> tuple[np.ndarray, str]:
    (prediction,) = json.loads((out / "predictions.json").read_text())["predictions"]
    return masks.decode(prediction["segmentation"]), prediction["embedding_from"]


def _tail_keys(state_dict: dict, tail_blocks: int, stage: str) -> tuple[list[str], list[str]]:
    """(keys of the encoder's last `tail_blocks` blocks of `stage` and its neck, keys of its earlier blocks)."""
    depth = 1 + max(int(k.split(".")[2]) for k in state_dict if k.startswith(f"image_encoder.{stage}."))
    tail = tuple(f"image_encoder.{stage}.{depth - 1 - j}." for j in range(tail_blocks)) + ("image_encoder.neck.",)
    earlier = tuple(f"image_encoder.{stage}.{j}." for j in range(depth - tail_blocks))
    return ([k for k in state_dict if k.startswith(tail)], [k for k in state_dict if k.startswith(earlier)])


# ------------------------------------------------------------------------------------------ eval
def test_eval_runs_the_trained_tail_on_the_cached_tail_tokens(micro_tail, tmp_path):
    cache = EmbeddingCache(micro_tail / "cache")
    decoders = load_decoders(cache, RunFolder(micro_tail / "run"), EvalConfig(), torch.device("cpu"))
    assert decoders["zero_shot"].reads == "embedding" and decoders["fine_tuned"].reads == "tail_tokens"
    # The fine-tuned tail is the run's (LoRA merged), not the base's: its embedding of the cached tokens is
    # the fine-tuned encoder's embedding of the image, and another than the stored (base) one.
    image = _image(micro_tail)
    index = cache.index_by_sha256()[sha256_file(image)]
    tokens = torch.from_numpy(cache.tail_tokens(index)).float()[None]
    with torch.no_grad():
        tuned = decoders["fine_tuned"].tail(tokens)
    model, _ = RunFolder(micro_tail / "run").load_model()
    with torch.no_grad():
        from_image = model.family.encode(model.sam.eval(), read_image(image), torch.device("cpu"))
    stored = torch.from_numpy(cache.embedding(index)).float()[None]
    near, base_gap = (tuned - from_image).abs().max().item(), (tuned - stored).abs().max().item()
    print(f"\neval tail: |tail(tokens) - fine-tuned encoder(image)| {near:.2e}; "
          f"vs the stored base embedding {base_gap:.2e}")
    assert near < 0.05 and base_gap > 10 * near

    config = EvalConfig(split="val", clicks=2, everything=True, generator=EverythingSettings(points_per_side=4))
    run = copy_tree(micro_tail / "run", tmp_path / "run")  # eval records its summary in the run folder
    summary = evaluate(micro_tail / "cache", tmp_path / "report", config, run)
    assert summary["fine_tuned"]["objects"] == summary["zero_shot"]["objects"] > 0
    assert set(summary["clicks"]) == {"zero_shot", "fine_tuned"}
    assert set(summary["everything"]) == {"zero_shot", "fine_tuned"}


@pytest.mark.parametrize("model_type, tail_blocks", [("micro", 0), ("tiny", 2)])  # the micro has 1 block to split
def test_eval_refuses_a_cache_without_the_run_tail_tokens(request, tmp_path, model_type, tail_blocks):
    tailed = request.getfixturevalue(f"{model_type}_tail")
    other = tmp_path / f"cache_k{tail_blocks}"
    embed(tailed / "ds", other, **{**FAST_EMBED, "model_type": model_type, "tail_blocks": tail_blocks})
    with pytest.raises(RunError, match=rf"{other}.*embed with --tail-blocks 1"):
        evaluate(other, tmp_path / "report", EvalConfig(split="val"), tailed / "run")
    result = CliRunner().invoke(main, ["eval", str(other), "--run", str(tailed / "run"), "--split", "val",
                                       "--out", str(tmp_path / "cli_report")])
    assert result.exit_code != 0 and "--tail-blocks 1" in result.output, result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "report" / "summary.json").exists()


# --------------------------------------------------------------------------------------- predict
def test_predict_cached_tail_tokens_and_new_image_agree(tiny_tail, tmp_path):
    image = _image(tiny_tail)
    runner = CliRunner()
    # From the command line, the run's own cache is found: the image's tail tokens, through the trained tail.
    result = runner.invoke(main, ["predict", str(image), "--run", str(tiny_tail / "run"), "--box",
                                  ",".join(map(str, BOX)), "--out", str(tmp_path / "cached")])
    assert result.exit_code == 0 and "1 from cache" in result.output, result.output
    from_cache, source = _mask(tmp_path / "cached")
    assert source == "cache"
    # The same image as a new file (no cache): the whole fine-tuned encoder.
    predict_images(predictor_from_run(tiny_tail / "run"), [image], tmp_path / "new", box=BOX, device="cpu")
    from_image, source = _mask(tmp_path / "new")
    assert source == "encoder"
    agreement = float((from_cache == from_image).mean())
    print(f"\npredict tiny tail: cached tail tokens vs new image, pixels agreeing {agreement:.5f} "
          f"(mask areas {from_cache.sum()}, {from_image.sum()})")
    assert agreement >= MIN_AGREEMENT and from_cache.any()


def test_predict_skips_a_cache_whose_tokens_the_tail_cannot_read(tiny_tail, tmp_path):
    """A cache of the same base weights without tail tokens holds the base encoder's embeddings, not
    the fine-tuned encoder's: predict runs the image through the encoder instead."""
    plain = tmp_path / "plain_cache"
    embed(tiny_tail / "ds", plain, **{**FAST_EMBED, "model_type": "tiny"})
    predict_images(predictor_from_run(tiny_tail / "run"), [_image(tiny_tail)], tmp_path / "p", box=BOX,
                   cache_dir=plain, device="cpu")
    assert _mask(tmp_path / "p")[1] == "encoder"


# ---------------------------------------------------------------------------------------- export
def test_tiny_export_carries_the_tail_and_predicts_as_samcache_does(tiny_tail, tmp_path):
    out = tmp_path / "tiny_tail.pth"
    metadata = export_run(tiny_tail / "run", out)
    assert metadata["tail_blocks"] == 1 and "tail" in metadata["fine_tuned"]
    assert metadata["check"]["mask_agreement"] >= 0.999
    exported, base = load_sam("tiny", out).sam.state_dict(), load_sam("tiny").sam.state_dict()
    tail, earlier = _tail_keys(exported, 1, "stage2")
    assert not any("lora" in k for k in exported)  # merged: the plain layout
    assert any(not torch.equal(exported[k], base[k]) for k in tail)
    assert earlier and all(torch.equal(exported[k], base[k]) for k in earlier)

    # The export on the raw image (its whole encoder) against samcache predict from the cache.
    image = _image(tiny_tail)
    predict_images(predictor_from_checkpoint(out), [image], tmp_path / "export", box=BOX, device="cpu")
    predict_images(predictor_from_run(tiny_tail / "run"), [image], tmp_path / "run", box=BOX,
                   cache_dir=tiny_tail / "cache", device="cpu")
    (from_export, export_source), (from_cache, cache_source) = _mask(tmp_path / "export"), _mask(tmp_path / "run")
    assert (export_source, cache_source) == ("encoder", "cache")
    agreement = float((from_export == from_cache).mean())
    print(f"\nexport tiny tail: exported model on the image vs predict from the cache, pixels agreeing {agreement:.5f}")
    assert agreement >= MIN_AGREEMENT
    # The export with the tail cache: its metadata's tail_blocks makes it read the tail tokens too.
    predict_images(predictor_from_checkpoint(out), [image], tmp_path / "export_cached", box=BOX,
                   cache_dir=tiny_tail / "cache", device="cpu")
    from_export_cache, source = _mask(tmp_path / "export_cached")
    assert source == "cache" and np.array_equal(from_export_cache, from_cache)


def test_onnx_encoder_carries_the_trained_tail(tiny_tail, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    from samcache.deploy.onnx import MAX_ENCODER_DIFFERENCE, EncoderWithPreprocessing, check_image, export_onnx

    metadata = export_onnx(tiny_tail / "run", tmp_path / "onnx")
    assert metadata["tail_blocks"] == 1
    assert metadata["check"]["encoder.onnx"]["embedding_max_difference"] <= MAX_ENCODER_DIFFERENCE
    session = ort.InferenceSession(str(tmp_path / "onnx" / "encoder.onnx"), providers=["CPUExecutionProvider"])
    image = check_image(seed=3)
    (got,) = session.run(None, {"input_image": image})
    tuned, _ = RunFolder(tiny_tail / "run").load_model()
    with torch.no_grad():
        expected = EncoderWithPreprocessing(sam=tuned.sam.eval())(torch.from_numpy(image)).numpy()
        base = EncoderWithPreprocessing(sam=load_sam("tiny").sam.eval())(torch.from_numpy(image)).numpy()
    to_tuned, to_base = float(np.abs(got - expected).max()), float(np.abs(got - base).max())
    print(f"\nonnx tiny tail: encoder.onnx vs fine-tuned torch encoder {to_tuned:.2e}, vs base encoder {to_base:.2e}")
    assert to_tuned <= MAX_ENCODER_DIFFERENCE < to_base


# ----------------------------------------------------------------------------------------- serve
def test_serve_predicts_with_the_trained_tail(tiny_tail):
    from samcache.serve.session import ServeSession

    session = ServeSession(tiny_tail / "cache", tiny_tail / "run")
    name = session.images()[0]["name"]
    answers = {model: session.predict({"image": name, "model": model, "box": list(BOX)})
               for model in ("zero_shot", "fine_tuned")}
    assert all(a["area"] > 0 for a in answers.values())
    assert session.decoders["fine_tuned"].reads == "tail_tokens"


# ------------------------------------------------------------------------ vit_b in Meta's layout
@pytest.mark.slow
def test_vit_b_tail_export_loads_in_segment_anything_and_matches_predict(vit_b_checkpoint, tmp_path):
    """Random vit_b weights in Meta's layout: embed --tail-blocks 1, train the tail with LoRA, export;
    segment_anything's own loader and SamPredictor on the raw image agree with samcache predict from
    the cache, and the export's encoder is the base's but for its last block and neck."""
    from segment_anything import SamPredictor, sam_model_registry

    data = _pages(tmp_path)
    images = sorted((data / "images").glob("*.jpg"))
    embed(data, tmp_path / "cache", **{**FAST_EMBED, "model_type": "vit_b", "checkpoint": vit_b_checkpoint,
                                        "batch_size": 1, "tail_blocks": 1})
    train_run(tmp_path / "cache", tmp_path / "run", **TAIL_TRAIN, checkpoint=str(vit_b_checkpoint))
    exported = tmp_path / "sam_vit_b_tail.pth"
    result = CliRunner().invoke(main, ["export", "--run", str(tmp_path / "run"), "--out", str(exported),
                                       "--format", "pth"])
    assert result.exit_code == 0, result.output

    weights, base = torch.load(exported, weights_only=True), torch.load(vit_b_checkpoint, weights_only=True)
    tail, earlier = _tail_keys(weights, 1, "blocks")
    assert any(not torch.equal(weights[k], base[k]) for k in tail)
    assert len(earlier) > 100 and all(torch.equal(weights[k], base[k]) for k in earlier)

    sam = sam_model_registry["vit_b"](checkpoint=str(exported))  # Meta's own loader
    predictor = SamPredictor(sam.eval())
    predictor.set_image(read_image(images[0]))
    expected, _, _ = predictor.predict(box=np.array(BOX), multimask_output=False)
    result = CliRunner().invoke(main, ["predict", str(images[0]), "--run", str(tmp_path / "run"), "--box",
                                       ",".join(map(str, BOX)), "--out", str(tmp_path / "p")])
    assert result.exit_code == 0 and "1 from cache" in result.output, result.output
    from_cache, _ = _mask(tmp_path / "p")
    agreement = float((from_cache == expected[0]).mean())
    print(f"\nexport vit_b tail: SamPredictor on the export vs samcache predict from the cache, "
          f"pixels agreeing {agreement:.5f}")
    assert agreement >= MIN_AGREEMENT
