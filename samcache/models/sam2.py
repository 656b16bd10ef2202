"""SAM 2.1, the second model family: building it, and computing the image features that
`SAM2ImagePredictor.set_image` keeps, batched.

What a SAM 2.1 cache holds per image (about 8 MiB in fp16), all three from the frozen encoder:
`image_embed` (256x64x64: the coarsest FPN level plus `no_mem_embed`, as the image predictor adds it)
and the two high-resolution maps `high_res_s0` (32x256x256) and `high_res_s1` (64x128x128), which
`SAM2Base.forward_image` has already passed through the mask decoder's `conv_s0` / `conv_s1`. Those
two convolutions therefore stay frozen in decoder training from such a cache: their outputs are
what is stored.

Preprocessing is SAM2Transforms': the image stretched to 1024x1024 (no aspect ratio kept, no
padding), bilinear with antialiasing on the 0..1 float image, then ImageNet's mean and std.
`preprocess` does exactly that (tested equal to SAM2Transforms), batched, on any device.

Weights are found, checked and loaded by models.py as SAM's are (Meta's `sam2.1_hiera_*.pt` hold
`{"model": state_dict}`, read with `torch.load(weights_only=True)`, loaded with strict keys into
`Sam2AsSam.model`); their URLs and SHA-256 are in specs.OFFICIAL_WEIGHTS.

Needs the `sam2` package (`pip install 'samcache[sam2]'`, built without its CUDA extension:
`SAM2_BUILD_CUDA=0`); it is imported only here, and only when a SAM 2.1 model is built.
"""

from __future__ import annotations

import importlib.util
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from samcache.errors import CheckpointError
from samcache.models.feature_layout import pack_sam2
from samcache.models.specs import IMAGE_SIZE, PIXEL_MEAN, PIXEL_STD

# SAM2Transforms' mean and std are ImageNet's on 0..1 floats: SAM's own, divided by 255.
SAM2_PIXEL_MEAN = tuple(v / 255 for v in PIXEL_MEAN)
SAM2_PIXEL_STD = tuple(v / 255 for v in PIXEL_STD)


class Sam2AsSam(torch.nn.Module):
    """A SAM 2.1 image model under SAM's attribute names, so that training, evaluation and
    prediction handle both families alike: `prompt_encoder` and `mask_decoder` are SAM 2.1's
    `sam_prompt_encoder` and `sam_mask_decoder` (the very modules), `image_encoder` its Hiera
    trunk and FPN. `model` is sam2's SAM2Base itself: its state dict is sam2's layout.

    Arguments:
      model: sam2's SAM2Base (from build_sam2).
    """

    mask_threshold = 0.0  # SAM2ImagePredictor's default

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    @property
    def prompt_encoder(self) -> torch.nn.Module:
        return self.model.sam_prompt_encoder

    @property
    def mask_decoder(self) -> torch.nn.Module:
        return self.model.sam_mask_decoder

    @property
    def image_encoder(self) -> Optional[torch.nn.Module]:
        return self.model.image_encoder

    @image_encoder.setter
    def image_encoder(self, module: Optional[torch.nn.Module]) -> None:
        self.model.image_encoder = module  # None frees it: training never runs the encoder

    @torch.no_grad()
    def encode(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """RGB uint8 images -> their packed features (B, 1024, 64, 64) float32 (feature_layout.py)."""
        device = next(self.model.parameters()).device
        return pack_sam2(image_features(self.model, preprocess(images, device=device)))


def require_sam2(model_type: str) -> None:
    """Raises CheckpointError, saying how to install it, when the sam2 package is missing."""
    if importlib.util.find_spec("sam2") is None:
        raise CheckpointError(f"{model_type} needs the sam2 package: SAM2_BUILD_CUDA=0 pip install "
                              "--no-build-isolation 'samcache[sam2]'")


def build_sam2_model(config: str, model_type: str) -> torch.nn.Module:
    """An untrained SAM 2.1 of `model_type`, built from the sam2 package's own `config` (CPU, eval).
    SAM2ImagePredictor's defaults are kept (the config's post-processing overrides included)."""
    require_sam2(model_type)
    from sam2.build_sam import build_sam2

    return build_sam2(config, None, device="cpu", mode="eval")


def preprocess(images: Sequence[np.ndarray], *, device: torch.device | str = "cpu") -> torch.Tensor:
    """RGB uint8 images (H, W, 3), any sizes -> (B, 3, 1024, 1024) float32, as SAM2Transforms: each
    stretched to 1024x1024 (bilinear, antialiased, on the 0..1 floats), then normalised."""
    mean = torch.tensor(SAM2_PIXEL_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(SAM2_PIXEL_STD, device=device).view(1, 3, 1, 1)
    resized = [F.interpolate(torch.from_numpy(np.ascontiguousarray(image)).to(device).permute(2, 0, 1)[None].float()
                             / 255.0, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False,
                             antialias=True) for image in images]
    return (torch.cat(resized) - mean) / std


@torch.no_grad()
def image_features(model: torch.nn.Module, batch: torch.Tensor) -> dict[str, torch.Tensor]:
    """The features SAM2ImagePredictor.set_image keeps, for a batch: {"image_embed": (B, 256, 64, 64),
    "high_res_s0": (B, 32, 256, 256), "high_res_s1": (B, 64, 128, 128)} (see SAM2_FEATURE_SHAPES).

    Arguments:
      model: a SAM 2.1 SAM2Base.
      batch: preprocess's output on the model's device.
    """
    backbone = model.forward_image(batch)
    _, vision_feats, _, sizes = model._prepare_backbone_features(backbone)
    if model.directly_add_no_mem_embed:
        vision_feats[-1] = vision_feats[-1] + model.no_mem_embed
    # Each level comes as (H*W, B, C): back to (B, C, H, W), finest first.
    maps = [feat.permute(1, 2, 0).reshape(feat.shape[1], feat.shape[2], h, w)
            for feat, (h, w) in zip(vision_feats, sizes)]
    return {"high_res_s0": maps[0], "high_res_s1": maps[1], "image_embed": maps[2]}
