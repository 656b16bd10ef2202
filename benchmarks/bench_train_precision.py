"""Benchmark: the demo's training run in bf16 autocast against the same run in fp32.

The same cache, recipe and seed (`make demo`'s: 8 epochs, lr 1e-3, SAM's loss, batch 4 x 4
objects), trained once with `--precision fp32` and once with `--precision bf16`, each in its own
`samcache train` process. Printed: each epoch's mean training loss and validation mIoU side by
side, the largest step-loss difference, the best epoch and its mIoU, and each epoch's training prompts/s
in each run (the runs follow one another, so for the step's speed ratio take bench_train_step.py, whose
methods are interleaved).

    python benchmarks/bench_train_precision.py --cache cache/stamps --work /tmp/bench_precision
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from samcache.devices import cpu_description  # noqa: E402

DEMO_TRAIN = ["--epochs", "8", "--lr", "1e-3", "--loss", "sam", "--batch-size", "4", "--objects-per-image", "4"]


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache", type=Path, default=REPO / "cache" / "stamps")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_precision"))
    parser.add_argument("--epochs", type=int, default=8)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    train_args = [a if a != "8" else str(args.epochs) for a in DEMO_TRAIN]
    print(f"CPU: {cpu_description()}", flush=True)
    seconds = {}
    for precision in ("fp32", "bf16"):
        run = args.work / precision
        if not (run / "run.json").exists() or "result" not in json.loads((run / "run.json").read_text()):
            started = time.perf_counter()
            subprocess.run([sys.executable, "-m", "samcache", "train", str(args.cache), "--out", str(run),
                            *train_args, "--precision", precision], cwd=REPO, check=True)
            seconds[precision] = time.perf_counter() - started
    steps = {p: [r for r in records(args.work / p) if r["type"] == "step"] for p in ("fp32", "bf16")}
    epochs = {p: [r for r in records(args.work / p) if r["type"] == "epoch"] for p in ("fp32", "bf16")}
    assert [r["global_step"] for r in steps["fp32"]] == [r["global_step"] for r in steps["bf16"]]
    print("\n| epoch | train loss fp32 | train loss bf16 | val mIoU fp32 | val mIoU bf16 | prompts/s fp32 "
          "| prompts/s bf16 |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for e32, e16 in zip(epochs["fp32"], epochs["bf16"]):
        n = e32["epoch"]
        loss = {p: statistics.mean(r["loss"] for r in steps[p] if r["epoch"] == n) if n else float("nan")
                for p in ("fp32", "bf16")}
        print(f"| {n} | {loss['fp32']:.4f} | {loss['bf16']:.4f} | {e32['val_miou']:.4f} | {e16['val_miou']:.4f} "
              f"| {e32.get('samples_per_s', float('nan')):.1f} | {e16.get('samples_per_s', float('nan')):.1f} |")
    diffs = [abs(a["loss"] - b["loss"]) / abs(a["loss"]) for a, b in zip(steps["fp32"], steps["bf16"])]
    first = [abs(a["loss"] - b["loss"]) / abs(a["loss"]) for a, b in zip(steps["fp32"][:10], steps["bf16"][:10])]
    print(f"\nstep losses: largest relative difference {max(diffs):.4f} (first 10 steps {max(first):.4f}), "
          f"median {statistics.median(diffs):.4f} over {len(diffs)} steps")
    for p in ("fp32", "bf16"):
        best = max(epochs[p][1:], key=lambda r: r["val_miou"])
        print(f"{p}: best val mIoU {best['val_miou']:.4f} (epoch {best['epoch']}), last {epochs[p][-1]['val_miou']:.4f}"
              + (f", {seconds[p]:.1f} s for the whole command" if p in seconds else ""))


if __name__ == "__main__":
    main()
