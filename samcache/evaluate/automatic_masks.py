"""Segment everything: SAM's automatic mask generator on one image embedding, any decoder weights.

`SamAutomaticMaskGenerator` (segment_anything) prompts the decoder with a grid of single points,
keeps the three multimask outputs of each, and filters: predicted IoU above a threshold, then
the stability score (the IoU of the mask thresholded at +offset and at -offset, computed on the
logits at the original resolution), then non-maximum suppression of the masks' boxes. `segment_everything`
does the same steps in the same order with the same defaults, on an embedding that may come
from the cache, so no encoder runs. What it does differently is only where work goes:
the stock generator upscales every mask to the original resolution before the predicted-IoU
filter; here only the masks that pass it are upscaled (the stability score and the kept masks are
the same). Crop layers (`crop_n_layers`) are not offered: each crop needs the encoder on the crop;
nor is the small-region clean-up (`min_mask_region_area`, off by default there too). A mask with no
pixel is dropped (the stock generator keeps it when the stability filter is off).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from segment_anything.utils.amg import build_point_grid, calculate_stability_score
from torchvision.ops import batched_nms

from samcache.config import EverythingSettings
from samcache.data import masks as mask_codec
from samcache.models.decoder import PromptDecoder
from samcache.models.encoder_tail import TailedDecoder
from samcache.models.preprocess import input_size, transform_coords
from samcache.models.prompts import PromptBatch

Size = tuple[int, int]
_UPSCALE_CHUNK = 16  # masks upscaled at once: 16 x a 10-megapixel scan in float32 is 640 MB


@dataclass
class EverythingMask:
    """One mask of segment-everything, at the original resolution."""

    rle: dict
    box_xyxy: tuple[float, float, float, float]
    area: int
    predicted_iou: float
    stability_score: float
    point: tuple[float, float]

    def coco_result(self, image_id: int, category_id: int = 1) -> dict:
        """The mask as a COCO result (pycocotools' loadRes): the score is the predicted IoU."""
        x0, y0, x1, y1 = self.box_xyxy
        return {"image_id": image_id, "category_id": category_id, "segmentation": self.rle,
                "bbox": [x0, y0, x1 - x0, y1 - y0], "area": self.area, "score": self.predicted_iou,
                "predicted_iou": self.predicted_iou, "stability_score": self.stability_score,
                "point_coords": [list(self.point)]}


def point_grid(original_size: Size, points_per_side: int) -> np.ndarray:
    """(n*n, 2) points (x, y) in original pixels: the centres of an n x n grid of cells, as SAM's."""
    h, w = original_size
    return build_point_grid(points_per_side) * np.array([[w, h]], dtype=np.float64)


@torch.no_grad()
def segment_everything(decoder: PromptDecoder, embedding: torch.Tensor,
                       original_size: Size, settings: EverythingSettings = EverythingSettings(), *,
                       mask_threshold: float = 0.0) -> list[EverythingMask]:
    """The masks of everything in one image, best predicted IoU first.

    Arguments:
      decoder: a SAM-family decoder (families.ModelFamily.decoder), any weights; a family without
        automatic masks (SAM 2.1) is refused.
      embedding: (1, 256, 64, 64), on the modules' device (the tail tokens, for a TailedDecoder).
      original_size: the image's (H, W).
      settings: the generator's options (config.EverythingSettings: SamAutomaticMaskGenerator's defaults).
      mask_threshold: the logit a mask pixel must exceed (Sam.mask_threshold).
    """
    decoder.family.require("automatic_masks", decoder.model_type)  # the callers refuse earlier, before any work
    if isinstance(decoder, TailedDecoder):  # its tail makes the one embedding every batch of points decodes
        embedding, decoder = decoder.tail(embedding), decoder.decoder
    device = embedding.device
    resized = input_size(original_size)
    grid = point_grid(original_size, settings.points_per_side)
    kept_rles, kept_boxes, kept_iou, kept_stability, kept_points = [], [], [], [], []
    for start in range(0, len(grid), settings.points_per_batch):
        points = grid[start : start + settings.points_per_batch]
        n = len(points)
        prompts = PromptBatch(
            batch_row=torch.zeros(n, dtype=torch.long, device=device),
            boxes=torch.zeros((n, 4), device=device),
            points=torch.as_tensor(transform_coords(points, original_size), dtype=torch.float32,
                                   device=device)[:, None],
            labels=torch.ones((n, 1), dtype=torch.long, device=device),
            is_box=torch.zeros(n, dtype=torch.bool, device=device),
        )
        output = decoder(embedding, prompts)
        logits = output.logits[:, 1:].flatten(0, 1)  # the three multimask outputs of each point
        iou_pred = output.iou_pred[:, 1:].flatten(0, 1).float()
        point_of = np.repeat(points, 3, axis=0)
        keep = (iou_pred > settings.pred_iou_thresh).nonzero().squeeze(1) if settings.pred_iou_thresh > 0 \
            else torch.arange(len(iou_pred), device=device)
        for chunk in keep.split(_UPSCALE_CHUNK):
            full = decoder.upscale(logits[chunk].float(), resized, original_size)
            stability = calculate_stability_score(full, mask_threshold, settings.stability_score_offset)
            stable = stability >= settings.stability_score_thresh if settings.stability_score_thresh > 0 \
                else torch.ones_like(stability, dtype=torch.bool)
            for row in stable.nonzero().squeeze(1).tolist():
                binary = (full[row] > mask_threshold).cpu().numpy()
                box = _mask_box(binary)
                if box is None:
                    continue
                index = int(chunk[row])
                kept_rles.append(mask_codec.encode(binary))
                kept_boxes.append(box)
                kept_iou.append(float(iou_pred[index]))
                kept_stability.append(float(stability[row]))
                kept_points.append(tuple(map(float, point_of[index])))
    if not kept_rles:
        return []
    order = batched_nms(torch.tensor(kept_boxes, dtype=torch.float32), torch.tensor(kept_iou),
                        torch.zeros(len(kept_boxes), dtype=torch.long), settings.box_nms_thresh).tolist()
    return [EverythingMask(kept_rles[k], tuple(kept_boxes[k]), int(mask_codec.area(kept_rles[k])), kept_iou[k],
                           kept_stability[k], kept_points[k]) for k in order]


def _mask_box(binary: np.ndarray):
    """XYXY of the mask's pixels as `batched_mask_to_box` gives it (inclusive max); None when empty."""
    rows, cols = np.flatnonzero(binary.any(axis=1)), np.flatnonzero(binary.any(axis=0))
    if rows.size == 0:
        return None
    return (float(cols[0]), float(rows[0]), float(cols[-1]), float(rows[-1]))
