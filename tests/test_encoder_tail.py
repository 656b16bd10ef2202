"""Encoder tails (models/encoder_tail.py): the encoder's last K blocks and neck, run on a cache's tail
tokens, give the cached embedding; the split encoders are the encoder; LoRA starts as the base layer
and merges back into it; a tail cache's files, header and refusals; training the tail or the neck
from such a cache, and resuming it exactly."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from samcache.cache.reader import EmbeddingCache
from samcache.cli import main
from samcache.errors import CacheError
from samcache.models.encoder_tail import (
    ConvTail,
    LoraLinear,
    SplitConvEncoder,
    SplitViT,
    ViTTail,
    add_lora,
    has_lora,
    merge_lora,
    tail_parameters,
)
from samcache.models.families import family_of
from samcache.models.weights import build_seeded, load_matching
from samcache.train.runs import RunCheckpoint
from tests.helpers import (
    EMBED_FLAGS,
    QUICK_TRAIN,
    SHARED_EMBED,
    assert_same_last_checkpoint,
    copy_tree,
    embed,
    left_unchanged,
    train_process,
    train_run,
    tree_fingerprint,
)

TAIL_TRAIN = dict(QUICK_TRAIN, lr=1e-3, warmup_steps=1)

# The stored embedding is the fp32 encoder's output rounded to float16, and the tail runs on tokens
# rounded to float16 (relative error <= 2**-11 each). Both roundings are a few float16 steps at the
# embedding's largest values: 2**-11 of the largest |value| is one step there, so 8 steps
# (4e-3 relative) bound what rounding alone can do, while a wrong position term, window or block
# (anything but the encoder's computation) is an error of the embedding's own scale.
FP16_RELATIVE_BOUND = 4e-3
MIN_COSINE = 0.99999


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _one_line_error(result, *words: str) -> str:
    """The command failed with one `Error:` line (no traceback) holding `words`; returns the line."""
    assert result.exit_code != 0, result.output
    assert not result.exception or isinstance(result.exception, SystemExit), result.exception
    errors = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    for word in words:
        assert str(word) in errors[0], (word, errors[0])
    return errors[0]


def _compare(got: np.ndarray, stored: np.ndarray, what: str) -> tuple[float, float]:
    """Asserts `got` (float32) is `stored` (a float16 embedding) within float16 rounding; returns
    (max abs error, cosine)."""
    stored = stored.astype(np.float32)
    error = float(np.abs(got - stored).max())
    scale = float(np.abs(stored).max())
    cosine = float((got * stored).sum() / np.sqrt((got * got).sum() * (stored * stored).sum()))
    print(f"{what}: max abs error {error:.3g} (max |embedding| {scale:.3g}, relative {error / scale:.2e}), "
          f"cosine {cosine:.8f}")
    assert error <= FP16_RELATIVE_BOUND * scale, (what, error, scale)
    assert cosine >= MIN_COSINE, (what, cosine)
    return error, cosine


@pytest.fixture(scope="module")
def micro_tail_cache(stamps, tmp_path_factory) -> Path:
    """`stamps` embedded by the micro model with its tail tokens (--tail-blocks 1), as SHARED_EMBED."""
    out = tmp_path_factory.mktemp("tail") / "micro_tail_cache"
    embed(stamps, out, **SHARED_EMBED, tail_blocks=1)
    with left_unchanged(out, "micro tail cache"):
        yield out


# ---------------------------------------------------------------- the tail is the encoder's end
@pytest.mark.parametrize("model_type, blocks", [("tiny", 1), ("tiny", 2), ("micro", 1)])
def test_the_tail_on_cached_tokens_gives_the_cached_embedding(coco_dir, tmp_path, model_type, blocks):
    embed(coco_dir, tmp_path / "cache", **SHARED_EMBED | {"model_type": model_type, "tail_blocks": blocks})
    cache = EmbeddingCache(tmp_path / "cache")
    p = cache.provenance
    assert p.tail_blocks == blocks and len(cache) == 4
    sam = load_matching(p.model_type, p.weights_sha256, recorded_source=p.weights_source).sam
    tail = family_of(model_type).encoder_tail(sam, blocks).eval()
    assert len(tail.blocks) == blocks and tail.blocks[0] is sam.image_encoder.stage2[tail.first]
    for i in range(len(cache)):
        tokens = cache.tail_tokens(i)
        assert tokens.dtype == np.float16 and tokens.shape == cache.feature_shape("tail_tokens")
        with torch.no_grad():
            got = tail(torch.from_numpy(tokens.astype(np.float32))[None])[0].numpy()
        _compare(got, cache.embedding(i), f"{model_type} K={blocks} image {i}")


@pytest.mark.slow
def test_vit_b_tail_is_the_encoders_computation_from_the_rounded_tokens():
    """Random vit_b: the tail on float16 tokens before block 10 (K=2: windowed block 10, global block
    11) and before block 11 (K=1: global block 11) gives the encoder's embedding; SplitViT's embedding
    is the plain encoder's exactly."""
    sam = build_seeded("vit_b", 0)
    encoder = sam.image_encoder
    assert encoder.blocks[10].window_size > 0 and encoder.blocks[11].window_size == 0
    image = torch.randn(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(0))
    before_last = {}
    # SplitViT(K=1)'s tokens are block 10's output: taken from the K=2 run (the same ops), not a third pass
    hook = encoder.blocks[10].register_forward_hook(lambda m, i, o: before_last.update(tokens=o.permute(0, 3, 1, 2)))
    with torch.no_grad():
        plain = encoder(image)
        split = SplitViT(encoder=encoder, tail_blocks=2)(image)
    hook.remove()
    assert split.shape == (1, 256 + 768, 64, 64)
    assert torch.equal(split[:, :256], plain)
    stored = plain[0].half().numpy()
    for blocks, tokens in ((2, split[:, 256:]), (1, before_last["tokens"])):
        tail = ViTTail(encoder=encoder, blocks=blocks)
        with torch.no_grad():
            exact = tail(tokens)[0]
            rounded = tail(tokens.half().float())[0].numpy()
        # The same modules on the same fp32 tokens: the encoder's numbers up to summation order.
        assert torch.allclose(exact, plain[0], rtol=0, atol=1e-4), (exact - plain[0]).abs().max()
        _compare(rounded, stored, f"vit_b K={blocks}")


@pytest.mark.parametrize("model_type", ["tiny", "micro"])
def test_split_conv_encoder_embedding_is_the_encoders_exactly(model_type):
    encoder = build_seeded(model_type, 0).image_encoder
    image = torch.randn(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(1))
    depth, channels = family_of(model_type).tail_shape(model_type)
    with torch.no_grad():
        plain = encoder(image)
        for blocks in sorted({1, depth}):
            split = SplitConvEncoder(encoder=encoder, tail_blocks=blocks)(image)
            assert split.shape == (1, plain.shape[1] + channels, 64, 64)
            assert torch.equal(split[:, : plain.shape[1]], plain)
            # and the tail on the fp32 tokens is the encoder's end exactly as well
            assert torch.equal(ConvTail(encoder=encoder, blocks=blocks)(split[:, plain.shape[1]:]), plain)
    with pytest.raises(ValueError, match=f"a tail of {depth + 1} blocks"):
        SplitConvEncoder(encoder=encoder, tail_blocks=depth + 1)


# ------------------------------------------------------------------------------------------ LoRA
def _small_vit():
    """segment_anything's ViT at toy size: 8x8 tokens of 32 channels, 3 blocks (two windowed, one global)."""
    from segment_anything.modeling.image_encoder import ImageEncoderViT

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return ImageEncoderViT(img_size=64, patch_size=8, embed_dim=32, depth=3, num_heads=2, out_chans=16,
                               use_rel_pos=True, window_size=4, global_attn_indexes=(2,)).eval()


def _tails():
    """(tail, tokens): a ViT tail (LoRA on linear layers) and the micro's (on 1x1 convolutions)."""
    vit = _small_vit()
    micro = build_seeded("micro", 0).image_encoder.eval()
    g = torch.Generator().manual_seed(2)
    return [(ViTTail(encoder=vit, blocks=2), torch.randn(1, 32, 8, 8, generator=g)),
            (ConvTail(encoder=micro, blocks=1), torch.randn(1, 32, 64, 64, generator=g))]


@pytest.mark.parametrize("which", [0, 1], ids=["vit-linear", "micro-conv1x1"])
def test_lora_starts_as_the_base_and_merges_into_the_same_function(which):
    tail, tokens = _tails()[which]
    base_keys = set(tail.state_dict())
    with torch.no_grad():
        before = tail(tokens)
    adapters = add_lora(tail.blocks, rank=2, alpha=2)
    wrapped = [m for m in tail.blocks.modules() if isinstance(m, LoraLinear)]
    # qkv, proj, lin1, lin2 per ViT block; pwconv1, pwconv2 per ConvNeXt block
    assert len(wrapped) == len(tail.blocks) * (4 if which == 0 else 2) and len(adapters) == 2 * len(wrapped)
    assert has_lora(tail) and all(not m.base.weight.requires_grad for m in wrapped)
    with torch.no_grad():
        assert torch.equal(tail(tokens), before)  # B = 0: the update is exactly zero
        for m in wrapped:
            m.lora_b.normal_(0, 0.5, generator=torch.Generator().manual_seed(3))
        adapted = tail(tokens)
    assert (adapted - before).abs().max() > 1e-2
    assert merge_lora(tail) == len(wrapped) and not has_lora(tail)
    assert set(tail.state_dict()) == base_keys
    with torch.no_grad():
        merged = tail(tokens)
    error = (merged - adapted).abs().max().item()
    print(f"LoRA merged vs adapted ({'vit' if which == 0 else 'micro'}): max abs error {error:.3g}")
    torch.testing.assert_close(merged, adapted, rtol=1e-5, atol=1e-5 * adapted.abs().max().item())


@pytest.mark.parametrize("which", [0, 1], ids=["vit", "micro"])
def test_tail_parameters_are_what_each_part_trains(which):
    tail, _ = _tails()[which]
    neck = {id(p) for p in tail.neck.parameters()}
    blocks = {id(p) for p in tail.blocks.parameters()}
    assert {id(p) for p in tail_parameters(tail, "neck")} == neck
    assert {id(p) for p in tail_parameters(tail, "tail")} == blocks | neck
    adapters = {id(p) for p in add_lora(tail.blocks, rank=4, alpha=4)}
    trained = [id(p) for p in tail_parameters(tail, "tail")]
    assert len(trained) == len(set(trained)) and set(trained) == adapters | neck
    assert {id(p) for p in tail_parameters(tail, "neck")} == neck


def test_lora_adapters_start_the_same_whatever_the_global_random_state():
    """Two processes running the same command build the same adapters (a resumed run is compared with
    an uninterrupted one), so A is drawn from add_lora's own seeded generator."""
    starts = []
    for global_seed in (1, 2):
        tail, _ = _tails()[1]
        torch.manual_seed(global_seed)
        starts.append([p.detach().clone() for p in add_lora(tail.blocks, rank=2, alpha=2)])
    assert all(torch.equal(a, b) for a, b in zip(*starts))
    assert starts[0][0].abs().max() > 0  # A is drawn, B (the update) starts at zero
    other, _ = _tails()[1]
    assert not torch.equal(add_lora(other.blocks, rank=2, alpha=2, seed=1)[0], starts[0][0])


# ------------------------------------------------------------------------------------- the cache
def test_a_tail_cache_records_k_and_stores_tail_tokens_per_image(micro_tail_cache):
    header = json.loads((micro_tail_cache / "cache.json").read_text())
    assert header["schema_version"] == 1 and header["provenance"]["tail_blocks"] == 1
    cache = EmbeddingCache(micro_tail_cache)
    shards = sorted((micro_tail_cache / "shards").glob("*.h5"))
    assert len(shards) > 1
    for shard in shards:
        with h5py.File(shard, "r") as f:
            assert json.loads(f.attrs["provenance"])["tail_blocks"] == 1
            n = f["images/name"].shape[0]
            tokens = f["tail_tokens"]
            assert tokens.shape == (n, 32, 64, 64) and tokens.dtype == np.float16
            assert tokens.chunks == (1, 32, 64, 64) and tokens.fletcher32 and tokens.compression is None
            assert f["embeddings"].shape == (n, 32, 64, 64)
            for row, name in enumerate(f["images/name"].asstr()[()]):
                i = cache.index_of(name)
                if cache.location(i) == (shard, row):
                    np.testing.assert_array_equal(cache.tail_tokens(i), tokens[row])
    assert cache.feature_shape("tail_tokens") == (32, 64, 64) and cache.feature_shape("embedding") == (32, 64, 64)
    info = _run("info", micro_tail_cache, "--json")
    assert info.exit_code == 0, info.output
    described = json.loads(info.output)
    assert described["tail_blocks"] == 1 and described["stored_maps"]["tail_tokens"] == [32, 64, 64]


def test_the_documented_h5py_recipe_reads_the_tail_tokens(micro_tail_cache):
    doc = (Path(__file__).resolve().parents[1] / "docs" / "cache-format.md").read_text()
    recipe = re.search(r"## Reading a cache with h5py only\n\n```python\n(.*?)```", doc, re.S).group(1)
    namespace: dict = {}
    exec(recipe.replace('"CACHE/', f'"{micro_tail_cache}/'), namespace)  # the doc's code, run as written
    cache = EmbeddingCache(micro_tail_cache)
    last = cache.index_of(namespace["name"])  # the recipe's loop leaves its last image's maps behind
    np.testing.assert_array_equal(namespace["tail"], cache.tail_tokens(last))
    np.testing.assert_array_equal(namespace["embedding"], cache.embedding(last))


def test_a_cache_without_tails_has_no_tail_blocks_in_its_header(stamps_cache):
    header = json.loads((stamps_cache / "cache.json").read_text())
    assert "tail_blocks" not in header["provenance"]
    for shard in (stamps_cache / "shards").glob("*.h5"):
        with h5py.File(shard, "r") as f:
            assert "tail_blocks" not in json.loads(f.attrs["provenance"]) and "tail_tokens" not in f
    with pytest.raises(CacheError, match="holds no tail tokens: make a cache with `samcache embed --tail-blocks K`"):
        EmbeddingCache(stamps_cache).tail_tokens(0)
    assert json.loads(_run("info", stamps_cache, "--json").output)["tail_blocks"] == 0


@pytest.mark.parametrize("tails_in_cache, flags, said", [
    (False, ["--tail-blocks", "1"], "tail_blocks is 0 in the cache, 1 now"),
    (True, [], "tail_blocks is 1 in the cache, 0 now"),
], ids=["add-tails", "drop-tails"])
def test_embedding_into_a_cache_with_another_tail_blocks_is_refused(
        stamps, stamps_cache, micro_tail_cache, tmp_path, tails_in_cache, flags, said):
    cache = copy_tree(micro_tail_cache if tails_in_cache else stamps_cache, tmp_path / "cache")
    before = tree_fingerprint(cache)
    _one_line_error(_run("embed", stamps, "--out", cache, *EMBED_FLAGS, *flags), "refusing to add to", said)
    assert tree_fingerprint(cache) == before


@pytest.fixture(scope="module")
def random_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Random weights of the types without tails (so the refusal is about tails, not missing weights)."""
    from samcache.models.weights import build_sam

    folder = tmp_path_factory.mktemp("no_tail_weights")
    out = {}
    for model_type in ("vit_t", "hq_vit_b"):
        out[model_type] = folder / f"{model_type}.pth"
        torch.save(build_sam(model_type).state_dict(), out[model_type])
    return out


@pytest.mark.parametrize("model_type, blocks, said", [
    ("vit_t", 1, "vit_t's encoder is not split at a block here"),
    ("hq_vit_b", 1, "tails are not built for SAM-HQ (hq_vit_b)"),
    ("sam2.1_hiera_t", 1, "sam2.1_hiera_t"),
    ("micro", 2, "--tail-blocks 2: micro's encoder has 1 blocks"),
    ("tiny", 7, "--tail-blocks 7: tiny's encoder has 6 blocks"),
])
def test_tail_blocks_the_model_cannot_split_at_are_refused_before_anything_is_written(
        stamps, tmp_path, random_checkpoints, hiera_t_checkpoint, model_type, blocks, said):
    checkpoint = {**random_checkpoints, "sam2.1_hiera_t": hiera_t_checkpoint}.get(model_type)
    flags = ["--checkpoint", checkpoint] if checkpoint else []
    result = _run("embed", stamps, "--out", tmp_path / "cache", "--model", model_type, *EMBED_FLAGS[2:],
                  "--tail-blocks", blocks, *flags)
    _one_line_error(result, "--tail-blocks", said)
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("value, said", [("2", "the string '2'"), (99, "the int 99")])
def test_a_header_with_a_bad_tail_blocks_is_refused_naming_the_file(micro_tail_cache, tmp_path, value, said):
    cache = copy_tree(micro_tail_cache, tmp_path / "cache")
    header = json.loads((cache / "cache.json").read_text())
    header["provenance"]["tail_blocks"] = value
    (cache / "cache.json").write_text(json.dumps(header))
    with pytest.raises(CacheError) as refused:
        EmbeddingCache(cache)
    message = str(refused.value)
    assert "\n" not in message and str(cache / "cache.json") in message and f"tail_blocks is {said}" in message
    _one_line_error(_run("info", cache), cache / "cache.json", f"tail_blocks is {said}")


def test_verify_finds_damaged_tail_tokens_and_embed_restores_them(stamps, micro_tail_cache, tmp_path):
    cache_dir = copy_tree(micro_tail_cache, tmp_path / "cache")
    cache = EmbeddingCache(cache_dir)
    index = cache.annotated_indices("train")[0]
    name, (shard, row) = cache.name_of(index), cache.location(index)
    tokens, embedding = cache.tail_tokens(index), cache.embedding(index)
    with h5py.File(shard, "r") as f:
        chunk = f["tail_tokens"].id.get_chunk_info(row)
    with open(shard, "r+b") as f:  # below HDF5, as a bad disk would: the checksum no longer matches
        f.seek(chunk.byte_offset + 1000)
        f.write(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())

    checked = _run("verify", cache_dir, "--check-only")
    assert checked.exit_code == 1 and name in checked.output and shard.name in checked.output, checked.output
    verified = _run("verify", cache_dir)
    assert verified.exit_code == 1 and "they are out of the cache now" in verified.output, verified.output
    assert EmbeddingCache(cache_dir).index_of(name) is None

    again = _run("embed", stamps, "--out", cache_dir, *EMBED_FLAGS, "--tail-blocks", "1")
    assert again.exit_code == 0 and "embedded 1 images" in again.output, again.output
    assert _run("verify", cache_dir).exit_code == 0
    restored = EmbeddingCache(cache_dir)
    np.testing.assert_array_equal(restored.tail_tokens(restored.index_of(name)), tokens)
    np.testing.assert_array_equal(restored.embedding(restored.index_of(name)), embedding)


def _snapshot(cache_dir: Path) -> dict:
    cache = EmbeddingCache(cache_dir)
    return {info.name: (cache.embedding(info.index), cache.tail_tokens(info.index)) for info in cache.images}


@pytest.mark.slow
def test_a_killed_tail_embed_run_again_equals_an_uninterrupted_one(stamps, micro_tail_cache, tmp_path):
    command = [sys.executable, "-m", "samcache", "embed", str(stamps), "--out", str(tmp_path / "cache"),
               *EMBED_FLAGS, "--tail-blocks", "1"]
    env = {k: v for k, v in os.environ.items() if k != "SAMCACHE_CRASH_AT"}
    killed = subprocess.run(command, env={**env, "SAMCACHE_CRASH_AT": "shard-row-written:3"},
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    partial = _snapshot(tmp_path / "cache")
    assert 0 < len(partial) < len(EmbeddingCache(micro_tail_cache))  # one shard of 2 committed, no more
    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-2000:]
    got, expected = _snapshot(tmp_path / "cache"), _snapshot(micro_tail_cache)
    assert sorted(got) == sorted(expected)
    for name, (embedding, tokens) in expected.items():
        np.testing.assert_array_equal(got[name][0], embedding)
        np.testing.assert_array_equal(got[name][1], tokens)
    assert EmbeddingCache(tmp_path / "cache").superseded == 0


# ------------------------------------------------------------------------------------- training
@pytest.mark.parametrize("flags, said", [
    (["--train", "tail,mask_decoder"], "holds none: make a cache with `samcache embed --tail-blocks K`"),
    (["--train", "neck"], "holds none"),
    (["--lora-rank", "4"], "--lora-rank adapts the encoder's tail blocks: add tail to --train"),
    (["--train", "tail,neck"], "--train tail trains the neck too: name tail or neck, not both"),
], ids=["tail-without-tokens", "neck-without-tokens", "lora-without-tail", "tail-and-neck"])
def test_tail_training_options_are_refused_in_one_line_without_a_run_folder(stamps_cache, tmp_path, flags, said):
    result = _run("train", stamps_cache, "--out", tmp_path / "run", "--epochs", "1", "--workers", "0", *flags)
    _one_line_error(result, said)
    assert not (tmp_path / "run").exists()


def _base_encoder(cache_dir: Path) -> dict[str, torch.Tensor]:
    p = EmbeddingCache(cache_dir).provenance
    sam = load_matching(p.model_type, p.weights_sha256, recorded_source=p.weights_source).sam
    return sam.image_encoder.state_dict()


def _encoder_part(checkpoint: RunCheckpoint) -> dict[str, torch.Tensor]:
    return {k[len("image_encoder."):]: v for k, v in checkpoint.state_dict.items() if k.startswith("image_encoder.")}


def test_training_the_tail_saves_its_blocks_and_neck_only(micro_tail_cache, tmp_path):
    train_run(micro_tail_cache, tmp_path / "run", **TAIL_TRAIN, trainable=["tail", "mask_decoder"])
    checkpoint = RunCheckpoint.read(tmp_path / "run" / "last.pt")
    base, saved = _base_encoder(micro_tail_cache), _encoder_part(checkpoint)
    assert checkpoint.tail_blocks == 1
    # micro's stride-16 stage has one block: K = 1 is stage2.0; the stem, stage1 and downsamplings stay out
    assert set(saved) == {k for k in base if k.startswith(("stage2.0.", "neck."))}
    assert not any(k.startswith(("stem.", "down1.", "stage1.", "down2.")) for k in saved)
    assert any(not torch.equal(saved[k], base[k]) for k in saved if k.startswith("stage2.0."))
    assert any(not torch.equal(saved[k], base[k]) for k in saved if k.startswith("neck."))
    assert any(k.startswith("mask_decoder.") for k in checkpoint.state_dict)


def test_training_the_neck_leaves_the_blocks_as_they_were(micro_tail_cache, tmp_path):
    train_run(micro_tail_cache, tmp_path / "run", **TAIL_TRAIN, trainable=["neck", "mask_decoder"])
    checkpoint = RunCheckpoint.read(tmp_path / "run" / "last.pt")
    base, saved = _base_encoder(micro_tail_cache), _encoder_part(checkpoint)
    blocks = [k for k in saved if k.startswith("stage2.0.")]
    assert blocks and all(torch.equal(saved[k], base[k]) for k in blocks)
    assert any(not torch.equal(saved[k], base[k]) for k in saved if k.startswith("neck."))


@pytest.mark.slow
def test_a_lora_tail_run_killed_after_epoch_1_resumes_to_an_uninterrupted_runs_weights(micro_tail_cache, tmp_path):
    args = ["--epochs", "2", "--batch-size", "2", "--objects-per-image", "2", "--workers", "0", "--warmup-steps", "1",
            "--lr", "1e-3", "--train", "tail,mask_decoder", "--lora-rank", "2"]
    steps_per_epoch = -(-len(EmbeddingCache(micro_tail_cache).annotated_indices("train")) // 2)
    reference = train_process(micro_tail_cache, tmp_path / "reference", args)
    assert reference.returncode == 0, reference.stderr[-3000:]
    killed = train_process(micro_tail_cache, tmp_path / "killed", args, crash_at=f"train-step:{steps_per_epoch + 1}")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert RunCheckpoint.read(tmp_path / "killed" / "last.pt").state.epoch == 1
    resumed = train_process(micro_tail_cache, tmp_path / "killed", [*args, "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    got = assert_same_last_checkpoint(tmp_path / "reference", tmp_path / "killed")
    assert got.state.epoch == 2 and got.tail_blocks == 1
    adapters = [k for k in got.state_dict if k.startswith("image_encoder.") and "lora_" in k]
    assert adapters and all(k.startswith("image_encoder.stage2.0.") for k in adapters)
