"""Benchmark: samcache's training from the embedding cache against the well-known tutorial loop.

Three measurements, all in ONE run so that the ratios are taken under the same machine load
(absolute times on a shared 2-core CPU are noisy; ratios measured side by side much less so):

(a) Epoch time, vit_b with random weights (saved as a checkpoint; both sides load it).

    tutorial: the loop of Encord's "How To Fine-Tune Segment Anything": per image and epoch the
      image encoder runs under torch.no_grad; then for each box, one at a time: prompt encoder
      (no_grad), mask decoder forward, `Sam.postprocess_masks` up to the original resolution,
      loss, backward, Adam step on the mask decoder's parameters. Its timed epoch includes the
      encoder forwards and the per-box steps. The preprocessed input tensors, transformed boxes
      and ground-truth masks are built before the epoch (as the tutorial does) and not timed.
    cached: `samcache.train.trainer.train` on a cache of the same images (all their objects per step:
      objects_per_image >= the most objects on a page, or `--objects-per-image K` on both sides,
      the tutorial taking each page's first K; exact boxes: box_jitter 0). Its epoch
      time comes from metrics.jsonl: prompts of the epoch / the last step's cumulative
      samples_per_s = DataLoader start + all steps; it excludes model loading and the
      validation passes. `train()`'s whole wall time (model load, validation on a 1-image val
      split before and after each epoch, checkpoints, plot) is reported too.
    Both use the same loss (samcache.models.decoder.compute_loss, "dice-bce"); the tutorial side
    applies it to the upscaled original-resolution mask, samcache to the 256x256 low-res mask.
    Embedding the images (samcache embed) is a one-off cost, reported separately.
    Goal: tutorial epoch / cached epoch >= 50.

(b) samples/s (prompts/s) of samcache training reading embeddings from HDF5
    (cache_in_memory="no") against in-memory tensors ("yes"): same cache (tiny model), same
    config (batch 4 images x 2 objects, workers 0: reads on the critical path), runs in ABBA
    order; rate = prompts / summed epoch times (from metrics.jsonl, as in (a)).
    Goal: HDF5 / in-memory >= 0.9.

(c) Peak RSS of `python -m samcache train` in a subprocess (workers 0, batch size 1, one object
    per image: the decoder's activations for 16 prompts alone peak near 2.7 GiB and their
    allocator noise (+-300 MiB) would hide the embeddings) with cache_in_memory="auto" and
    memory_budget_mb below the cache's embeddings, so it streams from HDF5, on a small cache and
    one with 10x the images. Both runs take as many steps (the small cache 10 epochs, the large
    one 1): the heap a training process keeps grows over its first hundred or so steps whatever
    it reads, so only the images differ. Peak RSS is the child's VmHWM from /proc, polled every
    50 ms (ru_maxrss would include the parent's RSS at fork). For contrast the same runs with
    cache_in_memory="yes". Each of the four runs repeats --rss-rounds times, interleaved, and
    the medians count: one run's peak moves by up to +-60 MiB from one run to the next (the
    checkpoint's bytes and the curves' late imports land wherever the heap has room), hence
    the 10x cache. And, without that noise, the reader alone in this process: RSS growth over
    each of three reads of every image's training sample (embedding, prompts, targets): the first
    fills what the reader keeps per image (the checked mask encodings, bounded), later ones
    should add nothing. Goal ("bounded"): the streaming runs' peak RSS grows by less than 25% of
    the growth in embedding bytes (in-memory runs should grow by about 100%).

    python benchmarks/bench_train.py --out bench_train.json      # the real run (~5-8 min)
    python benchmarks/bench_train.py --quick                     # smoke run, tiny model (~1 min)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from samcache.cache.reader import EmbeddingCache
from samcache.config import EmbedConfig, PromptSettings, TrainConfig
from samcache.data import masks
from samcache.data.datasets import load_dataset
from samcache.data.images import read_image
from samcache.data.stamps import generate_stamps
from samcache.embed.pipeline import embed_dataset
from samcache.models.decoder import DecoderOutput, compute_loss
from samcache.models.preprocess import batch_to_model_input, resize_image, transform_boxes
from samcache.models.weights import build_sam, load_sam
from samcache.train.runs import RunFolder
from samcache.train.samples import CacheSamples, SampleSettings
from samcache.train.trainer import train

GOAL_EPOCH_SPEEDUP = 50.0
GOAL_HDF5_RATIO = 0.9
GOAL_RSS_GROWTH_SHARE = 0.25
RSS_CACHE_RATIO = 10  # (c)'s large cache holds 10x the small one's images
LOSS = "dice-bce"
MIB = 2**20
EMBEDDING_BYTES = 256 * 64 * 64 * 2  # one fp16 embedding


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: tiny model everywhere, few images")
    p.add_argument("--model", choices=("vit_b", "tiny"), default=None, help="model of (a) (default vit_b; tiny with --quick)")
    p.add_argument("--images", type=int, default=None, help="train images of (a) (default 4; 2 with --quick)")
    p.add_argument("--cached-epochs", type=int, default=None, help="epochs of the cached run in (a) (default 3)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="embedding precision of (a)'s cache")
    p.add_argument("--objects-per-image", type=int, default=None,
                   help="prompts per image and epoch in (a), both sides (default: all objects of every page)")
    p.add_argument("--io-images", type=int, default=None, help="train images of (b) (default 16; 8 with --quick)")
    p.add_argument("--io-rounds", type=int, default=None, help="ABBA rounds of (b) (default 2: no,yes,yes,no)")
    p.add_argument("--rss-images", type=int, default=None, help="train images of (c)'s small cache (default 20; 4 quick)")
    p.add_argument("--rss-rounds", type=int, default=None,
                   help="runs of each of (c)'s four commands (default 3; 1 quick)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers in (b) (default 0)")
    p.add_argument("--skip", default="", help="comma-separated parts to skip: a,b,c")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", type=Path, default=None, help="keep data/caches/runs here (default: temp, removed)")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    quick = args.quick
    defaults = dict(model="tiny" if quick else "vit_b", images=2 if quick else 4, cached_epochs=2 if quick else 3,
                    io_images=8 if quick else 16, io_rounds=1 if quick else 2, rss_images=4 if quick else 20,
                    rss_rounds=1 if quick else 3)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


# ---------------------------------------------------------------------------------- helpers
def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def make_stamps(out_dir: Path, n_train: int, n_val: int, seed: int):
    """A stamps dataset with exactly n_train train and n_val val pages (no test pages)."""
    n = n_train + n_val
    generate_stamps(out_dir, n, seed, progress=False, fractions=(n_train / n, n_val / n, 0.0))
    dataset = load_dataset(out_dir)
    counts = {s: len(dataset.split(s)) for s in ("train", "val", "test")}
    assert counts == {"train": n_train, "val": n_val, "test": 0}, counts
    return dataset


def epoch_seconds(run_dir: Path) -> list[tuple[int, float]]:
    """(prompts, seconds) per epoch from metrics.jsonl step records (DataLoader start + steps, no validation)."""
    last: dict[int, dict] = {}
    prompts: dict[int, int] = {}
    for record in RunFolder(run_dir).metrics():
        if record["type"] == "step":
            last[record["epoch"]] = record
            prompts[record["epoch"]] = prompts.get(record["epoch"], 0) + record["prompts"]
    return [(prompts[e], prompts[e] / last[e]["samples_per_s"]) for e in sorted(last)]


def dir_mib(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / MIB


def model_files(model: str, workdir: Path, seed: int) -> tuple[str, str | None]:
    """(model_type, checkpoint): vit_b gets random weights saved to a file; tiny needs none."""
    if model == "tiny":
        return "tiny", None
    path = workdir / "vit_b_random.pth"
    if not path.exists():
        torch.manual_seed(seed)
        torch.save(build_sam("vit_b").state_dict(), path)
    return "vit_b", str(path)


def embed(dataset, cache_dir: Path, model_type: str, checkpoint, precision: str = "fp32") -> float:
    start = time.perf_counter()
    embed_dataset(dataset, cache_dir, EmbedConfig(model_type=model_type, checkpoint=checkpoint, workers=0,
                                                  batch_size=1, precision=precision, progress=False))
    return time.perf_counter() - start


# ------------------------------------------------------------------------- (a) epoch times
def tutorial_epoch(sam, prepared: list[dict], lr: float) -> dict:
    """One epoch of the tutorial loop; returns its wall time and the encoder's share."""
    optimizer = torch.optim.Adam(sam.mask_decoder.parameters(), lr=lr)
    sam.mask_decoder.train()
    encoder_s = boxes = 0
    start = time.perf_counter()
    for item in prepared:
        t0 = time.perf_counter()
        with torch.no_grad():
            image_embedding = sam.image_encoder(item["input"])
        encoder_s += time.perf_counter() - t0
        for box, gt in zip(item["boxes"], item["gt"]):
            with torch.no_grad():
                sparse, dense = sam.prompt_encoder(points=None, boxes=box[None, :], masks=None)
            low_res, iou_pred = sam.mask_decoder(
                image_embeddings=image_embedding, image_pe=sam.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=False,
            )
            upscaled = sam.postprocess_masks(low_res, item["input_size"], item["original_size"])
            loss = compute_loss(DecoderOutput(upscaled, iou_pred), gt[None], torch.ones(1, dtype=torch.bool), LOSS)
            optimizer.zero_grad()
            loss.total.backward()
            optimizer.step()
            boxes += 1
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "encoder_seconds": encoder_s, "boxes": boxes}


def prepare_tutorial(records, objects_per_image: int) -> list[dict]:
    """The tutorial's precomputed inputs: preprocessed images, transformed boxes, GT masks
    (the first `objects_per_image` objects of each page)."""
    prepared = []
    for record in records:
        objects = record.objects[:objects_per_image]
        image = read_image(record.path)
        original_size = image.shape[:2]
        resized = resize_image(image)
        boxes = transform_boxes(np.array([o.box for o in objects]), original_size)
        prepared.append({
            "input": batch_to_model_input([torch.from_numpy(resized)]),
            "input_size": tuple(resized.shape[:2]),
            "original_size": tuple(original_size),
            "boxes": torch.as_tensor(boxes, dtype=torch.float32),
            "gt": [torch.from_numpy(masks.decode(o.rle).astype(np.float32)) for o in objects],
        })
    return prepared


def bench_epoch(args, workdir: Path) -> dict:
    log(f"(a) stamps: {args.images} train + 1 val page")
    dataset = make_stamps(workdir / "stamps_a", args.images, 1, args.seed)
    model_type, checkpoint = model_files(args.model, workdir, args.seed)
    records = dataset.split("train")
    max_objects = max(len(r.objects) for r in records)
    per_image = args.objects_per_image or max_objects

    log(f"(a) embedding {len(dataset.images)} pages with {model_type} ({args.precision}), one-off")
    cache_dir = workdir / "cache_a"
    embed_s = embed(dataset, cache_dir, model_type, checkpoint, args.precision)

    log(f"(a) cached: train() {args.cached_epochs} epochs, cache in memory, {per_image} objects per image")
    config = TrainConfig(epochs=args.cached_epochs, batch_size=4, objects_per_image=per_image, lr=1e-4,
                         loss=LOSS, prompts=PromptSettings(box_jitter=0.0), workers=0, cache_in_memory="yes", save_every=None,
                         checkpoint=checkpoint, val_split="val", seed=args.seed)
    start = time.perf_counter()
    train(cache_dir, workdir / "run_a", config, progress=False)
    train_wall = time.perf_counter() - start
    epochs = epoch_seconds(workdir / "run_a")
    cached_epoch = statistics.median(s for _, s in epochs)

    log("(a) tutorial loop: loading the same weights, preprocessing (untimed), one epoch (timed)")
    sam = load_sam(model_type, checkpoint).sam
    prepared = prepare_tutorial(records, per_image)
    tutorial = tutorial_epoch(sam, prepared, lr=1e-4)
    del sam, prepared

    return {
        "model": model_type, "train_images": len(records), "objects": sum(len(r.objects) for r in records),
        "objects_per_image_max": max_objects, "objects_per_image": per_image,
        "prompts_per_epoch": sum(min(len(r.objects), per_image) for r in records), "embed_seconds_all_pages": embed_s,
        "embed_pages": len(dataset.images), "embed_precision": args.precision,
        "tutorial_epoch_seconds": tutorial["seconds"], "tutorial_encoder_seconds": tutorial["encoder_seconds"],
        "tutorial_boxes": tutorial["boxes"],
        "cached_epoch_seconds": cached_epoch, "cached_epoch_seconds_each": [s for _, s in epochs],
        "cached_epoch_prompts": [n for n, _ in epochs],
        "cached_train_wall_seconds": train_wall, "cached_train_epochs": args.cached_epochs,
        "speedup": tutorial["seconds"] / cached_epoch,
        "speedup_vs_train_wall_per_epoch": tutorial["seconds"] / (train_wall / args.cached_epochs),
        "goal": GOAL_EPOCH_SPEEDUP,
        "goal_met": tutorial["seconds"] / cached_epoch >= GOAL_EPOCH_SPEEDUP,
    }


# ---------------------------------------------------------------------- (b) HDF5 vs memory
def bench_io(args, cache_dir: Path, workdir: Path) -> dict:
    order = []
    for r in range(args.io_rounds):
        order += ["no", "yes"] if r % 2 == 0 else ["yes", "no"]
    totals = {"no": [0, 0.0], "yes": [0, 0.0]}
    per_run = []
    for i, mode in enumerate(order):
        run_dir = workdir / f"run_b{i}_{mode}"
        config = TrainConfig(epochs=2, batch_size=4, objects_per_image=2, lr=1e-3, loss=LOSS, workers=args.workers,
                             cache_in_memory=mode, save_every=None, val_split="val", seed=args.seed)
        train(cache_dir, run_dir, config, progress=False)
        held = RunFolder(run_dir).info()["embeddings_in_memory"]
        assert held == (mode == "yes"), (mode, held)
        epochs = epoch_seconds(run_dir)
        prompts, seconds = sum(n for n, _ in epochs), sum(s for _, s in epochs)
        totals[mode][0] += prompts
        totals[mode][1] += seconds
        per_run.append({"cache_in_memory": mode, "prompts": prompts, "seconds": seconds,
                        "samples_per_s": prompts / seconds})
        log(f"(b) run {i + 1}/{len(order)} cache_in_memory={mode}: {prompts / seconds:.1f} samples/s")
    hdf5 = totals["no"][0] / totals["no"][1]
    memory = totals["yes"][0] / totals["yes"][1]
    return {"model": "tiny", "workers": args.workers, "batch_size": 4, "objects_per_image": 2, "order": order,
            "runs": per_run, "hdf5_samples_per_s": hdf5, "memory_samples_per_s": memory,
            "ratio": hdf5 / memory, "goal": GOAL_HDF5_RATIO, "goal_met": hdf5 / memory >= GOAL_HDF5_RATIO}


# ---------------------------------------------------------------------------- (c) peak RSS
def status_mib(pid: int | str, field: str) -> float:
    """A memory field of /proc/PID/status ("VmRSS", "VmHWM": kB there) in MiB."""
    return int(Path(f"/proc/{pid}/status").read_text().split(f"{field}:")[1].split()[0]) / 1024


def train_subprocess(cache_dir: Path, run_dir: Path, mode: str, budget_mb: int, workdir: Path, epochs: int) -> dict:
    config_file = workdir / f"{run_dir.name}.yaml"
    config_file.write_text(f"memory_budget_mb: {budget_mb}\nsave_every: null\nloss: {LOSS}\n")
    command = [sys.executable, "-m", "samcache", "train", str(cache_dir), "--out", str(run_dir),
               "--config", str(config_file), "--epochs", str(epochs), "--batch-size", "1",
               "--objects-per-image", "1", "--workers", "0", "--cache-in-memory", mode]
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    # The child's own VmHWM (reset at exec), polled: ru_maxrss from wait4/RUSAGE_CHILDREN is no use
    # here, as Linux carries the parent's high-water mark over fork+exec into the child's maxrss.
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.append(process.stdout.read()), daemon=True)
    reader.start()
    peak_mib = 0.0
    while process.poll() is None:
        try:
            peak_mib = max(peak_mib, status_mib(process.pid, "VmHWM"))
        except (OSError, IndexError, ValueError):
            pass
        time.sleep(0.05)
    reader.join()
    output = "".join(output)
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({process.returncode}):\n{output[-3000:]}")
    held = RunFolder(run_dir).info()["embeddings_in_memory"]
    return {"cache_in_memory": mode, "held_in_memory": held, "peak_rss_mib": peak_mib,
            "seconds": time.perf_counter() - start}


def reader_rss_growth(cache_dir: Path, passes: int) -> dict:
    """This process's RSS growth over each of `passes` reads of every image's training sample, as
    the training DataLoader reads them from a streaming cache (after one read to open the shards)."""
    cache = EmbeddingCache(cache_dir)
    samples = CacheSamples(cache, SampleSettings.training(objects_per_image=1, prompts=PromptSettings(), seed=0))
    samples[(0, 0)]
    growth, before = [], status_mib("self", "VmRSS")
    for epoch in range(passes):
        for index in range(len(cache)):
            samples[(epoch, index)]
        growth.append(status_mib("self", "VmRSS") - before)
        before += growth[-1]
    return {"images": len(cache), "passes": passes, "rss_growth_per_pass_mib": growth,
            "embeddings_mib": len(cache) * EMBEDDING_BYTES / MIB}


def bench_rss(args, caches: dict, workdir: Path) -> dict:
    budget_mb = 1  # below any cache's embeddings: "auto" must stream from HDF5
    # As many steps on both caches: the heap a training process keeps (devices.keep_freed_memory)
    # settles over its first hundred or so steps, which 1 epoch of the small cache would not reach.
    n_small, n_large = caches["small"][1], caches["large"][1]
    epochs = {"small": max(1, n_large // n_small), "large": 1}
    rows = {f"{size}_{mode}": {"images": n_images, "epochs": epochs[size], "peak_rss_runs_mib": [],
                               "embeddings_mib": n_images * EMBEDDING_BYTES / MIB, "cache_mib": dir_mib(cache_dir)}
            for mode in ("auto", "yes") for size, (cache_dir, n_images) in caches.items()}
    for round_index in range(args.rss_rounds):
        for mode in ("auto", "yes"):
            for size, (cache_dir, n_images) in caches.items():
                key = f"{size}_{mode}"
                run_dir = workdir / f"run_c_{key}_{round_index}"
                shutil.rmtree(run_dir, ignore_errors=True)
                run = train_subprocess(cache_dir, run_dir, mode, budget_mb, workdir, epochs[size])
                rows[key]["peak_rss_runs_mib"].append(run.pop("peak_rss_mib"))
                rows[key].update(run)
                log(f"(c) round {round_index + 1}: {size} cache ({n_images} images, {rows[key]['cache_mib']:.0f} MiB) "
                    f"cache_in_memory={mode} (held: {run['held_in_memory']}): "
                    f"peak RSS {rows[key]['peak_rss_runs_mib'][-1]:.0f} MiB")
    for row in rows.values():
        row["peak_rss_mib"] = statistics.median(row["peak_rss_runs_mib"])
    reader = reader_rss_growth(caches["large"][0], passes=3)
    growth = ", ".join(f"{g:+.1f}" for g in reader["rss_growth_per_pass_mib"])
    log(f"(c) the reader alone: RSS {growth} MiB over {reader['passes']} reads of {reader['images']} images' "
        f"samples ({reader['embeddings_mib']:.0f} MiB of embeddings each)")
    assert not rows["small_auto"]["held_in_memory"] and not rows["large_auto"]["held_in_memory"]
    embeddings_growth = rows["large_auto"]["embeddings_mib"] - rows["small_auto"]["embeddings_mib"]
    stream_growth = rows["large_auto"]["peak_rss_mib"] - rows["small_auto"]["peak_rss_mib"]
    memory_growth = rows["large_yes"]["peak_rss_mib"] - rows["small_yes"]["peak_rss_mib"]
    return {"model": "tiny", "memory_budget_mb": budget_mb, "batch_size": 1, "objects_per_image": 1, "runs": rows,
            "rounds": args.rss_rounds, "reader_alone": reader,
            "embeddings_growth_mib": embeddings_growth, "streaming_rss_growth_mib": stream_growth,
            "in_memory_rss_growth_mib": memory_growth,
            "streaming_growth_share": stream_growth / embeddings_growth,
            "in_memory_growth_share": memory_growth / embeddings_growth,
            "goal": f"streaming growth < {GOAL_RSS_GROWTH_SHARE:.0%} of embedding growth",
            "goal_met": stream_growth < GOAL_RSS_GROWTH_SHARE * embeddings_growth}


# --------------------------------------------------------------------------------- report
def table(results: dict) -> str:
    lines = [f"{'measure':58} {'value':>14}  goal", "-" * 90]

    def row(name, value, goal=""):
        lines.append(f"{name:58} {value:>14}  {goal}")

    yes_no = lambda met: "MET" if met else "NOT MET"  # noqa: E731
    if "a" in results:
        a = results["a"]
        row("(a) model / train images / objects", f"{a['model']} / {a['train_images']} / {a['objects']}")
        row("(a) prompts per epoch (objects per image)",
            f"{a.get('prompts_per_epoch', a['objects'])} ({a.get('objects_per_image', 'all')})")
        row("(a) embedding one-off (all pages incl. val), s", f"{a['embed_seconds_all_pages']:.1f}")
        row("(a) tutorial epoch, s", f"{a['tutorial_epoch_seconds']:.2f}")
        row("(a)   of which image encoder, s", f"{a['tutorial_encoder_seconds']:.2f}")
        row("(a) cached epoch (median of epochs, no validation), s", f"{a['cached_epoch_seconds']:.3f}")
        row("(a) cached train() wall per epoch (load+val+ckpt), s",
            f"{a['cached_train_wall_seconds'] / a['cached_train_epochs']:.2f}")
        row("(a) speedup tutorial / cached epoch", f"{a['speedup']:.0f}x",
            f">= {a['goal']:.0f}x: {yes_no(a['goal_met'])}")
        row("(a) speedup tutorial / train() wall per epoch", f"{a['speedup_vs_train_wall_per_epoch']:.1f}x")
    if "b" in results:
        b = results["b"]
        row("(b) HDF5 (cache_in_memory=no), samples/s", f"{b['hdf5_samples_per_s']:.1f}")
        row("(b) in-memory (cache_in_memory=yes), samples/s", f"{b['memory_samples_per_s']:.1f}")
        row("(b) ratio HDF5 / in-memory", f"{b['ratio']:.3f}", f">= {b['goal']}: {yes_no(b['goal_met'])}")
    if "c" in results:
        c = results["c"]
        for key, r in c["runs"].items():
            mode = "stream (auto)" if r["cache_in_memory"] == "auto" else "in memory"
            runs = ", ".join(f"{v:.0f}" for v in r.get("peak_rss_runs_mib", []))
            row(f"(c) {r['images']} imgs x {r.get('epochs', 1)} ep, cache {r['cache_mib']:.0f} MiB "
                f"(emb {r['embeddings_mib']:.0f}), {mode}: peak RSS",
                f"{r['peak_rss_mib']:.0f} MiB", f"median of {runs}" if runs else "")
        row("(c) streaming RSS growth / embedding growth",
            f"{c['streaming_rss_growth_mib']:.0f}/{c['embeddings_growth_mib']:.0f} MiB",
            f"< {GOAL_RSS_GROWTH_SHARE:.0%}: {yes_no(c['goal_met'])} ({c['streaming_growth_share']:.0%})")
        reader = c["reader_alone"]
        row(f"(c) the reader alone: RSS growth per read of {reader['images']} images, MiB",
            ", ".join(f"{g:+.1f}" for g in reader["rss_growth_per_pass_mib"]),
            f"({reader['embeddings_mib']:.0f} MiB of embeddings a read)")
        row("(c) in-memory RSS growth / embedding growth (contrast)",
            f"{c['in_memory_rss_growth_mib']:.0f}/{c['embeddings_growth_mib']:.0f} MiB", f"({c['in_memory_growth_share']:.0%})")
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench_train_"))
    workdir.mkdir(parents=True, exist_ok=True)
    results: dict = {"machine": {"platform": platform.platform(), "python": platform.python_version(),
                                 "torch": torch.__version__, "cpus": os.cpu_count(),
                                 "torch_threads": torch.get_num_threads(),
                                 "loadavg_start": os.getloadavg()},
                     "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
    started = time.perf_counter()
    try:
        if "a" not in skip:
            results["a"] = bench_epoch(args, workdir)
        if not {"b", "c"} <= skip:
            n_small = args.rss_images
            n_large = max(RSS_CACHE_RATIO * n_small, args.io_images)
            log(f"(b/c) stamps: {n_large} train + 1 val pages; tiny caches of {n_small} and {n_large} train images")
            dataset = make_stamps(workdir / "stamps_bc", n_large, 1, args.seed)
            train_records, val_records = dataset.split("train"), dataset.split("val")
            small = dataclasses.replace(dataset, images=train_records[:n_small] + val_records)
            embed(dataset, workdir / "cache_large", "tiny", None)
            embed(small, workdir / "cache_small", "tiny", None)
            io_cache = workdir / "cache_large"
            if args.io_images != n_large:
                io_dataset = dataclasses.replace(dataset, images=train_records[:args.io_images] + val_records)
                io_cache = workdir / "cache_io"
                embed(io_dataset, io_cache, "tiny", None)
            if "b" not in skip:
                results["b"] = bench_io(args, io_cache, workdir)
                results["b"]["train_images"] = args.io_images
            if "c" not in skip:
                results["c"] = bench_rss(args, {"small": (workdir / "cache_small", n_small),
                                                "large": (workdir / "cache_large", n_large)}, workdir)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    results["machine"]["loadavg_end"] = os.getloadavg()
    results["total_seconds"] = time.perf_counter() - started
    print()
    print(table(results))
    print(f"\nload average start {results['machine']['loadavg_start']}, end {results['machine']['loadavg_end']}; "
          f"total {results['total_seconds']:.0f} s")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2, default=float))
        print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
