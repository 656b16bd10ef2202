"""Predict: masks for new images and boxes, with a run's decoder or an exported checkpoint.

An image already in a cache made by the same encoder weights (same file SHA-256) takes its
embedding from the cache; any other image goes through the image encoder, preprocessed
exactly as `SamPredictor.set_image` does. A model whose encoder's last K blocks were fine-tuned
(a run with `--train tail`, or its export) runs those blocks on the cache's tail tokens, so it
takes cached images only from a cache embedded with `--tail-blocks K` (others go through its
whole encoder, the trained tail included). Outputs, per image: one PNG mask per box
(0/255), an overlay PNG, and for all of them `predictions.json` with COCO RLE masks. The prompt
is a box, points, or a box with points, as `SamPredictor.predict` takes them.
"""

from __future__ import annotations

import glob
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import cv2
import numpy as np
import torch

from samcache.cache.reader import EmbeddingCache
from samcache.config import MAX_POINTS, EverythingSettings, check_box
from samcache.data import masks
from samcache.data.images import read_image
from samcache.deploy.export import metadata_path, read_metadata
from samcache.devices import resolve_device
from samcache.errors import OutputError, SamcacheError
from samcache.evaluate.automatic_masks import segment_everything
from samcache.fileio import atomic_write_bytes, atomic_write_json, read_json_mapping, sha256_file
from samcache.models.decoder import PromptDecoder
from samcache.models.encoder_tail import EncoderTail
from samcache.models.families import ModelFamily, family_of
from samcache.models.preprocess import transform_boxes
from samcache.models.prompts import PromptBatch, make_prompt
from samcache.models.weights import load_sam
from samcache.outputs import OutputFolder, refuse_inputs_as_outputs
from samcache.progress import progress_bar
from samcache.train.inference import predict_masks
from samcache.train.runs import RunFolder

PREDICTIONS_KIND = "predictions"
PREDICTIONS_FILE = "predictions.json"


@dataclass
class Predictor:
    """A SAM with the weights to predict with, and the identity of its image encoder's weights."""

    sam: torch.nn.Module
    model_type: str
    encoder_weights_sha256: str
    source: str
    tail_blocks: int = 0
    """K when the encoder's last K blocks differ from the base encoder's (a run that trained its tail)."""

    @property
    def family(self) -> ModelFamily:
        return family_of(self.model_type)


def predictor_from_run(run_dir: str | Path, *, weights: str = "best", checkpoint=None) -> Predictor:
    """The base SAM of a run with the run's fine-tuned decoder (and encoder tail, when it trained one)."""
    model, run_checkpoint = RunFolder(run_dir).load_model(weights, checkpoint)
    return Predictor(model.sam.eval(), model.model_type, run_checkpoint.base_weights_sha256, f"{run_dir} ({weights})",
                     tail_blocks=run_checkpoint.tail_blocks)


def predictor_from_checkpoint(checkpoint: str | Path, model_type: Optional[str] = None) -> Predictor:
    """A full SAM state dict (e.g. from `samcache export`); the type comes from `model_type` or the
    export's metadata JSON. The encoder is the base one, so the export's base SHA-256 names it."""
    checkpoint = Path(checkpoint)
    metadata = read_metadata(checkpoint)
    model_type = model_type or metadata.get("model_type")
    if model_type is None:
        raise SamcacheError(f"which model is {checkpoint}? pass --model (no export metadata "
                            f"{metadata_path(checkpoint).name} beside it)")
    loaded = load_sam(model_type, checkpoint)
    return Predictor(loaded.sam.eval(), model_type, metadata.get("base_weights_sha256", loaded.weights_sha256),
                     str(checkpoint), tail_blocks=int(metadata.get("tail_blocks", 0)))


def boxes_from_coco(path: str | Path) -> dict[str, list[tuple[float, float, float, float]]]:
    """{image file name (basename): [XYXY boxes]} from a COCO JSON's bbox fields."""
    try:
        data = json.loads(Path(path).read_text())
        names = {im["id"]: Path(im["file_name"]).name for im in data["images"]}
        out: dict[str, list] = {}
        for ann in data.get("annotations", []):
            x, y, w, h = (float(v) for v in ann["bbox"])
            try:
                box = check_box((x, y, x + w, y + h), f"{path}: annotation {ann.get('id')!r}")
            except ValueError as exc:
                raise SamcacheError(str(exc)) from None
            out.setdefault(names[ann["image_id"]], []).append(box)
        return out
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise SamcacheError(f"{path}: not a COCO file with images and bbox annotations ({exc})") from exc


@dataclass
class _PredictionRun:
    """What a predict command works with: the model on its device, the cache it may take embeddings
    from (same encoder weights), and the output folder, checked before anything is written."""

    sam: torch.nn.Module
    decoder: PromptDecoder
    device: torch.device
    cache: Optional[EmbeddingCache]
    cached_by_sha: dict
    out_dir: Path
    stems: dict[Path, str]

    output: OutputFolder
    tail: Optional[EncoderTail] = None
    """The model's trained encoder tail, which makes a cached image's embedding from its tail tokens."""

    @classmethod
    def start(cls, predictor: Predictor, images, out_dir, *, cache_dir, device: str,
              overwrite: bool) -> "_PredictionRun":
        """Checks the output folder (new, empty, or samcache's earlier predictions: outputs.py) and
        that no output would land on an input, then loads the model."""
        torch_device = resolve_device(device)
        cache = _usable_cache(cache_dir, predictor)
        out_dir, images = Path(out_dir), [Path(p) for p in images]
        stems = output_stems(images)
        output = OutputFolder(out_dir, PREDICTIONS_KIND)
        output.check(overwrite=overwrite, legacy=_written_by_samcache)
        # Before the claim removes anything: no file this command writes may be one it reads.
        planned = [out_dir / PREDICTIONS_FILE] + [f for stem in stems.values()
                                                  for f in out_dir.glob(f"{glob.escape(stem)}_*.png")]
        refuse_inputs_as_outputs(planned, images, out_dir=out_dir)
        output.claim(overwrite=overwrite, legacy=_written_by_samcache, inputs=images)
        sam = predictor.sam.to(torch_device)
        tail = predictor.family.encoder_tail(sam, predictor.tail_blocks) if predictor.tail_blocks else None
        return cls(sam, predictor.family.decoder(sam, predictor.model_type), torch_device, cache,
                   cache.index_by_sha256() if cache is not None else {}, out_dir, stems, output, tail)

    def embedding(self, path: Path, image: np.ndarray) -> tuple[torch.Tensor, str]:
        """The cached embedding when the file (by SHA-256) is in the cache (with a trained tail: the
        tail run on the cached tail tokens), else the encoder's."""
        if self.cache is not None:
            index = self.cached_by_sha.get(sha256_file(path))
            if index is not None and self.cache.images[index].original_size == image.shape[:2]:
                which = "tail_tokens" if self.tail is not None else "embedding"
                features = torch.from_numpy(self.cache.features(index, which)).float()[None].to(self.device)
                return (self.tail(features) if self.tail is not None else features), "cache"
        return self.decoder.family.encode(self.sam, image, self.device), "encoder"


@torch.no_grad()
def predict_images(
    predictor: Predictor,
    images: list[str | Path],
    out_dir: str | Path,
    *,
    box: Optional[tuple[float, float, float, float]] = None,
    points: Optional[list[tuple[float, float, int]]] = None,
    boxes_by_name: Optional[dict[str, list]] = None,
    cache_dir: Optional[str | Path] = None,
    device: str = "auto",
    overwrite: bool = False,
) -> dict:
    """Writes masks, overlays and predictions.json for each image; returns the predictions.

    Arguments:
      predictor: predictor_from_run or predictor_from_checkpoint.
      images: image files.
      out_dir: the output folder.
      box: one XYXY box (original pixels) for every image, and/or
      points: (x, y, label) in original pixels for every image (with `box`: one prompt of both, as
        `SamPredictor.predict(point_coords, point_labels, box)`); or
      boxes_by_name: boxes per image file name (boxes_from_coco).
      cache_dir: a cache to take embeddings from when an image is in it.
      device: "auto", "cpu" or "cuda".
      overwrite: replace the predictions `out_dir` holds (samcache's own: see outputs.py).
    """
    if (box is None and not points) == (boxes_by_name is None):
        raise SamcacheError("give either --box and/or --point, or --boxes")
    if points and len(points) > MAX_POINTS:
        raise SamcacheError(f"at most {MAX_POINTS} points per prompt, got {len(points)}")
    warnings = []
    if boxes_by_name is not None:
        warnings += _match_boxes(boxes_by_name, [Path(p) for p in images])
    run = _PredictionRun.start(predictor, images, out_dir, cache_dir=cache_dir, device=device, overwrite=overwrite)
    torch_device, out_dir, stems = run.device, run.out_dir, run.stems
    results = []
    for path in map(Path, images):
        image_boxes = [box] if box is not None else [] if points else boxes_by_name.get(path.name, [])
        if not image_boxes and not points:
            continue
        image = read_image(path)
        original = image.shape[:2]
        image_boxes = [b for b in (_box_in_image(b, original, path, warnings) for b in image_boxes) if b is not None]
        if not image_boxes and not points:
            continue
        image_points = [_point_in_image(p, original, path, warnings) for p in points or []]
        embedding, source = run.embedding(path, image)
        frame = predictor.family.input_size(original)
        prompts = image_prompts(original, frame, boxes=image_boxes, points=image_points).to(torch_device)
        # fp32, as SamPredictor (SAM2ImagePredictor): these masks are meant to equal the predictor's
        predictions = predict_masks(run.decoder, embedding, prompts, [(frame, original)])
        predicted = np.stack([p.mask for p in predictions])
        scores = [p.score for p in predictions]
        for k, (mask, score) in enumerate(zip(predicted, scores)):
            mask_file = out_dir / f"{stems[path]}_mask{k}.png"
            _write_png(mask_file, mask.astype(np.uint8) * 255)
            prompt_fields = {"box": list(map(float, image_boxes[k]))} if image_boxes else {}
            if points:
                prompt_fields["points"] = [[float(x), float(y), int(label)] for x, y, label in image_points]
            results.append({"image": str(path), **prompt_fields, "score": float(score),
                            "area": int(mask.sum()), "segmentation": masks.encode(mask), "mask_png": mask_file.name,
                            "embedding_from": source})
        _write_overlay(out_dir / f"{stems[path]}_overlay.png", image, predicted, image_boxes, image_points)
    atomic_write_json(out_dir / PREDICTIONS_FILE, {"model": predictor.source, "predictions": results})
    run.output.complete()
    return {"predictions": results, "images": len({r["image"] for r in results}), "warnings": warnings}


@torch.no_grad()
def predict_everything(predictor: Predictor, images: list[str | Path], out_dir: str | Path, *,
                       settings: EverythingSettings = EverythingSettings(), cache_dir: Optional[str | Path] = None,
                       device: str = "auto", overwrite: bool = False) -> dict:
    """Segment everything in each image (automatic_masks.py): predictions.json with COCO results and an
    overlay PNG per image. An image in the cache takes its embedding from there (no encoder runs).

    Arguments:
      predictor: predictor_from_run or predictor_from_checkpoint.
      images: image files.
      out_dir: the output folder.
      settings: the generator's options (SamAutomaticMaskGenerator's defaults).
      cache_dir: a cache to take embeddings from when an image is in it.
      device: "auto", "cpu" or "cuda".
      overwrite: replace the predictions `out_dir` holds (samcache's own: see outputs.py).
    """
    predictor.family.require("automatic_masks", predictor.model_type)
    run = _PredictionRun.start(predictor, images, out_dir, cache_dir=cache_dir, device=device, overwrite=overwrite)
    sam, out_dir, stems = run.sam, run.out_dir, run.stems
    image_records, results = [], []
    bar = progress_bar(total=len(images), desc="segment everything", unit="image")
    started = time.perf_counter()
    for image_id, path in enumerate(map(Path, images), start=1):
        image = read_image(path)
        embedding, source = run.embedding(path, image)
        found = segment_everything(run.decoder, embedding, image.shape[:2], settings,
                                   mask_threshold=sam.mask_threshold)
        image_records.append({"id": image_id, "file_name": str(path), "height": image.shape[0],
                              "width": image.shape[1], "embedding_from": source})
        results += [found_mask.coco_result(image_id) for found_mask in found]
        _write_everything_overlay(out_dir / f"{stems[path]}_everything.png", image, [m.rle for m in found])
        bar.update(1)
    bar.close()
    seconds = time.perf_counter() - started
    atomic_write_json(out_dir / PREDICTIONS_FILE, {
        "model": predictor.source, "mode": "everything", "settings": settings.model_dump(),
        "images": image_records, "categories": [{"id": 1, "name": "object"}], "predictions": results})
    run.output.complete()
    return {"predictions": results, "images": len(image_records), "seconds": seconds}


def image_prompts(original: tuple[int, int], frame: tuple[int, int], *, boxes: list, points: list) -> PromptBatch:
    """The prompts `predict` decodes for one image, in the encoder's input frame: with points, one
    prompt of them and the first box (if any), as `SamPredictor.predict(point_coords, point_labels,
    box)`; without, one prompt per box. `samcache serve` decodes the same way, so its masks equal these.

    Arguments:
      original: the image's (H, W); frame: its (h, w) in the encoder's input.
      boxes: XYXY boxes in original pixels; points: (x, y, label) in original pixels.
    """
    if points:
        prompt = make_prompt(boxes[0] if boxes else np.zeros(4), np.array([p[:2] for p in points], np.float64),
                             np.array([p[2] for p in points]), is_box=bool(boxes), original_size=original, frame=frame)
        return PromptBatch.from_prompts([prompt], torch.zeros(1, dtype=torch.long))
    return PromptBatch.boxes_of_one_image(torch.as_tensor(
        transform_boxes(np.array(boxes, dtype=np.float64), original, frame), dtype=torch.float32))


def _match_boxes(boxes_by_name: dict[str, list], images: list[Path]) -> list[str]:
    """Refuses a boxes file that names none of the images (nothing would be predicted); the images
    it has no box for, and the names it has no image for, are warnings."""
    given = {path.name for path in images}
    named = set(boxes_by_name)
    if not given & named:
        raise SamcacheError(
            f"--boxes names no image given here: its images are {_some(named)}, the images given are "
            f"{_some(given)} (boxes are matched by file name)")
    warnings = []
    if given - named:
        warnings.append(f"no boxes for {len(given - named)} of the images given ({_some(given - named)})")
    if named - given:
        warnings.append(f"--boxes has boxes for {len(named - given)} images not given ({_some(named - given)})")
    return warnings


def _some(names: set[str], n: int = 3) -> str:
    shown = sorted(names)[:n]
    return ", ".join(shown) + (f" and {len(names) - n} more" if len(names) > n else "") if shown else "none"


def _box_in_image(box, size: tuple[int, int], path: Path, warnings: list[str]) -> Optional[tuple[float, ...]]:
    """The box clipped to the image, with a warning when it reached beyond it (SAM was trained on
    boxes inside the image; a far-out coordinate would also overflow the overlay's drawing); None,
    with a warning, when none of it is in the image."""
    height, width = size
    x0, y0, x1, y1 = box
    clipped = (min(max(x0, 0.0), width), min(max(y0, 0.0), height), min(max(x1, 0.0), width),
               min(max(y1, 0.0), height))
    if clipped[2] <= clipped[0] or clipped[3] <= clipped[1]:
        warnings.append(f"{path}: box {list(box)} lies outside the {width}x{height} image: skipped")
        return None
    if clipped != tuple(box):
        warnings.append(f"{path}: box {list(box)} reaches beyond the {width}x{height} image: clipped to "
                        f"{[round(v, 2) for v in clipped]}")
    return clipped


def _point_in_image(point, size: tuple[int, int], path: Path, warnings: list[str]) -> tuple[float, float, int]:
    """The point, moved onto the image's edge (with a warning) when it lies outside."""
    height, width = size
    x, y, label = point
    inside = (min(max(x, 0.0), width - 1), min(max(y, 0.0), height - 1))
    if inside != (x, y):
        warnings.append(f"{path}: point {[x, y]} lies outside the {width}x{height} image: moved to its edge "
                        f"{[round(v, 2) for v in inside]}")
    return (*inside, label)


def _written_by_samcache(folder: Path) -> bool:
    """A predictions folder from before outputs carried their marker: its predictions.json is samcache's."""
    predictions = read_json_mapping(folder / PREDICTIONS_FILE)
    return "predictions" in predictions and "model" in predictions


def output_stems(images: list[Path]) -> dict[Path, str]:
    """A distinct output name per input: its stem, numbered when two inputs share one (a/x.jpg, b/x.jpg)."""
    counts: dict[str, int] = {}
    for path in images:
        counts[path.stem] = counts.get(path.stem, 0) + 1
    taken = {stem for stem, n in counts.items() if n == 1}
    names: dict[Path, str] = {}
    for path in images:
        if path in names:
            continue
        name, k = path.stem, 1
        while counts[path.stem] > 1 and (name == path.stem or name in taken):
            name, k = f"{path.stem}-{k}", k + 1
        taken.add(name)
        names[path] = name
    return names


def _usable_cache(cache_dir, predictor: Predictor) -> Optional[EmbeddingCache]:
    """The cache when its features are the predictor's encoder's: the same base weights, and for a
    trained tail of K blocks, the tokens before the last K stored (the stored embeddings are the
    base encoder's then); None else, and images go through the encoder."""
    if cache_dir is None or not Path(cache_dir).exists():
        return None
    cache = EmbeddingCache(cache_dir)
    same = (cache.provenance.model_type == predictor.model_type
            and cache.provenance.weights_sha256 == predictor.encoder_weights_sha256
            and (not predictor.tail_blocks or cache.provenance.tail_blocks == predictor.tail_blocks))
    return cache if same else None


def _write_overlay(path: Path, image: np.ndarray, predicted: np.ndarray, boxes, points) -> None:
    overlay = image.astype(np.float32)
    palette = np.array([[30, 144, 255], [255, 99, 71], [50, 205, 50], [238, 130, 238], [255, 215, 0]], np.float32)
    for k, mask in enumerate(predicted):
        overlay[mask] = 0.5 * overlay[mask] + 0.5 * palette[k % len(palette)]
    overlay = overlay.astype(np.uint8)[..., ::-1].copy()
    for k, (x0, y0, x1, y1) in enumerate(boxes):
        color = tuple(int(c) for c in palette[k % len(palette)][::-1])
        cv2.rectangle(overlay, (int(x0), int(y0)), (int(x1), int(y1)), color, 2)
    for x, y, label in points:  # green inside the object, red outside (BGR)
        cv2.circle(overlay, (int(x), int(y)), 6, (0, 200, 0) if label else (0, 0, 230), -1)
    _write_png(path, overlay)


def _write_everything_overlay(path: Path, image: np.ndarray, rles: list[dict]) -> None:
    """Each mask in its own colour; masks decoded one at a time (hundreds on a large scan would not fit)."""
    overlay = image.astype(np.float32)
    palette = np.random.default_rng(0).uniform(40, 255, size=(256, 3)).astype(np.float32)
    for k, rle in enumerate(rles):
        mask = masks.decode(rle)
        overlay[mask] = 0.5 * overlay[mask] + 0.5 * palette[k % len(palette)]
    _write_png(path, overlay.astype(np.uint8)[..., ::-1].copy())


def _write_png(path: Path, image: np.ndarray) -> None:
    # cv2.imwrite reports a failed write only by returning False; this way it is an OutputError.
    ok, data = cv2.imencode(".png", image)
    if not ok:
        raise OutputError(f"could not encode {path} as PNG")
    atomic_write_bytes(path, data.tobytes())
