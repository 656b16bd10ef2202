"""A layer norm over the last axis whose parameter gradients are sums in fp32 when its input is bf16.

The decoder keeps its largest tensors in bf16 under autocast on a CPU (the image tokens after the
transformer's first block, the upscaling's first stage), and torch's CPU layer norm (torch 2.14)
sums the weight and bias gradients of a bf16 input in bf16: over the N x 16384 rows of the
upscaling's norm the sums stall once each row's term falls below their rounding step, and the
gradients came out at 0.05x (bias) and 0.11x (weight) of fp32's, cosine 0.79 (8 prompts, the tiny's
decoder). Training's default precision on these CPUs would then barely move those parameters.

Here the forward and the input's gradient are torch's bf16 kernels (their sums run over one row's
channels); the parameters' gradients are summed in fp32 a block of rows at a time, from the
normalized rows recomputed in fp32 (no full-size fp32 copy of the input). fp32 inputs, and other
devices, take `F.layer_norm` as it is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

BLOCK_ELEMENTS = 1 << 17  # rows x channels summed at a time: 512 KiB in fp32, a few such in the cache


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """`F.layer_norm(x, (C,), weight, bias, eps)` over x's last axis (C); for a bf16 or fp16 `x` on a
    CPU, with parameter gradients summed in fp32."""
    if x.device.type != "cpu" or x.dtype not in (torch.bfloat16, torch.float16):
        return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
    return _LayerNormWithFp32Sums.apply(x, weight, bias, eps)


class _LayerNormWithFp32Sums(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        c = x.shape[-1]
        y, mean, rstd = torch.native_layer_norm(x, (c,), weight, bias, eps)
        ctx.save_for_backward(x, mean, rstd, weight, bias)
        return y

    @staticmethod
    def backward(ctx, grad):
        x, mean, rstd, weight, bias = ctx.saved_tensors
        c = x.shape[-1]
        grad = grad.contiguous()
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.aten.native_layer_norm_backward(grad, x, (c,), mean, rstd, weight, bias,
                                                               [True, False, False])[0]
        grad_weight = grad_bias = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            grad_weight, grad_bias = parameter_gradients(x.reshape(-1, c), grad.reshape(-1, c), mean, rstd)
            grad_weight, grad_bias = grad_weight.to(weight.dtype), grad_bias.to(bias.dtype)
        return grad_x, grad_weight, grad_bias, None


def parameter_gradients(rows: torch.Tensor, grads: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, *,
                        block_elements: int = BLOCK_ELEMENTS) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight's and the bias's gradients (fp32) of a layer norm over `rows` (R x C), from the
    output's gradient `grads` (R x C) and the forward's per-row `mean` and `rstd` (R values each),
    summed in fp32 over `block_elements` rows x channels at a time."""
    c = rows.shape[-1]
    mean, rstd = mean.reshape(-1, 1).float(), rstd.reshape(-1, 1).float()
    grad_weight = torch.zeros(c, dtype=torch.float32, device=rows.device)
    grad_bias = torch.zeros(c, dtype=torch.float32, device=rows.device)
    step = max(1, block_elements // c)
    for start in range(0, rows.shape[0], step):
        end = start + step
        block = grads[start:end].float()
        grad_bias += block.sum(0)
        normalized = (rows[start:end].float() - mean[start:end]) * rstd[start:end]
        grad_weight += (block * normalized).sum(0)
    return grad_weight, grad_bias
