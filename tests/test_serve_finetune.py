"""Fine-tuning from `samcache serve`: POST /api/finetune refreshes the cache from the dataset (with
the corrections saved), trains a new run in a separate process, evaluates it and serves it; its
progress streams to the page; a cancel stops the process and leaves the run resumable."""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from samcache.cli import main
from samcache.data import masks
from tests import browser
from tests.browser import console_errors, open_page, wait_for
from tests.helpers import demo_train_flags

chrome = browser.chrome
live_server = browser.live_server

# A one-epoch job on the micro model takes about 25 s on two CPU cores (three processes start).
JOB_TIMEOUT_S = 180


def test_a_server_without_a_run_fine_tunes_with_the_demos_recipe():
    from samcache.serve.finetune import DEMO_TRAIN

    assert DEMO_TRAIN == demo_train_flags()


@contextmanager
def _serving(cache, run=None):
    """(session, TestClient) of a server over `cache` and `run`; a job still running at the end is cancelled."""
    from fastapi.testclient import TestClient

    from samcache.serve.app import create_app
    from samcache.serve.session import ServeSession

    session = ServeSession(cache, run)
    with TestClient(create_app(session)) as client:
        try:
            yield session, client
        finally:
            if client.get("/api/finetune").json()["phase"] in ("refreshing", "training", "evaluating"):
                client.post("/api/finetune/cancel")


def _wait(client, phases: tuple[str, ...], timeout: float = JOB_TIMEOUT_S, until=lambda status: True) -> dict:
    """GET /api/finetune until its phase is one of `phases` (and `until(status)` holds)."""
    deadline = time.monotonic() + timeout
    while True:
        status = client.get("/api/finetune").json()
        if status["phase"] in phases and until(status):
            return status
        assert status["phase"] not in ("done", "failed", "cancelled"), status
        assert time.monotonic() < deadline, f"still {status['phase']} after {timeout} s: {status}"
        time.sleep(0.2)


def _processes_naming(path: Path) -> list[int]:
    """The pids of processes whose command line names `path`."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and str(path).encode() in (proc / "cmdline").read_bytes():
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


@pytest.mark.parametrize("body, said", [
    ({"epochs": 0}, "epochs must be a whole number from 1 to 100"),
    ({"epochs": 101}, "epochs must be a whole number from 1 to 100"),
    ({"epochs": "3"}, "epochs must be a whole number"),
    ({"epochs": True}, "epochs must be a whole number"),
    ({"split": "train"}, "split must be one of val, test"),
    ({"out": "/tmp/x"}, "unknown field(s) out"),
    ([1], "must be a JSON object"),
])
def test_bad_fine_tune_requests_are_a_400_and_start_nothing(stamps_cache_copy, stamps_run_copy, body, said):
    with _serving(stamps_cache_copy, stamps_run_copy) as (_, client):
        before = sorted(p.name for p in stamps_run_copy.parent.iterdir())
        answer = client.post("/api/finetune", content=json.dumps(body), headers={"content-type": "application/json"})
        assert answer.status_code == 400 and said in answer.json()["error"], answer.text
        assert client.get("/api/finetune").json() == {"phase": "idle"}
        assert sorted(p.name for p in stamps_run_copy.parent.iterdir()) == before


def test_with_no_job_the_status_is_idle_and_cancel_is_a_409(stamps_cache_copy):
    with _serving(stamps_cache_copy) as (_, client):
        assert client.get("/api/finetune").json() == {"phase": "idle"}
        events = client.get("/api/finetune/events")
        assert events.headers["content-type"].startswith("text/event-stream")
        assert events.text == 'data: {"phase": "idle"}\n\n'
        cancel = client.post("/api/finetune/cancel")
        assert cancel.status_code == 409 and "no fine-tune is running" in cancel.json()["error"]


def test_a_failing_step_ends_the_job_with_its_error_line(stamps_copy, stamps_cache_copy, stamps_run_copy):
    (stamps_copy / "val.json").write_text("{not json")
    with _serving(stamps_cache_copy, stamps_run_copy) as (_, client):
        assert client.post("/api/finetune", json={"epochs": 1}).status_code == 202
        status = _wait(client, ("failed",), until=lambda s: True)
        assert status["error"].startswith("samcache embed failed: ") and "val.json" in status["error"], status
        run = stamps_run_copy.parent / status["run"]
        assert status["log"] == f"{status['run']}/serve.log" and (stamps_run_copy.parent / status["log"]).is_file()
        # training never started: the new run folder holds the log and samcache's marker only
        assert sorted(p.name for p in run.iterdir()) == [".samcache-output.json", "serve.log"]


@pytest.mark.slow
def test_a_fine_tune_takes_in_corrections_trains_evaluates_and_serves_the_new_run(stamps_copy, stamps_cache_copy,
                                                                                  stamps_run_copy, tmp_path):
    from samcache.cache.reader import EmbeddingCache

    with _serving(stamps_cache_copy, stamps_run_copy) as (session, client):
        image = next(im for im in client.get("/api/images").json()["images"] if im["split"] == "train")
        loaded = client.get("/api/objects", params={"image": image["name"]}).json()
        mask = client.post("/api/predict", json={"image": image["name"], "box": [40, 60, 400, 300]}).json()
        saved = client.post("/api/objects", json={"image": image["name"], "version": loaded["version"],
                                                  "segmentation": mask["segmentation"], "category": "corrected"})
        assert saved.status_code == 200, saved.text

        started = client.post("/api/finetune", json={"epochs": 1, "split": "val"})
        assert started.status_code == 202 and started.json() == {"run": "run_copy-tuned-1"}
        again = client.post("/api/finetune", json={"epochs": 1})
        assert again.status_code == 409 and "already running" in again.json()["error"]

        # The event stream reports each change until the job ends.
        with client.stream("GET", "/api/finetune/events") as events:
            seen = [json.loads(line[len("data: "):]) for line in events.iter_lines() if line.startswith("data: ")]
        phases = [s["phase"] for s in seen]
        assert phases[-1] == "done", seen[-1]
        assert {"refreshing", "training", "evaluating"} <= set(phases)
        trained = [s for s in seen if s["phase"] == "training" and s.get("loss") is not None]
        assert trained and all(s["epochs"] == 1 for s in seen)
        status = client.get("/api/finetune").json()

        new_run = stamps_run_copy.parent / "run_copy-tuned-1"
        assert (new_run / "last.pt").is_file() and (new_run / "best.pt").is_file()
        metrics = [json.loads(line) for line in (new_run / "metrics.jsonl").read_text().splitlines()]
        steps = [m for m in metrics if m["type"] == "step"]
        assert status["global_step"] == steps[-1]["global_step"] and status["loss"] == steps[-1]["loss"]
        assert status["history"] == [m["val_miou"] for m in metrics if m["type"] == "epoch"]

        summary = json.loads((stamps_run_copy.parent / "run_copy-tuned-1" / "report-val" / "summary.json").read_text())
        assert summary["split"] == "val" and summary["run"] == str(new_run.resolve())
        expected = [(name, summary[name]) for name in ("zero_shot", "fine_tuned")]
        expected.append(("box_fill", summary["baselines"]["box_fill"]))
        assert status["table"] == [{"model": name, "objects": s["objects"], "miou": s["miou"], "mdice": s["mdice"],
                                    "boundary_f": s["boundary_f"]} for name, s in expected]

        # The cache took in the saved correction, and the served run is the new one.
        cache = EmbeddingCache(stamps_cache_copy)
        assert len(cache.images[cache.index_of(image["name"])].objects) == image["objects"] + 1
        listed = next(im for im in client.get("/api/images").json()["images"] if im["name"] == image["name"])
        assert listed["objects"] == image["objects"] + 1 and "corrected" in listed["categories"]
        assert session.run.path == new_run.resolve()

        box = [40, 60, 400, 300]
        served = client.post("/api/predict", json={"image": image["name"], "model": "fine_tuned", "box": box}).json()
    out = tmp_path / "predicted"
    result = CliRunner().invoke(main, ["predict", str(stamps_copy / "images" / image["name"]), "--run", str(new_run),
                                       "--box", ",".join(map(str, box)), "--out", str(out)])
    assert result.exit_code == 0, result.output
    predicted = json.loads((out / "predictions.json").read_text())["predictions"][0]
    assert np.array_equal(masks.decode(served["segmentation"]), masks.decode(predicted["segmentation"]))


@pytest.mark.slow
def test_cancel_stops_training_and_leaves_the_run_resumable(stamps_cache_copy, stamps_run_copy):
    from samcache.train.runs import RunCheckpoint

    with _serving(stamps_cache_copy, stamps_run_copy) as (_, client):
        assert client.post("/api/finetune", json={"epochs": 100}).status_code == 202
        # Once the first epoch has ended (history: before training, after epoch 1) and its checkpoint is
        # written (the epoch's log line comes just before last.pt), a cancel keeps it.
        status = _wait(client, ("training",), until=lambda s: len(s["history"]) >= 2
                       and (stamps_run_copy.parent / s["run"] / "last.pt").exists())
        new_run = stamps_run_copy.parent / status["run"]
        assert _processes_naming(new_run)
        cancelled = client.post("/api/finetune/cancel")
        assert cancelled.status_code == 200 and cancelled.json()["phase"] == "cancelled", cancelled.text
        assert not _processes_naming(new_run)
        state = RunCheckpoint.read(new_run / "last.pt").state
        assert 1 <= state.epoch < 100
        note = cancelled.json()["note"]
        assert f"(epoch {state.epoch}, step {state.global_step}) is kept" in note and "--resume" in note
        assert not (stamps_run_copy.parent / status["run"] / "report-val").exists()
        assert client.post("/api/finetune/cancel").status_code == 409


def test_without_a_run_the_new_run_goes_beside_the_cache_and_a_cancel_before_training_leaves_no_run(
        stamps_cache_copy):
    with _serving(stamps_cache_copy) as (_, client):
        started = client.post("/api/finetune", json={})
        assert started.status_code == 202 and started.json() == {"run": "cache_copy-tuned-1"}
        status = client.get("/api/finetune").json()
        assert status["epochs"] == 8  # the demo's options
        cancelled = client.post("/api/finetune/cancel").json()
        assert cancelled["phase"] == "cancelled"
        assert not (stamps_cache_copy.parent / "cache_copy-tuned-1" / "last.pt").exists()
        # The next job takes the next free name: the first one's folder is there, with its log.
        assert client.post("/api/finetune", json={}).json() == {"run": "cache_copy-tuned-2"}
        client.post("/api/finetune/cancel")


@pytest.mark.slow
@pytest.mark.browser
def test_the_fine_tune_button_shows_progress_and_the_eval_table(live_server, chrome, stamps_copy, stamps_cache_copy,
                                                                stamps_run_copy):
    from samcache.serve.app import create_app
    from samcache.serve.session import ServeSession

    url = live_server(create_app(ServeSession(stamps_cache_copy, stamps_run_copy)))
    open_page(chrome, url + "/")
    wait_for(chrome, "#status[data-state='ready']")
    epochs = chrome.find_element("css selector", "#finetune-epochs")
    epochs.clear()
    epochs.send_keys("1")
    chrome.find_element("css selector", "#finetune-start").click()
    wait_for(chrome, "#finetune-status[data-phase='training']", timeout=60)
    wait_for(chrome, "#finetune-status[data-phase='done']", timeout=JOB_TIMEOUT_S)
    rows = chrome.find_elements("css selector", "#finetune-table tbody tr")
    assert [r.get_attribute("data-model") for r in rows] == ["zero_shot", "fine_tuned", "box_fill"]
    summary = json.loads((stamps_run_copy.parent / "run_copy-tuned-1" / "report-val" / "summary.json").read_text())
    shown = rows[1].find_elements("css selector", "td")
    assert shown[2].text == f"{summary['fine_tuned']['miou']:.4f}"
    assert chrome.find_element("css selector", "#model").get_attribute("value") == "fine_tuned"
    assert "run_copy-tuned-1" in chrome.find_element("css selector", "#finetune-status").text
    assert console_errors(chrome) == []
