"""Evaluation: zero-shot SAM vs the fine-tuned decoder, same prompts, original resolution.

Everything comes from the cache and the run: embeddings, geometry, ground-truth masks and
the preview images the report draws on. No image file is opened and the encoder never runs.
Masks come from inference.py, the path training validation and predict use too.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import dataclasses
import io
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

from samcache import __version__
from samcache.cache.format import ImageInfo
from samcache.cache.reader import EmbeddingCache
from samcache.config import EvalConfig
from samcache.data import masks
from samcache.data.metrics import boundary_f, dice, iou
from samcache.data.records import ObjectRecord
from samcache.devices import decoder_precision, resolve_device
from samcache.errors import OutputError, RunError, SamcacheError
from samcache.evaluate.automatic_masks import segment_everything
from samcache.evaluate.report import write_eval_report
from samcache.fileio import atomic_write_bytes, atomic_write_json, read_json_mapping
from samcache.models.prompts import box_fill, evaluation_box
from samcache.models.weights import load_matching
from samcache.outputs import OutputFolder
from samcache.train.click_protocol import click_protocol
from samcache.train.inference import ObjectPrediction, predict_cached_objects
from samcache.train.runs import RunCheckpoint, RunFolder, apply_weights, run_decoder
from samcache.train.samples import SampleSettings

REPORT_KIND = "evaluation report"


def score_mask(info: ImageInfo, obj: ObjectRecord, mask: np.ndarray) -> dict:
    """One object's row: who it is, and the IoU, Dice and boundary F of `mask` against its ground truth."""
    truth = masks.decode(obj.rle)
    return {"image": info.name, "object_id": obj.object_id, "category": obj.category, "area": int(truth.sum()),
            "iou": iou(mask, truth), "dice": dice(mask, truth), "boundary_f": boundary_f(mask, truth)}


def score_objects(predictions: Iterator[ObjectPrediction]) -> list[dict]:
    """Each prediction's row (score_mask), with its predicted IoU and its mask."""
    return [{**score_mask(p.info, p.info.objects[p.object_index], p.mask), "score": p.score,
             "rle": masks.encode(p.mask)} for p in predictions]


def box_fill_rows(cache: EmbeddingCache, indices: list[int], config: EvalConfig) -> list[dict]:
    """The trivial baseline, scored like a model: each object's prompt box, filled. The boxes are
    the very prompts the models get (evaluation_box), so a model's gain over this row is what it
    adds to the box it was given."""
    rows = []
    for index in indices:
        info = cache.images[index]
        for j, obj in enumerate(info.objects):
            box = evaluation_box(obj.box, info.original_size, jitter=config.box_jitter, seed=config.seed,
                                 image_index=index, object_number=j + 1)
            rows.append(score_mask(info, obj, box_fill(box, info.original_size)))
    return rows


@dataclass
class PromptKindScores:
    """Per-object rows of each model and each baseline, for one kind of prompt, objects in the same order."""

    models: dict[str, list[dict]]
    baselines: dict[str, list[dict]]

    def summary(self) -> dict:
        out = {name: summarize(rows) for name, rows in self.models.items()}
        if self.baselines:
            out["baselines"] = {name: summarize(rows) for name, rows in self.baselines.items()}
        return out

    def per_image(self) -> dict[str, dict[str, float]]:
        """{image: {model or baseline: mean IoU of its objects}}: what `samcache serve` sorts images by."""
        out: dict[str, dict[str, float]] = {}
        for name, rows in {**self.models, **self.baselines}.items():
            by_image: dict[str, list[float]] = {}
            for row in rows:
                by_image.setdefault(row["image"], []).append(row["iou"])
            for image, ious in by_image.items():
                out.setdefault(image, {})[name] = round(float(np.mean(ious)), 6)
        return out


def score_prompt_kind(kind: str, decoders: dict, cache: EmbeddingCache, indices: list[int], config: EvalConfig,
                      device: torch.device) -> PromptKindScores:
    """Every model on the fixed prompts of one kind; with boxes, the box-fill baseline too."""
    settings = SampleSettings.fixed(kind, seed=config.seed, box_jitter=config.box_jitter)
    models = {name: score_objects(predict_cached_objects(decoder, cache, indices, settings, device=device,
                                                         precision=decoder_precision(device),
                                                         batch_size=config.batch_size))
              for name, decoder in decoders.items()}
    baselines = {"box_fill": box_fill_rows(cache, indices, config)} if kind == "box" else {}
    return PromptKindScores(models, baselines)


def summarize(rows: list[dict]) -> dict:
    def stats(subset: list[dict]) -> dict:
        ious = np.array([r["iou"] for r in subset])
        return {"objects": len(subset), "miou": float(ious.mean()), "median_iou": float(np.median(ious)),
                "mdice": float(np.mean([r["dice"] for r in subset])),
                "boundary_f": float(np.mean([r["boundary_f"] for r in subset]))}

    out = stats(rows)
    out["per_category"] = {c: stats([r for r in rows if r["category"] == c])
                           for c in sorted({r["category"] for r in rows})}
    return out


@dataclass
class EverythingScores:
    """Segment-everything on a split: each model's COCO results and its COCO mask AP figures."""

    results: dict[str, list[dict]]
    summary: dict[str, dict]


def score_everything(decoders: dict, cache: EmbeddingCache, indices: list[int], config: EvalConfig,
                     device: torch.device) -> EverythingScores:
    """Each model segments everything in each image (from the cache); coco_mask_ap scores its masks
    against the split's ground truth, built once for all models."""
    truth = coco_truth(cache, indices)
    results, summary = {}, {}
    for name, decoder in decoders.items():
        started, found = time.perf_counter(), []
        for index in indices:
            embedding = torch.from_numpy(cache.features(index, decoder.reads)).float()[None].to(device)
            found += [m.coco_result(index + 1) for m in segment_everything(
                decoder, embedding, cache.images[index].original_size, config.generator)]
        seconds = time.perf_counter() - started
        results[name] = found
        summary[name] = {**coco_mask_ap(truth, found), "masks": len(found), "images": len(indices),
                         "seconds": seconds}
    return EverythingScores(results, summary)


def coco_truth(cache: EmbeddingCache, indices: list[int]):
    """Every ground-truth object of the cached images `indices` as a pycocotools COCO, class-agnostic
    (one category), image_id = cache index + 1."""
    from pycocotools.coco import COCO

    images, annotations = [], []
    for index in indices:
        info = cache.images[index]
        images.append({"id": index + 1, "height": info.original_size[0], "width": info.original_size[1]})
        for obj in info.objects:
            x0, y0, x1, y1 = obj.box
            annotations.append({"id": len(annotations) + 1, "image_id": index + 1, "category_id": 1,
                                "segmentation": obj.rle, "area": masks.area(obj.rle),
                                "bbox": [x0, y0, x1 - x0, y1 - y0], "iscrowd": 0})
    truth = COCO()
    truth.dataset = {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "object"}]}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        truth.createIndex()
    return truth


def coco_mask_ap(truth, results: list[dict]) -> dict:
    """COCO mask AP (IoU 0.50:0.95), AP50 and AR100 (recall with at most 100 masks per image) of
    `results` (COCO results) against `truth` (coco_truth), by pycocotools' COCOeval. No results: all 0."""
    from pycocotools.cocoeval import COCOeval

    if not results:
        return {"ap": 0.0, "ap50": 0.0, "ar100": 0.0}
    with contextlib.redirect_stdout(io.StringIO()):
        scorer = COCOeval(truth, truth.loadRes(copy.deepcopy(results)), "segm")
        scorer.evaluate()
        scorer.accumulate()
        scorer.summarize()
    stats = [max(float(v), 0.0) for v in scorer.stats]  # -1: no ground truth of that size
    return {"ap": stats[0], "ap50": stats[1], "ar100": stats[8]}


def load_decoders(cache: EmbeddingCache, run: Optional[RunFolder], config: EvalConfig, device: torch.device):
    """{"zero_shot": PromptDecoder, "fine_tuned": ...} on `device`, in eval mode: the base weights
    that made the cache, and the same with the run's weights applied (runs.run_decoder: behind
    the run's trained encoder tail, reading the cache's tail tokens, when the run trained one)."""
    base_weights = config.checkpoint
    checkpoint = None
    if run is not None:
        checkpoint = run.read_checkpoint(config.weights)
        checkpoint.check_cache(cache.provenance)
        check_tail_cache(checkpoint, cache)
        base_weights = base_weights or checkpoint.base_checkpoint
    loaded = load_matching(cache.provenance.model_type, cache.provenance.weights_sha256, base_weights,
                           recorded_source=cache.provenance.weights_source)
    tuned = None
    if checkpoint is not None:
        # A tail run needs the encoder's last blocks and neck (apply_weights loads them into it);
        # a decoder-only run needs no encoder at all, so it is dropped before the copy.
        if not checkpoint.tail_blocks:
            loaded.sam.image_encoder = None
        tuned = dataclasses.replace(loaded, sam=copy.deepcopy(loaded.sam))
        apply_weights(tuned.sam, checkpoint)
    loaded.sam.image_encoder = None  # zero-shot decodes the stored embeddings: the encoder never runs
    decoders = {"zero_shot": loaded.decoder().to(device).eval()}
    if tuned is not None:
        decoders["fine_tuned"] = run_decoder(tuned, checkpoint).to(device).eval()
        # The tail holds the encoder's last blocks and neck itself; the blocks before it are not needed.
        tuned.sam.image_encoder = None
    return decoders


def check_tail_cache(checkpoint: RunCheckpoint, cache: EmbeddingCache) -> None:
    """Refuses, in one line, a cache without the tail tokens a run that trained the encoder's last K
    blocks reads: none stored, or stored before another number of last blocks."""
    wanted, stored = checkpoint.tail_blocks, cache.provenance.tail_blocks
    if not wanted or stored == wanted:
        return
    held = "holds no tail tokens" if not stored else f"holds the tokens before the encoder's last {stored} blocks"
    raise RunError(f"the run {Path(checkpoint.source).parent} trained the encoder's last {wanted} blocks on tail "
                   f"tokens, but the cache {cache.cache_dir} {held}: embed with --tail-blocks {wanted} to evaluate it")


def evaluate(cache_dir: str | Path, report_dir: str | Path, config: EvalConfig,
             run_dir: Optional[str | Path] = None, *, overwrite: bool = False) -> dict:
    """Scores the base decoder (and the run's, when given) on a split; writes the report.

    Arguments:
      cache_dir: the cache (embeddings, geometry, ground truth, previews).
      report_dir: where summary.json, objects.csv, report.md and the pictures go.
      config: the options.
      run_dir: a training run; None scores the base model alone.
      overwrite: replace the report when `report_dir` holds one (samcache's own: see outputs.py).
    """
    report = OutputFolder(report_dir, REPORT_KIND)
    report.check(overwrite=overwrite, legacy=_written_by_samcache)  # before the work, which may take hours
    cache = EmbeddingCache(cache_dir)
    indices = cache.annotated_indices(config.split)
    if not indices:
        raise SamcacheError(f"the cache has no objects in split {config.split!r}; "
                            f"its splits: {cache.describe_splits()}")
    if config.everything:
        cache.provenance.family.require("automatic_masks", cache.provenance.model_type)  # before hours of scoring
    device = resolve_device(config.device)
    run = RunFolder(run_dir) if run_dir is not None else None
    decoders = load_decoders(cache, run, config, device)
    scored = {kind: score_prompt_kind(kind, decoders, cache, indices, config, device) for kind in config.prompt}
    lead = config.prompt[0]  # the report's pictures and the summary's top level are this kind's
    summary = {
        "samcache_version": __version__, "cache": str(Path(cache_dir).resolve()),
        "run": str(Path(run_dir).resolve()) if run_dir else None, "split": config.split,
        "model_type": cache.provenance.model_type, "config": config.model_dump(mode="json"), "prompt": lead,
        **scored[lead].summary(),
        "by_prompt": {kind: scores.summary() for kind, scores in scored.items()},
        "per_image": scored[lead].per_image(),
    }
    if config.clicks:
        summary["clicks"] = {name: click_protocol(decoder, cache, indices, config.clicks, device=device,
                                                  precision=decoder_precision(device))
                             for name, decoder in decoders.items()}
    everything = None
    if config.everything:
        everything = score_everything(decoders, cache, indices, config, device)
        summary["everything"] = everything.summary  # its options: summary["config"]["generator"]
    report_dir = Path(report_dir)
    report.claim(overwrite=overwrite, legacy=_written_by_samcache)
    _write_objects_csv(report_dir / "objects.csv", scored, lead)
    atomic_write_json(report_dir / "summary.json", summary)
    write_eval_report(report_dir, cache, scored[lead].models, summary, overlays=config.overlays, seed=config.seed,
                      everything=everything.results if everything else None)
    if run is not None:
        try:
            run.write_eval_summary(config.split, summary)
        except OutputError as exc:  # a read-only run folder: the report itself is complete
            summary["warnings"] = [f"could not record this evaluation in the run folder {run} ({exc}); "
                                   f"the report in {report_dir} is complete"]
    report.complete()
    return summary


def _written_by_samcache(folder: Path) -> bool:
    """A report folder from before reports carried the output marker: its summary.json is samcache's."""
    summary = read_json_mapping(folder / "summary.json")
    return "samcache_version" in summary and "split" in summary


def _write_objects_csv(path: Path, scored: dict[str, PromptKindScores], lead: str) -> None:
    """One row per object; columns `{model}_{metric}` for the lead prompt kind, `{kind}_{model}_{metric}`
    for the others. Baselines predict no IoU, so they have no score column."""
    fields = ["image", "object_id", "category", "area"]
    columns = []  # (column, rows, metric)
    for kind, scores in scored.items():
        prefix = "" if kind == lead else f"{kind}_"
        for name, rows in scores.models.items():
            columns += [(f"{prefix}{name}_{m}", rows, m) for m in ("iou", "dice", "boundary_f", "score")]
        for name, rows in scores.baselines.items():
            columns += [(f"{prefix}{name}_{m}", rows, m) for m in ("iou", "dice", "boundary_f")]
    lines = []
    for i, base_row in enumerate(scored[lead].models["zero_shot"]):
        line = {k: base_row[k] for k in fields}
        line.update({column: f"{rows[i][m]:.6f}" for column, rows, m in columns})
        lines.append(line)
    header = fields + [column for column, _, _ in columns]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=header)
    writer.writeheader()
    writer.writerows(lines)
    atomic_write_bytes(path, buffer.getvalue().encode())
