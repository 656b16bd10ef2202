"""The folded two-way transformer (models/two_way_attention.py) against segment_anything's own
TwoWayTransformer: the same outputs and gradients in fp32, close ones under bf16 autocast."""

from __future__ import annotations

import pytest
import torch

from samcache.models.two_way_attention import ImageRows, two_way_transformer
from samcache.models.weights import build_seeded
from tests.helpers import CANCELLED_BY_SOFTMAX


def _perturbed(model_type: str):
    """A seeded model's transformer with every parameter moved off its initial value (biases and layer
    norms that are not zero and one)."""
    sam = build_seeded(model_type, 0)
    torch.manual_seed(3)
    with torch.no_grad():
        for p in sam.mask_decoder.transformer.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return sam


def _run(transformer, folded: bool, image_src, image_pe, tokens, batch_row, per_prompt: bool, weights):
    """Outputs and gradients (parameters, tokens, image side) of one transformer call."""
    transformer.zero_grad(set_to_none=True)
    image_src = image_src.clone().requires_grad_(True)
    tokens = tokens.clone().requires_grad_(True)
    if folded:
        queries, keys = two_way_transformer(transformer, image_src, image_pe, tokens,
                                            None if per_prompt else batch_row)
    else:
        src = image_src if per_prompt else image_src.index_select(0, batch_row)
        queries, keys = transformer(src, image_pe, tokens)
    ((queries * weights[0]).sum() + (keys * weights[1]).sum()).backward()
    grads = {name: p.grad for name, p in transformer.named_parameters()}
    return queries.detach(), keys.detach(), grads, tokens.grad, image_src.grad


@pytest.mark.parametrize("model_type", ["tiny", "micro"])
@pytest.mark.parametrize("image_side", ["per image, grouped", "per image, interleaved", "per prompt"])
def test_folded_transformer_equals_the_stock_one(model_type, image_side):
    """Queries, image tokens and every gradient (parameters, tokens, the image side) equal the stock
    TwoWayTransformer's on the same inputs; with prompts on images in any order (they are regrouped
    and put back), and with the image side per prompt (mask prompts)."""
    sam = _perturbed(model_type)
    transformer = sam.mask_decoder.transformer
    c = sam.prompt_encoder.embed_dim
    n, t = 6, 7
    batch_row = {"per image, grouped": torch.tensor([0, 0, 1, 2, 2, 2]),
                 "per image, interleaved": torch.tensor([2, 0, 1, 0, 2, 1]),
                 "per prompt": torch.arange(n)}[image_side]
    per_prompt = image_side == "per prompt"
    torch.manual_seed(4)
    image_src = torch.randn(n if per_prompt else 3, c, 64, 64)
    image_pe = torch.randn(1, c, 64, 64)
    tokens = torch.randn(n, t, c)
    weights = (torch.randn(n, t, c), torch.randn(n, 64 * 64, c) / 64)
    stock = _run(transformer, False, image_src, image_pe, tokens, batch_row, per_prompt, weights)
    folded = _run(transformer, True, image_src, image_pe, tokens, batch_row, per_prompt, weights)

    torch.testing.assert_close(folded[0], stock[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(folded[1], stock[1], rtol=1e-4, atol=1e-4)
    for name, stock_grad in stock[2].items():
        folded_grad = folded[2][name]
        if name.endswith(CANCELLED_BY_SOFTMAX):
            largest = max(g.abs().max() for g in stock[2].values())
            assert folded_grad is None or folded_grad.abs().max() < 1e-4 * largest
            assert stock_grad.abs().max() < 1e-4 * largest
            continue
        scale = stock_grad.abs().max()
        torch.testing.assert_close(folded_grad, stock_grad, rtol=1e-3, atol=1e-4 * float(scale), msg=name)
    for folded_grad, stock_grad in zip(folded[3:], stock[3:]):  # tokens, image side
        torch.testing.assert_close(folded_grad, stock_grad, rtol=1e-3, atol=1e-4 * float(stock_grad.abs().max()))


def test_folded_transformer_in_bf16_stays_close_to_fp32():
    """Under bf16 autocast (training's precision on CPUs with bf16) the folded transformer's outputs stay
    within bf16's rounding of the stock fp32 ones, and its gradients point the same way."""
    sam = _perturbed("tiny")
    transformer = sam.mask_decoder.transformer
    batch_row = torch.tensor([0, 0, 0, 1, 1])
    torch.manual_seed(5)
    image_src, image_pe, tokens = torch.randn(2, 256, 64, 64), torch.randn(1, 256, 64, 64), torch.randn(5, 7, 256)
    weights = (torch.randn(5, 7, 256), torch.randn(5, 64 * 64, 256) / 64)
    stock = _run(transformer, False, image_src, image_pe, tokens, batch_row, False, weights)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        folded = _run(transformer, True, image_src, image_pe, tokens, batch_row, False, weights)
    assert folded[1].dtype == torch.bfloat16  # the image tokens stay in bf16 from the first block on
    for got, want in zip(folded[:2], stock[:2]):
        assert (got.float() - want).abs().max() < 0.05 * want.abs().max()
    cosines = [torch.nn.functional.cosine_similarity(folded[2][name].flatten().float(), g.flatten(), dim=0)
               for name, g in stock[2].items() if not name.endswith(CANCELLED_BY_SOFTMAX)]
    assert min(cosines) > 0.99


def test_image_rows_are_spans_of_prompts_grouped_by_image():
    rows = ImageRows.of(torch.tensor([0, 0, 2, 2, 2, 3]))
    assert rows.spans == [(0, 0, 2), (2, 2, 5), (3, 5, 6)] and rows.n == 6
    with pytest.raises(ValueError, match="grouped by image"):
        ImageRows.of(torch.tensor([1, 0]))
