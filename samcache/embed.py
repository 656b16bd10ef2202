"""Stage one: run the image encoder once per image and commit the embeddings to the cache.

DataLoader workers decode and resize images (and hash their files) while the main process
runs the encoder on batches, in inference mode, with bf16 autocast on CUDA by default.
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

import hashlib
import json
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset as TorchDataset

from samcache import cache as cache_store
from samcache.datasets import Dataset, ImageRecord
from samcache.distributed import SINGLE, Distributed
from samcache.errors import CacheError, SamcacheError
from samcache.fileio import sha256_file
from samcache.images import read_image
from samcache.models import load_sam
from samcache.preprocess import Preprocessing, batch_to_model_input, input_size, resize_image

PRECISIONS = ("auto", "fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class EmbedConfig:
    """Options of `samcache embed`.

    Arguments:
      model_type: "tiny", "vit_b", "vit_l" or "vit_h".
      checkpoint: weights file; None finds the official one, or for tiny its shipped pretrained
        weights (models.load_sam).
      random_init: tiny only: its random weights instead of the pretrained ones (for tests).
      batch_size: images per encoder forward; None: 8 on CUDA, 1 on CPU (where batching vit_b
        only adds memory traffic: see BENCHMARKS.md).
      device: "auto" (CUDA when available), "cpu" or "cuda".
      precision: "auto" (bf16 on CUDA and on CPUs with native bf16, else fp32), "fp32" or "bf16" autocast.
      workers: DataLoader worker processes decoding images (0: in the main process).
      strict: stop at the first image that fails to decode (after committing what is done).
      intensity: how >8-bit images become uint8 (images.read_image).
      shard_images, shard_seconds: commit a shard after this many images or seconds.
      progress: show a progress bar.
    """

    model_type: str = "tiny"
    checkpoint: Optional[Path] = None
    random_init: bool = False
    batch_size: Optional[int] = None
    device: str = "auto"
    precision: str = "auto"
    workers: int = 2
    strict: bool = False
    intensity: str = "percentile"
    shard_images: int = 64
    shard_seconds: float = 60.0
    progress: bool = True


@dataclass
class EmbedSummary:
    """What a run did; `line()` is the one-line summary the CLI prints."""

    embedded: int
    refreshed: int
    skipped: int
    failed: int
    previously_failed: int
    seconds: float
    bytes_on_disk: int
    images_in_cache: int
    cache_dir: str

    @property
    def images_per_second(self) -> float:
        return self.embedded / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        if self.embedded == self.refreshed == self.failed == 0:
            head = f"nothing to embed: all {self.skipped} images are already in {self.cache_dir}"
        else:
            head = (f"embedded {self.embedded} images in {self.seconds:.1f} s ({self.images_per_second:.2f} images/s), "
                    f"skipped {self.skipped} already cached, failed {self.failed}")
            if self.refreshed:
                head += f", refreshed annotations of {self.refreshed}"
        if self.previously_failed:
            head += f", {self.previously_failed} unchanged images that failed before"
        per_image = self.bytes_on_disk / max(self.images_in_cache, 1)
        return f"{head}; cache: {self.images_in_cache} images, {self.bytes_on_disk / 2**20:.1f} MiB ({per_image / 2**20:.2f} MiB/image)"


def resolve_device(device: str) -> torch.device:
    if device not in DEVICES:
        raise SamcacheError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SamcacheError("--device cuda was asked for, but PyTorch sees no CUDA device")
    return torch.device(device)


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision not in PRECISIONS:
        raise SamcacheError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "bf16" if device.type == "cuda" or cpu_has_native_bf16() else "fp32"
    return precision


def cuda_autocast(device: torch.device):
    """bf16 autocast on CUDA (training and evaluation); on the CPU, plain fp32."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def cpu_has_native_bf16() -> bool:
    """True on CPUs with bf16 instructions (AVX512-BF16, AMX), where bf16 autocast runs the encoder
    about twice as fast as fp32 with embeddings at cosine similarity >= 0.9999 (BENCHMARKS.md)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def annotations_sha256(record: ImageRecord) -> str:
    """A hash of what the cache stores about an image besides its pixels."""
    payload = [record.split, record.image_id] + [
        [o.object_id, list(o.box), o.category, o.rle["counts"]] for o in record.objects
    ]
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def cached_objects(record: ImageRecord) -> list[cache_store.CachedObject]:
    return [cache_store.CachedObject(o.object_id, o.box, o.category, o.rle) for o in record.objects]


class _DecodeImages(TorchDataset):
    """Decodes, hashes and resizes images in DataLoader workers; errors come back as values."""

    def __init__(self, records: list[ImageRecord], intensity: str, image_size: int):
        self.records, self.intensity, self.image_size = records, intensity, image_size

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        record = self.records[i]
        item: dict = {"i": i, "error": None, "sha256": "", "file_size": 0, "file_mtime_ns": 0}
        try:
            stat = os.stat(record.path)
            item.update(file_size=stat.st_size, file_mtime_ns=stat.st_mtime_ns, sha256=sha256_file(record.path))
            image = read_image(record.path, intensity=self.intensity)
            if image.shape[:2] != (record.height, record.width):
                raise SamcacheError(
                    f"{record.path}: decoded size {image.shape[0]}x{image.shape[1]} differs from the "
                    f"dataset's {record.height}x{record.width}"
                )
            item["image"] = torch.from_numpy(resize_image(image, self.image_size))
            # As a tensor it travels through shared memory: a large pickled message would leave a
            # worker orphaned by kill -9 blocked forever, flushing into a pipe nobody reads.
            item["preview"] = torch.frombuffer(bytearray(make_preview(image)), dtype=torch.uint8)
        except (SamcacheError, OSError) as exc:
            item["error"] = str(exc)
        return item


def make_preview(image: np.ndarray, size: int = cache_store.PREVIEW_SIZE, quality: int = 85) -> bytes:
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


class _ShardRotation:
    """Keeps one open shard and commits it when it is full or old enough."""

    def __init__(self, cache_dir: Path, provenance, *, rank: int, max_images: int, max_seconds: float):
        self.cache_dir, self.provenance, self.rank = cache_dir, provenance, rank
        self.max_images, self.max_seconds = max_images, max_seconds
        self.generation = cache_store.next_generation(cache_dir)
        self.sequence = 0
        self.writer: Optional[cache_store.ShardWriter] = None

    def current(self) -> cache_store.ShardWriter:
        if self.writer is None:
            self.writer = cache_store.ShardWriter(
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
            else:
                self.writer.abandon()
            self.writer = None

    def abandon(self) -> None:
        """Drops the open shard after a write error; committed shards are untouched."""
        if self.writer is not None:
            try:
                self.writer.abandon()
            except OSError:
                pass
            self.writer = None


def embed_dataset(
    dataset: Dataset, cache_dir: str | Path, config: EmbedConfig, *, dist: Distributed = SINGLE
) -> EmbedSummary:
    """Embeds every image of `dataset` not yet in the cache at `cache_dir` (this rank's share of them).

    Arguments:
      dataset: the records to embed (datasets.load_dataset).
      cache_dir: the cache folder; created if missing.
      config: the options.
      dist: this process's place under torchrun. Every rank plans from the same committed
        shards, then embeds pending[rank::world_size] into shards named after its rank; the
        summary counts all ranks.
    """
    start = time.time()
    cache_dir = Path(cache_dir)
    device = dist.device(resolve_device(config.device))
    precision = resolve_precision(config.precision, device)
    loaded = load_sam(config.model_type, config.checkpoint, random_init=config.random_init)
    preprocessing = Preprocessing(image_size=loaded.sam.image_encoder.img_size)
    provenance = cache_store.Provenance(
        model_type=loaded.model_type,
        weights_sha256=loaded.weights_sha256,
        preprocessing=preprocessing.as_dict(),
        intensity=config.intensity,
        compute_precision=precision,
        weights_source=loaded.weights_source,
    )
    # Rank 0 makes the header and clears what killed runs left; then every rank plans from the
    # same committed shards, and none commits before all have planned, so the slices agree.
    if dist.is_main:
        cache_store.open_for_writing(cache_dir, provenance)
        cache_store.remove_stale_temporaries(cache_dir)
    dist.barrier()
    if not dist.is_main:
        cache_store.open_for_writing(cache_dir, provenance)
    existing = cache_store.EmbeddingCache(cache_dir)
    pending, refresh, skipped, previously_failed = _plan(dataset.images, existing)
    pending, refresh = pending[dist.rank :: dist.world_size], refresh[dist.rank :: dist.world_size]
    rotation = _ShardRotation(cache_dir, provenance, rank=dist.rank, max_images=config.shard_images,
                              max_seconds=config.shard_seconds)
    dist.barrier()

    unreadable = _new_unreadable(dataset, existing) if dist.is_main else []
    for failure in unreadable:
        rotation.current().add_failure(failure)
    for record, index in refresh:
        info = existing.images[index]
        entry = _entry(record, info.sha256, info.file_size, info.file_mtime_ns, existing.preview_bytes(index))
        rotation.current().add(entry, existing.embedding(index))
        rotation.maybe_commit()

    encoder = loaded.sam.image_encoder.to(device).eval()
    embedded, failed = 0, 0
    loader = DataLoader(
        _DecodeImages(pending, config.intensity, preprocessing.image_size),
        batch_size=config.batch_size or (8 if device.type == "cuda" else 1), num_workers=config.workers,
        collate_fn=_collate,
        pin_memory=device.type == "cuda",
    )
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
    progress = _progress_bar(len(pending), config.progress and dist.is_main, dist.label())
    try:
        for batch in loader:
            good = [item for item in batch if item["error"] is None]
            if good:
                with torch.inference_mode(), autocast:
                    features = encoder(batch_to_model_input([item["image"] for item in good], device=device,
                                                            preprocessing=preprocessing))
                features = features.float().cpu().numpy()
                for item, feature in zip(good, features):
                    record = pending[item["i"]]
                    rotation.current().add(
                        _entry(record, item["sha256"], item["file_size"], item["file_mtime_ns"],
                               item["preview"].numpy().tobytes()),
                        feature)
                embedded += len(good)
            for item in batch:
                if item["error"] is not None:
                    record = pending[item["i"]]
                    rotation.current().add_failure(cache_store.FailedEntry(
                        record.name, str(record.path), item["sha256"], item["file_size"], item["file_mtime_ns"],
                        item["error"]))
                    failed += 1
                    progress.write(f"failed: {record.name}: {item['error']}")
                    if config.strict:
                        rotation.commit()
                        raise CacheError(f"--strict: {record.path} could not be embedded: {item['error']}")
            progress.update(len(batch))
            progress.set_postfix(failed=failed)
            rotation.maybe_commit()
            cache_store.crash_point("batch-done")
        rotation.commit()
    except OSError as exc:
        rotation.abandon()
        raise CacheError(
            f"could not write to {cache_dir}: {exc}. Every shard committed before this is intact; "
            "free space (or fix the folder) and run the same command again to finish"
        ) from exc
    finally:
        progress.close()
        existing.close()

    embedded, refreshed, failed = (int(v) for v in dist.sum([embedded, len(refresh), failed + len(unreadable)]))
    seconds = dist.max(time.time() - start)
    dist.barrier()  # every rank's shards are committed
    final = cache_store.EmbeddingCache(cache_dir)
    return EmbedSummary(
        embedded=embedded, refreshed=refreshed, skipped=len(skipped), failed=failed,
        previously_failed=len(previously_failed), seconds=seconds,
        bytes_on_disk=final.bytes_on_disk(), images_in_cache=len(final), cache_dir=str(cache_dir),
    )


def _plan(records: list[ImageRecord], existing: cache_store.EmbeddingCache):
    """Splits the dataset into (to embed, to refresh from the cache, up to date, failed before)."""
    failed_before = {f.name: f for f in existing.failed}
    pending, refresh, skipped, previously_failed = [], [], [], []
    for record in sorted(records, key=lambda r: r.name):
        index = existing.index_of(record.name)
        if index is not None:
            info = existing.images[index]
            if _same_file(record.path, info.file_size, info.file_mtime_ns, info.sha256):
                if info.annotations_sha256 == annotations_sha256(record):
                    skipped.append(record)
                else:
                    refresh.append((record, index))
                continue
        failure = failed_before.get(record.name)
        if failure is not None and _same_file(record.path, failure.file_size, failure.file_mtime_ns, failure.sha256):
            previously_failed.append(record)
            continue
        pending.append(record)
    return pending, refresh, skipped, previously_failed


def _new_unreadable(dataset: Dataset, existing: cache_store.EmbeddingCache) -> list[cache_store.FailedEntry]:
    """Images the dataset reader could not open, unless the cache already lists the same failure."""
    known = {(f.name, f.error) for f in existing.failed}
    return [
        cache_store.FailedEntry(p.unreadable_image, p.file, "", -1, -1, p.message)
        for p in dataset.problems
        if p.unreadable_image and (p.unreadable_image, p.message) not in known
    ]


def _same_file(path: Path, size: int, mtime_ns: int, sha256: str) -> bool:
    """Unchanged when size and mtime agree; when only the mtime moved, the content hash decides."""
    try:
        stat = os.stat(path)
    except OSError:
        return False
    if stat.st_size != size:
        return False
    return stat.st_mtime_ns == mtime_ns or (bool(sha256) and sha256_file(path) == sha256)


def _entry(record: ImageRecord, sha256: str, file_size: int, file_mtime_ns: int,
           preview_jpeg: bytes) -> cache_store.ImageEntry:
    return cache_store.ImageEntry(
        name=record.name, path=str(record.path), sha256=sha256, file_size=file_size, file_mtime_ns=file_mtime_ns,
        original_size=(record.height, record.width), input_size=input_size((record.height, record.width)),
        split=record.split, image_id=int(record.image_id), objects=cached_objects(record),
        annotations_sha256=annotations_sha256(record), preview_jpeg=preview_jpeg,
    )


def _progress_bar(total: int, enabled: bool, label: str = ""):
    from tqdm import tqdm

    return tqdm(total=total, unit="img", desc=f"embed {label}".strip(), disable=not enabled or total == 0,
                dynamic_ncols=True)
