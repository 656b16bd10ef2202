"""SAM's ViT attention as one scaled-dot-product attention, for the converted (OpenVINO) encoder.

segment_anything's `Attention` makes the (heads, N, N) scores, adds two relative-position terms
to them (one per key row, one per key column), takes the softmax and multiplies by the values:
four passes over the largest tensor of the encoder (a global block of vit_b: 12 x 4096 x 4096).
A converted graph keeps those passes; on a CPU they cost more than the products (vit_b in bf16
on a 2-core Xeon with AMX: softmax 20% and the adds 17% of an image's time).

Both terms are linear in a one-hot of the key's position: rel_h[q, key row] is rel_h[q] . onehot(key
row). So a query extended by its rel_h and rel_w, against a key extended by the one-hots of its
row and column, scores scale * q.k + rel_h + rel_w: the same scores, with no mask to add.
The attention is then one `scaled_dot_product_attention` call, which OpenVINO compiles into one
fused kernel: vit_b's encoder 1.65 -> 1.13 s per image (BENCHMARKS.md, "Embed on a CPU"), same
embeddings within bf16 rounding. The keys grow by H + W columns (128 for a global block), paid
in the products, which AMX does fast.

Only conversion uses it (`fused_vit_attention`, around `ov.convert_model`): in torch on a CPU the
extended form falls back to SDPA's unfused path (values narrower than keys), slower than the stock
block, and SDPA's CPU backward is slower than the stock block's in training (encoder tails).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn


class FusedRelPosAttention(nn.Module):
    """A ViT `Attention` of segment_anything (or segment_anything_hq) computed as one
    scaled-dot-product attention; it holds the original's modules and parameters (no copies).

    Arguments:
      attention: the stock attention module (its qkv, proj, num_heads, scale and, with
        use_rel_pos, rel_pos_h and rel_pos_w).
    """

    def __init__(self, *, attention: nn.Module):
        super().__init__()
        self.attention = attention

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.attention
        batch, height, width, _ = x.shape
        heads, tokens = a.num_heads, height * width
        qkv = a.qkv(x).reshape(batch, tokens, 3, heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.reshape(3, batch * heads, tokens, -1).unbind(0)
        if a.use_rel_pos:
            q, k = rel_pos_in_queries_and_keys(q, k, a.rel_pos_h, a.rel_pos_w, (height, width), a.scale)
            x = F.scaled_dot_product_attention(q, k, v, scale=1.0)
        else:
            x = F.scaled_dot_product_attention(q, k, v, scale=a.scale)
        x = x.view(batch, heads, height, width, -1).permute(0, 2, 3, 1, 4).reshape(batch, height, width, -1)
        return a.proj(x)


def rel_pos_in_queries_and_keys(q: torch.Tensor, k: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor,
                                size: tuple[int, int], scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries and keys (B, H * W, C) of one square of tokens, extended so that their products are
    SAM's scores with its decomposed relative positions (scale * q.k + rel_h + rel_w):
    queries (B, H * W, C + H + W), keys the same width."""
    from segment_anything.modeling.image_encoder import get_rel_pos

    height, width = size
    rows = q.reshape(q.shape[0], height, width, -1)
    rel_h = torch.einsum("bhwc,hkc->bhwk", rows, get_rel_pos(height, height, rel_pos_h))
    rel_w = torch.einsum("bhwc,wkc->bhwk", rows, get_rel_pos(width, width, rel_pos_w))
    key_row = torch.eye(height, dtype=k.dtype, device=k.device)[:, None, :].expand(height, width, height)
    key_column = torch.eye(width, dtype=k.dtype, device=k.device)[None, :, :].expand(height, width, width)
    positions = torch.cat([key_row, key_column], dim=-1).reshape(1, height * width, height + width)
    queries = torch.cat([q * scale, rel_h.reshape(q.shape[0], height * width, height),
                         rel_w.reshape(q.shape[0], height * width, width)], dim=-1)
    keys = torch.cat([k, positions.expand(k.shape[0], -1, -1)], dim=-1)
    return queries, keys


def is_vit_attention(module: nn.Module) -> bool:
    """segment_anything's (and segment_anything_hq's) ViT `Attention`, by its parts."""
    return type(module).__name__ == "Attention" and all(
        hasattr(module, name) for name in ("qkv", "proj", "num_heads", "scale", "use_rel_pos"))


@contextmanager
def fused_vit_attention(module: nn.Module) -> Iterator[int]:
    """Within the block, every ViT attention inside `module` runs as FusedRelPosAttention; yields
    how many were replaced (0 for encoders without one: MobileSAM's TinyViT, the tiny). The
    stock modules are back afterwards, whatever happened."""
    replaced = [(parent, name, child) for parent in module.modules() for name, child in parent.named_children()
                if is_vit_attention(child)]
    try:
        for parent, name, child in replaced:
            setattr(parent, name, FusedRelPosAttention(attention=child))
        yield len(replaced)
    finally:
        for parent, name, child in replaced:
            setattr(parent, name, child)
