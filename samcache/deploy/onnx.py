"""ONNX export: a run's SAM as the two files annotation tools load.

- `decoder.onnx`: the prompt encoder and mask decoder in the interface of segment-anything's own
  `scripts/export_onnx_model.py` (inputs `image_embeddings` 1x256x64x64, `point_coords` 1xNx2 in
  the 1024 input frame, `point_labels` 1xN (1 inside, 0 outside, 2/3 a box's corners, -1 the
  padding point added when there is no box), `mask_input` 1x1x256x256, `has_mask_input` 1,
  `orig_im_size` 2 as float (h, w); outputs `masks` (logits at `orig_im_size`), `iou_predictions`,
  `low_res_masks`). Built on segment_anything's own `SamOnnxModel`, so a tool written for Meta's
  file takes this one unchanged.
- `encoder.onnx`: the image encoder with SAM's normalisation and bottom-right padding inside the
  graph. Input `input_image`: the RGB image as float32 (h, w, 3) in 0..255, already resized so its
  longest side is 1024 (the resize stays outside: tools do it with their own image library, and
  point coordinates must follow it). Output `image_embeddings` 1x256x64x64. This is the input
  samexporter's preprocessed encoders take and X-AnyLabeling sends (it scales images to fit its own
  canvas, so its longest side may be under 1024; the graph pads any size up to 1024).

Tracing fixes every Python number it sees, so the mask crop of `SamOnnxModel` (to the resized
image's size, taken with `int()`) would be frozen at the size used for tracing and be wrong for
any other image: `OfficialDecoder` crops with tensors instead, which the graph keeps symbolic.

A run that trained the encoder's tail exports it inside encoder.onnx (LoRA merged: RunFolder.load_model).

Before the files are put in place, onnxruntime runs them (`check_graphs`): each decoder must give
the run's own mask for one prompt on a fixed random embedding; for a run that trained the
encoder's tail, encoder.onnx must also give the run's encoder's embedding of a fixed random image.
An existing file is replaced only when it is an earlier export's (listed in its export.json with
the SHA-256 it still has).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.modeling import Sam
from segment_anything.utils.onnx import SamOnnxModel

from samcache import __version__
from samcache.deploy.export import (
    CHECK_SIZE,
    STAGING_MARK,
    check_case,
    command_inputs,
    compare_masks,
    input_named,
    remove_leftovers,
)
from samcache.errors import OutputError, SamcacheError
from samcache.faults import crash_point
from samcache.fileio import atomic_write_json, read_json_mapping, refuse_to_replace, sha256_file
from samcache.models.families import family_of
from samcache.models.specs import (
    EMBEDDING_SIZE,
    IMAGE_SIZE,
    LOW_RES_SIZE,
    PIXEL_MEAN,
    PIXEL_STD,
    PROMPT_EMBED_DIM,
)
from samcache.models.weights import LoadedModel
from samcache.train.runs import RunCheckpoint, RunFolder

OPSET = 17
DECODER_INPUTS = ("image_embeddings", "point_coords", "point_labels", "mask_input", "has_mask_input", "orig_im_size")
DECODER_OUTPUTS = ("masks", "iou_predictions", "low_res_masks")
ENCODER_INPUT, ENCODER_OUTPUT = "input_image", "image_embeddings"
FILES = ("decoder.onnx", "encoder.onnx", "xanylabeling.yaml", "README.md", "export.json")
DECODER_SINGLE = ("decoder_single_mask.onnx",)
QUANTIZED_FILES = ("decoder.quant.onnx", "encoder.quant.onnx")
SUPPORT_FILES = ("xanylabeling.yaml", "README.md")
GRAPHS = ("decoder.onnx", *DECODER_SINGLE, "encoder.onnx", *QUANTIZED_FILES)
OUTPUTS = (*FILES, *DECODER_SINGLE, *QUANTIZED_FILES, *(f"{graph}.data" for graph in GRAPHS))
"""Every name an export may write in its folder (GRAPH.data: the weights of a graph over 2 GB)."""
# What killed exports leave in the folder: a staging folder (`.samcache-export-PID-` and tempfile's 8
# characters, or `.export-` and 8 characters when it holds an export's files only, see _made_by_an_export)
# and the temporary file of export.json's atomic write.
_LEFTOVERS = re.compile(rf"\.{STAGING_MARK}-(?P<pid>\d+)-[a-z0-9_]{{8}}|\.export-[a-z0-9_]{{8}}"
                        r"|\.export\.json\.[a-z0-9_]{8}\.tmp")
DECODER_AXES = {"point_coords": {1: "num_points"}, "point_labels": {1: "num_points"}}
# onnxruntime's float32 kernels and torch's sum in other orders: a trained encoder's embedding,
# whose values are of order 1 after the neck's LayerNorm, differs from torch's by about 1e-5.
MAX_ENCODER_DIFFERENCE = 1e-3


class OfficialDecoder(SamOnnxModel):
    """segment_anything's `SamOnnxModel` with a crop that stays symbolic in the traced graph.

    Arguments:
      sam: the model whose prompt encoder and mask decoder are exported.
      return_single_mask: output one mask per prompt instead of all four, by the rule of Meta's
        export: the single-mask output when the prompt has more than two points (a box's two
        corners and the padding point count), else the best-scored of the three multimask outputs.
        So a box goes in with the padding point, as SAM's own web demo and X-AnyLabeling send it.
    """

    def __init__(self, *, sam: Sam, return_single_mask: bool) -> None:
        super().__init__(sam, return_single_mask=return_single_mask)

    def mask_postprocessing(self, masks: torch.Tensor, orig_im_size: torch.Tensor) -> torch.Tensor:
        masks = F.interpolate(masks, size=(self.img_size, self.img_size), mode="bilinear", align_corners=False)
        resized = self.resize_longest_image_size(orig_im_size, self.img_size)
        masks = masks[..., : resized[0], : resized[1]]  # tensor bounds: a Slice of the graph's own values
        size = orig_im_size.to(torch.int64)
        return F.interpolate(masks, size=(size[0], size[1]), mode="bilinear", align_corners=False)


class EncoderWithPreprocessing(torch.nn.Module):
    """RGB float (h, w, 3) in 0..255, longest side `img_size` -> the image embedding (1, 256, 64, 64),
    normalised and padded bottom-right inside, as `Sam.preprocess`.

    Arguments:
      sam: the model whose image encoder is exported.
    """

    def __init__(self, *, sam: Sam) -> None:
        super().__init__()
        self.image_encoder = sam.image_encoder
        self.img_size = sam.image_encoder.img_size
        self.register_buffer("mean", torch.tensor(PIXEL_MEAN).view(3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(PIXEL_STD).view(3, 1, 1), persistent=False)

    def forward(self, input_image: torch.Tensor) -> torch.Tensor:
        x = (input_image.permute(2, 0, 1) - self.mean) / self.std
        h, w = x.shape[-2:]
        x = F.pad(x, (0, self.img_size - w, 0, self.img_size - h))  # after normalising: pads are 0
        return self.image_encoder(x.unsqueeze(0))


def export_onnx(run_dir: str | Path, out_dir: str | Path, *, weights: str = "best",
                checkpoint: Optional[str | Path] = None, return_single_mask: bool = False,
                quantize: bool = False, overwrite: bool = False) -> dict:
    """Writes decoder.onnx, encoder.onnx, xanylabeling.yaml, README.md and export.json to `out_dir`.

    Arguments:
      run_dir: a training run (its base model with its fine-tuned decoder is exported).
      out_dir: the folder to write.
      weights: the run's "best" or "last" checkpoint.
      checkpoint: the base weights file, when not samcache's tiny or the official weights.
      return_single_mask: decoder.onnx outputs one mask per prompt (see OfficialDecoder). Without it,
        decoder_single_mask.onnx is written too, for X-AnyLabeling, which reads the first mask.
      quantize: also write decoder.quant.onnx and encoder.quant.onnx (dynamic uint8 weights per
        channel, onnxruntime's quantizer, as segment-anything's export script offers; on the demo's
        fine-tuned tiny, box masks of the quantized decoder overlap the float one's at IoU 0.99).
      overwrite: replace the files of an earlier export in `out_dir` (those its export.json lists
        with the SHA-256 they still have); no other file is ever replaced.
    Returns the metadata written to export.json.

    Every file is made in a staging folder inside `out_dir` (`.samcache-export-PID-...`, removed by
    the next export to `out_dir` when a killed export left it), checked (`check_graphs`) and moved
    into place at the end, export.json last: a failed export leaves the folder as it was.
    """
    _require("onnx", "--format onnx")
    _require("onnxruntime", "--format onnx")  # the check runs what was written
    out_dir, run = Path(out_dir), RunFolder(run_dir)
    _check_outputs(out_dir, command_inputs(run, weights, checkpoint), overwrite=overwrite)
    model_type = run.read_checkpoint(weights).model_type
    family_of(model_type).require("onnx", model_type)  # before building a model only to refuse it
    model, run_checkpoint = run.load_model(weights, checkpoint)
    sam = model.sam.eval().float().cpu()
    created = not out_dir.exists()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        remove_leftovers(out_dir, _LEFTOVERS, _made_by_an_export)
        staging = Path(tempfile.mkdtemp(dir=out_dir, prefix=f".{STAGING_MARK}-{os.getpid()}-"))
    except OSError as exc:
        raise OutputError(f"could not write {out_dir}: {exc.strerror or exc}") from exc
    try:
        files = _write_graph(staging / "decoder.onnx",
                             OfficialDecoder(sam=sam, return_single_mask=return_single_mask),
                             decoder_example_inputs(), DECODER_INPUTS, DECODER_OUTPUTS, DECODER_AXES)
        if not return_single_mask:
            files += _write_graph(staging / DECODER_SINGLE[0], OfficialDecoder(sam=sam, return_single_mask=True),
                                  decoder_example_inputs(), DECODER_INPUTS, DECODER_OUTPUTS, DECODER_AXES)
        example_image = torch.full((IMAGE_SIZE * 3 // 4, IMAGE_SIZE, 3), 127.0)
        files += _write_graph(staging / "encoder.onnx", EncoderWithPreprocessing(sam=sam), (example_image,),
                              (ENCODER_INPUT,), (ENCODER_OUTPUT,), {ENCODER_INPUT: {0: "height", 1: "width"}})
        if quantize:
            for name in ("decoder", "encoder"):
                _quantize(staging / f"{name}.onnx", staging / f"{name}.quant.onnx")
            files += list(QUANTIZED_FILES)
        name = run.path.resolve().name
        decoder_for_tools = "decoder.onnx" if return_single_mask else DECODER_SINGLE[0]
        (staging / "xanylabeling.yaml").write_text(xanylabeling_config(model_type, name, decoder_for_tools))
        (staging / "README.md").write_text(deploy_readme(model_type, return_single_mask, quantize))
        crash_point("export-staged")
        check = check_graphs(staging, model, files, out_dir, encoder_trained=bool(run_checkpoint.tail_blocks))
        metadata = _metadata(staging, files, run, run_checkpoint, weights, return_single_mask, check)
        for stale in OUTPUTS:  # an earlier export's graphs, not made this time (checked as its own above)
            if stale.endswith((".onnx", ".data")) and stale not in files:
                (out_dir / stale).unlink(missing_ok=True)
        for produced in [*files, *SUPPORT_FILES]:
            os.replace(staging / produced, out_dir / produced)
        atomic_write_json(out_dir / "export.json", metadata)
    except OSError as exc:
        raise OutputError(f"could not write {out_dir}: {exc.strerror or exc}") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if created and not any(out_dir.iterdir()):  # a failed export leaves no folder it made either
            out_dir.rmdir()
    return metadata


def _metadata(staging: Path, files: list[str], run: RunFolder, run_checkpoint: RunCheckpoint, weights: str,
              return_single_mask: bool, check: dict) -> dict:
    """export.json: what the files are, their SHA-256 (what a later --overwrite may replace) and the run."""
    return {
        "format": "onnx",
        "opset": OPSET,
        "files": {f: sha256_file(staging / f) for f in files},
        "support_files": {f: sha256_file(staging / f) for f in SUPPORT_FILES},
        "model_type": run_checkpoint.model_type,
        "base_weights_sha256": run_checkpoint.base_weights_sha256,
        "fine_tuned": run_checkpoint.trained,
        "tail_blocks": run_checkpoint.tail_blocks,
        "run": str(run.path.resolve()),
        "run_weights": weights,
        "return_single_mask": return_single_mask,
        "decoder": {"inputs": list(DECODER_INPUTS), "outputs": list(DECODER_OUTPUTS)},
        "encoder": {"input": f"{ENCODER_INPUT}: float32 (h, w, 3) RGB 0..255, longest side at most {IMAGE_SIZE}",
                    "output": f"{ENCODER_OUTPUT}: float32 (1, {PROMPT_EMBED_DIM}, {EMBEDDING_SIZE}, {EMBEDDING_SIZE})"},
        "check": check,
        "samcache_version": __version__,
    }


def _check_outputs(out_dir: Path, inputs: dict[Path, str], *, overwrite: bool) -> None:
    """Refuses an `out_dir` whose files of the names an export writes are not an earlier export's
    (or are one and `overwrite` was not given), or are inputs of this export."""
    if out_dir.exists() and not out_dir.is_dir():
        raise SamcacheError(f"--out {out_dir} is a file; --format onnx writes a folder")
    earlier = _earlier_export(out_dir)
    for name in OUTPUTS:
        path = out_dir / name
        if not path.exists():
            continue
        what = input_named(path, inputs)
        if what:
            raise OutputError(f"--out {out_dir}: {path} is {what}: an export never replaces its own inputs; "
                              "choose another --out")
        problem = _not_from_earlier_export(name, path, earlier)
        if problem:
            raise OutputError(f"{path} {problem}: samcache replaces only its own earlier exports; "
                              "choose another --out")
        refuse_to_replace(path, overwrite=overwrite)


def _earlier_export(out_dir: Path) -> Optional[dict[str, str]]:
    """{file: SHA-256} of the files the export.json in `out_dir` lists; None when there is no
    export.json of an ONNX export there."""
    metadata = read_json_mapping(out_dir / "export.json")
    listed = [metadata.get("files"), metadata.get("support_files", {})]
    if metadata.get("format") != "onnx" or not all(isinstance(files, dict) for files in listed):
        return None
    return {**listed[0], **listed[1]}


def _not_from_earlier_export(name: str, path: Path, earlier: Optional[dict[str, str]]) -> Optional[str]:
    """Why the existing `path` is not a file of the earlier export (None when it is one)."""
    if path.is_dir():
        return "is a folder, not a samcache export's file"
    if earlier is None:
        return "is not a samcache export's metadata" if name == "export.json" else "is not a samcache export"
    if name == "export.json":
        return None
    if name not in earlier:
        return "is not a samcache export (the export.json beside it does not list it)"
    if earlier[name] != sha256_file(path):
        return ("is not the file the samcache export beside it wrote (its SHA-256 differs from export.json's: "
                "it was changed or replaced since)")
    return None


def _made_by_an_export(path: Path) -> bool:
    """Whether a leftover is an export's: anything under samcache's staging name; under the name
    `.export-*`, which is not samcache's alone, only a folder of the files an export makes."""
    if not path.name.startswith(".export-") or path.name.startswith(".export.json."):
        return True
    return path.is_dir() and all(entry.name in OUTPUTS or any(entry.name.startswith(f".{name}.") for name in OUTPUTS)
                                 for entry in path.iterdir())


@torch.no_grad()
def check_graphs(folder: Path, model: LoadedModel, files: list[str], out_dir: Path, *,
                 encoder_trained: bool = False) -> dict:
    """Runs the graphs made in `folder` in onnxruntime. Each float decoder must predict the run's
    own mask for the check's prompt on a fixed random embedding (export.check_case), the quantized
    ones a mask of the image's size, and the encoders must load with their interface; with
    `encoder_trained` (the run trained the encoder's tail), the float encoder must also compute the
    run's encoder's embedding of a fixed random image (encoder_difference). Anything else is an
    OutputError naming the file in `out_dir` and what differed. Returns what was compared."""
    import onnxruntime as ort

    case = check_case(model)
    prompt = case.prompt
    feed = {  # the point, then the box's corners (labels 2, 3): SamPredictor's order, no padding point
        "image_embeddings": case.features.numpy(),
        "point_coords": np.stack([prompt.points[0], prompt.box[:2], prompt.box[2:]])[None].astype(np.float32),
        "point_labels": np.array([[1, 2, 3]], np.float32),
        "mask_input": np.zeros((1, 1, LOW_RES_SIZE, LOW_RES_SIZE), np.float32),
        "has_mask_input": np.zeros(1, np.float32),
        "orig_im_size": np.array(CHECK_SIZE, np.float32),
    }
    checked = {}
    for name in (f for f in files if f.endswith(".onnx")):
        failed = f"{out_dir / name} was not written: the export run in onnxruntime"
        try:
            session = ort.InferenceSession(str(folder / name), providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own types for a graph it cannot load
            raise OutputError(f"{out_dir / name} was not written: onnxruntime cannot load the export "
                              f"({' '.join(str(exc).split())[:300]})") from exc
        interface = ([i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()])
        if name.startswith("encoder"):
            if interface != ([ENCODER_INPUT], [ENCODER_OUTPUT]):
                raise OutputError(f"{failed} has inputs {interface[0]} and outputs {interface[1]}, not "
                                  f"{[ENCODER_INPUT]} and {[ENCODER_OUTPUT]}")
            checked[name] = "loads, with its interface"
            if encoder_trained and name == "encoder.onnx":
                difference = encoder_difference(session, model.sam)
                if not difference <= MAX_ENCODER_DIFFERENCE:
                    raise OutputError(f"{failed} computes another embedding than the run's encoder for the same "
                                      f"image (largest difference {difference:.3g}, at most "
                                      f"{MAX_ENCODER_DIFFERENCE} expected)")
                checked[name] = {"embedding_max_difference": float(f"{difference:.3g}")}
            continue
        if interface != (list(DECODER_INPUTS), list(DECODER_OUTPUTS)):
            raise OutputError(f"{failed} has inputs {interface[0]} and outputs {interface[1]}, not SAM's")
        masks, scores, _ = session.run(None, feed)
        if name in QUANTIZED_FILES:  # uint8 weights: close to the float decoder's masks, not equal
            if tuple(masks.shape[-2:]) != CHECK_SIZE:
                raise OutputError(f"{failed} makes masks of {masks.shape[-2:]} for an image of {CHECK_SIZE}")
            checked[name] = "loads and predicts masks of the image's size"
            continue
        checked[name] = compare_masks(case, masks[0, 0] > 0, float(scores[0, 0]), failed)
    return checked


def check_image(height: int = IMAGE_SIZE * 3 // 4, width: int = IMAGE_SIZE, seed: int = 0) -> np.ndarray:
    """A fixed random RGB image in the encoder graph's input (float32 (h, w, 3), 0..255)."""
    return np.random.default_rng(seed).uniform(0, 255, (height, width, 3)).astype(np.float32)


def encoder_difference(session, sam: Sam, image: Optional[np.ndarray] = None) -> float:
    """The largest absolute difference between the embeddings of `image` (default check_image())
    by the encoder graph run in the onnxruntime `session` and by `sam`'s own encoder in torch."""
    image = check_image() if image is None else image
    (got,) = session.run(None, {ENCODER_INPUT: image})
    expected = EncoderWithPreprocessing(sam=sam.eval())(torch.from_numpy(image)).numpy()
    return float(np.abs(got - expected).max())


def _require(module: str, what: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise SamcacheError(f"{what} needs the {module} package: pip install 'samcache[onnx]'")


def decoder_example_inputs(num_points: int = 3) -> tuple[torch.Tensor, ...]:
    """Inputs in the decoder's interface (random prompts), for tracing and for checks."""
    generator = torch.Generator().manual_seed(0)
    return (
        torch.randn(1, PROMPT_EMBED_DIM, EMBEDDING_SIZE, EMBEDDING_SIZE, generator=generator),
        torch.randint(0, IMAGE_SIZE, (1, num_points, 2), generator=generator).float(),
        torch.randint(0, 4, (1, num_points), generator=generator).float(),
        torch.randn(1, 1, LOW_RES_SIZE, LOW_RES_SIZE, generator=generator),
        torch.tensor([1.0]),
        torch.tensor([1500.0, 2250.0]),
    )


def _write_graph(path: Path, module: torch.nn.Module, inputs: tuple, input_names, output_names,
                 dynamic_axes) -> list[str]:
    """Traces `module` to ONNX at `path` (in the staging folder); returns the names of the files made.
    A model over 2 GB (vit_h's encoder) cannot be one protobuf: torch then writes its weights as one
    external file per tensor, which are gathered here into a single `NAME.data` beside it."""
    own = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        with warnings.catch_warnings():
            # The tracer warns about every Python bool and int it freezes; OfficialDecoder's docstring
            # says which one mattered. The TorchScript exporter's deprecation note is for torch's authors.
            warnings.simplefilter("ignore")
            torch.onnx.export(module, inputs, str(own / path.name), input_names=list(input_names),
                              output_names=list(output_names), dynamic_axes=dynamic_axes, opset_version=OPSET,
                              do_constant_folding=True, dynamo=False)
        if [p.name for p in own.iterdir()] == [path.name]:
            os.replace(own / path.name, path)
            return [path.name]
        import onnx

        graph = onnx.load(str(own / path.name))  # reads the external tensors too
        onnx.save_model(graph, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=f"{path.name}.data")
        return [path.name, f"{path.name}.data"]
    finally:
        shutil.rmtree(own, ignore_errors=True)


def _quantize(source: Path, target: Path) -> None:
    try:
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError as exc:
        raise SamcacheError("--quantize needs onnxruntime: pip install 'samcache[onnx]'") from exc
    tmp = target.with_name(f".{target.name}.tmp")
    # The quantizer logs its advice (pre-process first) and every tensor it leaves in float to the
    # root logger: pages of protobuf text on the user's terminal for the Slice of the mask crop.
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_dynamic(source, tmp, weight_type=QuantType.QUInt8, per_channel=True)
        os.replace(tmp, target)
    finally:
        logging.disable(logging.NOTSET)
        tmp.unlink(missing_ok=True)


def xanylabeling_config(model_type: str, name: str, decoder: str) -> str:
    """X-AnyLabeling's custom-model config for the files beside it (Load Custom Model). X-AnyLabeling
    reads the first mask of the decoder's output, so `decoder` is a single-mask one."""
    config = {
        "type": "segment_anything",
        "name": f"samcache_{name}_{model_type}",
        "display_name": f"samcache {name} ({model_type}, fine-tuned)",
        "encoder_model_path": "encoder.onnx",
        "decoder_model_path": decoder,
        "input_size": IMAGE_SIZE,
        "max_width": IMAGE_SIZE,
        "max_height": IMAGE_SIZE * 2 // 3,
    }
    return "".join(f"{key}: {json.dumps(value)}\n" for key, value in config.items())


def deploy_readme(model_type: str, return_single_mask: bool, quantize: bool) -> str:
    """DIR/README.md: what the files are and how to run them."""
    masks = ("one mask per prompt (Meta's rule: the single-mask output when the prompt has more than two "
             "points, a box's corners and the padding point counted, else the best-scored of the three others; "
             "so send a box with the padding point)" if return_single_mask
             else "all four: index 0 for a box or several points, the best-scored of 1-3 for one point, as "
             "SamPredictor chooses (send a box without the padding point, as SamPredictor does)")
    single = ("" if return_single_mask else "\n- `decoder_single_mask.onnx`: the same decoder with one mask per prompt "
              "(`--return-single-mask`'s rule: a box goes in with the padding point), for tools that read the first "
              "mask (X-AnyLabeling).")
    quant = ("\n`decoder.quant.onnx` and `encoder.quant.onnx` are the same graphs with uint8 weights "
             "(smaller and faster on a CPU, slightly less exact).\n" if quantize else "")
    return f"""# SAM ({model_type}) with a fine-tuned decoder, as ONNX

Written by `samcache export --format onnx` (samcache {__version__}); `export.json` holds the SHA-256 of
each file and the run it came from.

- `encoder.onnx`: input `{ENCODER_INPUT}`, float32 (h, w, 3), RGB in 0..255, **resized so that its
  longest side is {IMAGE_SIZE}** (bilinear; h = round(H * {IMAGE_SIZE} / max(H, W)), likewise w), as
  SamPredictor and samcache's cache do (a smaller image works too, padded the same way, but its
  embedding is not the cache's). SAM's normalisation and padding happen inside. Output
  `{ENCODER_OUTPUT}` (1, 256, 64, 64).
- `decoder.onnx`: segment-anything's official ONNX interface (`scripts/export_onnx_model.py`).
  Point and box coordinates are in the resized frame (multiply original pixels by
  {IMAGE_SIZE} / max(H, W)); a box is two points labelled 2 (top-left) and 3 (bottom-right); without a
  box, add the padding point (0, 0) labelled -1. `orig_im_size` is (H, W) as float32. `masks`
  are logits at (H, W), {masks}; a pixel belongs to the object where its logit > 0.{single}
{quant}
## ONNX Runtime

```python
import numpy as np, onnxruntime as ort
from PIL import Image

image = Image.open("page.jpg").convert("RGB")
W, H = image.size
scale = {IMAGE_SIZE} / max(H, W)
resized = image.resize((int(W * scale + 0.5), int(H * scale + 0.5)), Image.BILINEAR)
encoder = ort.InferenceSession("encoder.onnx")
decoder = ort.InferenceSession("decoder.onnx")
embedding = encoder.run(None, {{"{ENCODER_INPUT}": np.asarray(resized, np.float32)}})[0]
box = np.array([[100, 200], [400, 500]], np.float32) * scale        # x0,y0 / x1,y1 in pixels
masks, scores, low_res = decoder.run(None, {{
    "image_embeddings": embedding,
    "point_coords": box[None], "point_labels": np.array([[2, 3]], np.float32),
    "mask_input": np.zeros((1, 1, 256, 256), np.float32), "has_mask_input": np.zeros(1, np.float32),
    "orig_im_size": np.array([H, W], np.float32)}})
mask = masks[0, 0] > 0
```

For a refinement click, pass the chosen `low_res_masks` channel back as `mask_input` with
`has_mask_input` = 1.

## X-AnyLabeling

`xanylabeling.yaml` is a custom model config for the encoder and the single-mask decoder: in
X-AnyLabeling choose *Load Custom Model* and pick it (the paths in it are relative to the YAML
file). X-AnyLabeling scales each image to fit its own canvas (1024 x 682 by this config's
`max_width` / `max_height`) before the encoder, so a portrait page is encoded smaller than
samcache encodes it: the masks are the model's, not bit for bit samcache's.

## CVAT

CVAT's SAM runs the encoder in a serverless function (PyTorch, `SamPredictor`) and the decoder in
the browser from its own `decoder.onnx`, exported with CVAT's modified script (extra outputs for the
mask's box). This decoder.onnx is not a drop-in replacement there: export the full state dict
(`samcache export --format pth`), point CVAT's SAM function (`model_handler.py`) at it with the
right model type, and export CVAT's decoder from the same file with CVAT's script.
"""
