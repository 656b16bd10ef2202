"""What SAM is, in numbers: the geometry every model type shares, each encoder's shape, the
preprocessing record, and the released checkpoints of Meta, MobileSAM and SAM-HQ (the families
themselves: families.py).

Plain constants, no PyTorch, so that the cache, the configs and the command line can use
them without importing it (torch and segment_anything take seconds to import).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

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
class Preprocessing:
    """The preprocessing parameters, recorded in every cache's provenance.

    Arguments:
      image_size: the encoder's square input side; the longest image side is resized to it.
      pixel_mean, pixel_std: per-channel RGB normalization, in 0..255 units.
      resize: how the resize is done (SamPredictor's: PIL bilinear via ResizeLongestSide).
    """

    image_size: int = IMAGE_SIZE
    pixel_mean: tuple[float, float, float] = PIXEL_MEAN
    pixel_std: tuple[float, float, float] = PIXEL_STD
    resize: str = "ResizeLongestSide(PIL bilinear)"

    def as_dict(self) -> dict:
        """Plain JSON types (lists, not tuples), so a dict read back from a cache compares equal."""
        return json.loads(json.dumps(asdict(self)))


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
SAM2_MODEL_TYPES = ("sam2.1_hiera_t", "sam2.1_hiera_s", "sam2.1_hiera_b+", "sam2.1_hiera_l")
"""SAM 2.1's image models (sam2.py)."""
MOBILE_SAM_TYPE = "vit_t"
"""MobileSAM (mobile_sam.py): a TinyViT encoder distilled from vit_h, SAM's own prompt encoder and mask decoder."""
SAM_HQ_VIT_CHANNELS = {"hq_vit_b": 768, "hq_vit_l": 1024, "hq_vit_h": 1280, "hq_vit_tiny": 160}
"""SAM-HQ's models (sam_hq.py) and the channels of the early encoder feature its decoder fuses: the
first global-attention block's output of the ViT (its width), or the TinyViT's second stage."""
SAM_HQ_MODEL_TYPES = tuple(SAM_HQ_VIT_CHANNELS)
SAM_HQ_BASES = {"hq_vit_b": "vit_b", "hq_vit_l": "vit_l", "hq_vit_h": "vit_h", "hq_vit_tiny": MOBILE_SAM_TYPE}
"""The model whose encoder and decoder each SAM-HQ model extends."""
MODEL_TYPES = (*ENCODER_SPECS, MOBILE_SAM_TYPE, *SAM_HQ_MODEL_TYPES, "tiny", "micro", *SAM2_MODEL_TYPES)
"""Every model type, as the options offer them; each belongs to one family (families.py, which
checks that it covers exactly these)."""
MICRO_EMBED_DIM = 32
"""The micro model's embedding channels (SAM's: 256): its prompt encoder and mask decoder are SAM's
classes at this width, so a decoder pass costs a small fraction of SAM's."""
SAM2_FEATURE_SHAPES = {"image_embed": (256, 64, 64), "high_res_s1": (64, 128, 128), "high_res_s0": (32, 256, 256)}
"""One SAM 2.1 image's features, what SAM2ImagePredictor.set_image keeps: the cache stores all three."""


@dataclass(frozen=True)
class OfficialWeights:
    """The released checkpoint of a model type, as its authors publish it."""

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
# SAM 2.1 (September 2024). Meta publishes no digests for these files; the SHA-256 and sizes are
# those of the same files on Hugging Face (facebook/sam2.1-hiera-tiny's LFS record, and a mirror of
# all four), which independent projects also pin for these very URLs.
_SAM2_BASE_URL = "https://dl.fbaipublicfiles.com/segment_anything_2/092824/"
OFFICIAL_WEIGHTS.update({
    "sam2.1_hiera_t": OfficialWeights(
        _SAM2_BASE_URL + "sam2.1_hiera_tiny.pt",
        "7402e0d864fa82708a20fbd15bc84245c2f26dff0eb43a4b5b93452deb34be69",
        156_008_466,
    ),
    "sam2.1_hiera_s": OfficialWeights(
        _SAM2_BASE_URL + "sam2.1_hiera_small.pt",
        "6d1aa6f30de5c92224f8172114de081d104bbd23dd9dc5c58996f0cad5dc4d38",
        184_416_285,
    ),
    "sam2.1_hiera_b+": OfficialWeights(
        _SAM2_BASE_URL + "sam2.1_hiera_base_plus.pt",
        "a2345aede8715ab1d5d31b4a509fb160c5a4af1970f199d9054ccfb746c004c5",
        323_606_802,
    ),
    "sam2.1_hiera_l": OfficialWeights(
        _SAM2_BASE_URL + "sam2.1_hiera_large.pt",
        "2647878d5dfa5098f2f8649825738a9345572bae2d4350a2468587ece47dd318",
        898_083_611,
    ),
})
# MobileSAM: the file in its authors' repository (ChaoningZhang/MobileSAM, weights/mobile_sam.pt). SAM-HQ: its
# authors' Hugging Face repository (lkeab/hq-sam), which their README links; SHA-256 and sizes are those
# repositories' Git LFS records of these files.
OFFICIAL_WEIGHTS.update({
    MOBILE_SAM_TYPE: OfficialWeights(
        "https://github.com/ChaoningZhang/MobileSAM/raw/master/weights/mobile_sam.pt",
        "6dbb90523a35330fedd7f1d3dfc66f995213d81b29a5ca8108dbcdd4e37d6c2f",
        40_728_226,
    ),
    "hq_vit_b": OfficialWeights(
        "https://huggingface.co/lkeab/hq-sam/resolve/main/sam_hq_vit_b.pth",
        "14a9d662cd6f5a9c2dba6d40ab0058d88d287e4a18fd6fdc6ad5fb1a3fdeaa57",
        379_335_069,
    ),
    "hq_vit_l": OfficialWeights(
        "https://huggingface.co/lkeab/hq-sam/resolve/main/sam_hq_vit_l.pth",
        "e1a6c385d62bf005ded91a54d5ec55c985cfc4103ef89c08d90f39f04934c343",
        1_254_865_805,
    ),
    "hq_vit_h": OfficialWeights(
        "https://huggingface.co/lkeab/hq-sam/resolve/main/sam_hq_vit_h.pth",
        "a7ac14a085326d9fa6199c8c698c4f0e7280afdbb974d2c4660ec60877b45e35",
        2_570_940_653,
    ),
    "hq_vit_tiny": OfficialWeights(
        "https://huggingface.co/lkeab/hq-sam/resolve/main/sam_hq_vit_tiny.pth",
        "0f32c075ccdd870ae54db2f7630e7a0878ede5a2b06d05d6fe02c65a82fb7196",
        42_526_881,
    ),
})
OFFICIAL_MODEL_TYPES = tuple(OFFICIAL_WEIGHTS)
