"""Encoder backends (issue 13.1): OpenVINO on the CPU gives the stock encoder's embeddings within
float tolerance, converts once per weights, and the cache records who made it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from samcache.cache import EmbeddingCache
from samcache.cli import main
from samcache.encoders import OpenVINOEncoder, TorchEncoder, converted_path, resolve_backend
from samcache.errors import SamcacheError
from samcache.models import load_sam
from tests.helpers import EMBED_FLAGS


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a.ravel(), b.ravel()) / np.linalg.norm(a) / np.linalg.norm(b))


def test_openvino_equals_the_stock_encoder_and_converts_once(tmp_path, monkeypatch):
    monkeypatch.setenv("SAMCACHE_HOME", str(tmp_path / "home"))  # a conversion of its own
    loaded = load_sam("tiny")
    said: list[str] = []
    encoder = OpenVINOEncoder(loaded, "fp32", say=said.append)
    assert converted_path(loaded).is_file() and converted_path(loaded).parent == tmp_path / "home" / "openvino"
    assert loaded.weights_sha256[:16] in converted_path(loaded).name
    assert any("converting the tiny image encoder" in line for line in said) and "converted in" in said[-1]

    batch = torch.randn(2, 3, 1024, 1024, generator=torch.Generator().manual_seed(0))
    expected = TorchEncoder(loaded, torch.device("cpu"), "fp32")(batch)
    got = encoder(batch)
    assert got.shape == expected.shape == (2, 256, 64, 64) and got.dtype == np.float32
    assert _cosine(got, expected) > 0.99999
    np.testing.assert_allclose(got, expected, atol=1e-3 * np.abs(expected).max())

    again: list[str] = []
    OpenVINOEncoder(load_sam("tiny"), "fp32", say=again.append)
    assert again == []  # the saved model is compiled, not converted again
    other = load_sam("tiny", random_init=True)  # other weights, another file
    assert converted_path(other) != converted_path(loaded)


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


def test_backend_choices():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_backend("auto", cpu) == "openvino" and resolve_backend("auto", cuda) == "torch"
    assert resolve_backend("torch", cpu) == "torch"
    with pytest.raises(SamcacheError, match="runs on the CPU"):
        resolve_backend("openvino", cuda)
