"""Benchmark: masks from `samcache predict` on a SAM 2.1 cache against SAM2ImagePredictor
on the checkpoint `samcache export` wrote, for every object of the held-out pages.

A random-weight Hiera-T in Meta's layout (no download here) embeds synthetic stamp pages
(`--precision`: fp32, or bf16 as `samcache embed` does by default on CPUs with native bf16),
trains one epoch from the cache, and is exported. Then, for each object of the test and val
pages and three prompts (its box; its most interior point, the best of the three multimask
outputs; its box with a negative point in a corner), both sides predict a mask at the original
resolution: samcache from the cache (fp16 features), SAM2ImagePredictor from the image. Printed:
the share of pixels on which they agree, min and mean per prompt kind.

    python benchmarks/bench_sam2_parity.py --pages 10 --precision fp32
    python benchmarks/bench_sam2_parity.py --pages 10 --precision bf16
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from samcache.cache.reader import EmbeddingCache  # noqa: E402
from samcache.config import EmbedConfig, TrainConfig  # noqa: E402
from samcache.data import masks  # noqa: E402
from samcache.data.datasets import load_dataset  # noqa: E402
from samcache.data.images import read_image  # noqa: E402
from samcache.data.stamps import generate_stamps  # noqa: E402
from samcache.deploy.export import export_run  # noqa: E402
from samcache.deploy.predict import predict_images, predictor_from_checkpoint  # noqa: E402
from samcache.devices import cpu_description  # noqa: E402
from samcache.embed.pipeline import embed_dataset  # noqa: E402
from samcache.models.families import SAM2_CONFIGS  # noqa: E402
from samcache.models.prompts import interior_point  # noqa: E402
from samcache.models.weights import build_sam  # noqa: E402
from samcache.train.trainer import train  # noqa: E402

MODEL = "sam2.1_hiera_t"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pages", type=int, default=10)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()
    from sam2.build_sam import build_sam2
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    work = args.work or Path(tempfile.mkdtemp(prefix="bench_sam2_parity_"))
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    checkpoint = work / "hiera_t_random.pt"
    torch.save({"model": build_sam(MODEL).model.state_dict()}, checkpoint)
    generate_stamps(work / "stamps", args.pages, seed=7, progress=False)
    cache_dir = work / f"cache-{args.precision}"
    embed_dataset(load_dataset(work / "stamps"), cache_dir, EmbedConfig(
        model_type=MODEL, checkpoint=checkpoint, precision=args.precision, progress=False, workers=0))
    train(cache_dir, work / "run", TrainConfig(epochs=1, batch_size=2, workers=0, lr=1e-4), progress=False)
    exported = work / "model.pt"
    export_run(work / "run", exported, overwrite=True)
    ours = predictor_from_checkpoint(exported)
    theirs = SAM2ImagePredictor(build_sam2(SAM2_CONFIGS[MODEL], str(exported), device="cpu"))

    cache = EmbeddingCache(cache_dir)
    agreement: dict[str, list[float]] = {"box": [], "point": [], "box + negative point": []}
    for index in cache.annotated_indices("test") + cache.annotated_indices("val"):
        info = cache.images[index]
        theirs.set_image(read_image(info.file.path))
        for obj in info.objects:
            box = np.array(obj.box)
            inside = interior_point(masks.decode(obj.rle))[0]
            corner = box[:2] + 2
            for kind, flags, stock in (
                ("box", dict(box=tuple(box)), dict(box=box)),
                ("point", dict(points=[(*inside, 1)]), dict(point_coords=inside[None], point_labels=np.array([1]))),
                ("box + negative point", dict(box=tuple(box), points=[(*corner, 0)]),
                 dict(box=box, point_coords=corner[None], point_labels=np.array([0]))),
            ):
                result = predict_images(ours, [info.file.path], work / "predicted", cache_dir=cache_dir,
                                        overwrite=True, **flags)
                (row,) = result["predictions"]
                assert row["embedding_from"] == "cache"
                single_point = kind == "point"
                stock_masks, scores, _ = theirs.predict(multimask_output=single_point, **stock)
                reference = stock_masks[int(np.argmax(scores))] if single_point else stock_masks[0]
                agreement[kind].append(float((masks.decode(row["segmentation"]) == (reference > 0)).mean()))
    print(f"CPU: {cpu_description()}; {MODEL} (random weights, 1 epoch of training), cache embedded in "
          f"{args.precision}, stored fp16; {len(agreement['box'])} objects of the test and val pages")
    for kind, values in agreement.items():
        print(f"{kind:<22} pixel agreement with SAM2ImagePredictor: min {min(values):.6f} mean {np.mean(values):.6f}")


if __name__ == "__main__":
    main()
