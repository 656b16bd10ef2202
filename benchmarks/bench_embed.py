"""Benchmark: samcache's embed stage against a plain `SamPredictor.set_image` loop.

Both sides embed the same synthetic stamp pages with the same model object (same weights) in
one process, so their ratio is meaningful even though absolute times on a shared machine are
not. To keep either side from being favoured by when it ran, the images are split into rounds
of `--chunk` images and every method embeds each round's images, in ABBA order:

    warm-up:  one image through each method (untimed)
    round 0:  loop fp32 -> embed fp32 -> embed bf16 [-> loop bf16]
    round 1:  [loop bf16 ->] embed bf16 -> embed fp32 -> loop fp32
    round 2:  as round 0, ...

A method's images/s is its images over its summed time; the spread of its per-round rates is
the noise check (other people's jobs on a 2-core machine show up there, and as a CPU
utilisation well below 2).

What each timing includes:

- loop: per image `cv2.imread` + `cvtColor` + `SamPredictor.set_image` (resize, normalize,
  pad, encoder forward) in fp32, the way the Segment Anything tutorial does it. The features
  stay in memory; nothing is written.
- embed: one `samcache.embed.pipeline.embed_dataset` call per round into the same cache folder (one
  per precision): planning, DataLoader workers (SHA-256, decode, resize), the encoder on
  batches, fp16 conversion, HDF5 shard write + fsync + rename, reopening the cache.
- Model building/loading is excluded from BOTH sides: the model is loaded once with
  `samcache.models.weights.load_sam` (`model_load_s` in the results) and `embed_dataset`'s own
  `load_sam` is pointed at that already-loaded model.
- "enc img/s": forward hooks on the image encoder time `image_encoder.forward` alone.

Agreement: samcache's cached fp16 embeddings (read back with `EmbeddingCache`) against the fp32
loop's `predictor.features` of the same image: per-image cosine similarity of the flattened
256x64x64 embedding (the minimum over images is reported) and the max absolute error.

Goal: samcache's images/s >= 1.5x the fp32 loop's at the fastest precision whose embeddings
agree with the fp32 loop (min cosine >= 0.999).

    python benchmarks/bench_embed.py                            # vit_b, random weights, 8 images
    python benchmarks/bench_embed.py --model tiny --images 4    # smoke run, seconds
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import cv2
import numpy as np
import torch

import samcache.embed.pipeline as embed_module
from samcache.cache.reader import EmbeddingCache
from samcache.config import EmbedConfig
from samcache.data.datasets import load_dataset
from samcache.data.images import read_image
from samcache.data.stamps import generate_stamps
from samcache.embed.pipeline import embed_dataset
from samcache.fileio import sha256_file
from samcache.models.preprocess import resize_image
from samcache.models.weights import build_sam, load_sam

COSINE_THRESHOLD = 0.999
GOAL_RATIO = 1.5
REFERENCE = "loop fp32"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=8, help="pages each method embeds (default 8)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="samcache's encoder batch size (default: EmbedConfig's default for the CPU)")
    p.add_argument("--workers", type=int, default=2, help="samcache's DataLoader workers (default 2)")
    p.add_argument("--chunk", type=int, default=None,
                   help="images per interleaved round (default: the batch size, at least 2; 4 without --batch-size)")
    p.add_argument("--model", choices=("vit_b", "tiny"), default="vit_b",
                   help="vit_b with random weights saved as a checkpoint (default), or samcache's tiny model")
    p.add_argument("--precisions", default="fp32,bf16", help="samcache precisions to run (default fp32,bf16)")
    p.add_argument("--loop-bf16", action="store_true",
                   help="also time the loop under bf16 autocast, to separate samcache's pipeline from bf16")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads in the main process (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0, help="seed of the pages and of the random weights")
    p.add_argument("--workdir", type=Path, default=None,
                   help="data, checkpoint and caches go here (default: a temporary folder, removed after)")
    p.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# measuring


class EncoderTimer:
    """Accumulates the wall time spent inside `image_encoder.forward` (forward hooks)."""

    def __init__(self, module: torch.nn.Module):
        self.seconds, self.calls, self._start = 0.0, 0, 0.0
        module.register_forward_pre_hook(self._pre)
        module.register_forward_hook(self._post)

    def _pre(self, module, inputs):
        self._start = time.perf_counter()

    def _post(self, module, inputs, output):
        self.seconds += time.perf_counter() - self._start
        self.calls += 1

    def reset(self) -> None:
        self.seconds, self.calls = 0.0, 0


def cpu_times() -> tuple[float, float]:
    """(user, system) CPU seconds of this process and its reaped children (DataLoader workers)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + kids.ru_utime, me.ru_stime + kids.ru_stime


class Measure:
    """Wall, encoder and CPU time of one timed block."""

    def __init__(self, timer: EncoderTimer):
        self.timer = timer

    def __enter__(self):
        self.timer.reset()
        self.cpu0 = cpu_times()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
        user, system = (b - a for a, b in zip(self.cpu0, cpu_times()))
        self.user, self.system = user, system
        self.encoder_seconds = self.timer.seconds
        self.load_avg = list(os.getloadavg())
        return False


def loop_round(records, predictor, timer: EncoderTimer, *, bf16: bool) -> tuple[Measure, dict[str, np.ndarray]]:
    """The tutorial loop: imread, BGR->RGB, set_image, take the features."""
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext()
    kept = {}
    with Measure(timer) as m:
        for record in records:
            img = cv2.cvtColor(cv2.imread(str(record.path)), cv2.COLOR_BGR2RGB)
            with autocast:
                predictor.set_image(img)
            kept[record.name] = predictor.features
    return m, {name: f[0].float().numpy() for name, f in kept.items()}


def embed_round(dataset, cache_dir: Path, config: EmbedConfig, timer: EncoderTimer):
    with Measure(timer) as m:
        summary = embed_dataset(dataset, cache_dir, config)
    if summary.embedded != len(dataset.images) or summary.failed:
        raise SystemExit(f"embed did not embed every image: {summary.line()}")
    return m, summary


def decode_cost(records) -> float:
    """Seconds per image of what samcache's DataLoader workers do (hash, decode, resize), here."""
    start = time.perf_counter()
    for record in records:
        sha256_file(record.path)
        resize_image(read_image(record.path))
    return (time.perf_counter() - start) / len(records)


def compare(reference: dict[str, np.ndarray], get) -> dict:
    """Per-image cosine (flattened, float64) and max abs error of `get(name)` against the reference."""
    cosines, max_abs = [], 0.0
    for name, ref in reference.items():
        a = ref.astype(np.float64).ravel()
        b = np.asarray(get(name), dtype=np.float64).ravel()
        cosines.append(float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))))
        max_abs = max(max_abs, float(np.abs(a - b).max()))
    return {"min_cosine": min(cosines), "mean_cosine": float(np.mean(cosines)), "max_abs_err": max_abs}


def cached_getter(cache: EmbeddingCache):
    def get(name):
        index = cache.index_of(name)
        if index is None:
            raise SystemExit(f"{name} is missing from {cache.cache_dir}")
        return cache.embedding(index).astype(np.float32)

    return get


# ---------------------------------------------------------------------------------------------
# the benchmark


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def machine() -> dict:
    info = {"cpu": platform.processor() or "unknown", "flags": []}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                info["flags"] = sorted({f for f in line.split(":", 1)[1].split() if f.startswith(("avx512_bf16", "amx"))})
                break
    except OSError:
        pass
    return {**info, "cores": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "python": platform.python_version()}


def benchmark(args, precisions: list[str], workdir: Path) -> dict:
    from segment_anything import SamPredictor

    # ---- setup (untimed) ----
    data_dir = workdir / "stamps"
    dataset = load_dataset(data_dir) if (data_dir / "train.json").exists() else None
    if dataset is None or len(dataset.images) < args.images:
        generate_stamps(data_dir, args.images, seed=args.seed, progress=False)  # page k depends on (seed, k) only
        dataset = load_dataset(data_dir)
    records = sorted(dataset.images, key=lambda r: r.name)[: args.images]
    chunk = args.chunk or max(args.batch_size or 4, 2)
    batch_label = args.batch_size if args.batch_size else f"samcache default ({EmbedConfig().batch_size})"
    rounds = [records[i:i + chunk] for i in range(0, len(records), chunk)]
    subset = lambda recs: dataclasses.replace(dataset, images=list(recs), problems=[])  # noqa: E731
    sizes = sorted({(r.height, r.width) for r in records})

    checkpoint = None
    if args.model != "tiny":
        checkpoint = workdir / f"{args.model}_random_seed{args.seed}.pth"
        if not checkpoint.exists():
            torch.manual_seed(args.seed)
            torch.save(build_sam(args.model).state_dict(), checkpoint)
    t0 = time.perf_counter()
    loaded = load_sam(args.model, checkpoint=checkpoint)
    model_load_s = time.perf_counter() - t0

    # embed_dataset loads its model itself; hand it the model loaded above, so that model loading
    # is excluded from both sides and both sides run the very same weights.
    def preloaded(model_type, checkpoint_arg=None, **kwargs):
        assert model_type == args.model and (checkpoint_arg is None) == (checkpoint is None)
        return loaded

    embed_module.load_sam = preloaded
    sam = loaded.sam.eval()
    timer = EncoderTimer(sam.image_encoder)
    predictor = SamPredictor(sam)

    def config(precision: str) -> EmbedConfig:
        batch = {"batch_size": args.batch_size} if args.batch_size else {}
        return EmbedConfig(model_type=args.model, checkpoint=checkpoint, precision=precision, workers=args.workers,
                           device="cpu", progress=False, **batch)

    methods = [REFERENCE] + [f"embed {p}" for p in precisions] + (["loop bf16"] if args.loop_bf16 else [])
    log(f"{args.model}, {len(records)} images {sizes}, {len(rounds)} rounds of {chunk}, batch {batch_label}, "
        f"workers {args.workers}, torch threads {torch.get_num_threads()}, model load {model_load_s:.1f} s")

    def run(method: str, recs, cache_dir: Path):
        kind, precision = method.split()
        if kind == "loop":
            return loop_round(recs, predictor, timer, bf16=precision == "bf16")
        return embed_round(subset(recs), cache_dir, config(precision), timer)

    # ---- warm-up (untimed): one image through each method ----
    for method in methods:
        t0 = time.perf_counter()
        warm_dir = workdir / f"warm_{method.replace(' ', '_')}"
        shutil.rmtree(warm_dir, ignore_errors=True)
        run(method, records[:1], warm_dir)
        log(f"warm-up {method}: {time.perf_counter() - t0:.1f} s")

    # ---- timed rounds, ABBA ----
    caches = {m: workdir / f"cache_{m.replace(' ', '_')}" for m in methods}
    for d in caches.values():
        shutil.rmtree(d, ignore_errors=True)
    per_round: dict[str, list[dict]] = {m: [] for m in methods}
    features: dict[str, dict[str, np.ndarray]] = {m: {} for m in methods if m.startswith("loop")}
    bytes_per_image: dict[str, float] = {}
    for k, recs in enumerate(rounds):
        for method in (methods if k % 2 == 0 else methods[::-1]):
            m, out = run(method, recs, caches[method])
            if method in features:
                features[method].update(out)
            else:
                bytes_per_image[method] = out.bytes_on_disk / max(out.images_in_cache, 1)
            per_round[method].append({
                "round": k, "images": len(recs), "seconds": m.seconds, "encoder_seconds": m.encoder_seconds,
                "user_s": m.user, "system_s": m.system, "load_avg_after": [round(x, 2) for x in m.load_avg],
            })
            log(f"round {k} {method}: {m.seconds:.1f} s, {len(recs) / m.seconds:.4f} images/s, "
                f"cpu {(m.user + m.system) / m.seconds:.2f}, sys {m.system / max(m.user + m.system, 1e-9):.0%}")

    # ---- aggregate ----
    reference = features[REFERENCE]
    results: dict[str, dict] = {}
    for method in methods:
        rs = per_round[method]
        images = sum(r["images"] for r in rs)
        seconds = sum(r["seconds"] for r in rs)
        enc = sum(r["encoder_seconds"] for r in rs)
        user, system = sum(r["user_s"] for r in rs), sum(r["system_s"] for r in rs)
        rates = [r["images"] / r["seconds"] for r in rs]
        results[method] = {
            "images": images, "seconds": seconds, "images_per_s": images / seconds,
            "encoder_seconds": enc, "encoder_images_per_s": images / enc,
            "round_images_per_s": rates,
            "round_spread": (max(rates) - min(rates)) / statistics.mean(rates),
            "cpu_util": (user + system) / seconds, "system_share": system / max(user + system, 1e-9),
            "rounds": rs,
        }
    for method in methods:
        r = results[method]
        r["ratio_vs_loop"] = r["images_per_s"] / results[REFERENCE]["images_per_s"]
        r["encoder_ratio_vs_loop"] = r["encoder_images_per_s"] / results[REFERENCE]["encoder_images_per_s"]
        if method == REFERENCE:
            continue
        if method in features:
            r.update(compare(reference, features[method].__getitem__))
        else:
            cache = EmbeddingCache(caches[method])
            r.update(compare(reference, cached_getter(cache)))
            r["bytes_per_image"] = cache.bytes_on_disk() / len(cache)
            r["images_in_cache"] = len(cache)
            cache.close()

    agreeing = [p for p in precisions if results[f"embed {p}"]["min_cosine"] >= COSINE_THRESHOLD]
    fastest = max(agreeing, key=lambda p: results[f"embed {p}"]["images_per_s"]) if agreeing else None
    best = results[f"embed {fastest}"] if fastest else None
    goal = {
        "threshold_cosine": COSINE_THRESHOLD, "goal_ratio": GOAL_RATIO, "fastest_agreeing_precision": fastest,
        "ratio": best["ratio_vs_loop"] if best else None,
        "met": bool(best and best["ratio_vs_loop"] >= GOAL_RATIO),
        # conservative: samcache's slowest round against the loop's fastest round
        "worst_case_ratio": (min(best["round_images_per_s"]) / max(results[REFERENCE]["round_images_per_s"])
                             if best else None),
    }
    return {
        "machine": machine(),
        "config": {"model": args.model, "images": len(records), "image_sizes": sizes, "rounds": len(rounds),
                   "chunk": chunk, "batch_size": batch_label, "workers": args.workers,
                   "precisions": precisions, "seed": args.seed, "argv": sys.argv[1:]},
        "model_load_s": model_load_s,
        "decode_s_per_image": decode_cost(records),
        "fp16_storage_only": compare(reference, lambda n: reference[n].astype(np.float16).astype(np.float32)),
        "reference_max_abs": max(float(np.abs(f).max()) for f in reference.values()),
        "methods": results,
        "goal": goal,
    }


# ---------------------------------------------------------------------------------------------
# report

COLUMNS = [("method", "<17", None), ("precision", "<9", None), ("images/s", ">9", ".4f"), ("vs loop", ">7", ".2f"),
           ("enc img/s", ">9", ".4f"), ("enc vs loop", ">11", ".2f"), ("min cos", ">9", ".6f"),
           ("max abs err", ">11", ".2e"), ("bytes/image", ">11", ",.0f"), ("rounds spread", ">13", ".0%"),
           ("cpu util", ">8", ".2f"), ("sys %", ">5", ".0%")]


def table_rows(r: dict) -> list[list]:
    rows = []
    for method, m in r["methods"].items():
        kind, precision = method.split()
        rows.append([
            "SamPredictor loop" if kind == "loop" else "samcache embed", precision, m["images_per_s"],
            m["ratio_vs_loop"], m["encoder_images_per_s"], m["encoder_ratio_vs_loop"],
            m.get("min_cosine", "(ref)"), m.get("max_abs_err", "(ref)"), m.get("bytes_per_image", "in memory"),
            m["round_spread"], m["cpu_util"], m["system_share"],
        ])
    return rows


def print_table(r: dict) -> None:
    def row(values) -> str:
        return " ".join(format(format(v, fmt) if fmt and isinstance(v, (int, float)) else str(v), align)
                        for v, (_, align, fmt) in zip(values, COLUMNS))

    c, mach = r["config"], r["machine"]
    print()
    print(f"model {c['model']}, {c['images']} images in {c['rounds']} ABBA rounds of {c['chunk']}, batch {c['batch_size']}, "
          f"workers {c['workers']}, torch {mach['torch']} ({mach['torch_threads']} threads), {mach['cpu']} x{mach['cores']}")
    head = row([name for name, _, _ in COLUMNS])
    print(head)
    print("-" * len(head))
    for values in table_rows(r):
        print(row(values))
    f16 = r["fp16_storage_only"]
    print(f"fp16 rounding alone of the loop's fp32 features: min cos {f16['min_cosine']:.7f}, max abs err "
          f"{f16['max_abs_err']:.2e} (features' max |x| {r['reference_max_abs']:.2f}); model load, excluded from "
          f"both sides: {r['model_load_s']:.1f} s; hash+decode+resize: {r['decode_s_per_image']:.3f} s/image")
    noisy = [m for m, v in r["methods"].items() if v["round_spread"] > 0.15 or v["cpu_util"] < 0.8 * mach["torch_threads"]]
    if noisy:
        print(f"WARNING: {', '.join(noisy)}: rounds differ by > 15% or CPU utilisation < 80% of the threads: "
              "something else was using the CPU; the ratios are less reliable, rerun on a quiet machine")
    g = r["goal"]
    if g["fastest_agreeing_precision"] is None:
        print(f"GOAL NOT MET: no samcache precision agrees with the fp32 loop (min cosine >= {g['threshold_cosine']})")
    else:
        print(f"GOAL {'MET' if g['met'] else 'NOT MET'}: the fastest agreeing precision, "
              f"{g['fastest_agreeing_precision']} (min cos >= {g['threshold_cosine']}), runs at {g['ratio']:.2f}x the "
              f"fp32 loop's images/s (goal >= {g['goal_ratio']}x); worst round vs best loop round: "
              f"{g['worst_case_ratio']:.2f}x")
    print(f"total benchmark time {r['total_seconds']:.0f} s")


def main(argv=None) -> int:
    args = parse_args(argv)
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    if args.threads:
        torch.set_num_threads(args.threads)
    own_workdir = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="bench_embed_")) if own_workdir else args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    try:
        results = benchmark(args, precisions, workdir)
    finally:
        if own_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    results["total_seconds"] = time.perf_counter() - start
    print_table(results)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        print(f"results written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
