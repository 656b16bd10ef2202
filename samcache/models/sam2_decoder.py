"""SAM 2.1's prompt encoder and mask decoder over many images and prompts at once, from cached features.

The same call as `SAM2ImagePredictor._predict`, with each prompt paired to its own image through
`batch_row` (decoder.py explains the batching), in SAM 2.1's conventions:

- a box goes in as two points labelled 2 and 3, ahead of the click points, and the prompt
  encoder pads every prompt with one "not a point" token (the predictor never passes `boxes`);
- the mask decoder adds the two high-resolution maps (high_res_s1, high_res_s0, unpacked from
  the cached features: feature_layout.py) while upscaling, and predicts an object score;
- in eval mode, the single-mask output falls back to the best multimask output when its
  stability score is low (`dynamic_multimask_via_stability`, on in SAM2ImagePredictor's models);
  in training mode it does not, as in sam2's own trainer;
- masks go back to the image in one bilinear resize (SAM2Transforms.postprocess_masks): its
  input frame is the whole image, stretched.

All four mask outputs come back, as for SAM. The arithmetic is sam2's `MaskDecoder.predict_masks`
run as SAM's decoder is (decoder.py): the two-way transformer's cross-attentions folded into the
prompt tokens, an image's prompts sharing its first block, the upscaling as products on the
tokens with the high-resolution maps put in the tokens' order once per image (upscaling.py); equal
to sam2's own call within float rounding, outputs and gradients (tests/test_sam2_pipeline.py).
`Sam2PromptDecoder` is what the SAM 2.1 family (families.py) hands out.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from samcache.models.decoder import (
    DecoderOutput,
    LossParts,
    PromptDecoder,
    compute_loss,
    mask_iou,
    mask_terms,
    prompt_groups,
    transformer_on_prompts,
    without_absent_masks,
)
from samcache.models.feature_layout import unpack_sam2
from samcache.models.prompts import PromptBatch
from samcache.models.specs import LOW_RES_SIZE, MASK_OUTPUTS
from samcache.models.upscaling import mask_logits


class Sam2PromptDecoder(PromptDecoder):
    """SAM 2.1's `sam_prompt_encoder` and `sam_mask_decoder`, fed the packed features (B, 1024, 64, 64)."""

    def forward(self, features: torch.Tensor, prompts: PromptBatch, *, outputs: str = "all") -> DecoderOutput:
        # Always all four outputs: sam2's MaskDecoder makes them in one call, however many are read.
        n = len(prompts)
        logits = features.new_empty((n, MASK_OUTPUTS, LOW_RES_SIZE, LOW_RES_SIZE))
        iou_pred = features.new_empty((n, MASK_OUTPUTS))
        object_score = features.new_empty((n, 1))
        maps = unpack_sam2(features)  # once for all the shape groups
        for select, has_box, k in prompt_groups(prompts):
            group_logits, group_iou, group_score = self._decode_group(maps, prompts, select, has_box=has_box,
                                                                      n_points=k)
            logits = logits.index_copy(0, select, group_logits.to(logits.dtype))
            iou_pred = iou_pred.index_copy(0, select, group_iou.to(iou_pred.dtype))
            object_score = object_score.index_copy(0, select, group_score.to(object_score.dtype))
        return DecoderOutput(logits, iou_pred, object_score)

    def _decode_group(self, maps: dict[str, torch.Tensor], prompts: PromptBatch, select: torch.Tensor, *,
                      has_box: bool, n_points: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits (n, 4, 256, 256), predicted IoUs (n, 4), object score logits (n, 1)) of the prompts
        `select`, which all have the same shape (a box or not, `n_points` points)."""
        prompt_encoder, mask_decoder = self.prompt_encoder, self.mask_decoder
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
        dense = without_absent_masks(prompt_encoder, prompts, select, dense)
        d = mask_decoder
        first = [d.obj_score_token.weight] if d.pred_obj_scores else []  # output tokens: sam2's order
        output_tokens = torch.cat([*first, d.iou_token.weight, d.mask_tokens.weight], dim=0)
        tokens = torch.cat([output_tokens.unsqueeze(0).expand(len(select), -1, -1), sparse], dim=1)
        image_embed = maps["image_embed"]
        hs, src = transformer_on_prompts(d.transformer, image_embed, rows, prompt_encoder.get_dense_pe(), tokens,
                                         dense, shared_dense=prompts.masks is None)
        s = len(first)
        mask_tokens_out = hs[:, s + 1 : s + 1 + d.num_mask_tokens, :]
        hyper_in = torch.stack([mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(d.output_hypernetworks_mlps)],
                               dim=1)
        high_res = (maps["high_res_s0"], maps["high_res_s1"]) if d.use_high_res_features else None
        logits = mask_logits(d.output_upscaling, src, hyper_in, *image_embed.shape[-2:], high_res=high_res,
                             batch_row=rows)
        iou_pred = d.iou_prediction_head(hs[:, s, :])
        object_score = (d.pred_obj_score_head(hs[:, 0, :]) if d.pred_obj_scores
                        else 10.0 * iou_pred.new_ones(iou_pred.shape[0], 1))  # sam2's "present" when not predicted
        if mask_decoder.dynamic_multimask_via_stability and not mask_decoder.training:
            single, single_iou = mask_decoder._dynamic_multimask_via_stability(logits, iou_pred)
            logits = torch.cat([single, logits[:, 1:]], dim=1)
            iou_pred = torch.cat([single_iou, iou_pred[:, 1:]], dim=1)
        return logits, iou_pred, object_score

    def upscale(self, logits: torch.Tensor, input_size: tuple[int, int],
                original_size: tuple[int, int]) -> torch.Tensor:
        return F.interpolate(logits.unsqueeze(1), original_size, mode="bilinear", align_corners=False).squeeze(1)

    def loss(self, output: DecoderOutput, targets: torch.Tensor, multimask: torch.Tensor, kind: str) -> LossParts:
        if kind == "sam":
            return sam2_loss(output, targets, multimask)
        return compute_loss(output, targets, multimask, kind)


def sam2_loss(output: DecoderOutput, targets: torch.Tensor, multimask: torch.Tensor) -> LossParts:
    """SAM 2's loss (sam2's training/loss_fns.py, as its released configs set it): SAM's mask terms
    (20 x focal + 1 x dice on the chosen mask), the IoU head's L1 error on all three outputs of a
    multimask prompt (`supervise_all_iou`) and on output 0 of the others, and the object score's
    BCE (target: the low-res target has a pixel of the object, true for every annotated object),
    1 each. As for SAM, the masks are scored at the decoder's 256x256 against area-averaged targets
    (sam2's trainer upsamples them to 1024x1024 against binary ones), and objects are never absent
    here, so sam2's gating of the mask terms by the object score does not arise."""
    terms = mask_terms(output, targets, multimask, "sam")
    logits = terms.logits
    predicted = output.iou_pred.float()[:, : logits.shape[1]]
    real = mask_iou(logits.detach(), targets.unsqueeze(1).expand_as(logits))
    l1 = (predicted - real).abs()
    if logits.shape[1] > 1:
        iou_term = torch.where(multimask, l1[:, 1:].mean(dim=1), l1[:, 0]).mean()
    else:
        iou_term = l1[:, 0].mean()
    present = (targets.flatten(1).amax(dim=1) > 0).float()
    object_term = F.binary_cross_entropy_with_logits(output.object_score.float()[:, 0], present)
    total = terms.mask_term + iou_term + object_term
    return LossParts(total, terms.mask_term.detach(), iou_term.detach(), terms.real_iou.mean().detach())
