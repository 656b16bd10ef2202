"""The cost of training vit_b's encoder tail from cached tokens: seconds per training step and peak memory,
for decoder only, the neck, the last 1 and 2 blocks (in full and LoRA r4), beside the strongest simple
alternative without samcache's cache boundary: the whole encoder in the loop (its first N - K blocks
frozen under no_grad, the last K blocks and neck trained), which is what a trainer without a cache runs
(micro-sam's preset for small GPUs trains vit_b's last block this way).

Random vit_b weights (the cost does not depend on them), one 1024x1024 image and 4 box prompts per
step, fp32 as `samcache train` runs on a CPU, AdamW over what trains. Each configuration runs in its own
process (its peak resident memory is its own); the order is interleaved over `--rounds`.

    python benchmarks/bench_tail_step.py --steps 3 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

CONFIGS = ("decoder", "neck_k1", "tail_k1", "encoder_in_loop_k1", "tail_k2", "lora_k2", "encoder_in_loop_k2")


def one(config: str, steps: int, precision: str = "fp32") -> dict:
    import torch

    from samcache.models.decoder import compute_loss
    from samcache.models.encoder_tail import TailedDecoder, add_lora, tail_parameters
    from samcache.models.families import family_of
    from samcache.models.prompts import PromptBatch

    torch.manual_seed(0)
    family = family_of("vit_b")
    sam = family.build("vit_b")
    sam.requires_grad_(False)
    image = torch.randn(1, 3, 1024, 1024)
    with torch.no_grad():
        split = family.encoder_module(sam, 2)(image)
    embedding, tokens2 = split[:, :256], split[:, 256:]
    with torch.no_grad():
        tokens1 = sam.image_encoder.blocks[10](tokens2.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    boxes = torch.tensor([[100.0, 100.0, 400.0, 380.0], [500, 200, 900, 700], [50, 600, 300, 1000],
                          [600, 650, 1000, 1000]])
    prompts = PromptBatch.boxes_of_one_image(boxes)
    targets = (torch.rand(4, 256, 256) > 0.5).float()
    decoder = family.decoder(sam, "vit_b")
    sam.mask_decoder.requires_grad_(True)
    params = list(sam.mask_decoder.parameters())
    features = embedding
    if config != "decoder" and not config.startswith("encoder_in_loop"):
        blocks = 1 if config.endswith("k1") else 2
        tail = family.encoder_tail(sam, blocks)
        if config.startswith("lora"):
            add_lora(tail.blocks, rank=4, alpha=4)
        part = "neck" if config.startswith("neck") else "tail"
        tail_params = tail_parameters(tail, part)
        for p in tail_params:
            p.requires_grad_(True)
        params += tail_params
        decoder = TailedDecoder(decoder, tail)
        features = tokens1 if blocks == 1 else tokens2
    if config.startswith("encoder_in_loop"):
        blocks = int(config[-1])
        tail = family.encoder_tail(sam, blocks)
        tail_params = tail_parameters(tail, "tail")
        for p in tail_params:
            p.requires_grad_(True)
        params += tail_params
        split_at = len(sam.image_encoder.blocks) - blocks
        inner = TailedDecoder(decoder, tail)

        def forward(_features, batch):
            encoder = sam.image_encoder
            with torch.no_grad():  # the frozen blocks need no graph
                x = encoder.patch_embed(image) + encoder.pos_embed
                for block in encoder.blocks[:split_at]:
                    x = block(x)
            return inner(x.permute(0, 3, 1, 2), batch)
    else:
        def forward(_features, batch):
            return decoder(_features, batch)
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    trained = sum(p.numel() for p in params)
    times = []
    for step in range(steps + 1):
        started = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            output = forward(features, prompts)
        loss = compute_loss(output, targets, prompts.multimask, "sam").total
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step:  # the first step warms up
            times.append(time.perf_counter() - started)
    return {"config": config, "seconds_per_step": statistics.median(times), "trained_parameters": trained,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                        help="bf16: every configuration's forward under bf16 autocast (the encoder in the loop too)")
    parser.add_argument("--configs", default=",".join(CONFIGS), help="which configurations, comma-separated")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.steps, args.precision)))
        return
    results: dict[str, list[dict]] = {c: [] for c in args.configs.split(",")}
    for _ in range(args.rounds):
        for config in results:
            out = subprocess.run([sys.executable, __file__, "--one", config, "--steps", str(args.steps),
                                  "--precision", args.precision],
                                 check=True, capture_output=True, text=True).stdout
            results[config].append(json.loads(out.strip().splitlines()[-1]))
    loops = {k: statistics.median(r["seconds_per_step"] for r in results[f"encoder_in_loop_k{k}"]) for k in (1, 2)
             if f"encoder_in_loop_k{k}" in results}
    print("| trained | s / step | the same blocks with the encoder in the loop: s / step, ratio | "
          "trained parameters | peak RSS MiB |")
    print("|---|---|---|---|---|")
    for config, rows in results.items():
        seconds = statistics.median(r["seconds_per_step"] for r in rows)
        k = int(config[-1]) if config[-1].isdigit() else 0
        versus = (f"{loops[k]:.2f}, {loops[k] / seconds:.1f}x" if k in loops and not config.startswith("encoder")
                  else "-")
        print(f"| {config} | {seconds:.2f} | {versus} | {rows[0]['trained_parameters']:,} | "
              f"{max(r['peak_rss_mib'] for r in rows):.0f} |")


if __name__ == "__main__":
    main()
