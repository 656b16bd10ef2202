"""Model families: everything that differs between SAM, samcache's tiny and micro, and SAM 2.1, in one object each.

A `ModelFamily` answers every question the rest of samcache asks about a model: how it is built
and which checkpoint layout its weights have, how images are preprocessed, what the cache stores
per image and how the decoder receives it, how prompts are decoded and masks brought back to the
image, the training loss, which modules stay frozen, how an export is written and loaded, and
which encoder backends, exporters and generators it supports. Nothing outside this module compares
a model type or a family name: callers ask `family_of(model_type)` and then the family.

This module imports no PyTorch (the configs and the cache read the model types and cache layouts
without it); each family imports its own modules when it builds or decodes. Adding a family is
a subclass here, its implementation module and its tests: docs/adding-a-model-family.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

from samcache.errors import CheckpointError, SamcacheError
from samcache.models.feature_layout import (
    EMBEDDING_LAYOUT,
    MICRO_LAYOUT,
    SAM2_LAYOUT,
    SAM_HQ_LAYOUTS,
    CacheLayout,
    TailLayout,
    ViewsLayout,
)
from samcache.models.specs import (
    ENCODER_SPECS,
    IMAGE_SIZE,
    MICRO_EMBED_DIM,
    MOBILE_SAM_TYPE,
    MODEL_TYPES,
    SAM2_MODEL_TYPES,
    SAM_HQ_BASES,
    SAM_HQ_MODEL_TYPES,
    Preprocessing,
)

if TYPE_CHECKING:  # torch is imported by the methods that need it
    import numpy as np
    import torch

    from samcache.models.decoder import PromptDecoder
    from samcache.models.encoder_tail import EncoderTail

Size = tuple[int, int]


class ModelFamily:
    """One model family: the model types it covers and how samcache handles them.

    The class attributes are the family's facts; the methods are what differs in behaviour.
    `SamFamily` is the reference: a family overrides only what it does differently.
    """

    name: str
    """Short name ("sam", "tiny", "micro", "sam2.1")."""
    model_types: tuple[str, ...]
    layout: CacheLayout = EMBEDDING_LAYOUT
    """What the cache stores per image (feature_layout.py); families may share one. `layout_of` asks."""
    default_trainable: tuple[str, ...] = ("mask_decoder",)
    """What `samcache train` trains when `--train` is not given (config.TRAINABLE)."""
    trainable_parts: tuple[str, ...] = ("mask_decoder", "prompt_encoder")
    """What `--train` may name for its models (config.TRAINABLE)."""
    preprocessing: Preprocessing = Preprocessing()
    """The image preprocessing of its predictor, recorded in every cache's provenance."""
    encoder_backends: tuple[str, ...] = ("torch", "openvino")
    """Who can run its image encoder in `samcache embed` (the first is the fallback of `auto`)."""
    resizes_in_workers: bool = True
    """True when the uint8 resize to the input frame happens in DataLoader workers before the
    encoder (SAM's ResizeLongestSide); False when the encoder takes the decoded images."""
    export_formats: tuple[str, ...] = ("pth", "safetensors", "onnx")
    """What `samcache export --format` writes for its runs."""
    export_reader: str = "segment_anything"
    """Whose code reads its exports back (what `load_with` names): "segment_anything"
    (sam_model_registry + SamPredictor), "samcache" (load_sam), "sam2" (build_sam2 +
    SAM2ImagePredictor), "mobile_sam" or "segment_anything_hq" (each package's sam_model_registry +
    SamPredictor). Export reads every file back through it before leaving it in place."""
    automatic_masks: bool = True
    """Whether segment everything (SAM's automatic mask generator) runs on its decoder."""
    own_weights: bool = False
    """Whether samcache makes the weights itself (seeded random weights, `--random-init`; and for
    the tiny a pretrained file it ships, weights.TINY_PRETRAINED) rather than a checkpoint from elsewhere."""
    ships_pretrained: bool = False
    """Whether samcache ships pretrained weights for it (the tiny's, weights.TINY_PRETRAINED)."""
    why_not: dict[str, str] = {}
    """Why a capability is missing, per capability (`require`'s message; {model_type} is filled in)."""

    # ------------------------------------------------------------------ facts per model type
    def layout_of(self, model_type: str, tail_blocks: int = 0, views: int = 0) -> CacheLayout:
        """What a cache of `model_type` stores per image: the family's `layout` (unless it varies by
        type); with `tail_blocks` K the encoder's tokens before its last K blocks too; with `views` V
        the same for each of V views of the image (`embed --views`)."""
        layout = self._layout_without_tail(model_type)
        if tail_blocks:
            self.check_tail_blocks(tail_blocks, model_type)
            layout = TailLayout(layout, tail_channels=self.tail_shape(model_type)[1], tail_blocks=tail_blocks)
        if views:
            self.check_views(model_type)
            layout = ViewsLayout(layout, views=views)
        return layout

    def check_views(self, model_type: str) -> None:
        """Refuses `--views` for a family whose encoder does not take the resized image (views are made
        on it: data/views.py)."""
        if not self.resizes_in_workers:
            raise SamcacheError(f"--views: views are made on the resized input image; {model_type}'s encoder "
                                "resizes its images itself, so views are not offered for it")

    def _layout_without_tail(self, model_type: str) -> CacheLayout:
        return self.layout

    def tail_shape(self, model_type: str) -> tuple[int, int]:
        """(blocks, channels) of the encoder stage whose last blocks `--tail-blocks` names; (0, 0) when
        the family's encoder offers no tail."""
        return (0, 0)

    def check_tail_blocks(self, tail_blocks: int, model_type: str) -> None:
        """Refuses, in one line, a `--tail-blocks` the model's encoder cannot split at."""
        depth = self.tail_shape(model_type)[0]
        if not depth:
            raise SamcacheError(self.why_not.get("tail", _NO_TAIL).format(model_type=model_type))
        if not 1 <= tail_blocks <= depth:
            raise SamcacheError(f"--tail-blocks {tail_blocks}: {model_type}'s encoder has {depth} blocks in the stage "
                                f"before its neck; choose 1..{depth}")

    def label(self, model_type: str) -> str:
        """How reports name the base model: "SAM vit_b"."""
        return f"SAM {model_type}"

    def zero_shot_title(self, model_type: str) -> str:
        """How reports name the model before fine-tuning: "zero-shot SAM (vit_b)"."""
        return f"zero-shot SAM ({model_type})"

    def input_size(self, original_size: Size) -> Size:
        """(h, w) of an image in the encoder's input frame before padding."""
        from samcache.models.preprocess import input_size

        return input_size(original_size)

    def check_installed(self, model_type: str) -> None:
        """Raises CheckpointError, saying how to install it, when the family's package is missing."""

    def require(self, capability: str, model_type: str) -> None:
        """Refuses, with one line and before any work, what this family does not support:
        "automatic_masks", an export format ("pth", "safetensors", "onnx"), or an encoder backend
        ("torch", "openvino"). `why_not` says why, for the user."""
        supported = {"automatic_masks": self.automatic_masks}
        supported.update({fmt: fmt in self.export_formats for fmt in ("pth", "safetensors", "onnx")})
        supported.update({backend: backend in self.encoder_backends for backend in ("torch", "openvino")})
        if not supported[capability]:
            raise SamcacheError(self.why_not[capability].format(model_type=model_type))

    # ------------------------------------------------------------------ building and weights
    def build(self, model_type: str) -> "torch.nn.Module":
        """An untrained model of `model_type` (eval mode, CPU) with SAM's attribute names:
        `image_encoder`, `prompt_encoder`, `mask_decoder`."""
        from samcache.models.sam import sam_with_vit

        return sam_with_vit(ENCODER_SPECS[model_type])

    def weights_module(self, sam: "torch.nn.Module") -> "torch.nn.Module":
        """The module whose state dict has the layout of the family's official checkpoints."""
        return sam

    def recognise(self, state_dict: dict[str, Any]) -> Optional[str]:
        """The model type of this family whose weights the state dict holds, if it can tell."""
        pos = state_dict.get("image_encoder.pos_embed")
        if pos is None or "mask_decoder.hf_token.weight" in state_dict:  # no ViT, or SAM-HQ's decoder
            return None
        depth = 1 + max((int(k.split(".")[2]) for k in state_dict if k.startswith("image_encoder.blocks.")),
                        default=-1)
        return next((name for name, spec in ENCODER_SPECS.items()
                     if spec.embed_dim == pos.shape[-1] and spec.depth == depth), None)

    # ------------------------------------------------------------------------------ encoding
    def torch_encoder(self, sam: "torch.nn.Module", device: "torch.device", precision: str, tail_blocks: int = 0):
        """`embed`'s torch backend: a callable from a batch (see `resizes_in_workers`) to features
        (B, C, 64, 64) float32 numpy (`encoder_module`'s)."""
        from samcache.models.encoding import TorchEncoder

        return TorchEncoder(self.encoder_module(sam, tail_blocks), device, precision)

    def encoder_module(self, sam: "torch.nn.Module", tail_blocks: int = 0) -> "torch.nn.Module":
        """The module `embed` runs: the image encoder, or with `tail_blocks` K one that returns its
        embedding and its tokens before the last K blocks stacked (encoder_tail.py)."""
        if not tail_blocks:
            return sam.image_encoder
        from samcache.models.encoder_tail import SplitViT

        return SplitViT(encoder=sam.image_encoder, tail_blocks=tail_blocks)

    def encoder_tail(self, sam: "torch.nn.Module", tail_blocks: int) -> "EncoderTail":
        """The last `tail_blocks` blocks and the neck of `sam`'s encoder, sharing its modules."""
        from samcache.models.encoder_tail import ViTTail

        return ViTTail(encoder=sam.image_encoder, blocks=tail_blocks)

    def encode(self, sam: "torch.nn.Module", image: "np.ndarray", device: "torch.device") -> "torch.Tensor":
        """One RGB uint8 image -> its features (1, C, 64, 64) on `device` (predict on a new image)."""
        import torch

        from samcache.models.preprocess import batch_to_model_input, resize_image

        model_input = batch_to_model_input([torch.from_numpy(resize_image(image))], device=device,
                                           preprocessing=self.preprocessing)
        return sam.image_encoder(model_input)

    # ------------------------------------------------------------------------------ decoding
    def decoder(self, sam: "torch.nn.Module", model_type: str) -> "PromptDecoder":
        """The prompt encoder and mask decoder of `sam`, a `model_type` model, as one module (decode,
        upscale, loss)."""
        from samcache.models.decoder import SamPromptDecoder

        return SamPromptDecoder(sam.prompt_encoder, sam.mask_decoder, family=self, model_type=model_type)

    def frozen_by_cache(self, sam: "torch.nn.Module") -> list["torch.nn.Module"]:
        """Decoder-side modules whose outputs the cache holds, so training cannot change them."""
        return []

    def check_trainable(self, parts: tuple[str, ...], model_type: str) -> None:
        """Refuses, before anything is written, a `--train` part the model does not have."""
        offered = self.trainable_parts + (("tail", "neck") if self.tail_shape(model_type)[0] else ())
        for part in parts:
            if part in offered:
                continue
            if part in ("tail", "neck"):
                raise SamcacheError(self.why_not.get("tail", _NO_TAIL).format(model_type=model_type).replace(
                    "--tail-blocks", f"--train {part}", 1))
            raise SamcacheError(f"--train {part} trains SAM-HQ's HQ token and fusion layers; the cache's model, "
                                f"{model_type}, has none: train {', '.join(offered)}")

    def trainable_modules(self, sam: "torch.nn.Module", part: str) -> list["torch.nn.Module"]:
        """The modules `--train PART` trains (`check_trainable` has accepted PART)."""
        return [getattr(sam, part)]

    # -------------------------------------------------------------------------------- export
    def checkpoint_payload(self, state_dict: dict) -> dict:
        """What a `.pth` export holds, as the family's official checkpoints do."""
        return state_dict

    def load_with(self, model_type: str, fmt: str) -> str:
        """The call that loads an export of `model_type` written as `fmt` (recorded in its metadata)."""
        if fmt == "safetensors":  # sam_model_registry reads torch.save files only
            return (f"segment_anything.sam_model_registry[{model_type!r}]().load_state_dict("
                    "safetensors.torch.load_file(FILE))")
        return f"segment_anything.sam_model_registry[{model_type!r}](checkpoint=FILE)"


_NO_TAIL = ("--tail-blocks: {model_type}'s encoder is not split at a block here (tails are built for SAM's ViTs "
            "vit_b/l/h and the tiny and micro models)")


class SamFamily(ModelFamily):
    """Meta's Segment Anything: ViT-B/L/H image encoders, segment_anything's prompt encoder and
    mask decoder; SamPredictor's preprocessing (longest side to 1024, pad bottom-right)."""

    name = "sam"
    model_types = tuple(ENCODER_SPECS)

    def tail_shape(self, model_type: str) -> tuple[int, int]:
        spec = ENCODER_SPECS[model_type]
        return (spec.depth, spec.embed_dim)


class TinyFamily(SamFamily):
    """samcache's own SAM-shaped model: SAM's prompt encoder and mask decoder on a small
    convolutional encoder (tiny_encoder.py), shipped pretrained on synthetic shapes (NOT Meta's
    SAM) or seeded random weights; the cache, decoding and export are SAM's."""

    name = "tiny"
    export_reader = "samcache"
    model_types = ("tiny",)
    own_weights = True
    ships_pretrained = True

    def label(self, model_type: str) -> str:
        return "tiny"  # samcache's own model, never called SAM

    def zero_shot_title(self, model_type: str) -> str:
        return "zero-shot (tiny)"

    def build(self, model_type: str) -> "torch.nn.Module":
        from samcache.models.sam import sam_with_encoder
        from samcache.models.tiny_encoder import ConvImageEncoder

        return sam_with_encoder(ConvImageEncoder(img_size=IMAGE_SIZE))

    def recognise(self, state_dict: dict[str, Any]) -> Optional[str]:
        return None  # its weights are identified by SHA-256, never guessed

    def tail_shape(self, model_type: str) -> tuple[int, int]:
        return (6, 192)  # its stride-16 stage (tiny_encoder.ConvImageEncoder's defaults)

    def encoder_module(self, sam: "torch.nn.Module", tail_blocks: int = 0) -> "torch.nn.Module":
        if not tail_blocks:
            return sam.image_encoder
        from samcache.models.encoder_tail import SplitConvEncoder

        return SplitConvEncoder(encoder=sam.image_encoder, tail_blocks=tail_blocks)

    def encoder_tail(self, sam: "torch.nn.Module", tail_blocks: int) -> "EncoderTail":
        from samcache.models.encoder_tail import ConvTail

        return ConvTail(encoder=sam.image_encoder, blocks=tail_blocks)

    def load_with(self, model_type: str, fmt: str) -> str:
        return "samcache.models.weights.load_sam('tiny', checkpoint=FILE)"


class MicroFamily(TinyFamily):
    """samcache's smallest SAM-shaped model, for tests and a pipeline check in seconds: SAM's prompt
    encoder and mask decoder classes at width 32 (not 256), on a two-stage convolutional encoder,
    random weights only. Its cache stores (32, 64, 64) embeddings; everything else is the tiny's.
    Nothing here is pretrained, and its masks mean nothing until it is trained."""

    name = "micro"
    model_types = ("micro",)
    layout = MICRO_LAYOUT
    ships_pretrained = False
    export_formats = ("pth", "safetensors")  # SAM's ONNX interface fixes 256-channel embeddings
    why_not = {"onnx": "--format onnx writes SAM's ONNX interface (256-channel embeddings); {model_type} runs "
                       "export as pth or safetensors"}

    def label(self, model_type: str) -> str:
        return "micro"

    def tail_shape(self, model_type: str) -> tuple[int, int]:
        return (1, 32)  # build's stride-16 stage: one block, 32 channels

    def zero_shot_title(self, model_type: str) -> str:
        return "zero-shot (micro)"

    def build(self, model_type: str) -> "torch.nn.Module":
        from samcache.models.sam import sam_with_encoder
        from samcache.models.tiny_encoder import ConvImageEncoder

        encoder = ConvImageEncoder(img_size=IMAGE_SIZE, stem_chans=8, widths=(16, 32), depths=(1, 1), dilations=(1,),
                                   out_chans=MICRO_EMBED_DIM)
        return sam_with_encoder(encoder, embed_dim=MICRO_EMBED_DIM, mlp_dim=64, num_heads=2, mask_in_chans=4)

    def load_with(self, model_type: str, fmt: str) -> str:
        return "samcache.models.weights.load_sam('micro', checkpoint=FILE)"


class MobileSamFamily(SamFamily):
    """MobileSAM (`vit_t`, mobile_sam.py): a TinyViT encoder distilled from vit_h, SAM's own prompt encoder
    and mask decoder; SamPredictor's preprocessing; exports in mobile_sam.pt's layout, which MobileSAM's
    `sam_model_registry["vit_t"]` loads."""

    name = "mobilesam"
    model_types = (MOBILE_SAM_TYPE,)
    export_reader = "mobile_sam"

    def tail_shape(self, model_type: str) -> tuple[int, int]:
        return (0, 0)  # its TinyViT's stages are not split here

    def label(self, model_type: str) -> str:
        return "MobileSAM"

    def zero_shot_title(self, model_type: str) -> str:
        return "zero-shot MobileSAM (vit_t)"

    def check_installed(self, model_type: str) -> None:
        _require_segment_anything_hq(model_type)

    def build(self, model_type: str) -> "torch.nn.Module":
        from samcache.models.mobile_sam import build_mobile_sam

        return build_mobile_sam()

    def recognise(self, state_dict: dict[str, Any]) -> Optional[str]:
        if "image_encoder.layers.0.blocks.0.conv1.c.weight" not in state_dict:  # TinyViT's first MBConv
            return None
        return "hq_vit_tiny" if "mask_decoder.hf_token.weight" in state_dict else MOBILE_SAM_TYPE

    def load_with(self, model_type: str, fmt: str) -> str:
        if fmt == "safetensors":
            return ("mobile_sam.sam_model_registry['vit_t']().load_state_dict("
                    "safetensors.torch.load_file(FILE)), then .eval()")
        return "mobile_sam.sam_model_registry['vit_t'](checkpoint=FILE), then .eval()"


class SamHqFamily(ModelFamily):
    """SAM-HQ (sam_hq.py): SAM's ViT (or MobileSAM's TinyViT for hq_vit_tiny) and decoder plus an HQ token
    and a fusion of the encoder's early feature, which the cache stores beside the embedding; SAM-HQ's
    loss on the HQ token's mask; trains the HQ parts alone by default (SAM frozen, as SAM-HQ does);
    exports in segment_anything_hq's layout."""

    name = "sam_hq"
    model_types = SAM_HQ_MODEL_TYPES
    export_reader = "segment_anything_hq"
    default_trainable = ("hq_head",)
    trainable_parts = ("hq_head", "mask_decoder", "prompt_encoder")
    export_formats = ("pth", "safetensors")
    automatic_masks = False
    why_not = {
        "automatic_masks": "{model_type}: segment everything runs SAM's automatic mask generator on SAM's decoder "
                           "outputs; it is not offered for SAM-HQ's",
        "onnx": "--format onnx writes SAM's ONNX interface, which has no input for SAM-HQ's early encoder feature; "
                "a {model_type} run exports as a checkpoint (--format pth) that segment_anything_hq loads",
        "tail": "--tail-blocks: tails are not built for SAM-HQ ({model_type}), whose decoder also reads an early "
                "encoder feature; use vit_b/l/h",
    }

    def _layout_without_tail(self, model_type: str) -> CacheLayout:
        return SAM_HQ_LAYOUTS[model_type]

    def label(self, model_type: str) -> str:
        return f"SAM-HQ {model_type.removeprefix('hq_')}"

    def zero_shot_title(self, model_type: str) -> str:
        return f"zero-shot SAM-HQ ({model_type.removeprefix('hq_')})"

    def check_installed(self, model_type: str) -> None:
        _require_segment_anything_hq(model_type)

    def build(self, model_type: str) -> "torch.nn.Module":
        from samcache.models.sam_hq import build_sam_hq

        return build_sam_hq(model_type)

    def recognise(self, state_dict: dict[str, Any]) -> Optional[str]:
        if "mask_decoder.hf_token.weight" not in state_dict:
            return None
        found = SamFamily().recognise({k: v for k, v in state_dict.items() if not k.startswith("mask_decoder.hf")})
        return f"hq_{found}" if found else None  # hq_vit_tiny: MobileSamFamily.recognise

    def decoder(self, sam: "torch.nn.Module", model_type: str) -> "PromptDecoder":
        from samcache.models.sam_hq import SamHqPromptDecoder

        return SamHqPromptDecoder(sam.prompt_encoder, sam.mask_decoder, family=self, model_type=model_type)

    def trainable_modules(self, sam: "torch.nn.Module", part: str) -> list["torch.nn.Module"]:
        if part == "hq_head":
            from samcache.models.sam_hq import hq_modules

            return hq_modules(sam.mask_decoder)
        return [getattr(sam, part)]

    def load_with(self, model_type: str, fmt: str) -> str:
        registry_key = model_type.removeprefix("hq_")
        # Its TinyViT copies its attention biases at .eval(), which the registry calls before loading.
        then = ", then .eval()" if SAM_HQ_BASES[model_type] == MOBILE_SAM_TYPE else ""
        if fmt == "safetensors":
            return (f"segment_anything_hq.sam_model_registry[{registry_key!r}]().load_state_dict("
                    f"safetensors.torch.load_file(FILE)){then}")
        return f"segment_anything_hq.sam_model_registry[{registry_key!r}](checkpoint=FILE){then}"


def _require_segment_anything_hq(model_type: str) -> None:
    """MobileSAM's TinyViT and SAM-HQ come from segment_anything_hq (whose TinyViT imports timm)."""
    from importlib.util import find_spec

    missing = [name for name in ("segment_anything_hq", "timm") if find_spec(name) is None]
    if missing:
        raise CheckpointError(f"{model_type} needs the package(s) {' and '.join(missing)}: "
                              "pip install 'samcache[hq]' (make install does)")


SAM2_CONFIGS = {
    "sam2.1_hiera_t": "configs/sam2.1/sam2.1_hiera_t.yaml",
    "sam2.1_hiera_s": "configs/sam2.1/sam2.1_hiera_s.yaml",
    "sam2.1_hiera_b+": "configs/sam2.1/sam2.1_hiera_b+.yaml",
    "sam2.1_hiera_l": "configs/sam2.1/sam2.1_hiera_l.yaml",
}
"""The sam2 package's own config of each model (what `build_sam2(config, checkpoint)` takes)."""
# Blocks of each SAM 2.1 Hiera trunk (its configs' stages summed): enough to tell the four apart.
_HIERA_BLOCKS = {12: "sam2.1_hiera_t", 16: "sam2.1_hiera_s", 24: "sam2.1_hiera_b+", 48: "sam2.1_hiera_l"}


class Sam2Family(ModelFamily):
    """SAM 2.1's image models (the `sam2` package): a Hiera encoder whose cache holds three maps
    (sam2.py), SAM2ImagePredictor's preprocessing (stretched to 1024x1024) and decoding
    (sam2_decoder.py), SAM 2's loss, conv_s0 / conv_s1 frozen, exports in sam2's layout."""

    name = "sam2.1"
    export_reader = "sam2"
    model_types = SAM2_MODEL_TYPES
    layout = SAM2_LAYOUT
    preprocessing = Preprocessing(resize="stretch to 1024x1024 (SAM2Transforms: bilinear, antialiased, on 0..1)")
    encoder_backends = ("torch",)  # the Hiera's OpenVINO conversion is not done here
    resizes_in_workers = False  # SAM2Transforms resizes the float image (sam2.preprocess)
    export_formats = ("pth", "safetensors")  # SAM's ONNX interface has no high-resolution maps
    automatic_masks = False  # SAM2AutomaticMaskGenerator takes other steps than SAM's
    why_not = {
        "automatic_masks": "{model_type}: segment everything is SAM's automatic mask generator; it is not offered "
                           "for SAM 2.1 (SAM2AutomaticMaskGenerator takes other steps)",
        "onnx": "--format onnx writes SAM's ONNX interface; a {model_type} run exports as a checkpoint in sam2's "
                "layout (--format pth), which SAM 2.1's own tools load",
        "openvino": "--backend openvino runs SAM's encoders, not {model_type}'s Hiera: use --backend torch (or auto)",
        "tail": "--tail-blocks: not built for {model_type}: SAM 2.1's neck reads all four Hiera stages, so a tail "
                "would have to cache each stage's output (docs/cache-format.md)",
    }

    def input_size(self, original_size: Size) -> Size:
        return (IMAGE_SIZE, IMAGE_SIZE)  # every image is stretched to the square

    def check_installed(self, model_type: str) -> None:
        from samcache.models.sam2 import require_sam2

        require_sam2(model_type)

    def build(self, model_type: str) -> "torch.nn.Module":
        from samcache.models.sam2 import Sam2AsSam, build_sam2_model

        return Sam2AsSam(build_sam2_model(SAM2_CONFIGS[model_type], model_type)).eval()

    def weights_module(self, sam: "torch.nn.Module") -> "torch.nn.Module":
        return sam.model  # sam2's SAM2Base: its keys as in Meta's sam2.1_hiera_*.pt

    def recognise(self, state_dict: dict[str, Any]) -> Optional[str]:
        blocks = {k.split(".")[3] for k in state_dict if k.startswith("image_encoder.trunk.blocks.")}
        return _HIERA_BLOCKS.get(len(blocks)) if blocks else None

    def torch_encoder(self, sam: "torch.nn.Module", device: "torch.device", precision: str, tail_blocks: int = 0):
        from samcache.models.encoding import Sam2Encoder

        return Sam2Encoder(sam, device, precision)

    def encode(self, sam: "torch.nn.Module", image: "np.ndarray", device: "torch.device") -> "torch.Tensor":
        return sam.encode([image])

    def decoder(self, sam: "torch.nn.Module", model_type: str) -> "PromptDecoder":
        from samcache.models.sam2_decoder import Sam2PromptDecoder

        return Sam2PromptDecoder(sam.prompt_encoder, sam.mask_decoder, family=self, model_type=model_type)

    def frozen_by_cache(self, sam: "torch.nn.Module") -> list["torch.nn.Module"]:
        # The encoder side applies the mask decoder's conv_s0 / conv_s1; the cache stores their outputs.
        return [sam.mask_decoder.conv_s0, sam.mask_decoder.conv_s1]

    def checkpoint_payload(self, state_dict: dict) -> dict:
        return {"model": state_dict}  # as Meta's sam2.1_hiera_*.pt

    def load_with(self, model_type: str, fmt: str) -> str:
        if fmt == "safetensors":  # sam2 reads only its own {"model": ...} .pt files
            return (f"sam2.build_sam.build_sam2({SAM2_CONFIGS[model_type]!r}, None).load_state_dict("
                    "safetensors.torch.load_file(FILE))")
        return f"sam2.build_sam.build_sam2({SAM2_CONFIGS[model_type]!r}, FILE)"


FAMILIES: tuple[ModelFamily, ...] = (SamFamily(), MobileSamFamily(), SamHqFamily(), TinyFamily(), MicroFamily(),
                                     Sam2Family())
"""Every family samcache knows, each model type in exactly one."""
_BY_MODEL_TYPE = {model_type: family for family in FAMILIES for model_type in family.model_types}
if sorted(_BY_MODEL_TYPE) != sorted(MODEL_TYPES) or len(_BY_MODEL_TYPE) != sum(len(f.model_types) for f in FAMILIES):
    raise RuntimeError("specs.MODEL_TYPES and the families' model types differ")  # a bug: caught at import


def family_of(model_type: str) -> ModelFamily:
    """The family of a model type; an unknown type is a CheckpointError that lists the known ones."""
    try:
        return _BY_MODEL_TYPE[model_type]
    except KeyError:
        raise CheckpointError(f"unknown model type {model_type!r}; choose one of {', '.join(MODEL_TYPES)}") from None


def recognise_model_type(state_dict: dict[str, Any]) -> Optional[str]:
    """The model type whose weights a state dict holds, asked of every family (for error messages)."""
    return next((found for family in FAMILIES if (found := family.recognise(state_dict))), None)
