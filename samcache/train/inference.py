"""Inference: embeddings + prompts -> one binary mask per prompt at the original resolution.

Training validation, `samcache eval`, `samcache predict` and the tiny model's held-out
evaluation all make their masks here, so they agree by construction:

    embeddings + PromptBatch --decode--> logits of the 4 mask outputs (256 x 256)
      --choose_mask--> the single-mask output, or the best-scored of the 3 for a single point
      --upscale_logits--> (H, W) as Sam.postprocess_masks --> logit > 0 --> boolean mask

For SAM 2.1 the decoder is sam2_decoder.py's and the upscaling SAM2Transforms.postprocess_masks'
(bilinear straight to the original size: its input frame is the whole image, stretched).

`predict_cached_objects` is the same path over a cache: fixed prompts for every object of
some images, read in batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.modeling import MaskDecoder, PromptEncoder
from torch.utils.data import DataLoader

from samcache.cache.format import ImageInfo
from samcache.cache.reader import EmbeddingCache
from samcache.devices import autocast
from samcache.models.decoder import DecoderOutput, decode
from samcache.models.prompts import PromptBatch
from samcache.models.sam2_decoder import is_sam2_decoder
from samcache.models.specs import IMAGE_SIZE
from samcache.train.samples import CacheSamples, EmbeddingStore, EpochBatches, SampleSettings, collate

Size = tuple[int, int]


@dataclass
class MaskPrediction:
    """One prompt's mask at the original resolution and its predicted IoU."""

    mask: np.ndarray
    score: float


@dataclass
class ObjectPrediction:
    """The prediction for object `object_index` of a cached image."""

    info: ImageInfo
    object_index: int
    mask: np.ndarray
    score: float


def choose_mask(output: DecoderOutput, multimask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (N, 256, 256), predicted IoU (N,)): output 0 (SamPredictor's multimask_output=False)
    unless `multimask` (PromptBatch.multimask), then the highest predicted IoU of outputs 1-3."""
    multi_best = 1 + output.iou_pred[:, 1:].argmax(dim=1)
    choice = torch.where(multimask, multi_best, torch.zeros_like(multi_best))
    rows = torch.arange(choice.shape[0], device=choice.device)
    return output.logits[rows, choice], output.iou_pred[rows, choice]


def upscale_logits(logits: torch.Tensor, input_size: Size, original_size: Size,
                   image_size: int = IMAGE_SIZE, *, stretched: bool = False) -> torch.Tensor:
    """Low-res logits (N, 256, 256) -> (N, H, W) at the original resolution, as `Sam.postprocess_masks`:
    bilinear to the padded input frame, crop the padding, bilinear to the original size. `stretched`
    (SAM 2.1, whose frame is the whole image): bilinear to the original size at once, as
    SAM2Transforms.postprocess_masks."""
    if stretched:
        return F.interpolate(logits.unsqueeze(1), original_size, mode="bilinear", align_corners=False).squeeze(1)
    x = F.interpolate(logits.unsqueeze(1), (image_size, image_size), mode="bilinear", align_corners=False)
    x = x[..., : input_size[0], : input_size[1]]
    return F.interpolate(x, original_size, mode="bilinear", align_corners=False).squeeze(1)


@torch.no_grad()
def predict_masks(prompt_encoder: PromptEncoder, mask_decoder: MaskDecoder, embeddings: torch.Tensor,
                  prompts: PromptBatch, sizes: Sequence[tuple[Size, Size]], *,
                  precision: str = "fp32") -> list[MaskPrediction]:
    """One mask per prompt, in the prompts' order.

    Arguments:
      prompt_encoder, mask_decoder: SAM's modules (any weights).
      embeddings: (B, 256, 64, 64) on the modules' device (SAM 2.1: packed features (B, 1024, 64, 64)).
      prompts: prompt n is for embedding row `prompts.batch_row[n]`.
      sizes: for each embedding row, (input_size, original_size) of its image.
      precision: "fp32", or "bf16" autocast for the decoder.
    """
    with autocast(embeddings.device, precision):
        output = decode(prompt_encoder, mask_decoder, embeddings.float(), prompts)
    logits, scores = choose_mask(output, prompts.multimask)
    logits, scores = logits.float(), scores.float().tolist()
    stretched = is_sam2_decoder(mask_decoder)
    predictions = []
    for n, row in enumerate(prompts.batch_row.tolist()):
        input_size, original_size = sizes[row]
        # One prompt at a time: a batch of full-resolution maps of a large scan would not fit.
        mask = upscale_logits(logits[n : n + 1], input_size, original_size, stretched=stretched)[0] > 0
        predictions.append(MaskPrediction(mask.cpu().numpy(), scores[n]))
    return predictions


def predict_cached_objects(prompt_encoder: PromptEncoder, mask_decoder: MaskDecoder, cache: EmbeddingCache,
                           indices: list[int], settings: SampleSettings, *, device: torch.device,
                           precision: str = "fp32", batch_size: int = 4,
                           store: Optional[EmbeddingStore] = None) -> Iterator[ObjectPrediction]:
    """Fixed-prompt predictions for the objects of the cached images `indices` (see SampleSettings).

    Arguments:
      store: the embeddings already in memory (training holds them); None reads the cache.
    """
    samples = CacheSamples(cache, settings, read_embeddings=store is None)
    loader = DataLoader(samples, batch_sampler=EpochBatches(indices, batch_size, 0, shuffle=False),
                        num_workers=0, collate_fn=collate)
    for batch in loader:
        embeddings = store.gather(batch.indices) if store is not None else batch.embeddings.to(device)
        infos = [cache.images[index] for index in batch.indices]
        predictions = predict_masks(prompt_encoder, mask_decoder, embeddings, batch.prompts.to(device),
                                    [(info.input_size, info.original_size) for info in infos], precision=precision)
        seen = [0] * len(infos)  # the prompts of an image are its objects, in order
        for row, prediction in zip(batch.prompts.batch_row.tolist(), predictions):
            yield ObjectPrediction(infos[row], seen[row], prediction.mask, prediction.score)
            seen[row] += 1
