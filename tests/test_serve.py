"""`samcache serve`'s JSON API: the images of the cache, and masks equal to `samcache predict`'s;
every bad request a clear 4xx that changes nothing."""

from __future__ import annotations

import json

import numpy as np
import torch
import pytest
from click.testing import CliRunner

from samcache.cli import main
from samcache.data import masks
from tests.helpers import tree_fingerprint

@pytest.fixture(scope="module")
def client(stamps_cache, stamps_run):
    from fastapi.testclient import TestClient

    from samcache.serve.app import create_app
    from samcache.serve.session import ServeSession

    with TestClient(create_app(ServeSession(stamps_cache, stamps_run))) as test_client:
        yield test_client


def _a_val_image(client) -> dict:
    return next(im for im in client.get("/api/images").json()["images"] if im["split"] == "val")


def test_images_lists_the_cache(client, stamps_cache):
    from samcache.cache.reader import EmbeddingCache

    listed = client.get("/api/images").json()
    cache = EmbeddingCache(stamps_cache)
    assert [im["name"] for im in listed["images"]] == [cache.name_of(i) for i in range(len(cache))]
    first = cache.images[0]
    assert listed["images"][0] == {"name": first.name, "split": first.split, "width": first.original_size[1],
                                   "height": first.original_size[0], "objects": len(first.objects),
                                   "categories": sorted({o.category for o in first.objects}), "scores": {}}
    assert listed["models"] == ["zero_shot", "fine_tuned"]


def test_each_image_carries_its_scores_from_the_runs_latest_eval(stamps_cache, stamps_run_copy, tmp_path):
    import csv

    from fastapi.testclient import TestClient

    from samcache.serve.app import create_app
    from samcache.serve.session import ServeSession

    report = tmp_path / "report"
    result = CliRunner().invoke(main, ["eval", str(stamps_cache), "--run", str(stamps_run_copy), "--split", "val",
                                       "--out", str(report)])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader((report / "objects.csv").open()))
    with TestClient(create_app(ServeSession(stamps_cache, stamps_run_copy))) as client:
        images = client.get("/api/images").json()["images"]
    for image in images:
        mine = [r for r in rows if r["image"] == image["name"]]
        if image["split"] != "val" or not mine:
            assert image["scores"] == {}
            continue
        for model in ("zero_shot", "fine_tuned", "box_fill"):
            expected = np.mean([float(r[f"{model}_iou"]) for r in mine])
            assert image["scores"][model] == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("prompt", [{"box": [40, 60, 400, 300]},
                                    {"box": [40, 60, 400, 300], "points": [[200, 180, 1], [60, 80, 0]]},
                                    {"points": [[200, 180, 1]]}])
def test_a_mask_equals_samcache_predicts(client, stamps, stamps_run, tmp_path, prompt):
    image = _a_val_image(client)
    answer = client.post("/api/predict", json={"image": image["name"], "model": "fine_tuned", **prompt})
    assert answer.status_code == 200, answer.text
    served = masks.decode(answer.json()["segmentation"])
    assert served.shape == (image["height"], image["width"]) and served.any()

    flags = []
    if "box" in prompt:
        flags += ["--box", ",".join(map(str, prompt["box"]))]
    for x, y, label in prompt.get("points", []):
        flags += ["--point", f"{x},{y},{label}"]
    out = tmp_path / "predicted"
    result = CliRunner().invoke(main, ["predict", str(stamps / "images" / image["name"]), "--run", str(stamps_run),
                                       *flags, "--out", str(out)])
    assert result.exit_code == 0, result.output
    predicted = json.loads((out / "predictions.json").read_text())["predictions"][0]
    assert np.array_equal(served, masks.decode(predicted["segmentation"]))
    assert answer.json()["score"] == pytest.approx(predicted["score"], abs=1e-6)


def test_zero_shot_and_fine_tuned_differ_and_both_answer(client):
    image = _a_val_image(client)
    prompt = {"image": image["name"], "box": [40, 60, 400, 300]}
    zero = client.post("/api/predict", json={**prompt, "model": "zero_shot"}).json()
    tuned = client.post("/api/predict", json={**prompt, "model": "fine_tuned"}).json()
    assert zero["model"] == "zero_shot" and tuned["model"] == "fine_tuned"
    assert zero["segmentation"] != tuned["segmentation"]  # the run changed the decoder


@pytest.mark.parametrize("body, status, said", [
    ({"image": "nowhere.jpg", "box": [0, 0, 10, 10]}, 404, "no image 'nowhere.jpg'"),
    ({"image": "../../etc/passwd", "box": [0, 0, 10, 10]}, 404, "never given by path"),
    ({"image": "/etc/passwd", "box": [0, 0, 10, 10]}, 404, "never given by path"),
    ({"image": "VAL", "box": [0, 0, 1e9, 10]}, 400, "reaches outside"),
    ({"image": "VAL", "box": [10, 10, 5, 20]}, 400, "x1 must exceed x0"),
    ({"image": "VAL", "box": [0, 0, "10", 10]}, 400, "finite number"),
    ({"image": "VAL", "points": [[float("nan"), 5, 1]]}, 400, "finite number"),
    ({"image": "VAL", "points": [[5, 5, 2]]}, 400, "label 1 (object) or 0"),
    ({"image": "VAL", "points": [[-1, 5, 1]]}, 400, "outside"),
    ({"image": "VAL"}, 400, "give a box, points, or both"),
    ({"image": "VAL", "box": [0, 0, 10, 10], "model": "everything"}, 400, "is not served"),
    ({"image": "VAL", "box": [0, 0, 10, 10], "path": "/tmp/x"}, 400, "unknown field(s) path"),
    (["not", "an", "object"], 400, "must be a JSON object"),
])
def test_bad_requests_are_a_clear_4xx_and_change_nothing(client, stamps_cache, stamps_run, body, status, said):
    before = tree_fingerprint(stamps_cache), tree_fingerprint(stamps_run)
    if isinstance(body, dict) and body.get("image") == "VAL":
        body = {**body, "image": _a_val_image(client)["name"]}
    answer = client.post("/api/predict", content=json.dumps(body), headers={"content-type": "application/json"})
    assert answer.status_code == status and said in answer.json()["error"], answer.text
    assert (tree_fingerprint(stamps_cache), tree_fingerprint(stamps_run)) == before


def test_malformed_json_is_a_400(client):
    answer = client.post("/api/predict", content=b"{not json", headers={"content-type": "application/json"})
    assert answer.status_code == 400 and "not JSON" in answer.json()["error"]


def test_without_a_run_only_the_zero_shot_model_is_served(stamps_cache):
    from fastapi.testclient import TestClient

    from samcache.serve.app import create_app
    from samcache.serve.session import ServeSession

    with TestClient(create_app(ServeSession(stamps_cache))) as client:
        name = client.get("/api/images").json()["images"][0]["name"]
        answer = client.post("/api/predict", json={"image": name, "model": "fine_tuned", "box": [0, 0, 50, 50]})
        assert answer.status_code == 400 and "started without --run" in answer.json()["error"]


def test_serve_without_the_extra_says_how_to_install_it(stamps_cache, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_uvicorn(name, *args, **kwargs):
        if name == "uvicorn":
            raise ImportError("No module named 'uvicorn'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_uvicorn)
    result = CliRunner().invoke(main, ["serve", str(stamps_cache)])
    assert result.exit_code == 1 and "pip install 'samcache[serve]'" in result.output


def test_corrections_are_saved_into_the_dataset_and_refused_when_stale(stamps_copy, stamps_cache_copy):
    from fastapi.testclient import TestClient

    from samcache.serve.app import create_app
    from samcache.serve.session import ServeSession

    with TestClient(create_app(ServeSession(stamps_cache_copy))) as client:
        image = next(im for im in client.get("/api/images").json()["images"] if im["split"] == "val")
        loaded = client.get("/api/objects", params={"image": image["name"]}).json()
        assert len(loaded["objects"]) == image["objects"]
        mask = client.post("/api/predict", json={"image": image["name"], "box": [40, 60, 400, 300]}).json()
        added = client.post("/api/objects", json={"image": image["name"], "version": loaded["version"],
                                                  "segmentation": mask["segmentation"], "category": "corrected"})
        assert added.status_code == 200, added.text
        stale = client.post("/api/objects", json={"image": image["name"], "version": loaded["version"],
                                                  "segmentation": mask["segmentation"], "category": "again"})
        assert stale.status_code == 409 and "nothing was saved" in stale.json()["error"]
        renamed = client.patch(f"/api/objects/{added.json()['object_id']}",
                               json={"image": image["name"], "version": added.json()["version"], "category": "stamp"})
        assert renamed.status_code == 200, renamed.text
        now = client.get("/api/objects", params={"image": image["name"]}).json()
        new = [o for o in now["objects"] if o["id"] == added.json()["object_id"]]
        assert len(now["objects"]) == image["objects"] + 1 and new[0]["category"] == "stamp"
        assert np.array_equal(masks.decode(new[0]["segmentation"]), masks.decode(mask["segmentation"]))
        gone = client.delete(f"/api/objects/{new[0]['id']}",
                             params={"image": image["name"], "version": renamed.json()["version"]})
        assert gone.status_code == 200, gone.text
        assert len(client.get("/api/objects", params={"image": image["name"]}).json()["objects"]) == image["objects"]
        for bad, status in ((client.delete("/api/objects/x", params={"image": image["name"], "version": "v"}), 400),
                            (client.get("/api/objects", params={"image": "../train.json"}), 404)):
            assert bad.status_code == status and "error" in bad.json()
    split = json.loads((stamps_copy / "val.json").read_text())
    assert all(a["category_id"] in {c["id"] for c in split["categories"]} for a in split["annotations"])
    assert (stamps_copy / "val.json.previous").is_file()


def test_a_further_click_feeds_the_previous_mask_back_as_sampredictor_does(client, stamps_cache, stamps_run):
    from segment_anything import SamPredictor

    from samcache.cache.reader import EmbeddingCache
    from samcache.train.runs import RunFolder

    image = _a_val_image(client)
    box, point = [40, 60, 400, 300], [200, 180, 1]
    first = client.post("/api/predict", json={"image": image["name"], "model": "fine_tuned", "box": box}).json()
    second = client.post("/api/predict", json={"image": image["name"], "model": "fine_tuned", "box": box,
                                               "points": [point], "previous": first["state"]})
    assert second.status_code == 200, second.text

    cache = EmbeddingCache(stamps_cache)
    info = cache.images[cache.index_of(image["name"])]
    predictor = SamPredictor(RunFolder(stamps_run).load_model("best")[0].sam.eval())
    predictor.features = torch.from_numpy(cache.embedding(info.index)).float()[None]
    predictor.original_size, predictor.input_size, predictor.is_image_set = info.original_size, info.input_size, True
    _, _, low_res = predictor.predict(box=np.array(box), multimask_output=False)
    expected, _, _ = predictor.predict(point_coords=np.array([point[:2]]), point_labels=np.array([1]),
                                       box=np.array(box), mask_input=low_res, multimask_output=False)
    served = masks.decode(second.json()["segmentation"])
    assert (served == expected[0]).mean() > 0.999  # float rounding at a few edge pixels at most
    without = client.post("/api/predict", json={"image": image["name"], "model": "fine_tuned", "box": box,
                                                "points": [point]}).json()
    assert without["segmentation"] != second.json()["segmentation"]  # the fed-back mask changed the answer

    other = client.post("/api/predict", json={"image": image["name"], "model": "zero_shot", "box": box,
                                              "previous": first["state"]})
    assert other.status_code == 400 and "by fine_tuned, not" in other.json()["error"]
    stale = client.post("/api/predict", json={"image": image["name"], "box": box, "previous": "feedbeef"})
    assert stale.status_code == 400 and "unknown or expired" in stale.json()["error"]
