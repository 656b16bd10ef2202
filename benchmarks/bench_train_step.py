"""Benchmark: decoder training prompts/s, samcache against the stock step a skilled user writes.

One cache (tiny model: its prompt encoder and mask decoder have SAM's shapes, so a decoder step
costs what vit_b's does; the embeddings are 256x64x64 as for every SAM), one process, methods
interleaved in ABBA order over `--rounds` rounds, each round one pass over the train images:

  stock, one box    per box: PromptEncoder(boxes=box) (no grad), MaskDecoder(multimask=False),
                    20 x focal + dice on the 256x256 low-res mask, Adam step
  stock, all boxes  per image: the same with all its boxes in one call (the stock decoder
                    repeats the image for each prompt), one Adam step per image
  (each also under bf16 autocast where the CPU has bf16 instructions)
  samcache          `Training` with `samcache train`'s default options (batch 4 images x up to 8
                    objects, jittered boxes, the SAM loss incl. the IoU head, AdamW, grad clip,
                    bf16 autocast where the CPU has bf16 instructions), one epoch without
                    validation, through its DataLoader and HDF5 reads; also with --precision fp32
  The stock steps run with glibc's default allocator settings, samcache's with the setting
  `samcache train` makes (devices.keep_freed_memory), switched between methods; the best stock
  step also runs with that setting, to show what it alone gives. "vs best stock": against the
  best stock step with the default allocator, what a user runs today.

Targets for the stock loops are prepared once (not timed); samcache's time includes reading
embeddings and building prompts and targets every step. prompts/s = prompts / seconds.

Every method first runs `--warmup` untimed rounds: the figures are steady-state rates, what a run
of many epochs sees. A step with a prompt count (and number of images) it has not run before
costs ~100 ms more, once (the kernels and memory for the new shapes); samcache's epochs here are
2 steps of varying composition, so without the warm-up its first rounds pay that cost rather
than their steps'. `--warmup 1` gives those cold figures.

    python benchmarks/bench_train_step.py --pages 8 --rounds 2 --work /tmp/bench_train_step
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from torchvision.ops import sigmoid_focal_loss  # noqa: E402

from samcache.cache.reader import EmbeddingCache  # noqa: E402
from samcache.config import TrainConfig  # noqa: E402
from samcache.devices import cpu_description, cpu_has_native_bf16, keep_freed_memory  # noqa: E402
from samcache.distributed import SINGLE  # noqa: E402
from samcache.models.decoder import dice_loss  # noqa: E402
from samcache.models.preprocess import transform_boxes  # noqa: E402
from samcache.models.prompts import low_res_target  # noqa: E402
from samcache.models.weights import load_sam  # noqa: E402
from samcache.train.runs import RunFolder, RunWriter, TrainState  # noqa: E402
from samcache.train.trainer import Training, _splits, train_epoch  # noqa: E402


def stock_data(cache: EmbeddingCache, indices: list[int]):
    items = []
    for i in indices:
        info = cache.images[i]
        boxes = transform_boxes(np.array([o.box for o in info.objects]), info.original_size)
        targets = np.stack([low_res_target(o.rle, info.input_size) for o in info.objects])
        items.append((torch.from_numpy(cache.embedding(i).astype(np.float32))[None], torch.as_tensor(boxes).float(),
                      torch.from_numpy(targets)[:, None]))
    return items


def stock_epoch(sam, optimizer, items, *, all_boxes: bool, bf16: bool) -> int:
    prompts = 0
    pe = sam.prompt_encoder.get_dense_pe()
    for embedding, boxes, targets in items:
        groups = [slice(0, len(boxes))] if all_boxes else [slice(k, k + 1) for k in range(len(boxes))]
        for g in groups:
            with torch.no_grad():
                sparse, dense = sam.prompt_encoder(points=None, boxes=boxes[g], masks=None)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                low_res, _ = sam.mask_decoder(image_embeddings=embedding, image_pe=pe, sparse_prompt_embeddings=sparse,
                                              dense_prompt_embeddings=dense, multimask_output=False)
            low_res = low_res.float()
            loss = (20 * sigmoid_focal_loss(low_res, targets[g], reduction="mean")
                    + dice_loss(low_res, targets[g]).mean())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            prompts += len(boxes[g])
    return prompts


def glibc_malloc(keep: bool) -> None:
    """`samcache train`'s allocator setting (devices.keep_freed_memory) on, or glibc's defaults back
    (large blocks mapped and unmapped, the heap trimmed), so that methods alternate in one process."""
    if keep:
        keep_freed_memory()
    else:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-4, 65536)  # M_MMAP_MAX
        libc.mallopt(-1, 128 * 1024)  # M_TRIM_THRESHOLD
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pages", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=8,
                        help="untimed rounds of every method first: samcache's epochs draw new batch compositions "
                             "(prompt counts per step), and a step of a new shape runs ~100 ms slower once")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_train_step"))
    args = parser.parse_args()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    data, cache_dir = work / "data", work / "cache"
    if not (cache_dir / "cache.json").exists():
        subprocess.run([sys.executable, "-m", "samcache", "data", "stamps", "--out", data, "--n", str(args.pages),
                        "--seed", "7", "--overwrite"], cwd=REPO, check=True, capture_output=True)
        subprocess.run([sys.executable, "-m", "samcache", "embed", data, "--out", cache_dir, "--model", "tiny"],
                       cwd=REPO, check=True, capture_output=True)
    cache = EmbeddingCache(cache_dir)
    train_indices = cache.annotated_indices("train")
    items = stock_data(cache, train_indices)
    print(f"CPU: {cpu_description()}; torch {torch.__version__}; {len(train_indices)} pages, "
          f"{sum(len(b) for _, b, _ in items)} boxes", flush=True)

    bf16 = cpu_has_native_bf16()
    sam = load_sam("tiny").sam
    sam.image_encoder = None
    optimizer = torch.optim.Adam(sam.mask_decoder.parameters(), lr=1e-5)

    def samcache_method(precision: str):
        config = TrainConfig(val_split="train", workers=0, epochs=args.warmup + args.rounds + 1, save_every=None,
                             precision=precision)
        run = RunFolder(work / f"run_{precision}")
        training = Training.setup(cache, run, config, _splits(cache, config, SINGLE), resume=False, dist=SINGLE)
        writer = RunWriter(run, enabled=False)
        state = TrainState(history=[0.0])
        epoch = [0]

        def samcache_epoch() -> int:
            prompts = train_epoch(training, state, writer, epoch[0], progress=False)
            epoch[0] += 1
            return prompts
        return training.precision, samcache_epoch

    default_precision, samcache_default = samcache_method("auto")

    def with_memory(keep: bool, fn):
        def run() -> int:
            glibc_malloc(keep)
            return fn()
        return run

    best_stock = bf16  # the best stock step: all boxes of an image, in bf16 where the CPU has it
    methods = {
        "stock, one box, fp32": lambda: stock_epoch(sam, optimizer, items, all_boxes=False, bf16=False),
        "stock, all boxes of an image, fp32": lambda: stock_epoch(sam, optimizer, items, all_boxes=True, bf16=False),
        **({"stock, one box, bf16": lambda: stock_epoch(sam, optimizer, items, all_boxes=False, bf16=True),
            "stock, all boxes, bf16": lambda: stock_epoch(sam, optimizer, items, all_boxes=True, bf16=True)}
           if bf16 else {}),
        f"stock, all boxes, {'bf16' if best_stock else 'fp32'}, freed memory kept": with_memory(
            True, lambda: stock_epoch(sam, optimizer, items, all_boxes=True, bf16=best_stock)),
        f"samcache train (defaults: {default_precision})": with_memory(True, samcache_default),
        **({"samcache train --precision fp32": with_memory(True, samcache_method("fp32")[1])}
           if default_precision != "fp32" else {}),
    }
    methods = {name: fn if "kept" in name or name.startswith("samcache") else with_memory(False, fn)
               for name, fn in methods.items()}
    warmup_started = time.perf_counter()
    for _ in range(args.warmup):
        for fn in methods.values():
            fn()
    print(f"warm-up: {args.warmup} rounds of every method, {time.perf_counter() - warmup_started:.0f} s", flush=True)
    rates = {name: [] for name in methods}
    for r in range(args.rounds):
        for name in (methods if r % 2 == 0 else reversed(list(methods))):
            started = time.perf_counter()
            prompts = methods[name]()
            rates[name].append(prompts / (time.perf_counter() - started))
            print(f"round {r + 1}: {name}: {rates[name][-1]:.2f} prompts/s", flush=True)
    best_stock = max(statistics.mean(v) for k, v in rates.items() if k.startswith("stock") and "kept" not in k)
    print(f"\nCPU: {cpu_description()}")
    print("| method | prompts/s | per round | vs best stock |")
    print("| --- | ---: | --- | ---: |")
    for name, values in rates.items():
        mean = statistics.mean(values)
        print(f"| {name} | {mean:.2f} | {', '.join(f'{v:.2f}' for v in values)} | {mean / best_stock:.2f}x |")


if __name__ == "__main__":
    main()
