"""Pretrains samcache's `tiny` model on synthetic shapes: the recipe of the shipped weights.

The recipe lives in recipes/tiny/recipe.py (why each choice); this is its command line. It
needs the previous tiny's weights for its decoder's starting point:

    git show fc41f5c:samcache/weights/tiny_shapes.safetensors > /tmp/tiny_v1.safetensors
    .venv/bin/python scripts/pretrain_tiny.py --init-decoder /tmp/tiny_v1.safetensors \
        --out samcache/weights/tiny_shapes.safetensors --workdir /tmp/pt_tiny

It checkpoints in --workdir every 100 steps; the same command continues an interrupted run.
The shipped weights are this command's run (from git e277018; 2-core Intel Xeon with AMX, 109
minutes) finished from its step-3000 checkpoint with `--stop-after 3000` when the session's time
ran short: held-out shapes box mIoU 0.639, point 0.465 (tiny_shapes.json).
After a new run, put the printed SHA-256 into samcache.models.weights.TINY_PRETRAINED_SHA256. The result
is samcache's own model trained on synthetic shapes, NOT Meta's Segment Anything.
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

from recipes.tiny.recipe import Recipe, make_tiny_weights  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    defaults = Recipe()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="weights file to write (.safetensors; a .json goes beside it)")
    parser.add_argument("--init-decoder", required=True, type=Path,
                        help="the tiny weights whose prompt encoder and mask decoder start the run")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/samcache_pretrain_tiny"),
                        help="where the resumable checkpoint goes")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--steps", type=int, default=defaults.steps, help="end-to-end steps (one image each)")
    parser.add_argument("--lr", type=float, default=defaults.lr, help="peak learning rate (decoder)")
    parser.add_argument("--encoder-lr-scale", type=float, default=defaults.encoder_lr_scale,
                        help="encoder lr / lr")
    parser.add_argument("--precision", choices=("bf16", "fp32"), default=defaults.precision)
    parser.add_argument("--stop-after", type=int, default=None,
                        help="end after this step (the schedule still that of --steps): finishes a run whose "
                             "time ran out from its last checkpoint")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    command = " ".join(shlex.quote(a) for a in ["scripts/pretrain_tiny.py", *(sys.argv[1:] if argv is None else argv)])
    recipe = Recipe(seed=args.seed, steps=args.steps, lr=args.lr, encoder_lr_scale=args.encoder_lr_scale,
                    precision=args.precision, stop_after=args.stop_after)
    started = time.time()
    result = make_tiny_weights(args.out, args.workdir, args.init_decoder, recipe, command=command,
                               progress=not args.quiet)
    print(f"{result.weights}  sha256 {result.sha256}  held-out box mIoU {result.box_miou:.4f}  "
          f"point mIoU {result.point_miou:.4f}  ({(time.time() - started) / 60:.1f} min in all)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
