"""Writing a cache: shards committed atomically, and the rotation that decides when.

Crash safety comes from the shard protocol: a shard is built in memory, written as
`*.h5.tmp`, fsynced, then renamed to `*.h5`. A rename is atomic, so the committed shards are
always complete HDF5 files, and the folder listing is the manifest: a killed writer loses at
most the shard it was writing.
"""

from __future__ import annotations

import io
import json
import os
import secrets
import time
from pathlib import Path
from typing import Optional

import h5py
import numpy as np

from samcache.cache.format import (
    FP16_MAX,
    SHARD_DIR,
    FailedEntry,
    ImageEntry,
    Provenance,
    provenance_to_dict,
    shard_paths,
    write_strings,
)
from samcache.cache.reader import refresh_index
from samcache.errors import CacheError
from samcache.faults import crash_point


def next_generation(cache_dir: Path) -> int:
    """1 + the highest generation among committed shards: every run writes a new generation."""
    gens = [int(p.name[1:6]) for p in shard_paths(cache_dir)]
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
        self.file.attrs["schema_version"] = provenance.layout.schema_version
        self.file.attrs["provenance"] = json.dumps(provenance_to_dict(provenance), sort_keys=True)
        self.layout = provenance.layout
        self.maps = {
            name: self.file.create_dataset(name, shape=(0, *shape), maxshape=(None, *shape), dtype=np.float16,
                                           chunks=(1, *shape), fletcher32=True)  # a checksum per image
            for name, shape in self.layout.stored_maps.items()
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
        if embedding.shape != self.layout.feature_shape:
            raise CacheError(f"{entry.name}: embedding shape {embedding.shape}, expected {self.layout.feature_shape}")
        if not np.isfinite(embedding).all() or np.abs(embedding).max() > FP16_MAX:
            raise CacheError(
                f"{entry.name}: the encoder produced values outside float16's range (|x| > {FP16_MAX:.0f}) "
                "or non-finite values; these weights cannot be cached in float16"
            )
        row = len(self.images)
        for name, values in self.layout.to_stored(embedding.astype(np.float16)).items():
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
        fsync_path(self.final_path.parent)
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
        write_strings(images, "name", [e.name for e in entries])
        write_strings(images, "path", [e.file.path for e in entries])
        write_strings(images, "sha256", [e.file.sha256 for e in entries])
        write_strings(images, "split", [e.split for e in entries])
        write_strings(images, "annotations_sha256", [e.annotations_sha256 for e in entries])
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
        write_strings(objects, "category", [o.category for _, o in flat])
        write_strings(objects, "rle_counts", [o.rle["counts"] for _, o in flat])

        removed = self.file.create_group("removed")
        write_strings(removed, "name", [name for name, _ in self.removed])
        write_strings(removed, "reason", [reason for _, reason in self.removed])

        failed = self.file.create_group("failed")
        write_strings(failed, "name", [f.name for f in self.failed])
        write_strings(failed, "path", [f.file.path for f in self.failed])
        write_strings(failed, "sha256", [f.file.sha256 for f in self.failed])
        write_strings(failed, "error", [f.error for f in self.failed])
        failed.create_dataset("file_size", data=np.array([f.file.size for f in self.failed], np.int64))
        failed.create_dataset("file_mtime_ns", data=np.array([f.file.mtime_ns for f in self.failed], np.int64))


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


INDEX_REFRESH_SHARDS = 64
"""A writer refreshes index.npz after at least this many new shards (and a quarter of those indexed)."""


class ShardRotation:
    """Keeps one open shard and commits it when it is full or old enough."""

    def __init__(self, cache_dir: Path, provenance, *, rank: int, max_images: int, max_seconds: float, indexed: int):
        self.cache_dir, self.provenance, self.rank = cache_dir, provenance, rank
        self.max_images, self.max_seconds = max_images, max_seconds
        self.generation = next_generation(cache_dir)
        self.sequence = 0
        self.writer: Optional[ShardWriter] = None
        self.indexed = indexed
        self.since_index = 0

    def current(self) -> ShardWriter:
        if self.writer is None:
            self.writer = ShardWriter(
                self.cache_dir, generation=self.generation, rank=self.rank, sequence=self.sequence,
                provenance=self.provenance,
            )
            self.sequence += 1
        return self.writer

    def maybe_commit(self) -> None:
        w = self.writer
        if w is not None and (len(w) >= self.max_images or time.time() - w.created >= self.max_seconds):
            self.commit()

    def commit(self) -> None:
        if self.writer is not None:
            if len(self.writer):
                self.writer.commit()
                self.since_index += 1
            else:
                self.writer.abandon()
            self.writer = None
        # A long run refreshes index.npz now and then (geometrically, so the rewrites cost O(n) in
        # all), so that a reader, or the run after a crash, never reads thousands of shards' tables.
        if self.rank == 0 and self.since_index >= max(INDEX_REFRESH_SHARDS, self.indexed // 4):
            refresh_index(self.cache_dir)
            self.indexed, self.since_index = self.indexed + self.since_index, 0

    def abandon(self) -> None:
        """Drops the open shard after a write error; committed shards are untouched."""
        if self.writer is not None:
            self.writer.abandon()
            self.writer = None
