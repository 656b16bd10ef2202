"""SAM's interactive training recipe on cached embeddings: corrective points with mask feedback.

SAM was trained as it is used (paper, appendix A): each object starts from a box or one
positive point (1/2 each); then each decoder pass adds one point drawn uniformly from the
error of the previous prediction, positive where it missed part of the object (false
negative), negative where it claimed background (false positive), and the previous
prediction's unthresholded low-res logits go in as the mask prompt. Two passes add no point,
so the decoder learns to refine its own mask from the mask prompt alone: one at a random place
among the corrective ones, one last. With 8 corrective points that is 11 passes, each a
decoder forward and a loss; the step's loss is their mean.

On a cache this is cheap: every pass is decoder-only. `ClickSimulation` holds the state
between passes for all N prompts of a step at once (every image and object of the batch): the
points so far, the previous logits, and the draws of `prompts.click_schedule`. The error
pixel a new point takes is drawn in the decoder's 256x256 frame (where the prediction and the
target already are) as the k-th error pixel in raster order, k = floor(pick x error pixels),
from a `pick` drawn in advance in the data pipeline: so the draws are a function of (seed,
epoch, image, object, pass) alone, and a resumed run makes the same points.

The mask fed back, and the one the next point is drawn from, is the one with the highest
predicted IoU (for a single point alone, the best of the three multimask outputs; otherwise
the single-mask output), as SamPredictor would return it. The step itself (losses, backward
per pass or once, the update) is `step.interactive_step`.
"""

from __future__ import annotations

from typing import Optional

import torch

from samcache.models.decoder import DecoderOutput
from samcache.models.prompts import PromptBatch
from samcache.models.specs import IMAGE_SIZE, LOW_RES_SIZE
from samcache.train.inference import choose_mask
from samcache.train.samples import ClickSchedules

ADDS_POINT, USES_MASK, PICK = range(3)  # the rows of ClickSchedules.draws


def error_points(pred: torch.Tensor, truth: torch.Tensor, valid: torch.Tensor,
                 pick: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One point per row drawn uniformly from the error region of a prediction.

    Arguments:
      pred, truth: (N, H, W) bool, the thresholded prediction and the target.
      valid: (N, H, W) bool, where points may go (the image, not the input's padding).
      pick: (N,) uniform in [0, 1): the point is the floor(pick x n)-th of the row's n error
        pixels in raster order.
    Returns (points (N, 2) XY in the encoder's input frame at the pixel's centre, labels (N,) long:
    1 in a false negative, 0 in a false positive, found (N,) bool: False where the prediction is
    right everywhere, that row's point and label are meaningless).
    """
    n, height, width = truth.shape
    false_negative = truth & ~pred & valid
    errors = (false_negative | (pred & ~truth & valid)).flatten(1)
    count = errors.sum(1)
    k = (pick.double() * count).long().clamp(max=(count - 1).clamp(min=0))
    # The first position whose running count of error pixels reaches k + 1.
    position = torch.searchsorted(errors.cumsum(1), (k + 1).unsqueeze(1)).squeeze(1).clamp(max=height * width - 1)
    labels = false_negative.flatten(1).gather(1, position.unsqueeze(1)).squeeze(1).long()
    scale = IMAGE_SIZE / LOW_RES_SIZE
    points = torch.stack([(position % width + 0.5) * scale, (position // width + 0.5) * scale], dim=1)
    return points.float(), labels, count > 0


class ClickSimulation:
    """The prompts of one step's passes, each made from the previous pass's prediction.

    Arguments:
      first: the first prompts (a jittered box, or one positive point, per object).
      targets: (N, 256, 256) their low-res targets in [0, 1].
      schedules: their draws (prompts.click_schedule, collated).
      detach: feed the logits back as a constant (no gradient into earlier passes).

    Per pass: `prompts()` for the decoder, then `update(output, prompts)` with its output.
    """

    def __init__(self, first: PromptBatch, targets: torch.Tensor, schedules: ClickSchedules, *, detach: bool):
        self.first, self.draws, self.detach = first, schedules.draws, detach
        self.passes = int(self.draws.shape[2])
        n, device = len(first), targets.device
        self.truth = targets > 0.5
        grid = torch.arange(LOW_RES_SIZE, device=device)
        heights, widths = schedules.valid_sizes[:, 0], schedules.valid_sizes[:, 1]
        self.valid = (grid.view(1, -1, 1) < heights.view(-1, 1, 1)) & (grid.view(1, 1, -1) < widths.view(-1, 1, 1))
        start = first.n_points  # 0 after a box, 1 after a point
        width = int(start.max()) if n else 0
        self.points = torch.zeros((n, width + self.passes - 1, 2), device=device)
        self.labels = torch.full((n, width + self.passes - 1), -1, dtype=torch.long, device=device)
        self.points[:, :width], self.labels[:, :width] = first.points[:, :width], first.labels[:, :width]
        self.count = start.clone()
        self.previous: Optional[torch.Tensor] = None
        self.number = 0  # the pass `prompts()` is for

    def prompts(self) -> PromptBatch:
        """This pass's prompts: the first prompt's box, every point so far, and for the prompts
        whose schedule says so the previous logits as the mask prompt."""
        uses_mask = self.draws[:, USES_MASK, self.number] > 0.5
        with_masks = self.previous is not None and bool(uses_mask.any())
        # Copies: update() writes the next points in place while autograd may still hold this pass.
        return PromptBatch(batch_row=self.first.batch_row, boxes=self.first.boxes, points=self.points.clone(),
                           labels=self.labels.clone(), is_box=self.first.is_box,
                           masks=self.previous if with_masks else None, has_mask=uses_mask if with_masks else None)

    def update(self, output: DecoderOutput, prompts: PromptBatch) -> None:
        """Takes this pass's prediction: its chosen logits become the next mask prompt, and the
        prompts whose schedule adds a point at the next pass get one from its error region."""
        logits, _ = choose_mask(output, prompts.multimask)
        logits = logits.float()
        following = self.number + 1
        if following < self.passes:
            points, labels, found = error_points(logits.detach() > 0, self.truth, self.valid,
                                                 self.draws[:, PICK, following])
            adds = (self.draws[:, ADDS_POINT, following] > 0.5) & found
            rows = adds.nonzero().squeeze(1)
            self.points[rows, self.count[rows]] = points[rows]
            self.labels[rows, self.count[rows]] = labels[rows]
            self.count = self.count + adds.long()
        self.previous = logits.detach() if self.detach else logits
        self.number = following
