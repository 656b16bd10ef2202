"""Benchmark: `samcache embed` as a whole command against what a skilled user would write on a CPU.

Same weights on every side (random weights, seed 0, saved in the official layout: vit_b in Meta's,
its relative positions drawn N(0, 0.3^2), as SAM's init leaves them zero and trained checkpoints
do not, and samcache's converted encoder folds them into its attention's keys; vit_t in
MobileSAM's mobile_sam.pt), same synthetic stamp pages, in one run, methods interleaved per round
in ABBA order after one untimed warm-up image each. Several --model values run one after the other
on the same pages, in one invocation. The user's predictor is the model's own package:
segment_anything's SamPredictor for vit_b, MobileSAM's (mobile_sam, else mobilesam-lite's copy)
for vit_t, built by its sam_model_registry from the saved weights.

  loop fp32      per image: cv2.imread + cvtColor + SamPredictor.set_image (torch, fp32)
  loop bf16      the same under torch.autocast("cpu", bfloat16) (on CPUs with bf16 instructions)
  openvino loop  the user converts the encoder once (ov.convert_model, not timed), compiles it
                 for the CPU (bf16 inference precision where the CPU has bf16, else f32) and
                 runs: imread + cvtColor + SamPredictor's own preprocessing + infer
  samcache embed `python -m samcache embed ROUND --out CACHE --model vit_b --checkpoint W`,
                 defaults otherwise (OpenVINO backend on the CPU), a fresh process per round:
                 start-up, model load, hashing, decoding, encoder, shard writes, all of it.
                 Its conversion to OpenVINO happens once, before the rounds (reported).
  samcache embed, workers 2   the same with --workers 2 (decoding in 2 processes beside the
                 encoder; the default is none on the CPU: is that still right?)
  samcache embed --backend torch   the same on the torch backend (bf16 autocast where the CPU has
                 bf16): is auto's choice of OpenVINO on the CPU the faster one for this model?
  openvino script  benchmarks/openvino_user_script.py as a whole process per round: the
                 same start-up a samcache command pays (Python, imports, compiling the saved
                 model), then the loop, writing fp16 .npy files. Whole command against whole
                 command: the fair comparison for samcache's row.

The CPU's limit: a 4096-square bf16 (f32 without bf16) matmul on all cores, in torch and in
OpenVINO (the faster counts), over the encoder's cost per image (FlopCounterMode: vit_b 0.972
TFLOP, vit_t 0.0775 TFLOP; TinyViT's depthwise convolutions and small matmuls stay far from it).
The cache's size: bytes of the samcache cache's shard files per image (apparent and on disk).

The loops keep features in memory and exclude model loading; samcache's figure includes its
start-up, so it is the conservative side. Agreement: each method's embeddings against the fp32
loop's, cosine of the flattened 256x64x64 embedding (minimum over images).

    python benchmarks/bench_embed_cpu.py --images 8 --rounds 2 --work /tmp/bench_embed_cpu
    python benchmarks/bench_embed_cpu.py --model vit_t --model vit_b --images 4 --rounds 2
    python benchmarks/bench_embed_cpu.py --model tiny --images 2 --rounds 2   # smoke run
    python benchmarks/bench_embed_cpu.py --images 6 --rounds 2 --skip "loop bf16" --skip "samcache embed --" \
        --skip "openvino script"   # samcache against the OpenVINO loop only
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from samcache.cache.reader import EmbeddingCache  # noqa: E402
from samcache.devices import cpu_description, cpu_has_native_bf16  # noqa: E402
from samcache.models.weights import build_sam, build_seeded  # noqa: E402


def samcache(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "samcache", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, env=env)


# The encoder on one 1024x1024 input (torch's FlopCounterMode); the tiny model has no limit row.
TFLOP_PER_IMAGE = {"vit_b": 0.972, "vit_t": 0.0775}


def matmul_peak_tflops(bf16: bool, n: int = 4096, repeats: int = 5) -> dict:
    """TFLOPS of an n-square matmul on all cores, torch and OpenVINO, bf16 where the CPU has it."""
    import openvino as ov
    import openvino.opset13 as ops

    dtype = torch.bfloat16 if bf16 else torch.float32
    a = torch.randn(n, n, dtype=dtype)
    a @ a
    started = time.perf_counter()
    for _ in range(repeats):
        a @ a
    result = {"torch": 2 * n**3 * repeats / (time.perf_counter() - started) / 1e12}
    x, y = ops.parameter([n, n], np.float32), ops.parameter([n, n], np.float32)
    request = ov.Core().compile_model(ov.Model([ops.matmul(x, y, False, False)], [x, y]), "CPU",
                                      {"INFERENCE_PRECISION_HINT": "bf16" if bf16 else "f32"}).create_infer_request()
    m = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    request.infer([m, m])
    started = time.perf_counter()
    for _ in range(repeats):
        request.infer([m, m])
    result["openvino"] = 2 * n**3 * repeats / (time.perf_counter() - started) / 1e12
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", action="append", choices=["vit_b", "vit_t", "tiny"],
                        help="repeat to run several on the same pages (default vit_b)")
    parser.add_argument("--images", type=int, default=8, help="images per round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_embed_cpu"))
    parser.add_argument("--out", type=Path)
    parser.add_argument("--skip", action="append", default=[], metavar="METHOD",
                        help="leave out the methods whose name starts with this (e.g. 'loop bf16', "
                             "'samcache embed --workers'); the fp32 loop, the reference, always runs")
    args = parser.parse_args()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    print(f"CPU: {cpu_description()}; torch {torch.__version__}; native bf16: {cpu_has_native_bf16()}", flush=True)

    # One data set per round (+ a warm-up page), so that each samcache run embeds new images.
    rounds = []
    for r in range(args.rounds + 1):
        folder = work / f"round{r}"
        if not (folder / "train.json").exists():
            n = 1 if r == 0 else args.images
            samcache("data", "stamps", "--out", folder, "--n", n, "--seed", 100 + r, "--overwrite").check_returncode()
        rounds.append(sorted((folder / "images").iterdir()))
    bf16 = cpu_has_native_bf16()
    peak = matmul_peak_tflops(bf16)
    print(f"matmul peak ({'bf16' if bf16 else 'f32'}, 4096 square): torch {peak['torch']:.3f}, "
          f"openvino {peak['openvino']:.3f} TFLOPS", flush=True)
    results = {}
    for model in args.model or ["vit_b"]:
        results[model] = bench_model(model, rounds, work, args.images, peak, tuple(args.skip))
    if args.out:
        args.out.write_text(json.dumps({"cpu": cpu_description(), "matmul_peak_tflops": peak, "models": results},
                                       indent=2))


def build_user_model(model: str, weights: Path):
    """The model and SamPredictor a user of `model`'s own package builds from the saved weights."""
    if model == "vit_t":
        from samcache.deploy.export import import_mobile_sam

        mobile_sam = import_mobile_sam()
        # .eval() after loading: TinyViT copies its attention biases when .eval() is called.
        sam = mobile_sam.sam_model_registry["vit_t"](checkpoint=str(weights)).eval()
        return sam, mobile_sam.SamPredictor(sam)
    from segment_anything import SamPredictor

    sam = build_sam(model).eval()
    sam.load_state_dict(torch.load(weights, weights_only=True))
    return sam, SamPredictor(sam)


def shard_bytes_per_image(cache: Path) -> dict:
    """The cache's shard files per image: apparent size and blocks on disk."""
    shards = list((cache / "shards").glob("*.h5"))
    images = len(EmbeddingCache(cache))
    return {"apparent": sum(p.stat().st_size for p in shards) / images,
            "on_disk": sum(p.stat().st_blocks * 512 for p in shards) / images}


def bench_model(model: str, rounds: list, work: Path, images: int, peak: dict, skip: tuple = ()) -> dict:
    """Times every method on `model` over `rounds` (the first is the warm-up) and prints its table."""
    env = dict(os.environ, SAMCACHE_HOME=str(work / "home"))
    weights = work / f"{model}_random.pth"
    if not weights.exists():
        if model == "vit_t":
            torch.save(build_seeded("vit_t", 0).state_dict(), weights)
        else:
            torch.manual_seed(0)
            state = build_sam(model).state_dict()
            for key in [k for k in state if ".rel_pos_" in k]:
                state[key] = torch.randn(state[key].shape) * 0.3
            torch.save(state, weights)
    sam, predictor = build_user_model(model, weights)
    print(f"\n{model}", flush=True)

    import openvino as ov
    core = ov.Core()
    started = time.time()
    ov_model = ov.convert_model(sam.image_encoder, example_input=torch.zeros(1, 3, 1024, 1024))
    user_conversion = time.time() - started
    bf16 = cpu_has_native_bf16()
    compiled = core.compile_model(ov_model, "CPU", {"INFERENCE_PRECISION_HINT": "bf16" if bf16 else "f32"})
    request = compiled.create_infer_request()
    user_xml = work / f"user-encoder-{model}.xml"
    if not user_xml.exists():
        ov.save_model(ov_model, str(user_xml), compress_to_fp16=False)

    started = time.time()  # samcache's own one-off conversion, into its SAMCACHE_HOME
    warm = samcache("embed", work / "round0", "--out", work / f"warm-cache-{model}", "--model", model,
                    "--checkpoint", weights, env=env)
    warm.check_returncode()
    samcache_first_run = time.time() - started

    def loop(paths, autocast: bool):
        out = {}
        for p in paths:
            image = cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                predictor.set_image(image)
            out[p.name] = predictor.features[0].float().numpy()
        return out

    def openvino_loop(paths):
        out = {}
        for p in paths:
            image = cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB)
            resized = predictor.transform.apply_image(image)
            tensor = torch.as_tensor(resized).permute(2, 0, 1).contiguous()[None]
            x = sam.preprocess(tensor.float()).numpy()
            out[p.name] = request.infer([x])[0][0].copy()
        return out

    def samcache_embed(paths, extra):
        folder = paths[0].parents[1]
        cache = work / f"cache-{model}-{folder.name}-{'-'.join(extra) or 'defaults'}"
        shutil.rmtree(cache, ignore_errors=True)
        result = samcache("embed", folder, "--out", cache, "--model", model, "--checkpoint", weights, *extra,
                          env=env)
        assert result.returncode == 0, result.stderr[-2000:]
        if not extra:
            sizes.append(shard_bytes_per_image(cache))
        inside = re.search(r"embedded \d+ images in ([0-9.]+) s", result.stdout + result.stderr)
        if inside:
            in_command[" ".join(extra)].append(float(inside.group(1)))
        encoding = re.search(r"([0-9.]+) images/s once the encoder was open", result.stdout + result.stderr)
        if encoding:
            in_encoding[" ".join(extra)].append(float(encoding.group(1)))
        c = EmbeddingCache(cache)
        return {c.name_of(i).split("/")[-1]: c.embedding(i).astype(np.float32) for i in range(len(c))}

    def openvino_script(paths):
        folder = paths[0].parent
        out = work / f"user-out-{model}-{folder.parent.name}"
        shutil.rmtree(out, ignore_errors=True)
        subprocess.run([sys.executable, str(REPO / "benchmarks" / "openvino_user_script.py"), user_xml, folder, out,
                        "bf16" if bf16 else "f32"], check=True, capture_output=True)
        names = {p.stem: p.name for p in paths}
        return {names[p.stem]: np.load(p).astype(np.float32) for p in out.iterdir()}

    sizes, in_command = [], {"": [], "--workers 2": [], "--backend torch": []}
    in_encoding = {k: [] for k in in_command}
    methods = {
        "loop fp32": lambda paths: loop(paths, False),
        # Without bf16 instructions autocast emulates bf16 and only slows the loop down: not a rival there.
        **({"loop bf16 autocast": lambda paths: loop(paths, True)} if bf16 else {}),
        f"openvino loop ({'bf16' if bf16 else 'f32'})": openvino_loop,
        "samcache embed (defaults)": lambda paths: samcache_embed(paths, []),
        "samcache embed --workers 2": lambda paths: samcache_embed(paths, ["--workers", "2"]),
        "samcache embed --backend torch": lambda paths: samcache_embed(paths, ["--backend", "torch"]),
        "openvino script, whole process": openvino_script,
    }
    methods = {name: fn for name, fn in methods.items()
               if name == "loop fp32" or not any(name.startswith(prefix) for prefix in skip)}
    for name, fn in methods.items():
        if not name.startswith("samcache"):  # samcache's warm-up was its conversion run above
            fn(rounds[0])
    seconds = {name: [] for name in methods}
    outputs = {name: {} for name in methods}
    for r in range(1, len(rounds)):
        order = list(methods) if r % 2 else list(reversed(methods))
        for name in order:
            started = time.perf_counter()
            outputs[name].update(methods[name](rounds[r]))
            seconds[name].append(time.perf_counter() - started)
            print(f"round {r}: {name}: {images / seconds[name][-1]:.4f} images/s", flush=True)

    reference = outputs["loop fp32"]

    def agreement(name):
        cos = [float(np.dot(reference[k].ravel(), v.ravel()) / np.linalg.norm(reference[k]) / np.linalg.norm(v))
               for k, v in outputs[name].items()]
        return min(cos)

    total = images * (len(rounds) - 1)
    base = total / sum(seconds["loop fp32"])
    rows = []
    for name in methods:
        rate = total / sum(seconds[name])
        rows.append({"method": name, "images_per_s": rate, "vs_loop_fp32": rate / base,
                     "per_round": [images / s for s in seconds[name]], "min_cosine_vs_fp32": agreement(name)})
    ov_rate = next(r["images_per_s"] for r in rows if r["method"].startswith("openvino"))
    print(f"\nCPU: {cpu_description()}; {model}, {(len(rounds) - 1)} rounds of {images} images")
    limit = max(peak.values()) / TFLOP_PER_IMAGE[model] if model in TFLOP_PER_IMAGE else None
    if limit:
        print(f"CPU limit: {limit:.3f} images/s ({max(peak.values()):.3f} TFLOPS / {TFLOP_PER_IMAGE[model]} TFLOP "
              "per image)")
    size = {k: float(np.mean([v[k] for v in sizes])) for k in sizes[0]}
    print(f"samcache's cache: {size['apparent'] / 2**20:.2f} MiB of shards per image "
          f"({size['on_disk'] / 2**20:.2f} MiB on disk)")
    inside = {k: images * len(v) / sum(v) for k, v in in_command.items() if v}
    print("samcache embed inside the command (its own summary: after start-up and model load): "
          + ", ".join(f"{k or 'defaults'} {v:.4f} images/s" for k, v in inside.items()))
    once_open = {k: statistics.median(v) for k, v in in_encoding.items() if v}
    print("samcache embed once its encoder was open (its summary, median of rounds): "
          + ", ".join(f"{k or 'defaults'} {v:.4f} images/s ({v / ov_rate:.2f}x the OpenVINO loop)"
                      for k, v in once_open.items()))
    print(f"one-off conversions: the user's ov.convert_model {user_conversion:.0f} s; samcache's first run "
          f"(conversion + 1 image) {samcache_first_run:.0f} s")
    print("| method | images/s | vs loop fp32 | vs OpenVINO loop | per round | min cosine vs fp32 loop |")
    print("| --- | ---: | ---: | ---: | --- | ---: |")
    for r in rows:
        print(f"| {r['method']} | {r['images_per_s']:.4f} | {r['vs_loop_fp32']:.2f}x | "
              f"{r['images_per_s'] / ov_rate:.2f}x | {', '.join(f'{v:.4f}' for v in r['per_round'])} | "
              f"{r['min_cosine_vs_fp32']:.6f} |")
    return {"rows": rows, "user_conversion_s": user_conversion, "limit_images_per_s": limit,
            "samcache_first_run_s": samcache_first_run, "shard_bytes_per_image": size,
            "samcache_inside_command_images_per_s": inside, "samcache_once_encoder_open_images_per_s": once_open}


if __name__ == "__main__":
    main()
