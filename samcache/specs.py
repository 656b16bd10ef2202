"""What SAM is, in numbers: the geometry every model type shares, each encoder's shape, and
Meta's released checkpoints.

Plain constants, no PyTorch, so that the cache, the configs and the command line can use
them without importing it (torch and segment_anything take seconds to import).
"""

from __future__ import annotations

from dataclasses import dataclass

IMAGE_SIZE = 1024
"""The encoder's square input side; the longest image side is resized to it."""
PATCH_SIZE = 16
PROMPT_EMBED_DIM = 256
EMBEDDING_SIZE = IMAGE_SIZE // PATCH_SIZE
EMBEDDING_SHAPE = (PROMPT_EMBED_DIM, EMBEDDING_SIZE, EMBEDDING_SIZE)
"""One image's embedding, (256, 64, 64) for every model type: what the cache stores."""
LOW_RES_SIZE = 4 * EMBEDDING_SIZE
"""Side of the mask decoder's low-resolution logits (256): the padded input frame / 4."""
MASK_OUTPUTS = 4
"""The decoder's mask tokens: the single-mask output, then three multimask outputs."""
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)


@dataclass(frozen=True)
class EncoderSpec:
    """The image encoder's shape for one model type (the rest of SAM is the same for all)."""

    embed_dim: int
    depth: int
    num_heads: int
    global_attn_indexes: tuple[int, ...]


ENCODER_SPECS: dict[str, EncoderSpec] = {
    "vit_b": EncoderSpec(768, 12, 12, (2, 5, 8, 11)),
    "vit_l": EncoderSpec(1024, 24, 16, (5, 11, 17, 23)),
    "vit_h": EncoderSpec(1280, 32, 16, (7, 15, 23, 31)),
}
# Meta's three ViTs, then samcache's own tiny (a small convolutional encoder, tiny_encoder.py).
MODEL_TYPES = (*ENCODER_SPECS, "tiny")


@dataclass(frozen=True)
class OfficialWeights:
    """Meta's released checkpoint for a model type."""

    url: str
    sha256: str
    size_bytes: int

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]


_SAM_BASE_URL = "https://dl.fbaipublicfiles.com/segment_anything/"
OFFICIAL_WEIGHTS: dict[str, OfficialWeights] = {
    "vit_b": OfficialWeights(
        _SAM_BASE_URL + "sam_vit_b_01ec64.pth",
        "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912",
        375_042_383,
    ),
    "vit_l": OfficialWeights(
        _SAM_BASE_URL + "sam_vit_l_0b3195.pth",
        "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622",
        1_249_524_607,
    ),
    "vit_h": OfficialWeights(
        _SAM_BASE_URL + "sam_vit_h_4b8939.pth",
        "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e",
        2_564_550_879,
    ),
}
OFFICIAL_MODEL_TYPES = tuple(OFFICIAL_WEIGHTS)
