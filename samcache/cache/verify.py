"""`samcache verify`: every stored map checked against its checksum, damaged images taken out."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from samcache.cache.format import is_cache, read_header
from samcache.cache.reader import DamagedImageError, EmbeddingCache, refresh_index
from samcache.cache.writer import ShardWriter, next_generation
from samcache.data import masks
from samcache.errors import CacheError
from samcache.locks import WriterLock
from samcache.progress import progress_bar


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
