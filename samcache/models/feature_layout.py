"""How each family's features are cached and handed to the decoder: `CacheLayout`; SAM 2.1's three feature maps
packed into one (1024, 64, 64) array, and back.

Everything downstream of the cache (the in-memory store, batching, moving to the device, the
decoder's inputs) handles one array per image of shape (C, 64, 64). For SAM that is the
embedding (C = 256). A SAM 2.1 image has three maps of different sizes, so they are packed into
one such array without changing a value: the two high-resolution maps are pixel-unshuffled down to
64x64 (`torch.nn.functional.pixel_unshuffle`'s order: channel c, row offset i, column offset j ->
channel (c * r + i) * r + j) and the maps stacked along the channels:

    channels    0..255    image_embed   (256, 64, 64)
    channels  256..511    high_res_s1   (64, 128, 128), unshuffled by 2
    channels  512..1023   high_res_s0   (32, 256, 256), unshuffled by 4

The cache stores the three maps as they are (docs/cache-format.md) and packs them when read;
the SAM 2.1 decoder unpacks them on its device. Both functions take numpy arrays or torch
tensors, with any leading (batch) dimensions.
"""

from __future__ import annotations

from samcache.models.specs import (
    EMBEDDING_SHAPE,
    EMBEDDING_SIZE,
    MICRO_EMBED_DIM,
    PROMPT_EMBED_DIM,
    SAM2_FEATURE_SHAPES,
    SAM_HQ_VIT_CHANNELS,
)

# (name, shuffle factor) in packing order
_PARTS = (("image_embed", 1), ("high_res_s1", 2), ("high_res_s0", 4))


def _permute(x, axes: tuple[int, ...]):
    return x.permute(*axes) if hasattr(x, "permute") else x.transpose(axes)


def _concat(parts: list, axis: int):
    if hasattr(parts[0], "permute"):
        import torch

        return torch.cat(parts, dim=axis)
    import numpy as np

    return np.concatenate(parts, axis=axis)


def _unshuffle(x, r: int):
    """(..., C, H*r, W*r) -> (..., C*r*r, H, W), as torch's pixel_unshuffle."""
    *lead, c, hr, wr = x.shape
    h, w, n = hr // r, wr // r, len(lead)
    x = x.reshape(*lead, c, h, r, w, r)
    x = _permute(x, (*range(n), n, n + 2, n + 4, n + 1, n + 3))
    return x.reshape(*lead, c * r * r, h, w)


def _shuffle(x, r: int):
    """(..., C*r*r, H, W) -> (..., C, H*r, W*r), as torch's pixel_shuffle."""
    *lead, crr, h, w = x.shape
    c, n = crr // (r * r), len(lead)
    x = x.reshape(*lead, c, r, r, h, w)
    x = _permute(x, (*range(n), n, n + 3, n + 1, n + 4, n + 2))
    return x.reshape(*lead, c, h * r, w * r)


def pack_sam2(maps: dict):
    """{"image_embed", "high_res_s1", "high_res_s0"} (each (..., C, H, W) as SAM2_FEATURE_SHAPES)
    -> (..., 1024, 64, 64)."""
    for name, _ in _PARTS:
        if tuple(maps[name].shape[-3:]) != SAM2_FEATURE_SHAPES[name]:
            raise ValueError(f"{name} has shape {tuple(maps[name].shape)}, expected (..., "
                             f"{', '.join(map(str, SAM2_FEATURE_SHAPES[name]))})")
    return _concat([_unshuffle(maps[name], r) if r > 1 else maps[name] for name, r in _PARTS], axis=-3)


def unpack_sam2(packed) -> dict:
    """(..., 1024, 64, 64) -> {"image_embed", "high_res_s1", "high_res_s0"}, the inverse of pack_sam2."""
    if tuple(packed.shape[-2:]) != (EMBEDDING_SIZE, EMBEDDING_SIZE):
        raise ValueError(f"packed SAM 2.1 features have shape {tuple(packed.shape)}, expected (..., 1024, 64, 64)")
    out, start = {}, 0
    for name, r in _PARTS:
        channels = SAM2_FEATURE_SHAPES[name][0] * r * r
        part = packed[..., start : start + channels, :, :]
        out[name] = _shuffle(part, r) if r > 1 else part
        start += channels
    if start != packed.shape[-3]:
        raise ValueError(f"packed SAM 2.1 features have {packed.shape[-3]} channels, expected {start}")
    return out


class CacheLayout:
    """What a cache stores per image for one model family, and how that becomes the decoder's input.

    Arguments:
      name: the layout's name, what `samcache info` reports as the cache's model family.
      schema_version: the cache header's schema version (docs/cache-format.md).
      stored_maps: {dataset name: shape} of a shard's per-image datasets, `embeddings` first; each
        is stored (images, *shape) float16 with a checksum per image.
      channels: C of the decoder's input (C, 64, 64) as the cache hands it out.
    """

    def __init__(self, *, name: str, schema_version: int, stored_maps: dict[str, tuple[int, ...]], channels: int):
        self.name, self.schema_version, self.stored_maps, self.channels = name, schema_version, stored_maps, channels

    @property
    def feature_shape(self) -> tuple[int, int, int]:
        return (self.channels, EMBEDDING_SIZE, EMBEDDING_SIZE)

    def to_stored(self, features) -> dict:
        """One image's decoder input -> the shard's datasets (`stored_maps`); `from_stored` inverts it."""
        return {"embeddings": features}

    def from_stored(self, stored: dict):
        """The shard's datasets of one image -> its features, as `to_stored` took them."""
        return stored["embeddings"]

    @property
    def decoder_maps(self) -> tuple[str, ...]:
        """The datasets the decoder's input is made of (`decoder_input`)."""
        return tuple(self.stored_maps)

    @property
    def decoder_shape(self) -> tuple[int, int, int]:
        """The decoder input's shape (C, 64, 64)."""
        return self.feature_shape

    def decoder_input(self, stored: dict):
        """The datasets `decoder_maps` of one image -> the decoder's input."""
        return self.from_stored(stored)


class PackedSam2Layout(CacheLayout):
    """SAM 2.1's three maps stored as they are, handed out packed into one (1024, 64, 64) array."""

    def __init__(self):
        super().__init__(name="sam2.1", schema_version=2, channels=sum(shape[0] * r * r for (_, r), shape in
                                                        zip(_PARTS, (SAM2_FEATURE_SHAPES[n] for n, _ in _PARTS))),
                         stored_maps={"embeddings": SAM2_FEATURE_SHAPES["image_embed"],
                                      "high_res_s1": SAM2_FEATURE_SHAPES["high_res_s1"],
                                      "high_res_s0": SAM2_FEATURE_SHAPES["high_res_s0"]})

    def to_stored(self, features) -> dict:
        maps = unpack_sam2(features)
        return {"embeddings": maps["image_embed"], "high_res_s1": maps["high_res_s1"],
                "high_res_s0": maps["high_res_s0"]}

    def from_stored(self, stored: dict):
        return pack_sam2({"image_embed": stored["embeddings"], "high_res_s1": stored["high_res_s1"],
                          "high_res_s0": stored["high_res_s0"]})


class SamHqLayout(CacheLayout):
    """SAM-HQ's: the embedding (256, 64, 64) and the encoder's early feature (C, 64, 64), stored as two
    datasets, handed out stacked along the channels (256 + C, 64, 64) (sam_hq.py)."""

    def __init__(self, early_channels: int):
        super().__init__(name="sam_hq", schema_version=3, channels=PROMPT_EMBED_DIM + early_channels,
                         stored_maps={"embeddings": EMBEDDING_SHAPE,
                                      "early_features": (early_channels, EMBEDDING_SIZE, EMBEDDING_SIZE)})

    def to_stored(self, features) -> dict:
        return {"embeddings": features[..., :PROMPT_EMBED_DIM, :, :],
                "early_features": features[..., PROMPT_EMBED_DIM:, :, :]}

    def from_stored(self, stored: dict):
        return _concat([stored["embeddings"], stored["early_features"]], axis=-3)


class TailLayout(CacheLayout):
    """A cache that also stores the encoder's tail tokens (encoder_tail.py): the base layout's datasets
    plus `tail_tokens` (C, 64, 64), the hidden state before the encoder's last `tail_blocks` blocks.
    The encoder hands the features out stacked (the base's channels, then the tokens'); the decoder
    reads the base's datasets alone, and a tail in training reads `tail_tokens` alone.

    Arguments:
      base: the layout of the model's caches without tail tokens.
      tail_channels: C of the tokens (768 for vit_b, 192 for the tiny).
      tail_blocks: K, recorded in the cache's header.
    """

    def __init__(self, base: CacheLayout, *, tail_channels: int, tail_blocks: int):
        super().__init__(name=base.name, schema_version=base.schema_version,
                         stored_maps={**base.stored_maps,
                                      "tail_tokens": (tail_channels, EMBEDDING_SIZE, EMBEDDING_SIZE)},
                         channels=base.channels + tail_channels)
        self.base, self.tail_channels, self.tail_blocks = base, tail_channels, tail_blocks

    @property
    def tail_shape(self) -> tuple[int, int, int]:
        return (self.tail_channels, EMBEDDING_SIZE, EMBEDDING_SIZE)

    def to_stored(self, features) -> dict:
        return {**self.base.to_stored(features[..., : self.base.channels, :, :]),
                "tail_tokens": features[..., self.base.channels :, :, :]}

    def from_stored(self, stored: dict):
        return _concat([self.base.from_stored(stored), stored["tail_tokens"]], axis=-3)

    @property
    def decoder_maps(self) -> tuple[str, ...]:
        return tuple(self.base.stored_maps)

    @property
    def decoder_shape(self) -> tuple[int, int, int]:
        return self.base.feature_shape

    def decoder_input(self, stored: dict):
        return self.base.from_stored(stored)


class ViewsLayout(CacheLayout):
    """A cache that also holds each image's views (`embed --views`, data/views.py): for every dataset
    `name` of the base layout, `view_<name>` (V, *shape), the features of the V views in their listed
    order. The encoder hands out (1 + V, *base features) per image, the original first; the decoder
    reads one of them (`view_input`), the original by default.

    Arguments:
      base: the layout without views (with tail tokens, when the cache has them).
      views: V, how many views each image has.
    """

    def __init__(self, base: CacheLayout, *, views: int):
        super().__init__(name=base.name, schema_version=base.schema_version,
                         stored_maps={**base.stored_maps,
                                      **{f"view_{n}": (views, *shape) for n, shape in base.stored_maps.items()}},
                         channels=base.channels)
        self.base, self.views = base, views
        self.tail_channels = getattr(base, "tail_channels", 0)

    @property
    def feature_shape(self) -> tuple[int, ...]:
        return (1 + self.views, *self.base.feature_shape)

    @property
    def tail_shape(self) -> tuple[int, int, int]:
        return self.base.tail_shape

    def to_stored(self, features) -> dict:
        original = self.base.to_stored(features[0])
        views = [self.base.to_stored(features[1 + v]) for v in range(self.views)]
        stacked = {f"view_{n}": _stack([view[n] for view in views]) for n in original}
        return {**original, **stacked}

    def from_stored(self, stored: dict):
        original = self.base.from_stored(stored)
        views = [self.base.from_stored({n: stored[f"view_{n}"][v] for n in self.base.stored_maps})
                 for v in range(self.views)]
        return _stack([original, *views])

    @property
    def decoder_maps(self) -> tuple[str, ...]:
        return self.base.decoder_maps

    @property
    def decoder_shape(self) -> tuple[int, int, int]:
        return self.base.decoder_shape

    def decoder_input(self, stored: dict):
        return self.base.decoder_input(stored)

    def view_maps(self, names: tuple[str, ...]) -> tuple[str, ...]:
        """The datasets that hold the views of the base datasets `names`."""
        return tuple(f"view_{n}" for n in names)


def _stack(parts: list):
    if hasattr(parts[0], "permute"):
        import torch

        return torch.stack(parts)
    import numpy as np

    return np.stack(parts)


EMBEDDING_LAYOUT = CacheLayout(name="sam", schema_version=1, stored_maps={"embeddings": EMBEDDING_SHAPE},
                               channels=EMBEDDING_SHAPE[0])
"""SAM's (and every family whose decoder reads only the image embedding): one (256, 64, 64) map."""
SAM2_LAYOUT = PackedSam2Layout()
MICRO_LAYOUT = CacheLayout(name="sam", schema_version=1, stored_maps={"embeddings": (MICRO_EMBED_DIM, EMBEDDING_SIZE,
                                                                                     EMBEDDING_SIZE)},
                           channels=MICRO_EMBED_DIM)
"""The micro model's: SAM's datasets at its narrower width (32, 64, 64)."""
SAM_HQ_LAYOUTS = {model_type: SamHqLayout(channels) for model_type, channels in SAM_HQ_VIT_CHANNELS.items()}
"""SAM-HQ's, per model type (the early feature's channels differ: 768 for hq_vit_b, 160 for hq_vit_tiny)."""
