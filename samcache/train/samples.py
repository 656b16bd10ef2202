"""Training and validation samples read from the cache.

A sample is one image: its embedding (read once) and up to K of its objects, each with a
prompt and a low-res target. Batches are B such images, so one step sees B x K prompts.

Everything random is a function of (seed, epoch, image): the batch order of an epoch comes
from `EpochBatches`, the objects and prompts of an image from `prompts.rng_for`. Resuming at
batch s of epoch e therefore replays exactly the batches an uninterrupted run would have
seen, whatever the number of DataLoader workers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np
import torch
from torch.utils.data import Dataset as TorchDataset
from torch.utils.data import Sampler

from samcache.cache.reader import EmbeddingCache
from samcache.config import EPOCH_SEED_STRIDE, PromptSettings
from samcache.devices import available_memory_bytes
from samcache.models.prompts import (
    PromptBatch,
    click_schedule,
    evaluation_box,
    evaluation_prompt,
    low_res_size,
    low_res_target,
    rng_for,
    training_prompt,
)
from samcache.models.specs import LOW_RES_SIZE

VIEW_DRAW = 1
"""rng_for's last key of an image's view draw: (seed, epoch, image, 0) draws its objects, so the view
draw takes its own stream (seed, epoch, image, 0, VIEW_DRAW)."""


class EmbeddingStore:
    """All the embeddings a run needs (for SAM 2.1 its packed features), held in memory (RAM, or GPU
    memory) so epochs do no I/O.

    Arguments:
      cache: the cache to read.
      indices: the image indices to hold.
      device: where to keep them.
      features: which features of each image (EmbeddingCache.features): "embedding", or
        "tail_tokens" when a run trains the encoder's tail.
      views: also hold each image's views (the cache's `views`), for training that draws them.
    """

    def __init__(self, cache: EmbeddingCache, indices: list[int], device: torch.device | str = "cpu", *,
                 features: str = "embedding", views: bool = False):
        self.row_of = {index: row for row, index in enumerate(indices)}
        shape, self.views = cache.feature_shape(features), len(cache.views) if views else 0
        self.embeddings = torch.empty((len(indices), 1 + self.views, *shape), dtype=torch.float16, device=device)
        for row, index in enumerate(indices):
            for view in range(1 + self.views):
                self.embeddings[row, view] = torch.from_numpy(cache.features(index, features, view)).to(device)

    def gather(self, indices: list[int], views: Optional[list[int]] = None) -> torch.Tensor:
        """The features of images `indices` (of their views number `views`, 0 the original)."""
        rows = torch.tensor([self.row_of[i] for i in indices], device=self.embeddings.device)
        columns = torch.tensor(views or [0] * len(indices), device=self.embeddings.device)
        return self.embeddings[rows, columns]


def should_hold_in_memory(policy: str, n_images: int, device: torch.device, budget_bytes: Optional[int], *,
                          shape: tuple[int, ...]) -> bool:
    """`yes`/`no`, or for `auto`: when the features (fp16, each of `shape`) fit in the budget
    (default: half the free memory)."""
    if policy in ("yes", "no"):
        return policy == "yes"
    if policy != "auto":
        raise ValueError(f"cache-in-memory must be auto, yes or no, not {policy!r}")
    need = n_images * 2 * math.prod(shape)
    budget = budget_bytes if budget_bytes is not None else available_memory_bytes(device) // 2
    return need <= budget


class EpochBatches(Sampler):
    """Batches of image indices: a seeded shuffle per epoch, resumable at any batch.

    Arguments:
      indices: the images to draw from.
      batch_size: images per batch (the last batch of an epoch may be smaller).
      seed: the run's seed; epoch e's order is a function of (seed, e) only.
      shuffle: False keeps the given order (validation).
      rank, world_size: under DistributedDataParallel, each rank takes every world_size-th image
        of every global batch (from position rank), so the ranks together see exactly the
        single-process batches; a rank's share of a short last batch may be empty.
    """

    def __init__(self, indices: list[int], batch_size: int, seed: int, *, shuffle: bool = True,
                 rank: int = 0, world_size: int = 1):
        self.indices, self.batch_size, self.seed, self.shuffle = list(indices), batch_size, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def global_batches(self) -> list[list[int]]:
        order = self.indices
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * EPOCH_SEED_STRIDE + self.epoch)
            order = [self.indices[i] for i in torch.randperm(len(self.indices), generator=generator).tolist()]
        return [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]

    def __len__(self) -> int:
        return max(0, len(self.global_batches()) - self.start_batch)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for batch in self.global_batches()[self.start_batch :]:
            share = batch[self.rank :: self.world_size] if self.world_size > 1 else batch
            yield [(self.epoch, index) for index in share]


@dataclass(frozen=True, kw_only=True)
class SampleSettings:
    """What one image contributes to a step: `training` prompts drawn anew each epoch, or `fixed`
    evaluation prompts for every object.

    Arguments:
      objects_per_image: K, objects sampled per image (all when it has fewer); 0: every object.
      prompts: how training prompts are drawn; None for fixed evaluation prompts.
      eval_prompt: "box" or "point", the fixed prompt kind when `prompts` is None.
      seed: the run's seed.
      eval_box_jitter: with fixed prompts, move box sides by up to this fraction (at most 20 px),
        seeded by (seed, image, object), to test robustness to loose boxes; 0 keeps exact boxes.
    """

    objects_per_image: int
    prompts: Optional[PromptSettings]
    eval_prompt: str = "box"
    seed: int = 0
    eval_box_jitter: float = 0.0

    @classmethod
    def training(cls, *, objects_per_image: int, prompts: PromptSettings, seed: int) -> "SampleSettings":
        """Up to `objects_per_image` objects per image, prompts drawn as `prompts` says."""
        return cls(objects_per_image=objects_per_image, prompts=prompts, seed=seed)

    @classmethod
    def fixed(cls, kind: str, *, seed: int, box_jitter: float = 0.0) -> "SampleSettings":
        """Every object of each image, with the fixed prompt `kind` ("box" or "point")."""
        return cls(objects_per_image=0, prompts=None, eval_prompt=kind, seed=seed, eval_box_jitter=box_jitter)


class CacheSamples(TorchDataset):
    """Item (epoch, image index) -> one image's embedding (unless held in memory), prompts, targets.

    With training prompts from a cache that holds views (`embed --views`), each item is one of the
    image's original and views, drawn as a function of (seed, epoch, image): the objects, the frame
    and the features are the view's (data/views.py). Fixed prompts always read the original.
    h5py handles are opened lazily inside each DataLoader worker by `EmbeddingCache`.
    """

    def __init__(self, cache: EmbeddingCache, settings: SampleSettings, *, read_embeddings: bool = True,
                 features: str = "embedding"):
        self.cache, self.settings, self.read_embeddings, self.features = cache, settings, read_embeddings, features

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        epoch, index = key
        info = self.cache.images[index]
        s = self.settings
        objects = info.objects
        if s.prompts is not None and len(objects) > s.objects_per_image:
            chosen = rng_for(s.seed, epoch, index, 0).choice(len(objects), s.objects_per_image, replace=False)
            objects = [objects[i] for i in sorted(chosen)]
        elif s.prompts is None:
            objects = objects[: s.objects_per_image] if s.objects_per_image else objects
        view = self.view_of(epoch, index)
        original_size, input_size = info.original_size, info.input_size
        if view:
            chosen_view = self.cache.views[view - 1]
            objects = chosen_view.objects(objects, original_size)
            original_size, input_size = chosen_view.original_size(original_size), chosen_view.input_size(input_size)
        prompts, schedules = [], []
        for j, obj in enumerate(objects):
            if s.prompts is None:
                box = evaluation_box(obj.box, original_size, jitter=s.eval_box_jitter, seed=s.seed,
                                     image_index=index, object_number=j + 1)
                prompts.append(evaluation_prompt(obj.rle, box, original_size, s.eval_prompt, frame=input_size))
            else:
                rng = rng_for(s.seed, epoch, index, j + 1)
                prompts.append(training_prompt(obj.rle, obj.box, original_size, s.prompts, rng, frame=input_size))
                if s.prompts.mode == "interactive":
                    schedules.append(click_schedule(s.prompts, s.seed, epoch, index, j + 1))
        item = {
            "index": index,
            "view": view,
            "prompts": prompts,
            "targets": np.stack([low_res_target(o.rle, input_size) for o in objects]) if objects else
            np.zeros((0, LOW_RES_SIZE, LOW_RES_SIZE), np.float32),
        }
        if schedules:
            item["schedules"] = np.stack(schedules)
            item["valid_sizes"] = np.tile(np.array(low_res_size(input_size)), (len(objects), 1))
        if self.read_embeddings:
            item["embedding"] = torch.from_numpy(self.cache.features(index, self.features, view))
        return item

    def view_of(self, epoch: int, index: int) -> int:
        """Which of image `index`'s original (0) and views (1..V) epoch `epoch` trains on: uniform, a
        function of (seed, epoch, image) alone, so a resumed run draws what an uninterrupted one did."""
        views = self.cache.views
        if self.settings.prompts is None or not views:
            return 0
        return int(rng_for(self.settings.seed, epoch, index, 0, VIEW_DRAW).integers(0, 1 + len(views)))


@dataclass
class ClickSchedules:
    """The interactive recipe's draws for N prompts (prompts.click_schedule).

    Arguments:
      draws: (N, 3, passes) float: rows adds_point, uses_mask (0/1), pick (uniform in [0, 1)).
      valid_sizes: (N, 2) long, (height, width) of each prompt's image in the 256x256 frame:
        corrective points are never drawn in the padding.
      trained: (passes,) bool, the passes whose loss is backpropagated (prompts.trained_passes, set
        per step by the trainer: every rank's share of a step trains the same passes); None: all of them.
    """

    draws: torch.Tensor
    valid_sizes: torch.Tensor
    trained: Optional[torch.Tensor] = None

    def to(self, device) -> "ClickSchedules":
        return ClickSchedules(self.draws.to(device), self.valid_sizes.to(device),
                              None if self.trained is None else self.trained.to(device))


@dataclass
class Batch:
    """A collated batch: B images (cache indices; their embeddings, unless held in memory) and
    N prompts with their (N, 256, 256) low-res targets (and, with --prompt interactive, their
    click schedules)."""

    indices: list[int]
    embeddings: Optional[torch.Tensor]
    prompts: PromptBatch
    targets: torch.Tensor
    schedules: Optional[ClickSchedules] = None
    views: Optional[list[int]] = None

    @property
    def n_prompts(self) -> int:
        return int(self.targets.shape[0])


def collate(items: list[dict]) -> Optional[Batch]:
    """Samples -> one Batch; None for no samples (a rank's empty share of a short last batch)."""
    if not items:
        return None
    prompts = [p for item in items for p in item["prompts"]]
    batch_row = torch.tensor([b for b, item in enumerate(items) for _ in item["prompts"]], dtype=torch.long)
    return Batch(
        indices=[item["index"] for item in items],
        embeddings=torch.stack([item["embedding"] for item in items]) if "embedding" in items[0] else None,
        prompts=PromptBatch.from_prompts(prompts, batch_row),
        targets=torch.from_numpy(np.concatenate([item["targets"] for item in items])),
        schedules=_collate_schedules(items),
        views=[item["view"] for item in items],
    )


def _collate_schedules(items: list[dict]) -> Optional[ClickSchedules]:
    with_objects = [item for item in items if "schedules" in item]
    if not with_objects:
        return None
    return ClickSchedules(torch.from_numpy(np.concatenate([item["schedules"] for item in with_objects])),
                          torch.from_numpy(np.concatenate([item["valid_sizes"] for item in with_objects])).long())
