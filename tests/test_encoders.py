"""Encoder backends: OpenVINO on the CPU gives the stock encoder's embeddings within
float tolerance, converts once per weights, and the cache records who made it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from samcache.cache.reader import EmbeddingCache
from samcache.cli import main
from samcache.embed.encoders import CONVERSION, OpenVINOEncoder, converted_path, resolve_backend
from samcache.errors import SamcacheError
from samcache.models.encoding import TorchEncoder
from samcache.models.weights import identify_weights, load_identified
from tests.helpers import EMBED_FLAGS


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a.ravel(), b.ravel()) / np.linalg.norm(a) / np.linalg.norm(b))


def test_openvino_equals_the_stock_encoder_and_converts_once(tmp_path, monkeypatch):
    monkeypatch.setenv("SAMCACHE_HOME", str(tmp_path / "home"))  # a conversion of its own
    weights = identify_weights("tiny")
    # An earlier form's files of these weights, and another tail's: kept; the earlier form is named.
    folder = tmp_path / "home" / "openvino"
    folder.mkdir(parents=True)
    prefix = f"tiny-{weights.weights_sha256[:16]}-encoder"
    kept = (f"{prefix}.xml", f"{prefix}.bin", f"{prefix}-tail1-{CONVERSION}.xml")
    for name in kept:
        (folder / name).write_bytes(b"x" * 2**20)
    said: list[str] = []
    encoder = OpenVINOEncoder(weights, "fp32", say=said.append)
    older = [line for line in said if "an earlier form of this conversion" in line]
    assert len(older) == 1 and f"{prefix}.xml (and its .bin, 2 MiB)" in older[0]
    assert all((folder / name).exists() for name in kept)
    loaded = load_identified(weights)
    assert converted_path(weights).is_file() and converted_path(weights).parent == tmp_path / "home" / "openvino"
    assert weights.weights_sha256[:16] in converted_path(weights).name
    assert any("converting the tiny image encoder" in line for line in said)
    assert any(line.startswith("converted in") for line in said)

    batch = torch.randn(2, 3, 1024, 1024, generator=torch.Generator().manual_seed(0))
    expected = TorchEncoder(loaded.sam.image_encoder, torch.device("cpu"), "fp32")(batch)
    got = encoder(batch)
    assert got.shape == expected.shape == (2, 256, 64, 64) and got.dtype == np.float32
    assert _cosine(got, expected) > 0.99999
    np.testing.assert_allclose(got, expected, atol=1e-3 * np.abs(expected).max())

    again: list[str] = []
    OpenVINOEncoder(identify_weights("tiny"), "fp32", say=again.append)
    assert again == []  # the saved model is compiled, not converted again
    other = identify_weights("tiny", random_init=True)  # other weights, another file
    assert converted_path(other) != converted_path(weights)


@pytest.mark.slow
def test_embed_with_a_converted_encoder_never_builds_the_torch_model(stamps, tmp_path):
    """The start-up the OpenVINO path saves: no SAM built, segment_anything (and torchvision) not imported."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "SAMCACHE_HOME": str(tmp_path / "home")}
    # The tiny: its shipped weights file is identified without building a model (the micro's seeded
    # weights are hashed from the model itself).
    flags = [f for f in EMBED_FLAGS if f not in ("--backend", "torch", "--model", "micro")] + ["--model", "tiny"]
    probe = ("import sys\nfrom samcache.cli import main\n"
             "try:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n    assert e.code == 0, e.code\n"
             "print('IMPORTED', 'segment_anything' in sys.modules, 'torchvision' in sys.modules)")
    outputs = []
    for out in ("first", "second"):
        result = subprocess.run([sys.executable, "-c", probe, "embed", str(stamps), "--out", str(tmp_path / out),
                                 *flags, "--backend", "openvino"], cwd=Path(__file__).parents[1], env=env,
                                capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-3000:]
        outputs.append(result.stdout)
    assert "IMPORTED True" in outputs[0] and "converting the tiny image encoder" in outputs[0]
    assert "IMPORTED False False" in outputs[1] and "converting" not in outputs[1]
    first, second = EmbeddingCache(tmp_path / "first"), EmbeddingCache(tmp_path / "second")
    for i in range(len(first)):
        np.testing.assert_array_equal(first.embedding(i), second.embedding(i))


def test_the_cache_records_its_backend_and_both_backends_agree(stamps, tmp_path):
    runner = CliRunner()
    for backend in ("auto", "torch"):
        result = runner.invoke(main, ["embed", str(stamps), "--out", str(tmp_path / backend), *EMBED_FLAGS,
                                      "--backend", backend])
        assert result.exit_code == 0, result.output
    assert "by openvino" in runner.invoke(main, ["info", str(tmp_path / "auto")]).output  # the CPU default
    assert "by torch" in runner.invoke(main, ["info", str(tmp_path / "torch")]).output
    a, b = EmbeddingCache(tmp_path / "auto"), EmbeddingCache(tmp_path / "torch")
    assert a.provenance.encoder_backend == "openvino" and b.provenance.encoder_backend == "torch"
    for i in range(len(a)):
        assert _cosine(a.embedding(i).astype(np.float32), b.embedding(i).astype(np.float32)) > 0.9999

    # Extended by another backend: info counts each shard's recipe, not the header's first one.
    first_shard = sorted((tmp_path / "torch" / "shards").iterdir())[0]
    first_shard.unlink()  # its images are embedded again, now by openvino
    result = runner.invoke(main, ["embed", str(stamps), "--out", str(tmp_path / "torch"), *EMBED_FLAGS[:-4],
                                  "--backend", "openvino"])
    assert result.exit_code == 0, result.output
    computed = EmbeddingCache(tmp_path / "torch").info()["computed"]
    assert computed == {"fp32 by torch": len(b) - 2, "fp32 by openvino": 2}
    assert "fp32 by torch (" in runner.invoke(main, ["info", str(tmp_path / "torch")]).output


def test_backend_choices():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_backend("auto", cpu, "vit_b") == "openvino" and resolve_backend("auto", cuda, "vit_b") == "torch"
    assert resolve_backend("torch", cpu, "tiny") == "torch"
    with pytest.raises(SamcacheError, match="runs on the CPU"):
        resolve_backend("openvino", cuda, "vit_b")
    assert resolve_backend("auto", cpu, "sam2.1_hiera_t") == "torch"  # the Hiera runs on torch
    with pytest.raises(SamcacheError, match="not sam2.1_hiera_l's Hiera"):
        resolve_backend("openvino", cpu, "sam2.1_hiera_l")
