"""The cache's columnar index: the small fields of every image, object, failure and removal as
numpy arrays, so that opening a cache costs O(shards) file reads and a few vectorised passes,
never a Python object per image (a 100k-image cache has 100k images and ~300k objects).

`Tables` holds the raw rows of some shards, concatenated in shard order; `resolve` turns them
into the cache's view (`View`): for each name the latest record wins (a later shard over an
earlier one; within a shard removals come first, then images, then failures), images sorted by
name. Mask encodings (RLE strings) and previews stay in the shards and are read on demand.

`CACHE/index.npz` stores the `Tables` of the shards it covers, with each shard's name, size and
mtime. It is derived data: a reader uses it for the shards it still matches and reads the
tables of any other shard (committed since, or by an older samcache) from the shard itself; a
missing or unreadable index only makes opening slower. Writers refresh it (`cache.py`).
Loading uses `np.load(allow_pickle=False)`: strings are fixed-width bytes, never objects.
"""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Optional

import numpy as np

INDEX_NAME = "index.npz"
INDEX_VERSION = 2  # 2: made_by

# Record kinds, in the order a shard's records apply.
_REMOVAL, _IMAGE, _FAILURE = 0, 1, 2


@dataclass
class Tables:
    """Rows of one or more shards. Strings are numpy fixed-width bytes (UTF-8)."""

    # images: one row per image record
    name: np.ndarray
    path: np.ndarray
    sha256: np.ndarray
    split: np.ndarray
    annotations_sha256: np.ndarray
    file_size: np.ndarray
    file_mtime_ns: np.ndarray
    image_id: np.ndarray
    original_size: np.ndarray  # (n, 2) int32: H, W
    input_size: np.ndarray  # (n, 2) int32
    object_start: np.ndarray  # into this Tables' objects
    object_count: np.ndarray
    image_shard: np.ndarray  # which shard (position in `shards`)
    image_row: np.ndarray  # row in that shard's images table (and embeddings)
    made_by: np.ndarray  # the shard's Provenance.made_by, e.g. b"bf16 by openvino"
    # objects: one row per object of those images
    object_id: np.ndarray
    box: np.ndarray  # (m, 4) float32
    category: np.ndarray
    object_row: np.ndarray  # row in its shard's objects table (for the RLE)
    # failures and removals
    failed_name: np.ndarray
    failed_path: np.ndarray
    failed_sha256: np.ndarray
    failed_error: np.ndarray
    failed_file_size: np.ndarray
    failed_file_mtime_ns: np.ndarray
    failed_shard: np.ndarray
    removed_name: np.ndarray
    removed_reason: np.ndarray
    removed_shard: np.ndarray

    @property
    def images(self) -> int:
        return len(self.name)

    @classmethod
    def concatenate(cls, parts: list["Tables"]) -> "Tables":
        """The rows of `parts` in order; object starts are shifted to the joined objects."""
        if not parts:
            return empty_tables()
        offsets = np.cumsum([0] + [len(p.object_id) for p in parts[:-1]])
        values = {}
        for f in fields(cls):
            arrays = [getattr(p, f.name) for p in parts]
            if f.name == "object_start":
                arrays = [a + o for a, o in zip(arrays, offsets)]
            values[f.name] = np.concatenate(arrays) if arrays[0].dtype.kind != "S" else _join_bytes(arrays)
        return cls(**values)

    def select_shards(self, keep: np.ndarray, new_position: np.ndarray) -> "Tables":
        """Only the rows of shards where `keep[shard]`, with shard numbers mapped to `new_position`."""
        images = keep[self.image_shard]
        objects = np.zeros(len(self.object_id), bool)
        kept_ranges = _ranges(self.object_start[images], self.object_count[images])
        objects[kept_ranges] = True
        new_start = np.cumsum(self.object_count[images]) - self.object_count[images]
        failures, removals = keep[self.failed_shard], keep[self.removed_shard]
        values = {}
        for f in fields(self):
            array = getattr(self, f.name)
            prefix = f.name.split("_")[0]
            if f.name in ("object_id", "box", "category", "object_row"):
                array = array[objects]
            elif prefix == "failed":
                array = array[failures]
            elif prefix == "removed":
                array = array[removals]
            else:
                array = array[images]
            values[f.name] = array
        values["object_start"] = new_start.astype(np.int64)
        for column in ("image_shard", "failed_shard", "removed_shard"):
            values[column] = new_position[values[column]].astype(np.int32)
        return Tables(**values)


def empty_tables() -> Tables:
    values = {}
    for f in fields(Tables):
        if f.name in ("original_size", "input_size"):
            values[f.name] = np.zeros((0, 2), np.int32)
        elif f.name == "box":
            values[f.name] = np.zeros((0, 4), np.float32)
        elif f.name in _STRING_COLUMNS:
            values[f.name] = np.zeros(0, "S1")
        elif f.name.endswith("_shard"):
            values[f.name] = np.zeros(0, np.int32)
        else:
            values[f.name] = np.zeros(0, np.int64)
    return Tables(**values)


_STRING_COLUMNS = {"name", "path", "sha256", "split", "annotations_sha256", "made_by", "category", "failed_name",
                   "failed_path", "failed_sha256", "failed_error", "removed_name", "removed_reason"}


def as_bytes(values) -> np.ndarray:
    """Strings (or bytes) as a fixed-width bytes array, UTF-8 encoded."""
    encoded = [v.encode("utf-8") if isinstance(v, str) else bytes(v) for v in values]
    return np.array(encoded, dtype=f"S{max((len(v) for v in encoded), default=0) or 1}")


def _join_bytes(arrays: list[np.ndarray]) -> np.ndarray:
    width = max(a.dtype.itemsize for a in arrays)
    return np.concatenate([a.astype(f"S{width}") for a in arrays])


def _ranges(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """The concatenation of arange(start, start + count) for each pair, without a Python loop."""
    counts = counts.astype(np.int64)
    total = int(counts.sum())
    if total == 0:
        return np.zeros(0, np.int64)
    ends = np.cumsum(counts)
    first = np.repeat(starts.astype(np.int64) - (ends - counts), counts)
    return first + np.arange(total, dtype=np.int64)


@dataclass
class View:
    """The cache as readers see it: `image` picks the latest image rows of `tables`, sorted by
    name; objects are gathered per image (`object_start` into `object`); the latest failures and
    removals by name; `superseded` counts image and failure records a later record replaced."""

    tables: Tables
    image: np.ndarray  # rows of tables' images, in name order
    object_start: np.ndarray  # per view image, into `object`
    object_count: np.ndarray
    object: np.ndarray  # rows of tables' objects
    failed: np.ndarray  # rows of tables' failures, in name order
    removed: np.ndarray  # rows of tables' removals, in name order
    superseded: int


def resolve(tables: Tables) -> View:
    """The latest record per name (see the module docstring)."""
    t = tables
    names = _join_bytes([t.name, t.failed_name, t.removed_name])
    kind = np.concatenate([np.full(t.images, _IMAGE), np.full(len(t.failed_name), _FAILURE),
                           np.full(len(t.removed_name), _REMOVAL)]).astype(np.int8)
    shard = np.concatenate([t.image_shard, t.failed_shard, t.removed_shard]).astype(np.int64)
    row = np.concatenate([np.arange(t.images), np.arange(len(t.failed_name)), np.arange(len(t.removed_name))])
    order = np.lexsort((row, kind, shard, names))  # by name, then by when the record applies
    sorted_names = names[order]
    last = np.ones(len(order), bool)
    last[:-1] = sorted_names[1:] != sorted_names[:-1]
    latest = order[last]
    latest_kind, latest_row = kind[latest], row[latest]
    image = latest_row[latest_kind == _IMAGE]
    replaceable = int(np.count_nonzero(kind != _REMOVAL))
    superseded = replaceable - int(np.count_nonzero(latest_kind != _REMOVAL))
    counts = t.object_count[image]
    return View(
        tables=t, image=image, object_start=(np.cumsum(counts) - counts).astype(np.int64), object_count=counts,
        object=_ranges(t.object_start[image], counts), failed=latest_row[latest_kind == _FAILURE],
        removed=latest_row[latest_kind == _REMOVAL], superseded=superseded,
    )


# ------------------------------------------------------------------------------ index.npz
@dataclass
class StoredIndex:
    """What index.npz holds: the tables of `shards` and each shard's (size, mtime_ns) then."""

    shards: list[str]
    stat: np.ndarray  # (len(shards), 2) int64
    tables: Tables


def load(cache_dir: Path) -> Optional[StoredIndex]:
    """The stored index, or None when there is none or it cannot be used (it is only a speed-up)."""
    path = Path(cache_dir) / INDEX_NAME
    try:
        with np.load(path, allow_pickle=False) as data:
            if int(data["version"]) != INDEX_VERSION:
                return None
            tables = Tables(**{f.name: data[f.name] for f in fields(Tables)})
            shards = [s.decode("utf-8") for s in data["shards"].tolist()]
            return StoredIndex(shards, data["shard_stat"], tables)
    except (OSError, KeyError, ValueError, TypeError, zipfile.BadZipFile):
        return None


def to_bytes(shards: list[str], stat: np.ndarray, tables: Tables) -> bytes:
    """index.npz's bytes (uncompressed: it loads at disk speed)."""
    buffer = io.BytesIO()
    np.savez(buffer, version=np.int64(INDEX_VERSION), shards=as_bytes(shards), shard_stat=stat.astype(np.int64),
             **{f.name: getattr(tables, f.name) for f in fields(Tables)})
    return buffer.getvalue()
