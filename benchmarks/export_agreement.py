"""Agreement: an export loaded by its model's own package against `samcache predict` from the cache.

For each model type (random weights, seed 0, saved in the official layout), on a few synthetic
stamp pages: `samcache embed` (torch, fp32, so the cache holds what the package's encoder computes,
rounded to fp16), one epoch of `samcache train`, `samcache export`. Then, for every annotated box
of every page, the mask of `samcache predict --run RUN --boxes ds/<split>.json` (from the cache: no
encoder) against the mask of the package's own `SamPredictor` on the raw page, loaded from the
export as its metadata's `load_with` says (MobileSAM: `mobile_sam.sam_model_registry["vit_t"]`, then
`.eval()`; SAM-HQ: `segment_anything_hq.sam_model_registry[...]`, its predictor's default
`hq_token_only=False`). Prints, per model, the fraction of pixels that agree: the minimum over
objects, the mean, and the fraction of all pixels; and the predicted-IoU difference.

    python benchmarks/export_agreement.py --model vit_t --model hq_vit_tiny
    python benchmarks/export_agreement.py --model hq_vit_b --pages 3      # minutes: its encoder
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from samcache.data import masks  # noqa: E402
from samcache.data.images import read_image  # noqa: E402
from samcache.deploy.export import import_mobile_sam  # noqa: E402
from samcache.devices import cpu_description  # noqa: E402
from samcache.models.weights import build_seeded  # noqa: E402


def samcache(*args) -> None:
    result = subprocess.run([sys.executable, "-m", "samcache", *map(str, args)], cwd=REPO, capture_output=True,
                            text=True)
    if result.returncode:
        raise SystemExit(f"samcache {' '.join(map(str, args[:2]))} failed:\n{result.stderr[-2000:]}")


def package_model(model_type: str, exported: Path):
    """(model, SamPredictor class) of the model's own package, loaded from the export."""
    if model_type == "vit_t":
        mobile_sam = import_mobile_sam()
        return mobile_sam.sam_model_registry["vit_t"](checkpoint=str(exported)).eval(), mobile_sam.SamPredictor
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from segment_anything_hq import SamPredictor, sam_model_registry
    with contextlib.redirect_stdout(io.StringIO()):  # its builders print load_state_dict's result
        sam = sam_model_registry[model_type.removeprefix("hq_")](checkpoint=str(exported))
    return sam.eval(), SamPredictor


def measure(model_type: str, pages: int, work: Path) -> dict:
    root = work / model_type
    root.mkdir(parents=True, exist_ok=True)
    data, weights, cache, run = root / "ds", root / "weights.pth", root / "cache", root / "run"
    exported = root / f"export_{model_type}.pth"
    if not (data / "train.json").exists():
        samcache("data", "stamps", "--out", data, "--n", pages, "--seed", 11, "--overwrite")
    if not weights.exists():
        torch.save(build_seeded(model_type, 0).state_dict(), weights)
    samcache("embed", data, "--out", cache, "--model", model_type, "--checkpoint", weights, "--precision", "fp32",
             "--backend", "torch", "--workers", "0")
    if not (run / "last.pt").exists():
        samcache("train", cache, "--out", run, "--checkpoint", weights, "--epochs", "1", "--lr", "1e-3",
                 "--workers", "0")
    samcache("export", "--run", run, "--out", exported, "--overwrite")
    sam, predictor_class = package_model(model_type, exported)
    predictor = predictor_class(sam)
    agreements, pixels, score_differences = [], [0, 0], []
    for split in ("train", "val", "test"):
        coco = json.loads((data / f"{split}.json").read_text())
        if not coco["annotations"]:
            continue
        out = root / f"predict-{split}"
        samcache("predict", *[data / "images" / Path(im["file_name"]).name for im in coco["images"]],
                 "--run", run, "--boxes", data / f"{split}.json", "--out", out, "--overwrite")
        predictions = json.loads((out / "predictions.json").read_text())["predictions"]
        by_image: dict[str, list] = {}
        for p in predictions:
            by_image.setdefault(Path(p["image"]).name, []).append(p)
        for name, found in sorted(by_image.items()):
            predictor.set_image(read_image(data / "images" / name))
            for p in found:
                mask, score, _ = predictor.predict(box=np.array(p["box"]), multimask_output=False)
                ours = masks.decode(p["segmentation"]).astype(bool)
                same = int((mask[0] == ours).sum())
                agreements.append(same / ours.size)
                pixels[0] += same
                pixels[1] += ours.size
                score_differences.append(abs(float(score[0]) - p["score"]))
    return {"objects": len(agreements), "min": min(agreements), "mean": float(np.mean(agreements)),
            "pixels": pixels[0] / pixels[1], "score_difference_max": max(score_differences)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", action="append", choices=["vit_t", "hq_vit_tiny", "hq_vit_b"])
    parser.add_argument("--pages", type=int, default=4)
    parser.add_argument("--work", type=Path, default=Path("/tmp/export_agreement"))
    args = parser.parse_args()
    print(f"CPU: {cpu_description()}; torch {torch.__version__}")
    print("| model | objects | pixels agreeing: min over objects | mean | all pixels | max predicted-IoU difference |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for model_type in args.model or ["vit_t", "hq_vit_tiny"]:
        r = measure(model_type, args.pages, args.work)
        print(f"| {model_type} | {r['objects']} | {r['min']:.6f} | {r['mean']:.6f} | {r['pixels']:.6f} | "
              f"{r['score_difference_max']:.2e} |", flush=True)


if __name__ == "__main__":
    main()
