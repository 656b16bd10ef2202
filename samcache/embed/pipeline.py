"""Stage one: run the image encoder once per image and commit the embeddings to the cache.

Images are decoded, resized and hashed (on CUDA in DataLoader workers, while the encoder runs;
on the CPU in the main process, between images: there the encoder uses every core) and encoded
by encoders.py: OpenVINO on the CPU, torch with bf16 autocast on CUDA, by default.
Results go into shards of the cache (see cache.py), committed every `shard_images` images or
`shard_seconds` seconds, whichever comes first: that is all a crash can lose.

Which images need work is decided from what the cache holds, by name:
- committed and unchanged (same file size and mtime, or same SHA-256; same annotations): skipped;
- committed, file unchanged, annotations edited: the stored embedding is copied to a new
  shard with the new objects (no encoder run);
- failed before with the same file: skipped (the reason stays in the cache);
- anything else: embedded.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset

from samcache.cache.format import (
    PREVIEW_SIZE,
    FailedEntry,
    ImageEntry,
    Provenance,
    is_cache,
    open_for_writing,
    read_followed_dataset,
    write_followed_dataset,
)
from samcache.cache.reader import DamagedImageError, EmbeddingCache
from samcache.cache.writer import ShardRotation, remove_stale_temporaries
from samcache.config import EmbedConfig
from samcache.data.datasets import Dataset, ImageRecord
from samcache.data.images import read_image
from samcache.data.views import View, parse_views
from samcache.devices import resolve_device, resolve_precision
from samcache.distributed import SINGLE, Distributed
from samcache.embed.encoders import open_encoder, resolve_backend
from samcache.errors import CacheError, OutputError, SamcacheError
from samcache.faults import crash_point
from samcache.fileio import FileIdentity
from samcache.locks import WriterLock
from samcache.models.families import family_of
from samcache.models.preprocess import (
    Preprocessing,
    batch_to_model_input,
    resize_image,
)
from samcache.models.weights import WeightsIdentity, identify_weights
from samcache.progress import progress_bar
from samcache.workers import batches_of


@dataclass
class EmbedSummary:
    """What a run did; `line()` is the one-line summary the CLI prints."""

    embedded: int
    refreshed: int
    restored: int
    skipped: int
    failed: int
    previously_failed: int
    dropped: int
    seconds: float
    bytes_on_disk: int
    images_in_cache: int
    cache_dir: str
    encoding_seconds: float = 0.0
    """The seconds of the images' own work: from the first image into the encoder to the last written."""

    @property
    def images_per_second(self) -> float:
        return self.embedded / self.seconds if self.seconds > 0 else 0.0

    @property
    def encoding_images_per_second(self) -> float:
        """The rate of the images' own work (decode, encoder, write), without opening the encoder
        or planning: what compares with a loop over a model already loaded."""
        return self.embedded / self.encoding_seconds if self.encoding_seconds > 0 else 0.0

    def line(self) -> str:
        if self.embedded == self.refreshed == self.restored == self.failed == self.dropped == 0:
            head = f"nothing to embed: all {self.skipped} images are already in {self.cache_dir}"
        else:
            head = (f"embedded {self.embedded} images in {self.seconds:.1f} s ({self.images_per_second:.2f} images/s"
                    + (f"; {self.encoding_images_per_second:.2f} images/s once the encoder was open"
                       if self.embedded else "")
                    + f"), skipped {self.skipped} already cached, failed {self.failed}")
            if self.refreshed:
                head += f", refreshed annotations of {self.refreshed}"
            if self.restored:
                head += f", restored {self.restored} from earlier shards (no encoder run)"
            if self.dropped:
                head += f", dropped {self.dropped} no longer in the dataset"
        if self.previously_failed:
            head += f", {self.previously_failed} unchanged images that failed before"
        per_image = self.bytes_on_disk / max(self.images_in_cache, 1)
        return (f"{head}; cache: {self.images_in_cache} images, {self.bytes_on_disk / 2**20:.1f} MiB "
                f"({per_image / 2**20:.2f} MiB/image)")


def annotations_sha256(record: ImageRecord) -> str:
    """A hash of what the cache stores about an image besides its pixels."""
    payload = [record.split, record.image_id] + [
        [o.object_id, list(o.box), o.category, o.rle["counts"]] for o in record.objects
    ]
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


class _DecodeImages(TorchDataset):
    """Decodes, hashes and resizes images in DataLoader workers; errors come back as values.
    `resize` False hands the decoded image on as it is (SAM 2.1 resizes the float image itself);
    `views` (data/views.py) are made from the resized image, each its own encoder input."""

    def __init__(self, records: list[ImageRecord], intensity: str, image_size: int, *, resize: bool = True,
                 views: tuple[View, ...] = ()):
        self.records, self.intensity, self.image_size, self.resize = records, intensity, image_size, resize
        self.views = views

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        record = self.records[i]
        item: dict = {"i": i, "error": None, "file": FileIdentity(str(record.path), "", 0, 0)}
        try:
            item["file"] = FileIdentity.of(record.path)
            image = read_image(record.path, intensity=self.intensity)
            if image.shape[:2] != (record.height, record.width):
                raise SamcacheError(
                    f"{record.path}: decoded size {image.shape[0]}x{image.shape[1]} differs from the "
                    f"dataset's {record.height}x{record.width}"
                )
            model_image = resize_image(image, self.image_size) if self.resize else image
            item["image"] = torch.from_numpy(model_image)
            item["views"] = [torch.from_numpy(view.input_image(model_image)) for view in self.views]
            # As a tensor it travels through shared memory: a large pickled message would leave a
            # worker orphaned by kill -9 blocked forever, flushing into a pipe nobody reads.
            item["preview"] = torch.frombuffer(bytearray(make_preview(image)), dtype=torch.uint8)
        except (SamcacheError, OSError) as exc:
            item["error"] = str(exc)
        return item


def make_preview(image: np.ndarray, size: int = PREVIEW_SIZE, quality: int = 85) -> bytes:
    """A small JPEG of an RGB image (longest side `size`) that reports draw on."""
    import cv2

    scale = size / max(image.shape[:2])
    if scale < 1:
        image = cv2.resize(image, (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale))),
                           interpolation=cv2.INTER_AREA)
    ok, data = cv2.imencode(".jpg", np.ascontiguousarray(image[..., ::-1]), [cv2.IMWRITE_JPEG_QUALITY, quality])
    return data.tobytes() if ok else b""


def _collate(items: list[dict]) -> list[dict]:
    return items


def embed_dataset(
    dataset: Dataset, cache_dir: str | Path, config: EmbedConfig, *, dataset_path: Optional[str | Path] = None,
    switch_dataset: bool = False, dist: Distributed = SINGLE
) -> EmbedSummary:
    """Embeds every image of `dataset` not yet in the cache at `cache_dir` (this rank's share of them).

    Arguments:
      dataset: the records to embed (datasets.load_dataset).
      cache_dir: the cache folder; created if missing.
      config: the options.
      dataset_path: what the dataset was read from (a COCO file, a folder); default its root. The
        cache follows one dataset: another one that lacks images the cache holds is refused.
      switch_dataset: follow this dataset from now on even though it lacks images the cache holds
        (they leave the cache's view; their embeddings stay in the shards).
      dist: this process's place under torchrun. Every rank plans from the same committed
        shards, then embeds pending[rank::world_size] into shards named after its rank; the
        summary counts all ranks.
    """
    cache_dir = Path(cache_dir)
    source = str(Path(dataset_path if dataset_path is not None else dataset.root).resolve())
    with WriterLock(cache_dir, what="cache", enabled=dist.is_main):  # under torchrun rank 0 holds it for all
        return _embed(dataset, source, cache_dir, config, switch_dataset, dist)


def _embed(dataset: Dataset, source: str, cache_dir: Path, config: EmbedConfig, switch_dataset: bool,
           dist: Distributed) -> EmbedSummary:
    start = time.time()
    device = dist.device(resolve_device(config.device))
    precision = resolve_precision(config.precision, device)
    # Only the weights' identity now: the model is built when there is something to encode, and
    # not at all when the encoder was converted to OpenVINO before (encoders.py).
    if config.tail_blocks:  # refused before looking for weights, which may need a download
        family_of(config.model_type).check_tail_blocks(config.tail_blocks, config.model_type)
    views = parse_views(config.views)
    if views:
        family_of(config.model_type).check_views(config.model_type)
    weights = identify_weights(config.model_type, config.checkpoint, random_init=config.random_init)
    preprocessing = family_of(config.model_type).preprocessing
    backend = resolve_backend(config.backend, device, config.model_type)
    provenance = _provenance(weights, preprocessing, config, precision, backend)
    encoder = None
    if not is_cache(cache_dir) and dataset.images:  # a new cache: weights that do not load leave nothing behind
        encoder = open_encoder(weights, backend, device, precision, tail_blocks=config.tail_blocks,
                               say=_say(config, dist))
    existing = _open_cache(cache_dir, provenance, dist)
    gone = _no_longer_in(dataset, existing)
    pending, refresh, skipped, previously_failed = _plan(dataset.images, existing)
    replaced = [record.name for record in pending if existing.index_of(record.name) is not None]
    _follow(cache_dir, source, dataset.format, gone, replaced, switch_dataset, dist)
    pending, refresh = pending[dist.rank :: dist.world_size], refresh[dist.rank :: dist.world_size]
    rotation = ShardRotation(cache_dir, provenance, rank=dist.rank, max_images=config.shard_images,
                              max_seconds=config.shard_seconds, indexed=len(existing.shards))
    dist.barrier()  # none commits before all have planned, so the slices agree

    unreadable = _new_unreadable(dataset, existing) if dist.is_main else []
    gone = gone if dist.is_main else []
    not_restored = 0
    try:
        for name in gone:  # the shards stay as they are; a record takes the image out of the cache's view
            rotation.current().add_removal(name, "not in the dataset any more")
        for failure in unreadable:
            rotation.current().add_failure(failure)
        for copy in refresh:  # annotations edited, or an earlier image back: no encoder run
            try:
                embedding, preview = copy.embedding(), copy.preview()
            except (DamagedImageError, OSError, KeyError):
                if not copy.restored:
                    raise
                pending.append(copy.record)  # damaged in its old shard (verify took it out): embed it anew
                not_restored += 1
                continue
            rotation.current().add(_entry(copy.record, copy.file, preview, weights.model_type), embedding)
            rotation.maybe_commit()
        embedded, failed, encoding_seconds = _run_encoder(weights, backend, pending, rotation, config, device,
                                                          precision, preprocessing, dist, encoder, views)
        rotation.commit()
    except OSError as exc:
        rotation.abandon()
        raise CacheError(
            f"could not write to {cache_dir}: {exc.strerror or exc}. Every shard committed before this is intact; "
            "free space (or fix the folder) and run the same command again to finish"
        ) from exc
    finally:
        existing.close()

    restored = sum(copy.restored for copy in refresh)
    embedded, refreshed, restored, failed, dropped = (int(v) for v in dist.sum(
        [embedded, len(refresh) - restored, restored - not_restored, failed + len(unreadable), len(gone)]))
    seconds, encoding_seconds = dist.max(time.time() - start), dist.max(encoding_seconds)
    dist.barrier()  # every rank's shards are committed
    final = EmbeddingCache(cache_dir)
    if dist.is_main and final.shards_outside_index:
        try:
            final.save_index()
        except OutputError:
            pass  # index.npz only makes opening faster; readers read the shards' own tables without it
    return EmbedSummary(
        embedded=embedded, refreshed=refreshed, restored=restored, skipped=len(skipped), failed=failed,
        previously_failed=len(previously_failed), dropped=dropped, seconds=seconds,
        encoding_seconds=encoding_seconds, bytes_on_disk=final.bytes_on_disk(), images_in_cache=len(final),
        cache_dir=str(cache_dir),
    )


def _follow(cache_dir: Path, source: str, dataset_format: str, gone: list[str], replaced: list[str],
            switch_dataset: bool, dist: Distributed) -> None:
    """Refuses a dataset other than the one the cache follows when embedding it would take images
    out of the cache (`gone`) or replace their embeddings (`replaced`: same name, other pixels);
    records the dataset the cache follows. The dataset it follows may change its images: that is
    what following means."""
    followed = read_followed_dataset(cache_dir)
    if followed is not None and followed["path"] == source:
        return
    moved = followed is not None and not Path(followed["path"]).exists()  # the same dataset, elsewhere now
    if (gone or replaced) and not (switch_dataset or moved):
        where = (f"{cache_dir} follows the dataset {followed['path']}" if followed is not None
                 else f"{cache_dir} was made before caches recorded their dataset")
        losses = []
        if gone:
            losses.append(f"lacks {_count(gone)} of the cache's images")
        if replaced:
            losses.append(f"has other images under {_count(replaced)} of its names")
        raise CacheError(
            f"{where}; {source} {' and '.join(losses)}: embedding it would take them out of the cache. Pass "
            "--switch-dataset to make the cache follow it (their embeddings stay in the shards: switching back "
            "restores them without the encoder), or choose another --out")
    if dist.is_main:  # a new cache, a moved or grown dataset, or a switch the user asked for
        write_followed_dataset(cache_dir, source, dataset_format)


def _count(names: list[str]) -> str:
    return f"{len(names)} ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"


def _say(config: EmbedConfig, dist: Distributed):
    return print if config.progress and dist.is_main else (lambda line: None)


def _open_cache(cache_dir: Path, provenance: Provenance, dist: Distributed) -> EmbeddingCache:
    """Rank 0 makes (or checks) the header and clears what killed runs left; then every rank
    opens the same committed shards."""
    if dist.is_main:
        open_for_writing(cache_dir, provenance)
        remove_stale_temporaries(cache_dir)
    dist.barrier()
    if not dist.is_main:
        open_for_writing(cache_dir, provenance)
    return EmbeddingCache(cache_dir)


def _provenance(weights: WeightsIdentity, preprocessing: Preprocessing, config: EmbedConfig,
                precision: str, backend: str) -> Provenance:
    return Provenance(
        model_type=weights.model_type,
        weights_sha256=weights.weights_sha256,
        preprocessing=preprocessing.as_dict(),
        intensity=config.intensity,
        compute_precision=precision,
        encoder_backend=backend,
        weights_source=weights.weights_source,
        tail_blocks=config.tail_blocks,
        views=tuple(view.name for view in parse_views(config.views)),
    )


def decoding_workers(config: EmbedConfig, device: torch.device) -> int:
    """`config.workers`, or its default for the device (see EmbedConfig.workers)."""
    if config.workers is not None:
        return config.workers
    return 2 if device.type == "cuda" else 0


def _run_encoder(weights: WeightsIdentity, backend: str, pending: list[ImageRecord], rotation: ShardRotation,
                 config: EmbedConfig, device: torch.device, precision: str, preprocessing: Preprocessing,
                 dist: Distributed, encoder=None, views: tuple[View, ...] = ()) -> tuple[int, int, float]:
    """Decodes `pending` (in DataLoader workers, or in this process: decoding_workers) and encodes
    them (and their `views`) in batches into the rotation's shards (with `encoder` when it is open
    already); returns (embedded, failed, seconds from the first batch on)."""
    if not pending:
        return 0, 0, 0.0
    if encoder is None:
        encoder = open_encoder(weights, backend, device, precision, tail_blocks=config.tail_blocks,
                               say=_say(config, dist))
    resize = family_of(weights.model_type).resizes_in_workers
    embedded, failed = 0, 0
    loader = DataLoader(
        _DecodeImages(pending, config.intensity, preprocessing.image_size, resize=resize, views=views),
        batch_size=config.batch_size or (8 if device.type == "cuda" else 1),
        num_workers=decoding_workers(config, device),
        collate_fn=_collate,
        pin_memory=device.type == "cuda",
    )
    progress = _progress_bar(len(pending), config.progress and dist.is_main, dist.label())
    started = time.time()
    try:
        with batches_of(loader) as batches:
            for batch in batches:
                good = [item for item in batch if item["error"] is None]
                if good:
                    images = [image for item in good for image in (item["image"], *item["views"])]
                    features = encoder(batch_to_model_input(images, device=device, preprocessing=preprocessing)
                                       if resize else images)
                    if views:  # each image's features, then its views', stacked: (1 + V, C, 64, 64)
                        features = features.reshape(len(good), 1 + len(views), *features.shape[1:])
                    for item, feature in zip(good, features):
                        entry = _entry(pending[item["i"]], item["file"], item["preview"].numpy().tobytes(),
                                       weights.model_type)
                        rotation.current().add(entry, feature)
                    embedded += len(good)
                for item in batch:
                    if item["error"] is not None:
                        record = pending[item["i"]]
                        rotation.current().add_failure(FailedEntry(record.name, item["file"], item["error"]))
                        failed += 1
                        progress.write(f"failed: {record.name}: {item['error']}")
                        if config.strict:
                            rotation.commit()
                            raise CacheError(f"--strict: {record.path} could not be embedded: {item['error']}")
                progress.update(len(batch))
                progress.set_postfix(failed=failed)
                rotation.maybe_commit()
                crash_point("batch-done")
    finally:
        progress.close()
    return embedded, failed, time.time() - started


@dataclass
class _Copy:
    """An image whose stored embedding goes into a new shard with its current record: its
    annotations changed, or an image the cache dropped (or replaced) is back with the same pixels."""

    record: ImageRecord
    file: FileIdentity
    preview: Callable[[], bytes]
    embedding: Callable[[], np.ndarray]
    restored: bool = False


def _plan(records: list[ImageRecord], existing: EmbeddingCache):
    """Splits the dataset into (to embed, to copy from the cache, up to date, failed before)."""
    failed_before = {f.name: f for f in existing.failed}
    pending, refresh, skipped, previously_failed = [], [], [], []
    for record in sorted(records, key=lambda r: r.name):
        index = existing.index_of(record.name)
        if index is not None:
            if existing.file_of(index).unchanged(record.path):
                if existing.annotations_sha256_of(index) == annotations_sha256(record):
                    skipped.append(record)
                else:
                    refresh.append(_Copy(record, existing.file_of(index), partial(existing.preview_bytes, index),
                                         partial(existing.stored_features, index)))
                continue
        failure = failed_before.get(record.name)
        if failure is not None and failure.file.unchanged(record.path):
            previously_failed.append(record)
            continue
        earlier = existing.earlier_record(record.name, record.path)
        if earlier is not None:
            refresh.append(_Copy(record, earlier.file, earlier.preview_bytes, earlier.embedding, restored=True))
            continue
        pending.append(record)
    return pending, refresh, skipped, previously_failed


def _new_unreadable(dataset: Dataset, existing: EmbeddingCache) -> list[FailedEntry]:
    """Images the dataset reader could not open, unless the cache already lists the same failure."""
    known = {(f.name, f.error) for f in existing.failed}
    return [
        FailedEntry(p.unreadable_image, FileIdentity(p.file, "", -1, -1), p.message)
        for p in dataset.problems
        if p.unreadable_image and (p.unreadable_image, p.message) not in known
    ]


def _no_longer_in(dataset: Dataset, existing: EmbeddingCache) -> list[str]:
    """Cached images (and failures) whose names the dataset no longer has, unreadable ones included."""
    present = {record.name for record in dataset.images} | {p.unreadable_image for p in dataset.problems}
    cached = {existing.name_of(i) for i in range(len(existing))}
    return sorted((cached | {f.name for f in existing.failed}) - present)


def _entry(record: ImageRecord, file: FileIdentity, preview_jpeg: bytes, model_type: str) -> ImageEntry:
    original_size = (record.height, record.width)
    return ImageEntry(
        image_id=int(record.image_id), name=record.name, file=dataclasses.replace(file, path=str(record.path)),
        original_size=original_size, split=record.split, objects=list(record.objects),
        input_size=family_of(model_type).input_size(original_size), annotations_sha256=annotations_sha256(record),
        preview_jpeg=preview_jpeg,
    )


def _progress_bar(total: int, enabled: bool, label: str = ""):
    return progress_bar(total, desc=f"embed {label}".strip(), unit="img", enabled=enabled and total > 0)
