"""Benchmark (issue 17, groundwork): one SAM 2.1 decoder training step from cached features against a
sam2-style step that runs the frozen image encoder under no_grad first.

Both sides train the same modules the same way: SAM 2's prompt encoder and mask decoder (with its
high-resolution features and object-score head), box prompts, SAM 2's loss weights (focal 20, dice 1,
IoU 1 as L1, object score 1), AdamW. They differ only in where the features come from:
  A. "cache": the three feature maps of SAM2ImagePredictor.set_image, stored as fp16 arrays on disk
     (what a samcache SAM 2.1 cache holds: 8 MiB an image), read and cast to fp32 each step;
  B. "encoder": the image, preprocessed, through the Hiera encoder under torch.no_grad each step
     (what sam2's own trainer does with a frozen encoder).
Random weights (speed does not depend on them), fp32, rounds interleaved A B A B ...

    python benchmarks/bench_sam2_step.py --images 2 --prompts 4 --rounds 3
    python benchmarks/bench_sam2_step.py --images 2 --prompts 4 --rounds 2 --model sam2.1_hiera_l
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from samcache.devices import cpu_description  # noqa: E402
from samcache.sam2_models import feature_bytes_per_image, image_features, load_sam2, preprocess  # noqa: E402


def sam2_loss(logits, iou_pred, object_logits, target):
    """SAM 2's weights on one mask per prompt: 20 x focal + dice + L1 on the IoU + BCE on the object score."""
    target_low = F.interpolate(target, logits.shape[-2:], mode="bilinear", align_corners=False)
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, target_low, reduction="none")
    p_t = prob * target_low + (1 - prob) * (1 - target_low)
    focal = (0.25 * target_low + 0.75 * (1 - target_low)) * ce * (1 - p_t) ** 2
    dice = 1 - (2 * (prob * target_low).sum((-1, -2)) + 1) / (prob.sum((-1, -2)) + target_low.sum((-1, -2)) + 1)
    hard = (logits > 0).float()
    iou = (hard * target_low).sum((-1, -2)) / ((hard + target_low).clamp(max=1).sum((-1, -2))).clamp(min=1)
    objectness = F.binary_cross_entropy_with_logits(object_logits, torch.ones_like(object_logits))
    return 20 * focal.mean() + dice.mean() + (iou_pred - iou.detach()).abs().mean() + objectness


def decoder_step(model, optimizer, features: dict, boxes: torch.Tensor, targets: torch.Tensor) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss = 0.0
    for i in range(boxes.shape[0]):  # one image at a time, its prompts together (repeat_image)
        coords = boxes[i].reshape(-1, 2, 2)
        labels = torch.tensor([[2, 3]]).repeat(coords.shape[0], 1)
        sparse, dense = model.sam_prompt_encoder(points=(coords, labels), boxes=None, masks=None)
        logits, iou_pred, _, object_logits = model.sam_mask_decoder(
            image_embeddings=features["image_embed"][i : i + 1], image_pe=model.sam_prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=False,
            repeat_image=True, high_res_features=[features["high_res_s0"][i : i + 1],
                                                  features["high_res_s1"][i : i + 1]])
        loss = loss + sam2_loss(logits, iou_pred, object_logits, targets[i])
    loss.backward()
    optimizer.step()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=2, help="images per step")
    parser.add_argument("--prompts", type=int, default=4, help="box prompts per image")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model", default="sam2.1_hiera_t")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = load_sam2(args.model).model
    model.sam_mask_decoder.train()
    for name, p in model.named_parameters():  # conv_s0/conv_s1 made the cached maps: frozen, as the encoder
        p.requires_grad = name.startswith(("sam_mask_decoder.", "sam_prompt_encoder.")) and ".conv_s" not in name
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (900, 700, 3), dtype=np.uint8) for _ in range(args.images)]
    boxes = torch.tensor(rng.uniform(100, 900, (args.images, args.prompts, 4)), dtype=torch.float32).sort(-1).values
    boxes = boxes[..., [0, 2, 1, 3]]  # x0 < x1, y0 < y1
    targets = torch.from_numpy(rng.random((args.images, args.prompts, 1, 256, 256)) > 0.7).float()
    work = Path(tempfile.mkdtemp())
    with torch.no_grad():
        cached = image_features(model, preprocess(images))
    for name, value in cached.items():  # the cache: fp16 arrays, one file per map
        np.save(work / f"{name}.npy", value.numpy().astype(np.float16))

    def from_cache() -> dict:
        return {name: torch.from_numpy(np.load(work / f"{name}.npy")).float() for name in cached}

    def from_encoder() -> dict:
        with torch.no_grad():
            return image_features(model, preprocess(images))

    times = {"cache": [], "encoder": []}
    decoder_step(model, optimizer, from_cache(), boxes, targets)  # warm-up
    for _ in range(args.rounds):
        for side, source in (("cache", from_cache), ("encoder", from_encoder)):
            start = time.perf_counter()
            decoder_step(model, optimizer, source(), boxes, targets)
            times[side].append(time.perf_counter() - start)
    prompts = args.images * args.prompts
    print(f"CPU: {cpu_description()}; torch threads {torch.get_num_threads()}; {args.model} (random weights), "
          f"fp32; {args.images} images x {args.prompts} box prompts a step, {args.rounds} rounds interleaved")
    print(f"cache bytes per image (fp16): {feature_bytes_per_image() / 2**20:.1f} MiB")
    for side, values in times.items():
        best = min(values)
        print(f"{side:<8} step {np.median(values):6.2f} s median ({best:.2f} best)  "
              f"{prompts / np.median(values):6.2f} prompts/s")
    print(f"ratio (cache / encoder prompts/s, medians): {np.median(times['encoder']) / np.median(times['cache']):.2f}x")


if __name__ == "__main__":
    main()
