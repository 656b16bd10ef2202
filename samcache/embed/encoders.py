"""Image-encoder backends of `samcache embed`: torch (any device) and OpenVINO (the CPU).

On a CPU, OpenVINO runs SAM's ViT encoder about 1.5x faster than torch in fp32 on the same
weights (measured on vit_b, AVX2-only EPYC; it uses bf16 on CPUs with AMX or AVX512-BF16),
with embeddings equal to torch's within float tolerance (cosine 1.000000: BENCHMARKS.md). It converts
MobileSAM's TinyViT too, and wins there as well (BENCHMARKS.md, "Embed for MobileSAM"). So
`--backend auto` is OpenVINO on the CPU and torch on CUDA (bf16, batched). SAM's ViT attention is
converted as one fused attention (vit_attention.py), which makes the converted vit_b 1.46x faster
than the graph of `ov.convert_model` on the stock encoder, a user's own conversion.

Converting a model takes minutes for vit_b (a trace of the whole encoder), so it happens once
per model type and weights SHA-256 (fp32 weights; the inference precision is chosen when
compiling), into `$SAMCACHE_HOME/openvino/`. The converted files are written to a temporary
folder and renamed, so a killed conversion leaves nothing half-written behind. Once they exist,
`samcache embed` never builds the torch model nor imports segment_anything (seconds of start-up
for vit_b). OpenVINO's compiled-model cache (CACHE_DIR: 1.8 s -> 0.3 s of compiling vit_b) is
not used: with it the test process segfaulted later in the suite.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from samcache.errors import SamcacheError
from samcache.models.families import family_of
from samcache.models.specs import IMAGE_SIZE
from samcache.models.vit_attention import fused_vit_attention
from samcache.models.weights import LoadedModel, WeightsIdentity, load_identified, remember_sha256, samcache_home


def openvino_available() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str, device: torch.device, model_type: str) -> str:
    """"auto" is openvino on the CPU (when installed) and torch elsewhere; openvino needs the CPU.
    A family runs only on its own backends (ModelFamily.encoder_backends: SAM 2.1's Hiera on torch)."""
    family = family_of(model_type)
    if backend != "auto":
        family.require(backend, model_type)
    if "openvino" not in family.encoder_backends:
        return "torch"
    if backend == "auto":
        return "openvino" if device.type == "cpu" and openvino_available() else "torch"
    if backend == "openvino":
        if device.type != "cpu":
            raise SamcacheError(f"--backend openvino runs on the CPU, not on {device.type}: use --backend torch "
                                "(or --device cpu)")
        if not openvino_available():
            raise SamcacheError("--backend openvino needs the openvino package: pip install openvino")
    return backend


def open_encoder(weights: WeightsIdentity, backend: str, device: torch.device, precision: str, *,
                 tail_blocks: int = 0, say: Callable[[str], None] = print):
    """The encoder of `weights` on `backend` (resolve_backend's answer): a callable from the
    model input (B, 3, 1024, 1024) to embeddings (B, 256, 64, 64) float32 (with `tail_blocks` K, the
    tokens before the last K blocks stacked after them: ModelFamily.encoder_module), or for a family
    whose encoder takes the decoded images (SAM 2.1) from those to its features (ModelFamily.torch_encoder)."""
    if backend == "openvino":
        return OpenVINOEncoder(weights, precision, tail_blocks=tail_blocks, say=say)
    return family_of(weights.model_type).torch_encoder(load_identified(weights).sam, device, precision,
                                                       tail_blocks)


class OpenVINOEncoder:
    """The same encoder converted to OpenVINO once (see the module docstring), compiled for the CPU.

    Arguments:
      weights: the weights whose encoder to run (their SHA-256 names the converted files; they
        are loaded into torch only to convert them).
      precision: "bf16" (OpenVINO's bf16 inference, on CPUs that have it) or "fp32".
      tail_blocks: K > 0 converts the encoder that also returns its tokens before the last K blocks.
      say: where to report a conversion (a line at the start and one at the end).
    """

    def __init__(self, weights: WeightsIdentity, precision: str, *, tail_blocks: int = 0,
                 say: Callable[[str], None] = print):
        import openvino as ov

        xml = converted_path(weights, tail_blocks)
        if not xml.exists():
            _convert(load_identified(weights), xml, say, tail_blocks)
        elif weights.path is not None:
            remember_sha256(weights.path)  # converted from these very bytes before: the file is good
        core = ov.Core()
        config = {"PERFORMANCE_HINT": "LATENCY",
                  "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32"}
        self.compiled = core.compile_model(str(xml), "CPU", config)
        self.request = self.compiled.create_infer_request()

    def __call__(self, batch: torch.Tensor) -> np.ndarray:
        """(B, 3, 1024, 1024) -> (B, 256, 64, 64) float32, one image per inference (the model was
        converted for batch 1; on a CPU batching only adds memory traffic)."""
        inputs = batch.float().cpu().numpy()
        return np.concatenate([self.request.infer([inputs[i : i + 1]])[0].copy() for i in range(len(inputs))])


CONVERSION = "v2"
"""The conversion's form, in the files' names: a new form converts again rather than reuse the
graph of an older one. This form runs SAM's ViT attention fused (vit_attention.py)."""


def converted_path(weights: WeightsIdentity, tail_blocks: int = 0) -> Path:
    """Where the OpenVINO model of these weights lives (`.xml`, with its `.bin` beside it)."""
    folder = samcache_home() / "openvino"
    tail = f"-tail{tail_blocks}" if tail_blocks else ""
    return folder / f"{weights.model_type}-{weights.weights_sha256[:16]}-encoder{tail}-{CONVERSION}.xml"


def _convert(loaded: LoadedModel, xml: Path, say: Callable[[str], None], tail_blocks: int = 0) -> None:
    import openvino as ov

    encoder = loaded.family.encoder_module(loaded.sam, tail_blocks).float().eval()
    say(f"converting the {loaded.model_type} image encoder to OpenVINO, once for these weights "
        f"(vit_b takes about 2 minutes on 2 cores); it will be kept in {xml.parent}")
    started = time.time()
    ticker = _Ticker(say, started)
    try:
        with torch.no_grad(), warnings.catch_warnings(), fused_vit_attention(encoder):
            # The trace warns of every shape it fixes (TinyViT's asserts on sizes, `len(x)`) and of
            # torch.jit's deprecation: the input size is fixed here on purpose, so none applies.
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.simplefilter("ignore", FutureWarning)
            model = ov.convert_model(encoder, example_input=torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE))
        xml.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=xml.parent, prefix=".converting-"))
        try:
            # fp32 weights: compressing them to fp16 would change the embeddings
            ov.save_model(model, str(staging / xml.name), compress_to_fp16=False)
            os.replace(staging / xml.with_suffix(".bin").name, xml.with_suffix(".bin"))
            os.replace(staging / xml.name, xml)  # the .xml last: it is what marks a finished conversion
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    finally:
        ticker.stop()
    size = xml.with_suffix(".bin").stat().st_size / 2**20
    say(f"converted in {time.time() - started:.0f} s ({size:.0f} MiB): {xml}")
    for older in older_conversions(xml):
        size = sum(p.stat().st_size for p in (older, older.with_suffix(".bin")) if p.exists()) / 2**20
        say(f"  {older.name} (and its .bin, {size:.0f} MiB), an earlier form of this conversion, is no longer "
            "read: delete them to free the space")


def older_conversions(xml: Path) -> list[Path]:
    """The converted files of the same weights (and tail) in earlier forms (another CONVERSION, or
    none), beside `xml`: samcache keeps them, a user may delete them."""
    stem = xml.name.removesuffix(f"-{CONVERSION}.xml")
    form = re.compile(re.escape(stem) + r"(-v\d+)?\.xml")
    return sorted(p for p in xml.parent.glob(f"{stem}*.xml") if p != xml and form.fullmatch(p.name))


class _Ticker:
    """Says how long the conversion has run, every 30 s (ov.convert_model reports no progress)."""

    def __init__(self, say: Callable[[str], None], started: float, every: float = 30.0):
        self._stop = threading.Event()
        threading.Thread(target=self._run, args=(say, started, every), daemon=True).start()

    def _run(self, say, started: float, every: float) -> None:
        while not self._stop.wait(every):
            say(f"  converting: {time.time() - started:.0f} s")

    def stop(self) -> None:
        self._stop.set()
