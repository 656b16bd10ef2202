"""Reading a cache: `EmbeddingCache`.

Readers load the small per-image and per-object tables into memory at open as numpy columns
(from index.npz, plus the tables of shards it does not cover), and read embeddings, previews and
mask encodings lazily through h5py handles opened in the process that uses them, so a reader
can be handed to DataLoader workers (h5py handles do not survive a fork).
"""

from __future__ import annotations

import json
import os
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import h5py
import numpy as np

from samcache.cache import index as cache_index
from samcache.cache.format import (
    DAMAGED_REMOVAL,
    HEADER_NAME,
    FailedEntry,
    ImageInfo,
    Provenance,
    provenance_from_dict,
    read_header,
    shard_paths,
    text,
)
from samcache.config import SPLITS
from samcache.data import masks
from samcache.data.records import ObjectRecord
from samcache.data.views import View, parse_views
from samcache.errors import CacheError
from samcache.fileio import FileIdentity, atomic_write_bytes
from samcache.models.feature_layout import CacheLayout
from samcache.models.specs import IMAGE_SIZE

DAMAGED_DIR = "damaged"
"""Where `samcache verify` moves the shards it cannot read (CACHE/damaged/NAME): out of the cache, never deleted."""
CHECKED_MASKS_CHARS = 64 * 2**20
"""How many characters of checked mask encodings a reader keeps (about 64 MiB of strings)."""


def _worker_message(message: str, error: type) -> str:
    """`message`, or when a DataLoader worker raised `error`, the message it raised it with: torch
    raises it again in the main process as error("Caught ... Original Traceback ...: message"),
    which the command line would print whole, traceback included."""
    marker = f"{error.__module__}.{error.__qualname__}: "
    if message.startswith("Caught ") and marker in message:
        return message.rsplit(marker, 1)[1].strip()
    return message


class DamagedImageError(CacheError):
    """An image's record is damaged: its embedding fails its checksum or holds non-finite values,
    a mask encoding or its preview does not decode. `image`, `shard` and `problem` say which and
    why (not when a DataLoader worker raised it: then only the message is known)."""

    image, shard, problem = "", None, ""

    def __init__(self, message: str):
        super().__init__(_worker_message(message, type(self)))

    @classmethod
    def for_image(cls, cache: "EmbeddingCache", index: int, problem: str, *, part: str = "the embedding"):
        """The error for `part` of image `index`; `problem` names the column and says what is wrong."""
        shard, _ = cache.location(index)
        error = cls(f"{cache.cache_dir}: {part} of {cache.name_of(index)} in shard {shard.name} is damaged "
                    f"({problem}). Run `samcache verify {cache.cache_dir}` to find every damaged image and take them "
                    "out of the cache, then `samcache embed` again to embed them anew")
        error.image, error.shard, error.problem = cache.name_of(index), shard, problem
        return error


class DamagedShardError(CacheError):
    """A shard cannot be read (cut short, its header overwritten) or holds bad values in its
    tables. `shard` and `problem` say which and why (not when a DataLoader worker raised it)."""

    shard, problem = None, ""

    def __init__(self, message: str):
        super().__init__(_worker_message(message, type(self)))

    @classmethod
    def for_shard(cls, cache_dir: Path, shard: Path, problem: str):
        """The error for `shard`; `problem` reads after "the shard": "is unreadable: ..."."""
        error = cls(f"shard {shard} {problem}. Run `samcache verify {cache_dir}` to move it out of the cache "
                    f"(into {Path(cache_dir) / DAMAGED_DIR}/), then `samcache embed` again to embed its images anew")
        error.shard, error.problem = Path(shard), problem
        return error


class EmbeddingCache:
    """A read-only view of a cache: all committed shards as one dataset, images sorted by name.

    Opening reads the columnar index (`cache_index`, index.npz) plus the tables of shards it does
    not cover: O(shards) file operations and vectorised passes, no Python object per image.
    `images[i]` builds an `ImageInfo` on demand (its mask encodings read from the shard);
    whole-cache questions (`annotated_indices`, `splits`, `info`) are answered from the columns.
    Forked DataLoader workers share the columns without copying them (numpy arrays, no
    reference counts on every row).

    Arguments:
      cache_dir: the cache folder.
      leave_out: names of shards to read as if they were not there (`verify --check-only` goes on
        past the shards it cannot read).
    """

    def __init__(self, cache_dir: str | Path, *, leave_out: Collection[str] = ()):
        self.cache_dir = Path(cache_dir)
        self.provenance = read_header(self.cache_dir)
        self.shards = [p for p in shard_paths(self.cache_dir) if p.name not in leave_out]
        self._shard_stat = np.array([(st.st_size, st.st_mtime_ns) for st in (p.stat() for p in self.shards)],
                                    np.int64).reshape(-1, 2)
        self.tables, self.shards_outside_index = self._load_tables()
        view = cache_index.resolve(self.tables)
        t, rows = self.tables, view.image
        self.superseded = view.superseded
        # The columns of the view's images, in name order (what readers index by).
        self.names = t.name[rows]
        self.split_column = t.split[rows]
        self.object_count = view.object_count
        self.object_start = view.object_start
        self._rows, self._objects = rows, view.object
        self._location = np.stack([t.image_shard[rows], t.image_row[rows]], axis=1).astype(np.int64)
        self.failed: list[FailedEntry] = [
            FailedEntry(text(t.failed_name[r]),
                        FileIdentity(text(t.failed_path[r]), text(t.failed_sha256[r]), int(t.failed_file_size[r]),
                                     int(t.failed_file_mtime_ns[r])),
                        text(t.failed_error[r]))
            for r in view.failed
        ]
        # name -> why it left the cache (the latest record)
        self.removed: dict[str, str] = {text(t.removed_name[r]): text(t.removed_reason[r]) for r in view.removed}
        self._handles: dict[int, h5py.File] = {}
        self._pid = os.getpid()
        self._earlier: Optional[dict[str, list[int]]] = None  # name -> hidden image rows (earlier_record)
        # index -> its objects' checked mask encodings: training reads every image's each epoch, and
        # the shards a reader opened do not change under it. Bounded, so a huge cache cannot fill memory.
        self._checked_masks: dict[int, list[str]] = {}
        self._checked_chars_left = CHECKED_MASKS_CHARS

    def __len__(self) -> int:
        return len(self.names)

    @property
    def images(self) -> "_Images":
        """The images as `ImageInfo`s, built when indexed (a property: no reference cycle keeps
        a closed-over cache, and its open shard handles, alive)."""
        return _Images(self)

    def _load_tables(self) -> tuple["cache_index.Tables", int]:
        """The stored index's tables for the shards it still matches, plus every other shard's own."""
        position = {p.name: i for i, p in enumerate(self.shards)}
        parts, covered = [], np.zeros(len(self.shards), bool)
        stored = cache_index.load(self.cache_dir)
        if stored is not None:
            keep = np.zeros(len(stored.shards), bool)
            new_position = np.zeros(len(stored.shards), np.int64)
            for k, name in enumerate(stored.shards):
                i = position.get(name)
                if i is not None and (stored.stat[k] == self._shard_stat[i]).all():
                    keep[k], new_position[k], covered[i] = True, i, True
            parts.append(stored.tables.select_shards(keep, new_position))
        for i in np.flatnonzero(~covered):
            parts.append(read_shard_tables(self.cache_dir, self.shards[i], self.provenance, position=int(i)))
        return cache_index.Tables.concatenate(parts), int(np.count_nonzero(~covered))

    def save_index(self) -> None:
        """Writes index.npz for the shards this view read (writers call it, holding the lock)."""
        atomic_write_bytes(self.cache_dir / cache_index.INDEX_NAME,
                           cache_index.to_bytes([p.name for p in self.shards], self._shard_stat, self.tables))
        self.shards_outside_index = 0

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_handles"] = {}  # h5py handles never cross a process boundary
        return state

    def index_of(self, name: str) -> Optional[int]:
        key = name.encode("utf-8")
        i = int(np.searchsorted(self.names, key))
        return i if i < len(self.names) and self.names[i] == key else None

    def name_of(self, index: int) -> str:
        return text(self.names[index])

    def location(self, index: int) -> tuple[Path, int]:
        """The shard that holds image `index`, and its row there."""
        shard_index, row = self._location[index]
        return self.shards[int(shard_index)], int(row)

    def file_of(self, index: int) -> FileIdentity:
        """Which file image `index` was embedded from, with which content."""
        t, r = self.tables, self._rows[index]
        return FileIdentity(text(t.path[r]), text(t.sha256[r]), int(t.file_size[r]), int(t.file_mtime_ns[r]))

    def sizes_of(self, index: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """(original (H, W), input (h, w)) of image `index`, from the columns (no shard read)."""
        t, r = self.tables, self._rows[index]
        return (int(t.original_size[r, 0]), int(t.original_size[r, 1])), (int(t.input_size[r, 0]),
                                                                          int(t.input_size[r, 1]))

    def categories_of(self, index: int) -> list[str]:
        """The distinct categories of image `index`'s objects, sorted, from the columns (no shard read)."""
        start, count = int(self.object_start[index]), int(self.object_count[index])
        return sorted({text(c) for c in self.tables.category[self._objects[start : start + count]]})

    def annotations_sha256_of(self, index: int) -> str:
        return text(self.tables.annotations_sha256[self._rows[index]])

    def index_by_sha256(self) -> dict[str, int]:
        """{SHA-256 of the image file: index} (predict finds cached embeddings of its inputs by content)."""
        return {text(sha): i for i, sha in enumerate(self.tables.sha256[self._rows]) if sha}

    def annotated_indices(self, split: str) -> list[int]:
        """The images of `split` that have at least one object (what training and evaluation use)."""
        return np.flatnonzero((self.split_column == split.encode()) & (self.object_count > 0)).tolist()

    def describe_splits(self) -> str:
        """'train (91 objects), val (18 objects)': for messages that name the splits there are."""
        return ", ".join(f"{k} ({v['objects']} objects)" for k, v in self.splits.items()) or "none"

    @property
    def splits(self) -> dict[str, dict[str, int]]:
        names, codes = np.unique(self.split_column, return_inverse=True)
        images = np.bincount(codes, minlength=len(names))
        objects = np.bincount(codes, weights=self.object_count, minlength=len(names))
        return {text(n): {"images": int(i), "objects": int(o)} for n, i, o in zip(names, images, objects)}

    def embedding(self, index: int) -> np.ndarray:
        """The decoder's input for image `index`, float16, read from disk and checked: every stored
        map's Fletcher32 checksum (HDF5 verifies it on read) and finite values; DamagedImageError
        else. SAM: the (256, 64, 64) embedding; SAM 2.1: its three maps packed into (1024, 64, 64)
        (feature_layout.py)."""
        layout = self.provenance.layout
        return layout.decoder_input(self._maps(index, layout.decoder_maps))

    def tail_tokens(self, index: int) -> np.ndarray:
        """The encoder's tokens before its last K blocks (C, 64, 64) float16, checked as `embedding`
        (a cache made with `embed --tail-blocks K`; CacheError for one without)."""
        self._require_tail_tokens()
        return self._maps(index, ("tail_tokens",))["tail_tokens"]

    def _require_tail_tokens(self) -> None:
        if not self.provenance.tail_blocks:
            raise CacheError(f"{self.cache_dir} holds no tail tokens: make a cache with `samcache embed "
                             "--tail-blocks K` to train the encoder's last blocks")

    def features(self, index: int, which: str, view: int = 0) -> np.ndarray:
        """`embedding(index)` for which="embedding", `tail_tokens(index)` for which="tail_tokens"; of
        the image's view number `view` (1..V, `views`) instead of the original when `view` > 0."""
        if not view:
            return self.tail_tokens(index) if which == "tail_tokens" else self.embedding(index)
        if which == "tail_tokens":
            self._require_tail_tokens()
        layout = self.provenance.layout
        names = ("tail_tokens",) if which == "tail_tokens" else layout.decoder_maps
        stored = self._maps(index, tuple(f"view_{n}" for n in names))
        picked = {n: stored[f"view_{n}"][view - 1] for n in names}
        return picked["tail_tokens"] if which == "tail_tokens" else layout.decoder_input(picked)

    @property
    def views(self) -> tuple[View, ...]:
        """The views each image holds besides the original (`embed --views`), in stored order: view
        number v is views[v - 1]."""
        return parse_views(list(self.provenance.views)) if self.provenance.views else ()

    def feature_shape(self, which: str) -> tuple[int, int, int]:
        """The shape `features(index, which)` returns."""
        layout = self.provenance.layout
        return layout.tail_shape if which == "tail_tokens" else layout.decoder_shape

    def stored_features(self, index: int) -> np.ndarray:
        """Everything stored for image `index`, as the encoder gave it (what a shard writer's `add`
        takes), checked as `embedding`."""
        layout = self.provenance.layout
        return layout.from_stored(self._maps(index, tuple(layout.stored_maps)))

    def _maps(self, index: int, names: tuple[str, ...]) -> dict[str, np.ndarray]:
        shard_index, row = self._location[index]
        return self._maps_at(int(shard_index), int(row), names,
                             lambda problem: DamagedImageError.for_image(self, index, problem))

    def _maps_at(self, shard_index: int, row: int, names: tuple[str, ...], damaged) -> dict[str, np.ndarray]:
        handle, maps = self._handle(shard_index), {}
        for name in names:
            try:
                maps[name] = handle[name][row]
            except OSError as exc:  # h5py reports a checksum mismatch as a failed read
                raise damaged(f"checksum mismatch in {name} ({_first_line(exc)})") from exc
            except KeyError as exc:
                raise damaged(f"{name} is missing from the shard") from exc
            if not np.isfinite(maps[name]).all():
                raise damaged(f"non-finite values in {name}")
        return maps

    def earlier_record(self, name: str, path: str | Path) -> Optional["EarlierRecord"]:
        """The latest stored record of `name` that the view no longer shows (the dataset dropped the
        image, or put other pixels under its name) made from the very file at `path` (same
        content): its embedding can come back without the encoder. None when there is none."""
        if self._earlier is None:
            t = self.tables
            hidden = np.ones(t.images, bool)
            hidden[self._rows] = False
            rows = np.flatnonzero(hidden)
            # latest first: shards sort by when they were written, rows within a shard by name
            rows = rows[np.lexsort((t.image_row[rows], t.image_shard[rows]))][::-1]
            self._earlier = {}
            for r in rows:
                self._earlier.setdefault(text(t.name[r]), []).append(int(r))
        if self.removed.get(name, "").startswith(DAMAGED_REMOVAL):
            return None  # verify took it out: embed it anew
        t = self.tables
        for r in self._earlier.get(name, []):
            file = FileIdentity(text(t.path[r]), text(t.sha256[r]), int(t.file_size[r]), int(t.file_mtime_ns[r]))
            if file.sha256 and file.unchanged(path):
                return EarlierRecord(self, r, file)
        return None

    def _preview_at(self, shard_index: int, row: int) -> bytes:
        return np.asarray(self._handle(shard_index)["images/preview_jpeg"][row], np.uint8).tobytes()

    def preview_bytes(self, index: int) -> bytes:
        """The image's preview JPEG as stored (unchecked: `preview` decodes it)."""
        shard_index, row = self._location[index]
        try:
            value = self._handle(int(shard_index))["images/preview_jpeg"][int(row)]
        except (OSError, KeyError) as exc:
            raise DamagedImageError.for_image(
                self, index, f"images/preview_jpeg row {row} is unreadable ({_first_line(exc)})",
                part="the preview") from exc
        return np.asarray(value, np.uint8).tobytes()

    def preview(self, index: int) -> np.ndarray:
        """The image's preview as RGB uint8 (longest side PREVIEW_SIZE), decoded from the cache;
        DamagedImageError when it is not a whole JPEG."""
        import cv2

        data = self.preview_bytes(index)
        # libjpeg decodes a JPEG cut short into a grey-filled image, with only a warning.
        bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) if _is_whole_jpeg(data) else None
        if bgr is None:
            row = int(self._location[index][1])
            raise DamagedImageError.for_image(
                self, index, f"images/preview_jpeg row {row}: {len(data)} bytes that are not a whole JPEG",
                part="the preview")
        return bgr[..., ::-1].copy()

    def image_info(self, index: int) -> ImageInfo:
        """Everything about image `index`; its objects' mask encodings are read from its shard and
        checked (DamagedImageError when one is not a mask of the image's size)."""
        t, r = self.tables, int(self._rows[index])
        start, count = int(self.object_start[index]), int(self.object_count[index])
        objects_rows = self._objects[start : start + count]
        h, w = (int(v) for v in t.original_size[r])
        rles = self._mask_encodings(index, objects_rows, (h, w)) if count else []
        objects = [ObjectRecord(object_id=int(t.object_id[j]), box=tuple(float(v) for v in t.box[j]),
                                rle={"size": [h, w], "counts": rle}, category=text(t.category[j]))
                   for j, rle in zip(objects_rows, rles)]
        return ImageInfo(
            image_id=int(t.image_id[r]), name=text(t.name[r]), file=self.file_of(index), original_size=(h, w),
            split=text(t.split[r]), objects=objects, input_size=(int(t.input_size[r, 0]), int(t.input_size[r, 1])),
            annotations_sha256=text(t.annotations_sha256[r]), index=index,
        )

    def _mask_encodings(self, index: int, objects: np.ndarray, size: tuple[int, int]) -> list[str]:
        """The RLE strings of `objects` (rows of the tables' objects) of image `index`, each checked
        to decode to a mask of `size`: a damaged one is a message naming it here, never a crash
        where it is decoded (a DataLoader worker, say). Read and checked once per reader, up to
        CHECKED_MASKS_CHARS characters in all."""
        known = self._checked_masks.get(index)
        if known is not None:
            return known
        counts = self._read_mask_encodings(index, objects, size)
        chars = sum(len(c) for c in counts)
        if chars <= self._checked_chars_left:
            self._checked_masks[index] = counts
            self._checked_chars_left -= chars
        return counts

    def _read_mask_encodings(self, index: int, objects: np.ndarray, size: tuple[int, int]) -> list[str]:
        shard_rows = self.tables.object_row[objects]
        first, last = int(shard_rows[0]), int(shard_rows[-1]) + 1  # an image's objects are contiguous in its shard
        try:
            values = self._handle(int(self._location[index][0]))["objects/rle_counts"][first:last]
        except (OSError, KeyError) as exc:
            raise DamagedImageError.for_image(
                self, index, f"objects/rle_counts rows {first}..{last - 1} are unreadable ({_first_line(exc)})",
                part="the mask encodings") from exc
        counts = []
        for j, row in zip(objects, shard_rows):
            value = values[int(row) - first]
            try:
                rle = value.decode("ascii") if isinstance(value, bytes) else str(value)
                masks.from_coco_segmentation({"size": list(size), "counts": rle}, *size)
            except ValueError as exc:  # UnicodeDecodeError included
                raise DamagedImageError.for_image(
                    self, index, f"objects/rle_counts row {row}, object {int(self.tables.object_id[j])}: "
                                 f"not a mask of the {size[1]}x{size[0]} image ({exc})",
                    part="a mask encoding") from exc
            counts.append(rle)
        return counts

    def info(self) -> dict:
        """The summary `samcache info` prints, as plain JSON types."""
        size = self.bytes_on_disk()
        categories, counts = np.unique(self.tables.category[self._objects], return_counts=True)
        return {
            "cache": str(self.cache_dir),
            "schema_version": self.provenance.layout.schema_version,
            "model_family": self.provenance.layout.name,
            "images": len(self),
            "objects": int(self.object_count.sum()),
            "splits": self.splits,
            "categories": {text(c): int(n) for c, n in zip(categories, counts)},
            "model_type": self.provenance.model_type,
            "weights_sha256": self.provenance.weights_sha256,
            "weights_source": self.provenance.weights_source,
            "embedding_dtype": self.provenance.embedding_dtype,
            "stored_maps": {name: list(shape) for name, shape in self.provenance.layout.stored_maps.items()},
            "embedding_shape": list(self.provenance.layout.stored_maps["embeddings"]),
            "tail_blocks": self.provenance.tail_blocks,
            "views": list(self.provenance.views),
            # per image, from its shard: a cache extended later with another backend says so
            "computed": {text(m): int(n) for m, n in zip(*np.unique(self.tables.made_by[self._rows],
                                                                      return_counts=True))},
            "intensity": self.provenance.intensity,
            "samcache_version": self.provenance.samcache_version,
            "shards": len(self.shards),
            "superseded_records": self.superseded,
            "removed": len(self.removed),
            "bytes_on_disk": size,
            "bytes_per_image": size / len(self) if len(self) else 0.0,
            "failed": [{"name": f.name, "path": f.file.path, "error": f.error} for f in self.failed],
        }

    def bytes_on_disk(self) -> int:
        return int(self._shard_stat[:, 0].sum()) + (self.cache_dir / HEADER_NAME).stat().st_size

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles = {}

    def _handle(self, shard_index: int) -> h5py.File:
        if self._pid != os.getpid():  # forked into a worker: start with fresh handles
            self._handles, self._pid = {}, os.getpid()
        handle = self._handles.get(shard_index)
        if handle is None:
            path = self.shards[shard_index]
            try:
                handle = h5py.File(path, "r")
            except OSError as exc:  # damaged since the index described it (its size and time unchanged)
                raise DamagedShardError.for_shard(self.cache_dir, path,
                                                  f"is unreadable: {_first_line(exc)}") from exc
            self._handles[shard_index] = handle
        return handle


@dataclass
class EarlierRecord:
    """An image record the cache's view no longer shows, still in its shard (earlier_record).

    Arguments:
      cache: the cache that holds it.
      row: its row in the cache's image tables.
      file: the file it was made from.
    """

    cache: EmbeddingCache
    row: int
    file: FileIdentity

    def _where(self) -> tuple[int, int]:
        t = self.cache.tables
        return int(t.image_shard[self.row]), int(t.image_row[self.row])

    def embedding(self) -> np.ndarray:
        """Its stored maps (EmbeddingCache.stored_features), checked as EmbeddingCache.embedding checks them."""
        shard_index, row = self._where()
        shard = self.cache.shards[shard_index]
        layout = self.cache.provenance.layout
        return layout.from_stored(self.cache._maps_at(shard_index, row, tuple(layout.stored_maps), lambda problem: (
            DamagedImageError(f"{self.cache.cache_dir}: the earlier embedding of {self.file.path} in shard "
                              f"{shard.name} is damaged ({problem}): it cannot be restored"))))

    def preview_bytes(self) -> bytes:
        """Its preview JPEG; DamagedImageError when it is not a whole one."""
        data = self.cache._preview_at(*self._where())
        if not _is_whole_jpeg(data):
            raise DamagedImageError(f"{self.cache.cache_dir}: the earlier preview of {self.file.path} is not a whole "
                                    "JPEG: it cannot be restored")
        return data


class _Images(Sequence):
    """`cache.images`: the images as `ImageInfo`s, built when asked for (never all at open)."""

    def __init__(self, cache: EmbeddingCache):
        self._cache = cache

    def __len__(self) -> int:
        return len(self._cache)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self._cache.image_info(i) for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        return self._cache.image_info(index)


def refresh_index(cache_dir: Path, *, at_least: int = 1) -> None:
    """Rewrites index.npz when `at_least` shards are outside it (writers, holding the lock)."""
    cache = EmbeddingCache(cache_dir)
    if cache.shards_outside_index >= at_least:
        cache.save_index()


def read_shard_tables(cache_dir: Path, path: Path, provenance: Provenance, *, position: int = 0
                      ) -> "cache_index.Tables":
    """The tables of the shard at `path`, checked, as shard number `position` of a view.

    Arguments:
      cache_dir: the cache it is in (for messages).
      path: the shard file.
      provenance: the cache's; a shard another recipe made is refused (CacheError).
      position: its images' `image_shard`.
    Raises DamagedShardError when the file cannot be read or its tables hold bad values.
    """
    try:
        with h5py.File(path, "r") as f:
            shard = _shard_provenance(f, cache_dir, path, provenance)
            return _read_tables(f, position, made_by=shard.made_by, layout=shard.layout)
    except _BadTable as exc:
        raise DamagedShardError.for_shard(cache_dir, path, f"holds bad values: {exc}") from exc
    except (OSError, KeyError, ValueError, IndexError, TypeError) as exc:
        raise DamagedShardError.for_shard(cache_dir, path, f"is unreadable: {_first_line(exc)}") from exc


def _shard_provenance(f: h5py.File, cache_dir: Path, path: Path, provenance: Provenance) -> Provenance:
    """The shard's provenance; refuses a shard that another recipe made (copied in from another cache, say)."""
    try:
        shard = provenance_from_dict(json.loads(f.attrs["provenance"]), source=path)
    except (KeyError, ValueError, TypeError, OSError) as exc:
        raise DamagedShardError.for_shard(cache_dir, path, f"carries no readable provenance ({exc})") from exc
    differ = [f"{key} is {getattr(provenance, key)!r} in the cache, {getattr(shard, key)!r} in the shard"
              for key in Provenance.COMPARED if getattr(provenance, key) != getattr(shard, key)]
    if differ:
        raise CacheError(f"shard {path} was made with other settings than this cache ({'; '.join(differ)}): "
                         "it does not belong here; move it out of the shards folder")
    return shard


def _read_tables(f: h5py.File, shard: int, *, made_by: str, layout: CacheLayout) -> "cache_index.Tables":
    """One shard's tables as columns, checked; `made_by` and `layout` are its provenance's."""
    im, ob, fa = f["images"], f["objects"], f["failed"]
    names = _read_bytes(im["name"])
    n = len(names)
    starts, counts = im["object_start"][()], im["object_count"][()]
    starts = starts[:n]  # shards without images used to hold one start (0)
    rles = ob["rle_counts"][()]
    tables = cache_index.Tables(
        name=names, path=_read_bytes(im["path"]), sha256=_read_bytes(im["sha256"]), split=_read_bytes(im["split"]),
        annotations_sha256=_read_bytes(im["annotations_sha256"]), file_size=im["file_size"][()].astype(np.int64),
        file_mtime_ns=im["file_mtime_ns"][()].astype(np.int64), image_id=im["image_id"][()].astype(np.int64),
        original_size=im["original_size"][()].astype(np.int32), input_size=im["input_size"][()].astype(np.int32),
        object_start=starts.astype(np.int64), object_count=counts.astype(np.int64),
        image_shard=np.full(n, shard, np.int32), image_row=np.arange(n, dtype=np.int64),
        made_by=cache_index.as_bytes([made_by] * n) if n else np.zeros(0, "S1"),
        object_id=ob["object_id"][()].astype(np.int64), box=ob["box"][()].astype(np.float32),
        category=_read_bytes(ob["category"]), object_row=np.arange(len(rles), dtype=np.int64),
        failed_name=_read_bytes(fa["name"]), failed_path=_read_bytes(fa["path"]),
        failed_sha256=_read_bytes(fa["sha256"]), failed_error=_read_bytes(fa["error"]),
        failed_file_size=fa["file_size"][()].astype(np.int64),
        failed_file_mtime_ns=fa["file_mtime_ns"][()].astype(np.int64),
        failed_shard=np.full(len(fa["name"]), shard, np.int32),
        # shards written before removals were recorded have none
        removed_name=_read_bytes(f["removed/name"]) if "removed" in f else np.zeros(0, "S1"),
        removed_reason=_read_bytes(f["removed/reason"]) if "removed" in f else np.zeros(0, "S1"),
        removed_shard=np.full(len(f["removed/name"]) if "removed" in f else 0, shard, np.int32),
    )
    _check_tables(f, tables, rles, layout)
    return tables


class _BadTable(ValueError):
    pass


def _check_tables(f: h5py.File, t: "cache_index.Tables", rles: np.ndarray, layout: CacheLayout) -> None:
    """Refuses tables that would make later code crash or train on nonsense (an edited or
    damaged shard): the message names the column and the first image it concerns."""

    def bad(column: str, rows, why: str) -> None:
        rows = np.flatnonzero(rows)
        if rows.size:
            row = int(rows[0])
            who = f"image {text(t.name[row])!r}" if column.startswith("images/") else f"row {row}"
            raise _BadTable(f"{column} of {who}: {why} ({rows.size} row(s) in all)")

    n, m = t.images, len(rles)
    image_columns = [t.path, t.sha256, t.split, t.annotations_sha256, t.file_size, t.file_mtime_ns, t.image_id,
                     t.original_size, t.input_size, t.object_start, t.object_count]
    for column in image_columns:
        if len(column) != n:
            raise _BadTable(f"the images table has columns of different lengths ({len(column)} and {n} rows)")
    for column in (t.object_id, t.box, t.category):
        if len(column) != m:
            raise _BadTable(f"the objects table has columns of different lengths ({len(column)} and {m} rows)")
    for column in (t.failed_path, t.failed_sha256, t.failed_error, t.failed_file_size, t.failed_file_mtime_ns):
        if len(column) != len(t.failed_name):
            raise _BadTable("the failed table has columns of different lengths")
    for name, shape in layout.stored_maps.items():
        if name not in f or f[name].shape != (n, *shape):
            raise _BadTable(f"{name} has shape {f[name].shape if name in f else 'none (missing)'} for {n} images")
    if t.original_size.shape != (n, 2) or t.input_size.shape != (n, 2) or t.box.shape != (m, 4):
        raise _BadTable("original_size, input_size or box has the wrong shape")
    bad("images/split", ~np.isin(t.split, [s.encode() for s in SPLITS]), f"not one of {', '.join(SPLITS)}")
    bad("images/original_size", (t.original_size < 1).any(axis=1), "a side below 1 pixel")
    bad("images/input_size", ((t.input_size < 1) | (t.input_size > IMAGE_SIZE)).any(axis=1),
        f"outside 1..{IMAGE_SIZE}")
    bad("images/object_count", t.object_count < 0, "negative")
    bad("images/object_start", (t.object_start < 0) | (t.object_start + t.object_count > m),
        f"outside the {m} objects")
    box = t.box
    bad("objects/box", ~np.isfinite(box).all(axis=1) | (box[:, 2] < box[:, 0]) | (box[:, 3] < box[:, 1]),
        "not a finite box with x1 >= x0 and y1 >= y0")
    bad("objects/rle_counts", np.array([not r for r in rles], bool), "an empty mask encoding")


def _first_line(exc: BaseException) -> str:
    """The first line of an error's message (h5py's can run to several)."""
    return (str(exc).splitlines() or [type(exc).__name__])[0]


def _is_whole_jpeg(data: bytes) -> bool:
    """Starts with JPEG's start-of-image marker and ends with its end-of-image marker."""
    return data[:2] == b"\xff\xd8" and data[-2:] == b"\xff\xd9"


def _read_bytes(dataset: h5py.Dataset) -> np.ndarray:
    """A string column as fixed-width UTF-8 bytes."""
    return cache_index.as_bytes(dataset[()].tolist())
