"""SAM's two-way transformer for N prompts over B images, its cross-attentions folded into the
prompt tokens.

`TwoWayTransformer` alternates, for each prompt, attention of its few tokens (the output tokens
and the prompt's sparse embeddings: T = 7 for a box) to the 64 x 64 image tokens and attention of
the image tokens back to those T tokens. The stock `Attention` projects every image token to
queries, keys or values (4096 x 128 per prompt each), splits and regroups them into heads and
projects the result back: per prompt and block, four image-sized matrix products and as many
copies, where the work that depends on the prompt is a product with its T tokens alone.

Both directions are linear in the image tokens up to the softmax, so the projections fold into
the token side, per head h of dimension d:

  tokens -> image:  q_h(t) . k_h(x) = x . (Wk_h^T q_h(t)) + q_h(t) . bk_h, where the second
                    term is the same at every image position and leaves the softmax as it is; and
                    sum_x P(t, x) v_h(x) = Wv_h (sum_x P(t, x) x) + bv_h, as P sums to 1.
  image -> tokens:  q_h(x) . k_h(t) = x . (Wq_h^T k_h(t)) + bq_h . k_h(t), and the output
                    projection of the attended values is sum_(h, t) P(x, h, t) Wo_h v_h(t) + bo,
                    with bo / H added to each of those rows (P sums to 1 over t for each head).

So each direction is two products of the image tokens with a (H * T) x C matrix per prompt (56
columns for a box instead of 128 projected channels, no head transposes), and the positional
encoding enters as its own product rather than as a sum with every prompt's image tokens. The
arithmetic is the stock modules' up to float rounding, with the same parameters (tested against
`TwoWayTransformer.forward`, outputs and gradients).

The first block's image side is the cached embedding plus the dense prompt embedding. Without
mask prompts that is the same for all the prompts of an image, so its products are made once
per image, the prompts of the image side by side (`ImageRows`). From then on the image tokens are
per prompt, and each attention over them is one autograd function (`AttendImage`,
`AttendTokens`) whose backward makes their gradient in one product, where autograd would make one
per use and add them: they are the largest tensor a decoder step reads and writes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from samcache.models.layer_norm import layer_norm


@dataclass
class ImageRows:
    """Which image each of N prompts attends to in the first block, prompts sorted by image.

    Arguments:
      spans: (image row, first prompt, end) for each image with prompts, in the prompts' order.
      n: the number of prompts.
    """

    spans: list[tuple[int, int, int]]
    n: int

    @classmethod
    def of(cls, batch_row: torch.Tensor) -> "ImageRows":
        """The spans of `batch_row` (N,), which must be sorted (prompts grouped by image)."""
        rows = batch_row.tolist()
        if any(a > b for a, b in zip(rows, rows[1:])):
            raise ValueError("the prompts must be grouped by image (batch_row sorted)")
        spans, start = [], 0
        for i in range(1, len(rows) + 1):
            if i == len(rows) or rows[i] != rows[start]:
                spans.append((rows[start], start, i))
                start = i
        return cls(spans, len(rows))


def two_way_transformer(transformer, image_src: torch.Tensor, image_pe: torch.Tensor, tokens: torch.Tensor,
                        batch_row: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`TwoWayTransformer.forward` with its cross-attentions folded (module docstring).

    Arguments:
      transformer: the mask decoder's TwoWayTransformer.
      image_src: (B, C, H, W) the image side of the first block: one per image, prompt n on image
        `batch_row[n]`; or, with `batch_row` None, one per prompt (B = N).
      image_pe: (1, C, H, W) the positional encoding of the image tokens.
      tokens: (N, T, C) each prompt's output tokens and sparse prompt embeddings.
      batch_row: (N,) the image of each prompt, sorted; None: the image side is per prompt.
    Returns the queries (N, T, C) and the image tokens (N, HW, C), as the stock module.
    """
    order = None
    if batch_row is not None and bool((batch_row[1:] < batch_row[:-1]).any()):
        order = torch.argsort(batch_row, stable=True)
        batch_row, tokens = batch_row[order], tokens[order]
    rows = None if batch_row is None else ImageRows.of(batch_row)
    device = image_src.device.type
    # Under autocast the image tokens and their positional encoding go in its precision once here,
    # so the per-prompt image tokens and their gradients stay in it (each product would cast them
    # again otherwise).
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else image_src.dtype
    keys = image_src.flatten(2).transpose(1, 2).to(dtype)  # (B, HW, C)
    key_pe = image_pe.flatten(2).transpose(1, 2).to(dtype)  # (1, HW, C)
    queries, query_pe = tokens, tokens
    for i, layer in enumerate(transformer.layers):
        queries, keys = _two_way_block(layer, queries, keys, query_pe, key_pe, rows if i == 0 else None)
    if not transformer.layers:
        keys = _per_prompt(keys, rows)
    attended = _tokens_to_image(transformer.final_attn_token_to_image, queries + query_pe, keys, key_pe, None)
    queries = transformer.norm_final_attn(queries + attended)
    if order is not None:
        inverse = torch.argsort(order)
        queries, keys = queries[inverse], keys[inverse]
    return queries, keys


def _two_way_block(block, queries: torch.Tensor, keys: torch.Tensor, query_pe: torch.Tensor, key_pe: torch.Tensor,
                   rows: Optional[ImageRows]) -> tuple[torch.Tensor, torch.Tensor]:
    """`TwoWayAttentionBlock.forward`; `keys` per image along `rows`, or per prompt (rows None)."""
    if block.skip_first_layer_pe:
        queries = block.norm1(block.self_attn(q=queries, k=queries, v=queries))
    else:
        q = queries + query_pe
        queries = block.norm1(queries + block.self_attn(q=q, k=q, v=queries))
    attended = _tokens_to_image(block.cross_attn_token_to_image, queries + query_pe, keys, key_pe, rows)
    queries = block.norm2(queries + attended)
    queries = block.norm3(queries + block.mlp(queries))
    keys = _image_to_tokens(block.cross_attn_image_to_token, keys, key_pe, queries + query_pe, queries, rows)
    # The image tokens are in bf16 under autocast: norm4's parameter gradients are summed in fp32.
    return queries, layer_norm(keys, block.norm4.weight, block.norm4.bias, block.norm4.eps)


def _tokens_to_image(attention, q: torch.Tensor, keys: torch.Tensor, key_pe: torch.Tensor,
                     rows: Optional[ImageRows]) -> torch.Tensor:
    """`Attention(q=q, k=keys + key_pe, v=keys)` for tokens q (N, T, C): (N, T, C)."""
    n, t, _ = q.shape
    heads = attention.num_heads
    wk = _heads(attention.k_proj.weight, heads)  # (H, d, C)
    q_heads = attention.q_proj(q).view(n, t, heads, -1)
    scale = 1 / math.sqrt(q_heads.shape[-1])
    # Each token's query moved through the key projection: (N, H*T, C).
    a = torch.einsum("nthd,hdc->nhtc", q_heads * scale, wk.to(q_heads.dtype)).reshape(n, heads * t, -1)
    pe_scores = a @ key_pe[0].T  # (N, H*T, HW)
    if rows is None:
        attended = AttendImage.apply(a, keys, pe_scores)
    else:
        scores = _by_prompt(a, keys.transpose(1, 2), rows) + pe_scores
        attended = _by_prompt(torch.softmax(scores, dim=-1), keys, rows)  # (N, H*T, C): the attended image tokens
    wv = _heads(attention.v_proj.weight, heads)
    values = torch.einsum("nhtc,hdc->nthd", attended.view(n, heads, t, -1), wv.to(attended.dtype))
    return attention.out_proj(values.reshape(n, t, -1) + attention.v_proj.bias.to(values.dtype))


def _image_to_tokens(attention, keys: torch.Tensor, key_pe: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     rows: Optional[ImageRows]) -> torch.Tensor:
    """`keys + Attention(q=keys + key_pe, k=k, v=v)` for the image tokens (the block's residual
    included): (N, HW, C)."""
    n, t, _ = k.shape
    heads = attention.num_heads
    k_heads = attention.k_proj(k).view(n, t, heads, -1)
    v_heads = attention.v_proj(v).view(n, t, heads, -1)
    scaled = k_heads / math.sqrt(k_heads.shape[-1])
    wq = _heads(attention.q_proj.weight, heads).to(k_heads.dtype)  # (H, d, C)
    a = torch.einsum("nthd,hdc->nhtc", scaled, wq).reshape(n, heads * t, -1)  # (N, H*T, C)
    bias = torch.einsum("nthd,hd->nht", scaled, attention.q_proj.bias.view(heads, -1).to(k_heads.dtype))
    pe_scores = a @ key_pe[0].T + bias.reshape(n, -1, 1)  # (N, H*T, HW)
    wo = attention.out_proj.weight.view(-1, heads, v_heads.shape[-1]).to(v_heads.dtype)  # (C, H, d)
    # The attended values through the output projection, its bias spread over the H heads' weights.
    b = torch.einsum("nthd,chd->nhtc", v_heads, wo).reshape(n, heads * t, -1)
    b = b + attention.out_proj.bias.to(b.dtype) / heads
    if rows is None:
        return AttendTokens.apply(keys, a, pe_scores, b, heads)
    scores = _by_prompt(a, keys.transpose(1, 2), rows) + pe_scores
    weights = torch.softmax(scores.view(n, heads, t, -1), dim=2).view(n, heads * t, -1)  # (N, H*T, HW)
    return torch.baddbmm(_per_prompt(keys, rows), weights.transpose(1, 2), b)


class AttendImage(torch.autograd.Function):
    """The tokens' attention over their prompt's image tokens, folded: softmax(a keys^T + pe_scores) keys.

    Arguments (forward):
      a: (N, H*T, C) each head's token queries moved through the key projection; keys: (N, HW, C)
        the image tokens; pe_scores: (N, H*T, HW) the positional encoding's part of the scores.
    Returns (N, H*T, C). One product makes the image tokens' gradient, where autograd would make
    one per use and add them: the image tokens are the step's largest tensor read in the backward.
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu")
    def forward(ctx, a, keys, pe_scores):
        a, pe_scores = a.to(keys.dtype), pe_scores.to(keys.dtype)
        weights = torch.softmax(torch.baddbmm(pe_scores, a, keys.transpose(1, 2)), dim=-1)
        ctx.save_for_backward(a, keys, weights)
        return weights @ keys

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")
    def backward(ctx, grad):
        a, keys, weights = ctx.saved_tensors
        grad = grad.to(keys.dtype)
        grad_scores = torch._softmax_backward_data(grad @ keys.transpose(1, 2), weights, -1, weights.dtype)
        grad_keys = torch.cat([grad_scores, weights], dim=1).transpose(1, 2) @ torch.cat([a, grad], dim=1)
        return grad_scores @ keys, grad_keys, grad_scores


class AttendTokens(torch.autograd.Function):
    """The image tokens' attention over their prompt's tokens, folded, with the block's residual:
    keys + softmax_t(a keys^T + pe_scores)^T b, the softmax over each head's T tokens.

    Arguments (forward):
      keys: (N, HW, C) the image tokens; a: (N, H*T, C) each head's token keys moved through the
        query projection; pe_scores: (N, H*T, HW) the positional encoding's and the query bias's part
        of the scores; b: (N, H*T, C) each head's token values through the output projection;
        heads: H.
    Returns (N, HW, C). The image tokens' gradient is the residual's plus one product, in one pass.
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu")
    def forward(ctx, keys, a, pe_scores, b, heads):
        n = keys.shape[0]
        a, pe_scores, b = a.to(keys.dtype), pe_scores.to(keys.dtype), b.to(keys.dtype)
        scores = torch.baddbmm(pe_scores, a, keys.transpose(1, 2))
        weights = torch.softmax(scores.view(n, heads, -1, scores.shape[-1]), dim=2).view_as(scores)
        ctx.save_for_backward(keys, a, b, weights)
        ctx.heads = heads
        return torch.baddbmm(keys, weights.transpose(1, 2), b)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")
    def backward(ctx, grad):
        keys, a, b, weights = ctx.saved_tensors
        n, heads = keys.shape[0], ctx.heads
        grad = grad.to(keys.dtype)
        grad_weights = (b @ grad.transpose(1, 2)).view(n, heads, -1, keys.shape[1])
        grad_scores = torch._softmax_backward_data(grad_weights, weights.view_as(grad_weights), 2,
                                                   weights.dtype).view_as(weights)
        grad_keys = torch.baddbmm(grad, grad_scores.transpose(1, 2), a)
        return grad_keys, grad_scores @ keys, grad_scores, weights @ grad, None


def _heads(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """A projection's weight (H*d, C) as (H, d, C)."""
    return weight.view(heads, -1, weight.shape[-1])


def _by_prompt(left: torch.Tensor, right: torch.Tensor, rows: Optional[ImageRows]) -> torch.Tensor:
    """left (N, a, k) @ right: (N, k, b) per prompt (rows None), or (B, k, b) per image along
    `rows`, the image's prompts side by side in one product."""
    if rows is None:
        return left @ right
    return torch.cat([(left[s:e].reshape(-1, left.shape[-1]) @ right[b]).view(e - s, left.shape[1], -1)
                      for b, s, e in rows.spans])


def _per_prompt(per_image: torch.Tensor, rows: Optional[ImageRows]) -> torch.Tensor:
    """(B, ...) per image along `rows` -> (N, ...) per prompt; per prompt already: itself."""
    if rows is None:
        return per_image
    return torch.cat([per_image[b : b + 1].expand(e - s, *per_image.shape[1:]) for b, s, e in rows.spans])
