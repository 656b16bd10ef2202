"""Benchmark: SAM-HQ's HQ head trained from a samcache cache against SAM-HQ's own training step.

Same weights on both sides (hq_vit_b with random weights, seed 0, saved in segment_anything_hq's
layout; speed does not depend on them), same synthetic stamp pages (the cache's train split), same
batch size, one box per object, rounds interleaved in ABBA order after one untimed warm-up step:

  SAM-HQ's step   what SAM-HQ's train/train.py does per step, with segment_anything_hq's own
                  modules loaded by its sam_model_registry: for a batch of B images, read each page
                  (cv2), resize (ResizeLongestSide) and normalise (sam.preprocess), run the whole
                  image encoder under torch.no_grad (embedding + interm_embeddings, fp32 as SAM-HQ
                  trains), the prompt encoder on the image's boxes, then per image
                  `MaskDecoderHQ.forward(..., multimask_output=False, hq_token_only=True,
                  interm_embeddings=...)`, SAM-HQ's loss (sam_hq.sam_hq_loss: point-sampled BCE +
                  dice on the HQ mask), backward and an Adam step on the HQ parts only (lr 1e-3,
                  its default). The boxes and low-res targets are the ones samcache's sampler draws
                  for the same images (box jitter 0.1), so both sides see the same prompts. Not
                  counted for SAM-HQ: its data loader's augmentations and the frozen SAM decoder
                  pass its Sam.forward also runs (both would only slow it down).
  SAM-HQ's step, encoder bf16   the same with the encoder under torch.autocast("cpu", bfloat16),
                  what a skilled user writes on a CPU with bf16 instructions (only there)
  samcache train  `python -m samcache train CACHE --epochs E --batch-size B --prompt box` as a whole
                  process per round, defaults otherwise (SAM-HQ's loss, the HQ head trained, SAM's
                  decoder frozen, AdamW). Its step rate comes from its metrics.jsonl (the step
                  records' samples_per_s at each epoch's last step: prompts over the epoch's
                  training time, validation excluded), the first epoch of each process left out
                  as warm-up; the whole process's prompts/s (start-up and validation included) is
                  printed beside it.

The cache is made once, before the rounds, by `samcache embed DATA --out CACHE --model hq_vit_b
--checkpoint W` (defaults: torch backend, bf16 autocast on CPUs with native bf16); its time is the
one-off cost, and the break-even is the number of epochs after which embed + training from the
cache costs less than SAM-HQ's own steps (embed time scaled to the train split's images). The
cache's size: bytes of its shards per image, and of each stored map (embeddings, early_features).

    python benchmarks/bench_sam_hq_step.py --pages 6 --rounds 2
    python benchmarks/bench_sam_hq_step.py --model hq_vit_tiny --pages 4 --rounds 1 --epochs 2   # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import cv2
import h5py
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from samcache.cache.reader import EmbeddingCache  # noqa: E402
from samcache.config import PromptSettings  # noqa: E402
from samcache.devices import cpu_description, cpu_has_native_bf16  # noqa: E402
from samcache.models.sam_hq import hq_modules, sam_hq_loss  # noqa: E402
from samcache.models.weights import build_seeded  # noqa: E402
from samcache.train.samples import CacheSamples, SampleSettings, collate  # noqa: E402


def samcache(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "samcache", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, env=env)


def stored_bytes_per_image(cache: EmbeddingCache) -> dict:
    """Bytes per image of the cache's shard files, and of each stored map's HDF5 dataset."""
    shards = list((Path(cache.cache_dir) / "shards").glob("*.h5"))
    sizes = {"shards": sum(p.stat().st_size for p in shards)}
    for path in shards:
        with h5py.File(path, "r") as f:
            def add(name, item):
                if isinstance(item, h5py.Dataset) and name.split("/")[-1] in ("embeddings", "early_features"):
                    key = name.split("/")[-1]
                    sizes[key] = sizes.get(key, 0) + item.id.get_storage_size()
            f.visititems(add)
    return {k: v / len(cache) for k, v in sizes.items()}


def per_round(outcomes: list[dict], key: str) -> str:
    return ", ".join(f"{o[key]:.3f}" for o in outcomes)


def load_sam_hq(model: str, checkpoint: Path):
    """`model` as a SAM-HQ user loads it, with only the HQ parts trainable (as its trainer sets)."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Overwriting tiny_vit", category=UserWarning)
        warnings.filterwarnings("ignore", message="Importing from timm", category=FutureWarning)
        from segment_anything_hq import sam_model_registry
        from segment_anything_hq.utils.transforms import ResizeLongestSide
    sam = sam_model_registry[model.removeprefix("hq_")](checkpoint=str(checkpoint)).eval()
    sam.requires_grad_(False)
    parameters = []
    for module in hq_modules(sam.mask_decoder):
        module.requires_grad_(True)
        parameters += list(module.parameters())
    sam.mask_decoder.train()
    return sam, ResizeLongestSide(sam.image_encoder.img_size), parameters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="hq_vit_b", choices=["hq_vit_b", "hq_vit_tiny"],
                        help="hq_vit_tiny: a quick smoke run")
    parser.add_argument("--pages", type=int, default=6, help="stamp pages (about 2/3 of them in the train split)")
    parser.add_argument("--batch-size", type=int, default=2, help="images per step, both sides")
    parser.add_argument("--objects-per-image", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=3, help="epochs of each samcache train round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_sam_hq_step"))
    args = parser.parse_args()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, SAMCACHE_HOME=str(work / "home"))
    print(f"CPU: {cpu_description()}; torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)

    checkpoint = work / f"{args.model}_random.pth"
    if not checkpoint.exists():
        torch.save(build_seeded(args.model, 0).state_dict(), checkpoint)
    data = work / "stamps"
    if not (data / "train.json").exists():
        samcache("data", "stamps", "--out", data, "--n", args.pages, "--seed", 5, "--overwrite").check_returncode()
    cache_dir = work / f"cache-{args.model}"
    if not (cache_dir / "cache.json").exists():
        started = time.perf_counter()
        result = samcache("embed", data, "--out", cache_dir, "--model", args.model, "--checkpoint", checkpoint,
                          env=env)
        assert result.returncode == 0, result.stderr[-3000:]
        (cache_dir / "embed_seconds.txt").write_text(str(time.perf_counter() - started))
    embed_seconds = float((cache_dir / "embed_seconds.txt").read_text())
    cache = EmbeddingCache(cache_dir)
    sizes = stored_bytes_per_image(cache)
    print(f"samcache embed: {len(cache)} images in {embed_seconds:.1f} s ({embed_seconds / len(cache):.1f} s per "
          f"image, whole command); shards {sizes['shards'] / 2**20:.2f} MiB per image (embeddings "
          f"{sizes.get('embeddings', 0) / 2**20:.2f} MiB, early_features "
          f"{sizes.get('early_features', 0) / 2**20:.2f} MiB)", flush=True)

    indices = cache.annotated_indices("train")
    samples = CacheSamples(cache, SampleSettings.training(objects_per_image=args.objects_per_image,
                                                          prompts=PromptSettings(mode="box"), seed=0),
                           read_embeddings=False)
    batches = [collate([samples[(0, i)] for i in indices[s : s + args.batch_size]])
               for s in range(0, len(indices), args.batch_size)]
    prompts_per_epoch = sum(b.n_prompts for b in batches)

    sam, transform, parameters = load_sam_hq(args.model, checkpoint)
    optimizer = torch.optim.Adam(parameters, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0)

    def sam_hq_step(batch, bf16: bool = False) -> None:
        images = []
        for i in batch.indices:
            image = cv2.cvtColor(cv2.imread(cache.images[i].file.path), cv2.COLOR_BGR2RGB)
            resized = torch.as_tensor(transform.apply_image(image)).permute(2, 0, 1).contiguous()
            images.append(sam.preprocess(resized.float()))
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            embeddings, interm = sam.image_encoder(torch.stack(images))
        embeddings, interm = embeddings.float(), [x.float() for x in interm]
        masks = []
        for row in range(len(batch.indices)):
            boxes = batch.prompts.boxes[batch.prompts.batch_row == row]
            with torch.no_grad():
                sparse, dense = sam.prompt_encoder(points=None, boxes=boxes, masks=None)
            hq, _ = sam.mask_decoder(image_embeddings=embeddings[row : row + 1],
                                     image_pe=sam.prompt_encoder.get_dense_pe(), sparse_prompt_embeddings=sparse,
                                     dense_prompt_embeddings=dense, multimask_output=False, hq_token_only=True,
                                     interm_embeddings=[interm[0][row : row + 1]])
            masks.append(hq)
        # The sampler orders a batch's prompts by image, the order the masks were decoded in.
        loss = sam_hq_loss(torch.cat(masks), batch.targets).total
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    def sam_hq_epoch(bf16: bool = False) -> dict:
        started = time.perf_counter()
        for batch in batches:
            sam_hq_step(batch, bf16)
        seconds = time.perf_counter() - started
        return {"prompts_per_s": prompts_per_epoch / seconds, "epoch_s": seconds}

    def samcache_round(r: int) -> dict:
        run = work / f"run-{args.model}-{r}"
        if run.exists():
            import shutil

            shutil.rmtree(run)
        started = time.perf_counter()
        result = samcache("train", cache_dir, "--out", run, "--epochs", args.epochs, "--batch-size",
                          args.batch_size, "--objects-per-image", args.objects_per_image, "--prompt", "box",
                          "--device", "cpu", env=env)
        wall = time.perf_counter() - started
        assert result.returncode == 0, result.stderr[-3000:]
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
        steps = [r for r in records if r.get("type") == "step"]
        last = {}
        for s in steps:  # the epoch's last step: its samples_per_s covers the whole epoch's training
            last[s["epoch"]] = s
        epoch_prompts = {e: sum(s["prompts"] for s in steps if s["epoch"] == e) for e in last}
        kept = [e for e in sorted(last) if e > 1] or sorted(last)
        seconds = sum(epoch_prompts[e] / last[e]["samples_per_s"] for e in kept)
        return {"prompts_per_s": sum(epoch_prompts[e] for e in kept) / seconds, "epoch_s": seconds / len(kept),
                "whole_process_prompts_per_s": sum(epoch_prompts.values()) / wall, "wall_s": wall}

    sam_hq_step(batches[0])  # warm-up
    sides = {"SAM-HQ's step": None, "samcache train": None}
    if cpu_has_native_bf16():  # the stronger variant a user writes on a CPU with bf16 instructions
        sides = {"SAM-HQ's step": None, "SAM-HQ's step, encoder bf16": None, "samcache train": None}
    results: dict[str, list[dict]] = {name: [] for name in sides}
    for r in range(1, args.rounds + 1):
        order = list(sides) if r % 2 else list(reversed(sides))
        for name in order:
            if name == "samcache train":
                outcome = samcache_round(r)
            else:
                outcome = sam_hq_epoch(bf16=name.endswith("bf16"))
            results[name].append(outcome)
            print(f"round {r}: {name}: {outcome['prompts_per_s']:.3f} prompts/s, {outcome['epoch_s']:.2f} s "
                  "per epoch", flush=True)

    own = results["SAM-HQ's step"]
    ours = results["samcache train"]
    own_bf16 = results.get("SAM-HQ's step, encoder bf16")
    own_rate = len(own) * prompts_per_epoch / sum(o["epoch_s"] for o in own)
    our_rate = len(ours) / sum(1 / o["prompts_per_s"] for o in ours)
    own_epoch, our_epoch = prompts_per_epoch / own_rate, prompts_per_epoch / our_rate
    embed_train = embed_seconds * len(indices) / len(cache)
    whole = np.mean([o["whole_process_prompts_per_s"] for o in ours])
    print(f"\nCPU: {cpu_description()}; {args.model} (random weights); {len(indices)} train images, "
          f"{prompts_per_epoch} boxes per epoch, batches of {args.batch_size} images; {args.rounds} rounds interleaved")
    print("| side | prompts/s | s per epoch | per round (prompts/s) |")
    print("| --- | ---: | ---: | --- |")
    print(f"| SAM-HQ's step (encoder fp32 under no_grad every step) | {own_rate:.3f} | {own_epoch:.2f} | "
          f"{per_round(own, 'prompts_per_s')} |")
    if own_bf16:
        bf16_rate = len(own_bf16) * prompts_per_epoch / sum(o["epoch_s"] for o in own_bf16)
        print(f"| SAM-HQ's step, encoder under bf16 autocast | {bf16_rate:.3f} | {prompts_per_epoch / bf16_rate:.2f} | "
              f"{per_round(own_bf16, 'prompts_per_s')} |")
        print(f"ratio (samcache / SAM-HQ's step with a bf16 encoder): {our_rate / bf16_rate:.1f}x")
    print(f"| samcache train (from the cache; epochs 2-{args.epochs} of each process) | {our_rate:.3f} | "
          f"{our_epoch:.2f} | {per_round(ours, 'prompts_per_s')} |")
    print(f"| samcache train, whole process (start-up, validation) | {whole:.3f} | | "
          f"{per_round(ours, 'whole_process_prompts_per_s')} |")
    print(f"ratio (samcache / SAM-HQ, prompts/s): {our_rate / own_rate:.1f}x")
    print(f"one-off embed: {embed_seconds:.1f} s for {len(cache)} images; for the {len(indices)} train images "
          f"{embed_train:.1f} s; break-even after {embed_train / max(own_epoch - our_epoch, 1e-9):.2f} epochs "
          "(embed of the train images / the time saved per epoch)")


if __name__ == "__main__":
    main()
