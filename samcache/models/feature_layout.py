"""SAM 2.1's three feature maps as one (1024, 64, 64) array, and back.

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

from samcache.models.specs import EMBEDDING_SIZE, SAM2_FEATURE_SHAPES

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
