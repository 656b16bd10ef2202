"""Image + mask folders -> `Dataset`.

Layouts accepted:
- `DIR/images/NAME.ext` with `DIR/masks/NAME.ext` (any image extension on either side);
  splits from a deterministic hash of NAME (`hash_split`) with the given fractions;
- `DIR/{train,val,test}/images/...` with `.../masks/...`: the split is the folder.

Each image has exactly one mask, found by NAME: two images or two masks with one NAME and
different extensions (`a.png` and `a.jpg`) are a problem and the image is skipped, never a guess.

A mask is read by `mask_mode`:
- `labels`: an instance label image, 8- or 16-bit: each non-zero value is one object;
- `components`: a binary mask: each 8-connected component of non-zero pixels is one object;
- `single`: a binary mask kept as one object per image, however many parts it has;
- `auto` (default): `labels` when the mask holds more than one non-zero value, else `components`,
  except for soft binary masks, which would explode into ring-shaped "objects":
  - a JPEG (known by its bytes, whatever its extension) is lossy, so never a label image: it
    is always read as binary;
  - a lossless mask whose grey values sit on slopes (each with a brighter and a darker
    neighbour) or alone (no neighbour of its own value) is an anti-aliased or blurred binary
    mask; a label image's values fill flat regions instead.
  Such a mask is thresholded at half its top value and read as `components`, and a warning
  says so. `components` and `single` threshold a JPEG the same way (its compression noise is
  not object pixels); `labels` reads its values as they are, with a warning.
All objects get the category "object"; the folders carry no class names.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np

from samcache.data import masks
from samcache.data.images import read_image_size
from samcache.data.records import SPLITS, Dataset, ImageRecord, ObjectRecord, Problem, hash_split
from samcache.errors import DatasetError, ImageReadError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
JPEG_MAGIC = b"\xff\xd8\xff"
MASK_MODES = ("auto", "labels", "components", "single")
CATEGORY = "object"
# A lossless mask is a soft binary mask when at least this share of its grey pixels (neither 0 nor
# its top value) lies on a slope or alone: label images measure under 0.15, blurred masks over 0.85.
SOFT_PIXEL_SHARE = 0.5
# A JPEG's top value is this quantile of its non-zero pixels: a few compression overshoots do not count.
TOP_QUANTILE = 0.99


def is_maskdir(path: Path) -> bool:
    path = Path(path)
    return (path / "images").is_dir() and (path / "masks").is_dir() or any(
        (path / s / "images").is_dir() and (path / s / "masks").is_dir() for s in SPLITS
    )


def read_maskdir(
    path: Path,
    *,
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
    mask_mode: str = "auto",
    min_object_pixels: int = 1,
) -> Dataset:
    """Reads an image + mask folder dataset (see the module docstring for the layouts)."""
    if mask_mode not in MASK_MODES:
        raise DatasetError(f"unknown mask mode {mask_mode!r}; choose one of {', '.join(MASK_MODES)}")
    path = Path(path)
    if not is_maskdir(path):
        raise DatasetError(f"{path} has neither images/ + masks/ nor train|val|test/images/ + masks/")
    dataset = Dataset(root=path, format="maskdir", images=[])
    next_object_id = 1
    for index, entry in enumerate(_image_files(path, fractions)):
        name, image_path, split, record = entry.name, entry.image_path, entry.split, f"image {entry.name}"
        if len(entry.twins) > 1:
            dataset.problems.append(Problem(str(image_path), record, f"images {', '.join(entry.twins)} share the "
                                            f"name {image_path.stem!r}, so they would share one mask: rename one",
                                            "image"))
            continue
        if len(entry.mask_paths) != 1:
            dataset.problems.append(_mask_count_problem(entry, record))
            continue
        mask_path = entry.mask_paths[0]
        try:
            height, width = read_image_size(image_path)
        except ImageReadError as exc:
            dataset.problems.append(Problem(str(image_path), record, str(exc), "image", unreadable_image=name))
            continue
        try:
            label_image, lossy = _read_mask(mask_path)
        except ValueError as exc:
            dataset.problems.append(Problem(str(mask_path), record, str(exc), "image"))
            continue
        if label_image.shape != (height, width):
            dataset.problems.append(Problem(
                str(mask_path), record,
                f"mask size {label_image.shape[0]}x{label_image.shape[1]} differs from the image's {height}x{width}",
                "image",
            ))
            continue
        label_image, warning = _binarize_soft_mask(label_image, lossy, mask_mode)
        if warning:
            dataset.problems.append(Problem(str(mask_path), record, warning, "nothing"))
        objects = []
        for binary in split_objects(label_image, mask_mode):
            if int(binary.sum()) < min_object_pixels:
                continue
            rle = masks.encode(binary)
            objects.append(ObjectRecord(next_object_id, masks.bbox_xyxy(rle), rle, CATEGORY))
            next_object_id += 1
        if not objects:
            dataset.problems.append(Problem(str(mask_path), record, "empty mask: no object pixels", "image"))
            continue
        dataset.images.append(ImageRecord(index, name, image_path, height, width, split, objects))
    return dataset


def _mask_count_problem(entry: _ImageFile, record: str) -> Problem:
    if not entry.mask_paths:
        return Problem(str(entry.image_path), record, f"no mask named {entry.image_path.stem}.* in {entry.mask_dir}",
                       "image")
    names = ", ".join(p.name for p in entry.mask_paths)
    return Problem(str(entry.mask_dir), record,
                   f"{len(entry.mask_paths)} masks for one image ({names}) in {entry.mask_dir}: keep one", "image")


def _binarize_soft_mask(mask: np.ndarray, lossy: bool, mask_mode: str) -> tuple[np.ndarray, str]:
    """The mask thresholded at half its top value when it is a soft binary mask (a JPEG, or in
    `auto` mode an anti-aliased or blurred lossless one), else unchanged; and the warning to report.

    Arguments:
      mask: the mask's values, (H, W).
      lossy: whether the file is a JPEG.
      mask_mode: one of MASK_MODES.
    """
    levels = len(np.unique(mask[mask != 0]))
    if levels <= 1:
        return mask, ""  # binary already, or empty
    if mask_mode == "labels":
        warning = "JPEG label image: lossy compression changes its values, so objects may split; save it as PNG"
        return mask, warning if lossy else ""
    if not (lossy or mask_mode == "auto" and _looks_like_a_soft_binary_mask(mask)):
        return mask, ""
    threshold = (_top_value(mask, lossy) + 1) // 2
    kind = "JPEG mask (lossy, so read as binary)" if lossy else "binary mask (anti-aliased or blurred)"
    then = "kept as one object" if mask_mode == "single" else "split into connected components"
    warning = f"{kind} with {levels} grey levels: thresholded at {threshold} and {then}"
    return (mask >= threshold).astype(np.uint8), warning


def split_objects(label_image: np.ndarray, mask_mode: str) -> Iterator[np.ndarray]:
    """The boolean mask of each object in a label or binary mask image."""
    values = np.unique(label_image)
    values = values[values != 0]
    mode = mask_mode
    if mode == "auto":
        mode = "labels" if len(values) > 1 else "components"
    if mode == "labels":
        for value in values:
            yield label_image == value
    elif mode == "single":
        if len(values):
            yield label_image != 0
    else:
        count, components = cv2.connectedComponents((label_image != 0).astype(np.uint8), connectivity=8)
        for label in range(1, count):
            yield components == label


def _top_value(mask: np.ndarray, lossy: bool) -> int:
    nonzero = mask[mask != 0]
    if not lossy:
        return int(nonzero.max())  # a blurred mask keeps its exact top value inside each object
    k = int(TOP_QUANTILE * (nonzero.size - 1))
    return int(np.partition(nonzero, k)[k])


def _looks_like_a_soft_binary_mask(mask: np.ndarray) -> bool:
    """Whether most grey pixels (neither 0 nor the top value) lie on a slope (a brighter and a
    darker 4-neighbour) or alone (no 4-neighbour of their own value): the soft edge of a binary
    mask, anti-aliased or blurred. A label image's values fill flat regions: only pixels where
    three objects meet, or one-pixel objects, count."""
    grey = (mask != 0) & (mask != mask.max())
    if not grey.any():
        return False
    padded = np.pad(mask, 1, mode="edge")
    brighter = np.zeros(mask.shape, bool)
    darker = np.zeros(mask.shape, bool)
    alike = np.zeros(mask.shape, bool)
    for neighbour in (padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:]):
        brighter |= neighbour > mask
        darker |= neighbour < mask
        alike |= neighbour == mask
    soft = grey & ((brighter & darker) | ~alike)
    return np.count_nonzero(soft) >= SOFT_PIXEL_SHARE * np.count_nonzero(grey)


@dataclass(frozen=True)
class _ImageFile:
    """An image of a mask folder dataset, and the files that decide whether it can be read.

    Arguments:
      name: the image's name in the dataset (`a.png`, or `train/a.png` in the split layout).
      image_path: the image file.
      mask_dir: the folder its mask belongs in.
      mask_paths: the mask files named like it (one, unless the folder is wrong).
      split: train, val or test.
      twins: the file names of every image with its stem, itself included.
    """

    name: str
    image_path: Path
    mask_dir: Path
    mask_paths: list[Path]
    split: str
    twins: list[str]


def _image_files(path: Path, fractions) -> Iterator[_ImageFile]:
    """Every image of the dataset, in a stable order."""
    if (path / "images").is_dir():
        folders = [(path / "images", path / "masks", None)]
    else:
        folders = [(path / s / "images", path / s / "masks", s) for s in SPLITS if (path / s / "images").is_dir()]
    for image_dir, mask_dir, split in folders:
        images = _by_stem(image_dir)
        mask_files = _by_stem(mask_dir)
        for image_path in sorted(p for same_stem in images.values() for p in same_stem):
            name = image_path.name if split is None else f"{split}/{image_path.name}"
            yield _ImageFile(name, image_path, mask_dir, mask_files.get(image_path.stem, []),
                             split or hash_split(name, fractions), [p.name for p in images[image_path.stem]])


def _by_stem(folder: Path) -> dict[str, list[Path]]:
    """{stem: the image files with that stem} in `folder` (extensions in any case); {} without the folder."""
    found: dict[str, list[Path]] = defaultdict(list)
    if folder.is_dir():
        for p in sorted(folder.iterdir()):
            if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS:
                found[p.stem].append(p)
    return dict(found)


def _read_mask(mask_path: Path) -> tuple[np.ndarray, bool]:
    """A mask file -> (a 2-D integer label array, whether the file is a lossy JPEG). Color masks
    must be gray in disguise."""
    data = np.fromfile(mask_path, dtype=np.uint8)
    mask = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if mask is None:
        raise ValueError("mask file is unreadable or corrupt")
    if mask.ndim == 3:
        if mask.shape[2] == 4:
            mask = mask[..., :3]
        if not (np.array_equal(mask[..., 0], mask[..., 1]) and np.array_equal(mask[..., 0], mask[..., 2])):
            raise ValueError("color mask: save instance masks as 8- or 16-bit single-channel label images")
        mask = mask[..., 0]
    if mask.dtype not in (np.uint8, np.uint16, np.int32):
        raise ValueError(f"mask dtype {mask.dtype} is not an integer label image")
    return mask, bytes(data[:3]) == JPEG_MAGIC
