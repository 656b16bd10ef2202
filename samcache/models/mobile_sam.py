"""MobileSAM (`vit_t`): a TinyViT image encoder distilled from SAM's vit_h, with SAM's own prompt
encoder and mask decoder (the same classes and widths; its decoder weights are SAM's).

The TinyViT comes from `segment_anything_hq` (SAM-HQ's package on PyPI, which samcache also uses
for SAM-HQ): its `TinyViT` is MobileSAM's `mobile_sam.modeling.TinyViT` line for line, with the same
state-dict keys, except that its forward also returns an early feature, which `MobileSamEncoder`
drops. MobileSAM's own `mobile_sam` package is not on PyPI (it installs from its GitHub repository).
"""

from __future__ import annotations

import contextlib
import warnings

import torch

from samcache.models.specs import IMAGE_SIZE


@contextlib.contextmanager
def quiet_tiny_vit_import():
    """Importing a TinyViT package (segment_anything_hq, mobile_sam) registers TinyViT models in timm's
    registry under names timm already has, through timm's deprecated module paths; timm warns about
    each, which says nothing to a samcache user."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Overwriting tiny_vit", category=UserWarning)
        warnings.filterwarnings("ignore", message="Importing from timm", category=FutureWarning)
        yield


with quiet_tiny_vit_import():
    from segment_anything_hq.modeling.tiny_vit_sam import TinyViT

TINY_VIT_ARGUMENTS = dict(img_size=IMAGE_SIZE, in_chans=3, num_classes=1000, embed_dims=[64, 128, 160, 320],
                          depths=[2, 2, 6, 2], num_heads=[2, 4, 5, 10], window_sizes=[7, 7, 14, 7], mlp_ratio=4.0,
                          drop_rate=0.0, drop_path_rate=0.0, use_checkpoint=False, mbconv_expand_ratio=4.0,
                          local_conv_size=3, layer_lr_decay=0.8)
"""MobileSAM's TinyViT (its build_sam_vit_t; SAM-HQ's hq_vit_tiny has the same): 5.7M parameters."""


def refresh_attention_biases(encoder: torch.nn.Module) -> None:
    """TinyViT's attention keeps, in eval mode, a copy of its relative-position biases (`ab`, made
    when `.eval()` is called). Loading weights after that leaves the copy stale, so every load refreshes
    it (MobileSAM's README calls `.eval()` again after `sam_model_registry["vit_t"](checkpoint=...)` for
    the same reason)."""
    for module in encoder.modules():
        if hasattr(module, "attention_bias_idxs"):
            module.train(module.training)


class RefreshingTinyViT(TinyViT):
    """TinyViT whose cached attention biases follow every `load_state_dict` (refresh_attention_biases)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        # TinyViT starts its attention biases at zero, which would make seeded random weights blind to
        # stale biases; small random ones (as trained ones are not zero) keep the tests honest.
        with torch.no_grad():
            for name, parameter in self.named_parameters():
                if name.endswith("attention_biases"):
                    parameter.normal_(0.0, 0.02)
        refresh_attention_biases(self)
        self.register_load_state_dict_post_hook(lambda module, _keys: refresh_attention_biases(module))


class MobileSamEncoder(RefreshingTinyViT):
    """MobileSAM's TinyViT, returning only the image embedding (B, 256, 64, 64)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)[0]


def build_mobile_sam() -> torch.nn.Module:
    """An untrained MobileSAM (eval, CPU) whose state dict has mobile_sam.pt's keys."""
    from samcache.models.sam import sam_with_encoder

    return sam_with_encoder(MobileSamEncoder(**TINY_VIT_ARGUMENTS))
