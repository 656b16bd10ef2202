"""Benchmark: `samcache serve`'s latency, request to mask, for a box prompt, through real HTTP.

One image of 1000x750 pixels (longest side 1000), embedded once per model (tiny: samcache's model
with SAM's decoder widths; vit_b: random weights in Meta's layout, the same decoder cost as Meta's).
A uvicorn server runs `samcache serve`'s app in this process; a client thread POSTs
/api/predict with a box (urllib, a new connection each request as a page's fetch may) and waits for
the COCO RLE mask at the original resolution. Beside it, the in-process floor a skilled user would
write: `SamPredictor.predict(box=...)` on the same cached embedding (`features` set directly, no
encoder, no HTTP, no RLE). Median and 90th percentile over `--requests` requests after warm-up,
the two interleaved.

    python benchmarks/bench_serve.py --requests 40 --work /tmp/bench_serve
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from samcache.devices import cpu_description  # noqa: E402

BOX = [200, 150, 700, 550]


def make_dataset(root: Path) -> Path:
    """One 1000x750 page-like image with one rectangular object, as a COCO dataset."""
    import cv2

    from samcache.data import masks

    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    image = rng.integers(180, 255, (750, 1000, 3), dtype=np.uint8)
    image[150:550, 200:700] = rng.integers(0, 90, (400, 500, 3), dtype=np.uint8)
    cv2.imwrite(str(root / "images" / "page.png"), image)
    mask = np.zeros((750, 1000), bool)
    mask[150:550, 200:700] = True
    rle = masks.encode(mask)
    coco = {"images": [{"id": 1, "file_name": "page.png", "width": 1000, "height": 750}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [200, 150, 500, 400],
                             "segmentation": {"size": rle["size"], "counts": rle["counts"]}, "iscrowd": 0}],
            "categories": [{"id": 1, "name": "thing"}]}
    (root / "val.json").write_text(json.dumps(coco))
    return root


def embed(dataset: Path, cache: Path, model: str, checkpoint: Path | None) -> None:
    if cache.exists():
        return
    command = [sys.executable, "-m", "samcache", "embed", str(dataset), "--out", str(cache), "--model", model,
               "--backend", "torch", "--precision", "fp32", "--workers", "0"]
    if checkpoint is not None:
        command += ["--checkpoint", str(checkpoint)]
    subprocess.run(command, check=True, capture_output=True)


def vit_b_weights(path: Path) -> Path:
    if not path.exists():
        from segment_anything import sam_model_registry

        torch.manual_seed(0)
        torch.save(sam_model_registry["vit_b"]().state_dict(), path)
    return path


def serve(cache: Path):
    """A uvicorn server on a free port in a thread; returns (server, base url)."""
    import uvicorn

    from samcache.serve.app import create_app
    from samcache.serve.session import ServeSession

    config = uvicorn.Config(create_app(ServeSession(cache)), host="127.0.0.1", port=0, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    return server, thread, f"http://127.0.0.1:{port}"


def request_ms(url: str) -> float:
    body = json.dumps({"image": "page.png", "model": "zero_shot", "box": BOX}).encode()
    started = time.perf_counter()
    with urllib.request.urlopen(urllib.request.Request(f"{url}/api/predict", body,
                                                       {"content-type": "application/json"})) as answer:
        assert answer.status == 200 and json.loads(answer.read())["segmentation"]["counts"]
    return (time.perf_counter() - started) * 1000


def predictor_ms(predictor, embedding: torch.Tensor, input_size, original_size) -> float:
    started = time.perf_counter()
    predictor.features, predictor.is_image_set = embedding, True
    predictor.input_size, predictor.original_size = input_size, original_size
    masks, _, _ = predictor.predict(box=np.array(BOX), multimask_output=False)
    assert masks.shape == (1, *original_size)
    return (time.perf_counter() - started) * 1000


def measure(cache: Path, checkpoint: Path | None, model: str, requests: int) -> dict:
    from segment_anything import SamPredictor

    from samcache.cache.reader import EmbeddingCache
    from samcache.models.weights import load_sam

    sam = load_sam(model, checkpoint).sam.eval()
    predictor = SamPredictor(sam)
    cached = EmbeddingCache(cache)
    embedding = torch.from_numpy(cached.embedding(0)).float()[None]
    info = cached.images[0]
    server, thread, url = serve(cache)
    http, floor = [], []
    try:
        for _ in range(3):  # warm-up: the first requests build the decoder's kernels
            request_ms(url)
            with torch.no_grad():
                predictor_ms(predictor, embedding, info.input_size, info.original_size)
        for _ in range(requests):
            http.append(request_ms(url))
            with torch.no_grad():
                floor.append(predictor_ms(predictor, embedding, info.input_size, info.original_size))
    finally:
        server.should_exit = True
        thread.join(timeout=10)

    def p90(values):
        return sorted(values)[int(0.9 * (len(values) - 1))]

    return {"model": model, "http_median_ms": statistics.median(http), "http_p90_ms": p90(http),
            "sampredictor_median_ms": statistics.median(floor), "sampredictor_p90_ms": p90(floor)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_serve"))
    parser.add_argument("--models", default="tiny,vit_b")
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    dataset = make_dataset(args.work / "data")
    print(f"CPU: {cpu_description()}; torch threads {torch.get_num_threads()}; image 1000x750; box {BOX}")
    for model in args.models.split(","):
        checkpoint = vit_b_weights(args.work / "vit_b_random.pth") if model == "vit_b" else None
        cache = args.work / f"cache_{model}"
        embed(dataset, cache, model, checkpoint)
        result = measure(cache, checkpoint, model, args.requests)
        print(f"{model}: samcache serve over HTTP median {result['http_median_ms']:.1f} ms "
              f"(p90 {result['http_p90_ms']:.1f}); SamPredictor.predict on the cached embedding median "
              f"{result['sampredictor_median_ms']:.1f} ms (p90 {result['sampredictor_p90_ms']:.1f})")


if __name__ == "__main__":
    main()
