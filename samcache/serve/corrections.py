"""Corrections of a COCO dataset's annotations from `samcache serve`: an object added, replaced,
deleted or given another category, saved into the JSON file that holds its image.

Every edit names the version it was based on: the SHA-256 of the JSON file's bytes when they were
loaded. A file that changed since (another editor, an edit by hand) refuses the edit rather than
merging it. A save:
  1. takes the dataset's lock: a thread lock within this server, and an OS lock on
     `.samcache-annotations.lock` beside the JSON files against a second server;
  2. reads the file, checks its version, applies the edit;
  3. writes the bytes it read to `NAME.json.previous` (one previous version, replaced by each save;
     its name does not end in `.json`, so no reader takes it for a split file or a dataset), then
     the new file, atomically.
The new file keeps every other field, the key order and the layout (indent, separators) of the
one it replaces. Images are never touched, so the next `samcache embed` refreshes the edited
images' annotations from their stored embeddings without running the encoder.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
from filelock import FileLock, Timeout

from samcache.cache.format import read_followed_dataset
from samcache.data import masks
from samcache.data.coco import ID_MAX, default_image_root, find_split_files
from samcache.data.images import read_image_size
from samcache.data.maskdir import is_maskdir
from samcache.errors import DatasetError, ImageReadError, SamcacheError
from samcache.fileio import atomic_write_bytes, write_failure

PREVIOUS_SUFFIX = ".previous"
LOCK_NAME = ".samcache-annotations.lock"
# A save takes milliseconds; a lock held this long means another server is stuck, not busy.
LOCK_WAIT_SECONDS = 10.0


class CorrectionError(SamcacheError):
    """An edit refused, nothing written; `status` is its HTTP status (400: a bad mask, category or
    id; 404: no such image, or no such object on it; 503: another server holds the dataset)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


class StaleVersionError(CorrectionError):
    """The JSON file is no longer the version the edit was based on (HTTP 409)."""

    def __init__(self, message: str):
        super().__init__(message, status=409)


@dataclass(frozen=True)
class ImageAnnotations:
    """One image's annotations as its JSON file holds them now.

    Arguments:
      name: the image's `file_name`: the name the cache gives it.
      file: the JSON file that holds it.
      version: SHA-256 of that file's bytes; an edit based on them names it.
      height, width: the image's size, which every mask must have.
      objects: for each object samcache reads (crowd regions and invalid annotations left out):
        {"id", "category", "bbox" [x, y, w, h], "area", "segmentation" (COCO RLE, counts a string)}.
    """

    name: str
    file: Path
    version: str
    height: int
    width: int
    objects: list[dict]

    def to_json(self) -> dict:
        """What a client is sent (no path): {"image", "version", "width", "height", "objects"}."""
        return {"image": self.name, "version": self.version, "width": self.width, "height": self.height,
                "objects": self.objects}


@dataclass(frozen=True)
class Saved:
    """What a save did.

    Arguments:
      file: the JSON file written.
      previous: where the file as it was before is kept.
      version: the new file's version: the base of the next edit.
      object_id: the object edited (for an addition, the new object's id).
    """

    file: Path
    previous: Path
    version: str
    object_id: int

    def to_json(self) -> dict:
        """What a client is sent (no path): {"version", "object_id"}."""
        return {"version": self.version, "object_id": self.object_id}


@dataclass
class _Loaded:
    """A JSON file's bytes as read, and what they hold."""

    file: Path
    raw: bytes
    doc: dict

    @property
    def version(self) -> str:
        return hashlib.sha256(self.raw).hexdigest()


def previous_path(file: str | Path) -> Path:
    """Where a save keeps the version of `file` it replaced: `train.json` -> `train.json.previous`."""
    file = Path(file)
    return file.with_name(file.name + PREVIOUS_SUFFIX)


class Annotations:
    """The annotations of a COCO dataset, corrected image by image.

    Arguments:
      dataset: a COCO JSON file, or a folder of per-split COCO files (as `samcache embed` reads it).
      image_root: where `file_name`s are resolved (default: `images/` beside the JSON, as embed);
        read only for an image whose entry lacks its width and height.
    """

    def __init__(self, dataset: str | Path, *, image_root: Optional[str | Path] = None):
        path = Path(dataset)
        self.dataset = path
        self.files = _coco_files(path)
        self.image_root = Path(image_root) if image_root else default_image_root(path if path.is_dir() else path.parent)
        for file in self.files:  # an unreadable file stops the server at start, not at the first save
            try:
                _read(file)
            except CorrectionError as exc:
                raise DatasetError(str(exc)) from None
        self._thread_lock = threading.Lock()
        self._file_locks = [FileLock(str(folder / LOCK_NAME)) for folder in sorted({f.parent for f in self.files})]

    @classmethod
    def of_cache(cls, cache_dir: str | Path, dataset: Optional[str | Path] = None, *,
                 image_root: Optional[str | Path] = None) -> "Annotations":
        """`dataset`'s annotations, or by default those of the dataset the cache at `cache_dir` follows
        (the one `samcache embed` last read into it)."""
        if dataset is None:
            followed = read_followed_dataset(cache_dir)
            if followed is None:
                raise DatasetError(f"{cache_dir} does not record which dataset it was embedded from: name the "
                                   "dataset to correct (--dataset)")
            dataset = followed["path"]
        return cls(dataset, image_root=image_root)

    # ------------------------------------------------------------------ reading
    def load(self, image: str) -> ImageAnnotations:
        """The image's objects and the version of the file that holds them, from the same bytes."""
        loaded, entry = self._find(image)
        height, width = self._size(loaded.file, entry)
        anns = [a for a in _annotations(loaded) if isinstance(a, dict) and a.get("image_id") == entry["id"]]
        names = _category_names(loaded.doc)
        objects = [obj for obj in (_object(a, names, height, width) for a in anns) if obj is not None]
        return ImageAnnotations(image, loaded.file, loaded.version, height, width, objects)

    def version(self, image: str) -> str:
        """SHA-256 of the bytes of the JSON file that holds `image`: the base an edit names."""
        return self.load(image).version

    def objects(self, image: str) -> list[dict]:
        """The image's objects (see `ImageAnnotations.objects`)."""
        return self.load(image).objects

    # ------------------------------------------------------------------ editing
    def add_object(self, image: str, mask: np.ndarray | dict, category: str, *, version: str) -> Saved:
        """Adds a new object to `image`, with an annotation id no file of the dataset uses.

        Arguments:
          image: the image's name (its `file_name`).
          mask: a bool array of the image's height x width, or its COCO RLE (as `predict` answers).
          category: a category's name: an existing category's id, or a new category appended.
          version: the version the edit was based on (`load(image).version`).
        Returns the save, whose `object_id` is the new object's.
        """
        category = _category_name(category)
        with self._editing(image, version) as (loaded, entry):
            fields = _mask_fields(mask, *self._size(loaded.file, entry))
            object_id = self._fresh_object_id(loaded)
            _annotations(loaded).append({"id": object_id, "image_id": entry["id"],
                                         "category_id": _category_id(loaded.doc, category), **fields, "iscrowd": 0})
            return self._save(loaded, object_id)

    def replace_object(self, image: str, object_id: int, mask: np.ndarray | dict, *,
                       version: str) -> Saved:
        """Gives object `object_id` of `image` the mask `mask` (as in `add_object`): its segmentation,
        area and bbox change, its id, category and other fields stay."""
        with self._editing(image, version) as (loaded, entry):
            fields = _mask_fields(mask, *self._size(loaded.file, entry))
            _annotation(loaded, entry, object_id).update(fields)
            return self._save(loaded, object_id)

    def delete_object(self, image: str, object_id: int, *, version: str) -> Saved:
        """Removes object `object_id` of `image` (its category stays listed)."""
        with self._editing(image, version) as (loaded, entry):
            annotation = _annotation(loaded, entry, object_id)
            anns = _annotations(loaded)
            anns.pop(next(i for i, a in enumerate(anns) if a is annotation))
            return self._save(loaded, object_id)

    def set_category(self, image: str, object_id: int, category: str, *, version: str) -> Saved:
        """Gives object `object_id` of `image` the category named `category` (a new one if no
        category has that name)."""
        category = _category_name(category)
        with self._editing(image, version) as (loaded, entry):
            annotation = _annotation(loaded, entry, object_id)
            annotation["category_id"] = _category_id(loaded.doc, category)
            return self._save(loaded, object_id)

    # ------------------------------------------------------------------ internals
    def _find(self, image: Any) -> tuple[_Loaded, dict]:
        """The file holding `image` and its entry, the first in the order embed reads them."""
        if not isinstance(image, str) or not image:
            raise CorrectionError(f"image must be an image's name (its file_name), got {image!r}")
        for file in self.files:
            loaded = _read(file)
            for entry in loaded.doc["images"]:
                if isinstance(entry, dict) and entry.get("file_name") == image and "id" in entry:
                    return loaded, entry
        shown = ", ".join(f.name for f in self.files)
        raise CorrectionError(f"no image {image!r} in the annotations of {self.dataset} ({shown})", status=404)

    def _size(self, file: Path, entry: dict) -> tuple[int, int]:
        height, width = entry.get("height"), entry.get("width")
        if _is_int(height) and _is_int(width):
            return height, width
        try:
            return read_image_size(self.image_root / entry["file_name"])
        except ImageReadError as exc:
            raise CorrectionError(f"{file}: image {entry['file_name']!r} gives no width and height and its file "
                                  f"cannot be read ({exc})", status=404) from None

    @contextmanager
    def _editing(self, image: str, version: Any) -> Iterator[tuple[_Loaded, dict]]:
        """The file holding `image`, read under the dataset's lock and checked against `version`."""
        if not isinstance(version, str) or not version:
            raise CorrectionError("an edit names the version it was based on (the version its image was loaded "
                                  f"with), got {version!r}")
        with self._locked():
            loaded, entry = self._find(image)
            if loaded.version != version:
                raise StaleVersionError(
                    f"{loaded.file} changed since image {image!r} was loaded (another editor, or an edit by hand): "
                    "nothing was saved; load the image again and redo the edit")
            yield loaded, entry

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with self._thread_lock, ExitStack() as stack:
            for lock in self._file_locks:
                try:
                    lock.acquire(timeout=LOCK_WAIT_SECONDS)
                except Timeout:
                    raise CorrectionError(f"another process has held {lock.lock_file} for over "
                                          f"{LOCK_WAIT_SECONDS:.0f} s while saving annotations; try again",
                                          status=503) from None
                except OSError as exc:
                    raise write_failure(lock.lock_file, exc) from exc
                stack.callback(lock.release)
            yield

    def _fresh_object_id(self, loaded: _Loaded) -> int:
        """One more than the largest annotation id of any of the dataset's files: embed refuses an id
        used twice, across files too."""
        ids = [a.get("id") for a in _annotations(loaded) if isinstance(a, dict)]
        for file in self.files:
            if file != loaded.file:
                ids += [a.get("id") for a in _annotations(_read(file)) if isinstance(a, dict)]
        fresh = max((i for i in ids if _is_int(i)), default=0) + 1
        if fresh > ID_MAX:
            raise CorrectionError(f"{loaded.file}: annotation ids reach {ID_MAX}; no fresh id fits in 64 bits")
        return fresh

    def _save(self, loaded: _Loaded, object_id: int) -> Saved:
        """The previous version beside the file, then the new file, each atomically."""
        data = _dumps_like(loaded.doc, loaded.raw)
        previous = previous_path(loaded.file)
        atomic_write_bytes(previous, loaded.raw)
        atomic_write_bytes(loaded.file, data)
        return Saved(loaded.file, previous, hashlib.sha256(data).hexdigest(), object_id)


def _coco_files(path: Path) -> list[Path]:
    """The dataset's COCO files, in the order embed reads them; DatasetError for anything else."""
    if not path.exists():
        raise DatasetError(f"dataset {path} does not exist")
    if path.is_file() and path.suffix.lower() == ".json":
        return [path]
    if path.is_dir() and find_split_files(path):
        return list(find_split_files(path).values())
    if path.is_dir() and is_maskdir(path):
        raise DatasetError(f"{path} is a mask-folder dataset: corrections are saved into COCO annotations, so they "
                           "need a COCO dataset (a .json file, or a folder with train.json/val.json/test.json)")
    raise DatasetError(f"{path} is not a COCO dataset: corrections need a COCO .json file or a folder with "
                       "train.json/val.json/test.json")


def _read(file: Path) -> _Loaded:
    try:
        raw = file.read_bytes()
        doc = json.loads(raw.decode("utf-8"))
    except FileNotFoundError:
        raise CorrectionError(f"{file} is gone (moved or deleted since the server started)", status=404) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorrectionError(f"{file}: not a readable JSON file ({exc}); fix it, then load the image again",
                              status=409) from None
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list) or not isinstance(
            doc.get("annotations", []), list):
        raise CorrectionError(f"{file}: not a COCO instances file (an 'images' and an 'annotations' list)",
                              status=409)
    return _Loaded(file, raw, doc)


def _annotations(loaded: _Loaded) -> list:
    return loaded.doc.setdefault("annotations", [])


def _annotation(loaded: _Loaded, entry: dict, object_id: Any) -> dict:
    """The annotation `object_id` of the image `entry`; CorrectionError when the image has none."""
    if not _is_int(object_id):
        raise CorrectionError(f"an object id is an integer (the annotation's id), got {object_id!r}")
    found = next((a for a in _annotations(loaded) if isinstance(a, dict) and a.get("id") == object_id
                  and _is_int(a.get("id"))), None)
    if found is None:
        raise CorrectionError(f"image {entry['file_name']!r} has no object {object_id} ({loaded.file})", status=404)
    if found.get("image_id") != entry["id"]:
        owner = next((e.get("file_name") for e in loaded.doc["images"]
                      if isinstance(e, dict) and e.get("id") == found.get("image_id")), found.get("image_id"))
        raise CorrectionError(f"object {object_id} belongs to image {owner!r}, not {entry['file_name']!r} "
                              f"({loaded.file}); nothing was saved", status=404)
    return found


def _object(annotation: Any, names: dict, height: int, width: int) -> Optional[dict]:
    """The object as the editor shows it, or None for one embed would not read."""
    if not isinstance(annotation, dict) or not _is_int(annotation.get("id")) or annotation.get("iscrowd", 0):
        return None
    category = names.get(_hashable(annotation.get("category_id")))
    if category is None:
        return None
    try:
        rle = masks.from_coco_segmentation(annotation.get("segmentation"), height, width)
    except (ValueError, TypeError):
        return None
    area = masks.area(rle)
    if area == 0:
        return None
    x0, y0, x1, y1 = masks.bbox_xyxy(rle)
    return {"id": annotation["id"], "category": category, "bbox": [int(x0), int(y0), int(x1 - x0), int(y1 - y0)],
            "area": area, "segmentation": rle}


def _category_names(doc: dict) -> dict:
    """{category id: name} for the ids given exactly one name (embed skips the objects of the others)."""
    names: dict = {}
    for entry in doc.get("categories", []) if isinstance(doc.get("categories"), list) else []:
        if isinstance(entry, dict) and "id" in entry:
            key = _hashable(entry["id"])
            names.setdefault(key, set()).add(str(entry.get("name", entry["id"])))
    return {key: next(iter(n)) for key, n in names.items() if len(n) == 1 and key is not None}


def _category_id(doc: dict, name: str) -> Any:
    """The id of the category called `name`, or of a new one appended with the next free integer id."""
    for key, known in _category_names(doc).items():
        if known == name:
            return key
    categories = doc.setdefault("categories", [])
    if not isinstance(categories, list):
        raise CorrectionError(f"'categories' is not a list, so category {name!r} cannot be added")
    ids = [c.get("id") for c in categories if isinstance(c, dict)]
    new_id = max((i for i in ids if _is_int(i)), default=0) + 1
    categories.append({"id": new_id, "name": name})
    return new_id


def _category_name(category: Any) -> str:
    if not isinstance(category, str) or not category.strip():
        raise CorrectionError(f"a category is a non-empty name, got {category!r}")
    return category


def _mask_fields(mask: Any, height: int, width: int) -> dict:
    """segmentation (COCO RLE, counts a string), area and bbox [x, y, w, h] of a checked mask."""
    if isinstance(mask, dict):
        mask = _decoded(mask, height, width)
    if not isinstance(mask, np.ndarray) or not (mask.dtype == bool or np.issubdtype(mask.dtype, np.integer)):
        raise CorrectionError("a mask is a boolean array of the image's height x width, or its COCO RLE")
    if mask.shape != (height, width):
        raise CorrectionError(f"the mask is {'x'.join(map(str, mask.shape))} but the image is {height}x{width} "
                              "(height x width)")
    if not mask.any():
        raise CorrectionError("the mask is empty: delete the object instead, or draw its mask")
    rle = masks.encode(mask != 0)
    x0, y0, x1, y1 = masks.bbox_xyxy(rle)
    return {"segmentation": rle, "area": masks.area(rle), "bbox": [int(x0), int(y0), int(x1 - x0), int(y1 - y0)]}


def _decoded(segmentation: dict, height: int, width: int) -> np.ndarray:
    """A client's COCO RLE as a bool array, its size checked before it is decoded."""
    size = segmentation.get("size")
    if isinstance(size, list) and len(size) == 2 and size != [height, width]:
        raise CorrectionError(f"the mask is {size[0]}x{size[1]} but the image is {height}x{width} (height x width)")
    try:
        return masks.decode(masks.from_coco_segmentation(segmentation, height, width))
    except (ValueError, TypeError) as exc:
        raise CorrectionError(f"the mask is not a valid COCO RLE: {exc}") from None


def _dumps_like(doc: dict, raw: bytes) -> bytes:
    """`doc` as JSON laid out like `raw`: its indent (or none), separators, ASCII escapes and final newline."""
    text = raw.decode("utf-8")
    indent = re.match(r"\s*[\[{][ \t]*\r?\n([ \t]*)\S", text)
    colon = re.match(r'\s*\{\s*"(?:[^"\\]|\\.)*"([ \t]*:[ \t]*)', text)
    key_separator = colon.group(1) if colon else ": "
    item_separator = "," if indent or not key_separator.endswith(" ") else ", "
    out = json.dumps(doc, indent=indent.group(1) if indent else None, separators=(item_separator, key_separator),
                     ensure_ascii=text.isascii())
    return (out + "\n" if text.endswith("\n") else out).encode("utf-8")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _hashable(value: Any) -> Any:
    # Category ids may be integers or strings (as embed reads them); anything else names nothing.
    return value if isinstance(value, (int, str)) and not isinstance(value, bool) else None
