"""SAM's ViT attention fused into one scaled-dot-product attention (models/vit_attention.py): the
stock encoder's outputs in torch, a converted graph with one attention op per block and no
separate softmax, the stock modules back afterwards. Its training form in chunks: the stock
block's outputs and every gradient, in fp32 and within bf16's rounding under autocast."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from segment_anything.modeling.image_encoder import ImageEncoderViT

from samcache.models.vit_attention import fused_vit_attention, is_vit_attention, vit_attention_in_chunks
from tests.helpers import relative_error, small_vit


def _small_vit(seed: int = 0, *, img_size: int = 128) -> ImageEncoderViT:
    """helpers.small_vit, its parameters' stock names kept (`stock_names`): inside the context
    managers here the names carry the wrapper's prefix."""
    vit = small_vit(seed, img_size=img_size)
    vit.stock_names = {p: name for name, p in vit.named_parameters()}
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


def _outputs_and_gradients(vit: ImageEncoderViT, image: torch.Tensor, weights: torch.Tensor, *,
                           bf16: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    # parameters by object, named as the stock encoder names them (inside vit_attention_in_chunks
    # their names carry the wrapper's prefix)
    names = vit.stock_names
    vit.zero_grad()
    image = image.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = vit(image)
    (out.float() * weights).sum().backward()
    grads = {names[p]: p.grad.clone() for p in vit.parameters()}
    grads["image"] = image.grad.clone()
    return out.detach().float(), grads


@pytest.mark.parametrize("chunk_elements", [1 << 22, 24, 200])
def test_attention_in_chunks_gives_the_stock_outputs_and_gradients_in_fp32(chunk_elements):
    # The global block has 64 tokens (64 x 64 scores), the windowed ones 9 a window (81 scores). 24 scores
    # at a time: chunks of 1 query (global) and of 2 queries (each window). 200: chunks of 3 queries
    # (global), 2 whole windows at a time. 4 Mi: every window at once, the global block in one chunk.
    vit = _small_vit()
    vit.train()
    image = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    weights = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(2))
    expected, expected_grads = _outputs_and_gradients(vit, image, weights)
    with vit_attention_in_chunks(vit, chunk_elements=chunk_elements) as replaced:
        got, grads = _outputs_and_gradients(vit, image, weights)
    assert replaced == 3
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert set(grads) == set(expected_grads)
    for name, grad in grads.items():
        e = expected_grads[name]
        torch.testing.assert_close(grad, e, rtol=1e-4, atol=1e-5 * float(e.abs().max()), msg=name)
    assert float(expected_grads["blocks.1.attn.rel_pos_h"].abs().max()) > 0  # the positions train here


def test_attention_in_chunks_without_relative_positions():
    torch.manual_seed(0)
    vit = ImageEncoderViT(img_size=64, patch_size=16, embed_dim=32, depth=1, num_heads=2, out_chans=8,
                          use_rel_pos=False, window_size=0, global_attn_indexes=())
    vit.stock_names = {p: name for name, p in vit.named_parameters()}
    image, weights = torch.randn(1, 3, 64, 64), torch.randn(1, 8, 4, 4)
    expected, expected_grads = _outputs_and_gradients(vit, image, weights)
    with vit_attention_in_chunks(vit, chunk_elements=8):
        got, grads = _outputs_and_gradients(vit, image, weights)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-4, atol=1e-5, msg=name)


def test_attention_in_chunks_under_bf16_autocast_is_as_close_to_fp32_as_the_stock_block():
    # The chunked form rounds differently (scores in one product, probabilities kept in bf16): its
    # distance to the fp32 result must stay of the stock bf16 block's own order, output and gradients.
    vit = _small_vit(3)
    vit.train()
    image = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(4))
    weights = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(5))
    reference, reference_grads = _outputs_and_gradients(vit, image, weights)
    stock, stock_grads = _outputs_and_gradients(vit, image, weights, bf16=True)
    with vit_attention_in_chunks(vit, chunk_elements=200):
        got, grads = _outputs_and_gradients(vit, image, weights, bf16=True)

    assert relative_error(got, reference) < 1.5 * relative_error(stock, reference) + 1e-3
    for name, reference_grad in reference_grads.items():
        if reference_grad.norm() > 0:
            stock_error = relative_error(stock_grads[name], reference_grad)
            assert relative_error(grads[name], reference_grad) < 1.5 * stock_error + 5e-3, name
    assert relative_error(got, reference) < 0.05


def test_a_vit_tail_on_a_cpu_runs_its_attention_in_chunks_and_keeps_the_stock_modules():
    from samcache.models.encoder_tail import ViTTail

    vit = _small_vit(6)
    tail = ViTTail(encoder=vit, blocks=2)
    tokens = torch.randn(1, 32, 8, 8)
    stock = [block.attn for block in tail.blocks]
    seen = []
    hooks = [block.register_forward_pre_hook(lambda m, _: seen.append(type(m.attn).__name__)) for block in tail.blocks]
    tail(tokens).sum().backward()  # trains
    with torch.no_grad():
        tail(tokens)  # evaluates
    for hook in hooks:
        hook.remove()
    assert seen == ["ChunkedRelPosAttention"] * 4
    assert [block.attn for block in tail.blocks] == stock
    assert list(tail.state_dict()) == [k for k in tail.state_dict() if ".attention." not in k]
