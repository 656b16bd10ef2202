"""Writing generated data sets (stamps, shapes) in the COCO layout samcache reads.

Both generators draw image i from (seed, i), assign images to splits by index, and write
`images/` plus one COCO JSON per split with RLE masks; this module holds that shared part.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from samcache.config import SPLITS
from samcache.data.masks import area, bbox_xyxy, encode
from samcache.errors import DatasetError


def split_plan(n: int, seed: int, fractions: Sequence[float]) -> list[str]:
    """The split of each of `n` images: the first round(n * fractions[0]) train, the next
    round(n * fractions[1]) val, the rest test; with n >= 3 every split with a positive
    fraction gets at least one image. Checks `n`, `seed` and `fractions`."""
    if int(n) != n or n < 0:
        raise DatasetError(f"n must be a non-negative integer, got {n!r}")
    if int(seed) != seed or seed < 0:
        raise DatasetError(f"seed must be a non-negative integer, got {seed!r}")
    fr = [float(f) for f in fractions]
    if len(fr) != 3 or any(f < 0 for f in fr) or abs(sum(fr) - 1.0) > 1e-6:
        raise DatasetError(f"split fractions must be three non-negative numbers summing to 1, got {fractions}")
    n = int(n)
    train = min(n, round(n * fr[0]))
    val = min(n - train, round(n * fr[1]))
    counts = [train, val, n - train - val]
    if n >= 3:
        # Tiny data sets still need something to validate and test on.
        for k in range(3):
            if fr[k] > 0 and counts[k] == 0:
                counts[int(np.argmax(counts))] -= 1
                counts[k] += 1
    return [s for s, c in zip(SPLITS, counts) for _ in range(c)]


class CocoSplits:
    """The train/val/test COCO documents of a generated data set, filled an image at a time.

    Arguments:
      description: what the data set is ("samcache synthetic stamps"); the split is appended.
      seed: recorded in each file's info.
      categories: COCO category dicts.
    """

    def __init__(self, *, description: str, seed: int, categories: Sequence[dict]):
        self.docs = {
            s: {"info": {"description": f"{description} ({s})", "seed": seed}, "images": [], "annotations": [],
                "categories": [dict(c) for c in categories]}
            for s in SPLITS
        }
        self.next_annotation = 1

    def add_image(self, split: str, *, image_id: int, file_name: str, width: int, height: int,
                  masks: Sequence[np.ndarray], category_ids: Sequence[int]) -> None:
        """One image and its objects (binary masks); annotation ids count on across the splits."""
        doc = self.docs[split]
        doc["images"].append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        for mask, category_id in zip(masks, category_ids):
            rle = encode(mask)
            x0, y0, x1, y1 = bbox_xyxy(rle)
            doc["annotations"].append({
                "id": self.next_annotation, "image_id": image_id, "category_id": category_id,
                "bbox": [x0, y0, x1 - x0, y1 - y0], "area": area(rle), "iscrowd": 0, "segmentation": rle,
            })
            self.next_annotation += 1

    def write(self, out_dir: Path) -> dict:
        """Writes SPLIT.json files; returns {"images", "objects", "splits": {split: {"images", "objects"}}, "out"}."""
        for split, doc in self.docs.items():
            (Path(out_dir) / f"{split}.json").write_text(json.dumps(doc), encoding="utf-8")
        splits = {s: {"images": len(d["images"]), "objects": len(d["annotations"])} for s, d in self.docs.items()}
        return {"images": sum(v["images"] for v in splits.values()), "objects": self.next_annotation - 1,
                "splits": splits, "out": str(out_dir)}
