"""A model's image encoder run by torch in inference mode: what `samcache embed`'s torch backend
calls (the OpenVINO backend is embed/encoders.py's), chosen by the model's family."""

from __future__ import annotations

import numpy as np
import torch

from samcache.devices import autocast


class TorchEncoder:
    """An encoder module (SAM's own, or one that also returns tail tokens: ModelFamily.encoder_module), in
    inference mode, bf16 autocast when `precision` is bf16."""

    def __init__(self, module: torch.nn.Module, device: torch.device, precision: str):
        self.module = module.to(device).eval()
        self.device, self.precision = device, precision

    def __call__(self, batch: torch.Tensor) -> np.ndarray:
        """(B, 3, 1024, 1024) normalised and padded input -> (B, C, 64, 64) float32."""
        with torch.inference_mode(), autocast(self.device, self.precision):
            return self.module(batch.to(self.device)).float().cpu().numpy()


class Sam2Encoder:
    """SAM 2.1's image encoder (Hiera + FPN + the decoder's conv_s0 / conv_s1), bf16 autocast when
    `precision` is bf16. Takes the decoded images themselves: SAM 2.1 resizes the float image
    (models/sam2.preprocess), so no uint8 resize happens in the workers."""

    def __init__(self, sam: torch.nn.Module, device: torch.device, precision: str):
        self.sam = sam.to(device).eval()
        self.device, self.precision = device, precision

    def __call__(self, images: list[torch.Tensor]) -> np.ndarray:
        """RGB uint8 images (H, W, 3), any sizes -> packed features (B, 1024, 64, 64) float32."""
        with torch.inference_mode(), autocast(self.device, self.precision):
            return self.sam.encode([image.numpy() for image in images]).float().cpu().numpy()
