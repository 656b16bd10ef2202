"""Prompts from ground truth, and the targets they should produce.

Training samples prompts the way SAM was trained: a box around the object with each side
moved at random (by up to `box_jitter` of the box's side, at most `box_jitter_max` pixels),
or points drawn from the mask (positives inside, negatives in the box outside the mask).
Evaluation uses fixed prompts: the exact box, or the mask's most interior point, so runs
compare.

Randomness never comes from global state: each draw takes a generator seeded from
(seed, epoch, object id), so a resumed run, or a run with another number of DataLoader
workers, draws the very same prompts.

Coordinates: prompts are made in original image pixels and moved to the encoder's 1024 px
input frame with the predictor's own transform. Targets are built in the mask decoder's
256x256 low-resolution frame (the padded 1024 frame / 4).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import cv2
import numpy as np
import torch

from samcache.config import MAX_POINTS, PromptSettings
from samcache.data import masks
from samcache.models.preprocess import transform_boxes, transform_coords
from samcache.models.specs import IMAGE_SIZE, LOW_RES_SIZE


@dataclass
class Prompt:
    """One prompt in the encoder's input frame.

    Arguments:
      box: XYXY (4,) float32, meaningful when `is_box`.
      points: (MAX_POINTS, 2) float32; labels: (MAX_POINTS,) with 1 positive, 0 negative,
        -1 padding (SAM's convention for "not a point").
      is_box: a box prompt (single-mask output) or a point prompt (multimask, best of three).
    """

    box: np.ndarray
    points: np.ndarray
    labels: np.ndarray
    is_box: bool


@dataclass
class PromptBatch:
    """The prompts of a batch as tensors, all in the encoder's input frame.

    Arguments:
      batch_row: (N,) long, the row of the batch's embeddings (the image) each prompt is for.
      boxes: (N, 4) XYXY; points: (N, P, 2); labels: (N, P): 1 positive, 0 negative, -1 after
        the prompt's last point (padding, so that prompts stack).
      is_box: (N,) bool: the prompt has a box (with or without points), else points only.
      masks: (N, 256, 256) low-res logits fed back as the mask prompt (a previous prediction's, as
        `SamPredictor.predict(mask_input=...)` takes them), or None: no mask prompts in the batch.
      has_mask: (N,) bool, which prompts have their row of `masks` (the others decode as without
        a mask prompt, like the ONNX interface's has_mask_input = 0); None: all of them.

    A prompt is decoded with its real points only, as SamPredictor would be given them: padding
    never reaches the prompt encoder, whose "not a point" tokens would change the masks.
    """

    batch_row: torch.Tensor
    boxes: torch.Tensor
    points: torch.Tensor
    labels: torch.Tensor
    is_box: torch.Tensor
    masks: Optional[torch.Tensor] = None
    has_mask: Optional[torch.Tensor] = None

    @classmethod
    def from_prompts(cls, prompts: list[Prompt], batch_row: torch.Tensor) -> "PromptBatch":
        """Stacks `Prompt`s; prompt n is for the image in row `batch_row[n]` of the batch."""
        if not prompts:
            return cls(batch_row, torch.zeros((0, 4)), torch.zeros((0, MAX_POINTS, 2)),
                       torch.zeros((0, MAX_POINTS)).long(), torch.zeros(0, dtype=torch.bool))
        return cls(
            batch_row=batch_row,
            boxes=torch.from_numpy(np.stack([p.box for p in prompts])),
            points=torch.from_numpy(np.stack([p.points for p in prompts])),
            labels=torch.from_numpy(np.stack([p.labels for p in prompts])),
            is_box=torch.tensor([p.is_box for p in prompts], dtype=torch.bool),
        )

    @classmethod
    def boxes_of_one_image(cls, boxes: torch.Tensor) -> "PromptBatch":
        """Box prompts (N, 4), already in the input frame, all for the batch's one image."""
        n, device = boxes.shape[0], boxes.device
        return cls(batch_row=torch.zeros(n, dtype=torch.long, device=device), boxes=boxes,
                   points=torch.zeros((n, 1, 2), device=device),
                   labels=torch.full((n, 1), -1, dtype=torch.long, device=device),
                   is_box=torch.ones(n, dtype=torch.bool, device=device))

    def __len__(self) -> int:
        return int(self.batch_row.shape[0])

    @property
    def n_points(self) -> torch.Tensor:
        """(N,) long: the real points of each prompt (they come first, padding after)."""
        return (self.labels != -1).sum(1)

    @property
    def multimask(self) -> torch.Tensor:
        """(N,) bool: the prompt is a single point alone, which is ambiguous: its three multimask
        outputs apply, as SAM was trained (the best of the three). Every other prompt (a box,
        with or without points; several points) uses the single-mask output."""
        single_point = ~self.is_box & (self.n_points == 1)
        return single_point & ~self.mask_given  # a mask prompt resolves the ambiguity

    @property
    def mask_given(self) -> torch.Tensor:
        """(N,) bool: the prompt has a mask prompt."""
        if self.masks is None:
            return torch.zeros_like(self.is_box)
        return torch.ones_like(self.is_box) if self.has_mask is None else self.has_mask

    def to(self, device) -> "PromptBatch":
        def moved(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            return None if t is None else t.to(device, non_blocking=True)

        return PromptBatch(*(moved(t) for t in (self.batch_row, self.boxes, self.points, self.labels, self.is_box,
                                                self.masks, self.has_mask)))


def rng_for(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng([seed, *[int(k) & 0xFFFFFFFF for k in keys]])


def jitter_box(box, image_size: tuple[int, int], rng: np.random.Generator, *, fraction: float, max_pixels: float):
    """Moves each side of an XYXY box by up to min(fraction x side, max_pixels), inside the image."""
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    dx, dy = min(fraction * w, max_pixels), min(fraction * h, max_pixels)
    noise = rng.uniform(-1.0, 1.0, size=4) * np.array([dx, dy, dx, dy])
    height, width = image_size
    nx0, ny0, nx1, ny1 = np.array([x0, y0, x1, y1], dtype=np.float64) + noise
    nx0, nx1 = np.clip([nx0, nx1], 0, width)
    ny0, ny1 = np.clip([ny0, ny1], 0, height)
    if nx1 - nx0 < 1 or ny1 - ny0 < 1:  # jitter collapsed a tiny box: keep the original
        return np.array(box, dtype=np.float64)
    return np.array([nx0, ny0, nx1, ny1])


def sample_points(mask: np.ndarray, box, rng: np.random.Generator, *, positive: int, negative: int):
    """(points (n, 2) XY in pixel centres, labels (n,)): positives in the mask, negatives in the box
    outside it (fewer when the box has no background)."""
    ys, xs = np.nonzero(mask)
    chosen = rng.integers(0, len(xs), size=positive)
    points = [np.stack([xs[chosen], ys[chosen]], 1) + 0.5]
    labels = [np.ones(positive, np.int64)]
    if negative:
        x0, y0, x1, y1 = (int(round(v)) for v in box)
        background = ~mask[y0:y1, x0:x1]
        by, bx = np.nonzero(background)
        if len(bx):
            chosen = rng.integers(0, len(bx), size=negative)
            points.append(np.stack([bx[chosen] + x0, by[chosen] + y0], 1) + 0.5)
            labels.append(np.zeros(negative, np.int64))
    return np.concatenate(points).astype(np.float64), np.concatenate(labels)


def interior_point(mask: np.ndarray) -> np.ndarray:
    """The mask pixel farthest from its boundary (a deterministic, unambiguous click)."""
    distance = cv2.distanceTransform(np.pad(mask, 1).astype(np.uint8), cv2.DIST_L2, 5)[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(distance)), distance.shape)
    return np.array([[x + 0.5, y + 0.5]])


def make_prompt(box, points, labels, *, is_box: bool, original_size: tuple[int, int],
                frame: Optional[tuple[int, int]] = None) -> Prompt:
    """Packs a prompt given in original pixels into the encoder's input frame, where the image is
    `frame` (h, w): its input size (ImageInfo.input_size); default SAM's for `original_size`."""
    out_points = np.zeros((MAX_POINTS, 2), np.float32)
    out_labels = np.full(MAX_POINTS, -1, np.int64)
    if points is not None and len(points):
        n = min(len(points), MAX_POINTS)
        out_points[:n] = transform_coords(points[:n], original_size, frame)
        out_labels[:n] = labels[:n]
    box_input = transform_boxes(np.asarray(box, dtype=np.float64)[None], original_size, frame)[0].astype(np.float32)
    return Prompt(box_input, out_points, out_labels, is_box)


def training_prompt(rle: dict, box, original_size, settings: PromptSettings, rng: np.random.Generator, *,
                    frame: Optional[tuple[int, int]] = None) -> Prompt:
    """A random prompt for one object (see PromptSettings); with mode interactive, the first
    prompt of SAM's recipe: the jittered box or one positive point, 1/2 each."""
    interactive = settings.mode == "interactive"
    use_points = (settings.mode in ("point", "box+points")
                  or (settings.mode == "mixed" and rng.random() < settings.point_ratio)
                  or (interactive and rng.random() < 0.5))
    jittered = jitter_box(box, original_size, rng, fraction=settings.box_jitter, max_pixels=settings.box_jitter_max)
    if not use_points:
        return make_prompt(jittered, None, None, is_box=True, original_size=original_size, frame=frame)
    mask = masks.decode(rle)
    positive, negative = (1, 0) if interactive else (settings.positive_points, settings.negative_points)
    points, labels = sample_points(mask, box, rng, positive=positive, negative=negative)
    return make_prompt(jittered, points, labels, is_box=settings.mode == "box+points", original_size=original_size,
                       frame=frame)


TRAINED_PASSES_DRAW = 2
"""The last key of rng_for(seed, epoch, image, 0, TRAINED_PASSES_DRAW), which draws a step's trained
passes (samples.VIEW_DRAW is 1)."""


def trained_passes(settings: PromptSettings, seed: int, epoch: int, image_index: int) -> np.ndarray:
    """Which passes of a step of the interactive recipe are backpropagated, (passes,) bool: all of
    them, or `settings.trained_passes` drawn without replacement from rng_for(seed, epoch, image, 0,
    TRAINED_PASSES_DRAW) for the step whose first image is `image_index`."""
    chosen = np.ones(settings.passes, bool)
    if settings.trained_passes is not None:
        chosen[:] = False
        rng = rng_for(seed, epoch, image_index, 0, TRAINED_PASSES_DRAW)
        chosen[rng.choice(settings.passes, settings.trained_passes, replace=False)] = True
    return chosen


def click_schedule(settings: PromptSettings, seed: int, epoch: int, image_index: int,
                   object_number: int) -> np.ndarray:
    """One object's draws for the interactive recipe: (3, passes) float32 rows `adds_point`,
    `uses_mask` (0/1) and `pick` (uniform in [0, 1): which error pixel its new point takes, see
    interactive.py). Pass 0 is the first prompt (no point added, no mask). Of the later passes
    the last, and one at random before it, only refine (no new point, the mask prompt always);
    each of the others adds a point and gets the mask prompt with probability mask_prompt_prob.
    Pass p's draws come from rng_for(seed, epoch, image, object, p), the refinement position from
    key 0, so the schedule never depends on anything else."""
    passes = settings.passes
    adds_point, uses_mask, pick = np.zeros((3, passes), np.float32)
    refine = set()
    if passes > 1 + settings.click_iterations:  # refinement passes: the last and one random earlier one
        refine = {passes - 1, 1 + int(rng_for(seed, epoch, image_index, object_number, 0).integers(passes - 2))}
    for p in range(1, passes):
        rng = rng_for(seed, epoch, image_index, object_number, p)
        pick[p] = rng.random()
        mask_draw = rng.random()
        if p in refine:
            uses_mask[p] = 1
        else:
            adds_point[p] = 1
            uses_mask[p] = mask_draw < settings.mask_prompt_prob
    return np.stack([adds_point, uses_mask, pick])


def evaluation_box(box, original_size: tuple[int, int], *, jitter: float, seed: int, image_index: int,
                   object_number: int) -> np.ndarray:
    """The box an object is evaluated with, in original pixels: exact, or with each side moved by up
    to `jitter` of the box's side (at most 20 px), seeded by (seed, image, object) so every model
    and the box-fill baseline see the same one."""
    if not jitter:
        return np.asarray(box, dtype=np.float64)
    return jitter_box(box, original_size, rng_for(seed, image_index, object_number), fraction=jitter,
                      max_pixels=20.0)


def box_fill(box, original_size: tuple[int, int]) -> np.ndarray:
    """The trivial baseline's mask for a box prompt: every pixel whose centre lies in the box."""
    height, width = original_size
    x0, y0, x1, y1 = (float(v) for v in box)
    cols = (np.arange(width) + 0.5 >= x0) & (np.arange(width) + 0.5 <= x1)
    rows = (np.arange(height) + 0.5 >= y0) & (np.arange(height) + 0.5 <= y1)
    return rows[:, None] & cols[None, :]


def evaluation_prompt(rle: dict, box, original_size, mode: str, *, frame: Optional[tuple[int, int]] = None) -> Prompt:
    """The fixed prompt of an object: its exact box, or its most interior point."""
    if mode == "box":
        return make_prompt(box, None, None, is_box=True, original_size=original_size, frame=frame)
    if mode == "point":
        point = interior_point(masks.decode(rle))
        return make_prompt(box, point, np.ones(1, np.int64), is_box=False, original_size=original_size, frame=frame)
    raise ValueError(f"evaluation prompts are 'box' or 'point', not {mode!r}")


def low_res_target(rle: dict, input_size: tuple[int, int], image_size: int = IMAGE_SIZE) -> np.ndarray:
    """The object's mask in the decoder's 256x256 frame, as a float32 coverage map in [0, 1].

    The mask is area-averaged to the image's part of the frame (where the image, resized to
    `input_size` and padded bottom-right to the square input, lands 4x smaller), zero in the
    padding: where the decoder's low-res logits sit.
    """
    low_h, low_w = low_res_size(input_size, image_size)
    target = np.zeros((LOW_RES_SIZE, LOW_RES_SIZE), np.float32)
    target[:low_h, :low_w] = masks.coverage(rle, (low_h, low_w))
    return target


def low_res_size(input_size: tuple[int, int], image_size: int = IMAGE_SIZE) -> tuple[int, int]:
    """The image's part of the decoder's 256x256 frame (the rest is the input's padding)."""
    scale = LOW_RES_SIZE / image_size
    return max(1, int(round(input_size[0] * scale))), max(1, int(round(input_size[1] * scale)))
