"""The click protocol of interactive segmentation: how many clicks until the mask is right.

For each object the first click is its most interior point (positive). After each prediction
the next click goes to the most interior point of the largest error region: positive inside
a missed part of the object (false negative), negative inside a false one (false positive).
The previous prediction's low-res logits go back in as the mask prompt, as a user of
`SamPredictor.predict(mask_input=...)` does. After click k the IoU at the original resolution
is recorded; NoC@t is the number of clicks to reach IoU t, N when never reached (the usual
convention of interactive segmentation papers).

All objects of an image are clicked in one batched decoder call per click.
"""

from __future__ import annotations

from typing import Optional

import cv2
import numpy as np
import torch

from samcache.cache.reader import EmbeddingCache
from samcache.data import masks
from samcache.data.metrics import iou
from samcache.devices import autocast
from samcache.models.decoder import PromptDecoder, choose_mask
from samcache.models.preprocess import transform_coords
from samcache.models.prompts import PromptBatch, interior_point

NOC_THRESHOLDS = (0.85, 0.90)


def largest_error_region(pred: np.ndarray, truth: np.ndarray) -> Optional[tuple[np.ndarray, int]]:
    """(region mask, label) of the largest connected error region: label 1 for a missed part of the
    object (false negative), 0 for false foreground (false positive); None when pred == truth."""
    best: Optional[tuple[int, np.ndarray, int]] = None
    for errors, label in ((truth & ~pred, 1), (pred & ~truth, 0)):
        n, regions, stats, _ = cv2.connectedComponentsWithStats(errors.astype(np.uint8), connectivity=8)
        if n > 1:
            k = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
            area = int(stats[k, cv2.CC_STAT_AREA])
            if best is None or area > best[0]:
                best = (area, regions == k, label)
    return None if best is None else (best[1], best[2])


def next_click(pred: np.ndarray, truth: np.ndarray) -> Optional[tuple[np.ndarray, int]]:
    """((x, y) in pixel centres, label) of the protocol's next click, or None when the mask is perfect."""
    region = largest_error_region(pred, truth)
    if region is None:
        return None
    return interior_point(region[0])[0], region[1]


def noc(ious: np.ndarray, threshold: float) -> float:
    """Mean number of clicks to reach `threshold` over objects; (objects, N) IoUs; N when never reached."""
    reached = ious >= threshold
    clicks = np.where(reached.any(axis=1), reached.argmax(axis=1) + 1, ious.shape[1])
    return float(clicks.mean())


@torch.no_grad()
def click_ious(decoder: PromptDecoder, embedding: torch.Tensor, truths: list[np.ndarray],
               input_size: tuple[int, int], clicks: int, *, precision: str = "fp32") -> np.ndarray:
    """(objects, clicks) IoUs of one image's objects after each click of the protocol.

    Arguments:
      decoder: the model's PromptDecoder (families.ModelFamily.decoder).
      embedding: (1, C, 64, 64) the image's features, on the decoder's device.
      truths: each object's boolean mask at the original resolution.
      input_size: the image's size in the encoder's input frame, before padding.
    """
    n, device = len(truths), embedding.device
    original_size = truths[0].shape
    points = [[interior_point(t)[0]] for t in truths]
    labels = [[1] for _ in truths]
    done = [False] * n
    ious = np.zeros((n, clicks))
    previous: Optional[torch.Tensor] = None
    for c in range(clicks):
        coords = transform_coords(np.array(points, np.float64), original_size, input_size)
        prompts = PromptBatch(batch_row=torch.zeros(n, dtype=torch.long, device=device),
                              boxes=torch.zeros((n, 4), device=device),
                              points=torch.as_tensor(coords, dtype=torch.float32, device=device),
                              labels=torch.as_tensor(labels, dtype=torch.long, device=device),
                              is_box=torch.zeros(n, dtype=torch.bool, device=device), masks=previous)
        with autocast(device, precision):
            output = decoder(embedding.float(), prompts)
        logits, _ = choose_mask(output, prompts.multimask)
        logits = logits.float()
        previous = logits
        for i, truth in enumerate(truths):
            if done[i]:  # perfect before: the user stopped; its prompt repeats the last click, its output is unused
                ious[i, c] = ious[i, c - 1]
                points[i].append(points[i][-1])
                labels[i].append(labels[i][-1])
                continue
            pred = (decoder.upscale(logits[i : i + 1], input_size, original_size)[0] > 0).cpu().numpy()
            ious[i, c] = iou(pred, truth)
            click = next_click(pred, truth)
            if click is None:
                done[i] = True
                click = (points[i][-1], labels[i][-1])
            points[i].append(click[0])
            labels[i].append(click[1])
    return ious


def click_protocol(decoder: PromptDecoder, cache: EmbeddingCache,
                   indices: list[int], clicks: int, *, device: torch.device, precision: str = "fp32") -> dict:
    """{"miou": [mIoU after click 1..N], "noc85": ..., "noc90": ..., "objects": n} over the objects
    of the cached images `indices`."""
    rows = []
    for index in indices:
        info = cache.images[index]
        if not info.objects:
            continue
        embedding = torch.from_numpy(cache.features(index, decoder.reads)).float()[None].to(device)
        truths = [masks.decode(o.rle).astype(bool) for o in info.objects]
        rows.append(click_ious(decoder, embedding, truths, info.input_size, clicks,
                               precision=precision))
    ious = np.concatenate(rows) if rows else np.zeros((0, clicks))
    out = {"objects": int(ious.shape[0]), "miou": [float(v) for v in ious.mean(axis=0)]}
    for t in NOC_THRESHOLDS:
        out[f"noc{round(t * 100)}"] = noc(ious, t)
    return out
