"""Per-object mask metrics at original resolution: IoU, Dice, boundary F-score."""

from __future__ import annotations

import cv2
import numpy as np


def iou(pred: np.ndarray, truth: np.ndarray) -> float:
    """Intersection over union of two boolean masks; two empty masks agree perfectly (1.0)."""
    union = np.logical_or(pred, truth).sum()
    return float(np.logical_and(pred, truth).sum() / union) if union else 1.0


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """2|A and B| / (|A| + |B|); two empty masks agree perfectly (1.0)."""
    total = pred.sum() + truth.sum()
    return float(2 * np.logical_and(pred, truth).sum() / total) if total else 1.0


def boundary(mask: np.ndarray) -> np.ndarray:
    """The mask's boundary pixels: mask pixels with a 4-neighbour outside the mask (or the image)."""
    padded = np.pad(mask.astype(np.uint8), 1)
    eroded = cv2.erode(padded, np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], np.uint8))[1:-1, 1:-1]
    return mask & ~eroded.astype(bool)


def boundary_f(pred: np.ndarray, truth: np.ndarray, tolerance: float | None = None) -> float:
    """Boundary F-score (Martin et al.; the DAVIS "F" measure).

    A boundary pixel of one mask counts as matched when the other mask's boundary lies within
    `tolerance` pixels of it (default: 0.75% of the image diagonal, at least 1 px, as in DAVIS).
    F is the harmonic mean of boundary precision and recall; two empty masks score 1.0.
    """
    if tolerance is None:
        tolerance = max(1.0, 0.0075 * float(np.hypot(*truth.shape)))
    pred_b, truth_b = boundary(pred), boundary(truth)
    n_pred, n_truth = int(pred_b.sum()), int(truth_b.sum())
    if n_pred == 0 and n_truth == 0:
        return 1.0
    if n_pred == 0 or n_truth == 0:
        return 0.0
    # Distance from every pixel to the nearest boundary pixel of the other mask.
    to_truth = cv2.distanceTransform((~truth_b).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    to_pred = cv2.distanceTransform((~pred_b).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    precision = float((to_truth[pred_b] <= tolerance).mean())
    recall = float((to_pred[truth_b] <= tolerance).mean())
    return 2 * precision * recall / (precision + recall) if precision + recall else 0.0
