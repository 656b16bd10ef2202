"""SAM 2.1's prompt encoder and mask decoder over many images and prompts at once, from cached features.

The same call as `SAM2ImagePredictor._predict`, with each prompt paired to its own image through
`batch_row` (decoder.py explains the batching), in SAM 2.1's conventions:

- a box goes in as two points labelled 2 and 3, ahead of the click points, and the prompt
  encoder pads every prompt with one "not a point" token (the predictor never passes `boxes`);
- the mask decoder adds the two high-resolution maps (high_res_s1, high_res_s0, unpacked from
  the cached features: feature_layout.py) while upscaling, and predicts an object score;
- in eval mode, the single-mask output falls back to the best multimask output when its
  stability score is low (`dynamic_multimask_via_stability`, on in SAM2ImagePredictor's models);
  in training mode it does not, as in sam2's own trainer.

All four mask outputs come back, as for SAM; `decoder.decode` calls this for SAM 2.1's modules.
"""

from __future__ import annotations

import torch

from samcache.models.prompts import PromptBatch


def is_sam2_decoder(mask_decoder: torch.nn.Module) -> bool:
    """True for the sam2 package's MaskDecoder (high-resolution features, object score head)."""
    return type(mask_decoder).__module__.startswith("sam2.")


def decode_group(prompt_encoder: torch.nn.Module, mask_decoder: torch.nn.Module, maps: dict[str, torch.Tensor],
                 prompts: PromptBatch, select: torch.Tensor, *, has_box: bool,
                 n_points: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits (n, 4, 256, 256), predicted IoUs (n, 4), object score logits (n, 1)) of the prompts
    `select`, which all have the same shape (a box or not, `n_points` points).

    Arguments:
      prompt_encoder, mask_decoder: SAM 2.1's `sam_prompt_encoder` and `sam_mask_decoder`.
      maps: the batch's images' three maps (B, C, H, W), `unpack_sam2` of their packed features.
      prompts: the batch's prompts (in the 1024x1024 input frame).
    """
    rows = prompts.batch_row[select]
    coords, labels = [], []
    if has_box:
        coords.append(prompts.boxes[select].reshape(-1, 2, 2))
        labels.append(torch.tensor([[2, 3]], dtype=torch.long, device=rows.device).expand(len(select), 2))
    if n_points:
        coords.append(prompts.points[select, :n_points])
        labels.append(prompts.labels[select, :n_points])
    points = (torch.cat(coords, dim=1), torch.cat(labels, dim=1)) if coords else None
    masks = None if prompts.masks is None else prompts.masks[select].unsqueeze(1)
    sparse, dense = prompt_encoder(points=points, boxes=None, masks=masks)
    if prompts.masks is not None and prompts.has_mask is not None:  # some prompts without a mask
        no_mask = prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand_as(dense)
        dense = torch.where(prompts.has_mask[select].view(-1, 1, 1, 1), dense, no_mask)
    maps = {name: value.index_select(0, rows) for name, value in maps.items()}  # each prompt's own image
    logits, iou_pred, _, object_score = mask_decoder.predict_masks(
        image_embeddings=maps["image_embed"],
        image_pe=prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        repeat_image=False,
        high_res_features=[maps["high_res_s0"], maps["high_res_s1"]],
    )
    if mask_decoder.dynamic_multimask_via_stability and not mask_decoder.training:
        single, single_iou = mask_decoder._dynamic_multimask_via_stability(logits, iou_pred)
        logits = torch.cat([single, logits[:, 1:]], dim=1)
        iou_pred = torch.cat([single_iou, iou_pred[:, 1:]], dim=1)
    return logits, iou_pred, object_score
