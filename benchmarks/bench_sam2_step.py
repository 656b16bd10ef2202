"""Benchmark: SAM 2.1 decoder training steps from a samcache cache against a sam2-style
step that runs the frozen image encoder under no_grad every step.

Both sides run the very same decoder step, samcache's (the family's `PromptDecoder` + `step.optimize_step`:
SAM 2.1's prompt encoder and mask decoder with the high-resolution features and the object-score
head, SAM 2's loss, AdamW, conv_s0 / conv_s1 frozen), on the same batches of box prompts drawn by
samcache's sampler (B pages x K objects). They differ only in where the features come from:

  A. "cache":   each step reads its images' features from a SAM 2.1 cache made by `samcache embed`
                (three fp16 maps per image, checksummed h5py reads, packed, cast to fp32);
  B. "encoder": each step decodes its images from disk and runs SAM 2.1's preprocessing and Hiera
                encoder under torch.no_grad, in bf16 autocast where the CPU has native bf16 (the
                fastest simple form; what sam2's own trainer does with a frozen encoder, minus its
                augmentations).

Random weights (speed does not depend on them); rounds interleaved A B A B ...

    python benchmarks/bench_sam2_step.py --pages 10 --rounds 2
    python benchmarks/bench_sam2_step.py --pages 10 --rounds 2 --model sam2.1_hiera_l
    python benchmarks/bench_sam2_step.py --device cuda --pages 64 --batch-size 8 --rounds 3   # gpu.sh

The decoder step runs in `samcache train`'s default precision: bf16 autocast on CUDA and on CPUs
with native bf16, else fp32. On CUDA both sides run on the GPU.
"""

from __future__ import annotations

import argparse
from functools import partial
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from samcache.cache.reader import EmbeddingCache  # noqa: E402
from samcache.config import EmbedConfig, PromptSettings  # noqa: E402
from samcache.data.datasets import load_dataset  # noqa: E402
from samcache.data.images import read_image  # noqa: E402
from samcache.data.stamps import generate_stamps  # noqa: E402
from samcache.devices import autocast, cpu_description, resolve_precision  # noqa: E402
from samcache.embed.pipeline import embed_dataset  # noqa: E402
from samcache.models.weights import (  # noqa: E402
    build_sam,  # noqa: E402
    load_sam,
)
from samcache.train.samples import CacheSamples, SampleSettings, collate  # noqa: E402
from samcache.train.step import optimize_step  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="sam2.1_hiera_t")
    parser.add_argument("--pages", type=int, default=4, help="synthetic stamp pages in the cache")
    parser.add_argument("--batch-size", type=int, default=2, help="images per step")
    parser.add_argument("--objects-per-image", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--work", type=Path, default=None, help="folder for the data and cache (default: a temp)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_sam2_"))
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    checkpoint = work / f"{args.model}-random.pt"
    if not checkpoint.exists():
        torch.save({"model": build_sam(args.model).model.state_dict()}, checkpoint)
    data = work / "stamps"
    if not (data / "images").exists():
        generate_stamps(data, args.pages, seed=5, progress=False)
    cache_dir = work / f"cache-{args.model}"
    device = torch.device(args.device)
    embed_dataset(load_dataset(data), cache_dir, EmbedConfig(model_type=args.model, checkpoint=checkpoint,
                                                             progress=False, workers=0, device=args.device))
    cache = EmbeddingCache(cache_dir)
    # The decoder step in `samcache train`'s default precision (bf16 where the device has it), the
    # encoder in the fastest simple form (the same).
    precision = step_precision = resolve_precision("auto", device)

    loaded = load_sam(args.model, checkpoint)
    sam = loaded.sam.to(device)
    encoder_side = load_sam(args.model, checkpoint).sam.eval().to(device)  # B's frozen encoder
    sam.image_encoder = None
    sam.mask_decoder.train()
    sam.prompt_encoder.requires_grad_(False)
    for module in loaded.family.frozen_by_cache(sam):
        module.requires_grad_(False)
    parameters = [p for p in sam.mask_decoder.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=1e-5)
    module = loaded.decoder()

    samples = CacheSamples(cache, SampleSettings.training(objects_per_image=args.objects_per_image,
                                                                   prompts=PromptSettings(mode="box"), seed=0),
                           read_embeddings=False)
    indices = cache.annotated_indices("train") or list(range(len(cache)))
    batches = [collate([samples[(0, i)] for i in indices[s : s + args.batch_size]])
               for s in range(0, len(indices) - args.batch_size + 1, args.batch_size)]

    def from_cache(batch) -> torch.Tensor:
        return torch.stack([torch.from_numpy(cache.embedding(i)) for i in batch.indices]).to(device).float()

    def from_encoder(batch) -> torch.Tensor:
        images = [read_image(cache.images[i].file.path) for i in batch.indices]
        with torch.no_grad(), autocast(device, precision):
            return encoder_side.encode(images).float()

    def step(batch, features: torch.Tensor) -> None:
        prompts, targets = batch.prompts.to(device), batch.targets.to(device)
        with autocast(device, step_precision):
            output = module(features, prompts)
        optimize_step(output, targets, prompts.multimask, loss=partial(module.loss, kind="sam"), optimizer=optimizer,
                      parameters=parameters, grad_clip=1.0)
        if device.type == "cuda":
            torch.cuda.synchronize()

    times: dict[str, list[float]] = {"cache": [], "encoder": []}
    prompts: dict[str, int] = {"cache": 0, "encoder": 0}
    step(batches[0], from_cache(batches[0]))  # warm-up
    for _ in range(args.rounds):
        for side, source in (("cache", from_cache), ("encoder", from_encoder)):
            for batch in batches:
                start = time.perf_counter()
                step(batch, source(batch))
                times[side].append(time.perf_counter() - start)
                prompts[side] += batch.n_prompts
    info = cache.info()
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU: {cpu_description()}"
    print(f"{where}; torch threads {torch.get_num_threads()}; {args.model} (random weights); "
          f"{len(batches)} batches of {args.batch_size} images x up to {args.objects_per_image} boxes, "
          f"{args.rounds} rounds interleaved; encoder side in {precision}, decoder step in {step_precision}")
    print(f"cache: {info['images']} images, {info['bytes_per_image'] / 2**20:.2f} MiB per image on disk")
    rate = {side: prompts[side] / sum(values) for side, values in times.items()}
    for side, values in times.items():
        print(f"{side:<8} {np.median(values):6.2f} s per step (median)  {rate[side]:6.2f} prompts/s")
    print(f"ratio (cache / encoder, prompts/s): {rate['cache'] / rate['encoder']:.2f}x")


if __name__ == "__main__":
    main()
