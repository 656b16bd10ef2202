"""SAM's ViT attention fused into one scaled-dot-product attention (models/vit_attention.py): the
stock encoder's outputs in torch, a converted graph with one attention op per block and no
separate softmax, the stock modules back afterwards."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from segment_anything.modeling.image_encoder import ImageEncoderViT

from samcache.models.vit_attention import fused_vit_attention, is_vit_attention


def _small_vit(seed: int = 0, *, img_size: int = 128) -> ImageEncoderViT:
    """segment_anything's ViT at toy width: 8 x 8 tokens, windows of 3 (padded to 9 x 9) in blocks 0
    and 2, global attention in block 1; every parameter moved off its initial value (SAM's
    relative positions start at zero, which would hide them)."""
    torch.manual_seed(seed)
    vit = ImageEncoderViT(img_size=img_size, patch_size=16, embed_dim=32, depth=3, num_heads=2, out_chans=16,
                          use_rel_pos=True, window_size=3, global_attn_indexes=(1,)).eval()
    with torch.no_grad():
        for p in vit.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return vit


def test_the_fused_encoder_gives_the_stock_encoders_output_in_fp32():
    vit = _small_vit()
    image = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = vit(image)
        with fused_vit_attention(vit) as replaced:
            got = vit(image)
    assert replaced == 3
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))
    # the relative positions matter here: without them the output moves far more than the tolerance
    with torch.no_grad():
        for block in vit.blocks:
            block.attn.use_rel_pos = False
        assert (vit(image) - expected).abs().max() > 100 * 1e-5 * expected.abs().max()


def test_the_stock_modules_are_back_afterwards_even_after_an_error():
    vit = _small_vit()
    stock = [block.attn for block in vit.blocks]
    keys = list(vit.state_dict())
    with pytest.raises(RuntimeError, match="inside"):
        with fused_vit_attention(vit):
            assert not any(is_vit_attention(block.attn) for block in vit.blocks)
            raise RuntimeError("inside")
    assert [block.attn for block in vit.blocks] == stock and list(vit.state_dict()) == keys


def test_encoders_without_sams_vit_attention_are_left_as_they_are():
    from samcache.models.weights import build_seeded

    tiny = build_seeded("tiny", 0).image_encoder
    with fused_vit_attention(tiny) as replaced:
        assert replaced == 0
    if importlib.util.find_spec("segment_anything_hq") is not None:  # MobileSAM's TinyViT: an `Attention` of its own
        tiny_vit = build_seeded("vit_t", 0).image_encoder
        assert any(type(m).__name__ == "Attention" for m in tiny_vit.modules())
        with fused_vit_attention(tiny_vit) as replaced:
            assert replaced == 0


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore::FutureWarning")
def test_the_converted_graph_has_one_attention_op_per_block_and_the_stock_output():
    ov = pytest.importorskip("openvino")
    vit = _small_vit(img_size=128)
    image = torch.randn(1, 3, 128, 128, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = vit(image).numpy()
        with fused_vit_attention(vit):
            model = ov.convert_model(vit, example_input=torch.zeros(1, 3, 128, 128))
    ops = [op.get_type_name() for op in model.get_ordered_ops()]
    assert ops.count("ScaledDotProductAttention") == 3 and "Softmax" not in ops
    request = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"}).create_infer_request()
    got = request.infer([image.numpy()])[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
def test_sam_hq_vit_attention_is_fused_alike():
    """SAM-HQ's ViT (its own copy of SAM's classes, two outputs) converts the same way."""
    pytest.importorskip("segment_anything_hq")
    from segment_anything_hq.modeling.image_encoder import ImageEncoderViT as HqViT

    torch.manual_seed(0)
    vit = HqViT(img_size=128, patch_size=16, embed_dim=32, depth=3, num_heads=2, out_chans=16, use_rel_pos=True,
                window_size=3, global_attn_indexes=(1,)).eval()
    with torch.no_grad():
        for p in vit.parameters():
            p.add_(torch.randn_like(p) * 0.3)
        image = torch.randn(1, 3, 128, 128, generator=torch.Generator().manual_seed(1))
        expected, expected_early = vit(image)
        with fused_vit_attention(vit) as replaced:
            got, got_early = vit(image)
    assert replaced == 3
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))
    for g, e in zip(got_early, expected_early):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5 * float(e.abs().max()))
