"""SAM's input preprocessing, split so the slow part runs in DataLoader workers.

`SamPredictor.set_image` does: resize the longest side to the encoder's size with
`ResizeLongestSide.apply_image` (PIL bilinear), then `Sam.preprocess`: subtract the pixel
mean, divide by the std, and pad bottom-right with zeros to a square. samcache does exactly
that, in two steps:

- `resize_image` (per image, in a worker process): uint8 in, uint8 out, the same PIL bilinear
  resize to the same size as `ResizeLongestSide` (tests/test_preprocess.py holds them equal pixel
  for pixel). It calls PIL itself because importing segment_anything's transforms imports
  torchvision, which costs `samcache embed` over a second of start-up for one function.
- `batch_to_model_input` (per batch, on the encoder's device): normalize, then pad. The pad
  happens after normalization, as in `Sam.preprocess`, so padded pixels are 0, not -mean/std.

Box and point prompts go through the same coordinate transform as the predictor's.

SAM 2.1 (sam2.py) stretches every image to 1024x1024 instead (SAM2Transforms: no aspect
ratio kept, no padding), so its input frame is always 1024x1024 (`Sam2Family.input_size`) and prompts
scale by 1024/width and 1024/height: `transform_coords` with that frame is SAM2ImagePredictor's.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image

from samcache.models.specs import IMAGE_SIZE, Preprocessing


def input_size(original_size: tuple[int, int], image_size: int = IMAGE_SIZE) -> tuple[int, int]:
    """(h, w) of the image after resizing its longest side to `image_size`, before padding.

    Rounded half up, as `ResizeLongestSide.get_preprocess_shape` does.
    """
    scale = image_size / max(original_size)
    return int(original_size[0] * scale + 0.5), int(original_size[1] * scale + 0.5)


def resize_image(image: np.ndarray, image_size: int = IMAGE_SIZE) -> np.ndarray:
    """RGB uint8 (H, W, 3) -> RGB uint8 (h, w, 3) with max(h, w) == image_size, as SamPredictor does."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an RGB uint8 image (H, W, 3), got {image.dtype} {image.shape}")
    h, w = input_size(image.shape[:2], image_size)
    return np.array(Image.fromarray(image).resize((w, h), Image.BILINEAR))  # writable, for torch.from_numpy


def batch_to_model_input(
    images: Sequence[torch.Tensor],
    *,
    device: torch.device | str = "cpu",
    preprocessing: Preprocessing = Preprocessing(),
) -> torch.Tensor:
    """Resized uint8 images (each (h, w, 3), any sizes) -> the encoder's input (B, 3, S, S) float32.

    Normalization happens on `device`, so only uint8 bytes cross from the workers and to the GPU.
    """
    size = preprocessing.image_size
    mean = torch.tensor(preprocessing.pixel_mean, device=device).view(3, 1, 1)
    std = torch.tensor(preprocessing.pixel_std, device=device).view(3, 1, 1)
    batch = torch.zeros((len(images), 3, size, size), dtype=torch.float32, device=device)
    for i, image in enumerate(images):
        chw = image.to(device, non_blocking=True).permute(2, 0, 1).float()
        h, w = chw.shape[-2:]
        batch[i, :, :h, :w] = (chw - mean) / std
    return batch


def transform_coords(coords: np.ndarray, original_size: tuple[int, int],
                     frame: Optional[tuple[int, int]] = None) -> np.ndarray:
    """Point coordinates (..., 2) as (x, y) in original pixels -> the encoder's input frame, whose
    image part is `frame` (h, w): default SAM's `input_size(original_size)`."""
    coords = np.array(coords, dtype=np.float64)
    h, w = frame if frame is not None else input_size(original_size)
    coords[..., 0] *= w / original_size[1]
    coords[..., 1] *= h / original_size[0]
    return coords


def transform_boxes(boxes: np.ndarray, original_size: tuple[int, int],
                    frame: Optional[tuple[int, int]] = None) -> np.ndarray:
    """Boxes (N, 4) XYXY in original pixels -> the encoder's input frame (see transform_coords)."""
    boxes = np.asarray(boxes, dtype=np.float64)
    return transform_coords(boxes.reshape(-1, 2, 2), original_size, frame).reshape(-1, 4)
