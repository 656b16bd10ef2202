"""The prompt encoder + mask decoder over many images and prompts at once, and the losses.

Stock `MaskDecoder.predict_masks` serves one image: it repeats that image's embedding once
per prompt. Training wants B images with K prompts each in one step, so `decode` runs the
same modules (same parameters, same state dict) with each prompt paired to its own image
through an index, `batch_row[n]` = the image of prompt n. One embedding read then serves
all the prompts of its image.

Work that does not depend on the prompt is done once per image, not once per prompt: without
a mask prompt the dense prompt embedding is the same for every prompt, so in the transformer's
first block the image side's projections (the keys and values the tokens attend to, and the
queries with which the image attends back) are computed on the B images and shared by their
prompts. Those are 3 of the ~13 image-sized matmuls (4096 x 256 x 128 multiply-adds each, the
upscaling counted in the same units) of a prompt's forward pass; the rest follows the stock
modules exactly (tested against `MaskDecoder.predict_masks`).

A single point alone is ambiguous: it uses the three multimask outputs, as SAM was trained (the
loss takes the best of the three, inference (inference.py) the one with the highest predicted
IoU). Every other prompt (a box, a box with points, several points) uses the single-mask output,
SamPredictor's `multimask_output=False`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from segment_anything.modeling import MaskDecoder, PromptEncoder
from torchvision.ops import sigmoid_focal_loss

from samcache.config import LOSSES
from samcache.models.feature_layout import unpack_sam2
from samcache.models.prompts import PromptBatch
from samcache.models.sam2_decoder import decode_group, is_sam2_decoder
from samcache.models.specs import LOW_RES_SIZE, MASK_OUTPUTS


@dataclass
class DecoderOutput:
    """Low-res logits (N, 4, 256, 256) and predicted IoUs (N, 4) of all four mask tokens; SAM 2.1's
    decoder also scores whether the object is there at all (N, 1) logits, else None."""

    logits: torch.Tensor
    iou_pred: torch.Tensor
    object_score: Optional[torch.Tensor] = None


def predict_masks_batched(
    mask_decoder: MaskDecoder,
    image_embeddings: torch.Tensor,
    batch_row: torch.Tensor,
    image_pe: torch.Tensor,
    sparse: torch.Tensor,
    dense: torch.Tensor,
    *,
    shared_dense: bool = False,
) -> DecoderOutput:
    """`MaskDecoder.predict_masks` with prompt n attending to image `batch_row[n]`.

    Arguments:
      image_embeddings: (B, 256, 64, 64) from the image encoder (or the cache).
      batch_row: (N,) the row of `image_embeddings` (the image) of each prompt.
      image_pe: (1, 256, 64, 64) the prompt encoder's dense positional encoding.
      sparse, dense: the prompt encoder's outputs for the N prompts.
      shared_dense: every prompt's dense embedding is the same (no mask prompts), which lets
        the first block's image-side work be done once per image.
    """
    d = mask_decoder
    n = sparse.shape[0]
    output_tokens = torch.cat([d.iou_token.weight, d.mask_tokens.weight], dim=0)
    tokens = torch.cat([output_tokens.unsqueeze(0).expand(n, -1, -1), sparse], dim=1)
    _, c, h, w = image_embeddings.shape
    if shared_dense:  # the same dense embedding for all prompts: image-side work once per image
        hs, src = _transformer_sharing_images(d.transformer, image_embeddings + dense[:1], batch_row, image_pe,
                                              tokens)
    else:
        src = image_embeddings.index_select(0, batch_row) + dense
        hs, src = d.transformer(src, image_pe.expand(n, -1, -1, -1), tokens)
    iou_token_out = hs[:, 0, :]
    mask_tokens_out = hs[:, 1 : 1 + d.num_mask_tokens, :]

    upscaled = d.output_upscaling(src.transpose(1, 2).reshape(n, c, h, w))
    hyper_in = torch.stack(
        [mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(d.output_hypernetworks_mlps)], dim=1
    )
    _, c_up, h_up, w_up = upscaled.shape
    logits = (hyper_in @ upscaled.reshape(n, c_up, h_up * w_up)).reshape(n, -1, h_up, w_up)
    return DecoderOutput(logits, d.iou_prediction_head(iou_token_out))


def decode(
    prompt_encoder: PromptEncoder,
    mask_decoder: MaskDecoder,
    image_embeddings: torch.Tensor,
    prompts: PromptBatch,
) -> DecoderOutput:
    """Encodes the prompts and decodes all four masks for each of them.

    Prompts with different numbers of sparse tokens (with or without a box; how many points)
    are decoded in separate batched calls, each with exactly its real points, as SamPredictor
    is called; the results come back in the prompts' order. SAM 2.1's modules (then
    `image_embeddings` are the packed features) decode through sam2_decoder.py.
    """
    n = len(prompts)
    sam2 = is_sam2_decoder(mask_decoder)
    logits = image_embeddings.new_empty((n, MASK_OUTPUTS, LOW_RES_SIZE, LOW_RES_SIZE))
    iou_pred = image_embeddings.new_empty((n, MASK_OUTPUTS))
    object_score = image_embeddings.new_empty((n, 1)) if sam2 else None
    maps = unpack_sam2(image_embeddings) if sam2 else None  # once for all the shape groups
    image_pe = prompt_encoder.get_dense_pe()
    n_points = prompts.n_points
    if bool((~prompts.is_box & (n_points == 0) & ~prompts.mask_given).any()):
        raise ValueError("a prompt needs a box, a point or a mask")
    shapes, shape_of = torch.unique(torch.stack([prompts.is_box.long(), n_points], dim=1), dim=0,
                                    return_inverse=True)
    for group, (has_box, k) in enumerate(shapes.tolist()):
        select = (shape_of == group).nonzero().squeeze(1)
        if sam2:
            group_logits, group_iou, group_score = decode_group(prompt_encoder, mask_decoder, maps, prompts, select,
                                                                has_box=bool(has_box), n_points=k)
            logits = logits.index_copy(0, select, group_logits.to(logits.dtype))
            iou_pred = iou_pred.index_copy(0, select, group_iou.to(iou_pred.dtype))
            object_score = object_score.index_copy(0, select, group_score.to(object_score.dtype))
            continue
        sparse, dense = prompt_encoder(
            points=(prompts.points[select, :k], prompts.labels[select, :k]) if k else None,
            boxes=prompts.boxes[select] if has_box else None,
            masks=None if prompts.masks is None else prompts.masks[select].unsqueeze(1),
        )
        if prompts.masks is not None and prompts.has_mask is not None:  # some prompts without a mask
            no_mask = prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand_as(dense)
            dense = torch.where(prompts.has_mask[select].view(-1, 1, 1, 1), dense, no_mask)
        out = predict_masks_batched(
            mask_decoder, image_embeddings, prompts.batch_row[select], image_pe, sparse, dense,
            # without mask prompts every prompt's dense embedding is the prompt encoder's no-mask one
            shared_dense=prompts.masks is None,
        )
        logits = logits.index_copy(0, select, out.logits.to(logits.dtype))
        iou_pred = iou_pred.index_copy(0, select, out.iou_pred.to(iou_pred.dtype))
    return DecoderOutput(logits, iou_pred, object_score)


def _transformer_sharing_images(transformer, image_src: torch.Tensor, batch_row: torch.Tensor,
                                image_pe: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`TwoWayTransformer.forward` for N prompts over B images (`image_src` = embedding + the
    shared dense embedding, (B, C, H, W)), with the first block's image-side projections done
    per image. The later blocks see per-prompt keys and run as stock."""
    keys_image = image_src.flatten(2).permute(0, 2, 1)  # (B, HW, C)
    key_pe = image_pe.flatten(2).permute(0, 2, 1)  # (1, HW, C)
    first, queries, query_pe = transformer.layers[0], tokens, tokens

    # The first block, as TwoWayAttentionBlock with skip_first_layer_pe.
    queries = first.norm1(first.self_attn(q=queries, k=queries, v=queries))
    t2i = first.cross_attn_token_to_image
    keys_with_pe = keys_image + key_pe
    attended = _attend(t2i, t2i.q_proj(queries + query_pe),
                       t2i.k_proj(keys_with_pe).index_select(0, batch_row),
                       t2i.v_proj(keys_image).index_select(0, batch_row))
    queries = first.norm2(queries + attended)
    queries = first.norm3(queries + first.mlp(queries))
    i2t = first.cross_attn_image_to_token
    attended = _attend(i2t, i2t.q_proj(keys_with_pe).index_select(0, batch_row),
                       i2t.k_proj(queries + query_pe), i2t.v_proj(queries))
    keys = first.norm4(keys_image.index_select(0, batch_row) + attended)

    for layer in transformer.layers[1:]:
        queries, keys = layer(queries=queries, keys=keys, query_pe=query_pe, key_pe=key_pe)
    attended = transformer.final_attn_token_to_image(q=queries + query_pe, k=keys + key_pe, v=keys)
    return transformer.norm_final_attn(queries + attended), keys


def _attend(attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """segment_anything's `Attention.forward` after its input projections."""
    q, k, v = (attention._separate_heads(x, attention.num_heads) for x in (q, k, v))
    attn = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)
    return attention.out_proj(attention._recombine_heads(attn @ v))


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


def compute_loss(output: DecoderOutput, targets: torch.Tensor, multimask: torch.Tensor,
                 kind: str = "sam") -> LossParts:
    """The training loss for N prompts with (N, 256, 256) low-res targets in [0, 1]; `multimask`
    (PromptBatch.multimask) marks the prompts whose three multimask outputs compete.

    `sam`: 20 x focal + 1 x dice on the mask logits, plus the MSE between the IoU head and
    the real IoU of the chosen mask (SAM's recipe, for decoders that start pretrained). For SAM 2.1
    (an output with object scores) SAM 2's weights instead (sam2's training/loss_fns.py, as its
    released configs set it): the same mask terms, the IoU head's L1 error, on all three outputs
    of a multimask prompt (`supervise_all_iou`), and the object score's BCE (target: the low-res
    target has a pixel of the object, true for every annotated object), 1 each. As for SAM, the
    masks are scored at the decoder's 256x256 against area-averaged targets (sam2's trainer
    upsamples them to 1024x1024 against binary ones), and objects are never absent here, so sam2's
    gating of the mask terms by the object score does not arise.
    `dice-bce`: dice + class-balanced binary cross-entropy, plus the same IoU term; it learns
    from a randomly initialised decoder, where SAM's focal-heavy recipe settles on predicting
    background everywhere. `mse-threshold`: the well-known tutorial's loss (MSE between the
    thresholded, normalized mask and the target), kept for comparison only: its gradient is
    almost everywhere zero.
    """
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
    # Single-mask prompts train output 0; a single point trains the best of the three multimask outputs.
    if logits.shape[1] == 1:
        choice = torch.zeros_like(multimask, dtype=torch.long)
    else:
        multi_best = 1 + per_mask[:, 1:].argmin(dim=1).detach()
        choice = torch.where(multimask, multi_best, torch.zeros_like(multi_best))
    rows = torch.arange(choice.shape[0], device=choice.device)
    chosen_logits = logits[rows, choice]
    mask_term = per_mask[rows, choice].mean()
    real_iou = mask_iou(chosen_logits.detach(), targets)
    if kind == "sam" and output.object_score is not None:
        return _sam2_loss(output, logits, targets, multimask, mask_term, real_iou)
    iou_term = F.mse_loss(output.iou_pred.float()[rows, choice], real_iou)
    total = mask_term + (iou_term if kind != "mse-threshold" else 0 * iou_term)
    return LossParts(total, mask_term.detach(), iou_term.detach(), real_iou.mean().detach())


def _sam2_loss(output: DecoderOutput, logits: torch.Tensor, targets: torch.Tensor, multimask: torch.Tensor,
               mask_term: torch.Tensor, chosen_iou: torch.Tensor) -> LossParts:
    """compute_loss's `sam` for SAM 2.1: its mask term as given, plus the IoU head's L1 error (every
    multimask output of a multimask prompt, output 0 of the others) and the object score's BCE."""
    predicted = output.iou_pred.float()[:, : logits.shape[1]]
    real = mask_iou(logits.detach(), targets.unsqueeze(1).expand_as(logits))
    l1 = (predicted - real).abs()
    if logits.shape[1] > 1:
        iou_term = torch.where(multimask, l1[:, 1:].mean(dim=1), l1[:, 0]).mean()
    else:
        iou_term = l1[:, 0].mean()
    present = (targets.flatten(1).amax(dim=1) > 0).float()
    object_term = F.binary_cross_entropy_with_logits(output.object_score.float()[:, 0], present)
    total = mask_term + iou_term + object_term
    return LossParts(total, mask_term.detach(), iou_term.detach(), chosen_iou.mean().detach())
