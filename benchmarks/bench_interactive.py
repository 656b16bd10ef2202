"""Benchmark: box training vs SAM's interactive recipe (`--prompt interactive`), on the demo's stamps.

Part 1, quality. Each variant is a `samcache train` run on the demo's cache (the pretrained tiny,
the demo's batch and rate, with the dice + BCE loss or --loss sam, the demo's), then `samcache eval` on
the test split with box and point prompts and 5 clicks of the click protocol. Variants (the same
epochs, --epochs, and seed):

  box           --prompt box (the demo's run)
  mixed         --prompt mixed (a box or, with probability 0.5, a point per object)
  box+points    --prompt box+points (the box and a point in one prompt)
  feedback      --prompt interactive --mask-prompt-prob 1 (SAM's counts: 8 corrective points,
                mask feedback on every pass, detached)
  half-feedback --prompt interactive --mask-prompt-prob 0.5 (micro-sam's choice; the default)
  no-feedback   --prompt interactive --mask-prompt-prob 0 (the points alone, 9 passes)
  backprop      --prompt interactive --mask-prompt-prob 1 --mask-prompt-gradient backprop (SAM 2's)
  3-trained     --prompt interactive --trained-passes 3 (the default's passes, 3 of the 11
                backpropagated, the others forward only)
  half-feedback-lr1e-4  the default recipe at --lr 1e-4 (samcache train's default rate) instead
                of the demo's 1e-3
With --seeds 0,1,2 every variant trains once per seed (the runs' shuffles, prompts and clicks
differ; the test prompts do not) and the table adds each variant's mean over the seeds. The demo's
test split holds 11 objects; --eval-cache scores the runs on other pages embedded with the same
model (e.g. `samcache data stamps --seed 7`, all of its --eval-split train pages held out).

Part 2, cost. One process, the same batches (the train split, batch 4 x 4 objects), steps of each
kind interleaved round by round: the box step, and the interactive step with the defaults (mask
feedback on half the passes, detached), with mask feedback on every pass detached and with backprop,
without feedback, and with 3 of the default's passes backpropagated; prompts/s counts each prompt once per step
(not per pass). Peak memory, measured first: each kind alone in a fresh subprocess, its max RSS
after one step (a backprop step of 16 prompts peaks at 15 GiB).

Every finished run and report is kept in --work and skipped on the next call; an interrupted run
resumes from its last.pt, so the whole benchmark can be stopped and started again.

    python benchmarks/bench_interactive.py --cache cache/stamps --work /tmp/bench_interactive
    python benchmarks/bench_interactive.py --cache cache/stamps --work /tmp/bench_interactive --only cost
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DEMO_TRAIN = ["--lr", "1e-3", "--batch-size", "4", "--objects-per-image", "4"]
VARIANTS = {
    "box": ["--prompt", "box"],
    "mixed": ["--prompt", "mixed"],
    "box+points": ["--prompt", "box+points"],
    "feedback": ["--prompt", "interactive", "--mask-prompt-prob", "1"],
    "half-feedback": ["--prompt", "interactive", "--mask-prompt-prob", "0.5"],
    "no-feedback": ["--prompt", "interactive", "--mask-prompt-prob", "0"],
    "backprop": ["--prompt", "interactive", "--mask-prompt-prob", "1", "--mask-prompt-gradient", "backprop"],
    "3-trained": ["--prompt", "interactive", "--mask-prompt-prob", "0.5", "--trained-passes", "3"],
    "half-feedback-lr1e-4": ["--prompt", "interactive", "--mask-prompt-prob", "0.5", "--lr", "1e-4"],
}
CLICKS = 5
COST_KINDS = ("box step", "interactive, default", "interactive, detached", "interactive, backprop",
              "interactive, no feedback", "interactive, 3 trained passes")


def samcache(*args) -> None:
    command = [sys.executable, "-m", "samcache", *map(str, args)]
    print("$ samcache " + " ".join(map(str, args)), flush=True)
    subprocess.run(command, cwd=REPO, check=True)


def _same_options(run: Path, epochs: int, loss: str) -> None:
    """A kept run is reused only if it was trained with this call's --epochs and --loss."""
    import yaml

    if (run / "config.yaml").exists():
        config = yaml.safe_load((run / "config.yaml").read_text())
        if (config["epochs"], config["loss"]) != (epochs, loss):
            sys.exit(f"{run} was trained with --epochs {config['epochs']} --loss {config['loss']}, not "
                     f"--epochs {epochs} --loss {loss}: give another --work for other options")


def quality(cache: Path, work: Path, variants: list[str], epochs: int, loss: str, seeds: list[int],
            eval_cache: Path, eval_split: str) -> dict:
    """variant -> seed -> the summary of `eval_cache`'s `eval_split` and the run's training figures."""
    results: dict = {}
    reports = work / "reports"
    if (eval_cache.resolve(), eval_split) != (cache.resolve(), "test"):
        reports = work / f"reports-{eval_cache.resolve().name}-{eval_split}"
    for seed in seeds:
        for name in variants:
            label = name if seed == 0 else f"{name}-seed{seed}"  # seed 0's folders keep their plain names
            run, report = work / "runs" / label, reports / label
            started = time.time()
            _same_options(run, epochs, loss)
            if not (run / "run.json").exists() or "result" not in json.loads((run / "run.json").read_text()):
                resume = ["--resume"] if (run / "last.pt").exists() else []
                samcache("train", cache, "--out", run, "--epochs", epochs, "--loss", loss, *DEMO_TRAIN, *VARIANTS[name],
                         "--seed", seed, *resume)
            if not (report / "summary.json").exists():
                samcache("eval", eval_cache, "--run", run, "--out", report, "--split", eval_split,
                         "--prompt", "box,point", "--clicks", CLICKS, "--overwrite")
            summary = json.loads((report / "summary.json").read_text())
            result = json.loads((run / "run.json").read_text())["result"]
            results.setdefault(name, {})[seed] = {"summary": summary, "train_seconds": result["seconds"],
                                                  "prompts_per_s": result["samples_per_second"],
                                                  "wall": time.time() - started}
    return results


def quality_figures(summary: dict, model: str) -> list[float]:
    """box mIoU, point mIoU, mIoU after 1..CLICKS clicks, NoC85, NoC90."""
    clicks = summary["clicks"][model]
    return [summary["by_prompt"]["box"][model]["miou"], summary["by_prompt"]["point"][model]["miou"],
            *clicks["miou"], clicks["noc85"], clicks["noc90"]]


def quality_table(results: dict) -> str:
    first = next(iter(next(iter(results.values())).values()))["summary"]
    rows = ["| model | box mIoU | point mIoU | " + " | ".join(f"{k} click{'s' if k > 1 else ''}"
                                                            for k in range(1, CLICKS + 1)) + " | NoC85 | NoC90 |",
            "| --- | ---: | ---: | " + " | ".join("---:" for _ in range(CLICKS)) + " | ---: | ---: |"]

    def row(label: str, figures: list[float]) -> str:
        cells = [f"{v:.3f}" for v in figures[:-2]] + [f"{v:.2f}" for v in figures[-2:]]
        return f"| {label} | " + " | ".join(cells) + " |"

    box_fill = first["by_prompt"]["box"]["baselines"]["box_fill"]["miou"]
    rows.append(f"| box-fill baseline | {box_fill:.3f} | | " + " | ".join("" for _ in range(CLICKS)) + " | | |")
    rows.append(row("zero-shot (pretrained tiny)", quality_figures(first, "zero_shot")))
    for name, by_seed in results.items():
        per_seed = {seed: quality_figures(r["summary"], "fine_tuned") for seed, r in by_seed.items()}
        for seed, figures in per_seed.items():
            rows.append(row(f"trained: {name}, seed {seed}", figures))
        if len(per_seed) > 1:
            mean = [statistics.mean(column) for column in zip(*per_seed.values())]
            rows.append(row(f"**trained: {name}, mean of {len(per_seed)} seeds**", mean))
    return "\n".join(rows)


# --------------------------------------------------------------------------------------- cost
def cost_setup(cache_dir: Path, work: Path):
    import torch

    from samcache.cache.reader import EmbeddingCache
    from samcache.config import PromptSettings, TrainConfig
    from samcache.distributed import SINGLE
    from samcache.models.prompts import trained_passes
    from samcache.train.runs import RunFolder
    from samcache.train.samples import CacheSamples, EpochBatches, SampleSettings, collate
    from samcache.train.trainer import Training, _splits

    cache = EmbeddingCache(cache_dir)
    modes = {
        "box step": PromptSettings(mode="box"),
        "interactive, default": PromptSettings(mode="interactive"),  # mask feedback on half the passes, detached
        "interactive, detached": PromptSettings(mode="interactive", mask_prompt_prob=1.0),
        "interactive, backprop": PromptSettings(mode="interactive", mask_prompt_prob=1.0,
                                                mask_prompt_gradient="backprop"),
        "interactive, no feedback": PromptSettings(mode="interactive", mask_prompt_prob=0.0),
        "interactive, 3 trained passes": PromptSettings(mode="interactive", trained_passes=3),
    }
    assert tuple(modes) == COST_KINDS
    config = TrainConfig(batch_size=4, objects_per_image=4, lr=1e-5, loss="dice-bce", workers=0, save_every=None,
                         cache_in_memory="yes")
    training = Training.setup(cache, RunFolder(work / "cost_run"), config, _splits(cache, config, SINGLE),
                              resume=False, dist=SINGLE)
    batches = {}
    for name, settings in modes.items():
        samples = CacheSamples(cache, SampleSettings.training(objects_per_image=4, prompts=settings, seed=0),
                               read_embeddings=False)
        sampler = EpochBatches(training.train_indices, 4, 0)
        # the step's trained passes drawn as the trainer draws them (from its first image; all for SAM's recipe)
        batches[name] = [training.step_inputs(collate([samples[key] for key in keys]), torch.from_numpy(
            trained_passes(settings, 0, *keys[0]))) for keys in sampler]
    return training, modes, batches, torch


def run_steps(training, settings, batches) -> int:
    training.config = training.config.model_copy(update={"prompts": settings})
    prompts = 0
    for batch in batches:
        prompts += training.step(batch).prompts
    return prompts


def cost(cache_dir: Path, work: Path, rounds: int, steps: int) -> dict:
    # Peaks first, one kind per fresh process, while this one holds nothing large: a backprop
    # step's memory beside a timing process's freed-but-kept blocks can exceed the machine's.
    peaks = {}
    for name in COST_KINDS:
        out = subprocess.run([sys.executable, __file__, "--cache", str(cache_dir), "--work", str(work),
                              "--peak-of", name], cwd=REPO, check=True, capture_output=True, text=True)
        peaks[name] = json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"]
        print(f"peak RSS: {name}: {peaks[name]:.0f} MiB", flush=True)
    training, modes, batches, torch = cost_setup(cache_dir, work)
    rates = {name: [] for name in modes}
    for name in modes:  # warm-up
        run_steps(training, modes[name], batches[name][:1])
    for r in range(rounds):
        for name in (modes if r % 2 == 0 else reversed(list(modes))):
            started = time.perf_counter()
            prompts = run_steps(training, modes[name], batches[name][:steps])
            rates[name].append(prompts / (time.perf_counter() - started))
            print(f"round {r + 1}: {name}: {rates[name][-1]:.2f} prompts/s", flush=True)
    return {"rates": rates, "peak_mib": peaks, "threads": torch.get_num_threads()}


def peak_of(cache_dir: Path, work: Path, name: str) -> None:
    training, modes, batches, _ = cost_setup(cache_dir, work / f"peak_{name.replace(' ', '_').replace(',', '')}")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    run_steps(training, modes[name], batches[name][:1])
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_mib": after / 1024, "growth_mib": (after - before) / 1024}))


def cost_table(result: dict) -> str:
    box = statistics.mean(result["rates"]["box step"])
    rows = ["| step | prompts/s | per round | time per prompt vs box | peak RSS (MiB) |",
            "| --- | ---: | --- | ---: | ---: |"]
    for name, values in result["rates"].items():
        mean = statistics.mean(values)
        rows.append(f"| {name} | {mean:.2f} | {', '.join(f'{v:.2f}' for v in values)} | {box / mean:.1f}x | "
                    f"{result['peak_mib'][name]:.0f} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache", type=Path, default=REPO / "cache" / "stamps")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_interactive"))
    parser.add_argument("--only", choices=("quality", "cost"))
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--epochs", type=int, default=4, help="epochs of every training run")
    parser.add_argument("--loss", default="dice-bce", help="the loss of every training run (the demo's: sam)")
    parser.add_argument("--seeds", default="0", help="comma-separated training seeds of the quality part")
    parser.add_argument("--eval-cache", type=Path, help="score the runs on this cache (default: --cache), e.g. "
                        "held-out pages embedded with the same model")
    parser.add_argument("--eval-split", default="test", help="the split of the scored cache (default: test)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=1, help="steps per round and kind in the cost part")
    parser.add_argument("--peak-of", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.peak_of:
        return peak_of(args.cache, args.work, args.peak_of)
    from samcache.devices import cpu_description

    print(f"CPU: {cpu_description()}", flush=True)
    if args.only != "cost":
        seeds = [int(seed) for seed in args.seeds.split(",")]
        results = quality(args.cache, args.work, args.variants.split(","), args.epochs, args.loss, seeds,
                          args.eval_cache or args.cache, args.eval_split)
        (args.work / "quality.json").write_text(json.dumps(results, indent=1))
        print(f"\nCPU: {cpu_description()}; {args.epochs} epochs, --loss {args.loss}")
        print(quality_table(results), flush=True)
        for name, by_seed in results.items():
            for seed, result in by_seed.items():
                print(f"{name}, seed {seed}: trained in {result['train_seconds']:.0f} s, "
                      f"{result['prompts_per_s']:.2f} prompts/s")
    if args.only != "quality":
        result = cost(args.cache, args.work, args.rounds, args.steps)
        (args.work / "cost.json").write_text(json.dumps(result, indent=1))
        print(f"\nCPU: {cpu_description()}")
        print(cost_table(result), flush=True)


if __name__ == "__main__":
    main()
