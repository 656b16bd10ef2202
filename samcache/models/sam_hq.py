"""SAM-HQ (`hq_vit_b`, `hq_vit_l`, `hq_vit_h`, `hq_vit_tiny`): SAM with a high-quality output token.

SAM-HQ keeps SAM's encoder, prompt encoder and mask decoder, and adds to the decoder an HQ output
token (`hf_token`) with its own MLP (`hf_mlp`), and a fusion of the encoder's early feature with the
final embedding: `compress_vit_feat` (the early feature: the output of the ViT's first
global-attention block, or the TinyViT's second stage), `embedding_encoder` (the embedding) and
`embedding_maskfeature` (SAM's upscaled mask features). Its predictor's mask is SAM's chosen mask
plus the HQ token's; its trainer trains the HQ parts alone, SAM frozen, on the HQ token's mask.

The cache therefore stores the early feature beside the embedding (feature_layout.SamHqLayout), and
the decoder receives both stacked along the channels: (256 + C, 64, 64), C the early feature's
channels (specs.SAM_HQ_VIT_CHANNELS). The modules are the `segment_anything_hq` package's own, so a
state dict here is that package's layout (its `sam_model_registry` loads an export).
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from segment_anything.modeling import PromptEncoder, Sam

from samcache.models.decoder import (
    DecoderOutput,
    LossParts,
    PromptDecoder,
    compute_loss,
    empty_outputs,
    encode_prompt_group,
    mask_iou,
    prompt_groups,
    transformer_on_prompts,
    upscale_logits,
)
from samcache.models.mobile_sam import TINY_VIT_ARGUMENTS, RefreshingTinyViT, quiet_tiny_vit_import
from samcache.models.prompts import PromptBatch
from samcache.models.specs import (
    EMBEDDING_SIZE,
    ENCODER_SPECS,
    IMAGE_SIZE,
    LOW_RES_SIZE,
    MASK_OUTPUTS,
    PATCH_SIZE,
    PIXEL_MEAN,
    PIXEL_STD,
    PROMPT_EMBED_DIM,
    SAM_HQ_BASES,
    SAM_HQ_VIT_CHANNELS,
)
from samcache.models.upscaling import hypernetwork_logits

with quiet_tiny_vit_import():
    from segment_anything_hq.modeling import ImageEncoderViT, MaskDecoderHQ, TwoWayTransformer

HQ_PARTS = ("hf_token", "hf_mlp", "compress_vit_feat", "embedding_encoder", "embedding_maskfeature")
"""The modules SAM-HQ adds to SAM's mask decoder: what its trainer trains (`--train hq_head`)."""
HQ_POINTS = 112 * 112
"""Points at which SAM-HQ's loss scores each mask (its loss_masks), 3x oversampled, 3/4 of them the
most uncertain."""


def _packed(embedding: torch.Tensor, early: torch.Tensor) -> torch.Tensor:
    """(B, 256, 64, 64) and the early feature (B, 64, 64, C) -> (B, 256 + C, 64, 64)."""
    early = early.permute(0, 3, 1, 2)
    return torch.cat([embedding, early.to(embedding.dtype)], dim=1)


class PackedViT(ImageEncoderViT):
    """SAM-HQ's ViT, returning the embedding and the first global-attention block's output, stacked."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        embedding, interm = super().forward(x)
        return _packed(embedding, interm[0])


class PackedTinyViT(RefreshingTinyViT):
    """SAM-HQ's TinyViT (MobileSAM's), returning the embedding and its second stage's output, stacked."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        embedding, interm = super().forward(x)
        return _packed(embedding, interm[0])


def build_sam_hq(model_type: str) -> Sam:
    """An untrained SAM-HQ of `model_type` (eval, CPU), as segment_anything_hq's `build_sam_vit_*` make
    it, with an encoder that returns the packed features (its keys unchanged)."""
    spec = ENCODER_SPECS.get(SAM_HQ_BASES[model_type])
    if spec is None:  # hq_vit_tiny: MobileSAM's TinyViT
        encoder = PackedTinyViT(**TINY_VIT_ARGUMENTS)
    else:
        encoder = PackedViT(depth=spec.depth, embed_dim=spec.embed_dim, img_size=IMAGE_SIZE, mlp_ratio=4,
                            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=spec.num_heads,
                            patch_size=PATCH_SIZE, qkv_bias=True, use_rel_pos=True,
                            global_attn_indexes=spec.global_attn_indexes, window_size=14,
                            out_chans=PROMPT_EMBED_DIM)
    sam = Sam(
        image_encoder=encoder,
        prompt_encoder=PromptEncoder(embed_dim=PROMPT_EMBED_DIM, image_embedding_size=(EMBEDDING_SIZE, EMBEDDING_SIZE),
                                     input_image_size=(IMAGE_SIZE, IMAGE_SIZE), mask_in_chans=16),
        mask_decoder=MaskDecoderHQ(num_multimask_outputs=3,
                                   transformer=TwoWayTransformer(depth=2, embedding_dim=PROMPT_EMBED_DIM,
                                                                 mlp_dim=2048, num_heads=8),
                                   transformer_dim=PROMPT_EMBED_DIM, iou_head_depth=3, iou_head_hidden_dim=256,
                                   vit_dim=SAM_HQ_VIT_CHANNELS[model_type]),
        pixel_mean=list(PIXEL_MEAN),
        pixel_std=list(PIXEL_STD),
    )
    return sam.eval()


def hq_modules(mask_decoder: torch.nn.Module) -> list[torch.nn.Module]:
    """The HQ parts of a MaskDecoderHQ (HQ_PARTS)."""
    return [getattr(mask_decoder, name) for name in HQ_PARTS]


# ------------------------------------------------------------------------------------- decoding
def predict_masks_hq(mask_decoder: MaskDecoderHQ, embeddings: torch.Tensor, hq_features: torch.Tensor,
                     batch_row: torch.Tensor, image_pe: torch.Tensor, sparse: torch.Tensor, dense: torch.Tensor, *,
                     shared_dense: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`MaskDecoderHQ.predict_masks` with prompt n attending to image `batch_row[n]`: (SAM's four
    mask logits (N, 4, 256, 256), their predicted IoUs (N, 4), the HQ token's logits (N, 1, 256, 256))."""
    d = mask_decoder
    n = sparse.shape[0]
    output_tokens = torch.cat([d.iou_token.weight, d.mask_tokens.weight, d.hf_token.weight], dim=0)
    tokens = torch.cat([output_tokens.unsqueeze(0).expand(n, -1, -1), sparse], dim=1)
    _, c, h, w = embeddings.shape
    hs, src = transformer_on_prompts(d.transformer, embeddings, batch_row, image_pe, tokens, dense,
                                     shared_dense=shared_dense)
    iou_token_out = hs[:, 0, :]
    mask_tokens_out = hs[:, 1 : 1 + MASK_OUTPUTS + 1, :]  # SAM's four, then the HQ token

    upscaled_sam = d.output_upscaling(src.transpose(1, 2).reshape(n, c, h, w))
    upscaled_hq = d.embedding_maskfeature(upscaled_sam) + hq_features.index_select(0, batch_row)
    hyper_sam = torch.stack([mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(d.output_hypernetworks_mlps)],
                            dim=1)
    hyper_hq = d.hf_mlp(mask_tokens_out[:, MASK_OUTPUTS, :]).unsqueeze(1)
    logits_sam = hypernetwork_logits(hyper_sam, upscaled_sam)
    logits_hq = hypernetwork_logits(hyper_hq, upscaled_hq)
    return logits_sam, d.iou_prediction_head(iou_token_out), logits_hq


class SamHqPromptDecoder(PromptDecoder):
    """SAM-HQ's prompt encoder and HQ mask decoder, fed the packed features (B, 256 + C, 64, 64).

    Output k's logits are SAM's output k plus the HQ token's mask, so choosing output 0 (one mask) or
    the best of 1-3 (a single point) gives SAM-HQ's predictor's mask (`hq_token_only=False`, its
    default); `DecoderOutput.hq_logits` holds the HQ token's mask alone, what its loss trains."""

    def forward(self, features: torch.Tensor, prompts: PromptBatch, *, outputs: str = "all") -> DecoderOutput:
        # Always all four outputs: the HQ mask is added to each of SAM's, and its loss reads the HQ mask.
        d, pe = self.mask_decoder, self.prompt_encoder
        embeddings, early = features[:, :PROMPT_EMBED_DIM], features[:, PROMPT_EMBED_DIM:]
        hq_features = d.embedding_encoder(embeddings) + d.compress_vit_feat(early)  # once per image
        logits, iou_pred = empty_outputs(features, len(prompts))
        hq_logits = features.new_empty((len(prompts), 1, LOW_RES_SIZE, LOW_RES_SIZE))
        image_pe = pe.get_dense_pe()
        for select, has_box, k in prompt_groups(prompts):
            sparse, dense = encode_prompt_group(pe, prompts, select, has_box=has_box, n_points=k)
            group_sam, group_iou, group_hq = predict_masks_hq(d, embeddings, hq_features, prompts.batch_row[select],
                                                              image_pe, sparse, dense,
                                                              shared_dense=prompts.masks is None)
            logits = logits.index_copy(0, select, (group_sam + group_hq).to(logits.dtype))
            iou_pred = iou_pred.index_copy(0, select, group_iou.to(iou_pred.dtype))
            hq_logits = hq_logits.index_copy(0, select, group_hq.to(hq_logits.dtype))
        return DecoderOutput(logits, iou_pred, hq_logits=hq_logits)

    def upscale(self, logits, input_size, original_size):
        return upscale_logits(logits, input_size, original_size)

    def loss(self, output: DecoderOutput, targets: torch.Tensor, multimask: torch.Tensor, kind: str) -> LossParts:
        if kind == "sam":
            return sam_hq_loss(output.hq_logits, targets)
        # The other losses score the HQ token's mask too, the one output SAM-HQ trains.
        single = torch.zeros_like(multimask)
        return compute_loss(DecoderOutput(output.hq_logits, output.iou_pred[:, :1]), targets, single, kind)


# ----------------------------------------------------------------------------------------- loss
def point_sample(values: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W) at (N, P, 2) points in [0, 1]^2 (x, y) -> (N, P), bilinear (grid_sample)."""
    return F.grid_sample(values, 2.0 * points.unsqueeze(2) - 1.0, align_corners=False).squeeze(3).squeeze(1)


def uncertain_points(logits: torch.Tensor, generator: torch.Generator, *, points: int = HQ_POINTS,
                     oversample: float = 3.0, importance: float = 0.75) -> torch.Tensor:
    """SAM-HQ's (PointRend's) point choice: `oversample` x `points` uniform candidates, the
    `importance` share of `points` with logits nearest 0 kept, the rest uniform again. (N, points, 2)."""
    n = logits.shape[0]
    candidates = torch.rand(n, int(points * oversample), 2, generator=generator, device=logits.device)
    uncertainty = -point_sample(logits, candidates).abs()
    keep = int(importance * points)
    top = uncertainty.topk(keep, dim=1).indices
    chosen = candidates.gather(1, top.unsqueeze(-1).expand(-1, -1, 2))
    rest = torch.rand(n, points - keep, 2, generator=generator, device=logits.device)
    return torch.cat([chosen, rest], dim=1)


def sam_hq_loss(hq_logits: torch.Tensor, targets: torch.Tensor) -> LossParts:
    """SAM-HQ's loss (its train/utils/loss_mask.py): binary cross-entropy + dice on the HQ token's
    mask at HQ_POINTS points chosen as PointRend does, per mask, averaged over the masks; no IoU term
    (SAM-HQ keeps SAM's IoU head frozen). The targets are the (N, 256, 256) low-res ones in [0, 1],
    sampled at the same points (SAM-HQ samples its 1024x1024 labels).

    The points are drawn from a generator seeded by the targets themselves, so a step's points are a
    function of its batch and a resumed run draws the same ones."""
    logits = hq_logits.float()
    target = targets.float().unsqueeze(1)
    seed = int(target.sum().item() * 1024) % (2**31 - 1)
    generator = torch.Generator(device=logits.device).manual_seed(seed)
    with torch.no_grad():
        points = uncertain_points(logits.detach(), generator)
        labels = point_sample(target, points)
    sampled = point_sample(logits, points)
    bce = F.binary_cross_entropy_with_logits(sampled, labels, reduction="none").mean(1)
    p = sampled.sigmoid()
    dice = 1 - (2 * (p * labels).sum(1) + 1) / (p.sum(1) + labels.sum(1) + 1)
    mask_term = (bce + dice).mean()
    real_iou = mask_iou(logits[:, 0].detach(), targets)
    zero = mask_term.new_zeros(())
    return LossParts(mask_term, mask_term.detach(), zero, real_iou.mean().detach())
