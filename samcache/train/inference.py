"""Inference: embeddings + prompts -> one binary mask per prompt at the original resolution.

Training validation, `samcache eval`, `samcache predict` and the tiny model's held-out
evaluation all make their masks here, so they agree by construction:

    features + PromptBatch --decoder--> logits of the 4 mask outputs (256 x 256)
      --choose_mask--> the single-mask output, or the best-scored of the 3 for a single point
      --decoder.upscale--> (H, W) at the original resolution --> logit > 0 --> boolean mask

The decoder is the model family's (families.ModelFamily.decoder): SAM's decodes and upscales as
SamPredictor, SAM 2.1's as SAM2ImagePredictor.

`predict_cached_objects` is the same path over a cache: fixed prompts for every object of
some images, read in batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from samcache.cache.format import ImageInfo
from samcache.cache.reader import EmbeddingCache
from samcache.devices import autocast
from samcache.models.decoder import PromptDecoder, choose_mask
from samcache.models.prompts import PromptBatch
from samcache.train.samples import CacheSamples, EmbeddingStore, EpochBatches, SampleSettings, collate

Size = tuple[int, int]


@dataclass
class MaskPrediction:
    """One prompt's mask at the original resolution and its predicted IoU; `low_res_logits`: the
    chosen mask's (256, 256) logits, what a further prompt on the same object takes as its mask
    prompt (`SamPredictor.predict(mask_input=...)`)."""

    mask: np.ndarray
    score: float
    low_res_logits: Optional[torch.Tensor] = None


@dataclass
class ObjectPrediction:
    """The prediction for object `object_index` of a cached image."""

    info: ImageInfo
    object_index: int
    mask: np.ndarray
    score: float


@torch.no_grad()
def predict_masks(decoder: PromptDecoder, embeddings: torch.Tensor, prompts: PromptBatch,
                  sizes: Sequence[tuple[Size, Size]], *, precision: str = "fp32") -> list[MaskPrediction]:
    """One mask per prompt, in the prompts' order.

    Arguments:
      decoder: the model's prompt encoder and mask decoder (families.ModelFamily.decoder), any weights.
      embeddings: (B, C, 64, 64) features on the decoder's device, as the cache hands them out.
      prompts: prompt n is for embedding row `prompts.batch_row[n]`.
      sizes: for each embedding row, (input_size, original_size) of its image.
      precision: "fp32", or "bf16" autocast for the decoder.
    """
    with autocast(embeddings.device, precision):
        output = decoder(embeddings.float(), prompts)
    logits, scores = choose_mask(output, prompts.multimask)
    logits, scores = logits.float(), scores.float().tolist()
    predictions = []
    for n, row in enumerate(prompts.batch_row.tolist()):
        input_size, original_size = sizes[row]
        # One prompt at a time: a batch of full-resolution maps of a large scan would not fit.
        mask = decoder.upscale(logits[n : n + 1], input_size, original_size)[0] > 0
        predictions.append(MaskPrediction(mask.cpu().numpy(), scores[n], logits[n].detach()))
    return predictions


def predict_cached_objects(decoder: PromptDecoder, cache: EmbeddingCache,
                           indices: list[int], settings: SampleSettings, *, device: torch.device,
                           precision: str = "fp32", batch_size: int = 4,
                           store: Optional[EmbeddingStore] = None) -> Iterator[ObjectPrediction]:
    """Fixed-prompt predictions for the objects of the cached images `indices` (see SampleSettings).

    Arguments:
      store: the embeddings already in memory (training holds them); None reads the cache.
    """
    samples = CacheSamples(cache, settings, read_embeddings=store is None, features=decoder.reads)
    loader = DataLoader(samples, batch_sampler=EpochBatches(indices, batch_size, 0, shuffle=False),
                        num_workers=0, collate_fn=collate)
    for batch in loader:
        embeddings = store.gather(batch.indices) if store is not None else batch.embeddings.to(device)
        infos = [cache.images[index] for index in batch.indices]
        predictions = predict_masks(decoder, embeddings, batch.prompts.to(device),
                                    [(info.input_size, info.original_size) for info in infos], precision=precision)
        seen = [0] * len(infos)  # the prompts of an image are its objects, in order
        for row, prediction in zip(batch.prompts.batch_row.tolist(), predictions):
            yield ObjectPrediction(infos[row], seen[row], prediction.mask, prediction.score)
            seen[row] += 1
