"""The prompt encoder + mask decoder over many images and prompts at once, and the losses.

`PromptDecoder` is a model's prompt encoder and mask decoder as one module, as its family
(families.py) decodes them: `SamPromptDecoder` here for SAM, the tiny and the micro (SAM's
classes), `Sam2PromptDecoder` in sam2_decoder.py for SAM 2.1. Training, validation, evaluation
and prediction all call it, so they decode alike.

Stock `MaskDecoder.predict_masks` serves one image: it repeats that image's embedding once
per prompt. Training wants B images with K prompts each in one step, so `decode` runs the
same modules (same parameters, same state dict) with each prompt paired to its own image
through an index, `batch_row[n]` = the image of prompt n. One embedding read then serves
all the prompts of its image.

Work that does not depend on the prompt is done once per image, not once per prompt: without
a mask prompt the dense prompt embedding is the same for every prompt, so the transformer's first
block reads the B images and its products serve their prompts side by side. The transformer's
cross-attentions are folded into the prompt tokens (two_way_attention.py) and the upscaling runs
as matrix products on the transformer's channels-last tokens (upscaling.py): the stock modules'
arithmetic within float rounding (tested against `MaskDecoder.predict_masks` and
`TwoWayTransformer.forward`), with a fraction of the memory traffic, which bounds a decoder step
on a CPU.

A single point alone is ambiguous: it uses the three multimask outputs, as SAM was trained (the
loss takes the best of the three, inference (inference.py) the one with the highest predicted
IoU). Every other prompt (a box, a box with points, several points) uses the single-mask output,
SamPredictor's `multimask_output=False`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from segment_anything.modeling import MaskDecoder, PromptEncoder
from torchvision.ops import sigmoid_focal_loss

from samcache.config import DECODER_OUTPUTS, LOSSES
from samcache.models.prompts import PromptBatch
from samcache.models.specs import IMAGE_SIZE, LOW_RES_SIZE, MASK_OUTPUTS
from samcache.models.two_way_attention import two_way_transformer
from samcache.models.upscaling import mask_logits


@dataclass
class DecoderOutput:
    """Low-res logits (N, 4, 256, 256) (or (N, 1, 256, 256): output 0 alone, PromptDecoder.forward's
    outputs="used") and predicted IoUs (N, 4) of all four mask tokens; SAM 2.1's
    decoder also scores whether the object is there at all (N, 1) logits, else None; SAM-HQ's also
    returns its HQ token's mask alone (N, 1, 256, 256) logits (sam_hq.py), else None."""

    logits: torch.Tensor
    iou_pred: torch.Tensor
    object_score: Optional[torch.Tensor] = None
    hq_logits: Optional[torch.Tensor] = None


def predict_masks_batched(
    mask_decoder: MaskDecoder,
    image_embeddings: torch.Tensor,
    batch_row: torch.Tensor,
    image_pe: torch.Tensor,
    sparse: torch.Tensor,
    dense: torch.Tensor,
    *,
    shared_dense: bool = False,
    first_output_only: bool = False,
) -> DecoderOutput:
    """`MaskDecoder.predict_masks` with prompt n attending to image `batch_row[n]`.

    Arguments:
      image_embeddings: (B, 256, 64, 64) from the image encoder (or the cache).
      batch_row: (N,) the row of `image_embeddings` (the image) of each prompt.
      image_pe: (1, 256, 64, 64) the prompt encoder's dense positional encoding.
      sparse, dense: the prompt encoder's outputs for the N prompts.
      shared_dense: every prompt's dense embedding is the same (no mask prompts), which lets
        the first block's image-side work be done once per image.
      first_output_only: make only output 0's logits, (N, 1, 256, 256) (the predicted IoUs stay four).
    """
    d = mask_decoder
    n = sparse.shape[0]
    output_tokens = torch.cat([d.iou_token.weight, d.mask_tokens.weight], dim=0)
    tokens = torch.cat([output_tokens.unsqueeze(0).expand(n, -1, -1), sparse], dim=1)
    _, c, h, w = image_embeddings.shape
    hs, src = transformer_on_prompts(d.transformer, image_embeddings, batch_row, image_pe, tokens, dense,
                                     shared_dense=shared_dense)
    iou_token_out = hs[:, 0, :]
    mask_tokens_out = hs[:, 1 : 1 + d.num_mask_tokens, :]

    mlps = d.output_hypernetworks_mlps[:1] if first_output_only else d.output_hypernetworks_mlps
    hyper_in = torch.stack([mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(mlps)], dim=1)
    return DecoderOutput(mask_logits(d.output_upscaling, src, hyper_in, h, w), d.iou_prediction_head(iou_token_out))


def transformer_on_prompts(transformer, image_embeddings: torch.Tensor, batch_row: torch.Tensor,
                           image_pe: torch.Tensor, tokens: torch.Tensor, dense: torch.Tensor, *,
                           shared_dense: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The mask decoder's two-way transformer for N prompts (tokens (N, T, C)) over their images:
    with `shared_dense` the image side is made once per image (embedding + the one dense embedding),
    else once per prompt (its image's embedding + its own dense embedding)."""
    if shared_dense:
        return two_way_transformer(transformer, image_embeddings + dense[:1], image_pe, tokens, batch_row)
    return two_way_transformer(transformer, image_embeddings.index_select(0, batch_row) + dense, image_pe, tokens)


def decode(
    prompt_encoder: PromptEncoder,
    mask_decoder: MaskDecoder,
    image_embeddings: torch.Tensor,
    prompts: PromptBatch,
    *,
    outputs: str = "all",
) -> DecoderOutput:
    """Encodes the prompts and decodes their masks with SAM's modules: all four for each prompt, or
    with `outputs="used"` only output 0 when no prompt is a single point (PromptDecoder.forward).

    Prompts with different numbers of sparse tokens (with or without a box; how many points)
    are decoded in separate batched calls, each with exactly its real points, as SamPredictor
    is called; the results come back in the prompts' order.
    """
    first_only = first_output_only(outputs, prompts)
    logits, iou_pred = empty_outputs(image_embeddings, len(prompts), masks=1 if first_only else MASK_OUTPUTS)
    image_pe = prompt_encoder.get_dense_pe()
    for select, has_box, k in prompt_groups(prompts):
        sparse, dense = encode_prompt_group(prompt_encoder, prompts, select, has_box=has_box, n_points=k)
        out = predict_masks_batched(
            mask_decoder, image_embeddings, prompts.batch_row[select], image_pe, sparse, dense,
            # without mask prompts every prompt's dense embedding is the prompt encoder's no-mask one
            shared_dense=prompts.masks is None, first_output_only=first_only,
        )
        logits = logits.index_copy(0, select, out.logits.to(logits.dtype))
        iou_pred = iou_pred.index_copy(0, select, out.iou_pred.to(iou_pred.dtype))
    return DecoderOutput(logits, iou_pred)


def prompt_groups(prompts: PromptBatch):
    """(indices, has_box, points) of each group of prompts with the same shape, which one batched
    call can decode; a prompt without a box, a point or a mask is a ValueError."""
    if bool((~prompts.is_box & (prompts.n_points == 0) & ~prompts.mask_given).any()):
        raise ValueError("a prompt needs a box, a point or a mask")
    shapes, shape_of = torch.unique(torch.stack([prompts.is_box.long(), prompts.n_points], dim=1), dim=0,
                                    return_inverse=True)
    for group, (has_box, k) in enumerate(shapes.tolist()):
        yield (shape_of == group).nonzero().squeeze(1), bool(has_box), k


def encode_prompt_group(prompt_encoder, prompts: PromptBatch, select: torch.Tensor, *, has_box: bool,
                        n_points: int) -> tuple[torch.Tensor, torch.Tensor]:
    """SAM's prompt encoder on the prompts `select` (one group of `prompt_groups`): their sparse and
    dense embeddings, the no-mask embedding where a prompt has no mask."""
    sparse, dense = prompt_encoder(
        points=(prompts.points[select, :n_points], prompts.labels[select, :n_points]) if n_points else None,
        boxes=prompts.boxes[select] if has_box else None,
        masks=None if prompts.masks is None else prompts.masks[select].unsqueeze(1),
    )
    if prompts.masks is None:
        # Every prompt's dense embedding is the no-mask one: that one vector, which broadcasts over the
        # image, rather than its expansion to (N, C, H, W), whose backward would fill and sum that size.
        return sparse, prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
    return sparse, without_absent_masks(prompt_encoder, prompts, select, dense)


def without_absent_masks(prompt_encoder, prompts: PromptBatch, select: torch.Tensor,
                         dense: torch.Tensor) -> torch.Tensor:
    """The dense embeddings of `select`, with the no-mask embedding where a prompt has no mask."""
    if prompts.masks is None or prompts.has_mask is None:
        return dense
    no_mask = prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand_as(dense)
    return torch.where(prompts.has_mask[select].view(-1, 1, 1, 1), dense, no_mask)


def empty_outputs(like: torch.Tensor, n: int, *, masks: int = MASK_OUTPUTS) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (n, masks, 256, 256) and predicted IoUs (n, 4) to fill."""
    return (like.new_empty((n, masks, LOW_RES_SIZE, LOW_RES_SIZE)), like.new_empty((n, MASK_OUTPUTS)))


def first_output_only(outputs: str, prompts: PromptBatch) -> bool:
    """Whether a decoder asked for `outputs` ("all" or "used") may make output 0's logits alone."""
    if outputs not in DECODER_OUTPUTS:
        raise ValueError(f"unknown outputs {outputs!r}; choose one of {', '.join(DECODER_OUTPUTS)}")
    return outputs == "used" and not bool(prompts.multimask.any())


# ------------------------------------------------------------------------------------- losses
def dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-mask soft Dice loss over the last two dims: (..., H, W) -> (...)."""
    p = logits.sigmoid().flatten(-2)
    t = target.flatten(-2)
    return 1 - (2 * (p * t).sum(-1) + 1) / (p.sum(-1) + t.sum(-1) + 1)


def focal_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-mask sigmoid focal loss (alpha 0.25, gamma 2), averaged over pixels."""
    return sigmoid_focal_loss(logits, target, alpha=0.25, gamma=2.0, reduction="none").flatten(-2).mean(-1)


def mask_iou(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """IoU of the thresholded prediction (logit > 0) against the target (> 0.5), per mask."""
    pred = (logits > 0).flatten(-2)
    truth = (target > 0.5).flatten(-2)
    intersection = (pred & truth).sum(-1).float()
    union = (pred | truth).sum(-1).float()
    return torch.where(union > 0, intersection / union.clamp(min=1), torch.ones_like(union))


@dataclass
class LossParts:
    total: torch.Tensor
    mask: torch.Tensor
    iou: torch.Tensor
    train_iou: torch.Tensor


@dataclass
class MaskTerms:
    """The mask part of a loss: the logits scored (N, 1 or 4, 256, 256), the output chosen per
    prompt, the mean mask term, and the chosen masks' real IoU (N,)."""

    logits: torch.Tensor
    choice: torch.Tensor
    mask_term: torch.Tensor
    real_iou: torch.Tensor


def mask_terms(output: DecoderOutput, targets: torch.Tensor, multimask: torch.Tensor, kind: str) -> MaskTerms:
    """The mask term of loss `kind` (see compute_loss) on the output each prompt trains: output 0
    for single-mask prompts, the best of the three multimask outputs for a single point."""
    if kind not in LOSSES:
        raise ValueError(f"unknown loss {kind!r}; choose one of {', '.join(LOSSES)}")
    logits = output.logits.float()
    if not bool(multimask.any()):  # the common case: only the single-mask output can be chosen
        logits = logits[:, :1]
    expanded = targets.unsqueeze(1).expand_as(logits)
    if kind == "sam":
        per_mask = 20 * focal_loss(logits, expanded) + dice_loss(logits, expanded)
    elif kind == "dice-bce":
        # Class-balanced: foreground pixels weigh background/foreground as much, so a decoder that
        # starts from random weights is not drawn into predicting background everywhere.
        foreground = expanded.flatten(-2).mean(-1).clamp(1e-4, 1 - 1e-4)
        pos_weight = ((1 - foreground) / foreground)[..., None, None]
        bce = F.binary_cross_entropy_with_logits(logits, expanded, pos_weight=pos_weight, reduction="none")
        per_mask = dice_loss(logits, expanded) + bce.flatten(-2).mean(-1)
    else:
        # The tutorial normalizes its (1, 1, H, W) mask over the channel axis: each mask on its own.
        thresholded = F.normalize(F.threshold(logits, 0.0, 0.0).unsqueeze(2), dim=2).squeeze(2)
        per_mask = ((thresholded - (expanded > 0.5).float()) ** 2).flatten(-2).mean(-1)
    if logits.shape[1] == 1:
        choice = torch.zeros_like(multimask, dtype=torch.long)
    else:
        multi_best = 1 + per_mask[:, 1:].argmin(dim=1).detach()
        choice = torch.where(multimask, multi_best, torch.zeros_like(multi_best))
    rows = torch.arange(choice.shape[0], device=choice.device)
    real_iou = mask_iou(logits[rows, choice].detach(), targets)
    return MaskTerms(logits, choice, per_mask[rows, choice].mean(), real_iou)


def compute_loss(output: DecoderOutput, targets: torch.Tensor, multimask: torch.Tensor,
                 kind: str = "sam") -> LossParts:
    """SAM's training loss for N prompts with (N, 256, 256) low-res targets in [0, 1]; `multimask`
    (PromptBatch.multimask) marks the prompts whose three multimask outputs compete.

    `sam`: 20 x focal + 1 x dice on the mask logits, plus the MSE between the IoU head and
    the real IoU of the chosen mask (SAM's recipe, for decoders that start pretrained).
    `dice-bce`: dice + class-balanced binary cross-entropy, plus the same IoU term; it learns
    from a randomly initialised decoder, where SAM's focal-heavy recipe settles on predicting
    background everywhere. `mse-threshold`: the well-known tutorial's loss (MSE between the
    thresholded, normalized mask and the target), kept for comparison only: its gradient is
    almost everywhere zero. (SAM 2.1's loss: sam2_decoder.sam2_loss.)
    """
    terms = mask_terms(output, targets, multimask, kind)
    rows = torch.arange(terms.choice.shape[0], device=terms.choice.device)
    iou_term = F.mse_loss(output.iou_pred.float()[rows, terms.choice], terms.real_iou)
    total = terms.mask_term + (iou_term if kind != "mse-threshold" else 0 * iou_term)
    return LossParts(total, terms.mask_term.detach(), iou_term.detach(), terms.real_iou.mean().detach())


# ---------------------------------------------------------------------- the family's module
def choose_mask(output: DecoderOutput, multimask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (N, 256, 256), predicted IoU (N,)): output 0 (SamPredictor's multimask_output=False)
    unless `multimask` (PromptBatch.multimask), then the highest predicted IoU of outputs 1-3."""
    multi_best = 1 + output.iou_pred[:, 1:].argmax(dim=1)
    choice = torch.where(multimask, multi_best, torch.zeros_like(multi_best))
    rows = torch.arange(choice.shape[0], device=choice.device)
    return output.logits[rows, choice], output.iou_pred[rows, choice]


def upscale_logits(logits: torch.Tensor, input_size: tuple[int, int], original_size: tuple[int, int],
                   image_size: int = IMAGE_SIZE) -> torch.Tensor:
    """Low-res logits (N, 256, 256) -> (N, H, W) at the original resolution, as `Sam.postprocess_masks`:
    bilinear to the padded input frame, crop the padding, bilinear to the original size."""
    x = F.interpolate(logits.unsqueeze(1), (image_size, image_size), mode="bilinear", align_corners=False)
    x = x[..., : input_size[0], : input_size[1]]
    return F.interpolate(x, original_size, mode="bilinear", align_corners=False).squeeze(1)


class PromptDecoder(torch.nn.Module):
    """A model's prompt encoder and mask decoder as one module, decoding as its family does:
    what training wraps (DistributedDataParallel too), and what inference, evaluation and
    prediction call. `forward` decodes; `upscale` brings logits to the image; `loss` trains.

    Arguments:
      prompt_encoder, mask_decoder: the model's own modules (their state dict keys stay
        `prompt_encoder.*` and `mask_decoder.*`).
      family: the model family (families.ModelFamily) that made it, for what it supports.
      model_type: the model's type, for messages.
    """

    reads = "embedding"
    """Which of a cached image's features `forward` takes (EmbeddingCache.features): "embedding", the
    decoder's input; "tail_tokens" for a decoder behind a trained encoder tail (encoder_tail.py)."""

    def __init__(self, prompt_encoder: torch.nn.Module, mask_decoder: torch.nn.Module, *, family, model_type: str):
        super().__init__()
        self.prompt_encoder, self.mask_decoder = prompt_encoder, mask_decoder
        self.family, self.model_type = family, model_type

    def forward(self, features: torch.Tensor, prompts: PromptBatch, *, outputs: str = "all") -> DecoderOutput:
        """Decodes `prompts` on `features`. `outputs`: "all" makes all four mask outputs (what
        SamPredictor can return); "used" may leave out the outputs no loss or choice reads (the
        multimask ones when no prompt is a single point; training's setting: their logits and
        gradients are a quarter or more of the step's memory traffic, and their hypernetworks then
        stay as they are rather than drift under weight decay)."""
        raise NotImplementedError

    def upscale(self, logits: torch.Tensor, input_size: tuple[int, int],
                original_size: tuple[int, int]) -> torch.Tensor:
        """Low-res logits (N, 256, 256) -> (N, H, W) at the original resolution."""
        raise NotImplementedError

    def loss(self, output: DecoderOutput, targets: torch.Tensor, multimask: torch.Tensor, kind: str) -> LossParts:
        """The training loss `kind` (config.LOSSES) of an output of this decoder."""
        raise NotImplementedError


class SamPromptDecoder(PromptDecoder):
    """SAM's (and the tiny's): `decode`, `Sam.postprocess_masks`, `compute_loss`."""

    def forward(self, features: torch.Tensor, prompts: PromptBatch, *, outputs: str = "all") -> DecoderOutput:
        return decode(self.prompt_encoder, self.mask_decoder, features, prompts, outputs=outputs)

    def upscale(self, logits, input_size, original_size):
        return upscale_logits(logits, input_size, original_size)

    def loss(self, output, targets, multimask, kind):
        return compute_loss(output, targets, multimask, kind)
