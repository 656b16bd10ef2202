"""torchrun on CPU (gloo, 2 processes): `samcache embed` and `samcache train` as several ranks.

Every rank runs with OMP_NUM_THREADS=1, and so does the single-process reference, so the two
compute each image's embedding with the same kernels and the comparisons can be exact.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from samcache.cache.reader import EmbeddingCache
from samcache.models.weights import load_sam
from samcache.train.runs import RunCheckpoint
from tests.helpers import STAMPS_PAGES, small_vit

pytestmark = pytest.mark.slow

EMBED_OPTIONS = ["--model", "tiny", "--batch-size", "1", "--workers", "0", "--shard-images", "1"]
# batch_size: global batches over the shared set's train images must leave the last with one image (_steps_per_epoch).
TRAIN_CONFIG = {
    "epochs": 2, "batch_size": 2, "objects_per_image": 2, "lr": 1e-3, "loss": "dice-bce", "warmup_steps": 2,
    "workers": 0, "seed": 0, "cache_in_memory": "no", "save_every": 2,
    # fp32: the equality below is of the gradients' arithmetic; bf16's rounding differs with the
    # summation order (its trajectory against fp32's: tests/test_train.py).
    "precision": "fp32",
}


def _run(args: list[str], *, processes: int, crash_at: str | None = None, crash_rank: int | None = None,
         entry_point: bool = False, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    for key in ("SAMCACHE_CRASH_AT", "SAMCACHE_CRASH_RANK", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    if crash_at:
        env["SAMCACHE_CRASH_AT"] = crash_at
    if crash_rank is not None:
        env["SAMCACHE_CRASH_RANK"] = str(crash_rank)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
    if entry_point:  # the installed `samcache` script: torchrun --no-python samcache ...
        command = launcher + ["--no-python", str(Path(sys.executable).parent / "samcache"), *args]
    else:
        command = (launcher if processes > 1 else [sys.executable]) + ["-m", "samcache", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


def _ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def _embeddings(cache_dir: Path) -> dict[str, np.ndarray]:
    cache = EmbeddingCache(cache_dir)
    return {info.name: cache.embedding(info.index) for info in cache.images}


def _file_digests(cache_dir: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((cache_dir / "shards").glob("*.h5"))}


# The data set is conftest's shared `stamps`: embedding only reads it, every cache and run is written under `work`.
@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("dist")


@pytest.fixture(scope="module")
def single_cache(stamps, work) -> Path:
    """Its own reference cache, not the shared one: one process, OMP_NUM_THREADS=1 like the ranks, 1 image a shard."""
    cache_dir = work / "cache_single"
    _ok(_run(["embed", str(stamps), "--out", str(cache_dir), *EMBED_OPTIONS], processes=1))
    return cache_dir


def test_torchrun_embed_equals_single_process(stamps, single_cache, work):
    n = STAMPS_PAGES
    cache_dir = work / "cache_two"
    out = _ok(_run(["embed", str(stamps), "--out", str(cache_dir), *EMBED_OPTIONS], processes=2))
    assert f"embedded {n} images" in out and "(2 processes)" in out
    assert out.count(f"embedded {n} images") == 1  # only rank 0 prints the summary

    shards = sorted(p.name for p in (cache_dir / "shards").glob("*.h5"))
    assert {name.split("-")[1] for name in shards} == {"r0000", "r0001"}  # each rank committed its own
    assert len(shards) == n and not list((cache_dir / "shards").glob("*.tmp"))
    expected, got = _embeddings(single_cache), _embeddings(cache_dir)
    assert sorted(got) == sorted(expected)
    for name in expected:
        assert np.array_equal(got[name], expected[name]), name

    single, two = EmbeddingCache(single_cache), EmbeddingCache(cache_dir)
    assert two.info()["objects"] == single.info()["objects"]
    assert two.describe_splits() == single.describe_splits()
    assert [(i.name, i.split, i.file.sha256, [o.rle["counts"] for o in i.objects]) for i in two.images] == \
        [(i.name, i.split, i.file.sha256, [o.rle["counts"] for o in i.objects]) for i in single.images]
    assert two.superseded == 0

    rerun = _ok(_run(["embed", str(stamps), "--out", str(cache_dir), *EMBED_OPTIONS], processes=2))
    assert f"nothing to embed: all {n} images are already in" in rerun
    assert sorted(p.name for p in (cache_dir / "shards").glob("*.h5")) == shards


def test_torchrun_embed_one_rank_killed_then_rerun_completes(stamps, single_cache, work):
    n = STAMPS_PAGES
    cache_dir = work / "cache_killed"
    killed = _run(["embed", str(stamps), "--out", str(cache_dir), *EMBED_OPTIONS], processes=2,
                  crash_at="shard-committed:2", crash_rank=1)
    assert killed.returncode != 0  # torchrun reports the failed rank and stops the other
    committed = _file_digests(cache_dir)
    n_committed = len(EmbeddingCache(cache_dir))
    assert 2 <= n_committed < n, (n_committed, killed.stderr[-2000:])

    out = _ok(_run(["embed", str(stamps), "--out", str(cache_dir), *EMBED_OPTIONS], processes=2, entry_point=True))
    assert f"embedded {n - n_committed} images" in out, out  # nothing committed is embedded again
    after = _file_digests(cache_dir)
    assert {name: after[name] for name in committed} == committed  # committed shards untouched
    cache = EmbeddingCache(cache_dir)
    assert len(cache) == n and cache.superseded == 0
    assert not list((cache_dir / "shards").glob("*.tmp"))
    expected, got = _embeddings(single_cache), _embeddings(cache_dir)
    for name in expected:
        assert np.array_equal(got[name], expected[name]), name


def _train(cache_dir: Path, run_dir: Path, *, processes: int, resume: bool = False, **crash) -> str:
    config = run_dir.parent / f"{run_dir.name}.yaml"
    config.write_text("".join(f"{k}: {v}\n" for k, v in TRAIN_CONFIG.items()))
    args = ["train", str(cache_dir), "--out", str(run_dir), "--config", str(config)] + (["--resume"] if resume else [])
    result = _run(args, processes=processes, **crash)
    if crash:
        assert result.returncode != 0
        return result.stdout
    return _ok(result)


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return RunCheckpoint.read(run_dir / "last.pt").state_dict


def _steps_per_epoch(cache_dir: Path) -> int:
    """Global batches of TRAIN_CONFIG's batch_size over the train images, the last with just one image,
    so that rank 1 sits out one step an epoch with a zero-weight placeholder (what the tests rely on)."""
    n_train, batch = len(EmbeddingCache(cache_dir).annotated_indices("train")), TRAIN_CONFIG["batch_size"]
    assert n_train % batch == 1, (n_train, batch)
    return -(-n_train // batch)


def _steps(run_dir: Path) -> list[dict]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if r["type"] == "step"]


@pytest.fixture(scope="module")
def two_process_run(single_cache) -> Path:
    run_dir = single_cache.parent / "run_two"
    out = _train(single_cache, run_dir, processes=2)
    # Only rank 0 prints.
    assert out.count("validation mIoU before training") == 1 and out.count("trained 2 epochs") == 1
    assert "over 2 processes" in out
    return run_dir


def test_torchrun_train_equals_single_process_with_the_same_global_batch(single_cache, two_process_run):
    single_run = single_cache.parent / "run_single"
    _train(single_cache, single_run, processes=1)

    single_steps, two_steps = _steps(single_run), _steps(two_process_run)
    # The train images in global batches: the last with one image, so rank 1 sits out one step
    # per epoch with a zero-weight placeholder.
    assert [(s["epoch"], s["step"], s["prompts"]) for s in two_steps] == \
        [(s["epoch"], s["step"], s["prompts"]) for s in single_steps]
    assert len(two_steps) == TRAIN_CONFIG["epochs"] * _steps_per_epoch(single_cache)
    np.testing.assert_allclose([s["loss"] for s in two_steps], [s["loss"] for s in single_steps], rtol=1e-4)

    single_weights, two_weights = _weights(single_run), _weights(two_process_run)
    assert single_weights.keys() == two_weights.keys()
    base = load_sam("tiny").sam.mask_decoder.state_dict()
    # Summation order differs (an all-reduce of two partial gradients), and Adam divides by each
    # gradient's own scale, so what training moved is compared, tensor by tensor: the two runs'
    # updates agree to 1% (seen: 0.1% at worst). Attention keys' biases are left out: softmax
    # ignores them, their exact gradient is zero, and Adam turns the rounding noise in its place
    # into full-size steps that differ between any two summation orders.
    compared = 0
    for key, start in base.items():
        if key.endswith("k_proj.bias"):
            continue
        moved_single = single_weights[f"mask_decoder.{key}"] - start
        moved_two = two_weights[f"mask_decoder.{key}"] - start
        assert (moved_two - moved_single).norm() <= 0.01 * moved_single.norm() + 1e-7, key
        compared += bool(moved_single.norm() > 1e-4)
    assert compared > len(base) // 2  # training moved most tensors: the agreement is not trivial
    history_single = RunCheckpoint.read(single_run / "last.pt").state.history
    history_two = RunCheckpoint.read(two_process_run / "last.pt").state.history
    np.testing.assert_allclose(history_two, history_single, atol=1e-4)


def test_torchrun_train_killed_mid_epoch_resumes_to_the_uninterrupted_weights(single_cache, two_process_run):
    run_dir = single_cache.parent / "run_killed"
    assert _steps_per_epoch(single_cache) >= 3  # so the kill at step 3 is inside epoch 1, after the step-2 save
    _train(single_cache, run_dir, processes=2, crash_at="train-step:3", crash_rank=0)
    saved = RunCheckpoint.read(run_dir / "last.pt").state
    assert (saved.epoch, saved.batch) == (0, 2)  # the mid-epoch save at step 2, then killed at step 3

    _train(single_cache, run_dir, processes=2, resume=True)
    expected, got = _weights(two_process_run), _weights(run_dir)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-7, msg=key)
    steps = _steps(run_dir)
    assert [(s["epoch"], s["step"]) for s in steps] == [(s["epoch"], s["step"]) for s in _steps(two_process_run)]


_VIT_TAIL_RANK = """
import sys
import torch
import torch.distributed as dist
from samcache.models.encoder_tail import ViTTail
from tests.helpers import small_vit

dist.init_process_group("gloo")
rank = dist.get_rank()
tail = ViTTail(encoder=small_vit(0).train(), blocks=2)
seen = []
for block in tail.blocks:
    block.register_forward_pre_hook(lambda m, _: seen.append(type(m.attn).__name__))
tokens = torch.randn(2, 32, 8, 8, generator=torch.Generator().manual_seed(1))
weights = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(2))
model = torch.nn.parallel.DistributedDataParallel(tail)
(model(tokens[rank : rank + 1]) * weights[rank : rank + 1]).sum().backward()
torch.save({"seen": seen, "grads": {n: p.grad for n, p in tail.named_parameters()}}, f"{sys.argv[1]}.{rank}")
"""


def test_a_vit_tail_under_ddp_trains_in_chunks_with_the_single_process_gradient(tmp_path):
    """Two ranks of one image each: DistributedDataParallel's averaged gradient of a ViT tail (its
    attention swapped for the chunked form inside each forward) equals one process's on both images."""
    from samcache.models.encoder_tail import ViTTail

    script = tmp_path / "rank.py"
    script.write_text(_VIT_TAIL_RANK)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    _ok(subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                        str(script), str(tmp_path / "grads")], env=env, capture_output=True, text=True, timeout=300))
    tail = ViTTail(encoder=small_vit(0).train(), blocks=2)
    tokens = torch.randn(2, 32, 8, 8, generator=torch.Generator().manual_seed(1))
    weights = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(2))
    ((tail(tokens) * weights).sum() / 2).backward()
    for rank in (0, 1):
        saved = torch.load(tmp_path / f"grads.{rank}", weights_only=True)
        assert saved["seen"] == ["ChunkedRelPosAttention"] * 2
        assert set(saved["grads"]) == {n for n, _ in tail.named_parameters()}
        for name, p in tail.named_parameters():
            torch.testing.assert_close(saved["grads"][name], p.grad, rtol=1e-4,
                                       atol=1e-5 * float(p.grad.abs().max()), msg=name)
