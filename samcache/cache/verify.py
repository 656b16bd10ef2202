"""`samcache verify`: every shard read and every image checked (embeddings against their checksums,
mask encodings, previews); damaged images taken out, unreadable shards moved aside."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import h5py

from samcache.cache import index as cache_index
from samcache.cache.format import DAMAGED_REMOVAL, SHARD_DIR, Provenance, read_header, shard_paths, text
from samcache.cache.reader import (
    DAMAGED_DIR,
    DamagedImageError,
    DamagedShardError,
    EmbeddingCache,
    read_shard_tables,
    refresh_index,
)
from samcache.cache.writer import ShardWriter, fsync_path, next_generation
from samcache.data import masks
from samcache.errors import CacheError
from samcache.locks import WriterLock
from samcache.progress import progress_bar


# ----------------------------------------------------------------------------------- verifying
@dataclass
class UnreadableShard:
    """A shard `verify` could not read.

    Arguments:
      name: its file name.
      problem: what is wrong, after "the shard": "is unreadable: ...".
      held: the names of the images it held; None when that can no longer be known.
      moved_to: where it went (CACHE/damaged/NAME); None when it stayed (--check-only).
    """

    name: str
    problem: str
    held: Optional[list[str]]
    moved_to: Optional[Path] = None

    def as_damaged(self) -> list[tuple[str, str, str]]:
        """(image, shard, problem) rows, one for each image it held, as `VerifyReport.damaged` lists them."""
        where = (f"moved to {self.moved_to}" if self.moved_to else
                 f"`samcache verify` without --check-only moves it into {DAMAGED_DIR}/")
        problem = f"the shard {self.problem}; {where}"
        if self.held is None:
            return [("(images not known)", self.name, problem)]
        return [(name, self.name, problem) for name in self.held] or [("(no images)", self.name, problem)]


@dataclass
class VerifyReport:
    """What `verify` found: every image read, the damaged ones (name, shard, problem), the images
    of unreadable shards among them, and those shards."""

    images: int
    shards: int
    damaged: list[tuple[str, str, str]]
    taken_out: bool
    unreadable: list[UnreadableShard] = field(default_factory=list)


def verify(cache_dir: str | Path, *, take_out: bool = True, progress: bool = True) -> VerifyReport:
    """Reads every shard's tables and every image of the cache, and checks them: each stored map
    against its checksum and for finite values, each mask encoding (decodes to a mask of the image's
    size), each preview (a whole JPEG that decodes).

    With `take_out`, a shard that cannot be read is moved into CACHE/damaged/ under its own name
    (never deleted), and damaged images leave the cache's view through a removal record in a new
    shard (the shards stay append-only); the next `samcache embed` embeds both again. It holds
    the cache's writer lock while it works. Without, nothing is changed and the images of the
    readable shards are checked all the same.
    """
    cache_dir = Path(cache_dir)
    provenance = read_header(cache_dir)  # the message that says what is wrong, if anything
    # Only taking images out writes; a check alone works on a read-only copy too.
    with WriterLock(cache_dir, what="cache", enabled=take_out,
                    hint="`samcache verify --check-only` only reads"):
        unreadable = unreadable_shards(cache_dir, provenance)
        if take_out:
            for shard in unreadable:
                shard.moved_to = move_aside(cache_dir, cache_dir / SHARD_DIR / shard.name)
        cache = EmbeddingCache(cache_dir, leave_out={shard.name for shard in unreadable})
        damaged = _damaged_images(cache, progress)
        if damaged and take_out:
            _take_out(cache, damaged)
        if take_out:
            # the index lists the shards moved aside: rewrite it, though readers would pass them over
            refresh_index(cache_dir, at_least=0 if unreadable else 1)
    return VerifyReport(images=len(cache), shards=len(cache.shards) + len(unreadable),
                        damaged=[row for shard in unreadable for row in shard.as_damaged()] + damaged,
                        taken_out=take_out, unreadable=unreadable)


def unreadable_shards(cache_dir: Path, provenance: Provenance) -> list[UnreadableShard]:
    """The shards whose tables cannot be read from the shard itself (index.npz may still describe
    them: a shard damaged in place keeps its size and time), with what each held."""
    found = []
    for path in shard_paths(cache_dir):
        try:
            read_shard_tables(cache_dir, path, provenance)
        except DamagedShardError as exc:
            found.append(UnreadableShard(path.name, exc.problem, held=None))
    if found:
        stored = cache_index.load(cache_dir)
        for shard in found:
            shard.held = _held_by(cache_dir / SHARD_DIR / shard.name, stored)
    return found


def _held_by(path: Path, stored: Optional[cache_index.StoredIndex]) -> Optional[list[str]]:
    """The names of the images the shard at `path` held: from index.npz, written while the shard was
    whole, else from its own images table if that still reads; None when neither can tell."""
    if stored is not None and path.name in stored.shards:
        tables = stored.tables
        return sorted(text(n) for n in tables.name[tables.image_shard == stored.shards.index(path.name)])
    try:
        with h5py.File(path, "r") as f:
            return sorted(f["images/name"].asstr()[()].tolist())
    except (OSError, KeyError, ValueError, TypeError):
        return None


def move_aside(cache_dir: Path, shard: Path) -> Path:
    """Moves `shard` into CACHE/damaged/ under its own name (a number added if one is there already):
    out of the cache's view, never deleted. Returns where it went."""
    folder = cache_dir / DAMAGED_DIR
    target, n = folder / shard.name, 1
    try:
        folder.mkdir(exist_ok=True)
        while target.exists():
            target, n = folder / f"{shard.stem}.{n}{shard.suffix}", n + 1
        os.rename(shard, target)  # the same file system: nothing is copied
        fsync_path(folder)
        fsync_path(shard.parent)
    except OSError as exc:
        raise CacheError(f"could not move the unreadable shard {shard} into {folder}: {exc.strerror or exc}; "
                         "it is still in the cache (move it out of shards/ by hand, or fix the folder and run "
                         "verify again)") from exc
    return target


def _damaged_images(cache: EmbeddingCache, progress: bool) -> list[tuple[str, str, str]]:
    """(image, shard, problem) of every image of `cache` whose embedding, masks or preview is damaged."""
    damaged = []
    bar = progress_bar(len(cache), desc="verify", unit="img", enabled=progress and len(cache) > 0)
    for index in range(len(cache)):
        try:
            cache.stored_features(index)
            for obj in cache.image_info(index).objects:  # each checked against the image's size there
                masks.decode(obj.rle)
            cache.preview(index)
        except DamagedImageError as exc:
            damaged.append((exc.image, exc.shard.name, exc.problem))
        except ValueError as exc:  # a mask encoding that does not decode after all
            damaged.append((cache.name_of(index), cache.location(index)[0].name,
                            f"a mask encoding does not decode ({exc})"))
        bar.update(1)
    bar.close()
    cache.close()
    return damaged


def _take_out(cache: EmbeddingCache, damaged: list[tuple[str, str, str]]) -> None:
    """A new shard of removal records for the `damaged` images."""
    writer = ShardWriter(cache.cache_dir, generation=next_generation(cache.cache_dir), rank=0, sequence=0,
                         provenance=cache.provenance)
    for name, shard, problem in damaged:
        writer.add_removal(name, f"{DAMAGED_REMOVAL} in {shard}: {problem}")
    try:
        writer.commit()
    except OSError as exc:
        writer.abandon()
        raise CacheError(f"could not write to {cache.cache_dir}: {exc.strerror or exc}; the damaged images "
                         "are still in the cache's view (run verify again once there is space)") from exc
