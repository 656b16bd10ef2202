"""Pretrains samcache's `tiny` model on synthetic shapes: the recipe of the shipped weights.

The recipe lives in samcache/tiny/recipe.py; this is its command line. Two stages, both on
generic shapes images (samcache.tiny.shapes; never stamps):

1. Decoder warm-up with samcache's own pipeline: draw a shapes data set, `embed` it with the
   randomly initialised tiny encoder, `train` the prompt encoder and mask decoder from that
   cache with box prompts, `export` the best epoch. From random weights, SAM's decoder learns
   far faster on a frozen encoder and box prompts than end to end with mixed prompts
   (measured: end to end alone reached 0.06 held-out box mIoU in 27 minutes; decoder-only with
   half point prompts 0.07 after 3 epochs here).
2. End to end (samcache.tiny.pretrain.pretrain_tiny): every part of the model trains, on freshly
   drawn images, starting from stage 1's weights, the encoder at a tenth of the learning rate.

The shipped samcache/weights/tiny_shapes.safetensors (+ tiny_shapes.json, its provenance)
came from this script with its defaults (seed 0) on a 2-core AMD EPYC CPU:

    .venv/bin/python scripts/pretrain_tiny.py --out samcache/weights/tiny_shapes.safetensors --workdir /tmp/pt2

Stage 1 had already been run in /tmp/pt2 as the equivalent commands (the script then found
it done and went on to stage 2):

    generate_shapes(/tmp/pt2/shapes, 360, seed=0, fractions=(0.9, 0.1, 0.0))       # 23 s
    samcache embed /tmp/pt2/shapes --out /tmp/pt2/cache --model tiny --random-init --workers 1   # 60 s, bf16
    samcache train /tmp/pt2/cache --out /tmp/pt2/run --epochs 8 --batch-size 4 --objects-per-image 4 \
        --lr 1e-3 --loss dice-bce --prompt box --train mask_decoder,prompt_encoder --warmup-steps 20 \
        --workers 1 --cache-in-memory yes                                          # 1527 s
    (stage 2, pretrain_tiny: 300 steps)                                            # 355 s

Figures (held-out shapes, 24 images, 82 objects; in tiny_shapes.json): stage 1 validation box
mIoU 0.027 -> 0.443; after stage 2, box mIoU 0.440 and single-point mIoU 0.172 (stage 1's
weights: 0.431 and 0.034). After a new run, put the printed SHA-256 into
samcache.models.TINY_PRETRAINED_SHA256. The result is samcache's own model trained on synthetic
shapes, NOT Meta's Segment Anything.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

from samcache.tiny.recipe import Recipe, make_tiny_weights  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    defaults = Recipe()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="weights file to write (.safetensors; a .json goes beside it)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/samcache_pretrain_tiny"),
                        help="stage 1's data set, cache and run")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--warmup-images", type=int, default=defaults.warmup_images,
                        help="stage 1: shapes images (90%% train)")
    parser.add_argument("--warmup-epochs", type=int, default=defaults.warmup_epochs, help="stage 1: decoder epochs")
    parser.add_argument("--steps", type=int, default=defaults.steps, help="stage 2: end-to-end steps (one image each)")
    parser.add_argument("--lr", type=float, default=defaults.lr, help="stage 2: peak learning rate")
    parser.add_argument("--encoder-lr-scale", type=float, default=defaults.encoder_lr_scale,
                        help="stage 2: encoder lr / lr")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    command = " ".join(shlex.quote(a) for a in ["scripts/pretrain_tiny.py", *(sys.argv[1:] if argv is None else argv)])
    recipe = Recipe(seed=args.seed, warmup_images=args.warmup_images, warmup_epochs=args.warmup_epochs,
                    steps=args.steps, lr=args.lr, encoder_lr_scale=args.encoder_lr_scale)
    started = time.time()
    result = make_tiny_weights(args.out, args.workdir, recipe, command=command, progress=not args.quiet)
    print(f"{result.weights}  sha256 {result.sha256}  held-out box mIoU {result.box_miou:.4f}  "
          f"point mIoU {result.point_miou:.4f}  ({(time.time() - started) / 60:.1f} min in all)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
