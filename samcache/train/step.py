"""One optimizer step on cached embeddings: losses, backward, gradient clipping, the update.

`optimize_step` is the step of one decoder pass (box and point prompts; also the tiny's
pretraining), `interactive_step` the step of SAM's interactive recipe: several passes over the
same prompts, each with one more corrective point and the previous logits as the mask prompt
(interactive.py), their losses averaged.

Under torchrun every rank's loss is weighed by its share of the global batch
(`rank_loss_weight`), so DistributedDataParallel's averaged gradient is the gradient of the
global batch's mean, and the loss parts are combined over ranks for the log. A non-finite loss
stops the step, on every rank alike, before the update.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from samcache.config import PromptSettings
from samcache.devices import autocast
from samcache.distributed import SINGLE, Distributed
from samcache.errors import TrainingError
from samcache.models.decoder import DecoderOutput, LossParts
from samcache.models.prompts import PromptBatch
from samcache.train.interactive import ClickSimulation
from samcache.train.samples import ClickSchedules


@dataclass
class StepStats:
    """One step's loss parts, averaged over the global batch, and its number of prompts."""

    loss: float
    mask_loss: float
    iou_loss: float
    train_iou: float
    prompts: int


LossFunction = Callable[[DecoderOutput, torch.Tensor, torch.Tensor], LossParts]
"""(output, targets, multimask) -> the loss parts: a PromptDecoder's loss with the run's loss kind."""


class NonFiniteLoss(TrainingError):
    """The loss became NaN or infinite; nothing was applied to the weights."""

    def __init__(self, value: float):
        super().__init__(f"the loss became {value}")
        self.value = value


def rank_loss_weight(n_local: int, n_global: int, world_size: int) -> float:
    """The factor on a rank's mean loss that makes DistributedDataParallel's averaged gradient the
    gradient of the global batch's mean: the ranks' prompt counts differ, so each rank's mean
    weighs by its share of the global batch (n_local / n_global), times the world size that DDP's
    average divides by."""
    return n_local * world_size / n_global


def optimize_step(output: DecoderOutput, targets: torch.Tensor, multimask: torch.Tensor, *, loss: LossFunction,
                  optimizer: torch.optim.Optimizer, parameters: list[torch.nn.Parameter], grad_clip: float,
                  n_local: Optional[int] = None, dist: Distributed = SINGLE) -> StepStats:
    """Loss, backward, clip, optimizer step: the step of `samcache train` and of the tiny pretraining.

    Arguments:
      output: the decoder's output for the step's prompts (computed under the caller's autocast).
      targets: (N, 256, 256) low-res targets; multimask: (N,) which prompts use the three outputs.
      loss: the training loss of an output (PromptDecoder.loss with the run's loss kind).
      parameters: what is trained (clipped together to `grad_clip`; 0: no clipping).
      n_local: this rank's real prompts (0 for a placeholder step; default: all N).
      dist: under torchrun, the loss parts are combined over ranks and weighed by `rank_loss_weight`.
    Raises NonFiniteLoss, on every rank alike, before anything is applied.
    """
    n_local = targets.shape[0] if n_local is None else n_local
    parts = loss(output, targets, multimask)
    stats = _combined_stats(torch.stack([parts.total, parts.mask, parts.iou, parts.train_iou]).detach(), n_local, dist)
    optimizer.zero_grad(set_to_none=True)
    (parts.total * rank_loss_weight(n_local, stats.prompts, dist.world_size)).backward()
    _update(optimizer, parameters, grad_clip)
    return stats


def interactive_step(module: torch.nn.Module, embeddings: torch.Tensor, first: PromptBatch, targets: torch.Tensor,
                     schedules: ClickSchedules, *, settings: PromptSettings, loss: LossFunction,
                     optimizer: torch.optim.Optimizer, parameters: list[torch.nn.Parameter], grad_clip: float,
                     precision: str, n_local: Optional[int] = None, dist: Distributed = SINGLE) -> StepStats:
    """The step of `--prompt interactive`: one decoder pass per entry of the click schedules, the
    loss their mean (each pass's loss as `optimize_step`'s).

    Arguments:
      module: the model's PromptDecoder (families.ModelFamily.decoder), maybe DDP-wrapped.
      embeddings: (B, 256, 64, 64) float; first: the first prompts; targets: (N, 256, 256).
      schedules: the prompts' click schedules (prompts.click_schedule).
      settings: the run's prompt settings (mask_prompt_gradient decides how the passes are
        backpropagated).
      precision: the decoder's autocast precision.
      The rest as `optimize_step`.

    With detached mask prompts the passes share no graph, so each is backpropagated as soon as
    it is done and memory stays at one pass's; with backprop all passes are kept for one
    backward. With `schedules.trained` (--trained-passes) only those passes are backpropagated,
    the loss the mean of theirs; the others run forward only (the logged loss still averages all
    passes). Under DDP gradients accumulate locally until the last backpropagated pass, which
    alone is all-reduced.
    """
    n_local = targets.shape[0] if n_local is None else n_local
    n_global = int(dist.sum([n_local])[0])
    detach = settings.mask_prompt_gradient == "detach"
    simulation = ClickSimulation(first, targets, schedules, detach=detach)
    trained = (list(range(simulation.passes)) if schedules.trained is None
               else schedules.trained.nonzero().flatten().tolist())
    weight = rank_loss_weight(n_local, n_global, dist.world_size) / len(trained)
    optimizer.zero_grad(set_to_none=True)
    parts, kept = [], []
    for number in range(simulation.passes):
        prompts = simulation.prompts()
        backpropagated = number in trained
        with _locally_unless(module, number == trained[-1]), torch.set_grad_enabled(backpropagated):
            with autocast(embeddings.device, precision):
                output = module(embeddings, prompts, outputs="used")
            pass_loss = loss(output, targets, prompts.multimask)
            if backpropagated and detach:
                (pass_loss.total * weight).backward()
            elif backpropagated:
                kept.append(pass_loss.total)
        parts.append(torch.stack([pass_loss.total, pass_loss.mask, pass_loss.iou, pass_loss.train_iou]).detach())
        simulation.update(output, prompts)
    if kept:
        (torch.stack(kept).sum() * weight).backward()
    stats = _combined_stats(torch.stack(parts).mean(0), n_local, dist)
    _update(optimizer, parameters, grad_clip)
    return stats


def _combined_stats(parts: torch.Tensor, n_local: int, dist: Distributed) -> StepStats:
    """StepStats of the global batch from this rank's mean (loss, mask, iou, train_iou); raises
    NonFiniteLoss (every rank sees the same sums)."""
    values = parts.tolist() if n_local else [0.0] * 4
    n_global, *sums = dist.sum([n_local] + [n_local * v for v in values])
    stats = StepStats(*(v / n_global for v in sums), prompts=int(n_global))
    if not math.isfinite(stats.loss):
        raise NonFiniteLoss(stats.loss)
    return stats


def _update(optimizer: torch.optim.Optimizer, parameters: list[torch.nn.Parameter], grad_clip: float) -> None:
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(parameters, grad_clip)
    optimizer.step()


def _locally_unless(module: torch.nn.Module, last: bool):
    """DDP's no_sync for every pass but the last: gradients add up on each rank and the last
    backward all-reduces their sum once."""
    if last or not hasattr(module, "no_sync"):
        return contextlib.nullcontext()
    return module.no_sync()
