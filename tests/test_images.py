"""read_image / read_image_size: channels, transparency, orientation, bit depth and bad files."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image, ImageOps

from samcache.data import images
from samcache.data.images import INTENSITY_MODES, read_image, read_image_size
from samcache.errors import ImageReadError

# What a viewer shows for each EXIF orientation, written with numpy's rotations and flips
# (independently of the module's own table).
VIEWED = {
    1: lambda a: a,
    2: np.fliplr,
    3: lambda a: np.rot90(a, 2),
    4: np.flipud,
    5: lambda a: np.rot90(np.fliplr(a), 1),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: np.rot90(np.fliplr(a), -1),
    8: lambda a: np.rot90(a, 1),
}


def exif_bytes(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[images.ORIENTATION_TAG] = orientation
    return exif.tobytes()


def blocky_rgb(height: int = 32, width: int = 48, block: int = 16, seed: int = 0) -> np.ndarray:
    """Non-square, asymmetric, flat 16x16 blocks: survives JPEG quality 100 almost exactly."""
    grid = (height // block, width // block, 3)
    colors = np.random.default_rng(seed).integers(0, 256, grid, dtype=np.uint8)
    return np.repeat(np.repeat(colors, block, axis=0), block, axis=1)


def write_cv2(path: Path, array: np.ndarray) -> Path:
    """Writes an RGB(A) or gray array with OpenCV (which wants BGR(A))."""
    if array.ndim == 3:
        array = array[..., [2, 1, 0, 3][: array.shape[2]]]
    assert cv2.imwrite(str(path), array)
    return path


def assert_gray_rgb(result: np.ndarray, gray: np.ndarray) -> None:
    assert result.shape == (*gray.shape, 3) and result.dtype == np.uint8
    for channel in range(3):
        np.testing.assert_array_equal(result[..., channel], gray)


# --- channels ----------------------------------------------------------------------------


def test_gray_png_becomes_three_equal_channels(tmp_path):
    gray = np.arange(12 * 20, dtype=np.uint8).reshape(12, 20)
    result = read_image(write_cv2(tmp_path / "gray.png", gray))
    assert_gray_rgb(result, gray)
    assert result.flags["C_CONTIGUOUS"]


def test_rgb_png_roundtrips_exactly_in_rgb_order(tmp_path):
    rgb = np.random.default_rng(1).integers(0, 256, (15, 22, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    np.testing.assert_array_equal(read_image(tmp_path / "rgb.png"), rgb)

    red = np.zeros((4, 5, 3), np.uint8)
    red[..., 0] = 255
    write_cv2(tmp_path / "red.png", red)
    result = read_image(str(tmp_path / "red.png"))  # str paths work too
    assert (result[..., 0] == 255).all() and (result[..., 1:] == 0).all()


def test_rgba_is_composited_over_white(tmp_path):
    rgba = np.zeros((2, 3, 4), np.uint8)
    rgba[..., :3] = (200, 40, 10)
    rgba[0, :, 3] = (0, 255, 128)  # transparent, opaque, half
    rgba[1, :, 3] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    result = read_image(tmp_path / "rgba.png")
    assert result[0, 0].tolist() == [255, 255, 255]
    assert result[0, 1].tolist() == [200, 40, 10]
    half = 128 / 255
    expected = [round(c * half + 255 * (1 - half)) for c in (200, 40, 10)]
    np.testing.assert_allclose(result[0, 2], expected, atol=1)
    assert (result[1] == (200, 40, 10)).all()


def test_gray_alpha_png_is_composited_over_white(tmp_path):
    la = np.stack([np.full((2, 3), 100, np.uint8), np.array([[0, 255, 128]] * 2, np.uint8)], axis=-1)
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    result = read_image(tmp_path / "la.png")
    assert result[0, 0].tolist() == [255] * 3
    assert result[0, 1].tolist() == [100] * 3
    assert abs(int(result[0, 2, 0]) - round(100 * 128 / 255 + 255 * 127 / 255)) <= 1
    assert (result[..., 0] == result[..., 2]).all()


def palette_image(size=(4, 2)) -> Image.Image:
    image = Image.new("P", size)
    image.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255, 10, 20, 30])
    image.putdata([0, 1, 2, 3] * (size[0] * size[1] // 4))
    return image


def test_palette_png_becomes_its_colours(tmp_path):
    palette_image().save(tmp_path / "p.png")
    result = read_image(tmp_path / "p.png")
    assert result.shape == (2, 4, 3)
    assert result[0].tolist() == [[255, 0, 0], [0, 255, 0], [0, 0, 255], [10, 20, 30]]


def test_palette_with_transparent_entry_shows_white(tmp_path):
    palette_image().save(tmp_path / "pt.png", transparency=1)
    result = read_image(tmp_path / "pt.png")
    assert result[0].tolist() == [[255, 0, 0], [255, 255, 255], [0, 0, 255], [10, 20, 30]]


# --- formats -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["x.bmp", "x.tif", "x.tiff", "x.webp", "x.gif"])
def test_other_formats_load(tmp_path, name):
    rgb = blocky_rgb(seed=2)
    kwargs = {"lossless": True} if name.endswith("webp") else {}
    Image.fromarray(rgb).save(tmp_path / name, **kwargs)
    result = read_image(tmp_path / name)
    if name.endswith("gif"):  # quantized to a palette: only the shape is certain
        assert result.shape == rgb.shape
    else:
        np.testing.assert_array_equal(result, rgb)
    assert read_image_size(tmp_path / name) == rgb.shape[:2]


def test_multipage_tiff_reads_first_page(tmp_path):
    first, second = np.full((3, 4), 10, np.uint8), np.full((5, 6), 20, np.uint8)
    pages = [Image.fromarray(second)]
    Image.fromarray(first).save(tmp_path / "pages.tif", save_all=True, append_images=pages)
    assert_gray_rgb(read_image(tmp_path / "pages.tif"), first)
    assert read_image_size(tmp_path / "pages.tif") == (3, 4)


def test_rgba_tiff_is_not_premultiplied_twice(tmp_path):
    # OpenCV returns colour pre-multiplied by alpha for such a TIFF; read_image must not darken it.
    rgba = np.zeros((1, 3, 4), np.uint8)
    rgba[..., :3] = (200, 40, 10)
    rgba[0, :, 3] = (0, 128, 255)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.tif")
    result = read_image(tmp_path / "rgba.tif")
    assert result[0, 0].tolist() == [255, 255, 255]
    half = [c * 128 / 255 + 255 * 127 / 255 for c in (200, 40, 10)]
    np.testing.assert_allclose(result[0, 1], half, atol=1)
    assert result[0, 2].tolist() == [200, 40, 10]


def test_gray_alpha_tiff_keeps_its_alpha(tmp_path):
    la = np.stack([np.full((1, 2), 100, np.uint8), np.array([[0, 255]], np.uint8)], axis=-1)
    Image.fromarray(la, "LA").save(tmp_path / "la.tif")
    assert read_image(tmp_path / "la.tif")[0].tolist() == [[255] * 3, [100] * 3]


def test_unicode_path(tmp_path):
    rgb = blocky_rgb(seed=3)
    path = tmp_path / "Bild_ß_画像.png"
    Image.fromarray(rgb).save(path)
    np.testing.assert_array_equal(read_image(path), rgb)
    assert read_image_size(path) == (32, 48)


def test_falls_back_to_pillow_when_opencv_cannot_decode(tmp_path, monkeypatch):
    rgb = blocky_rgb(seed=4)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    Image.fromarray(rgb).save(tmp_path / "rot.jpg", quality=100, subsampling=0, exif=exif_bytes(6))
    expected_jpeg = read_image(tmp_path / "rot.jpg")
    monkeypatch.setattr(images.cv2, "imdecode", lambda *args: None)
    result = read_image(tmp_path / "rgb.png")
    np.testing.assert_array_equal(result, rgb)
    assert result.flags["WRITEABLE"] and result.flags["C_CONTIGUOUS"]
    fallback = read_image(tmp_path / "rot.jpg")  # Pillow's decode, oriented once
    assert fallback.shape == expected_jpeg.shape == (48, 32, 3)
    assert np.abs(fallback.astype(int) - expected_jpeg).max() <= 3


@pytest.mark.parametrize("orientation", range(1, 9))
def test_pillow_fallback_orients_gray_tiffs_once(tmp_path, monkeypatch, orientation):
    # Pillow applies a TIFF's orientation while loading (and mis-shapes gray ones read by path).
    gray = blocky_rgb(height=6, width=10, block=2)[..., 0]
    Image.fromarray(gray).save(tmp_path / "g.tif", exif=exif_bytes(orientation))
    monkeypatch.setattr(images.cv2, "imdecode", lambda *args: None)
    assert_gray_rgb(read_image(tmp_path / "g.tif"), VIEWED[orientation](gray))


def test_falls_back_to_pillow_when_opencv_raises(tmp_path, monkeypatch):
    rgb = blocky_rgb(seed=5)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")

    def broken(*args):
        raise cv2.error("decoder crashed")

    monkeypatch.setattr(images.cv2, "imdecode", broken)
    np.testing.assert_array_equal(read_image(tmp_path / "rgb.png"), rgb)


# --- EXIF orientation --------------------------------------------------------------------


@pytest.mark.parametrize("orientation", range(1, 9))
def test_jpeg_exif_orientation(tmp_path, orientation):
    rgb = blocky_rgb()
    path = tmp_path / f"o{orientation}.jpg"
    Image.fromarray(rgb).save(path, quality=100, subsampling=0, exif=exif_bytes(orientation))
    result = read_image(path)
    expected = VIEWED[orientation](rgb)
    assert result.shape == expected.shape
    assert np.abs(result.astype(int) - expected).max() <= 3
    with Image.open(path) as image:  # Pillow's own idea of what a viewer shows
        assert np.abs(result.astype(int) - np.asarray(ImageOps.exif_transpose(image))).max() <= 3
    assert read_image_size(path) == result.shape[:2]
    assert result.flags["C_CONTIGUOUS"]


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "I;16"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_tiff_exif_orientation_is_applied_once(tmp_path, orientation, mode):
    # OpenCV applies a TIFF's orientation itself (Pillow does for RGBA): it must not happen twice.
    rgb = blocky_rgb(height=6, width=10, block=2, seed=orientation)
    stored = {
        "L": rgb[..., 0],
        "RGB": rgb,
        "RGBA": np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)]),
        "I;16": rgb[..., 0].astype(np.uint16) * 257,  # fills the range: "dtype" maps it back exactly
    }[mode]
    path = tmp_path / f"o{orientation}.tif"
    Image.fromarray(stored).save(path, exif=exif_bytes(orientation))
    expected = VIEWED[orientation](rgb if mode in ("RGB", "RGBA") else np.dstack([rgb[..., 0]] * 3))
    result = read_image(path, intensity="dtype")
    np.testing.assert_array_equal(result, expected)
    assert read_image_size(path) == result.shape[:2]


@pytest.mark.parametrize("orientation", [3, 6])
def test_png_exif_orientation(tmp_path, orientation):
    rgb = blocky_rgb()
    Image.fromarray(rgb).save(tmp_path / "o.png", exif=exif_bytes(orientation))
    result = read_image(tmp_path / "o.png")
    np.testing.assert_array_equal(result, VIEWED[orientation](rgb))
    assert read_image_size(tmp_path / "o.png") == result.shape[:2]


def test_invalid_orientation_value_is_ignored(tmp_path):
    rgb = blocky_rgb()
    Image.fromarray(rgb).save(tmp_path / "o.tif", exif=exif_bytes(9))
    np.testing.assert_array_equal(read_image(tmp_path / "o.tif"), rgb)
    assert read_image_size(tmp_path / "o.tif") == (32, 48)


# --- bit depth and intensity -------------------------------------------------------------


def microscopy(seed: int = 0) -> np.ndarray:
    """uint16 values 0..300, like a dim 16-bit fluorescence image."""
    return np.random.default_rng(seed).integers(0, 301, (64, 64)).astype(np.uint16)


def test_percentile_makes_dim_16bit_visible_and_keeps_order(tmp_path):
    raw = microscopy()
    result = read_image(write_cv2(tmp_path / "dim.png", raw))
    gray = result[..., 0]
    assert (result == gray[..., None]).all()
    assert 90 < gray.mean() < 165  # mid-range, not near-black
    order = np.argsort(raw, axis=None, kind="stable")
    assert (np.diff(gray.ravel()[order].astype(int)) >= 0).all()  # brighter input, never darker output
    low, high = np.percentile(raw, images.PERCENTILES)
    expected = np.rint(np.clip((raw - low) / (high - low), 0, 1) * 255)
    assert np.abs(gray - expected).max() <= 1


def test_dtype_mode_keeps_dim_16bit_dark(tmp_path):
    raw = microscopy()
    gray = read_image(write_cv2(tmp_path / "dim.png", raw), intensity="dtype")[..., 0]
    assert gray.max() <= 2  # 300 / 65535 * 255 = 1.2
    np.testing.assert_array_equal(gray, np.rint(raw / 65535 * 255))


def test_minmax_maps_exact_endpoints(tmp_path):
    raw = microscopy()
    raw[0, 0], raw[0, 1] = 7, 290
    raw = np.clip(raw, 7, 290)
    gray = read_image(write_cv2(tmp_path / "dim.png", raw), intensity="minmax")[..., 0]
    assert gray[raw == 7].tolist() == [0] * int((raw == 7).sum())
    assert gray[raw == 290].tolist() == [255] * int((raw == 290).sum())
    assert np.abs(gray - np.rint((raw - 7) / 283 * 255)).max() <= 1


def test_hot_pixel_spoils_minmax_but_not_percentile(tmp_path):
    raw = microscopy()
    raw[10, 10] = 65535
    path = write_cv2(tmp_path / "hot.png", raw)
    robust = read_image(path)[..., 0]
    fragile = read_image(path, intensity="minmax")[..., 0]
    assert 90 < robust.mean() < 165 and robust[10, 10] == 255
    assert fragile.mean() < 3 and fragile[10, 10] == 255


def test_16bit_rgb_png(tmp_path):
    rgb = np.zeros((8, 8, 3), np.uint16)
    rgb[..., 0] = 60000  # red brightest
    rgb[..., 1] = 30000
    rgb[4:, :, 2] = 1000  # blue: two levels, so the image has a range
    path = write_cv2(tmp_path / "rgb16.png", rgb)
    dtype = read_image(path, intensity="dtype")
    np.testing.assert_array_equal(dtype, np.rint(rgb / 65535 * 255))
    minmax = read_image(path, intensity="minmax")  # one range for all channels: colours keep balance
    assert minmax[0, 0].tolist() == [255, round(30000 / 60000 * 255), 0]
    assert minmax[7, 7].tolist() == [255, round(30000 / 60000 * 255), round(1000 / 60000 * 255)]


def test_16bit_rgba_png(tmp_path):
    rgba = np.zeros((1, 3, 4), np.uint16)
    rgba[..., :3] = (65535, 0, 0)
    rgba[0, :, 3] = (0, 65535, 32768)
    result = read_image(write_cv2(tmp_path / "rgba16.png", rgba), intensity="dtype")
    assert result[0, 0].tolist() == [255, 255, 255]
    assert result[0, 1].tolist() == [255, 0, 0]
    assert np.abs(result[0, 2].astype(int) - [255, 127, 127]).max() <= 1


@pytest.mark.parametrize("intensity", INTENSITY_MODES)
def test_8bit_is_never_rescaled(tmp_path, intensity):
    gray = np.random.default_rng(6).integers(100, 111, (10, 12), dtype=np.uint8)  # low contrast
    gray[0, 0] = 250  # and a hot pixel
    assert_gray_rgb(read_image(write_cv2(tmp_path / "g.png", gray), intensity=intensity), gray)


@pytest.mark.parametrize("intensity", INTENSITY_MODES)
def test_constant_16bit_image_does_not_divide_by_zero(tmp_path, intensity):
    path = write_cv2(tmp_path / "flat.png", np.full((5, 6), 1234, np.uint16))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = read_image(path, intensity=intensity)
    expected = round(1234 / 65535 * 255) if intensity == "dtype" else 0
    assert (result == expected).all()


def test_sparse_bright_objects_survive_a_collapsed_percentile_range(tmp_path):
    raw = np.zeros((40, 40), np.uint16)
    raw[0, :3] = 500  # fewer than 0.5% of the pixels: both percentiles are 0
    gray = read_image(write_cv2(tmp_path / "sparse.png", raw))[..., 0]
    assert gray[0, :3].tolist() == [255] * 3 and gray.sum() == 3 * 255


def test_float_tiff(tmp_path):
    values = np.array([[0.0, 0.5, 1.0, 2.0, -1.0, np.nan]], np.float32)
    Image.fromarray(values).save(tmp_path / "f.tif")
    dtype = read_image(tmp_path / "f.tif", intensity="dtype")[..., 0]
    assert dtype[0].tolist() == [0, 128, 255, 255, 0, 0]
    minmax = read_image(tmp_path / "f.tif", intensity="minmax")[..., 0]  # NaN ignored for the range
    assert minmax[0, 3] == 255 and minmax[0, 4] == 0 and minmax[0, 1] == round(1.5 / 3 * 255)


def test_int32_tiff(tmp_path):
    values = np.array([[0, 1000, 2000]], np.int32)
    Image.fromarray(values).save(tmp_path / "i.tif")
    assert read_image(tmp_path / "i.tif", intensity="minmax")[0, :, 0].tolist() == [0, 128, 255]


def test_unknown_intensity_is_a_value_error(tmp_path):
    path = write_cv2(tmp_path / "g.png", np.zeros((2, 2), np.uint8))
    with pytest.raises(ValueError, match="percentile.*minmax.*dtype"):
        read_image(path, intensity="auto")


# --- bad files ---------------------------------------------------------------------------


def encoded(image_format: str, **save_options) -> bytes:
    """A 64x80 noise image as Pillow encodes it."""
    rgb = np.random.default_rng(7).integers(0, 256, (64, 80, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format=image_format, **save_options)
    return buffer.getvalue()


def with_segment(jpeg: bytes, payload: bytes) -> bytes:
    """Inserts an APP15 segment holding `payload` right after the start-of-image marker."""
    return jpeg[:2] + b"\xff\xef" + (len(payload) + 2).to_bytes(2, "big") + payload + jpeg[2:]


BAD_FILES = {
    "random.png": np.random.default_rng(8).bytes(5000),
    "text.jpg": b"this is not an image\n" * 10,
    "doc.pdf": b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<< /Type /Catalog >>\nendobj\n",
    "half.jpg": encoded("JPEG")[: len(encoded("JPEG")) // 2],
    "no_eoi.jpg": encoded("JPEG")[:-2],
    "half_progressive.jpg": encoded("JPEG", progressive=True)[:1500],
    "half.png": encoded("PNG")[: len(encoded("PNG")) // 2],
    "no_iend.png": encoded("PNG")[:-12],
    "header_only.png": encoded("PNG")[:40],
    # an end-of-image marker inside a header segment (as in an EXIF thumbnail) must not count
    "segment_eoi.jpg": with_segment(encoded("JPEG"), b"\xff\xd9" * 4)[:1500],
    "half.tif": encoded("TIFF")[: len(encoded("TIFF")) // 2],
    "half.bmp": encoded("BMP")[: len(encoded("BMP")) // 2],
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_files_raise_image_read_error_naming_the_file(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(BAD_FILES[name])
    with pytest.raises(ImageReadError, match=name.replace(".", r"\.")):
        read_image(path)


@pytest.mark.parametrize("name, reason", [("missing.png", "no such file"), ("folder.png", "directory"),
                                          ("empty.png", "empty")])
def test_missing_directory_and_empty_raise_image_read_error(tmp_path, name, reason):
    (tmp_path / "folder.png").mkdir()
    (tmp_path / "empty.png").write_bytes(b"")
    for read in (read_image, read_image_size):
        with pytest.raises(ImageReadError, match=reason) as raised:
            read(tmp_path / name)
        assert str(tmp_path / name) in str(raised.value)


def test_read_image_size_rejects_non_images(tmp_path):
    path = tmp_path / "random.tif"
    path.write_bytes(BAD_FILES["random.png"])
    with pytest.raises(ImageReadError, match="random.tif"):
        read_image_size(path)


@pytest.mark.parametrize("name", ["half.jpg", "no_eoi.jpg", "half_progressive.jpg", "segment_eoi.jpg",
                                  "half.png", "no_iend.png"])
def test_truncation_is_caught_even_when_the_decoder_returns_a_partial_image(tmp_path, monkeypatch, name):
    # OpenCV 4 returns truncated JPEGs partly decoded (gray below the cut) without an error.
    monkeypatch.setattr(images.cv2, "imdecode", lambda *args: np.full((64, 80, 3), 128, np.uint8))
    path = tmp_path / name
    path.write_bytes(BAD_FILES[name])
    with pytest.raises(ImageReadError, match="truncated"):
        read_image(path)


def test_segment_with_end_marker_in_a_complete_jpeg_is_fine(tmp_path):
    (tmp_path / "ok.jpg").write_bytes(with_segment(encoded("JPEG"), b"\xff\xd9" * 4))
    assert read_image(tmp_path / "ok.jpg").shape == (64, 80, 3)


def test_truncation_message_says_truncated(tmp_path):
    path = tmp_path / "cut.jpg"
    path.write_bytes(BAD_FILES["half.jpg"])
    with pytest.raises(ImageReadError, match="truncated"):
        read_image(path)


def test_jpeg_with_data_after_its_end_marker_is_fine(tmp_path):
    # Motion photos append a video after the JPEG's end-of-image marker.
    rgb = blocky_rgb()
    path = tmp_path / "motion.jpg"
    Image.fromarray(rgb).save(path, quality=100, subsampling=0, exif=exif_bytes(6))
    path.write_bytes(path.read_bytes() + b"\x00\x00\x00\x18ftypmp42" + bytes(500))
    result = read_image(path)
    assert np.abs(result.astype(int) - VIEWED[6](rgb)).max() <= 3


def test_complete_progressive_jpeg_and_restart_markers_pass_the_truncation_check(tmp_path):
    rgb = blocky_rgb(height=64, width=96)
    Image.fromarray(rgb).save(tmp_path / "p.jpg", quality=100, subsampling=0, progressive=True)
    assert np.abs(read_image(tmp_path / "p.jpg").astype(int) - rgb).max() <= 3
    options = [cv2.IMWRITE_JPEG_QUALITY, 100, cv2.IMWRITE_JPEG_RST_INTERVAL, 1,
               cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444]
    ok, data = cv2.imencode(".jpg", rgb[..., ::-1], options)
    assert ok and b"\xff\xd3" in data.tobytes()  # restart markers RST0..RST7 in the scan
    (tmp_path / "rst.jpg").write_bytes(data.tobytes())
    assert np.abs(read_image(tmp_path / "rst.jpg").astype(int) - rgb).max() <= 3
