"""Writing generated data sets (stamps, shapes) in the COCO layout samcache reads.

Both generators draw image i from (seed, i), assign images to splits by index, and write
`images/` plus one COCO JSON per split with RLE masks; this module holds that shared part.
Memory does not grow with the number of images: splits are counts, not a list, and the COCO
entries go to temporary files as each image is added.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Optional

import numpy as np

from samcache.config import SPLITS
from samcache.data.masks import area, bbox_xyxy, encode
from samcache.data.records import check_fractions
from samcache.errors import ConfigError, DatasetError
from samcache.outputs import OutputFolder
from samcache.progress import progress_bar

# The most images one generated data set may hold: more is a typo, and would fill the disk for hours.
MAX_IMAGES = 1_000_000
# COCO entries kept in memory per file before they spill to a temporary file on disk.
_SPOOL_BYTES = 1 << 24


def split_counts(n: int, seed: int, fractions: Sequence[float]) -> tuple[int, int, int]:
    """How many of `n` images go to train, val and test: round(n * fractions[0]) train,
    round(n * fractions[1]) val, the rest test; with n >= 3 every split with a positive fraction
    gets at least one image. Checks `n` (at most MAX_IMAGES: ConfigError), `seed` and `fractions`."""
    if int(n) != n or n < 0:
        raise DatasetError(f"n must be a non-negative integer, got {n!r}")
    if n > MAX_IMAGES:
        raise ConfigError(f"n (--n) must be at most {MAX_IMAGES:,} images, got {int(n):,}")
    if int(seed) != seed or seed < 0:
        raise DatasetError(f"seed must be a non-negative integer, got {seed!r}")
    fr = check_fractions(fractions)
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
    return counts[0], counts[1], counts[2]


def split_at(index: int, counts: Sequence[int]) -> str:
    """The split of image `index` under `split_counts`: images go by index, train first, then val, then test."""
    if index < counts[0]:
        return SPLITS[0]
    return SPLITS[1] if index < counts[0] + counts[1] else SPLITS[2]


def split_plan(n: int, seed: int, fractions: Sequence[float]) -> list[str]:
    """The split of each of `n` images, as a list (`split_counts` and `split_at` need no memory per image)."""
    counts = split_counts(n, seed, fractions)
    return [s for s, c in zip(SPLITS, counts) for _ in range(c)]


class CocoSplits:
    """The train/val/test COCO documents of a generated data set, filled an image at a time.

    Each image's entries are written to a temporary file as it is added (in memory up to
    16 MiB a list), so a large data set costs disk, not memory; `write` joins them into the
    same bytes `json.dumps` would give for the whole document.

    Arguments:
      description: what the data set is ("samcache synthetic stamps"); the split is appended.
      seed: recorded in each file's info.
      categories: COCO category dicts.
    """

    def __init__(self, *, description: str, seed: int, categories: Sequence[dict]):
        self.heads = {s: {"info": {"description": f"{description} ({s})", "seed": seed},
                          "categories": [dict(c) for c in categories]} for s in SPLITS}
        self.lists = {s: {key: _JsonList() for key in ("images", "annotations")} for s in SPLITS}
        self.next_annotation = 1

    def add_image(self, split: str, *, image_id: int, file_name: str, width: int, height: int,
                  masks: Sequence[np.ndarray], category_ids: Sequence[int]) -> None:
        """One image and its objects (binary masks); annotation ids count on across the splits."""
        lists = self.lists[split]
        lists["images"].append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        for mask, category_id in zip(masks, category_ids):
            rle = encode(mask)
            x0, y0, x1, y1 = bbox_xyxy(rle)
            lists["annotations"].append({
                "id": self.next_annotation, "image_id": image_id, "category_id": category_id,
                "bbox": [x0, y0, x1 - x0, y1 - y0], "area": area(rle), "iscrowd": 0, "segmentation": rle,
            })
            self.next_annotation += 1

    def write(self, out_dir: Path) -> dict:
        """Writes SPLIT.json files; returns {"images", "objects", "splits": {split: {"images", "objects"}}, "out"}."""
        for split, head in self.heads.items():
            lists = self.lists[split]
            with open(Path(out_dir) / f"{split}.json", "w", encoding="utf-8") as f:
                f.write(f'{{"info": {json.dumps(head["info"])}, "images": ')
                lists["images"].copy_to(f)
                f.write(', "annotations": ')
                lists["annotations"].copy_to(f)
                f.write(f', "categories": {json.dumps(head["categories"])}}}')
        splits = {s: {"images": len(v["images"]), "objects": len(v["annotations"])} for s, v in self.lists.items()}
        return {"images": sum(v["images"] for v in splits.values()), "objects": self.next_annotation - 1,
                "splits": splits, "out": str(out_dir)}


class _JsonList:
    """A JSON list written an item at a time to a temporary file (in memory while small)."""

    def __init__(self):
        self.file = tempfile.SpooledTemporaryFile(max_size=_SPOOL_BYTES, mode="w+", encoding="utf-8")
        self.count = 0

    def __len__(self) -> int:
        return self.count

    def append(self, item) -> None:
        self.file.write((", " if self.count else "") + json.dumps(item))
        self.count += 1

    def copy_to(self, out) -> None:
        """Writes the list, brackets included, to the text file `out`."""
        out.write("[")
        self.file.seek(0)
        shutil.copyfileobj(self.file, out)
        self.file.seek(0, 2)  # appending may go on after a write
        out.write("]")


Rendered = tuple[str, bytes, int, int, list, list]
"""What a generator renders for one image: (file name, file bytes, height, width, masks, category ids)."""


def write_synthetic_set(out_dir: Path, n: int, seed: int, *, kind: str, description: str, categories, unit: str,
                        render: Callable[[int], Rendered], fractions: Sequence[float], progress: bool,
                        overwrite: bool, legacy: Optional[Callable[[Path], bool]] = None) -> dict:
    """Writes images 0..n-1 of a generator (`render(index)`) to out_dir/images and their COCO splits, one
    image at a time: the loop of the stamps and cells generators. `kind` and `legacy` are OutputFolder's
    (only samcache's own earlier output of that kind is replaced, and only with `overwrite`)."""
    counts = split_counts(n, seed, fractions)
    out_dir = Path(out_dir)
    output = OutputFolder(out_dir, kind).claim(overwrite=overwrite, legacy=legacy)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    coco = CocoSplits(description=description, seed=int(seed), categories=categories)
    bar = progress_bar(sum(counts), desc=kind.split()[0], unit=unit, enabled=progress)
    for index in range(sum(counts)):
        name, data, height, width, masks, category_ids = render(index)
        (out_dir / "images" / name).write_bytes(data)
        coco.add_image(split_at(index, counts), image_id=index + 1, file_name=name, width=width, height=height,
                       masks=masks, category_ids=category_ids)
        bar.update(1)
    bar.close()
    summary = coco.write(out_dir)
    output.complete()
    return summary
