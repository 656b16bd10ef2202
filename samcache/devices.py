"""Where tensors run and in which precision: the device, autocast and memory helpers of every stage.

Embedding and training run in bf16 autocast on CUDA and on CPUs with native bf16 (their
`--precision auto`, `resolve_precision`); `samcache eval` and training's validation decode in
bf16 on CUDA and in fp32 on the CPU (`decoder_precision`), so that a CPU's figures do not depend on
which CPU; predict stays fp32 so that its masks are SamPredictor's.
"""

from __future__ import annotations

import os
import platform
from contextlib import nullcontext
from pathlib import Path

import torch

from samcache.config import DEVICES, PRECISIONS
from samcache.errors import SamcacheError


def resolve_device(device: str) -> torch.device:
    """"auto" (CUDA when available), "cpu" or "cuda" -> a torch.device; CUDA without a GPU is an error."""
    if device not in DEVICES:
        raise SamcacheError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SamcacheError("--device cuda was asked for, but PyTorch sees no CUDA device")
    return torch.device(device)


def resolve_precision(precision: str, device: torch.device) -> str:
    """The encoder's (embed) or the decoder's (train) precision: "auto" is bf16 on CUDA and on CPUs with
    native bf16, else fp32."""
    if precision not in PRECISIONS:
        raise SamcacheError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "bf16" if device.type == "cuda" or cpu_has_native_bf16() else "fp32"
    return precision


def decoder_precision(device: torch.device) -> str:
    """The decoder's precision in evaluation and validation: bf16 on CUDA, fp32 on the CPU."""
    return "bf16" if device.type == "cuda" else "fp32"


def autocast(device: torch.device, precision: str):
    """bf16 autocast on `device` when `precision` is "bf16"; otherwise a context that does nothing."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def cpu_has_native_bf16() -> bool:
    """True on CPUs with bf16 instructions (AVX512-BF16, AMX), where bf16 autocast runs the encoder
    about twice as fast as fp32 with embeddings at cosine similarity >= 0.9999 (BENCHMARKS.md)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)


def keep_freed_memory() -> bool:
    """Lets this process keep the memory it frees, for the next allocation, instead of handing it back.

    glibc's malloc serves each request above 32 MiB with its own mmap and unmaps it when freed, so
    every training step's large activations (a few hundred MiB: N prompts x 32 x 256 x 256 floats and
    their gradients) come back as fresh pages that the kernel faults in and zeroes one by one: millions
    of page faults per epoch: without them the demo's epochs ran 1.09x (bf16) and 1.27x (fp32) as fast
    (BENCHMARKS.md, "Training epochs and the allocator"). Served from the heap and not trimmed, the freed blocks are
    reused as they are. The price is that the process's resident memory stays at its peak until it
    exits (+13% and +33% there), which suits a training process. True when applied (Linux with glibc), False
    elsewhere (nothing changes)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    except (OSError, AttributeError):
        return False


def available_memory_bytes(device: torch.device) -> int:
    """Free memory on `device`: the GPU's, or the machine's available RAM."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 0


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), for figures that must say which CPU they are from."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_description() -> str:
    """"AMD EPYC (avx2), 2 cores": the name, the matmul-relevant instruction sets, the cores."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        flags = set()
    kinds = [f for f in ("amx_bf16", "avx512_bf16", "avx512f", "avx2") if f in flags]
    return f"{cpu_name()} ({', '.join(kinds) or 'no AVX2'}), {os.cpu_count()} cores"
