"""Benchmark: training epochs with glibc's default allocator settings against the memory kept.

`samcache train` keeps the memory its steps free (devices.keep_freed_memory). This times whole
epochs of the demo's recipe (batch 4 x 4 objects, lr 1e-3, SAM's loss, no validation) on a cache,
each configuration in its own process (the allocator setting is per process), alternating over
`--rounds`: one warm-up epoch, then `--epochs` timed. Printed per configuration: prompts/s, the
process's user and system CPU seconds and minor page faults over the timed epochs, peak RSS.

    python benchmarks/bench_train_allocator.py --cache cache/stamps --rounds 2 --epochs 3
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from samcache.devices import cpu_description  # noqa: E402


def one_run(cache: Path, precision: str, keep: bool, epochs: int) -> dict:
    from samcache.cache.reader import EmbeddingCache
    from samcache.config import TrainConfig
    from samcache.devices import keep_freed_memory
    from samcache.distributed import SINGLE
    from samcache.train.runs import RunFolder, RunWriter, TrainState
    from samcache.train.trainer import Training, _splits, train_epoch

    if keep:
        assert keep_freed_memory()
    embeddings = EmbeddingCache(cache)
    config = TrainConfig(workers=0, epochs=epochs + 1, save_every=None, precision=precision, lr=1e-3,
                         batch_size=4, objects_per_image=4)
    with tempfile.TemporaryDirectory() as folder:
        run = RunFolder(Path(folder) / "run")
        t = Training.setup(embeddings, run, config, _splits(embeddings, config, SINGLE), resume=False, dist=SINGLE)
        writer, state = RunWriter(run, enabled=False), TrainState(history=[0.0])
        train_epoch(t, state, writer, 0, progress=False)
        before, started, prompts = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter(), 0
        for epoch in range(1, epochs + 1):
            prompts += train_epoch(t, state, writer, epoch, progress=False)
        seconds, after = time.perf_counter() - started, resource.getrusage(resource.RUSAGE_SELF)
    return {"prompts_per_s": prompts / seconds, "user_s": after.ru_utime - before.ru_utime,
            "system_s": after.ru_stime - before.ru_stime, "minor_faults": after.ru_minflt - before.ru_minflt,
            "peak_rss_mib": after.ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache", type=Path, default=REPO / "cache" / "stamps")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--one", nargs=2, metavar=("PRECISION", "MEMORY"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_run(args.cache, args.one[0], args.one[1] == "kept", args.epochs)))
        return
    configs = [(p, m) for p in ("bf16", "fp32") for m in ("default", "kept")]
    results = {c: [] for c in configs}
    print(f"CPU: {cpu_description()}", flush=True)
    for r in range(args.rounds):
        for config in configs if r % 2 == 0 else list(reversed(configs)):
            out = subprocess.run([sys.executable, __file__, "--cache", str(args.cache), "--epochs", str(args.epochs),
                                  "--one", *config], capture_output=True, text=True, check=True)
            results[config].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"round {r + 1}: {config}: {results[config][-1]}", flush=True)
    print("\n| precision | freed memory | prompts/s | per round | user s | system s | minor faults | peak RSS MiB |")
    print("| --- | --- | ---: | --- | ---: | ---: | ---: | ---: |")
    for (precision, memory), runs in results.items():
        def mean(key):
            return statistics.mean(run[key] for run in runs)
        per_round = ", ".join(f"{run['prompts_per_s']:.2f}" for run in runs)
        print(f"| {precision} | {memory} | {mean('prompts_per_s'):.2f} | {per_round} | {mean('user_s'):.1f} | "
              f"{mean('system_s'):.1f} | {mean('minor_faults'):,.0f} | {mean('peak_rss_mib'):,.0f} |")


if __name__ == "__main__":
    main()
