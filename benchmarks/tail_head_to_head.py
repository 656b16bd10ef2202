"""How much of the model to train: decoder only, the encoder's neck, its last 1 or 2 blocks (in full or
LoRA), each with and without cached views, at equal epochs, on two synthetic domains.

Everything runs through the CLI, as a user would: `samcache data`, `embed --tail-blocks K [--views]`,
`train --train ...`, `eval --clicks 3`. Per domain four caches are made once (K = 1 and 2, with and
without views); decoder-only runs read the final embedding of the K = 2 cache, which every cache holds.
Each configuration's result is one JSON line in OUT/results.jsonl, so a killed run resumes where it
stopped (finished configurations are skipped); `--table` prints the Markdown table from it.

    python benchmarks/tail_head_to_head.py --out bench/tails            # everything (about 40 min here)
    python benchmarks/tail_head_to_head.py --out bench/tails --table    # the table only
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

SAMCACHE = str(Path(sys.executable).with_name("samcache"))
DOMAINS = {
    # domain: (data command, images, seed)
    "stamps": ("stamps", 60, 0),
    "cells": ("cells", 40, 0),
}
VIEWS = "hflip,rot90,scale0.6"
TRAIN = ["--lr", "1e-3", "--loss", "sam", "--batch-size", "4", "--objects-per-image", "4", "--seed", "0"]
# name: (tail blocks of the cache it reads, --train, extra flags)
CONFIGS = {
    "decoder only": (2, "mask_decoder", []),
    "neck + decoder": (1, "neck,mask_decoder", []),
    "last block + neck + decoder": (1, "tail,mask_decoder", []),
    "last 2 blocks + neck + decoder": (2, "tail,mask_decoder", []),
    "last 2 blocks LoRA r4 + neck + decoder": (2, "tail,mask_decoder", ["--lora-rank", "4"]),
}


def run(args: list[str], log: Path) -> float:
    started = time.time()
    with log.open("a") as out:
        out.write(f"$ {' '.join(args)}\n")
        out.flush()
        subprocess.run(args, check=True, stdout=out, stderr=subprocess.STDOUT)
    return time.time() - started


def cache_path(out: Path, domain: str, blocks: int, views: bool) -> Path:
    return out / domain / f"cache-k{blocks}{'-views' if views else ''}"


def prepare(out: Path, domain: str, log: Path) -> None:
    command, images, seed = DOMAINS[domain]
    data = out / domain / "data"
    if not (data / "train.json").exists():
        run([SAMCACHE, "data", command, "--out", str(data), "--n", str(images), "--seed", str(seed)], log)
    for blocks in (1, 2):
        for views in (False, True):
            cache = cache_path(out, domain, blocks, views)
            extra = ["--views", VIEWS] if views else []
            run([SAMCACHE, "embed", str(data), "--out", str(cache), "--model", "tiny", "--tail-blocks", str(blocks),
                 *extra], log)  # a no-op on a complete cache


def measure(out: Path, domain: str, name: str, views: bool, epochs: int, log: Path) -> dict:
    blocks, parts, extra = CONFIGS[name]
    cache = cache_path(out, domain, blocks, views)
    slug = f"{name.replace(' ', '_').replace('+', 'and')}{'-views' if views else ''}"
    run_dir, report = out / domain / "runs" / slug, out / domain / "reports" / slug
    if not (run_dir / "run.json").exists() or "result" not in json.loads((run_dir / "run.json").read_text()):
        if run_dir.exists():
            subprocess.run(["rm", "-rf", str(run_dir)], check=True)  # an interrupted run of this script's own
        run([SAMCACHE, "train", str(cache), "--out", str(run_dir), "--epochs", str(epochs), "--train", parts,
             "--val-clicks", "0", *TRAIN, *extra], log)
    run([SAMCACHE, "eval", str(cache), "--run", str(run_dir), "--out", str(report), "--split", "test",
         "--clicks", "3", "--overwrite"], log)
    summary = json.loads((report / "summary.json").read_text())
    result = json.loads((run_dir / "run.json").read_text())["result"]
    info = json.loads(subprocess.run([SAMCACHE, "info", str(cache), "--json"], check=True, capture_output=True,
                                     text=True).stdout)
    return {
        "domain": domain, "config": name, "views": views, "epochs": epochs, "cache": cache.name,
        "objects": summary["fine_tuned"]["objects"],
        "miou": summary["fine_tuned"]["miou"], "boundary_f": summary["fine_tuned"]["boundary_f"],
        "clicks_miou": summary["clicks"]["fine_tuned"]["miou"],
        "zero_shot_miou": summary["zero_shot"]["miou"], "zero_shot_boundary_f": summary["zero_shot"]["boundary_f"],
        "zero_shot_clicks_miou": summary["clicks"]["zero_shot"]["miou"],
        "box_fill_miou": summary["baselines"]["box_fill"]["miou"],
        "box_fill_boundary_f": summary["baselines"]["box_fill"]["boundary_f"],
        "val_miou_best": result["val_miou_best"], "seconds_per_epoch": result["seconds"] / result["epochs_run"],
        "bytes_per_image": info["bytes_per_image"],
    }


def table(rows: list[dict]) -> str:
    lines = []
    for domain in DOMAINS:
        mine = [r for r in rows if r["domain"] == domain]
        if not mine:
            continue
        first = mine[0]
        lines += [f"**{domain}** (test split, {first['objects']} objects; {first['epochs']} epochs each): "
                  f"zero-shot mIoU {first['zero_shot_miou']:.4f}, boundary F {first['zero_shot_boundary_f']:.4f}, "
                  f"clicks 1-3 {' / '.join(f'{v:.3f}' for v in first['zero_shot_clicks_miou'])}; filled box mIoU "
                  f"{first['box_fill_miou']:.4f}, boundary F {first['box_fill_boundary_f']:.4f}", "",
                  "| trained | views | val mIoU (best) | test mIoU | boundary F | mIoU @1 / @2 / @3 clicks | "
                  "s / epoch | cache MiB / image |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in mine:
            clicks = " / ".join(f"{v:.3f}" for v in r["clicks_miou"])
            lines.append(f"| {r['config']} | {'yes' if r['views'] else 'no'} | {r['val_miou_best']:.4f} | "
                         f"{r['miou']:.4f} | {r['boundary_f']:.4f} | {clicks} | {r['seconds_per_epoch']:.1f} | "
                         f"{r['bytes_per_image'] / 2**20:.2f} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--domains", default=",".join(DOMAINS))
    parser.add_argument("--table", action="store_true", help="print the table of what is measured, run nothing")
    args = parser.parse_args()
    results = args.out / "results.jsonl"
    rows = [json.loads(line) for line in results.read_text().splitlines()] if results.exists() else []
    if not args.table:
        args.out.mkdir(parents=True, exist_ok=True)
        log = args.out / "log.txt"
        for domain in args.domains.split(","):
            prepare(args.out, domain, log)
            for views in (False, True):
                for name in CONFIGS:
                    if any(r["domain"] == domain and r["config"] == name and r["views"] == views for r in rows):
                        continue
                    row = measure(args.out, domain, name, views, args.epochs, log)
                    rows.append(row)
                    with results.open("a") as out:
                        out.write(json.dumps(row) + "\n")
                    print(f"{domain} | {name} | views {views}: test mIoU {row['miou']:.4f}, "
                          f"{row['seconds_per_epoch']:.1f} s/epoch", flush=True)
    print(table(rows))


if __name__ == "__main__":
    main()
