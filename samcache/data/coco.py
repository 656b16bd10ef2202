"""COCO instance-segmentation JSON -> `Dataset`.

Layouts accepted:
- one JSON per split: `DIR/train.json`, `DIR/val.json`, `DIR/test.json` (also
  `instances_<split>.json`, and either form under `DIR/annotations/`);
- a single JSON file: each image's split is its `"split"` field when present (train, val or
  test; any other value is a problem), otherwise a deterministic hash of its file name (`hash_split`).

Images are looked up under the image root: `--image-root` when given, else `images/` beside
the dataset when it exists, else the dataset folder itself. Segmentations may be polygons,
uncompressed RLE or compressed RLE; crowd annotations (`iscrowd: 1`) mark regions, not
objects, and are ignored (counted in the summary). An object's box is the tight box of its
mask, so prompts always agree with the target.

Every bad record is skipped and reported as a `Problem`, never passed on to fail later: ids that
are not integers or do not fit in 64 bits, a declared width or height that is not an integer or
not the file's, a NaN or infinite `bbox`, a category id given to two names.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any, Optional

from samcache.data import masks
from samcache.data.images import read_image_size
from samcache.data.records import SPLITS, Dataset, ImageRecord, ObjectRecord, Problem, hash_split
from samcache.errors import DatasetError, ImageReadError

# COCO boxes are floats from annotation tools; allow them to poke this far past the border.
BOX_TOLERANCE_PX = 1.0
# Image and annotation ids go to the cache's int64 columns.
ID_MIN, ID_MAX = -(2**63), 2**63 - 1


def find_split_files(directory: Path) -> dict[str, Path]:
    """{split: json path} for the per-split COCO files in `directory`, if any."""
    found: dict[str, Path] = {}
    for folder in (directory, directory / "annotations"):
        for split in SPLITS:
            for name in (f"{split}.json", f"instances_{split}.json"):
                if split not in found and (folder / name).is_file():
                    found[split] = folder / name
    return found


def default_image_root(dataset_dir: Path) -> Path:
    return dataset_dir / "images" if (dataset_dir / "images").is_dir() else dataset_dir


def read_coco(
    path: Path,
    *,
    image_root: Optional[Path] = None,
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
) -> Dataset:
    """Reads a COCO dataset: a directory with per-split JSON files, or one JSON file."""
    path = Path(path)
    if path.is_dir():
        split_files = find_split_files(path)
        if not split_files:
            raise DatasetError(f"{path} holds no train.json, val.json or test.json (nor instances_<split>.json)")
        root = Path(image_root) if image_root else default_image_root(path)
        sources = [(file, split) for split, file in split_files.items()]
        dataset_dir = path
    else:
        root = Path(image_root) if image_root else default_image_root(path.parent)
        sources = [(path, None)]
        dataset_dir = path.parent
    if not root.is_dir():
        raise DatasetError(f"image folder {root} does not exist (set it with --image-root)")

    dataset = Dataset(root=dataset_dir, format="coco", images=[])
    reader = _CocoReader(root=root.resolve(), dataset=dataset, fractions=fractions)
    for file, split in sources:
        reader.read_file(file, split)
    return dataset


class _CocoReader:
    """Reads one or more COCO files into one Dataset, checking ids and names across files."""

    def __init__(self, *, root: Path, dataset: Dataset, fractions: tuple[float, float, float]):
        self.root = root
        self.dataset = dataset
        self.fractions = fractions
        self.seen_names: dict[str, str] = {}
        self.seen_files: dict[Path, tuple[str, str]] = {}  # resolved path -> (file_name, COCO file)
        self.seen_annotation_ids: dict[Any, str] = {}
        # This file's category ids given to several names, and how many objects each one cost.
        self.ambiguous_categories: dict[Any, list[str]] = {}
        self.ambiguous_objects: Counter = Counter()

    def problem(self, file: Path, record: str, message: str, dropped: str, unreadable_image: str = "") -> None:
        self.dataset.problems.append(Problem(str(file), record, message, dropped, unreadable_image))

    def read_file(self, file: Path, split: Optional[str]) -> None:
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DatasetError(f"{file}: not a readable JSON file: {exc}") from exc
        if not isinstance(data, dict) or not isinstance(data.get("images"), list):
            raise DatasetError(f"{file}: not a COCO instances file (no 'images' list)")
        annotations = data.get("annotations", [])
        if not isinstance(annotations, list):
            raise DatasetError(f"{file}: 'annotations' must be a list")
        categories = self.read_categories(file, data.get("categories", []))

        images: dict[Any, ImageRecord] = {}
        dropped_ids: set = set()
        for entry in data["images"]:
            image = self.read_image_entry(file, entry, split)
            if image is None:
                if isinstance(entry, dict) and "id" in entry:
                    dropped_ids.add(repr(entry["id"]))  # repr: an id may be unhashable, a list say
                continue
            if image.image_id in images:
                self.problem(file, f"image id {image.image_id} ({image.name})", "duplicate image id", "image")
                continue
            images[image.image_id] = image

        for ann in annotations:
            # An image already reported and dropped takes its annotations with it, silently.
            image_id = ann.get("image_id") if isinstance(ann, dict) else None
            dropped = isinstance(ann, dict) and repr(image_id) in dropped_ids
            if not (dropped and not (_is_integer_id(image_id) and image_id in images)):
                self.read_annotation(file, ann, images, categories)
        self.dataset.images.extend(images.values())
        for category_id, names in self.ambiguous_categories.items():
            shown = " and ".join(repr(n) for n in names)
            self.problem(file, f"category id {category_id!r}", f"category id {category_id!r} is given to {shown}, "
                         f"so its {self.ambiguous_objects[category_id]} object(s) could be either; give each "
                         "category its own id", "object")

    def read_categories(self, file: Path, entries: Any) -> dict[Any, str]:
        """{category id: name}. An id given to two different names is left out (its objects are
        skipped and reported once the file is read): which of the two an object is cannot be told."""
        categories: dict[Any, str] = {}
        names: dict[Any, list[str]] = {}
        self.ambiguous_categories, self.ambiguous_objects = {}, Counter()
        for entry in entries if isinstance(entries, list) else []:
            if not (isinstance(entry, dict) and "id" in entry):
                continue
            category_id = entry["id"]
            if not _is_category_id(category_id):
                self.problem(file, f"category {str(entry)[:60]}",
                             f"category id must be an integer, got {category_id!r}", "nothing")
                continue
            name = str(entry.get("name", category_id))
            if category_id not in names:
                names[category_id] = [name]
                categories[category_id] = name
            elif name in names[category_id]:
                self.problem(file, f"category id {category_id!r}", f"category {name!r} is listed twice", "nothing")
            else:
                names[category_id].append(name)
                self.ambiguous_categories[category_id] = names[category_id]
                categories.pop(category_id, None)
        return categories

    def read_image_entry(self, file: Path, entry: Any, split: Optional[str]) -> Optional[ImageRecord]:
        if not isinstance(entry, dict) or "id" not in entry or not isinstance(entry.get("file_name"), str):
            self.problem(file, f"image entry {str(entry)[:60]}", "needs 'id' and 'file_name'", "image")
            return None
        record = f"image id {entry['id']!r} ({entry['file_name']})"
        message = _id_problem("image id", entry["id"])
        if message:
            self.problem(file, record, message, "image")
            return None
        image_split = split
        if split is None and entry.get("split") is not None:
            image_split = entry["split"]
            if not (isinstance(image_split, str) and image_split in SPLITS):
                self.problem(file, record, f"split {image_split!r} is not one of {', '.join(SPLITS)} "
                             "(leave the field out to split by a hash of the file name)", "image")
                return None
        name = entry["file_name"]
        relative = Path(name)
        if relative.is_absolute() or ".." in relative.parts:
            self.problem(file, record, "file_name escapes the dataset's image folder", "image")
            return None
        image_path = self.root / relative
        if not image_path.resolve().is_relative_to(self.root):
            self.problem(file, record, "file_name escapes the dataset's image folder (via a link)", "image")
            return None
        if not image_path.is_file():
            self.problem(file, record, f"image file {image_path} is missing", "image", unreadable_image=name)
            return None
        if name in self.seen_names:
            self.problem(file, record, f"file_name already used in {self.seen_names[name]}", "image")
            return None
        same = self.seen_files.get(image_path.resolve())
        if same is not None:  # `./page.jpg` and `page.jpg`: one file twice, in two splits a train/test leak
            self.problem(file, record, f"the same image file as {same[0]!r} in {same[1]} (two names for one file)",
                         "image")
            return None
        try:
            height, width = read_image_size(image_path)
        except ImageReadError as exc:
            self.problem(file, record, str(exc), "image", unreadable_image=name)
            return None
        message = _declared_size_problem(entry, height, width)
        if message:
            self.problem(file, record, message, "image")
            return None
        self.seen_names[name] = str(file)
        self.seen_files[image_path.resolve()] = (name, str(file))
        image_split = image_split or hash_split(name, self.fractions)
        return ImageRecord(entry["id"], name, image_path, height, width, image_split)

    def read_annotation(
        self, file: Path, ann: Any, images: dict[Any, ImageRecord], categories: dict[Any, str]
    ) -> None:
        if not isinstance(ann, dict) or "id" not in ann:
            self.problem(file, f"annotation {str(ann)[:60]}", "annotation without an 'id'", "object")
            return
        record = f"annotation id {ann['id']}"
        message = _id_problem("annotation id", ann["id"])
        if message:
            self.problem(file, f"annotation id {ann['id']!r}", message, "object")
            return
        if ann["id"] in self.seen_annotation_ids:
            first = self.seen_annotation_ids[ann["id"]]
            self.problem(file, record, f"duplicate annotation id (first in {first})", "object")
            return
        self.seen_annotation_ids[ann["id"]] = str(file)
        image = images.get(ann.get("image_id")) if _is_integer_id(ann.get("image_id")) else None
        if image is None:
            self.problem(file, record, f"image_id {ann.get('image_id')!r} is not a valid image of this file", "object")
            return
        record += f" (image {image.name})"
        if ann.get("iscrowd", 0):
            self.dataset.ignored_crowd += 1
            return
        category_id = ann.get("category_id")
        if _is_category_id(category_id) and category_id in self.ambiguous_categories:
            self.ambiguous_objects[category_id] += 1  # reported once, with the category
            return
        category = categories.get(category_id) if _is_category_id(category_id) else None
        if category is None:
            self.problem(file, record, f"category_id {ann.get('category_id')!r} is not in 'categories'", "object")
            return
        if "bbox" in ann:
            message = _bbox_problem(ann["bbox"], image.height, image.width)
            if message:
                self.problem(file, record, message, "object")
                return
        if "segmentation" not in ann:
            self.problem(file, record, "no segmentation (samcache trains on masks)", "object")
            return
        try:
            rle = masks.from_coco_segmentation(ann["segmentation"], image.height, image.width)
        except (ValueError, TypeError) as exc:
            self.problem(file, record, f"invalid segmentation: {exc}", "object")
            return
        if masks.area(rle) == 0:
            self.problem(file, record, "empty mask", "object")
            return
        image.objects.append(ObjectRecord(ann["id"], masks.bbox_xyxy(rle), rle, category))


def _is_integer_id(value: Any) -> bool:
    # COCO ids are integers; "7", 7.5, [7] or true would reach the cache's int64 columns (or crash) later.
    return isinstance(value, int) and not isinstance(value, bool)


def _id_problem(what: str, value: Any) -> Optional[str]:
    """What is wrong with an image or annotation id, if anything: it must be an integer the cache's
    int64 columns hold (a larger one would pass every check and fail only after embedding)."""
    if not _is_integer_id(value):
        return f"{what} must be an integer, got {value!r}"
    if not ID_MIN <= value <= ID_MAX:
        return f"{what} {value} does not fit in 64 bits (ids must lie in -2**63 .. 2**63-1)"
    return None


def _is_category_id(value: Any) -> bool:
    # Category ids only name categories, so strings are tolerated; a list or a dict would crash the lookup.
    return isinstance(value, (int, str)) and not isinstance(value, bool)


def _describe(value: Any) -> str:
    """A JSON value as a user would name it: "the string '742'", "the number 742.5", "true"."""
    if isinstance(value, str):
        return f"the string {value!r}"
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, float):
        return f"the number {value!r}"
    if isinstance(value, list):
        return "a list"
    return "an object" if isinstance(value, dict) else repr(value)


def _declared_size_problem(entry: dict, height: int, width: int) -> Optional[str]:
    """What is wrong with an image entry's `height` and `width` (either may be left out) against the file's size."""
    declared = {"height": entry.get("height"), "width": entry.get("width")}
    for key, value in declared.items():
        if value is not None and not _is_integer_id(value):
            return f"{key} is {_describe(value)}, not an integer"
    if declared["height"] in (None, height) and declared["width"] in (None, width):
        return None
    shown = "x".join("?" if v is None else str(v) for v in declared.values())
    return f"declared size {shown} but the file is {height}x{width}"


def _bbox_problem(bbox: Any, height: int, width: int) -> Optional[str]:
    if not (isinstance(bbox, (list, tuple)) and len(bbox) == 4
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox)):
        return f"bbox must be [x, y, width, height], got {bbox!r}"
    if not all(math.isfinite(v) for v in bbox):
        return f"bbox {list(bbox)} holds NaN or infinity"
    x, y, w, h = bbox
    if w <= 0 or h <= 0:
        return f"bbox {list(bbox)} has zero area"
    t = BOX_TOLERANCE_PX
    if x < -t or y < -t or x + w > width + t or y + h > height + t:
        return f"bbox {list(bbox)} lies outside the {width}x{height} image"
    return None
