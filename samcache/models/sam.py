"""Segment Anything's architecture from segment_anything's own modules: the ViT image encoders
of vit_b/l/h, and the prompt encoder and mask decoder every SAM-shaped model shares (the tiny too)."""

from __future__ import annotations

from functools import partial

import torch
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

from samcache.models.specs import (
    EMBEDDING_SIZE,
    IMAGE_SIZE,
    PATCH_SIZE,
    PIXEL_MEAN,
    PIXEL_STD,
    PROMPT_EMBED_DIM,
    EncoderSpec,
)


def sam_with_encoder(image_encoder: torch.nn.Module, *, embed_dim: int = PROMPT_EMBED_DIM, mlp_dim: int = 2048,
                     num_heads: int = 8, mask_in_chans: int = 16) -> Sam:
    """SAM with `image_encoder` (embed_dim x 64 x 64 out) and SAM's own prompt encoder and mask decoder
    (eval, CPU). The defaults are SAM's widths; the micro model passes smaller ones."""
    sam = Sam(
        image_encoder=image_encoder,
        prompt_encoder=PromptEncoder(
            embed_dim=embed_dim,
            image_embedding_size=(EMBEDDING_SIZE, EMBEDDING_SIZE),
            input_image_size=(IMAGE_SIZE, IMAGE_SIZE),
            mask_in_chans=mask_in_chans,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=embed_dim, mlp_dim=mlp_dim, num_heads=num_heads),
            transformer_dim=embed_dim,
            iou_head_depth=3,
            iou_head_hidden_dim=embed_dim,
        ),
        pixel_mean=list(PIXEL_MEAN),
        pixel_std=list(PIXEL_STD),
    )
    return sam.eval()


def sam_with_vit(spec: EncoderSpec) -> Sam:
    """An untrained SAM with the ViT of `spec`, as segment_anything's `build_sam_vit_*` make it."""
    return sam_with_encoder(ImageEncoderViT(
        depth=spec.depth,
        embed_dim=spec.embed_dim,
        img_size=IMAGE_SIZE,
        mlp_ratio=4,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        num_heads=spec.num_heads,
        patch_size=PATCH_SIZE,
        qkv_bias=True,
        use_rel_pos=True,
        global_attn_indexes=spec.global_attn_indexes,
        window_size=14,
        out_chans=PROMPT_EMBED_DIM,
    ))
