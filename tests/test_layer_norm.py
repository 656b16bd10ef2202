"""The decoder's layer norms on bf16 tensors (models/layer_norm.py): torch's output and input gradient,
parameter gradients summed in fp32; and so, under bf16 autocast, every decoder parameter's gradient
close to fp32's."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from samcache.models.decoder import compute_loss
from samcache.models.families import family_of
from samcache.models.layer_norm import layer_norm
from samcache.models.prompts import PromptBatch
from samcache.models.weights import build_tiny
from tests.helpers import CANCELLED_BY_SOFTMAX, relative_error


@pytest.mark.parametrize("channels, rows", [(64, 40_000), (256, 9_000)])
def test_a_bf16_input_gets_torchs_output_and_input_gradient_and_fp32_parameter_sums(channels, rows):
    torch.manual_seed(0)
    weight, bias = torch.randn(channels, requires_grad=True), torch.randn(channels, requires_grad=True)
    x = torch.randn(rows, channels) * 2 + 0.5
    grad = torch.randn(rows, channels) / 64 + 0.01  # a mean, as a loss's gradient has: sums that grow with rows

    def run(fn, dtype):
        weight.grad = bias.grad = None
        inp = x.to(dtype).detach().requires_grad_()
        out = fn(inp, weight, bias, 1e-6)
        out.backward(grad.to(out.dtype))
        return out.detach(), inp.grad, weight.grad.clone(), bias.grad.clone()

    def torchs(t, w, b, eps):
        return F.layer_norm(t, (channels,), w, b, eps)

    reference = run(torchs, torch.float32)
    stock_bf16, ours = run(torchs, torch.bfloat16), run(layer_norm, torch.bfloat16)
    assert ours[0].dtype == torch.bfloat16
    torch.testing.assert_close(ours[0], stock_bf16[0], rtol=0, atol=0)  # the same forward kernel
    assert ours[1] is not None and ours[1].dtype == torch.bfloat16
    torch.testing.assert_close(ours[1], stock_bf16[1], rtol=0, atol=0)  # and input gradient
    assert ours[2].dtype == weight.dtype and ours[3].dtype == bias.dtype
    assert relative_error(ours[2], reference[2]) < 0.01  # weight: within bf16's rounding of the input
    assert relative_error(ours[3], reference[3]) < 1e-4  # bias: the gradient's sum, exact in fp32


def test_an_fp32_input_is_torchs_layer_norm():
    torch.manual_seed(1)
    x = torch.randn(5, 7, 32, requires_grad=True)
    weight, bias = torch.randn(32, requires_grad=True), torch.randn(32, requires_grad=True)
    ours = layer_norm(x, weight, bias, 1e-6)
    ours.sum().backward()
    got = (x.grad.clone(), weight.grad.clone(), bias.grad.clone())
    x.grad = weight.grad = bias.grad = None
    stock = F.layer_norm(x, (32,), weight, bias, 1e-6)
    stock.sum().backward()
    torch.testing.assert_close(ours, stock, rtol=0, atol=0)
    for a, b in zip(got, (x.grad, weight.grad, bias.grad)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_every_decoder_parameter_gradient_under_bf16_autocast_is_close_to_fp32():
    """A training step's decoder (the folded transformer, the upscaling on tokens) in fp32 and under bf16
    autocast: each parameter's gradient within 10% of fp32's (the layer norms' were 0.87-0.94 off with
    torch's bf16 kernel: the transformer's norm4 and the upscaling's norm)."""
    sam = build_tiny(0)
    torch.manual_seed(3)
    embeddings, targets = torch.randn(2, 256, 64, 64), (torch.rand(6, 256, 256) > 0.6).float()
    corner = torch.rand(6, 2) * 500
    prompts = dict(batch_row=torch.tensor([0, 0, 0, 1, 1, 1]), boxes=torch.cat([corner, corner + 300], 1),
                   points=torch.rand(6, 1, 2) * 1000, labels=torch.full((6, 1), -1),
                   is_box=torch.ones(6, dtype=torch.bool))
    module = family_of("tiny").decoder(sam, "tiny")
    grads = {}
    for bf16 in (False, True):
        sam.zero_grad(set_to_none=True)
        batch = PromptBatch(**prompts)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            output = module(embeddings, batch, outputs="used")
            loss = compute_loss(output, targets, batch.multimask, "sam").total
        loss.backward()
        grads[bf16] = {n: p.grad for n, p in sam.mask_decoder.named_parameters() if p.grad is not None}
    assert grads[True].keys() == grads[False].keys()
    checked = {n: relative_error(grads[True][n], g) for n, g in grads[False].items()
               if not n.endswith(CANCELLED_BY_SOFTMAX)}
    assert {"transformer.layers.0.norm4.bias", "output_upscaling.1.weight"} <= checked.keys()
    worst = max(checked, key=checked.get)
    assert checked[worst] < 0.1, (worst, checked[worst])
