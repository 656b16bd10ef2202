"""Where a training step's time goes, box step against SAM's interactive recipe: seconds in the
decoder's forward passes, the losses, the backward passes, the click sampler and mask feedback
(ClickSimulation), the optimizer, and the rest; per prompt and as shares of the step.

The same batches as benchmarks/bench_interactive.py's cost part (4 images x 4 objects, the
train split of CACHE, cache in memory), one warm-up step, then `--steps` steps of each kind. The
parts are timed by wrapping the functions that do them, so the shares are of wall time.

    python benchmarks/profile_interactive_step.py --cache cache/stamps --steps 4
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_interactive  # noqa: E402

from samcache.devices import cpu_description  # noqa: E402
from samcache.models import decoder  # noqa: E402
from samcache.train import interactive, step  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache", type=Path, default=Path("cache/stamps"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/profile_interactive_step"))
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    training, modes, batches, _ = bench_interactive.cost_setup(args.cache, args.work)
    seconds: dict[str, float] = collections.defaultdict(float)

    def timed(name, fn):
        def wrapper(*a, **k):
            started = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                seconds[name] += time.perf_counter() - started
        return wrapper

    interactive.ClickSimulation.update = timed("click sampler and mask feedback", interactive.ClickSimulation.update)
    interactive.ClickSimulation.prompts = timed("next prompts", interactive.ClickSimulation.prompts)
    decoder.SamPromptDecoder.forward = timed("decoder forward", decoder.SamPromptDecoder.forward)
    decoder.SamPromptDecoder.loss = timed("loss", decoder.SamPromptDecoder.loss)
    torch.Tensor.backward = timed("backward", torch.Tensor.backward)
    step._update = timed("optimizer", step._update)
    print(f"CPU: {cpu_description()}; torch {torch.__version__}")
    per_prompt = {}
    for name in ("box step", "interactive, default"):
        bench_interactive.run_steps(training, modes[name], batches[name][:1])
        seconds.clear()
        started = time.perf_counter()
        prompts = bench_interactive.run_steps(training, modes[name], batches[name][1:1 + args.steps])
        total = time.perf_counter() - started
        per_prompt[name] = total / prompts
        print(f"{name}: {prompts} prompts in {total:.2f} s, {per_prompt[name] * 1000:.0f} ms per prompt")
        for part, value in seconds.items():
            print(f"  {part}: {value:.2f} s ({value / total:.0%})")
        print(f"  the rest: {total - sum(seconds.values()):.2f} s")
    print(f"interactive / box, per prompt: {per_prompt['interactive, default'] / per_prompt['box step']:.1f}x")


if __name__ == "__main__":
    main()
