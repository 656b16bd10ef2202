"""Levers on the decoder's training step, one at a time, on this CPU: prompts/s of a whole step
(forward, SAM's loss, backward, AdamW) for 32 box prompts over 4 images, against the best stock step.

The tiny's prompt encoder and mask decoder (SAM's shapes: a step costs what vit_b's does), random
256x64x64 embeddings, random targets; one process, the variants interleaved over `--rounds` rounds
after one warm-up step each (a compiled variant's warm-up is its compilation, reported).

  stock, all boxes, bf16     per image: PromptEncoder (no grad) + MaskDecoder(multimask_output=False)
                             under bf16 autocast, 20 x focal + dice, Adam: the best stock step
  batched, stock modules     all 32 prompts in one call: each prompt's image embedding, SAM's
                             TwoWayTransformer and `output_upscaling` modules, all four masks
  + transformer folded       two_way_attention.two_way_transformer (the first block per image)
  + upscaling on tokens      upscaling.mask_logits: the upscaling as matrix products on
                             channels-last tokens (samcache's)
  + mask 0 only              only the mask the box prompts' loss reads: samcache's step
  (bf16 autocast throughout, as `samcache train` on a CPU with bf16; the last also in fp32)
  --compile adds samcache's step with the transformer and the upscaling under torch.compile.

    python benchmarks/bench_decoder_levers.py --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torchvision.ops import sigmoid_focal_loss

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from samcache.devices import cpu_description, keep_freed_memory  # noqa: E402
from samcache.models.decoder import DecoderOutput, compute_loss, dice_loss  # noqa: E402
from samcache.models.two_way_attention import two_way_transformer  # noqa: E402
from samcache.models.upscaling import mask_logits  # noqa: E402
from samcache.models.weights import load_sam  # noqa: E402

IMAGES, PER_IMAGE = 4, 8
N = IMAGES * PER_IMAGE


def stock_upscaling(upscaling, src, hyper_in, h, w):
    n, _, c = src.shape
    upscaled = upscaling(src.transpose(1, 2).reshape(n, c, h, w))
    return (hyper_in @ upscaled.flatten(2)).reshape(n, -1, 4 * h, 4 * w)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="also samcache's step under torch.compile")
    args = parser.parse_args()
    torch.manual_seed(0)
    sam = load_sam("tiny").sam
    prompt_encoder, decoder = sam.prompt_encoder, sam.mask_decoder
    embeddings = torch.randn(IMAGES, 256, 64, 64)
    keep_freed_memory()  # as `samcache train`; the best stock step gains nothing from it (bench_train_step)
    corner = torch.rand(N, 2) * 700
    boxes = torch.cat([corner, corner + 100 + torch.rand(N, 2) * 200], 1)
    targets = (torch.rand(N, 256, 256) > 0.7).float()
    batch_row = torch.arange(IMAGES).repeat_interleave(PER_IMAGE)
    with torch.no_grad():
        sparse, dense = prompt_encoder(points=None, boxes=boxes, masks=None)
    image_pe = prompt_encoder.get_dense_pe()
    optimizer = torch.optim.AdamW(decoder.parameters(), lr=1e-6)
    multimask = torch.zeros(N, dtype=torch.bool)

    def forward(transformer, upscale, masks):
        tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
        tokens = torch.cat([tokens.unsqueeze(0).expand(N, -1, -1), sparse], dim=1)
        if transformer == "stock":
            hs, src = decoder.transformer(embeddings.index_select(0, batch_row) + dense, image_pe, tokens)
        else:
            hs, src = transformer(decoder.transformer, embeddings + dense[:1], image_pe, tokens, batch_row)
        hyper_in = torch.stack([mlp(hs[:, 1 + i]) for i, mlp in enumerate(decoder.output_hypernetworks_mlps[:masks])],
                               dim=1)
        return DecoderOutput(upscale(decoder.output_upscaling, src, hyper_in, 64, 64),
                             decoder.iou_prediction_head(hs[:, 0]))

    def samcache_step(transformer, upscale, *, bf16=True, masks=4):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            output = forward(transformer, upscale, masks)
        loss = compute_loss(output, targets, multimask, "sam").total
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return N

    def stock_step():
        for b in range(IMAGES):
            rows = slice(b * PER_IMAGE, (b + 1) * PER_IMAGE)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                low_res, _ = decoder(image_embeddings=embeddings[b:b + 1], image_pe=image_pe,
                                     sparse_prompt_embeddings=sparse[rows], dense_prompt_embeddings=dense[rows],
                                     multimask_output=False)
            low_res, target = low_res.float(), targets[rows, None]
            loss = 20 * sigmoid_focal_loss(low_res, target, reduction="mean") + dice_loss(low_res, target).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return N

    folded = two_way_transformer
    variants = {
        "stock, all boxes, bf16": stock_step,
        "batched, stock modules, bf16": lambda: samcache_step("stock", stock_upscaling),
        "+ transformer folded": lambda: samcache_step(folded, stock_upscaling),
        "+ upscaling on tokens": lambda: samcache_step(folded, mask_logits),
        "+ mask 0 only (samcache's step)": lambda: samcache_step(folded, mask_logits, masks=1),
        "samcache's step in fp32": lambda: samcache_step(folded, mask_logits, bf16=False, masks=1),
    }
    if args.compile:
        compiled = torch.compile(two_way_transformer, dynamic=False), torch.compile(mask_logits, dynamic=False)
        variants["samcache's step, compiled"] = lambda: samcache_step(compiled[0], compiled[1], masks=1)
    print(f"CPU: {cpu_description()}; torch {torch.__version__}; {N} box prompts over {IMAGES} images", flush=True)
    for name, step in variants.items():
        started = time.perf_counter()
        step()
        print(f"warm-up {name}: {time.perf_counter() - started:.1f} s", flush=True)
    rates = {name: [] for name in variants}
    for r in range(args.rounds):
        for name in (list(variants) if r % 2 == 0 else list(reversed(variants))):
            started = time.perf_counter()
            prompts = variants[name]()
            rates[name].append(prompts / (time.perf_counter() - started))
    best_stock = statistics.median(rates["stock, all boxes, bf16"])
    print("| variant | prompts/s (median) | per round | vs the best stock step |")
    print("| --- | ---: | --- | ---: |")
    for name, values in rates.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.2f} | {', '.join(f'{v:.2f}' for v in values)} | {median / best_stock:.2f}x |")


if __name__ == "__main__":
    main()
