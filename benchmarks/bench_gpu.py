"""Benchmark: every GPU figure of BENCHMARKS.md in one run; `benchmarks/gpu.sh` runs it.

On one CUDA device, vit_b with random weights (seed 0, saved in Meta's key layout):

  encoder      SAM's image encoder alone, bf16 autocast, inference mode, batch 1..32, eager and
               torch.compile: images/s (after warm-up iterations, CUDA-synchronised) and peak
               memory. This is the ceiling `samcache embed` can reach on the device.
  embed        `samcache embed` as a whole command on synthetic stamp pages (defaults: torch
               backend, bf16, batch 8, DataLoader workers decoding): its own summary's images/s
               and the process's wall time.
  train        `samcache train` on that cache with its defaults (the decoder in bf16 on CUDA):
               prompts/s of its last epoch (metrics.jsonl's samples_per_s, validation excluded),
               and the process's peak device memory.

The table goes to stdout, to `--json`, and into BENCHMARKS.md between the GPU table markers
(`--write-benchmarks`). Goals on one H100/H200: embed >= 450 images/s, decoder
training >= 3000 prompts/s.

    bash benchmarks/gpu.sh                                   # everything, writes BENCHMARKS.md
    python benchmarks/bench_gpu.py --device cpu --model tiny --batches 1,2 --pages 4 --iters 1   # smoke run
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from samcache.devices import cpu_description  # noqa: E402
from samcache.models.weights import build_sam  # noqa: E402

START, END = "<!-- gpu table: written by benchmarks/bench_gpu.py -->", "<!-- end of gpu table -->"


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_description()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def encoder_rates(sam, device: torch.device, batches: list[int], iters: int, compiled: bool) -> list[dict]:
    encoder = sam.image_encoder.to(device).eval()
    run = torch.compile(encoder) if compiled else encoder
    rows = []
    for b in batches:
        x = torch.randn(b, 3, 1024, 1024, device=device)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        try:
            with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16):
                for _ in range(3 if compiled else 2):  # compilation (per batch shape) and warm-up
                    run(x)
                sync(device)
                started = time.perf_counter()
                for _ in range(iters):
                    run(x)
                sync(device)
                seconds = time.perf_counter() - started
        except torch.cuda.OutOfMemoryError:
            rows.append({"batch": b, "compiled": compiled, "images_per_s": None, "peak_gib": None})
            continue
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        rows.append({"batch": b, "compiled": compiled, "images_per_s": b * iters / seconds, "peak_gib": peak})
        print(f"encoder batch {b:>2} {'compiled' if compiled else 'eager':>8}: {rows[-1]['images_per_s']:.1f} images/s"
              + (f", peak {peak:.1f} GiB" if peak is not None else ""), flush=True)
    return rows


def samcache(*args) -> tuple[subprocess.CompletedProcess, float]:
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "samcache", *map(str, args)], cwd=REPO, capture_output=True,
                            text=True)
    if result.returncode != 0:
        sys.exit(f"samcache {' '.join(map(str, args))} failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
    return result, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model", default="vit_b", choices=["vit_b", "tiny"])
    parser.add_argument("--batches", default="1,2,4,8,16,32")
    parser.add_argument("--iters", type=int, default=10, help="timed encoder iterations per batch size")
    parser.add_argument("--pages", type=int, default=512, help="stamp pages for the embed and train figures")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_gpu"))
    parser.add_argument("--json", type=Path)
    parser.add_argument("--write-benchmarks", action="store_true", help="put the table into BENCHMARKS.md")
    args = parser.parse_args()
    device = torch.device(args.device)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    name = device_name(device)
    print(f"device: {name}; torch {torch.__version__}", flush=True)

    torch.manual_seed(0)
    sam = build_sam(args.model).eval()
    weights = work / f"{args.model}_random.pth"
    torch.save(sam.state_dict(), weights)
    batches = [int(b) for b in args.batches.split(",")]
    encoder = encoder_rates(sam, device, batches, args.iters, compiled=False)
    if not args.no_compile:
        encoder += encoder_rates(sam, device, batches, args.iters, compiled=True)
    del sam
    if device.type == "cuda":
        torch.cuda.empty_cache()

    data, cache, run = work / "data", work / "cache", work / "run"
    if not (data / "train.json").exists():
        samcache("data", "stamps", "--out", data, "--n", args.pages, "--seed", 0, "--overwrite")
    clicks = work / "run_interactive"
    subprocess.run(["rm", "-rf", str(cache), str(run), str(clicks)], check=True)
    embedded, embed_wall = samcache("embed", data, "--out", cache, "--model", args.model, "--checkpoint", weights,
                                    "--device", args.device)
    match = re.search(r"embedded (\d+) images in ([\d.]+) s \(([\d.]+) images/s[;)]", embedded.stdout)
    embed = {"images": int(match[1]), "seconds": float(match[2]), "images_per_s": float(match[3]),
             "wall_s": embed_wall}
    print(f"samcache embed: {embed['images_per_s']:.1f} images/s ({embed['images']} images, whole command "
          f"{embed_wall:.1f} s)", flush=True)
    _, train_wall = samcache("train", cache, "--out", run, "--epochs", args.epochs, "--device", args.device)
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    last_epoch = max(s["epoch"] for s in steps if s["type"] == "step")
    train_rate = [s for s in steps if s["type"] == "step" and s["epoch"] == last_epoch][-1]["samples_per_s"]
    train = {"prompts_per_s": train_rate, "epochs": args.epochs, "wall_s": train_wall}
    print(f"samcache train: {train_rate:.0f} prompts/s (epoch {last_epoch})", flush=True)
    # SAM's interactive recipe (a box or point, then clicks from the errors: 11 passes a prompt), one epoch
    _, clicks_wall = samcache("train", cache, "--out", clicks, "--epochs", 1, "--prompt", "interactive",
                              "--device", args.device)
    steps = [json.loads(line) for line in (clicks / "metrics.jsonl").read_text().splitlines()]
    clicks_rate = [s for s in steps if s["type"] == "step"][-1]["samples_per_s"]
    train["interactive_prompts_per_s"] = clicks_rate
    print(f"samcache train --prompt interactive: {clicks_rate:.0f} prompts/s", flush=True)

    table = render(name, args, encoder, embed, train)
    print("\n" + table)
    if args.json:
        args.json.write_text(json.dumps({"device": name, "torch": torch.__version__, "encoder": encoder,
                                         "embed": embed, "train": train}, indent=2))
    if args.write_benchmarks:
        path = REPO / "BENCHMARKS.md"
        text = path.read_text()
        block = f"{START}\n{table}\n{END}"
        text = (re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: block, text, flags=re.S)
                if START in text else text.rstrip() + "\n\n## GPU\n\n" + block + "\n")
        path.write_text(text)
        print(f"wrote the table into {path}")


def render(name: str, args, encoder: list[dict], embed: dict, train: dict) -> str:
    def rate(row):
        return "out of memory" if row["images_per_s"] is None else f"{row['images_per_s']:.1f}"

    lines = [f"{name}, torch {torch.__version__}, {args.model} random weights, "
             f"{time.strftime('%Y-%m-%d')} (`bash benchmarks/gpu.sh`)", "",
             "| encoder, bf16 | batch | images/s | peak GiB |", "| --- | ---: | ---: | ---: |"]
    for row in encoder:
        peak = "" if row["peak_gib"] is None else f"{row['peak_gib']:.1f}"
        lines.append(f"| {'torch.compile' if row['compiled'] else 'eager'} | {row['batch']} | {rate(row)} | {peak} |")
    lines += ["", "| command | figure |", "| --- | ---: |",
              f"| `samcache embed` (defaults), {embed['images']} pages | {embed['images_per_s']:.1f} images/s "
              f"(whole command {embed['wall_s']:.0f} s) |",
              f"| `samcache train` (defaults), epoch {train['epochs']} | {train['prompts_per_s']:.0f} prompts/s |",
              f"| `samcache train --prompt interactive`, epoch 1 | {train['interactive_prompts_per_s']:.0f} "
              "prompts/s |",
              "", "Goals on one H100/H200: embed >= 450 images/s, decoder training >= 3000 prompts/s."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
