"""Benchmark: ONNX export of a run against samcache's own (PyTorch) path, on every object of a split.

Exports RUN with `samcache export --format onnx` (and --quantize), then for each image of SPLIT in
the run's cache:
  - encoder.onnx on the image (resized as SamPredictor does) against the cached embedding: cosine;
  - decoder.onnx on the cached embedding against `inference.predict_masks` (what `samcache predict`
    and `eval` run), for each object's exact box and for its most interior point: the share of pixels
    whose mask agrees at the original resolution and |predicted IoU difference|;
  - the same for decoder.quant.onnx (agreement as mask IoU, as it is not meant to be equal);
  - time per prompt, decoder.onnx in ONNX Runtime vs predict_masks in torch (one prompt a call).

    python benchmarks/bench_onnx.py --run runs/stamps --split test --work /tmp/bench_onnx
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from samcache.cache.reader import EmbeddingCache  # noqa: E402
from samcache.data.images import read_image  # noqa: E402
from samcache.data.masks import decode  # noqa: E402
from samcache.deploy.onnx import export_onnx  # noqa: E402
from samcache.deploy.predict import predictor_from_run  # noqa: E402
from samcache.devices import cpu_description  # noqa: E402
from samcache.models.preprocess import resize_image, transform_boxes, transform_coords  # noqa: E402
from samcache.models.prompts import PromptBatch, make_prompt  # noqa: E402
from samcache.train.inference import predict_masks  # noqa: E402
from samcache.train.runs import RunFolder  # noqa: E402


def interior_point(mask: np.ndarray) -> tuple[float, float]:
    import cv2

    distance = cv2.distanceTransform(np.pad(mask.astype(np.uint8), 1), cv2.DIST_L2, 5)[1:-1, 1:-1]
    y, x = np.unravel_index(int(distance.argmax()), distance.shape)
    return float(x), float(y)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run", required=True)
    parser.add_argument("--split", default="test")
    parser.add_argument("--work", required=True)
    args = parser.parse_args()
    import onnxruntime as ort

    out = Path(args.work) / "onnx"
    started = time.perf_counter()
    export_onnx(args.run, out, quantize=True, overwrite=True)
    print(f"export (with --quantize): {time.perf_counter() - started:.1f} s; sizes: " + ", ".join(
        f"{p.name} {p.stat().st_size / 2**20:.1f} MiB" for p in sorted(out.glob("*.onnx"))))
    sessions = {name: ort.InferenceSession(str(out / name), providers=["CPUExecutionProvider"])
                for name in ("encoder.onnx", "decoder.onnx", "decoder.quant.onnx")}
    predictor = predictor_from_run(args.run)
    decoder = predictor.family.decoder(predictor.sam, predictor.model_type)
    cache = EmbeddingCache(RunFolder(args.run).cache_dir())
    no_mask = {"mask_input": np.zeros((1, 1, 256, 256), np.float32), "has_mask_input": np.zeros(1, np.float32)}
    cosines, rows, onnx_s, torch_s = [], [], [], []
    for index, info in enumerate(cache.images):
        if info.split != args.split or not info.objects:
            continue
        size = info.original_size
        embedding = cache.embedding(index).astype(np.float32)[None]
        (ours,) = sessions["encoder.onnx"].run(None, {"input_image": resize_image(read_image(info.file.path))
                                                      .astype(np.float32)})
        cosines.append(float(ours.ravel() @ embedding.ravel() / np.linalg.norm(ours) / np.linalg.norm(embedding)))
        for obj in info.objects:
            box = np.array(obj.box, np.float64)
            point = interior_point(decode(obj.rle))
            for kind in ("box", "point"):
                if kind == "box":
                    frame = transform_boxes(box[None], size)
                    prompts = PromptBatch.boxes_of_one_image(torch.tensor(frame, dtype=torch.float32))
                    feed_points, labels = frame.reshape(1, 2, 2), [[2, 3]]
                else:
                    prompt = make_prompt(np.zeros(4), np.array([point]), np.array([1]), is_box=False,
                                         original_size=size)
                    prompts = PromptBatch.from_prompts([prompt], torch.zeros(1, dtype=torch.long))
                    feed_points = np.concatenate([transform_coords(np.array([point]), size), [[0.0, 0.0]]])[None]
                    labels = [[1, -1]]
                t = time.perf_counter()
                expected = predict_masks(decoder, torch.from_numpy(embedding), prompts,
                                         [(info.input_size, size)])[0]
                torch_s.append(time.perf_counter() - t)
                feed = {"image_embeddings": embedding, "point_coords": feed_points.astype(np.float32),
                        "point_labels": np.array(labels, np.float32), "orig_im_size": np.array(size, np.float32),
                        **no_mask}
                row = {"kind": kind}
                for name in ("decoder.onnx", "decoder.quant.onnx"):
                    t = time.perf_counter()
                    masks, scores, _ = sessions[name].run(None, feed)
                    if name == "decoder.onnx":
                        onnx_s.append(time.perf_counter() - t)
                    choice = 0 if kind == "box" else 1 + int(scores[0, 1:].argmax())
                    got = masks[0, choice] > 0
                    if name == "decoder.onnx":
                        row["agree"] = float((got == expected.mask).mean())
                        row["score_diff"] = abs(float(scores[0, choice]) - expected.score)
                    else:
                        row["quant_iou"] = float((got & expected.mask).sum() / max((got | expected.mask).sum(), 1))
                rows.append(row)
    print(f"CPU: {cpu_description()}; run {args.run}, split {args.split}: {len(cosines)} images, "
          f"{len(rows) // 2} objects")
    print(f"encoder.onnx vs the cached embedding: cosine min {min(cosines):.6f}, mean {np.mean(cosines):.6f}")
    for kind in ("box", "point"):
        part = [r for r in rows if r["kind"] == kind]
        print(f"decoder.onnx, {kind} prompts: pixel agreement min {min(r['agree'] for r in part):.6f} "
              f"mean {np.mean([r['agree'] for r in part]):.6f}; |IoU prediction diff| max "
              f"{max(r['score_diff'] for r in part):.2e}; decoder.quant.onnx mask IoU to the float mask: min "
              f"{min(r['quant_iou'] for r in part):.4f} mean {np.mean([r['quant_iou'] for r in part]):.4f}")
    print(f"time per prompt (mask at original resolution): decoder.onnx {1000 * np.median(onnx_s):.1f} ms, "
          f"torch predict_masks {1000 * np.median(torch_s):.1f} ms (medians, {len(onnx_s)} prompts)")


if __name__ == "__main__":
    main()
