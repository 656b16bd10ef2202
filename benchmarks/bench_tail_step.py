"""The cost of training vit_b's encoder tail from cached tokens: seconds per training step and peak memory,
for decoder only, the neck, the last 1 and 2 blocks (in full and LoRA r4), beside the strongest simple
alternative without samcache's cache boundary: the whole encoder in the loop (its first N - K blocks
frozen under no_grad, the last K blocks and neck trained, stock segment_anything modules), which is what
a trainer without a cache runs (micro-sam's preset for small GPUs trains vit_b's last block this way).

Random vit_b weights (the cost does not depend on them), one 1024x1024 image and 4 box prompts per
step, AdamW over what trains, `--precision` fp32 or bf16 autocast (samcache train's default on CPUs
with native bf16). Each configuration runs in its own process (its peak resident memory is its own);
the order is interleaved over `--rounds`. samcache's configurations run as `samcache train` does: the
process keeps the memory it frees (devices.keep_freed_memory) and trained ViT blocks run their
attention in chunks (models/vit_attention.py); `tail_k1_stock` is tail_k1 with the stock attention.
The encoder in the loop runs with glibc's defaults, as users run it, and again as `..._kept` with
samcache's allocator setting, so that both comparisons are in the table.

    python benchmarks/bench_tail_step.py --steps 3 --rounds 2 --precision bf16
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

CONFIGS = ("decoder", "neck_k1", "tail_k1", "tail_k1_stock", "encoder_in_loop_k1", "encoder_in_loop_k1_kept", "tail_k2",
           "lora_k2", "encoder_in_loop_k2", "encoder_in_loop_k2_kept")


def _blocks(config: str) -> int:
    return int(config.split("_k")[1][0])


def one(config: str, steps: int, precision: str = "fp32", device_name: str = "cpu") -> dict:
    from contextlib import nullcontext

    import torch

    import samcache.models.encoder_tail
    from samcache.devices import keep_freed_memory
    from samcache.models.decoder import compute_loss
    from samcache.models.encoder_tail import TailedDecoder, add_lora, tail_parameters
    from samcache.models.families import family_of
    from samcache.models.prompts import PromptBatch

    loop = config.startswith("encoder_in_loop")
    if not loop or config.endswith("_kept"):
        keep_freed_memory()
    if config.endswith("_stock"):
        samcache.models.encoder_tail.vit_attention_in_chunks = lambda blocks: nullcontext()
    device = torch.device(device_name)
    torch.manual_seed(0)
    family = family_of("vit_b")
    sam = family.build("vit_b").to(device)
    sam.requires_grad_(False)
    image = torch.randn(1, 3, 1024, 1024).to(device)
    with torch.no_grad():
        split = family.encoder_module(sam, 2)(image)
    embedding, tokens2 = split[:, :256], split[:, 256:]
    with torch.no_grad():
        tokens1 = sam.image_encoder.blocks[10](tokens2.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    boxes = torch.tensor([[100.0, 100.0, 400.0, 380.0], [500, 200, 900, 700], [50, 600, 300, 1000],
                          [600, 650, 1000, 1000]])
    prompts = PromptBatch.boxes_of_one_image(boxes).to(device)
    targets = (torch.rand(4, 256, 256) > 0.5).float().to(device)
    decoder = family.decoder(sam, "vit_b")
    sam.mask_decoder.requires_grad_(True)
    params = list(sam.mask_decoder.parameters())
    features = embedding
    if config != "decoder" and not loop:
        blocks = _blocks(config)
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
    if loop:
        blocks = _blocks(config)
        encoder = sam.image_encoder
        split_at = len(encoder.blocks) - blocks
        tail_params = [p for block in encoder.blocks[split_at:] for p in block.parameters()]
        tail_params += list(encoder.neck.parameters())
        for p in tail_params:
            p.requires_grad_(True)
        params += tail_params

        def forward(_features, batch):
            with torch.no_grad():  # the frozen blocks need no graph
                x = encoder.patch_embed(image) + encoder.pos_embed
                for block in encoder.blocks[:split_at]:
                    x = block(x)
            for block in encoder.blocks[split_at:]:
                x = block(x)
            return decoder(encoder.neck(x.permute(0, 3, 1, 2)), batch)
    else:
        def forward(_features, batch):
            return decoder(_features, batch)
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    trained = sum(p.numel() for p in params)
    times = []
    for step in range(steps + 1):
        started = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            output = forward(features, prompts)
        loss = compute_loss(output, targets, prompts.multimask, "sam").total
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if step:  # the first step warms up
            times.append(time.perf_counter() - started)
    # on a GPU the peak of its memory, else the process's resident memory
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"config": config, "seconds_per_step": statistics.median(times), "trained_parameters": trained,
            "peak_mib": peak / 2**20, "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                        help="bf16: every configuration's forward under bf16 autocast (the encoder in the loop too)")
    parser.add_argument("--configs", default=",".join(CONFIGS), help="which configurations, comma-separated")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (on a GPU the tail's attention is the stock one "
                                                       "and the peak is the GPU's memory)")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.steps, args.precision, args.device)))
        return
    results: dict[str, list[dict]] = {c: [] for c in args.configs.split(",")}
    for _ in range(args.rounds):
        for config in results:
            out = subprocess.run([sys.executable, __file__, "--one", config, "--steps", str(args.steps),
                                  "--precision", args.precision, "--device", args.device],
                                 check=True, capture_output=True, text=True).stdout
            results[config].append(json.loads(out.strip().splitlines()[-1]))

    def median(config: str) -> float | None:
        return statistics.median(r["seconds_per_step"] for r in results[config]) if config in results else None

    peak = "GPU memory" if args.device != "cpu" else "RSS"
    print("| trained | s / step | the encoder in the loop, as users run it: s / step, ratio | the same with samcache's "
          f"allocator setting: s / step, ratio | trained parameters | peak {peak} MiB |")
    print("|---|---|---|---|---|---|")
    for config, rows in results.items():
        seconds = median(config)
        versus = []
        for suffix in ("", "_kept"):
            loop = median(f"encoder_in_loop_k{_blocks(config)}{suffix}") if "_k" in config else None
            versus.append(f"{loop:.2f}, {loop / seconds:.1f}x" if loop and not config.startswith("encoder") else "-")
        print(f"| {config} | {seconds:.2f} | {versus[0]} | {versus[1]} | {rows[0]['trained_parameters']:,} | "
              f"{max(r['peak_mib'] for r in rows):.0f} |")


if __name__ == "__main__":
    main()
