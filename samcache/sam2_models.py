"""SAM 2.1, the second model family: building it, loading its weights safely, and computing the
image features that `SAM2ImagePredictor.set_image` keeps, batched.

What a SAM 2.1 cache will hold per image (about 8 MiB in fp16), all three from the frozen encoder:
`image_embed` (256x64x64: the coarsest FPN level plus `no_mem_embed`, as the image predictor adds it)
and the two high-resolution maps `high_res_s0` (32x256x256) and `high_res_s1` (64x128x128), which
`SAM2Base.forward_image` has already passed through the mask decoder's `conv_s0` / `conv_s1`. Those
two convolutions therefore stay frozen in decoder training from such a cache: their outputs are
what is stored.

Preprocessing is SAM2Transforms': the image stretched to 1024x1024 (no aspect ratio kept, no
padding), bilinear with antialiasing on the 0..1 float image, then ImageNet's mean and std.
`preprocess` does exactly that (tested equal to SAM2Transforms), batched, on any device.

Weights: Meta's `sam2.1_hiera_*.pt` files hold `{"model": state_dict}`; they are read with
`torch.load(weights_only=True)` (a file with pickled code is refused unrun) and loaded with strict
keys. Meta publishes no SHA-256 for them (checked in facebookresearch/sam2: none in the repository
or its download script), so unlike SAM 1's, a downloaded file cannot be checked against a pinned
digest; its SHA-256 is still what identifies the weights in a cache.

Needs the `sam2` package (`pip install 'samcache[sam2]'`, built without its CUDA extension:
`SAM2_BUILD_CUDA=0`); it is imported only here, and only when a SAM 2.1 model is built.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from samcache.errors import CheckpointError
from samcache.fileio import sha256_file

SAM2_IMAGE_SIZE = 1024
SAM2_PIXEL_MEAN = (0.485, 0.456, 0.406)
SAM2_PIXEL_STD = (0.229, 0.224, 0.225)
SAM2_FEATURE_SHAPES = {"image_embed": (256, 64, 64), "high_res_s0": (32, 256, 256), "high_res_s1": (64, 128, 128)}
"""One image's cached features: what SAM2ImagePredictor.set_image keeps, by name."""
_SAM2_BASE_URL = "https://dl.fbaipublicfiles.com/segment_anything_2/092824/"


@dataclass(frozen=True)
class Sam2Spec:
    """One SAM 2.1 model: the sam2 package's config and Meta's checkpoint file."""

    config: str
    checkpoint: str

    @property
    def url(self) -> str:
        return _SAM2_BASE_URL + self.checkpoint


SAM2_MODELS: dict[str, Sam2Spec] = {
    "sam2.1_hiera_t": Sam2Spec("configs/sam2.1/sam2.1_hiera_t.yaml", "sam2.1_hiera_tiny.pt"),
    "sam2.1_hiera_s": Sam2Spec("configs/sam2.1/sam2.1_hiera_s.yaml", "sam2.1_hiera_small.pt"),
    "sam2.1_hiera_b+": Sam2Spec("configs/sam2.1/sam2.1_hiera_b+.yaml", "sam2.1_hiera_base_plus.pt"),
    "sam2.1_hiera_l": Sam2Spec("configs/sam2.1/sam2.1_hiera_l.yaml", "sam2.1_hiera_large.pt"),
}


@dataclass
class LoadedSam2:
    """A SAM 2.1 model (eval mode, CPU) and the identity of its weights.

    Arguments:
      model: sam2's SAM2Base.
      model_type: one of SAM2_MODELS.
      weights_sha256: the checkpoint file's SHA-256, or for random weights "random".
      weights_source: the file, or "random init".
    """

    model: torch.nn.Module
    model_type: str
    weights_sha256: str
    weights_source: str


def _spec(model_type: str) -> Sam2Spec:
    if model_type not in SAM2_MODELS:
        raise CheckpointError(f"unknown SAM 2.1 model {model_type!r}; choose one of {', '.join(SAM2_MODELS)}")
    return SAM2_MODELS[model_type]


def build_sam2_model(model_type: str) -> torch.nn.Module:
    """An untrained SAM 2.1 of `model_type`, built from the sam2 package's own config (CPU, eval).
    SAM2ImagePredictor's defaults are kept (the config's post-processing overrides included)."""
    spec = _spec(model_type)
    try:
        from sam2.build_sam import build_sam2
    except ImportError as exc:
        raise CheckpointError(f"{model_type} needs the sam2 package: SAM2_BUILD_CUDA=0 pip install "
                              "'samcache[sam2]'") from exc
    return build_sam2(spec.config, None, device="cpu", mode="eval")


def read_sam2_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict of a SAM 2.1 checkpoint (`{"model": ...}` as Meta's, or a plain state dict),
    read without executing pickled code."""
    path = Path(path)
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable weights file ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''})") from exc
    state_dict = loaded.get("model", loaded) if isinstance(loaded, dict) else None
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise CheckpointError(f"{path}: expected a SAM 2.1 checkpoint ({{'model': state dict}})")
    return state_dict


def load_sam2(model_type: str, checkpoint: Optional[str | Path] = None) -> LoadedSam2:
    """SAM 2.1 `model_type` with the weights of `checkpoint` (strict keys); None: random weights.

    Raises CheckpointError naming both when the file is another model's.
    """
    model = build_sam2_model(model_type)
    if checkpoint is None:
        return LoadedSam2(model, model_type, "random", "random init")
    state_dict = read_sam2_state_dict(checkpoint)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state_dict) if expected[k].shape != state_dict[k].shape)
    if missing or unexpected or wrong:
        others = [t for t in SAM2_MODELS if t != model_type]
        raise CheckpointError(
            f"{checkpoint} does not fit {model_type}: {len(missing)} missing, {len(unexpected)} unexpected and "
            f"{len(wrong)} mis-shaped tensors (e.g. {(missing or unexpected or wrong)[0]}); is it one of "
            f"{', '.join(others)}, or SAM 1?")
    model.load_state_dict(state_dict, strict=True)
    return LoadedSam2(model.eval(), model_type, sha256_file(checkpoint), str(checkpoint))


def preprocess(images: Sequence[np.ndarray], *, device: torch.device | str = "cpu") -> torch.Tensor:
    """RGB uint8 images (H, W, 3), any sizes -> (B, 3, 1024, 1024) float32, as SAM2Transforms: each
    stretched to 1024x1024 (bilinear, antialiased, on the 0..1 floats), then normalised."""
    mean = torch.tensor(SAM2_PIXEL_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(SAM2_PIXEL_STD, device=device).view(1, 3, 1, 1)
    resized = [F.interpolate(torch.from_numpy(np.ascontiguousarray(image)).to(device).permute(2, 0, 1)[None].float()
                             / 255.0, size=(SAM2_IMAGE_SIZE, SAM2_IMAGE_SIZE), mode="bilinear", align_corners=False,
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


def feature_bytes_per_image(dtype_bytes: int = 2) -> int:
    """Bytes of one image's cached features (fp16 by default): 8 MiB."""
    return dtype_bytes * sum(int(np.prod(shape)) for shape in SAM2_FEATURE_SHAPES.values())
