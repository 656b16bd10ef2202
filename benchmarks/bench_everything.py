"""Benchmark: segment-everything from the cache against SamAutomaticMaskGenerator, same model, same images.

For each of the first N images of SPLIT in RUN's cache, in turn (ABAB...), in one process:
  A. samcache: `everything.segment_everything` on the cached embedding (no encoder; what
     `samcache predict --everything` and `eval --everything` run);
  B. stock: `SamAutomaticMaskGenerator(sam).generate(image)` on the decoded image file (the encoder
     runs, then the same grid of points through SamPredictor), the same options.
Both with the run's fine-tuned decoder, fp32. Prints masks, seconds, masks/s and images/s per side,
and whether both found the same masks (count and mask IoU of the pairs in predicted-IoU order).

    python benchmarks/bench_everything.py --run runs/stamps --split test --images 3 --points-per-side 16 \
        --pred-iou-thresh 0.7 --stability-score-thresh 0.8
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from samcache.cache.reader import EmbeddingCache  # noqa: E402
from samcache.config import EverythingSettings  # noqa: E402
from samcache.data import masks  # noqa: E402
from samcache.data.images import read_image  # noqa: E402
from samcache.deploy.predict import predictor_from_run  # noqa: E402
from samcache.devices import cpu_description  # noqa: E402
from samcache.evaluate.automatic_masks import segment_everything  # noqa: E402
from samcache.train.runs import RunFolder  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run", required=True)
    parser.add_argument("--split", default="test")
    parser.add_argument("--images", type=int, default=3)
    parser.add_argument("--points-per-side", type=int, default=32)
    parser.add_argument("--pred-iou-thresh", type=float, default=0.88)
    parser.add_argument("--stability-score-thresh", type=float, default=0.95)
    args = parser.parse_args()
    from segment_anything import SamAutomaticMaskGenerator

    torch.set_grad_enabled(False)
    settings = EverythingSettings(points_per_side=args.points_per_side, pred_iou_thresh=args.pred_iou_thresh,
                                  stability_score_thresh=args.stability_score_thresh)
    predictor = predictor_from_run(args.run)
    sam = predictor.sam.eval()
    decoder = predictor.family.decoder(sam, predictor.model_type)
    cache = EmbeddingCache(RunFolder(args.run).cache_dir())
    indices = [i for i, info in enumerate(cache.images) if info.split == args.split][: args.images]
    generator = SamAutomaticMaskGenerator(sam, points_per_side=settings.points_per_side,
                                          points_per_batch=settings.points_per_batch,
                                          pred_iou_thresh=settings.pred_iou_thresh,
                                          stability_score_thresh=settings.stability_score_thresh,
                                          box_nms_thresh=settings.box_nms_thresh, output_mode="coco_rle")
    totals = {"samcache (cache)": [0, 0.0], "SamAutomaticMaskGenerator": [0, 0.0]}
    agreement = []
    for index in indices:
        info = cache.images[index]
        t = time.perf_counter()
        embedding = torch.from_numpy(cache.embedding(index)).float()[None]
        ours = segment_everything(decoder, embedding, info.original_size, settings)
        totals["samcache (cache)"][0] += len(ours)
        totals["samcache (cache)"][1] += time.perf_counter() - t
        t = time.perf_counter()
        theirs = generator.generate(read_image(info.file.path))
        totals["SamAutomaticMaskGenerator"][0] += len(theirs)
        totals["SamAutomaticMaskGenerator"][1] += time.perf_counter() - t
        theirs = sorted(theirs, key=lambda r: -r["predicted_iou"])
        for a, b in zip(ours, theirs):
            x, y = masks.decode(a.rle), masks.decode(b["segmentation"])
            agreement.append((x & y).sum() / max((x | y).sum(), 1))
        print(f"{info.name}: samcache {len(ours)} masks, stock {len(theirs)} masks", flush=True)
    print(f"CPU: {cpu_description()}; torch threads {torch.get_num_threads()}; {len(indices)} images of "
          f"{args.split}, {settings.points_per_side}x{settings.points_per_side} points, predicted IoU > "
          f"{settings.pred_iou_thresh}, stability >= {settings.stability_score_thresh}")
    for name, (found, seconds) in totals.items():
        print(f"{name:<28} {found:>5} masks {seconds:>8.1f} s  {found / seconds:>6.2f} masks/s  "
              f"{len(indices) / seconds:.3f} images/s")
    if agreement:
        print(f"paired masks (predicted-IoU order): mask IoU min {min(agreement):.4f}, mean {np.mean(agreement):.4f}")


if __name__ == "__main__":
    main()
