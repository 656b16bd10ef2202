"""The mask decoder's last stage: the transformer's image tokens upscaled 4x, each mask token's
hypernetwork output dotted with every upscaled pixel.

SAM's upscaling is two 2x2 transposed convolutions of stride 2, with a LayerNorm2d and an
activation between and an activation after. Such a convolution maps each input pixel to its own
2x2 output pixels, so it is one matrix product on the tokens as they come out of the transformer
(channels last), and the layer norm is one `layer_norm` over their last axis: the stock modules'
arithmetic, without the transposes to channels-first or LayerNorm2d's separate mean, variance
and scaling passes over the upscaled maps. On a CPU, where this stage is bound by memory traffic,
that doubles the speed of a whole bf16 training step (BENCHMARKS.md, "Decoder step levers").
SAM 2.1's decoder adds two high-resolution maps of the image after the convolutions; they are put
in the tokens' order once per image (`high_res_tokens`), then taken per prompt.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from segment_anything.modeling.common import LayerNorm2d

from samcache.models.layer_norm import layer_norm


def mask_logits(upscaling: torch.nn.Sequential, src: torch.Tensor, hyper_in: torch.Tensor, h: int, w: int, *,
                high_res: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
                batch_row: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`output_upscaling` of the image tokens, then each mask token's hypernetwork output dotted with
    every upscaled pixel, as `MaskDecoder.predict_masks` (equal within float rounding: tested).

    Arguments:
      upscaling: the decoder's `output_upscaling`.
      src: (N, h*w, C) the transformer's image tokens; hyper_in: (N, M, C_up).
      high_res: SAM 2.1's high-resolution maps (s0 (B, C_up, 4h, 4w), s1 (B, C1, 2h, 2w)), one per
        image, added after each transposed convolution as sam2's MaskDecoder adds them; prompt n
        takes image `batch_row[n]`'s.
    Returns (N, M, 4h, 4w) logits. A decoder whose upscaling is built otherwise than SAM's runs
    its modules as they are.
    """
    n, hw, c = src.shape
    if not is_sam_upscaling(upscaling):
        return hypernetwork_logits(hyper_in, _stock_upscaling(upscaling, src.transpose(1, 2).reshape(n, c, h, w),
                                                              high_res, batch_row))
    conv1, norm, act1, conv2, act2 = upscaling
    c1, m = conv1.out_channels, hyper_in.shape[1]
    y = F.linear(src, token_weight(conv1), conv1.bias.repeat(4)).view(n, hw * 4, c1)
    s0 = s1 = None
    if high_res is not None:  # in the products' precision per image, then per prompt
        s0, s1 = (tokens.to(y.dtype).index_select(0, batch_row) for tokens in high_res_tokens(*high_res, h, w))
        y = y + s1
    y = act1(layer_norm(y, norm.weight, norm.bias, norm.eps))  # its parameters' gradients summed in fp32
    # The biases go in with the products (no separate pass), in the products' precision under autocast.
    z = F.linear(y, token_weight(conv2), conv2.bias.repeat(4))
    if s0 is not None:
        z = z + s0.view_as(z)
    z = act2(z)
    logits = z.view(n, hw * 16, -1) @ hyper_in.transpose(1, 2)  # (N, pixels, M)
    # Token (i, j), first sub-pixel (a, b), second (a2, b2) -> pixel (4i + 2a + a2, 4j + 2b + b2).
    logits = logits.view(n, h, w, 2, 2, 2, 2, m).permute(0, 7, 1, 3, 5, 2, 4, 6)
    return logits.reshape(n, m, 4 * h, 4 * w)


def high_res_tokens(s0: torch.Tensor, s1: torch.Tensor, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """SAM 2.1's high-resolution maps in the order of `mask_logits`' rows: s1 (B, C1, 2h, 2w) ->
    (B, 4hw, C1), rows (token i, j; sub-pixel a, b); s0 (B, C0, 4h, 4w) -> (B, 16hw, C0), rows
    (i, j, a, b; second sub-pixel a2, b2)."""
    b = s0.shape[0]
    s1 = s1.view(b, -1, h, 2, w, 2).permute(0, 2, 4, 3, 5, 1).reshape(b, h * w * 4, -1)
    s0 = s0.view(b, -1, h, 2, 2, w, 2, 2).permute(0, 2, 5, 3, 6, 4, 7, 1).reshape(b, h * w * 16, -1)
    return s0, s1


def _stock_upscaling(upscaling: torch.nn.Sequential, src: torch.Tensor,
                     high_res: Optional[tuple[torch.Tensor, torch.Tensor]],
                     batch_row: Optional[torch.Tensor]) -> torch.Tensor:
    """The upscaling's own modules, with SAM 2.1's high-resolution maps added as its MaskDecoder adds them."""
    if high_res is None:
        return upscaling(src)
    conv1, norm, act1, conv2, act2 = upscaling
    s0, s1 = (m.index_select(0, batch_row) for m in high_res)
    return act2(conv2(act1(norm(conv1(src) + s1))) + s0)


def token_weight(conv: torch.nn.ConvTranspose2d) -> torch.Tensor:
    """A 2x2 stride-2 ConvTranspose2d's weight (C_in, C_out, 2, 2) as a linear layer's (4 * C_out,
    C_in), its outputs ordered (sub-row, sub-column, channel), so the channels stay last."""
    return conv.weight.permute(2, 3, 1, 0).reshape(4 * conv.out_channels, conv.in_channels)


def hypernetwork_logits(hyper_in: torch.Tensor, upscaled: torch.Tensor) -> torch.Tensor:
    """Each mask token's hypernetwork output (N, M, C_up) dotted with every pixel of the upscaled
    map (N, C_up, H, W): (N, M, H, W) logits, as `MaskDecoder.predict_masks` makes them."""
    n, c_up, h_up, w_up = upscaled.shape
    return (hyper_in @ upscaled.reshape(n, c_up, h_up * w_up)).reshape(n, -1, h_up, w_up)


def is_sam_upscaling(upscaling: torch.nn.Module) -> bool:
    """Whether `upscaling` is SAM's: two 2x2 stride-2 transposed convolutions around a LayerNorm2d,
    an elementwise activation after each."""
    if not isinstance(upscaling, torch.nn.Sequential) or len(upscaling) != 5:
        return False
    conv1, norm, _, conv2, _ = upscaling
    return (all(isinstance(conv, torch.nn.ConvTranspose2d) and conv.kernel_size == (2, 2) and conv.stride == (2, 2)
                and conv.padding == (0, 0) and conv.output_padding == (0, 0) and conv.groups == 1
                and conv.dilation == (1, 1) and conv.bias is not None for conv in (conv1, conv2))
            and _is_layer_norm_2d(norm) and norm.weight.shape[0] == conv1.out_channels)


def _is_layer_norm_2d(module: torch.nn.Module) -> bool:
    """segment_anything's LayerNorm2d, or sam2's (its own class, the same arithmetic)."""
    return isinstance(module, LayerNorm2d) or (
        type(module).__name__ == "LayerNorm2d" and all(hasattr(module, a) for a in ("weight", "bias", "eps")))
