"""Views (`embed --views`): each moves the model input and the annotations together, exactly."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from samcache.data import masks
from samcache.data.records import ObjectRecord
from samcache.data.views import View, parse_views
from samcache.errors import SamcacheError
from samcache.models.preprocess import input_size, resize_image
from samcache.models.prompts import evaluation_prompt, low_res_target
from samcache.models.specs import IMAGE_SIZE, LOW_RES_SIZE

HEIGHT, WIDTH = 300, 500
DIHEDRAL = ["hflip", "vflip", "rot90", "rot180", "rot270"]
SCALES = ["scale0.5", "scale0.75"]
COLOURS = [(220, 30, 30), (30, 200, 60)]


def _scene() -> tuple[np.ndarray, list[np.ndarray]]:
    """A non-square image with two objects in their own colours, off-centre so that every flip
    and rotation puts them somewhere else, and their masks."""
    ellipse = np.zeros((HEIGHT, WIDTH), np.uint8)
    cv2.ellipse(ellipse, (130, 90), (70, 45), 20, 0, 360, 1, -1)
    triangle = np.zeros((HEIGHT, WIDTH), np.uint8)
    cv2.fillPoly(triangle, [np.array([[330, 170], [470, 280], [300, 270]], np.int32)], 1)
    image = np.full((HEIGHT, WIDTH, 3), 128, np.uint8)
    object_masks = [ellipse.astype(bool), triangle.astype(bool)]
    for mask, colour in zip(object_masks, COLOURS):
        image[mask] = colour
    return image, object_masks


def _objects(object_masks: list[np.ndarray]) -> list[ObjectRecord]:
    return [ObjectRecord(object_id=7 + i, box=masks.bbox_xyxy(masks.encode(m)), rle=masks.encode(m),
                         category=f"c{i}") for i, m in enumerate(object_masks)]


def _colour_region(image: np.ndarray, colour) -> np.ndarray:
    return (np.abs(image.astype(int) - np.array(colour)).max(axis=2) < 30)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def _resized_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return cv2.resize(mask.astype(np.float32), (size[1], size[0]), interpolation=cv2.INTER_LINEAR) > 0.5


def _box_of(mask: np.ndarray) -> tuple[float, float, float, float]:
    return masks.bbox_xyxy(masks.encode(mask))


@pytest.mark.parametrize("name", DIHEDRAL + SCALES)
def test_the_view_masks_cover_their_objects_in_the_view_input(name):
    view = View(name=name)
    image, object_masks = _scene()
    resized = resize_image(image)
    view_image = view.input_image(resized)
    assert view_image.dtype == np.uint8 and view_image.flags.c_contiguous
    assert view_image.shape == (*view.input_size(resized.shape[:2]), 3)
    objects = view.objects(_objects(object_masks), (HEIGHT, WIDTH))
    for obj, colour in zip(objects, COLOURS):
        region = _colour_region(view_image, colour)
        assert region.sum() > 500
        assert _iou(_resized_mask(masks.decode(obj.rle), view_image.shape[:2]), region) > 0.9
    if view.scale is None:  # the test tells views apart: another flip or rotation's masks miss
        for other in DIHEDRAL:
            other_view = View(name=other)
            if other != name and other_view.original_size((HEIGHT, WIDTH)) == view.original_size((HEIGHT, WIDTH)):
                wrong = _resized_mask(other_view.mask(object_masks[0]), view_image.shape[:2])
                assert _iou(wrong, _colour_region(view_image, COLOURS[0])) < 0.5


@pytest.mark.parametrize("name", DIHEDRAL + SCALES)
def test_box_prompts_of_a_view_land_on_the_object_in_its_input(name):
    view = View(name=name)
    image, object_masks = _scene()
    resized = resize_image(image)
    view_image = view.input_image(resized)
    frame = view.input_size(resized.shape[:2])
    for obj, colour in zip(view.objects(_objects(object_masks), (HEIGHT, WIDTH)), COLOURS):
        prompt = evaluation_prompt(obj.rle, obj.box, view.original_size((HEIGHT, WIDTH)), "box", frame=frame)
        ys, xs = np.nonzero(_colour_region(view_image, colour))
        np.testing.assert_allclose(prompt.box, [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], atol=3)


@pytest.mark.parametrize("name", SCALES)
def test_low_res_targets_of_a_scale_view_sit_where_its_input_shows_the_object(name):
    view = View(name=name)
    image, object_masks = _scene()
    resized = resize_image(image)
    view_image = view.input_image(resized)
    frame = view.input_size(resized.shape[:2])
    padded = np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    padded[: frame[0], : frame[1]] = view_image
    for obj, colour in zip(view.objects(_objects(object_masks), (HEIGHT, WIDTH)), COLOURS):
        shown = cv2.resize(_colour_region(padded, colour).astype(np.float32), (LOW_RES_SIZE, LOW_RES_SIZE),
                           interpolation=cv2.INTER_AREA) > 0.5
        assert _iou(low_res_target(obj.rle, frame) > 0.5, shown) > 0.85
        # The original's frame would put the target elsewhere: the scale moved the object.
        assert _iou(low_res_target(obj.rle, resized.shape[:2]) > 0.5, shown) < 0.5


def _random_masks(height: int, width: int) -> list[np.ndarray]:
    rng = np.random.default_rng(3)
    shapes = [rng.random((height, width)) < 0.01]  # scattered pixels: the box spans the extreme ones
    for y, x in [(0, 0), (height - 1, width - 1), (0, width - 1), (height - 1, 0), (17, 41)]:
        single = np.zeros((height, width), bool)
        single[y, x] = True
        shapes.append(single)
    shapes.append(np.ones((height, width), bool))
    return shapes


@pytest.mark.parametrize("name", DIHEDRAL + SCALES)
def test_the_box_of_a_moved_mask_is_the_moved_box_exactly(name):
    view = View(name=name)
    for mask in _random_masks(HEIGHT, WIDTH):
        assert view.box(_box_of(mask), (HEIGHT, WIDTH)) == _box_of(view.mask(mask))


@pytest.mark.parametrize("name", DIHEDRAL + SCALES)
def test_sizes_agree_with_the_arrays_the_view_makes(name):
    view = View(name=name)
    image, object_masks = _scene()
    resized = resize_image(image)
    assert view.mask(object_masks[0]).shape == view.original_size((HEIGHT, WIDTH))
    assert view.input_image(resized).shape[:2] == view.input_size(resized.shape[:2])
    if view.scale is None:  # a flip or rotation of the original resizes to the moved input frame
        assert view.input_size(input_size((HEIGHT, WIDTH))) == input_size(view.original_size((HEIGHT, WIDTH)))
    else:
        assert view.original_size((HEIGHT, WIDTH)) == (HEIGHT, WIDTH)
        s = view.scale
        assert view.input_size((614, 1024)) == (int(614 * s + 0.5), int(1024 * s + 0.5))
        assert view.input_size((1, 1024))[0] == 1
    objects = view.objects(_objects(object_masks), (HEIGHT, WIDTH))
    assert [tuple(o.rle["size"]) for o in objects] == [view.original_size((HEIGHT, WIDTH))] * 2
    assert [(o.object_id, o.category) for o in objects] == [(7, "c0"), (8, "c1")]


def test_rotations_and_flips_compose_as_the_dihedral_group():
    image, object_masks = _scene()
    resized = resize_image(image)
    records = _objects(object_masks)
    box = records[1].box

    def apply(names, size):
        img, recs, b, s, ins = resized, records, box, size, resized.shape[:2]
        for n in names:
            v = View(name=n)
            img, recs, b = v.input_image(img), v.objects(recs, s), v.box(b, s)
            s, ins = v.original_size(s), v.input_size(ins)
        return img, recs, b, s, ins

    for names in (["rot90"] * 4, ["hflip"] * 2, ["vflip"] * 2, ["rot90", "rot270"], ["rot180", "rot180"],
                  ["hflip", "vflip", "rot180"]):
        img, recs, b, s, ins = apply(names, (HEIGHT, WIDTH))
        assert np.array_equal(img, resized) and recs == records and b == box
        assert s == (HEIGHT, WIDTH) and ins == resized.shape[:2]
    img, recs, b, _, _ = apply(["rot90", "rot90"], (HEIGHT, WIDTH))
    assert np.array_equal(img, View(name="rot180").input_image(resized))
    assert recs == View(name="rot180").objects(records, (HEIGHT, WIDTH))
    rotated = View(name="rot90").mask(object_masks[0])
    assert np.array_equal(rotated, np.rot90(object_masks[0]))  # counter-clockwise, as np.rot90
    assert not np.array_equal(rotated, np.rot90(object_masks[0], 3))


def test_single_channel_and_scale_inputs_keep_their_channels():
    gray = np.arange(614 * 1024, dtype=np.uint32).reshape(614, 1024, 1).astype(np.uint8)
    assert View(name="scale0.5").input_image(gray).shape == (307, 512, 1)
    assert View(name="rot270").input_image(gray).shape == (1024, 614, 1)


def test_parse_views_keeps_the_order_and_canonical_names():
    views = parse_views("hflip, rot90,scale.5")
    assert [v.name for v in views] == ["hflip", "rot90", "scale0.5"]
    assert views[2].scale == 0.5
    assert parse_views(["vflip", "scale0.75,rot270"]) == (View(name="vflip"), View(name="scale0.75"),
                                                           View(name="rot270"))
    assert parse_views("") == () and parse_views([]) == ()


@pytest.mark.parametrize("text, bad", [
    ("hflip,blur", "'blur'"),
    ("scale1.5", "'scale1.5'"),
    ("scale1", "'scale1'"),
    ("scale0", "'scale0'"),
    ("scale-0.5", "'scale-0.5'"),
    ("rot45", "'rot45'"),
    ("original", "'original'"),
    ("identity,hflip", "'identity'"),
    ("hflip,rot90,hflip", "'hflip' is listed twice"),
    ("scale0.5,scale0.50", "'scale0.50' is listed twice"),
    ("hflip,,rot90", "empty view name"),
])
def test_parse_views_refuses_bad_entries_in_one_line(text, bad):
    with pytest.raises(SamcacheError) as caught:
        parse_views(text)
    message = str(caught.value)
    assert "\n" not in message and message.startswith("--views: ")
    assert bad in message and "hflip, vflip, rot90, rot180, rot270, scaleS" in message
