"""Fine-tuning from `samcache serve`: one job at a time, in separate processes, never in the server's.

A job runs three commands of the command line, each `python -m samcache ...` with its output in
NEWRUN/serve.log:

    embed DATASET --out CACHE        the cache takes in the corrections saved into the dataset
                                     (annotations only: the image encoder does not run)
    train CACHE --out NEWRUN ...     the served run's options (its config.yaml), or the demo's
    eval CACHE --run NEWRUN --split SPLIT --out NEWRUN/report-SPLIT

Everything a job writes is inside NEWRUN (marked as a samcache run before the first command, so
`train` takes it with the log already in it): the server writes nothing else but the dataset's
annotations.

NEWRUN is a new folder: RUN-tuned-N beside the served run (RUN's own -tuned-N suffix replaced),
or CACHE-tuned-N beside the cache when the server has no run; N is the first number free. The
served run is never written. A thread watches each process; progress is read from
NEWRUN/metrics.jsonl as training appends to it. When the job ends the session serves NEWRUN's
decoder as the "fine_tuned" model. A cancelled job keeps NEWRUN/last.pt from its last finished
epoch, which `samcache train CACHE --out NEWRUN --resume` continues.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from samcache.cache.format import read_followed_dataset
from samcache.errors import SamcacheError
from samcache.outputs import OutputFolder
from samcache.serve.session import RequestError, ServeSession
from samcache.train.runs import RUN_KIND, RunCheckpoint, RunFolder

# The demo's training options (the Makefile's DEMO_TRAIN), for a server started without a run.
DEMO_TRAIN = ["--epochs", "8", "--lr", "1e-3", "--loss", "sam", "--batch-size", "4", "--objects-per-image", "4"]
MAX_EPOCHS = 100
EVAL_SPLITS = ("val", "test")
RUNNING = ("refreshing", "training", "evaluating")
ENDED = ("done", "failed", "cancelled")
# A process asked to stop (SIGTERM) is killed after this many seconds.
KILL_AFTER_S = 5.0
TABLE_MODELS = ("zero_shot", "fine_tuned")
_TUNED = re.compile(r"-tuned-\d+$")
LOG_NAME = "serve.log"


class _Stopped(Exception):
    """A step of the job ended early: cancelled, or its command failed (`error`: why)."""

    def __init__(self, error: Optional[str] = None):
        super().__init__(error)
        self.error = error


@dataclass
class _Job:
    """One fine-tune and where it stands; `FineTune._lock` guards every field."""

    run: Path
    split: str
    epochs: int
    log: Path
    phase: str = "refreshing"
    note: str = ""
    error: Optional[str] = None
    process: Optional[subprocess.Popen] = None
    cancelled: bool = False
    progress: dict = field(default_factory=dict)
    history: list = field(default_factory=list)
    table: Optional[list] = None
    metrics_read: int = 0  # the run's metrics records already read


class FineTune:
    """The fine-tune job of a `samcache serve` session: start, status, cancel.

    Arguments:
      session: the served session; when a job ends its run becomes the session's "fine_tuned" model.
    """

    def __init__(self, session: ServeSession):
        self.session = session
        self._lock = threading.Lock()
        self._job: Optional[_Job] = None
        self._thread: Optional[threading.Thread] = None

    def start(self, request: Any) -> dict:
        """Starts a job. `request`: {"epochs": 1..MAX_EPOCHS (optional), "split": "val" | "test" (the
        evaluation's split, default "val")}. Returns {"run": the new run folder's name}; a job
        already running is a 409."""
        epochs, split = _checked(request)
        with self._lock:
            if self._job is not None and self._job.phase in RUNNING:
                raise RequestError(f"a fine-tune is already running ({self._job.run.name}, {self._job.phase}): "
                                   "wait for it or cancel it first", status=409)
            run = self._new_run_folder()
            options, epochs = self._train_options(epochs)
            OutputFolder(run, RUN_KIND).mark()  # the log goes in first; train takes a folder marked as a run
            self._job = _Job(run=run, split=split, epochs=epochs, log=run / LOG_NAME)
            self._thread = threading.Thread(target=self._work, args=(self._job, options), daemon=True,
                                            name="samcache-finetune")
            self._thread.start()
        return {"run": run.name}

    def status(self) -> dict:
        """Where the job stands: {"phase": "idle" | "refreshing" | "training" | "evaluating" | "done" |
        "failed" | "cancelled", "run", "split", "epochs", "epoch", "step", "global_step", "loss",
        "val_miou", "history", "table", "note", "error", "log"}."""
        with self._lock:
            job = self._job
            if job is None:
                return {"phase": "idle"}
            self._read_metrics(job)
            return {"phase": job.phase, "run": job.run.name, "split": job.split, "epochs": job.epochs,
                    **job.progress, "history": list(job.history), "table": job.table, "note": job.note,
                    "error": job.error, "log": str(job.log.relative_to(job.run.parent))}

    def cancel(self) -> dict:
        """Stops the running job (SIGTERM, then SIGKILL after KILL_AFTER_S) and returns its status."""
        with self._lock:
            job = self._job
            if job is None or job.phase not in RUNNING:
                raise RequestError("no fine-tune is running", status=409)
            job.cancelled = True
            process = job.process
        if process is not None:
            _stop(process)
        if self._thread is not None:
            self._thread.join(KILL_AFTER_S * 2)
        return self.status()

    # ------------------------------------------------------------------ the job's thread

    def _work(self, job: _Job, options: list[str]) -> None:
        cache_dir = self.session.cache.cache_dir
        try:
            refresh = self._refresh_command(cache_dir)
            if refresh is None:
                self._set(job, note="the cache follows no COCO dataset: trained on the cache as it is")
            else:
                self._step(job, "refreshing", refresh)
            self._step(job, "training", ["train", str(cache_dir), "--out", str(job.run), *options])
            report = job.run / f"report-{job.split}"
            self._step(job, "evaluating", ["eval", str(cache_dir), "--run", str(job.run), "--split", job.split,
                                           "--out", str(report)])
            table = eval_table(json.loads((report / "summary.json").read_text()))
            self._switch(job.run)
            self._set(job, phase="done", table=table, note=f"serving {job.run.name} as fine_tuned; "
                                                           f"its report: {report.name}")
        except _Stopped as stopped:
            if job.cancelled:
                self._set(job, phase="cancelled", note=_after_cancel(job, cache_dir))
            else:
                self._set(job, phase="failed", error=stopped.error)
        except (SamcacheError, OSError, ValueError, KeyError) as exc:  # e.g. a report that cannot be read
            self._set(job, phase="failed", error=f"{type(exc).__name__}: {exc}")
        finally:
            with self._lock:
                self._read_metrics(job)

    def _step(self, job: _Job, phase: str, args: list[str]) -> None:
        """Runs `python -m samcache ARGS` to its end, its output appended to the job's log."""
        with self._lock:
            if job.cancelled:
                raise _Stopped()
            job.phase = phase
            with open(job.log, "a") as log:
                log.write(f"$ samcache {' '.join(args)}\n")
                log.flush()
                # A process group of its own: a cancel stops its data-loading workers too.
                job.process = subprocess.Popen([sys.executable, "-m", "samcache", *args], stdout=log,
                                               stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                               start_new_session=True)
            process = job.process
        code = process.wait()
        with self._lock:
            job.process = None
        if code != 0:
            raise _Stopped(None if job.cancelled else f"samcache {args[0]} failed: {_last_line(job.log)}")

    def _set(self, job: _Job, **values) -> None:
        with self._lock:
            for key, value in values.items():
                setattr(job, key, value)

    def _switch(self, run_dir: Path) -> None:
        """Serves the new run's decoder as "fine_tuned", and the cache as the refresh left it."""
        self.session.use_run(run_dir)

    # ------------------------------------------------------------------ what the job runs

    def _new_run_folder(self) -> Path:
        """RUN-tuned-N beside the served run, or CACHE-tuned-N beside the cache, N the first one free."""
        base = self.session.run.path if self.session.run is not None else Path(self.session.cache.cache_dir)
        base = base.resolve()
        stem = _TUNED.sub("", base.name)
        n = 1
        while (base.parent / f"{stem}-tuned-{n}").exists():
            n += 1
        return base.parent / f"{stem}-tuned-{n}"

    def _train_options(self, epochs: Optional[int]) -> tuple[list[str], Optional[int]]:
        """The options of `train`: the served run's (its config.yaml), else the demo's, `epochs`
        replacing theirs; and the epochs they make."""
        run = self.session.run
        if run is not None and run.config_path.is_file():
            options, planned = ["--config", str(run.config_path.resolve())], (run.saved_config() or {}).get("epochs")
        else:
            options, planned = list(DEMO_TRAIN), int(DEMO_TRAIN[DEMO_TRAIN.index("--epochs") + 1])
        if epochs is not None:
            options, planned = [*options, "--epochs", str(epochs)], epochs
        return options, planned

    def _refresh_command(self, cache_dir: Path) -> Optional[list[str]]:
        """`embed` of the COCO dataset the cache follows with the cache's own recipe, or None when the
        cache follows none (corrections are saved into COCO datasets only)."""
        from samcache.models.families import family_of
        from samcache.models.weights import TINY_PRETRAINED_SHA256

        followed = read_followed_dataset(cache_dir)
        if followed is None or followed.get("format") != "coco" or not Path(followed["path"]).exists():
            return None
        made = self.session.cache.provenance
        args = ["embed", followed["path"], "--out", str(cache_dir), "--model", made.model_type,
                "--intensity", made.intensity]
        if Path(made.weights_source).is_file():
            args += ["--checkpoint", made.weights_source]
        elif family_of(made.model_type).own_weights and made.weights_sha256 != TINY_PRETRAINED_SHA256:
            args += ["--random-init"]
        return args

    def _read_metrics(self, job: _Job) -> None:
        """Takes in the records training appended to the new run's metrics since the last look."""
        try:
            records = RunFolder(job.run).metrics()
        except (OSError, ValueError):  # a line half written: the next look reads it whole
            return
        for record in records[job.metrics_read:]:
            if not isinstance(record, dict):
                continue
            if record.get("type") == "step":
                job.progress.update({k: record.get(k) for k in ("epoch", "step", "global_step", "loss")})
            elif record.get("type") == "epoch":
                job.progress.update({"epoch": record.get("epoch"), "global_step": record.get("global_step"),
                                     "val_miou": record.get("val_miou")})
                job.history.append(record.get("val_miou"))
        job.metrics_read = len(records)


def eval_table(summary: dict) -> list[dict]:
    """The rows of an eval summary's table: zero_shot, fine_tuned, then the baselines (box_fill)."""
    rows = [(name, summary[name]) for name in TABLE_MODELS if name in summary]
    rows += list(summary.get("baselines", {}).items())
    return [{"model": name, "objects": s["objects"], "miou": s["miou"], "mdice": s["mdice"],
             "boundary_f": s["boundary_f"]} for name, s in rows]


def _checked(request: Any) -> tuple[Optional[int], str]:
    if request is None:
        request = {}
    if not isinstance(request, dict):
        raise RequestError("the request body must be a JSON object")
    unknown = sorted(set(request) - {"epochs", "split"})
    if unknown:
        raise RequestError(f"unknown field(s) {', '.join(unknown)}: a fine-tune takes epochs, split")
    epochs = request.get("epochs")
    if epochs is not None and (isinstance(epochs, bool) or not isinstance(epochs, int)
                               or not 1 <= epochs <= MAX_EPOCHS):
        raise RequestError(f"epochs must be a whole number from 1 to {MAX_EPOCHS}, got {epochs!r}")
    split = request.get("split", "val")
    if split not in EVAL_SPLITS:
        raise RequestError(f"split must be one of {', '.join(EVAL_SPLITS)}, got {split!r}")
    return epochs, split


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM to the process's group, SIGKILL when it has not ended KILL_AFTER_S later."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        try:
            process.wait(KILL_AFTER_S)
            return
        except subprocess.TimeoutExpired:
            continue


def _last_line(log: Path) -> str:
    """The log's last line with text: a samcache command's one-line error."""
    try:
        lines = [line.strip() for line in re.split(r"[\r\n]", log.read_text(errors="replace")) if line.strip()]
    except OSError as exc:
        return f"(its log {log} is unreadable: {exc})"
    return lines[-1] if lines else f"(nothing in its log {log})"


def _after_cancel(job: _Job, cache_dir: Path) -> str:
    """What a cancelled job left, and how to go on."""
    run = RunFolder(job.run)
    if job.phase == "evaluating":
        return (f"cancelled while evaluating: {job.run} is trained; "
                f"`samcache eval {cache_dir} --run {job.run} --out REPORT` scores it")
    if job.phase == "refreshing":
        return "cancelled while the cache took in the corrections (embed resumes where it stopped); nothing was trained"
    if not run.has_checkpoint("last"):
        return f"cancelled before the first epoch ended: {job.run} holds logs only"
    state = RunCheckpoint.read(run.checkpoint_path("last")).state
    return (f"cancelled: {run.checkpoint_path('last')} (epoch {state.epoch}, step {state.global_step}) is kept; "
            f"`samcache train {cache_dir} --out {job.run} --resume` continues it")
