"""`samcache export --format onnx`: decoder.onnx in SAM's official interface equals `samcache predict` on
the cached embedding, encoder.onnx reproduces the cached embedding; for the tiny and a random vit_b."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from samcache.cache.reader import EmbeddingCache
from samcache.cli import main
from samcache.data import masks
from samcache.data.images import read_image
from samcache.deploy.onnx import DECODER_INPUTS, DECODER_OUTPUTS
from samcache.models.preprocess import resize_image, transform_coords
from tests.helpers import copy_tree, left_unchanged

NO_MASK = {"mask_input": np.zeros((1, 1, 256, 256), np.float32), "has_mask_input": np.zeros(1, np.float32)}


def export(run: Path, out: Path, *args: str) -> Path:
    result = CliRunner().invoke(main, ["export", "--run", str(run), "--format", "onnx", "--out", str(out), *args])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def tiny_onnx(tiny_run, tmp_path_factory) -> Path:
    """tiny_run exported with the default options (an export takes seconds: the tests share two)."""
    out = export(tiny_run, tmp_path_factory.mktemp("onnx") / "onnx")
    with left_unchanged(out, "tiny ONNX export"):
        yield out


@pytest.fixture(scope="module")
def tiny_onnx_single_quantized(tiny_run, tmp_path_factory) -> Path:
    """tiny_run exported with --return-single-mask --quantize."""
    out = export(tiny_run, tmp_path_factory.mktemp("onnx") / "single", "--return-single-mask", "--quantize")
    with left_unchanged(out, "tiny single-mask quantized ONNX export"):
        yield out


def session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def predict_cli(run: Path, image: Path, out: Path, prompt_args: list[str]) -> dict:
    result = CliRunner().invoke(main, ["predict", str(image), "--run", str(run), *prompt_args, "--out", str(out)])
    assert result.exit_code == 0, result.output
    (prediction,) = json.loads((out / "predictions.json").read_text())["predictions"]
    assert prediction["embedding_from"] == "cache"
    return prediction


def onnx_prompts(size: tuple[int, int], *, box=None, points=(), pad: bool = False) -> dict:
    """The official interface's prompt inputs: points then box corners (labels 2, 3); the padding point
    when there is no box (as SamPredictor), or with `pad` (as Meta's web demo sends a box)."""
    coords = [(x, y) for x, y, _ in points]
    labels = [label for _, _, label in points]
    if box is not None:
        coords += [box[:2], box[2:]]
        labels += [2, 3]
    if box is None or pad:
        coords, labels = coords + [(0.0, 0.0)], labels + [-1]
    frame = transform_coords(np.array(coords, np.float64), size)
    frame[np.array(labels) == -1] = 0.0  # the padding point is (0, 0) in any frame
    return {"point_coords": frame[None].astype(np.float32), "point_labels": np.array([labels], np.float32),
            "orig_im_size": np.array(size, np.float32), **NO_MASK}


def check_against_predict(export_dir: Path, run: Path, cache_dir: Path, tmp_path: Path, images: int,
                          kinds=("box", "point", "box+point")) -> set:
    """The first `images` cached images with an object: the encoder's embedding and the decoder's masks for
    `kinds` of prompt (a box, a single point, a box with a negative point), against the cache and
    `samcache predict`."""
    cache = EmbeddingCache(cache_dir)
    encoder, decoder = session(export_dir / "encoder.onnx"), session(export_dir / "decoder.onnx")
    assert [i.name for i in decoder.get_inputs()] == list(DECODER_INPUTS)
    assert [o.name for o in decoder.get_outputs()] == list(DECODER_OUTPUTS)
    checked, sizes = 0, set()
    for index, info in enumerate(cache.images):
        if not info.objects:
            continue
        cached = cache.embedding(index).astype(np.float32)[None]
        image = resize_image(read_image(info.file.path)).astype(np.float32)
        (embedding,) = encoder.run(None, {"input_image": image})
        cosine = float(embedding.ravel() @ cached.ravel() / np.linalg.norm(embedding) / np.linalg.norm(cached))
        assert cosine >= 0.999, (info.name, cosine)

        x0, y0, x1, y1 = info.objects[0].box
        centre = ((x0 + x1) / 2, (y0 + y1) / 2, 1)
        outside = (x0 + 2, y0 + 2, 0)
        for name, box, points in (("box", (x0, y0, x1, y1), ()), ("point", None, (centre,)),
                                  ("box+point", (x0, y0, x1, y1), (outside,))):
            if name not in kinds:
                continue
            args = ["--box", ",".join(map(str, (x0, y0, x1, y1)))] if box else []
            args += [arg for x, y, label in points for arg in ("--point", f"{x},{y},{label}")]
            expected = predict_cli(run, Path(info.file.path), tmp_path / f"{index}-{name}", args)
            got_masks, got_scores, low_res = decoder.run(None, {"image_embeddings": cached,
                                                                **onnx_prompts(info.original_size, box=box,
                                                                               points=points)})
            assert got_masks.shape == (1, 4, *info.original_size) and low_res.shape == (1, 4, 256, 256)
            # SamPredictor's choice: the single-mask output, except for one point alone (best of outputs 1-3)
            choice = 1 + int(got_scores[0, 1:].argmax()) if name == "point" else 0
            agreement = ((got_masks[0, choice] > 0) == masks.decode(expected["segmentation"])).mean()
            assert agreement >= 0.995, (info.name, name, agreement)
            assert abs(float(got_scores[0, choice]) - expected["score"]) < 1e-3, (info.name, name)
        checked += 1
        sizes.add(info.input_size)
        if checked == images:
            return sizes
    raise AssertionError(f"the cache has fewer than {images} images with objects")


def test_tiny_onnx_equals_predict_on_the_cache(tiny_onnx, tiny_run, tiny_cache, tmp_path):
    out = tiny_onnx
    sizes = check_against_predict(out, tiny_run, tiny_cache, tmp_path, images=3)
    assert len(sizes) > 1  # one graph (traced at 1500x2250) crops and pads every resized size
    metadata = json.loads((out / "export.json").read_text())
    assert metadata["model_type"] == "tiny" and metadata["fine_tuned"] == ["mask_decoder"]
    assert sorted(metadata["files"]) == ["decoder.onnx", "decoder_single_mask.onnx", "encoder.onnx"]
    config = (out / "xanylabeling.yaml").read_text()
    # X-AnyLabeling reads the first mask: it gets the single-mask decoder
    assert 'type: "segment_anything"' in config and 'decoder_model_path: "decoder_single_mask.onnx"' in config
    assert "orig_im_size" in (out / "README.md").read_text()


def test_single_mask_and_quantized_variants(tiny_onnx, tiny_onnx_single_quantized, tiny_cache):
    full = session(tiny_onnx / "decoder.onnx")
    out = tiny_onnx_single_quantized
    single = session(out / "decoder.onnx")
    cache = EmbeddingCache(tiny_cache)
    index = next(i for i, info in enumerate(cache.images) if info.objects)
    info = cache.images[index]
    inputs = {"image_embeddings": cache.embedding(index).astype(np.float32)[None]}
    x0, y0, x1, y1 = info.objects[0].box
    # SAM's rule in the official export: more than 2 points (box corners and padding counted) -> output 0,
    # else the best of 1-3: a box goes in with the padding point
    centre = ((x0 + x1) / 2, (y0 + y1) / 2, 1)
    for prompt, rule in ((dict(box=(x0, y0, x1, y1), points=[centre]), "single"),
                         (dict(box=(x0, y0, x1, y1), pad=True), "single"),
                         (dict(box=(x0, y0, x1, y1)), "multi"),
                         (dict(points=[centre]), "multi")):
        feed = {**inputs, **onnx_prompts(info.original_size, **prompt)}
        all_masks, all_scores, _ = full.run(None, feed)
        one_mask, one_score, _ = single.run(None, feed)
        choice = 0 if rule == "single" else 1 + int(all_scores[0, 1:].argmax())
        assert one_mask.shape == (1, 1, *info.original_size)
        np.testing.assert_allclose(one_mask[0, 0], all_masks[0, choice], atol=1e-3)
        assert abs(float(one_score[0, 0]) - float(all_scores[0, choice])) < 1e-5
    quantized = session(out / "decoder.quant.onnx")
    feed = {**inputs, **onnx_prompts(info.original_size, box=(x0, y0, x1, y1))}
    exact, rounded = full.run(None, feed)[2][0, 0].ravel(), quantized.run(None, feed)[2][0, 0].ravel()
    correlation = np.corrcoef(exact, rounded)[0, 1]
    assert 0.95 < correlation < 1.0, correlation  # uint8 weights: close to the float model's logits, not equal
    (quant_embedding,) = session(out / "encoder.quant.onnx").run(
        None, {"input_image": resize_image(read_image(info.file.path)).astype(np.float32)})
    cached = inputs["image_embeddings"].ravel()
    cosine = quant_embedding.ravel() @ cached / np.linalg.norm(quant_embedding) / np.linalg.norm(cached)
    assert 0.9 < cosine < 0.99999, cosine  # close to the float encoder's, not equal
    assert not (out / "decoder_single_mask.onnx").exists()  # decoder.onnx is the single-mask one


def test_onnx_export_refuses_to_overwrite_and_checks_options(tiny_onnx, tiny_onnx_single_quantized, tiny_run,
                                                             tmp_path):
    out = tiny_onnx  # left_unchanged checks that the refused export wrote nothing there
    again = CliRunner().invoke(main, ["export", "--run", str(tiny_run), "--format", "onnx", "--out", str(out)])
    assert again.exit_code == 1 and "already exists" in again.output
    file = tmp_path / "a_file"
    file.write_text("x")
    not_a_folder = CliRunner().invoke(main, ["export", "--run", str(tiny_run), "--format", "onnx",
                                             "--out", str(file)])
    assert not_a_folder.exit_code == 1 and "is a file" in not_a_folder.output and file.read_text() == "x"
    # --overwrite with other options leaves no file of the earlier export behind that export.json does not list
    quantized = copy_tree(tiny_onnx_single_quantized, tmp_path / "q")
    assert (quantized / "decoder.quant.onnx").exists()
    export(tiny_run, quantized, "--overwrite")
    listed = json.loads((quantized / "export.json").read_text())["files"]
    assert sorted(p.name for p in quantized.glob("*.onnx")) == sorted(listed)
    assert sorted(listed) == sorted(p.name for p in tiny_onnx.glob("*.onnx"))  # the default export's files
    assert not [p for p in quantized.iterdir() if p.name.startswith(".")]  # no staging folder left
    wrong = CliRunner().invoke(main, ["export", "--run", str(tiny_run), "--out", str(tmp_path / "m.pth"),
                                      "--quantize"])
    assert wrong.exit_code == 2 and "options of --format onnx" in wrong.output


@pytest.mark.slow
def test_vit_b_onnx_equals_predict_on_the_cache(vit_b_run, tmp_path):
    out = export(vit_b_run / "run", tmp_path / "onnx")
    check_against_predict(out, vit_b_run / "run", vit_b_run / "cache", tmp_path, images=1, kinds=("box", "point"))
