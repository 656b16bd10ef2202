"""The embedding cache: the only module that imports h5py.

A cache is a folder (format in docs/cache-format.md):

    CACHE/cache.json                 header: schema version and provenance, written once
    CACHE/index.npz                  the shards' tables as columns (cache_index.py; derived, optional)
    CACHE/shards/g00001-r0000-s000000.h5   committed shards: embeddings, images, objects, failures
    CACHE/shards/*.h5.tmp            a shard being written (ignored by readers, removed on restart)

Crash safety comes from the shard protocol: a shard is built in memory, written as
`*.h5.tmp`, fsynced, then renamed to `*.h5`. A rename is atomic, so the committed shards are
always complete HDF5 files, and the folder listing is the manifest: a killed writer loses at
most the shard it was writing. Shard names sort by (generation, rank, sequence); a
generation is one run, so when an image appears in several shards (its file or its
annotations changed) the latest record wins.

Readers (`EmbeddingCache`) load the small per-image and per-object tables into memory at
open as numpy columns (from index.npz, plus the tables of shards it does not cover), and read
embeddings, previews and mask encodings lazily through h5py handles opened in the process that
uses them, so a reader can be handed to DataLoader workers (h5py handles do not survive a fork).
"""

from __future__ import annotations

import io
import json
import os
import re
import secrets
import signal
import time
from collections.abc import Sequence
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Optional

import h5py
import numpy as np

from samcache import __version__, cache_index, masks
from samcache.config import SPLITS
from samcache.datasets.records import ObjectRecord
from samcache.errors import CacheError
from samcache.feature_layout import pack_sam2, unpack_sam2
from samcache.fileio import FileIdentity, atomic_write_bytes, atomic_write_json
from samcache.locks import WriterLock
from samcache.progress import progress_bar
from samcache.specs import EMBEDDING_SHAPE, IMAGE_SIZE, SAM2_FEATURE_SHAPES, feature_shape, model_family

SCHEMA_VERSIONS = {"sam": 1, "sam2.1": 2}
"""The schema version of each model family's caches: a SAM 2.1 cache holds two more maps per image."""
STORED_MAPS = {
    "sam": {"embeddings": EMBEDDING_SHAPE},
    "sam2.1": {"embeddings": SAM2_FEATURE_SHAPES["image_embed"], "high_res_s1": SAM2_FEATURE_SHAPES["high_res_s1"],
               "high_res_s0": SAM2_FEATURE_SHAPES["high_res_s0"]},
}
"""The per-image datasets of a shard, by model family, each (images, *shape) float16 with a checksum
per image. A SAM 2.1 shard's `embeddings` is its image_embed."""
HEADER_NAME = "cache.json"
SHARD_DIR = "shards"
FP16_MAX = float(np.finfo(np.float16).max)
PREVIEW_SIZE = 640
_STR = h5py.string_dtype("utf-8")


@dataclass(frozen=True)
class Provenance:
    """What made the embeddings; a cache accepts new images only from the same recipe.

    Arguments:
      model_type: "vit_b", "vit_l", "vit_h", "tiny", or a SAM 2.1 type (specs.SAM2_MODEL_TYPES); it
        decides the model family, hence the schema version and what a shard stores.
      weights_sha256: SHA-256 of the weights (see models.LoadedModel).
      preprocessing: preprocess.Preprocessing.as_dict().
      intensity: how images with more than 8 bits were mapped to uint8 (images.read_image).
      embedding_dtype: the stored dtype, "float16".
      compute_precision: "fp32" or "bf16" (autocast) for the encoder.
      encoder_backend: "torch" or "openvino": who ran the encoder (informative; not compared:
        the backends agree within float tolerance, tested).
      weights_source: where the weights came from (informative; not compared).
      samcache_version: the version that created the cache (informative; not compared).
    """

    model_type: str
    weights_sha256: str
    preprocessing: dict
    intensity: str
    embedding_dtype: str = "float16"
    compute_precision: str = "fp32"
    encoder_backend: str = "torch"
    weights_source: str = ""
    samcache_version: str = __version__

    # These must agree for two sets of embeddings to be one dataset.
    COMPARED = ("model_type", "weights_sha256", "preprocessing", "intensity", "embedding_dtype")

    @property
    def family(self) -> str:
        """"sam" or "sam2.1" (specs.model_family)."""
        return model_family(self.model_type)

    @property
    def made_by(self) -> str:
        """How the embeddings were computed, in words: "bf16 by openvino" (the index's made_by column)."""
        return f"{self.compute_precision} by {self.encoder_backend}"

    def mismatch(self, other: "Provenance") -> Optional[str]:
        for key in self.COMPARED:
            if getattr(self, key) != getattr(other, key):
                return f"{key} is {getattr(self, key)!r} in the cache, {getattr(other, key)!r} now"
        return None


@dataclass(kw_only=True)
class ImageEntry:
    """One image as a shard holds it: the dataset's `ImageRecord` fields, in its order, then what
    the cache adds. Objects are the dataset's own `ObjectRecord`s.

    Arguments:
      image_id: the dataset's id of the image.
      name: the dataset's key for the image (its path relative to the image root).
      file: the source file and its content identity (SHA-256, size, mtime).
      original_size: (H, W) of the decoded image.
      split: from the dataset.
      objects: the image's objects.
      input_size: (h, w) after the encoder's resize, before padding.
      annotations_sha256: a hash of the objects, to notice edited annotations.
      preview_jpeg: a small JPEG of the image (longest side PREVIEW_SIZE) for reports, so
        evaluation never needs the original files.
    """

    image_id: int
    name: str
    file: FileIdentity
    original_size: tuple[int, int]
    split: str
    objects: list[ObjectRecord]
    input_size: tuple[int, int]
    annotations_sha256: str
    preview_jpeg: bytes = b""


@dataclass
class FailedEntry:
    """An image that could not be embedded, with the reason."""

    name: str
    file: FileIdentity
    error: str


class DamagedImageError(CacheError):
    """An embedding fails its checksum or holds non-finite values."""

    def __init__(self, cache: "EmbeddingCache", index: int, problem: str):
        shard, _ = cache.location(index)
        super().__init__(
            f"{cache.cache_dir}: the embedding of {cache.name_of(index)} in shard {shard.name} is damaged "
            f"({problem}). Run `samcache verify {cache.cache_dir}` to find every damaged image and take them out "
            "of the cache, then `samcache embed` again to embed them anew")
        self.image, self.shard, self.problem = cache.name_of(index), shard, problem


def crash_point(name: str) -> None:
    """Test hook: `SAMCACHE_CRASH_AT=name:n` SIGKILLs this process the n-th time it passes `name`.

    The crash-safety test uses it to die at exact moments (mid-write, just before a rename...);
    it is inert unless the variable is set. Under torchrun, `SAMCACHE_CRASH_RANK=r` limits it
    to the process of rank r. `SAMCACHE_HOLD_AT=name:FILE` instead waits there for as long as
    FILE exists, so that the tests of one-writer-at-a-time can start a second writer while the
    first is still at work.
    """
    hold = os.environ.get("SAMCACHE_HOLD_AT")
    if hold and hold.partition(":")[0] == name:
        while os.path.exists(hold.partition(":")[2]):
            time.sleep(0.05)
    spec = os.environ.get("SAMCACHE_CRASH_AT")
    if not spec:
        return
    only_rank = os.environ.get("SAMCACHE_CRASH_RANK")
    if only_rank is not None and only_rank != os.environ.get("RANK", "0"):
        return
    point, _, count = spec.partition(":")
    if point != name:
        return
    crash_point.counts[name] = crash_point.counts.get(name, 0) + 1  # type: ignore[attr-defined]
    if crash_point.counts[name] >= int(count or 1):  # type: ignore[attr-defined]
        os.kill(os.getpid(), signal.SIGKILL)


crash_point.counts = {}  # type: ignore[attr-defined]


# ----------------------------------------------------------------------------------- writing
def open_for_writing(cache_dir: Path, provenance: Provenance) -> None:
    """Creates the cache folder and header, or checks an existing header matches `provenance`."""
    cache_dir = Path(cache_dir)
    header_path = cache_dir / HEADER_NAME
    if cache_dir.exists() and not cache_dir.is_dir():
        raise CacheError(f"{cache_dir} exists and is not a cache folder")
    if header_path.exists():
        existing = read_header(cache_dir)
        reason = existing.mismatch(provenance)
        if reason:
            raise CacheError(
                f"refusing to add to {cache_dir}: it was made with other settings ({reason}). "
                "Embeddings from different models or weights cannot be mixed; use another --out"
            )
        return
    if cache_dir.exists() and any(not p.name.startswith(".samcache") for p in cache_dir.iterdir()):
        raise CacheError(f"{cache_dir} is a non-empty folder without {HEADER_NAME}: not a samcache cache")
    (cache_dir / SHARD_DIR).mkdir(parents=True, exist_ok=True)
    atomic_write_json(header_path, {"schema_version": SCHEMA_VERSIONS[provenance.family],
                                    "provenance": asdict(provenance)})


def is_cache(cache_dir: str | Path) -> bool:
    """True when `cache_dir` has a cache header (it may still be empty or being written)."""
    return (Path(cache_dir) / HEADER_NAME).is_file()


def read_header(cache_dir: Path) -> Provenance:
    path = Path(cache_dir) / HEADER_NAME
    try:
        header = json.loads(path.read_text())
    except FileNotFoundError:
        raise CacheError(f"{cache_dir} is not a samcache cache (no {HEADER_NAME})") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise CacheError(f"{path} is unreadable: {exc}") from exc
    if not isinstance(header, dict) or not isinstance(header.get("provenance"), dict):
        raise CacheError(f"{path} is not a samcache cache header (no provenance mapping)")
    version = header.get("schema_version")
    if version not in SCHEMA_VERSIONS.values():
        raise CacheError(f"{cache_dir} has cache schema version {version}, this samcache reads "
                         f"{', '.join(f'{v} ({k})' for k, v in SCHEMA_VERSIONS.items())}")
    provenance = provenance_from_dict(header["provenance"], source=path)
    if version != SCHEMA_VERSIONS[provenance.family]:
        raise CacheError(f"{path}: schema version {version} with model {provenance.model_type!r}, whose caches are "
                         f"version {SCHEMA_VERSIONS[provenance.family]}: not a header this samcache wrote")
    return provenance


def provenance_from_dict(values: dict, *, source: Path) -> Provenance:
    """A Provenance from its JSON form; a missing or unknown key is a message naming `source`."""
    known = {f.name for f in fields(Provenance)}
    required = {f.name for f in fields(Provenance) if f.default is MISSING}
    missing, unknown = sorted(required - set(values)), sorted(set(values) - known)
    if missing or unknown:
        problems = ([f"missing {', '.join(missing)}"] if missing else []) + (
            [f"unknown {', '.join(unknown)}"] if unknown else [])
        raise CacheError(f"{source}: the provenance has {'; '.join(problems)}: not a header this samcache wrote")
    return Provenance(**values)


def next_generation(cache_dir: Path) -> int:
    """1 + the highest generation among committed shards: every run writes a new generation."""
    gens = [int(p.name[1:6]) for p in _shard_paths(cache_dir)]
    return max(gens, default=0) + 1


def remove_stale_temporaries(cache_dir: Path) -> int:
    """Deletes the `.tmp` shards killed runs left behind (of any rank: call it before any rank writes)."""
    removed = 0
    for tmp in (Path(cache_dir) / SHARD_DIR).glob("*.h5.tmp"):
        tmp.unlink(missing_ok=True)
        removed += 1
    return removed


class ShardWriter:
    """Writes one shard: `commit()` writes it to `NAME.h5.tmp`, fsyncs and renames it.

    The shard is built in memory (at most `shard_images` images, 2 MiB each; SAM 2.1: 8 MiB) and written
    to disk by Python at commit. HDF5 never writes to the disk itself because it cannot recover
    from a failed write: after a full disk its handles fail to close and the process crashes at
    exit. This way a full disk is an ordinary OSError, and the `.tmp` file is simply deleted.
    Until `commit()` returns, nothing about this shard is visible.
    """

    def __init__(self, cache_dir: Path, *, generation: int, rank: int, sequence: int, provenance: Provenance):
        # The random part makes two writers' names differ even if they ever ran at once (the
        # cache's lock prevents that; a name collision would silently replace a shard).
        self.final_path = (Path(cache_dir) / SHARD_DIR
                           / f"g{generation:05d}-r{rank:04d}-s{sequence:06d}-{secrets.token_hex(4)}.h5")
        self.tmp_path = self.final_path.with_name(self.final_path.name + ".tmp")
        self.buffer = io.BytesIO()
        self.file = h5py.File(self.buffer, "w")
        self.file.attrs["schema_version"] = SCHEMA_VERSIONS[provenance.family]
        self.file.attrs["provenance"] = json.dumps(asdict(provenance), sort_keys=True)
        self.family, self.feature_shape = provenance.family, feature_shape(provenance.model_type)
        self.maps = {
            name: self.file.create_dataset(name, shape=(0, *shape), maxshape=(None, *shape), dtype=np.float16,
                                           chunks=(1, *shape), fletcher32=True)  # a checksum per image
            for name, shape in STORED_MAPS[self.family].items()
        }
        self.images: list[ImageEntry] = []
        self.failed: list[FailedEntry] = []
        self.removed: list[tuple[str, str]] = []
        self.created = time.time()

    def __len__(self) -> int:
        return len(self.images) + len(self.failed) + len(self.removed)

    def add(self, entry: ImageEntry, embedding: np.ndarray) -> None:
        """Appends one image. `embedding` is what `EmbeddingCache.embedding` gives back: (256, 64, 64),
        or SAM 2.1's packed (1024, 64, 64), float32/float16; values beyond fp16's range are an error,
        never a silent inf."""
        if embedding.shape != self.feature_shape:
            raise CacheError(f"{entry.name}: embedding shape {embedding.shape}, expected {self.feature_shape}")
        if not np.isfinite(embedding).all() or np.abs(embedding).max() > FP16_MAX:
            raise CacheError(
                f"{entry.name}: the encoder produced values outside float16's range (|x| > {FP16_MAX:.0f}) "
                "or non-finite values; these weights cannot be cached in float16"
            )
        row = len(self.images)
        for name, values in _stored_maps(self.family, embedding.astype(np.float16)).items():
            self.maps[name].resize(row + 1, axis=0)
            self.maps[name][row] = values
        self.images.append(entry)
        crash_point("shard-row-written")

    def add_failure(self, entry: FailedEntry) -> None:
        self.failed.append(entry)

    def add_removal(self, name: str, reason: str) -> None:
        """Takes image `name` out of the cache's view (shards stay append-only: this is a record)."""
        self.removed.append((name, reason))

    def commit(self) -> Path:
        self._write_tables()
        self.file.close()
        with open(self.tmp_path, "wb") as out:  # OSError on a full disk: the caller abandons
            out.write(self.buffer.getbuffer())
            crash_point("shard-before-close")
            out.flush()
            os.fsync(out.fileno())
        self.buffer = io.BytesIO()
        crash_point("shard-before-rename")
        os.replace(self.tmp_path, self.final_path)
        _fsync_path(self.final_path.parent)
        crash_point("shard-committed")
        return self.final_path

    def abandon(self) -> None:
        """Drops the shard: nothing of it becomes visible."""
        if self.file.id.valid:
            self.file.close()
        self.buffer = io.BytesIO()
        self.tmp_path.unlink(missing_ok=True)

    def _write_tables(self) -> None:
        images = self.file.create_group("images")
        entries = self.images
        _strings(images, "name", [e.name for e in entries])
        _strings(images, "path", [e.file.path for e in entries])
        _strings(images, "sha256", [e.file.sha256 for e in entries])
        _strings(images, "split", [e.split for e in entries])
        _strings(images, "annotations_sha256", [e.annotations_sha256 for e in entries])
        images.create_dataset("file_size", data=np.array([e.file.size for e in entries], np.int64))
        images.create_dataset("file_mtime_ns", data=np.array([e.file.mtime_ns for e in entries], np.int64))
        images.create_dataset("image_id", data=np.array([e.image_id for e in entries], np.int64))
        previews = images.create_dataset("preview_jpeg", shape=(len(entries),), dtype=h5py.vlen_dtype(np.uint8))
        for row, e in enumerate(entries):
            previews[row] = np.frombuffer(e.preview_jpeg, np.uint8)
        images.create_dataset("original_size",
                              data=np.array([e.original_size for e in entries], np.int32).reshape(-1, 2))
        images.create_dataset("input_size", data=np.array([e.input_size for e in entries], np.int32).reshape(-1, 2))
        counts = np.array([len(e.objects) for e in entries], np.int64)
        images.create_dataset("object_count", data=counts)
        images.create_dataset("object_start", data=(np.cumsum(counts) - counts).astype(np.int64))

        objects = self.file.create_group("objects")
        flat = [(row, o) for row, e in enumerate(entries) for o in e.objects]
        objects.create_dataset("image_row", data=np.array([r for r, _ in flat], np.int64))
        objects.create_dataset("object_id", data=np.array([o.object_id for _, o in flat], np.int64))
        objects.create_dataset("box", data=np.array([o.box for _, o in flat], np.float32).reshape(-1, 4))
        _strings(objects, "category", [o.category for _, o in flat])
        _strings(objects, "rle_counts", [o.rle["counts"] for _, o in flat])

        removed = self.file.create_group("removed")
        _strings(removed, "name", [name for name, _ in self.removed])
        _strings(removed, "reason", [reason for _, reason in self.removed])

        failed = self.file.create_group("failed")
        _strings(failed, "name", [f.name for f in self.failed])
        _strings(failed, "path", [f.file.path for f in self.failed])
        _strings(failed, "sha256", [f.file.sha256 for f in self.failed])
        _strings(failed, "error", [f.error for f in self.failed])
        failed.create_dataset("file_size", data=np.array([f.file.size for f in self.failed], np.int64))
        failed.create_dataset("file_mtime_ns", data=np.array([f.file.mtime_ns for f in self.failed], np.int64))


def _stored_maps(family: str, features: np.ndarray) -> dict[str, np.ndarray]:
    """One image's decoder input -> the shard's datasets (STORED_MAPS); `_decoder_input` inverts it."""
    if family == "sam":
        return {"embeddings": features}
    maps = unpack_sam2(features)
    return {"embeddings": maps["image_embed"], "high_res_s1": maps["high_res_s1"], "high_res_s0": maps["high_res_s0"]}


def _decoder_input(family: str, stored: dict[str, np.ndarray]) -> np.ndarray:
    """The shard's datasets of one image (STORED_MAPS) -> its decoder input, as `_stored_maps` took it."""
    if family == "sam":
        return stored["embeddings"]
    return pack_sam2({"image_embed": stored["embeddings"], "high_res_s1": stored["high_res_s1"],
                      "high_res_s0": stored["high_res_s0"]})


def _strings(group: h5py.Group, name: str, values: list[str]) -> None:
    group.create_dataset(name, data=np.array(values, dtype=object), dtype=_STR)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# Shards written before names had a random part match too; `x (copy).h5` and the like do not.
SHARD_NAME = re.compile(r"g\d{5}-r\d{4}-s\d{6}(-[0-9a-f]{8})?\.h5")


def _shard_paths(cache_dir: Path) -> list[Path]:
    return sorted(p for p in (Path(cache_dir) / SHARD_DIR).glob("g*.h5") if SHARD_NAME.fullmatch(p.name))


# ----------------------------------------------------------------------------------- reading
@dataclass(kw_only=True)
class ImageInfo(ImageEntry):
    """What the cache knows of one image, as written, plus its index in the cache (sorted by name).
    The embedding and the preview are read on demand (`embedding`, `preview`)."""

    index: int = -1


# Rewrite index.npz when this many shards are not in it (and at the end of every embed run):
# readers read those shards' tables themselves, so this only bounds how slow opening gets.
INDEX_REFRESH_SHARDS = 64


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
    """

    def __init__(self, cache_dir: str | Path):
        self.cache_dir = Path(cache_dir)
        self.provenance = read_header(self.cache_dir)
        self.shards = _shard_paths(self.cache_dir)
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
            FailedEntry(_text(t.failed_name[r]),
                        FileIdentity(_text(t.failed_path[r]), _text(t.failed_sha256[r]), int(t.failed_file_size[r]),
                                     int(t.failed_file_mtime_ns[r])),
                        _text(t.failed_error[r]))
            for r in view.failed
        ]
        # name -> why it left the cache (the latest record)
        self.removed: dict[str, str] = {_text(t.removed_name[r]): _text(t.removed_reason[r]) for r in view.removed}
        self._handles: dict[int, h5py.File] = {}
        self._pid = os.getpid()

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
            path = self.shards[i]
            try:
                with h5py.File(path, "r") as f:
                    shard = self._check_shard_provenance(f, path)
                    parts.append(_read_tables(f, int(i), made_by=shard.made_by, family=shard.family))
            except _BadTable as exc:
                raise CacheError(f"shard {path} holds bad values: {exc}; take it out of shards/ (its images "
                                 "will be embedded again by `samcache embed`)") from exc
            except (OSError, KeyError, ValueError, IndexError, TypeError) as exc:
                raise CacheError(f"shard {path} is unreadable: {exc}") from exc
        return cache_index.Tables.concatenate(parts), int(np.count_nonzero(~covered))

    def save_index(self) -> None:
        """Writes index.npz for the shards this view read (writers call it, holding the lock)."""
        atomic_write_bytes(self.cache_dir / cache_index.INDEX_NAME,
                           cache_index.to_bytes([p.name for p in self.shards], self._shard_stat, self.tables))
        self.shards_outside_index = 0

    def _check_shard_provenance(self, f: h5py.File, path: Path) -> Provenance:
        """The shard's provenance; refuses a shard that another recipe made (copied in from another cache, say)."""
        try:
            shard = provenance_from_dict(json.loads(f.attrs["provenance"]), source=path)
        except (KeyError, ValueError) as exc:
            raise CacheError(f"shard {path} carries no readable provenance ({exc}): not a shard of this cache") from exc
        differ = [f"{key} is {getattr(self.provenance, key)!r} in the cache, {getattr(shard, key)!r} in the shard"
                  for key in Provenance.COMPARED if getattr(self.provenance, key) != getattr(shard, key)]
        if differ:
            raise CacheError(f"shard {path} was made with other settings than this cache ({'; '.join(differ)}): "
                             "it does not belong here; move it out of the shards folder")
        return shard

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_handles"] = {}  # h5py handles never cross a process boundary
        return state

    def index_of(self, name: str) -> Optional[int]:
        key = name.encode("utf-8")
        i = int(np.searchsorted(self.names, key))
        return i if i < len(self.names) and self.names[i] == key else None

    def name_of(self, index: int) -> str:
        return _text(self.names[index])

    def location(self, index: int) -> tuple[Path, int]:
        """The shard that holds image `index`, and its row there."""
        shard_index, row = self._location[index]
        return self.shards[int(shard_index)], int(row)

    def file_of(self, index: int) -> FileIdentity:
        """Which file image `index` was embedded from, with which content."""
        t, r = self.tables, self._rows[index]
        return FileIdentity(_text(t.path[r]), _text(t.sha256[r]), int(t.file_size[r]), int(t.file_mtime_ns[r]))

    def annotations_sha256_of(self, index: int) -> str:
        return _text(self.tables.annotations_sha256[self._rows[index]])

    def index_by_sha256(self) -> dict[str, int]:
        """{SHA-256 of the image file: index} (predict finds cached embeddings of its inputs by content)."""
        return {_text(sha): i for i, sha in enumerate(self.tables.sha256[self._rows]) if sha}

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
        return {_text(n): {"images": int(i), "objects": int(o)} for n, i, o in zip(names, images, objects)}

    def embedding(self, index: int) -> np.ndarray:
        """The decoder's input for image `index`, float16, read from disk and checked: every stored
        map's Fletcher32 checksum (HDF5 verifies it on read) and finite values; DamagedImageError
        else. SAM: the (256, 64, 64) embedding; SAM 2.1: its three maps packed into (1024, 64, 64)
        (feature_layout.py)."""
        shard_index, row = self._location[index]
        handle, maps = self._handle(int(shard_index)), {}
        for name in STORED_MAPS[self.provenance.family]:
            try:
                maps[name] = handle[name][int(row)]
            except OSError as exc:  # h5py reports a checksum mismatch as a failed read
                raise DamagedImageError(self, index, f"checksum mismatch in {name} "
                                                     f"({str(exc).splitlines()[0]})") from exc
            if not np.isfinite(maps[name]).all():
                raise DamagedImageError(self, index, f"non-finite values in {name}")
        return _decoder_input(self.provenance.family, maps)

    def preview_bytes(self, index: int) -> bytes:
        shard_index, row = self._location[index]
        return np.asarray(self._handle(int(shard_index))["images/preview_jpeg"][int(row)], np.uint8).tobytes()

    def preview(self, index: int) -> np.ndarray:
        """The image's preview as RGB uint8 (longest side PREVIEW_SIZE), decoded from the cache."""
        import cv2

        data = np.frombuffer(self.preview_bytes(index), np.uint8)
        bgr = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
        if bgr is None:
            raise CacheError(f"{self.name_of(index)}: the cache holds no preview image")
        return bgr[..., ::-1].copy()

    def image_info(self, index: int) -> ImageInfo:
        """Everything about image `index`; its objects' mask encodings are read from its shard."""
        t, r = self.tables, int(self._rows[index])
        start, count = int(self.object_start[index]), int(self.object_count[index])
        objects_rows = self._objects[start : start + count]
        h, w = (int(v) for v in t.original_size[r])
        rles = self._rle_counts(int(self._location[index][0]), t.object_row[objects_rows]) if count else []
        objects = [ObjectRecord(object_id=int(t.object_id[j]), box=tuple(float(v) for v in t.box[j]),
                                rle={"size": [h, w], "counts": rle}, category=_text(t.category[j]))
                   for j, rle in zip(objects_rows, rles)]
        return ImageInfo(
            image_id=int(t.image_id[r]), name=_text(t.name[r]), file=self.file_of(index), original_size=(h, w),
            split=_text(t.split[r]), objects=objects, input_size=(int(t.input_size[r, 0]), int(t.input_size[r, 1])),
            annotations_sha256=_text(t.annotations_sha256[r]), index=index,
        )

    def _rle_counts(self, shard_index: int, rows: np.ndarray) -> list[str]:
        first, last = int(rows[0]), int(rows[-1]) + 1  # an image's objects are contiguous in its shard
        values = self._handle(shard_index)["objects/rle_counts"][first:last]
        counts = [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values]
        if any(not c for c in counts):
            raise CacheError(f"shard {self.shards[shard_index]}: an empty mask encoding in objects/rle_counts")
        return [counts[int(r) - first] for r in rows]

    def info(self) -> dict:
        """The summary `samcache info` prints, as plain JSON types."""
        size = self.bytes_on_disk()
        categories, counts = np.unique(self.tables.category[self._objects], return_counts=True)
        return {
            "cache": str(self.cache_dir),
            "schema_version": SCHEMA_VERSIONS[self.provenance.family],
            "model_family": self.provenance.family,
            "images": len(self),
            "objects": int(self.object_count.sum()),
            "splits": self.splits,
            "categories": {_text(c): int(n) for c, n in zip(categories, counts)},
            "model_type": self.provenance.model_type,
            "weights_sha256": self.provenance.weights_sha256,
            "weights_source": self.provenance.weights_source,
            "embedding_dtype": self.provenance.embedding_dtype,
            "stored_maps": {name: list(shape) for name, shape in STORED_MAPS[self.provenance.family].items()},
            "embedding_shape": list(STORED_MAPS[self.provenance.family]["embeddings"]),
            # per image, from its shard: a cache extended later with another backend says so
            "computed": {_text(m): int(n) for m, n in zip(*np.unique(self.tables.made_by[self._rows],
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
            handle = h5py.File(self.shards[shard_index], "r")
            self._handles[shard_index] = handle
        return handle


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


def _text(value: bytes) -> str:
    return value.decode("utf-8")


def refresh_index(cache_dir: Path, *, at_least: int = 1) -> None:
    """Rewrites index.npz when `at_least` shards are outside it (writers, holding the lock)."""
    cache = EmbeddingCache(cache_dir)
    if cache.shards_outside_index >= at_least:
        cache.save_index()


def _read_tables(f: h5py.File, shard: int, *, made_by: str, family: str) -> "cache_index.Tables":
    """One shard's tables as columns, checked; `made_by` and `family` are its provenance's."""
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
    _check_tables(f, tables, rles, family)
    return tables


class _BadTable(ValueError):
    pass


def _check_tables(f: h5py.File, t: "cache_index.Tables", rles: np.ndarray, family: str) -> None:
    """Refuses tables that would make later code crash or train on nonsense (an edited or
    damaged shard): the message names the column and the first image it concerns."""

    def bad(column: str, rows, why: str) -> None:
        rows = np.flatnonzero(rows)
        if rows.size:
            row = int(rows[0])
            who = f"image {_text(t.name[row])!r}" if column.startswith("images/") else f"row {row}"
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
    for name, shape in STORED_MAPS[family].items():
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


def _read_bytes(dataset: h5py.Dataset) -> np.ndarray:
    """A string column as fixed-width UTF-8 bytes."""
    return cache_index.as_bytes(dataset[()].tolist())


# ----------------------------------------------------------------------------------- verifying
@dataclass
class VerifyReport:
    """What `verify` found: every image read, the damaged ones (name, shard, problem)."""

    images: int
    shards: int
    damaged: list[tuple[str, str, str]]
    taken_out: bool


def verify(cache_dir: str | Path, *, take_out: bool = True, progress: bool = True) -> VerifyReport:
    """Reads every embedding of the cache and checks it (checksum, finite values).

    With `take_out`, damaged images leave the cache's view through a removal record in a new
    shard (the shards stay append-only), so the next `samcache embed` embeds them again. It
    holds the cache's writer lock while it works.
    """
    cache_dir = Path(cache_dir)
    if not is_cache(cache_dir):
        read_header(cache_dir)  # the message that says what is wrong
    # Only taking images out writes; a check alone works on a read-only copy too.
    with WriterLock(cache_dir, what="cache", enabled=take_out,
                    hint="`samcache verify --check-only` only reads"):
        cache = EmbeddingCache(cache_dir)
        damaged = []
        bar = progress_bar(len(cache), desc="verify", unit="img", enabled=progress and len(cache) > 0)
        for index in range(len(cache)):
            try:
                cache.embedding(index)
                for obj in cache.image_info(index).objects:
                    masks.decode(obj.rle)
            except DamagedImageError as exc:
                damaged.append((exc.image, exc.shard.name, exc.problem))
            except (ValueError, CacheError) as exc:  # a mask encoding that does not decode
                damaged.append((cache.name_of(index), cache.location(index)[0].name,
                                f"a mask encoding does not decode ({exc})"))
            bar.update(1)
        bar.close()
        cache.close()
        if damaged and take_out:
            writer = ShardWriter(cache_dir, generation=next_generation(cache_dir), rank=0, sequence=0,
                                 provenance=cache.provenance)
            for name, shard, problem in damaged:
                writer.add_removal(name, f"damaged in {shard}: {problem}")
            try:
                writer.commit()
            except OSError as exc:
                writer.abandon()
                raise CacheError(f"could not write to {cache_dir}: {exc.strerror or exc}; the damaged images "
                                 "are still in the cache's view (run verify again once there is space)") from exc
        if take_out:
            refresh_index(cache_dir)
    return VerifyReport(images=len(cache), shards=len(cache.shards), damaged=damaged, taken_out=take_out)
