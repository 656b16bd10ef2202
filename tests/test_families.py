"""The model families: one object each, covering every model type, and what the micro model is."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from segment_anything.modeling import MaskDecoder, PromptEncoder

from samcache.cli import main
from samcache.errors import CheckpointError, SamcacheError
from samcache.models.families import FAMILIES, family_of
from samcache.models.specs import MODEL_TYPES
from samcache.models.weights import build_seeded, identify_weights


def test_every_model_type_has_exactly_one_family():
    owners = {model_type: [f.name for f in FAMILIES if model_type in f.model_types] for model_type in MODEL_TYPES}
    assert all(len(names) == 1 for names in owners.values()), owners
    assert {f.name for f in FAMILIES} == {"sam", "mobilesam", "sam_hq", "tiny", "micro", "sam2.1"}
    with pytest.raises(CheckpointError, match="unknown model type 'vit_x'; choose one of vit_b"):
        family_of("vit_x")


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_every_missing_capability_is_refused_with_the_familys_reason(family):
    model_type = family.model_types[0]
    capabilities = ["automatic_masks", "pth", "safetensors", "onnx", "torch", "openvino"]
    for capability in capabilities:
        supported = (family.automatic_masks if capability == "automatic_masks" else
                     capability in family.export_formats + family.encoder_backends)
        if supported:
            family.require(capability, model_type)  # no error
        else:
            with pytest.raises(SamcacheError) as error:
                family.require(capability, model_type)
            assert model_type in str(error.value) and len(str(error.value)) > 40


def test_the_micro_model_is_sams_classes_at_width_32_with_seeded_weights():
    sam = build_seeded("micro", 0)
    assert isinstance(sam.prompt_encoder, PromptEncoder) and isinstance(sam.mask_decoder, MaskDecoder)
    assert sam.mask_decoder.transformer_dim == 32 == family_of("micro").layout.channels
    with torch.no_grad():
        assert sam.image_encoder(torch.zeros(1, 3, 1024, 1024)).shape == (1, 32, 64, 64)
    again = identify_weights("micro")
    assert again.weights_sha256 == identify_weights("micro", seed=0).weights_sha256  # a function of the seed
    assert again.weights_sha256 != identify_weights("micro", seed=1).weights_sha256
    assert again.path is None and "random init (seed 0)" in again.weights_source


def test_a_micro_run_refuses_onnx_and_is_listed_for_tests(stamps_run, tmp_path):
    runner = CliRunner()
    refused = runner.invoke(main, ["export", "--run", str(stamps_run), "--format", "onnx",
                                   "--out", str(tmp_path / "o")])
    assert refused.exit_code == 1 and "256-channel embeddings" in refused.output and not (tmp_path / "o").exists()
    listed = runner.invoke(main, ["models"])
    assert "micro" in listed.output and "for tests" in listed.output
