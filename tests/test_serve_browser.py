"""`samcache serve`'s page in headless Chromium: a box dragged on the preview gives the mask `samcache
predict` gives for the same box in original pixels, and "Save as new object" writes it into the
dataset's COCO file."""

from __future__ import annotations

import io
import json
import urllib.parse
import urllib.request

import numpy as np
import pytest
from click.testing import CliRunner
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

from samcache.cli import main
from samcache.data import masks
from tests import browser
from tests.browser import console_errors, drag_on_canvas, open_page, screenshot, wait_for

chrome = browser.chrome
live_server = browser.live_server

# A prediction decodes on the CPU in well under a second; the first one also warms torch up.
PREDICT_TIMEOUT_S = 30


def _get(url: str) -> dict:
    with urllib.request.urlopen(url) as answer:
        return json.loads(answer.read())


def _select(chrome, name: str) -> None:
    """Clicks `name` in the image list and waits until its preview and objects are shown."""
    chrome.find_element("css selector", f"#images li[data-name='{name}']").click()
    wait_for(chrome, f"#view[data-image='{name}']")
    wait_for(chrome, "#status[data-state='ready']")


def _open_first_val_image(chrome, url: str) -> tuple[str, dict, dict]:
    """Opens the page, selects its first val image; returns (name, its /api/images entry, its objects)."""
    open_page(chrome, url + "/")
    wait_for(chrome, "#status[data-state='ready']")
    name = wait_for(chrome, "#images li[data-split='val']").get_attribute("data-name")
    image = next(im for im in _get(url + "/api/images")["images"] if im["name"] == name)
    truth = _get(url + "/api/objects?image=" + urllib.parse.quote(name))
    _select(chrome, name)
    return name, image, truth


def _canvas_size(chrome) -> tuple[int, int]:
    return tuple(chrome.execute_script("const v = document.getElementById('view'); return [v.width, v.height];"))


def test_the_page_its_files_and_previews_are_served(stamps_cache):
    from fastapi.testclient import TestClient
    from PIL import Image

    from samcache.cache.format import PREVIEW_SIZE
    from samcache.serve.app import create_app
    from samcache.serve.session import ServeSession

    with TestClient(create_app(ServeSession(stamps_cache))) as client:
        page = client.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert '<canvas id="view"' in page.text and "/static/app.js" in page.text
        for file, kind in (("app.js", "javascript"), ("style.css", "text/css")):
            served = client.get("/static/" + file)
            assert served.status_code == 200 and kind in served.headers["content-type"], file
        for outside in ("/static/..%2fapp.py", "/static/%2e%2e/session.py", "/static/nothing.js"):
            assert client.get(outside).status_code == 404, outside

        image = client.get("/api/images").json()["images"][0]
        preview = client.get("/api/preview", params={"image": image["name"]})
        assert preview.status_code == 200 and preview.headers["content-type"] == "image/jpeg"
        with Image.open(io.BytesIO(preview.content)) as picture:
            assert max(picture.size) == PREVIEW_SIZE
            assert picture.size[0] / picture.size[1] == pytest.approx(image["width"] / image["height"], abs=0.01)
        for name in ("nowhere.jpg", "../val.json"):
            missing = client.get("/api/preview", params={"image": name})
            assert missing.status_code == 404 and f"no image {name!r}" in missing.json()["error"]


@pytest.mark.browser
def test_a_box_drawn_on_the_page_gives_predicts_mask_and_saves_it(live_server, chrome, stamps_copy, stamps_cache_copy,
                                                                  stamps_run, tmp_path):
    from samcache.serve.app import create_app
    from samcache.serve.session import ServeSession

    url = live_server(create_app(ServeSession(stamps_cache_copy, stamps_run)))
    name, image, truth = _open_first_val_image(chrome, url)

    # A box a little larger than the first ground-truth object, dragged in canvas pixels.
    width, height = _canvas_size(chrome)
    assert max(width, height) == 640 and width / height == pytest.approx(image["width"] / image["height"], abs=0.01)
    scale = width / image["width"]
    x, y, w, h = truth["objects"][0]["bbox"]
    start = (max(x * scale - 6, 1), max(y * scale - 6, 1))
    end = (min((x + w) * scale + 6, width - 2), min((y + h) * scale + 6, height - 2))
    drag_on_canvas(chrome, "#view", start, end)
    wait_for(chrome, "#status[data-state='predicted']", timeout=PREDICT_TIMEOUT_S)
    request, prediction = chrome.execute_script("return [window.samcache.lastRequest, window.samcache.lastPrediction];")

    # The page sent the dragged box in original pixels (a canvas pixel is 1/scale of them).
    assert request["image"] == name and request["model"] == "fine_tuned" and "points" not in request
    dragged = [start[0] / scale, start[1] / scale, end[0] / scale, end[1] / scale]
    assert request["box"] == pytest.approx(dragged, abs=1 / scale + 1)
    served = masks.decode(prediction["segmentation"])
    assert served.shape == (image["height"], image["width"]) and served.any()

    out = tmp_path / "predicted"
    result = CliRunner().invoke(main, ["predict", str(stamps_copy / "images" / name), "--run", str(stamps_run),
                                       "--box", ",".join(map(str, request["box"])), "--out", str(out)])
    assert result.exit_code == 0, result.output
    predicted = json.loads((out / "predictions.json").read_text())["predictions"][0]
    assert np.array_equal(served, masks.decode(predicted["segmentation"]))
    assert prediction["score"] == pytest.approx(predicted["score"], abs=1e-6)

    # The page's scores: the predicted IoU, and the IoU with the ground truth the mask overlaps most.
    assert chrome.find_element("css selector", "#score").text == f"{prediction['score']:.3f}"
    truths = [masks.decode(o["segmentation"]) for o in truth["objects"]]
    best = max(truths, key=lambda t: (served & t).sum())
    iou = (served & best).sum() / (served | best).sum()
    assert chrome.find_element("css selector", "#truth-iou").text == f"{iou:.3f}"

    chrome.find_element("css selector", "#category").send_keys("checked stamp")
    png = screenshot(chrome, tmp_path / "serve.png")  # docs/serve.png is this picture
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    chrome.find_element("css selector", "#save").click()
    wait_for(chrome, "#status[data-state='saved']")
    wait_for(chrome, "#objects li[data-category='checked stamp']")

    # After a reload the page lists it from the dataset; the COCO file holds it with the mask predicted.
    open_page(chrome, url + "/")
    wait_for(chrome, "#status[data-state='ready']")
    _select(chrome, name)
    listed = wait_for(chrome, "#objects li[data-category='checked stamp']")
    assert len(chrome.find_elements("css selector", "#objects li")) == len(truth["objects"]) + 1
    val = json.loads((stamps_copy / "val.json").read_text())
    category = next(c["id"] for c in val["categories"] if c["name"] == "checked stamp")
    image_id = next(im["id"] for im in val["images"] if im["file_name"] == name)
    (saved,) = [a for a in val["annotations"] if a["category_id"] == category and a["image_id"] == image_id]
    assert str(saved["id"]) == listed.get_attribute("data-id")
    assert np.array_equal(masks.decode(saved["segmentation"]), served)

    assert console_errors(chrome) == []


def _wait_until(chrome, script: str, timeout: float = PREDICT_TIMEOUT_S):
    """The value of `script` once it is truthy."""
    return WebDriverWait(chrome, timeout, poll_frequency=browser.POLL_S).until(lambda d: d.execute_script(script))


@pytest.mark.browser
def test_clicks_add_points_and_a_stale_save_is_refused_and_reloaded(live_server, chrome, stamps_copy,
                                                                   stamps_cache_copy, tmp_path):
    from samcache.serve.app import create_app
    from samcache.serve.session import ServeSession

    url = live_server(create_app(ServeSession(stamps_cache_copy)))
    open_page(chrome, url + "/")
    wait_for(chrome, "#status[data-state='ready']")
    name = wait_for(chrome, "#images li[data-split='val']").get_attribute("data-name")
    _select(chrome, name)
    width, height = _canvas_size(chrome)
    scale = width / next(im for im in _get(url + "/api/images")["images"] if im["name"] == name)["width"]

    drag_on_canvas(chrome, "#view", (width * 0.2, height * 0.2), (width * 0.7, height * 0.6))
    box = _wait_until(chrome, "return window.samcache.lastRequest && window.samcache.lastRequest.box;")
    assert _wait_until(chrome, "return window.samcache.lastRequest.model;") == "zero_shot"  # no run: no fine_tuned
    # A click without a drag is a point on the object; with shift held, one off it. Both go with the box.
    drag_on_canvas(chrome, "#view", (width * 0.4, height * 0.4), (width * 0.4, height * 0.4))
    _wait_until(chrome, "const r = window.samcache.lastRequest; return r.points && r.points.length === 1;")
    ActionChains(chrome).key_down(Keys.SHIFT).perform()
    drag_on_canvas(chrome, "#view", (width * 0.25, height * 0.5), (width * 0.25, height * 0.5))
    ActionChains(chrome).key_up(Keys.SHIFT).perform()
    request = _wait_until(chrome, "const r = window.samcache.lastRequest; return r.points.length === 2 && r;")
    assert request["box"] == box
    assert [label for _, _, label in request["points"]] == [1, 0]
    assert request["points"][0][:2] == pytest.approx([width * 0.4 / scale, height * 0.4 / scale], abs=1 / scale + 1)
    wait_for(chrome, "#status[data-state='predicted']")

    # Someone else saves first: the page's version is stale, its save is refused and the objects reloaded.
    before = _get(url + "/api/objects?image=" + urllib.parse.quote(name))
    prediction = chrome.execute_script("return window.samcache.lastPrediction;")
    other = urllib.request.Request(url + "/api/objects", method="POST", headers={"Content-Type": "application/json"},
                                   data=json.dumps({"image": name, "version": before["version"], "category": "other",
                                                    "segmentation": prediction["segmentation"]}).encode())
    urllib.request.urlopen(other).close()
    written = (stamps_copy / "val.json").read_bytes()
    chrome.find_element("css selector", "#category").send_keys("mine")
    chrome.find_element("css selector", "#save").click()
    status = wait_for(chrome, "#status[data-state='error']")
    assert "nothing was saved" in status.text
    wait_for(chrome, "#objects li[data-category='other']")
    assert not chrome.find_elements("css selector", "#objects li[data-category='mine']")
    assert (stamps_copy / "val.json").read_bytes() == written
    # The browser reports the refused request itself; nothing else went wrong.
    assert all("409" in error for error in console_errors(chrome)), console_errors(chrome)


@pytest.mark.browser
def test_the_list_sorts_worst_first_by_the_runs_latest_eval(live_server, chrome, stamps_cache, stamps_run_copy,
                                                            tmp_path):
    from selenium.webdriver.support.ui import Select

    from samcache.serve.app import create_app
    from samcache.serve.session import ServeSession

    result = CliRunner().invoke(main, ["eval", str(stamps_cache), "--run", str(stamps_run_copy), "--split", "val",
                                       "--out", str(tmp_path / "report")])
    assert result.exit_code == 0, result.output
    url = live_server(create_app(ServeSession(stamps_cache, stamps_run_copy)))
    open_page(chrome, url + "/")
    wait_for(chrome, "#status[data-state='ready']")
    Select(chrome.find_element("css selector", "#split")).select_by_value("val")
    Select(chrome.find_element("css selector", "#sort")).select_by_value("worst")
    shown = [li.get_attribute("data-name") for li in chrome.find_elements("css selector", "#images li")]
    images = {im["name"]: im for im in _get(url + "/api/images")["images"] if im["split"] == "val"}
    assert shown == sorted(images, key=lambda n: (images[n]["scores"].get("fine_tuned", float("inf")), n))
    assert any(images[n]["scores"] for n in shown)  # the eval's scores are there at all

    every = {im["name"]: im for im in _get(url + "/api/images")["images"]}
    Select(chrome.find_element("css selector", "#split")).select_by_value("")
    for category in sorted({c for im in every.values() for c in im["categories"]}):
        Select(chrome.find_element("css selector", "#category-filter")).select_by_value(category)
        shown = {li.get_attribute("data-name") for li in chrome.find_elements("css selector", "#images li")}
        assert shown == {n for n, im in every.items() if category in im["categories"]} != set(every)
    assert console_errors(chrome) == []


@pytest.mark.browser
def test_an_object_is_replaced_renamed_and_deleted_from_the_page_and_a_click_refines_the_mask(
        live_server, chrome, stamps_copy, stamps_cache_copy, stamps_run):
    from samcache.serve.app import create_app
    from samcache.serve.session import ServeSession

    url = live_server(create_app(ServeSession(stamps_cache_copy, stamps_run)))
    name, image, truth = _open_first_val_image(chrome, url)
    width, height = _canvas_size(chrome)
    scale = width / image["width"]
    x, y, w, h = truth["objects"][0]["bbox"]
    drag_on_canvas(chrome, "#view", (max(x * scale - 6, 1), max(y * scale - 6, 1)),
                   (min((x + w) * scale + 6, width - 2), min((y + h) * scale + 6, height - 2)))
    wait_for(chrome, "#status[data-state='predicted']", timeout=PREDICT_TIMEOUT_S)
    first = chrome.execute_script("return window.samcache.lastPrediction;")
    # A click inside the box: the request carries the first mask's state (fed back as mask_input).
    ActionChains(chrome).move_to_element_with_offset(
        chrome.find_element("css selector", "#view"), int((x + w / 2) * scale - width / 2),
        int((y + h / 2) * scale - height / 2)).click().perform()
    request = _wait_until(chrome, "const r = window.samcache.lastRequest; return r.points && r;")
    assert request["previous"] == first["state"] and request["box"]
    wait_for(chrome, "#status[data-state='predicted']", timeout=PREDICT_TIMEOUT_S)
    refined = chrome.execute_script("return window.samcache.lastPrediction;")

    target = truth["objects"][0]["id"]
    chrome.find_element("css selector", f"#objects li[data-id='{target}'] button.replace").click()
    wait_for(chrome, "#status[data-state='saved']")
    chrome.find_element("css selector", "#category").send_keys("checked")
    chrome.find_element("css selector", f"#objects li[data-id='{target}'] button.rename").click()
    wait_for(chrome, f"#objects li[data-id='{target}'][data-category='checked']")
    saved = json.loads((stamps_copy / "val.json").read_text())
    stored = next(a for a in saved["annotations"] if a["id"] == target)
    assert np.array_equal(masks.decode(stored["segmentation"]), masks.decode(refined["segmentation"]))
    assert {c["id"]: c["name"] for c in saved["categories"]}[stored["category_id"]] == "checked"

    chrome.find_element("css selector", f"#objects li[data-id='{target}'] button.delete").click()
    wait_for(chrome, "#status[data-state='saved']")
    assert not chrome.find_elements("css selector", f"#objects li[data-id='{target}']")
    assert target not in {a["id"] for a in json.loads((stamps_copy / "val.json").read_text())["annotations"]}
    assert console_errors(chrome) == []
