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

Conversion uses it (`fused_vit_attention`, around `ov.convert_model`). In torch on a CPU that one
call falls back to SDPA's unfused path (values narrower than keys), slower than the stock block, and
SDPA's CPU flash backward is slower than the stock block's too.

Encoder tails on a CPU (trained, and run in eval and predict) take the same extended queries and
keys to `AttentionInChunks` instead (`vit_attention_in_chunks`): the scores are made a chunk of queries at
a time by one product (no adds), the probabilities kept in the compute dtype (bf16 under autocast:
one 12 x 4096 x 4096 tensor per image where the stock block keeps fp32 probabilities and a bf16
copy), and the backward runs from them in chunks with the softmax's subtraction folded into a
product (the gradient of the scores is P * (dO V^T - rowsum(dO * O)); the row sums ride as an
extra column of dO against a column of ones in V). The relative positions' gradients come out of
the queries' gradient, as their scores came out of the product.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn


class ExtendedRelPosAttention(nn.Module):
    """A ViT `Attention` of segment_anything (or segment_anything_hq) computed from its extended
    queries and keys (scale and relative positions inside them: `rel_pos_in_queries_and_keys`); it
    holds the original's modules and parameters (no copies). Its forms differ in `attend`.

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
        channels = q.shape[-1]
        if a.use_rel_pos:
            q, k = rel_pos_in_queries_and_keys(q, k, a.rel_pos_h, a.rel_pos_w, (height, width), a.scale)
        else:
            q = q * a.scale
        x = self.attend(q, k, v, channels)
        x = x.view(batch, heads, height, width, -1).permute(0, 2, 3, 1, 4).reshape(batch, height, width, -1)
        return a.proj(x)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, channels: int) -> torch.Tensor:
        """softmax(q k^T) v of (B, N, D) extended queries and keys whose first `channels` are q's and k's own."""
        raise NotImplementedError


class FusedRelPosAttention(ExtendedRelPosAttention):
    """The attention as one scaled-dot-product attention call (for the converted encoder)."""

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, channels: int) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, scale=1.0)


CHUNK_ELEMENTS = 1 << 23
"""Scores one product makes at a time in AttentionInChunks (queries x keys): 2048 queries of a
global block of vit_b. vit_b's last block trained in bf16 on a 2-core Xeon with AMX: 0.90, 0.87
and 0.86 s a step with 4, 8 and 16 Mi (medians of 3; the rounds' spread about 5%)."""


class ChunkedRelPosAttention(ExtendedRelPosAttention):
    """The attention through AttentionInChunks (encoder tails on a CPU).

    Arguments:
      attention: the stock attention module.
      chunk_elements: scores made at a time (see CHUNK_ELEMENTS).
    """

    def __init__(self, *, attention: nn.Module, chunk_elements: int = CHUNK_ELEMENTS):
        super().__init__(attention=attention)
        self.chunk_elements = chunk_elements

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, channels: int) -> torch.Tensor:
        return AttentionInChunks.apply(q, k, v, channels, self.chunk_elements)


class AttentionInChunks(torch.autograd.Function):
    """softmax(q k^T) v for (B, N, D) queries and keys and (B, N, C) values, scale already in q.

    The forward makes the scores a chunk of queries at a time, keeps the probabilities (B, N, N) in
    q's dtype and nothing else that large; the backward runs in the same chunks (module docstring).
    Keys' gradients are computed for their first `key_grad_columns` columns only (the rest are the
    relative positions' one-hots, constants): zeros there. Autocast is off inside: the inputs'
    dtype is the compute dtype.
    """

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_grad_columns: int,  # type: ignore[override]
                chunk_elements: int) -> torch.Tensor:
        with torch.autocast(q.device.type, enabled=False):
            k, v = k.to(q.dtype), v.to(q.dtype)
            probabilities = q.new_empty(q.shape[0], q.shape[1], k.shape[1])
            out = q.new_empty(q.shape[0], q.shape[1], v.shape[2])
            keys_t = k.transpose(1, 2)
            for group, rows in _chunks(q.shape[0], q.shape[1], k.shape[1], chunk_elements):
                for r in rows:
                    p = probabilities[group, r]
                    torch.ops.aten._softmax.out(torch.bmm(q[group, r], keys_t[group]), -1, False, out=p)
                    torch.bmm(p, v[group], out=out[group, r])
        ctx.save_for_backward(q, k, v, out, probabilities)
        ctx.key_grad_columns, ctx.chunk_elements = key_grad_columns, chunk_elements
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        q, k, v, out, probabilities = ctx.saved_tensors
        dtype, columns = q.dtype, ctx.key_grad_columns
        with torch.autocast(q.device.type, enabled=False):
            grad_out = grad_out.to(dtype).contiguous()
            # rowsum(dO * O) in fp32, carried as two parts of `dtype` (high and low): in bf16 one part
            # would round it as coarsely as the difference it is subtracted from.
            row_sums = (grad_out.float() * out.float()).sum(-1, keepdim=True)
            high = row_sums.to(dtype)
            low = (row_sums - high.float()).to(dtype)
            grad_out_ext = torch.cat([grad_out, -high, -low], dim=-1)
            values_ext_t = torch.cat([v, v.new_ones(*v.shape[:2], 2)], dim=-1).transpose(1, 2)
            grad_q, grad_k, grad_v = torch.empty_like(q), torch.zeros_like(k), torch.empty_like(v)
            for group, rows in _chunks(q.shape[0], q.shape[1], k.shape[1], ctx.chunk_elements):
                grad_scores = q.new_empty(group.stop - group.start, q.shape[1], k.shape[1])
                for r in rows:
                    g = grad_scores[:, r]
                    torch.bmm(grad_out_ext[group, r], values_ext_t[group], out=g)
                    g.mul_(probabilities[group, r])
                    torch.bmm(g, k[group], out=grad_q[group, r])
                # dK = dS^T Q and dV = P^T dO made as (Q^T dS)^T and (dO^T P)^T: the large operand read in
                # its own row order (1.5x faster for a 4096 x 4096 one in bf16 with oneDNN)
                grad_k[group, :, :columns] = torch.bmm(q[group, :, :columns].transpose(1, 2).contiguous(),
                                                       grad_scores).transpose(1, 2)
                grad_v[group] = torch.bmm(grad_out[group].transpose(1, 2).contiguous(),
                                          probabilities[group]).transpose(1, 2)
        return grad_q, grad_k, grad_v, None, None


def _chunks(batch: int, queries: int, keys: int, chunk_elements: int) -> list[tuple[slice, list[slice]]]:
    """Groups of the batch, each with its chunks of queries: one slice at a time with chunks of rows
    when a slice's scores exceed `chunk_elements` (a global block), else as many whole slices as fit
    (windowed blocks: 14 x 14 tokens each)."""
    if queries * keys >= chunk_elements:
        step = max(1, chunk_elements // keys)
        rows = [slice(r, min(queries, r + step)) for r in range(0, queries, step)]
        return [(slice(b, b + 1), rows) for b in range(batch)]
    step = max(1, chunk_elements // (queries * keys))
    return [(slice(b, min(batch, b + step)), [slice(0, queries)]) for b in range(0, batch, step)]


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
    with _vit_attention_as(module, lambda attention: FusedRelPosAttention(attention=attention)) as replaced:
        yield replaced


@contextmanager
def vit_attention_in_chunks(module: nn.Module, *, chunk_elements: int = CHUNK_ELEMENTS) -> Iterator[int]:
    """Within the block, every ViT attention inside `module` runs as ChunkedRelPosAttention; yields
    how many were replaced; the stock modules are back afterwards."""
    with _vit_attention_as(module, lambda a: ChunkedRelPosAttention(attention=a, chunk_elements=chunk_elements)) as n:
        yield n


@contextmanager
def _vit_attention_as(module: nn.Module, form: Callable[[nn.Module], nn.Module]) -> Iterator[int]:
    replaced = [(parent, name, child) for parent in module.modules() for name, child in parent.named_children()
                if is_vit_attention(child)]
    try:
        for parent, name, child in replaced:
            setattr(parent, name, form(child))
        yield len(replaced)
    finally:
        for parent, name, child in replaced:
            setattr(parent, name, child)
