"""Evaluation: zero-shot SAM vs the fine-tuned decoder, same prompts, original resolution.

Everything comes from the cache and the run: embeddings, geometry, ground-truth masks and
the preview images the report draws on. No image file is opened and the encoder never runs.
"""

from __future__ import annotations

import copy
import csv
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader

from samcache import __version__, masks
from samcache.cache import EmbeddingCache, ImageInfo
from samcache.decoder import best_for_inference, decode, upscale_logits
from samcache.embed import cuda_autocast, resolve_device
from samcache.errors import SamcacheError
from samcache.fileio import atomic_write_bytes, atomic_write_json
from samcache.metrics import boundary_f, dice, iou
from samcache.models import load_matching
from samcache.samples import CacheSamples, EpochBatches, SampleSettings, collate

MODELS = ("zero_shot", "fine_tuned")


@dataclass
class EvalConfig:
    """Options of `samcache eval`.

    Arguments:
      split: the cache split to score.
      prompt: "box" (each object's exact box) or "point" (its most interior point).
      box_jitter: move box sides by up to this fraction (at most 20 px), seeded; 0: exact boxes.
      seed: seeds the box jitter and the random overlay picks.
      weights: which checkpoint of the run: "best" or "last".
      batch_size: images per decoder batch.
      device: "auto", "cpu" or "cuda".
      checkpoint: the base weights file, when not samcache's tiny or the official weights.
      overlays: objects per overlay figure (worst, best, random).
    """

    split: str = "test"
    prompt: str = "box"
    box_jitter: float = 0.0
    seed: int = 0
    weights: str = "best"
    batch_size: int = 4
    device: str = "auto"
    checkpoint: Optional[str] = None
    overlays: int = 6


@dataclass
class ObjectPrediction:
    """A predicted mask (at original resolution) for one object of one image."""

    info: ImageInfo
    object_index: int
    mask: np.ndarray
    score: float


@torch.no_grad()
def predict_objects(prompt_encoder, mask_decoder, cache: EmbeddingCache, indices: list[int],
                    settings: SampleSettings, *, device: torch.device, batch_size: int = 4,
                    store=None) -> Iterator[ObjectPrediction]:
    """Fixed-prompt predictions for every object of the images `indices`, at original resolution."""
    autocast = cuda_autocast(device)
    samples = CacheSamples(cache, settings, read_embeddings=store is None)
    loader = DataLoader(samples, batch_sampler=EpochBatches(indices, batch_size, 0, shuffle=False),
                        num_workers=0, collate_fn=collate)
    for batch in loader:
        embeddings = store.gather(batch.indices) if store is not None else batch.embeddings.to(device)
        prompts = batch.prompts.to(device)
        with autocast:
            output = decode(prompt_encoder, mask_decoder, embeddings.float(), prompts)
        logits, scores = best_for_inference(output, prompts.is_box)
        logits, scores = logits.float(), scores.float()
        per_image = np.bincount(batch.prompts.image_index.numpy(), minlength=len(batch.indices))
        n = 0
        for b, index in enumerate(batch.indices):
            info = cache.images[index]
            for j in range(per_image[b]):
                pred = upscale_logits(logits[n : n + 1], info.input_size, info.original_size)[0] > 0
                yield ObjectPrediction(info, j, pred.cpu().numpy(), float(scores[n]))
                n += 1


def score_objects(predictions: Iterator[ObjectPrediction]) -> list[dict]:
    """IoU, Dice and boundary F of each prediction against its ground truth."""
    rows = []
    for p in predictions:
        obj = p.info.objects[p.object_index]
        truth = masks.decode(obj.rle)
        rows.append({
            "image": p.info.name, "object_id": obj.object_id, "category": obj.category,
            "area": int(truth.sum()), "iou": iou(p.mask, truth), "dice": dice(p.mask, truth),
            "boundary_f": boundary_f(p.mask, truth), "score": p.score, "rle": masks.encode(p.mask),
        })
    return rows


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


def load_decoders(cache: EmbeddingCache, run_dir: Optional[Path], config: EvalConfig, device: torch.device):
    """{"zero_shot": (prompt_encoder, mask_decoder), "fine_tuned": ...} on `device`."""
    from samcache.train import TrainingError, apply_run_weights, read_run_checkpoint

    base_weights = config.checkpoint
    payload = None
    if run_dir is not None:
        path = Path(run_dir) / f"{config.weights}.pt"
        if not path.is_file():
            raise SamcacheError(f"{path} does not exist: is {run_dir} a samcache run (weights {config.weights})?")
        payload = read_run_checkpoint(path)
        if payload["base_weights_sha256"] != cache.provenance.weights_sha256:
            raise TrainingError(
                f"the run {run_dir} was trained from weights {payload['base_weights_sha256'][:12]}..., but the "
                f"cache holds embeddings of weights {cache.provenance.weights_sha256[:12]}...: they do not belong together"
            )
        base_weights = base_weights or payload["config"].get("checkpoint")
    base = load_matching(cache.provenance.model_type, cache.provenance.weights_sha256, base_weights).sam
    base.image_encoder = None
    decoders = {"zero_shot": (base.prompt_encoder.to(device).eval(), base.mask_decoder.to(device).eval())}
    if payload is not None:
        tuned = copy.deepcopy(base)
        apply_run_weights(tuned, payload)
        decoders["fine_tuned"] = (tuned.prompt_encoder.to(device).eval(), tuned.mask_decoder.to(device).eval())
    return decoders


def evaluate(cache_dir: str | Path, report_dir: str | Path, config: EvalConfig,
             run_dir: Optional[str | Path] = None) -> dict:
    """Scores the base decoder (and the run's, when given) on a split; writes the report.

    Arguments:
      cache_dir: the cache (embeddings, geometry, ground truth, previews).
      report_dir: where summary.json, objects.csv, report.md and the pictures go.
      config: the options.
      run_dir: a training run; None scores the base model alone.
    """
    if config.prompt not in ("box", "point"):
        raise SamcacheError(f"--prompt is box or point, not {config.prompt!r}")
    if config.weights not in ("best", "last"):
        raise SamcacheError(f"--weights is best or last, not {config.weights!r}")
    cache = EmbeddingCache(cache_dir)
    indices = cache.annotated_indices(config.split)
    if not indices:
        raise SamcacheError(f"the cache has no objects in split {config.split!r}; "
                            f"its splits: {cache.describe_splits()}")
    device = resolve_device(config.device)
    decoders = load_decoders(cache, Path(run_dir) if run_dir else None, config, device)
    settings = SampleSettings(0, None, config.prompt, config.seed, config.box_jitter)
    rows = {name: score_objects(predict_objects(*parts, cache, indices, settings, device=device,
                                                batch_size=config.batch_size))
            for name, parts in decoders.items()}
    summary = {
        "samcache_version": __version__, "cache": str(Path(cache_dir).resolve()),
        "run": str(Path(run_dir).resolve()) if run_dir else None, "split": config.split,
        "model_type": cache.provenance.model_type, "config": asdict(config),
        **{name: summarize(r) for name, r in rows.items()},
    }
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    _write_objects_csv(report_dir / "objects.csv", rows)
    atomic_write_json(report_dir / "summary.json", summary)
    from samcache.report import write_eval_report

    write_eval_report(report_dir, cache, rows, summary, overlays=config.overlays, seed=config.seed)
    if run_dir is not None:
        atomic_write_json(Path(run_dir) / f"eval-{config.split}.json", summary)
    return summary


def _write_objects_csv(path: Path, rows: dict[str, list[dict]]) -> None:
    fields = ["image", "object_id", "category", "area"]
    metrics = ["iou", "dice", "boundary_f", "score"]
    header = fields + [f"{name}_{m}" for name in rows for m in metrics]
    lines = []
    for i, base_row in enumerate(rows["zero_shot"]):
        line = {k: base_row[k] for k in fields}
        for name, model_rows in rows.items():
            for m in metrics:
                line[f"{name}_{m}"] = f"{model_rows[i][m]:.6f}"
        lines.append(line)
    import io

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=header)
    writer.writeheader()
    writer.writerows(lines)
    atomic_write_bytes(path, buffer.getvalue().encode())


def format_table(summary: dict) -> str:
    """The zero-shot vs fine-tuned table the CLI and the demo print."""
    lines = [f"{'model':<12} {'objects':>7} {'mIoU':>7} {'mDice':>7} {'bound.F':>7}"]
    for name in MODELS:
        if name in summary:
            s = summary[name]
            lines.append(f"{name:<12} {s['objects']:>7} {s['miou']:>7.4f} {s['mdice']:>7.4f} {s['boundary_f']:>7.4f}")
    return "\n".join(lines)
