"""Benchmark: large caches. How long `samcache info` takes, and how much memory, on a generated
cache of N images; and how long `samcache train` takes to its first step.

The cache is generated in the documented shard format (docs/cache-format.md) from one real
tiny-model cache of a few stamps pages: its header, and for every generated image one of its
real pages' tables (objects, boxes, RLEs, preview JPEG) under a new name. The embeddings
dataset has the real shape and chunking but no chunk is written (HDF5 reads them as zeros), so
a 100k-image cache takes disk for its tables and previews only. Shards hold 64 images, as
`samcache embed` writes them by default; splits are 70/15/15 %.

Each figure is a whole command in a fresh process (`python -m samcache ...`): wall time and the
peak resident memory of that process (ru_maxrss of the child), taken twice:
  - "without index": index.npz removed, so every shard's tables are read (what a cache
    written before the index, or a reader of shards no index covers, pays);
  - "with index": after writing index.npz (cache.refresh_index, what `samcache embed` does
    at the end of every run): the normal case.
Train: `samcache train CACHE --out RUN --epochs 1 --workers 0`; the time from the process start
to the first "step" line in RUN/metrics.jsonl (model load, opening the cache, sampler, the
bounded validation before training, the first step), then the process is stopped.

    python benchmarks/bench_scale.py --images 100000 --work /tmp/scale100k
    python benchmarks/bench_scale.py --images 1000000 --work /tmp/scale --small-previews
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from samcache.devices import cpu_description  # noqa: E402

SHARD_IMAGES = 64


def _samcache(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "samcache", *map(str, args)], cwd=REPO, **kwargs)


def make_seed_cache(work: Path) -> Path:
    """A real tiny cache of 6 stamps pages (its header and tables are copied)."""
    seed = work / "seed-cache"
    if not (seed / "cache.json").exists():
        _samcache("data", "stamps", "--out", work / "seed-data", "--n", "6", "--seed", "5", "--overwrite",
                  check=True, capture_output=True)
        _samcache("embed", work / "seed-data", "--out", seed, "--model", "tiny", "--workers", "0",
                  check=True, capture_output=True)
    return seed


def _pages(seed: Path) -> list[dict]:
    pages = []
    for shard in sorted((seed / "shards").glob("*.h5")):
        with h5py.File(shard, "r") as f:
            im, ob = f["images"], f["objects"]
            for row in range(len(im["name"])):
                start, count = int(im["object_start"][row]), int(im["object_count"][row])
                pages.append({
                    "original_size": im["original_size"][row], "input_size": im["input_size"][row],
                    "preview": np.asarray(im["preview_jpeg"][row], np.uint8),
                    "box": ob["box"][start:start + count], "category": list(ob["category"][start:start + count]),
                    "rle": list(ob["rle_counts"][start:start + count]),
                })
    return pages


def generate(seed: Path, out: Path, images: int, small_previews: bool = False) -> None:
    """A cache of `images` images built from the seed cache's pages (see the module docstring).
    `small_previews` re-encodes the previews at 48 px (1M real previews would take 70 GB)."""
    if (out / "cache.json").exists() and json.loads((out / "generated.json").read_text())["images"] == images:
        return
    shutil.rmtree(out, ignore_errors=True)
    (out / "shards").mkdir(parents=True)
    shutil.copy(seed / "cache.json", out / "cache.json")
    provenance = json.loads((seed / "cache.json").read_text())["provenance"]
    pages = _pages(seed)
    if small_previews:
        import cv2

        for p in pages:
            image = cv2.imdecode(p["preview"], cv2.IMREAD_COLOR)
            p["preview"] = cv2.imencode(".jpg", cv2.resize(image, (48, 48)))[1].ravel()
    string = h5py.string_dtype("utf-8")
    started = time.time()
    for s, first in enumerate(range(0, images, SHARD_IMAGES)):
        rows = range(first, min(first + SHARD_IMAGES, images))
        chosen = [pages[i % len(pages)] for i in rows]
        counts = np.array([len(p["rle"]) for p in chosen], np.int64)
        path = out / "shards" / f"g00001-r0000-s{s:06d}-{s & 0xFFFFFFFF:08x}.h5"
        with h5py.File(path, "w") as f:
            f.attrs["schema_version"] = 1
            f.attrs["provenance"] = json.dumps(provenance, sort_keys=True)
            f.create_dataset("embeddings", shape=(len(rows), 256, 64, 64), dtype=np.float16,
                             chunks=(1, 256, 64, 64), fletcher32=True)
            im = f.create_group("images")
            split = ["train" if i % 20 < 14 else "val" if i % 20 < 17 else "test" for i in rows]
            for name, values in (("name", [f"page_{i:07d}.jpg" for i in rows]),
                                 ("path", [f"/data/big/images/page_{i:07d}.jpg" for i in rows]),
                                 ("sha256", [f"{i:064x}" for i in rows]), ("split", split),
                                 ("annotations_sha256", [f"{i:064x}" for i in rows])):
                im.create_dataset(name, data=np.array(values, dtype=object), dtype=string)
            for name in ("file_size", "file_mtime_ns"):
                im.create_dataset(name, data=np.ones(len(rows), np.int64))
            im.create_dataset("image_id", data=np.array(list(rows), np.int64))
            previews = im.create_dataset("preview_jpeg", shape=(len(rows),), dtype=h5py.vlen_dtype(np.uint8))
            for k, p in enumerate(chosen):
                previews[k] = p["preview"]
            im.create_dataset("original_size", data=np.stack([p["original_size"] for p in chosen]).astype(np.int32))
            im.create_dataset("input_size", data=np.stack([p["input_size"] for p in chosen]).astype(np.int32))
            im.create_dataset("object_count", data=counts)
            im.create_dataset("object_start", data=np.cumsum(counts) - counts)
            ob = f.create_group("objects")
            ob.create_dataset("image_row", data=np.repeat(np.arange(len(rows)), counts))
            ob.create_dataset("object_id", data=np.arange(int(counts.sum()), dtype=np.int64) + first * 10)
            ob.create_dataset("box", data=np.concatenate([p["box"] for p in chosen]).astype(np.float32))
            ob.create_dataset("category", data=np.array(sum((p["category"] for p in chosen), []), dtype=object),
                              dtype=string)
            ob.create_dataset("rle_counts", data=np.array(sum((p["rle"] for p in chosen), []), dtype=object),
                              dtype=string)
            for group, names in (("removed", ("name", "reason")), ("failed", ("name", "path", "sha256", "error"))):
                g = f.create_group(group)
                for name in names:
                    g.create_dataset(name, data=np.array([], dtype=object), dtype=string)
            for name in ("file_size", "file_mtime_ns"):
                f["failed"].create_dataset(name, data=np.zeros(0, np.int64))
        if s % 200 == 0:
            print(f"  generating: {first + len(rows)}/{images} images, {time.time() - started:.0f} s", flush=True)
    (out / "generated.json").write_text(json.dumps({"images": images}))


def run_with_rusage(*args):
    """One samcache command: (seconds, its own peak RSS in MB, stdout, stderr)."""
    code = ("import resource, subprocess, sys, time, json; t = time.perf_counter(); "
            "r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
            "s = time.perf_counter() - t; "
            "print(json.dumps({'seconds': s, 'rss_mb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, "
            "'rc': r.returncode, 'out': r.stdout[-2000:], 'err': r.stderr[-2000:]}))")
    result = subprocess.run([sys.executable, "-c", code, sys.executable, "-m", "samcache", *map(str, args)],
                            cwd=REPO, capture_output=True, text=True, check=True)
    return json.loads(result.stdout)


def time_to_first_step(cache: Path, run: Path, timeout: float = 600) -> float:
    shutil.rmtree(run, ignore_errors=True)
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "samcache", "train", str(cache), "--out", str(run),
                                "--epochs", "1", "--workers", "0"], cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = run / "metrics.jsonl"
    try:
        while time.perf_counter() - started < timeout:
            if process.poll() is not None:
                raise SystemExit(f"train ended before its first step: {process.stderr.read()[-2000:]}")
            if metrics.exists() and any('"type": "step"' in line for line in metrics.read_text().splitlines()):
                return time.perf_counter() - started
            time.sleep(0.05)
        return float("inf")
    finally:
        process.kill()
        process.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--work", type=Path, default=Path("/tmp/samcache-scale"))
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--small-previews", action="store_true", help="48 px previews (disk: 1M images)")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    cache = args.work / f"cache-{args.images}"
    print(f"CPU: {cpu_description()}; {args.images} images")
    generate(make_seed_cache(args.work), cache, args.images, args.small_previews)
    from samcache.cache.index import INDEX_NAME
    from samcache.cache.reader import refresh_index

    rows = []
    (cache / INDEX_NAME).unlink(missing_ok=True)
    for label in ("without index", "with index"):
        if label == "with index":
            started = time.perf_counter()
            refresh_index(cache)
            print(f"writing index.npz: {time.perf_counter() - started:.1f} s, "
                  f"{(cache / INDEX_NAME).stat().st_size / 2**20:.0f} MiB")
        measured = run_with_rusage("info", cache)
        assert measured["rc"] == 0, measured["err"]
        rows.append((f"samcache info, {label}", measured["seconds"], measured["rss_mb"]))
        print(f"{rows[-1][0]}: {measured['seconds']:.2f} s, peak RSS {measured['rss_mb']:.0f} MB")
    if not args.skip_train:
        seconds = time_to_first_step(cache, args.work / "run")
        rows.append(("samcache train: start to first step", seconds, float("nan")))
        print(f"{rows[-1][0]}: {seconds:.1f} s")
    print("| images | command | seconds | peak RSS (MB) |")
    print("| --- | --- | --- | --- |")
    for name, seconds, rss in rows:
        print(f"| {args.images:,} | {name} | {seconds:.2f} | {rss:.0f} |")


if __name__ == "__main__":
    main()
