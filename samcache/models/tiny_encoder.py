"""The tiny model's image encoder: a small convolutional network with SAM's input and output.

It takes what SAM's ViT takes (the normalised, padded 1x3x1024x1024 image) and returns what it
returns (a 256x64x64 embedding, stride 16), so SAM's prompt encoder and mask decoder, the cache,
SamPredictor and every exporter work unchanged. Why convolutions and not a small ViT: the
encoder is pretrained from random weights on a 2-core CPU in about two hours; convolutions'
locality is a prior a ViT has to learn from data, and the windowed ViT of the first tiny
learnt almost nothing end to end in that budget (its provenance: held-out box mIoU 0.44,
against 0.66 for filling the box). Where the work goes:

- A 4x4 patchify then a 2x2 one: the image is at stride 8 after two cheap linear layers, so no
  full-resolution activation is ever kept for the backward pass.
- ConvNeXt blocks (depthwise kxk, LayerNorm, pointwise MLP, a residual scaled by a learnt
  per-channel factor) at stride 8 and 16. Depthwise convolutions cost little, so the large
  kernel and dilations give a receptive field of several hundred pixels: enough to see a whole
  object, which the mask decoder needs to tell its outline from clutter.
- The neck maps to SAM's 256 channels and ends in LayerNorm2d, as SAM's own neck does, so the
  embedding's scale is the one the decoder expects.
"""

from __future__ import annotations

import torch
from segment_anything.modeling.common import LayerNorm2d
from torch import nn


class ConvNeXtBlock(nn.Module):
    """x + gamma * MLP(LayerNorm(depthwise_conv(x))), channels first."""

    def __init__(self, *, channels: int, kernel_size: int = 7, dilation: int = 1, mlp_ratio: float = 2.0,
                 layer_scale: float = 0.1) -> None:
        """
        Arguments:
          channels: input and output channels.
          kernel_size, dilation: the depthwise convolution's (padding keeps the size).
          mlp_ratio: the pointwise MLP's hidden width / channels.
          layer_scale: the residual branch's initial per-channel factor.
        """
        super().__init__()
        self.dwconv = nn.Conv2d(channels, channels, kernel_size, padding=dilation * (kernel_size - 1) // 2,
                                dilation=dilation, groups=channels)
        self.norm = LayerNorm2d(channels)
        hidden = int(channels * mlp_ratio)
        self.pwconv1 = nn.Conv2d(channels, hidden, 1)
        self.act = nn.GELU()
        self.pwconv2 = nn.Conv2d(hidden, channels, 1)
        self.gamma = nn.Parameter(torch.full((channels, 1, 1), layer_scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.gamma * self.pwconv2(self.act(self.pwconv1(self.norm(self.dwconv(x)))))


class ConvImageEncoder(nn.Module):
    """(B, 3, img_size, img_size) normalised image -> (B, out_chans, img_size / 16, img_size / 16)."""

    def __init__(self, *, img_size: int = 1024, stem_chans: int = 48, widths: tuple[int, int] = (96, 192),
                 depths: tuple[int, int] = (2, 6), dilations: tuple[int, ...] = (1, 2, 3, 1, 2, 3),
                 kernel_size: int = 7, mlp_ratio: float = 2.0, out_chans: int = 256) -> None:
        """
        Arguments:
          img_size: the input's side (SamPredictor reads it as `image_encoder.img_size`).
          stem_chans: channels after the 4x4 patchify (stride 4).
          widths: channels of the stride-8 and stride-16 stages.
          depths: ConvNeXt blocks per stage.
          dilations: the stride-16 blocks' dilations, in order (len >= depths[1]).
          kernel_size, mlp_ratio: of every block.
          out_chans: the embedding's channels (SAM: 256).
        """
        super().__init__()
        if len(dilations) < depths[1]:
            raise ValueError(f"need a dilation for each of the {depths[1]} stride-16 blocks, got {dilations}")
        self.img_size = img_size
        self.stem = nn.Sequential(nn.Conv2d(3, stem_chans, 4, stride=4), LayerNorm2d(stem_chans))
        self.down1 = nn.Sequential(nn.GELU(), nn.Conv2d(stem_chans, widths[0], 2, stride=2))
        self.stage1 = nn.Sequential(*(ConvNeXtBlock(channels=widths[0], kernel_size=kernel_size, mlp_ratio=mlp_ratio)
                                      for _ in range(depths[0])))
        self.down2 = nn.Sequential(LayerNorm2d(widths[0]), nn.Conv2d(widths[0], widths[1], 2, stride=2))
        self.stage2 = nn.Sequential(*(ConvNeXtBlock(channels=widths[1], kernel_size=kernel_size, dilation=d,
                                                    mlp_ratio=mlp_ratio) for d in dilations[:depths[1]]))
        self.neck = nn.Sequential(
            nn.Conv2d(widths[1], out_chans, 1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, 3, padding=1, groups=out_chans, bias=False),
            LayerNorm2d(out_chans),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage1(self.down1(self.stem(x)))
        return self.neck(self.stage2(self.down2(x)))
