"""Datasets in: COCO JSON, image + mask folders, and the synthetic stamps set.

`load_dataset(path)` recognises the format and returns a `Dataset` of `ImageRecord`s;
everything downstream (check, embed) sees only that record type.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from samcache.data.coco import find_split_files, read_coco
from samcache.data.maskdir import MASK_MODES, is_maskdir, read_maskdir
from samcache.data.records import SPLITS, Dataset, ImageRecord, ObjectRecord, Problem, check_fractions, hash_split
from samcache.errors import DatasetError

__all__ = [
    "MASK_MODES", "SPLITS", "Dataset", "ImageRecord", "ObjectRecord", "Problem", "check_fractions", "hash_split",
    "load_dataset",
]


def load_dataset(
    path: str | Path,
    *,
    image_root: Optional[str | Path] = None,
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
    mask_mode: str = "auto",
    strict: bool = False,
) -> Dataset:
    """Reads a dataset in any supported format.

    Arguments:
      path: a COCO JSON file, a folder of per-split COCO JSON files, or an image + mask folder.
      image_root: where COCO `file_name`s are resolved (default: `images/` beside the JSON).
      fractions: train/val/test fractions for datasets without explicit splits; checked even
        when the dataset has its splits, since a bad value is a mistake either way.
      mask_mode: how mask folders are split into objects (see `maskdir`).
      strict: raise `DatasetError` on any problem instead of skipping the bad record.
    """
    fractions = check_fractions(fractions)
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"dataset {path} does not exist")
    if path.is_file() and path.suffix.lower() == ".json":
        dataset = read_coco(path, image_root=Path(image_root) if image_root else None, fractions=fractions)
    elif path.is_dir() and find_split_files(path):
        dataset = read_coco(path, image_root=Path(image_root) if image_root else None, fractions=fractions)
    elif path.is_dir() and is_maskdir(path):
        dataset = read_maskdir(path, fractions=fractions, mask_mode=mask_mode)
    else:
        raise DatasetError(
            f"{path} is not a dataset samcache reads: expected a COCO .json file, a folder with "
            "train.json/val.json/test.json, or a folder with images/ and masks/ (see data/README.md)"
        )
    if strict:
        dataset.raise_if_problems()
    return dataset
