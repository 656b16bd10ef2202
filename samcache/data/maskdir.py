"""Image + mask folders -> `Dataset`.

Layouts accepted:
- `DIR/images/NAME.ext` with `DIR/masks/NAME.ext` (any image extension on either side);
  splits from a deterministic hash of NAME (`hash_split`) with the given fractions;
- `DIR/{train,val,test}/images/...` with `.../masks/...`: the split is the folder.

A mask is read by `mask_mode`:
- `labels`: an instance label image, 8- or 16-bit: each non-zero value is one object;
- `components`: a binary mask: each 8-connected component of non-zero pixels is one object;
- `single`: a binary mask kept as one object per image, however many parts it has;
- `auto` (default): `labels` when the mask holds more than one non-zero value, else `components`.
  A binary mask saved anti-aliased or as JPEG (many grey levels, most non-zero pixels at or
  above half the range and near its top value) would explode into ring-shaped "objects":
  it is thresholded at half the range, read as `components`, and a warning says so.
All objects get the category "object"; the folders carry no class names.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Optional

import cv2
import numpy as np

from samcache.data import masks
from samcache.data.images import read_image_size
from samcache.data.records import SPLITS, Dataset, ImageRecord, ObjectRecord, Problem, hash_split
from samcache.errors import DatasetError, ImageReadError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
MASK_MODES = ("auto", "labels", "components", "single")
CATEGORY = "object"


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
    for index, (name, image_path, mask_dir, split) in enumerate(_image_files(path, fractions)):
        record = f"image {name}"
        mask_path = _find_mask(mask_dir, image_path)
        if mask_path is None:
            dataset.problems.append(Problem(str(image_path), record,
                                            f"no mask named {image_path.stem}.* in {mask_dir}", "image"))
            continue
        try:
            height, width = read_image_size(image_path)
        except ImageReadError as exc:
            dataset.problems.append(Problem(str(image_path), record, str(exc), "image", unreadable_image=name))
            continue
        try:
            label_image = _read_mask(mask_path)
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
        if mask_mode == "auto" and _looks_like_a_blurred_binary_mask(label_image):
            levels = len(np.unique(label_image))
            half = _half_range(label_image)
            label_image = (label_image >= half).astype(np.uint8)
            dataset.problems.append(Problem(
                str(mask_path), record, f"binary mask with {levels} grey levels (anti-aliased or JPEG): "
                f"thresholded at {half} and split into connected components", "nothing"))
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


def _half_range(mask: np.ndarray) -> int:
    return 1 << (8 * mask.dtype.itemsize - 1) if mask.dtype.kind == "u" else int(mask.max()) // 2 + 1


def _looks_like_a_blurred_binary_mask(mask: np.ndarray) -> bool:
    """Many grey levels, most non-zero pixels at or above half the range and a third of them
    near the top: a binary mask with soft edges (anti-aliased, or JPEG). Instance label images
    give each object its own value instead, none of them holding a third of the pixels when
    there are this many."""
    nonzero = mask[mask != 0]
    if nonzero.size == 0 or len(np.unique(nonzero)) <= 8:
        return False
    top = int(nonzero.max())
    near_top = np.count_nonzero(nonzero >= top - max(1, top // 32))
    return np.count_nonzero(nonzero >= _half_range(mask)) >= 0.5 * nonzero.size and near_top >= nonzero.size / 3


def _image_files(path: Path, fractions) -> Iterator[tuple[str, Path, Path, str]]:
    """(name, image path, mask folder, split) for every image, in a stable order."""
    if (path / "images").is_dir():
        for image_path in _list_images(path / "images"):
            name = image_path.relative_to(path / "images").as_posix()
            yield name, image_path, path / "masks", hash_split(name, fractions)
        return
    for split in SPLITS:
        if (path / split / "images").is_dir():
            for image_path in _list_images(path / split / "images"):
                name = f"{split}/{image_path.name}"
                yield name, image_path, path / split / "masks", split


def _list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _find_mask(mask_dir: Path, image_path: Path) -> Optional[Path]:
    for ext in IMAGE_EXTENSIONS:
        for candidate in (mask_dir / (image_path.stem + ext), mask_dir / (image_path.stem + ext.upper())):
            if candidate.is_file():
                return candidate
    return None


def _read_mask(mask_path: Path) -> np.ndarray:
    """A mask file -> a 2-D integer label array. Color masks must be gray in disguise."""
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
    return mask
