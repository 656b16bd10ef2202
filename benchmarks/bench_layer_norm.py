"""A bf16 layer norm's backward on this CPU: torch's kernel (whose weight and bias gradients are
summed in bf16) against samcache's `models/layer_norm.py` (torch's input gradient, the parameters'
gradients summed in fp32 a block of rows at a time), and other ways to sum those gradients in fp32
with torch's operators, each with its error against an fp64 reference.

Shapes: the upscaling's norm (16384 rows of 64 channels per prompt) and the transformer's norm4
(4096 rows of 256 channels per image), for 5 prompts (`samcache train`'s steps on 8 stamps pages)
and 32. Random bf16 rows (mean 0.5, std 2) and a gradient with a mean (0.01), as a loss's has.
Medians of --repeats calls, the variants interleaved; one process, torch's threads.

  torch, all three gradients    native_layer_norm_backward: bf16 sums (the defect samcache avoids)
  torch, input gradient only    the part samcache keeps
  fp32 blocks (samcache)        layer_norm.parameter_gradients: BLOCK_ELEMENTS rows x channels
                                at a time, fp32
  fp32 blocks, 4x smaller/larger
  normalized rows, sum(dtype=fp32)   torch's forward without weight and bias for the normalized rows
                                     (one fused bf16 pass), then torch.sum(..., dtype=torch.float32)
  bf16 matrix-vector sums        ones @ grad and ones @ (grad * normalized): bf16 products,
                                 fp32 accumulation inside, one bf16 rounding at the end
  bf16 matrix-vector, in blocks

    python benchmarks/bench_layer_norm.py
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from samcache.devices import cpu_description  # noqa: E402
from samcache.models import layer_norm  # noqa: E402

EPS = 1e-6


def normalized_sum_fp32(x, grad, mean, rstd):
    normalized = torch.native_layer_norm(x, (x.shape[-1],), None, None, EPS)[0]
    return torch.sum(grad * normalized, 0, dtype=torch.float32), torch.sum(grad, 0, dtype=torch.float32)


def matrix_vector(x, grad, mean, rstd):
    normalized = torch.native_layer_norm(x, (x.shape[-1],), None, None, EPS)[0]
    ones = torch.ones(1, x.shape[0], dtype=x.dtype)
    return (ones @ (grad * normalized)).float()[0], (ones @ grad).float()[0]


def matrix_vector_blocks(x, grad, mean, rstd, block_elements=1 << 18):
    c = x.shape[-1]
    weight_grad, bias_grad = torch.zeros(c), torch.zeros(c)
    step = max(1, block_elements // c)
    ones = torch.ones(1, step, dtype=x.dtype)
    for start in range(0, x.shape[0], step):
        end = min(start + step, x.shape[0])
        normalized = torch.native_layer_norm(x[start:end], (c,), None, None, EPS)[0]
        bias_grad += (ones[:, : end - start] @ grad[start:end]).float()[0]
        weight_grad += (ones[:, : end - start] @ (grad[start:end] * normalized)).float()[0]
    return weight_grad, bias_grad


SUMS = {
    "fp32 blocks (samcache)": layer_norm.parameter_gradients,
    "fp32 blocks, 4x smaller": lambda *a: layer_norm.parameter_gradients(
        *a, block_elements=layer_norm.BLOCK_ELEMENTS // 4),
    "fp32 blocks, 4x larger": lambda *a: layer_norm.parameter_gradients(
        *a, block_elements=layer_norm.BLOCK_ELEMENTS * 4),
    "normalized rows, sum(dtype=fp32)": normalized_sum_fp32,
    "bf16 matrix-vector sums": matrix_vector,
    "bf16 matrix-vector, in blocks": matrix_vector_blocks,
}


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def bench_shape(rows: int, channels: int, repeats: int) -> list[tuple[str, float, str]]:
    torch.manual_seed(0)
    x = (torch.randn(rows, channels) * 2 + 0.5).bfloat16()
    grad = (torch.randn(rows, channels) / 64 + 0.01).bfloat16()
    weight, bias = torch.ones(channels, dtype=x.dtype), torch.zeros(channels, dtype=x.dtype)
    _, mean, rstd = torch.native_layer_norm(x, (channels,), None, None, EPS)
    normalized = (x.double() - mean.double()) * rstd.double()
    reference = ((grad.double() * normalized).sum(0), grad.double().sum(0))

    def torch_backward(mask):
        return lambda: torch.ops.aten.native_layer_norm_backward(grad, x, (channels,), mean, rstd, weight, bias, mask)

    calls = {"torch, all three gradients (bf16 sums)": torch_backward([True, True, True]),
             "torch, input gradient only": torch_backward([True, False, False])}
    calls.update({name: (lambda f=f: f(x, grad, mean, rstd)) for name, f in SUMS.items()})
    errors = {"torch, all three gradients (bf16 sums)": calls["torch, all three gradients (bf16 sums)"]()[1:],
              **{name: f(x, grad, mean, rstd) for name, f in SUMS.items()}}
    seconds: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            seconds[name].append(time.perf_counter() - start)
    rows_out = []
    for name in calls:
        error = ""
        if name in errors:
            weight_sum, bias_sum = errors[name]
            error = (f"weight {relative_error(weight_sum, reference[0]):.1e}, "
                     f"bias {relative_error(bias_sum, reference[1]):.1e}")
        rows_out.append((name, statistics.median(seconds[name]) * 1e3, error))
    return rows_out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args(argv)
    print(f"CPU: {cpu_description()}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    shapes = [("upscaling, 5 prompts", 5 * 16384, 64), ("upscaling, 32 prompts", 32 * 16384, 64),
              ("norm4, 4 images", 4 * 4096, 256), ("norm4, 32 prompts' images", 32 * 4096, 256)]
    for label, rows, channels in shapes:
        print(f"\n{label}: {rows} rows x {channels} channels (median ms of {args.repeats}; error vs fp64)")
        for name, ms, error in bench_shape(rows, channels, args.repeats):
            print(f"  {name:42} {ms:8.2f} ms  {error}")


if __name__ == "__main__":
    main()
