"""The captioning worker: caption a dataset's images in the background, with progress in its run folder.

Started by the scheduler as `python -m zimage.cli caption --run-dir DIR` (or in-process by
`zimage caption DATASET`); its lifecycle (start, heartbeat, signals, final state, failures) is
zimage.job.run_job. It reads DIR/config.json (a CaptionConfig), and writes:

    status.json    state, step (images done) / total_steps, current_file, captioned, skipped, error_count,
                   errors (the first 100 as {file, error}), images_per_s, eta
    captions.jsonl one line per image: file, status (written | skipped | error), caption or error
    metrics.jsonl  step, samples_per_s (images/s), step_time, elapsed, eta, one line per batch
    log.txt

Each caption is written atomically next to its image. A bad image is reported and skipped; a stop request
(or SIGTERM) ends the run `stopped` once the batch in hand is written; a resumed run skips what
captions.jsonl says is done. Decoding the next batch and writing the previous one run on a helper thread while the model
captions, so file work (fsync'd writes, JPEG decoding) does not stall the model.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from zimage.captioning.config import (  # noqa: F401  (CaptionConfigError, caption_config: re-exported)
    CaptionConfig,
    CaptionConfigError,
    caption_config,
    dataset_for,
    is_uncaptioned,
    select_targets,
    with_trigger,
)
from zimage.data.folders import DatasetItem
from zimage.data.images import ImageProblem, open_rgb
from zimage.data.manage import clean_caption
from zimage.errors import UserError
from zimage.fsio import atomic_write
from zimage.job import Job, run_job
from zimage.runfolder import RunFolder
from zimage.settings import Settings, get_settings

MAX_ERRORS_IN_STATUS = 100
MAX_MODEL_FAILURES = 8  # images in a row the model fails on before the job fails as a whole
PROGRESS_EVERY = 0.5  # seconds between progress writes to status.json (each is an fsync'd rename)

# (item, "written" | "skipped" | "error", caption / reason / error message)
Outcome = tuple[DatasetItem, str, str]


def _already_done(run: RunFolder) -> set[str]:
    """Files a previous process of this run finished (for a resumed run)."""
    path = run.path / "captions.jsonl"
    done = set()
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line cut short by a kill
            if not isinstance(record, dict):
                continue  # not a line this worker wrote
            if record.get("status") in ("written", "skipped", "error"):
                done.add(record.get("file"))
    return done


def _decode(batch: list[DatasetItem]) -> list[tuple[DatasetItem, Image.Image | str]]:
    """Open a batch like the trainer does; an unreadable image becomes its error message."""
    out: list[tuple[DatasetItem, Image.Image | str]] = []
    for item in batch:
        try:
            out.append((item, open_rgb(item.image)))
        except ImageProblem as exc:  # the message starts with the file name, which the record has already
            out.append((item, str(exc).removeprefix(f"{item.image.name}: ")))
    return out


def _write_batch(results: list[tuple[DatasetItem, str | None, str]], cfg: CaptionConfig, trigger: str) -> list[Outcome]:
    """Write the captions of one batch (on the helper thread); errors of the batch pass through."""
    outcomes: list[Outcome] = []
    for item, text, error in results:
        if text is None:
            outcomes.append((item, "error", error))
            continue
        caption = clean_caption(with_trigger(text, trigger) if cfg.trigger_prefix else text)
        if not caption:
            outcomes.append((item, "error", "the model returned an empty caption"))
        elif cfg.mode == "missing" and not is_uncaptioned(item):  # someone wrote one while we worked
            outcomes.append((item, "skipped", "captioned meanwhile"))
        else:
            try:
                atomic_write(item.caption_path, caption + "\n")
                outcomes.append((item, "written", caption))
            except OSError as exc:
                outcomes.append((item, "error", f"cannot write {item.caption_path.name}: {exc.strerror or exc}"))
    return outcomes


@dataclass
class _Progress:
    total: int
    started: float = field(default_factory=time.time)
    done: int = 0
    captioned: int = 0
    skipped: int = 0
    errors: list[dict] = field(default_factory=list)
    error_count: int = 0

    def fields(self) -> dict:
        elapsed = time.time() - self.started
        rate = self.done / elapsed if elapsed > 0 and self.done else 0.0
        eta = (self.total - self.done) / rate if rate else None
        return {
            "step": self.done,
            "total_steps": self.total,
            "captioned": self.captioned,
            "skipped": self.skipped,
            "error_count": self.error_count,
            "errors": self.errors[:MAX_ERRORS_IN_STATUS],
            "images_per_s": round(rate, 3),
            "eta": round(eta, 1) if eta is not None else None,
        }


class CaptionJob:
    """The captioning kind's work for run_job: `CaptionJob(on_progress).run(job)`."""

    def __init__(self, on_progress: Callable[[dict], None] | None = None):
        self.on_progress = on_progress
        self.job: Job | None = None
        self.captioner = None
        self._last_write = 0.0
        self._batch_started = 0.0
        self._model_failures = 0  # images in a row the model failed on

    @property
    def folder(self) -> RunFolder:
        return self.job.run

    # -- reporting --------------------------------------------------------------------------------
    def _status(self, **values) -> None:
        status = self.job.status(**values)
        self._last_write = time.time()
        if self.on_progress:
            self.on_progress(status)

    def _progress(self, **values) -> None:
        """Per-batch progress: written at most every PROGRESS_EVERY seconds (the heartbeat writes the
        newest values meanwhile); callbacks get every batch."""
        self.job.progress(**{k: v for k, v in values.items() if k != "state"})
        if time.time() - self._last_write >= PROGRESS_EVERY:
            self._status(**values)
        elif self.on_progress:
            self.on_progress({**self.folder.read_status(), **values})

    def _finish(self, outcomes: list[Outcome], progress: _Progress, next_file: str | None) -> None:
        """Account for one written batch: captions.jsonl, counters, status, metrics (main thread only)."""
        lines = []
        for item, state, text in outcomes:
            record = {"file": item.image.name, "status": state, "time": round(time.time(), 3)}
            if state == "written":
                progress.captioned += 1
                record["caption"] = text
            elif state == "skipped":
                progress.skipped += 1
                record["reason"] = text
            else:
                progress.error_count += 1
                progress.errors.append({"file": item.image.name, "error": text})
                record["error"] = text
                self.job.log(f"error {item.image.name}: {text}")
            lines.append(json.dumps(record, ensure_ascii=False) + "\n")
        with open(self.folder.path / "captions.jsonl", "a", encoding="utf-8") as fh:
            fh.write("".join(lines))
        progress.done += len(outcomes)
        status = progress.fields()
        self._progress(state="running", current_file=next_file, **status)
        now, step_time = time.time(), time.time() - self._batch_started
        self._batch_started = now
        self.job.add_metrics(
            {"step": progress.done, "samples_per_s": round(len(outcomes) / step_time, 4) if step_time else None,
             "step_time": round(step_time, 4), "elapsed": round(now - progress.started, 3), "eta": status["eta"]}
        )  # fmt: skip

    def _wait_while_paused(self) -> bool:
        """Block while the app asks for a pause; True if a stop came meanwhile."""
        req = self.job.poll_control()
        if not req.pause or req.stop:
            return req.stop
        self._status(state="paused")  # run_job's heartbeat thread keeps status.json fresh meanwhile
        while req.pause and not req.stop:
            time.sleep(0.5)
            req = self.job.poll_control()
        if not req.stop:
            self._status(state="running")
        return req.stop

    # -- model ------------------------------------------------------------------------------------
    def _load(self, cfg: CaptionConfig, settings: Settings) -> None:
        from zimage.captioning.captioners import CaptionOptions, load_captioner
        from zimage.captioning.models import ensure_captioner

        _family, path = ensure_captioner(cfg.model, settings, allow_download=cfg.download, progress=self.job.log)
        options = CaptionOptions(cfg.detail, cfg.max_new_tokens, cfg.num_beams, cfg.prompt)
        self.captioner = load_captioner(path, options, cfg.device)
        self.job.log(f"loaded {path} on {self.captioner.device}")

    def _caption(
        self, decoded: list[tuple[DatasetItem, Image.Image | str]]
    ) -> list[tuple[DatasetItem, str | None, str]]:
        """(item, caption or None, error) for a decoded batch. One odd image can fail a whole batch:
        then the batch is retried image by image to find it."""
        good = [(item, img) for item, img in decoded if not isinstance(img, str)]
        captions: dict[str, str | Exception] = {}
        if good:
            try:
                texts = self.captioner.caption([img for _, img in good])
                captions = {item.image.name: t for (item, _), t in zip(good, texts, strict=True)}
            except Exception:
                for item, img in good:
                    try:
                        captions[item.image.name] = self.captioner.caption([img])[0]
                        self._model_failures = 0
                    except Exception as exc:
                        captions[item.image.name] = exc
                        self._model_failures += 1
                        if self._model_failures >= MAX_MODEL_FAILURES:  # the model is broken, not the images
                            raise
        out = []
        for item, img in decoded:
            result = img if isinstance(img, str) else captions[item.image.name]
            if isinstance(img, str):
                out.append((item, None, img))
            elif isinstance(result, Exception):
                out.append((item, None, f"captioning failed: {type(result).__name__}: {result}"))
            else:
                out.append((item, result, ""))
        return out

    # -- the run ----------------------------------------------------------------------------------
    def run(self, job: Job) -> dict:
        """Caption what the run's config.json asks for; returns the final state and counters."""
        self.job = job
        settings = get_settings()
        cfg = CaptionConfig.from_dict(self.folder.read_config())
        resumed = bool(self.folder.read_status().get("resume"))
        dataset = dataset_for(cfg, settings)
        targets = select_targets(dataset, cfg, _already_done(self.folder) if resumed else None)
        progress = _Progress(total=len(targets))
        job.log(f"captioning {len(targets)} image(s) of {dataset.path} with {cfg.model} ({cfg.detail}, {cfg.mode})")
        self._status(state="starting", current_file=None, dataset=dataset.path.name, **progress.fields())
        if not targets:
            return {"state": "completed", "message": "nothing to caption"}
        if job.poll_control().stop:
            return {"state": "stopped"}
        self._load(cfg, settings)
        progress.started = self._batch_started = time.time()  # the rate counts captioning, not the load
        self._status(state="running", current_file=targets[0].image.name, **progress.fields())
        stopped = self._pipeline(targets, cfg, dataset.read_info().trigger_word, progress)
        state = "stopped" if stopped else "completed"
        job.log(f"{state}: {progress.captioned} written, {progress.skipped} skipped, {progress.error_count} errors")
        return {"state": state, "current_file": None, **progress.fields()}

    def _pipeline(self, targets: list[DatasetItem], cfg: CaptionConfig, trigger: str, progress: _Progress) -> bool:
        """Caption every batch while the helper thread decodes the next one and writes the last one.
        Returns True when a stop request ended it early."""
        batches = [targets[i : i + cfg.batch_size] for i in range(0, len(targets), cfg.batch_size)]
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="caption-io") as io:
            decoding: Future = io.submit(_decode, batches[0])
            writing: Future | None = None
            for i in range(len(batches)):
                if self._wait_while_paused():
                    if writing is not None:
                        self._finish(writing.result(), progress, None)
                    return True
                decoded = decoding.result()
                following = batches[i + 1] if i + 1 < len(batches) else None
                if following:
                    decoding = io.submit(_decode, following)
                results = self._caption(decoded)
                if writing is not None:
                    self._finish(writing.result(), progress, batches[i][0].image.name)
                writing = io.submit(_write_batch, results, cfg, trigger)
            self._finish(writing.result(), progress, None)
        return False


def run_caption_job(run_dir: Path | str, on_progress: Callable[[dict], None] | None = None) -> int:
    """Worker entry: caption what DIR/config.json asks for; returns the exit code (0 completed or
    stopped, 1 failed)."""
    return run_job(run_dir, "caption", CaptionJob(on_progress).run)


def caption_runs(settings: Settings, limit: int = 10) -> list[dict]:
    """The latest captioning runs (newest first) read from their folders: run_id, status, config."""
    if not settings.runs_dir.is_dir():
        return []
    rows = []
    folders = sorted((p for p in settings.runs_dir.iterdir() if p.is_dir() and not p.name.startswith(".")),
                     key=lambda p: p.name, reverse=True)  # fmt: skip
    for path in folders:
        run = RunFolder(path)
        status = run.read_status()  # typed: a damaged status.json reads as {} and is simply not listed here
        if status.get("kind") != "caption":
            continue
        try:
            config = run.read_config()
        except UserError:  # a damaged config.json: listed, with nothing to show from it
            config = {}
        rows.append({"run_id": path.name, "path": path, "status": status, "config": config})
        if len(rows) >= limit:
            break
    return rows
