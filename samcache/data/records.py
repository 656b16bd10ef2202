"""The one record type every dataset reader produces, and the problems it reports.

A reader turns a dataset on disk into a `Dataset`: images with their objects, plus a list
of `Problem`s for everything it had to skip. Readers never raise on a bad record; the
caller decides (`strict=True` turns any problem into a `DatasetError`).
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from samcache.config import SPLITS, TEST_SPLIT, TRAIN_SPLIT, VAL_SPLIT
from samcache.data.masks import Rle
from samcache.errors import DatasetError

__all__ = ["SPLITS", "Dataset", "ImageRecord", "ObjectRecord", "Problem", "check_fractions", "hash_split"]


@dataclass(frozen=True)
class ObjectRecord:
    """One annotated object.

    Arguments:
      object_id: the id the dataset gives it (COCO annotation id, or a stable counter).
      box: XYXY in original image pixels (pixel edges: a one-pixel object at column 3 is 3..4).
      rle: the object's mask as a compressed COCO RLE at the image's original size.
      category: the category name.
    """

    object_id: int
    box: tuple[float, float, float, float]
    rle: Rle
    category: str


@dataclass
class ImageRecord:
    """One image and its objects.

    Arguments:
      image_id: the id the dataset gives it (COCO image id, or a stable counter).
      name: the image's path relative to the dataset's image root; the key caches use.
      path: where the file is.
      height, width: original size in pixels.
      split: "train", "val", "test" or another name the dataset uses.
      objects: the valid objects; bad ones were dropped and reported as problems.
    """

    image_id: int
    name: str
    path: Path
    height: int
    width: int
    split: str
    objects: list[ObjectRecord] = field(default_factory=list)


@dataclass(frozen=True)
class Problem:
    """Something wrong in a dataset.

    Arguments:
      file: the file where the problem is (an annotation JSON, an image, a mask).
      record: which record, e.g. "image id 4 (a.png)" or "annotation id 17".
      message: what is wrong.
      dropped: what was left out because of it: "object", "image" or "nothing".
      unreadable_image: the image's name when its file is missing or cannot be decoded; the
        cache lists such images as failed.
    """

    file: str
    record: str
    message: str
    dropped: str
    unreadable_image: str = ""

    def __str__(self) -> str:
        return f"{self.file}: {self.record}: {self.message} ({self.dropped} skipped)"


@dataclass
class Dataset:
    """A dataset read from disk: valid images and objects, and the problems found."""

    root: Path
    format: str
    images: list[ImageRecord]
    problems: list[Problem] = field(default_factory=list)
    ignored_crowd: int = 0

    def split(self, name: str) -> list[ImageRecord]:
        return [im for im in self.images if im.split == name]

    def summary(self) -> dict:
        """Counts per split and category, and the problems, as plain JSON-able types."""
        splits: dict[str, dict[str, int]] = {}
        for im in self.images:
            s = splits.setdefault(im.split, {"images": 0, "objects": 0})
            s["images"] += 1
            s["objects"] += len(im.objects)
        per_category = Counter(o.category for im in self.images for o in im.objects)
        return {
            "root": str(self.root),
            "format": self.format,
            "images": len(self.images),
            "objects": sum(len(im.objects) for im in self.images),
            "splits": dict(sorted(splits.items())),
            "categories": dict(sorted(per_category.items())),
            "ignored_crowd": self.ignored_crowd,
            "problems": [
                {"file": p.file, "record": p.record, "message": p.message, "dropped": p.dropped}
                for p in self.problems
            ],
        }

    def raise_if_problems(self) -> None:
        if self.problems:
            shown = "\n  ".join(str(p) for p in self.problems[:20])
            more = f"\n  ... and {len(self.problems) - 20} more" if len(self.problems) > 20 else ""
            raise DatasetError(f"{len(self.problems)} problem(s) in {self.root} (strict mode):\n  {shown}{more}")


def check_fractions(fractions) -> tuple[float, float, float]:
    """The train/val/test fractions as three floats; DatasetError unless each is finite and >= 0
    and they sum to 1. NaN fails no comparison, so without this check it would send every image
    to the last split."""
    try:
        values = tuple(float(f) for f in fractions)
    except (TypeError, ValueError):
        values = ()
    if len(values) != 3 or not all(math.isfinite(f) and f >= 0 for f in values) or abs(sum(values) - 1.0) > 1e-6:
        shown = tuple(fractions) if isinstance(fractions, (list, tuple)) else fractions
        raise DatasetError(f"split fractions (train, val, test) must be three finite, non-negative numbers "
                           f"summing to 1, got {shown}")
    return values  # type: ignore[return-value]


def hash_split(name: str, fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)) -> str:
    """A deterministic train/val/test split from a name: the same name always lands in the same split,
    and adding images never moves existing ones."""
    fractions = check_fractions(fractions)
    u = int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big") / 2**64
    if u < fractions[0]:
        return TRAIN_SPLIT
    if u < fractions[0] + fractions[1]:
        return VAL_SPLIT
    return TEST_SPLIT
