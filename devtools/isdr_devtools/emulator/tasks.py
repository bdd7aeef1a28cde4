"""Tasks: their life cycle, their files on disk, and the answer a poll or a delete gets.

A task's state is a function of the clock: it is pending/running until `ready_at`, then it has
the outcome its behaviour prescribes. The model itself runs in a background worker right after
the submit (or once the queue is back up, see --queue-down-for); a poll that comes before the
worker is done still answers "pending".

The answers are the real releases' (INFERENCE_SERVER_API.md), bugs included: a v1 task is not
visible for a while after its submit (554), a v1 DELETE deletes and then answers 500, and a v2
poll of an unknown or deleted uid answers 500. Task uids are secrets.token_urlsafe() values, as
the real servers make them (about 3 % start with '-' or '_').

Every task lives in DATA_DIR/tasks/task-<uid>/ (task.json, the input archive, the output
archive), so an emulator restarted on the same data directory still knows the tasks it accepted,
like the real server with its database. The answers are protocol-neutral status codes; the HTTP layer only
formats them.
"""

from __future__ import annotations

import datetime as dt
import gzip
import json
import logging
import os
import secrets
import shutil
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import archives, models
from .behaviours import Behaviour, Delivery, Evil, Outcome, behaviour_for
from .config import UID_LENGTH

log = logging.getLogger("isdr_devtools.emulator")

V1, V2 = "v1", "v2"
ARCHIVE_KIND = {V1: "zip", V2: "tar"}  # v1 speaks zip both ways, v2 tar

# Status codes of INFERENCE_SERVER_API.md.
OK, PENDING, FAILED, OUTPUT_MISSING, NOT_FOUND, INTERNAL_ERROR = 200, 551, 552, 553, 554, 500
# The v2 task object carries its status as an integer (these values are the emulator's own).
V2_STATUS = {"pending": 0, "running": 1, "finished": 2, "failed": 3, "deleted": 4}
NO_OUTPUT_MARKER = "no_output_files_found.error"  # v1's whole zip when the model wrote nothing


def new_uid(prefix: str = "") -> str:
    """A task uid as the real servers make them: secrets.token_urlsafe(), 43 characters of
    A-Z a-z 0-9 '-' '_'. With `prefix` (tests), one that starts with it."""
    return (prefix + secrets.token_urlsafe(32))[:UID_LENGTH]


@dataclass
class Task:
    uid: str
    model: str
    protocol: str
    created_at: float
    ready_at: float
    input_files: int | None = None  # DICOM instances found in the upload, once the model ran
    skipped_files: int | None = None  # upload members that were not DICOM
    # Once the model ran: DICOM instances per folder of the upload ("" for the archive's root),
    # and the Series Instance UIDs they belong to, so that a test sees what one task was sent.
    input_folders: dict[str, int] | None = None
    input_series: list[str] | None = None
    outcome: str | None = None  # an Outcome value once the model ran; None while it runs
    message: str = ""
    output_name: str | None = None  # file name of the output archive in the task folder
    output_gzip: bool = False
    deleted: bool = False
    number: int = 0  # the v2 task object's `id`
    hold_until: float = 0.0  # the model starts no earlier (the v2 queue was down at the submit)
    # Not persisted: counts polls for behaviours that answer 500 to the first few.
    polls: int = field(default=0, compare=False)

    def status(self, now: float) -> str:
        if self.deleted:
            return "deleted"
        if now < self.ready_at or self.outcome is None:
            # Queued while the queue is down; then the first third of the wait is "queued", the
            # rest "running" (only cosmetic).
            started = max(self.created_at, self.hold_until)
            return "pending" if now < started + (self.ready_at - started) / 3 else "running"
        return "failed" if self.outcome == Outcome.FAILED.value else "finished"

    def describe(self, now: float) -> dict:
        """The v2 task object (the submit and delete answers)."""
        return {
            "id": self.number,
            "uid": self.uid,
            "model": self.model,
            "status": V2_STATUS[self.status(now)],
            "created_at": _iso(self.created_at),
            "updated_at": _iso(now),
        }

    def to_json(self) -> dict:
        data = asdict(self)
        data.pop("polls")
        return data


def _iso(timestamp: float) -> str:
    return dt.datetime.fromtimestamp(timestamp, dt.timezone.utc).isoformat()


@dataclass(frozen=True)
class Answer:
    """What a poll or delete gets: a status code, a message, maybe a file to send and how."""

    code: int
    detail: str = ""
    path: Path | None = None
    content_type: str | None = None  # of the output archive; v1 sends none
    task: Task | None = None
    delivery: Delivery = Delivery.NORMAL


@dataclass(frozen=True)
class StoreSettings:
    data_dir: Path
    delay: float
    v1_register_delay: float
    bomb_bytes: int
    uid_prefix: str = ""
    queue_down_for: float = 0.0  # v2 submits hang (with the task stored) this long after start or a reset


def _atomic_json(path: Path, data: dict) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".task.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class TaskStore:
    def __init__(self, settings: StoreSettings):
        self.settings = settings
        self.tasks_dir = settings.data_dir / "tasks"
        self.spool_dir = settings.data_dir / "uploads"
        self.tasks_dir.mkdir(parents=True, exist_ok=True)
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._tasks: dict[str, Task] = {}
        self.queue_up_at = time.time() + settings.queue_down_for
        # Two cores: one model at a time keeps the HTTP side responsive.
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")

    def folder(self, uid: str) -> Path:
        """A task's folder: 'task-<uid>', since a uid may start with '-'."""
        return self.tasks_dir / f"task-{uid}"

    # --- life cycle of the store ---

    def load(self) -> int:
        """Pick up tasks a previous emulator process left in the data directory."""
        for task_json in sorted(self.tasks_dir.glob("*/task.json")):
            try:
                data = json.loads(task_json.read_text())
                task = Task(**data)
            except (OSError, ValueError, TypeError) as exc:
                log.warning("ignoring unreadable %s: %s", task_json, exc)
                continue
            self._tasks[task.uid] = task
            if task.outcome is None and not task.deleted:
                self._worker.submit(self._run_model, task)  # it was interrupted: run it again
        return len(self._tasks)

    def close(self) -> None:
        self._worker.shutdown(wait=False, cancel_futures=True)

    def reset(self) -> None:
        """Forget every task and remove its files (a fresh server)."""
        with self._lock:
            uids = list(self._tasks)
            self._tasks.clear()
            self.queue_up_at = time.time() + self.settings.queue_down_for
        for uid in uids:
            shutil.rmtree(self.folder(uid), ignore_errors=True)

    # --- operations ---

    def create(self, protocol: str, model: str, behaviour: Behaviour, upload: Path, hold_until: float = 0.0) -> Task:
        """Accept a task: move the uploaded archive into its folder and start the model (not
        before `hold_until`: a queue that is down holds it)."""
        now = time.time()
        uid = new_uid(self.settings.uid_prefix)
        folder = self.folder(uid)
        folder.mkdir()
        os.replace(upload, folder / f"input.{ARCHIVE_KIND[protocol]}")
        with self._lock:
            number = len(self._tasks) + 1
        task = Task(
            uid=uid,
            model=model,
            protocol=protocol,
            created_at=now,
            ready_at=max(now, hold_until) + self.settings.delay * behaviour.delay_factor,
            number=number,
            hold_until=hold_until,
        )
        self._save(task)
        with self._lock:
            self._tasks[uid] = task
        if hold_until > now:
            timer = threading.Timer(hold_until - now, self._worker.submit, (self._run_model, task))
            timer.daemon = True
            timer.start()
        else:
            self._worker.submit(self._run_model, task)
        return task

    def poll(self, protocol: str, uid: str, now: float | None = None) -> Answer:
        now = time.time() if now is None else now
        with self._lock:
            task = self._visible(protocol, uid, now)
            if task is None or task.deleted:
                # v1 says 554 (also for a deleted task); v2 crashes on the missing task.
                return Answer(NOT_FOUND if protocol == V1 else INTERNAL_ERROR, f"task {uid} not found")
            behaviour = behaviour_for(task.model)
            task.polls += 1
            if behaviour is not None and task.polls <= behaviour.poll_errors:
                return Answer(INTERNAL_ERROR, "internal server error (emulated)", task=task)
            if now < task.ready_at or task.outcome is None:
                return Answer(PENDING, f"task is {task.status(now)}", task=task)
            if task.outcome == Outcome.FAILED.value:
                return Answer(FAILED, task.message or "task failed", task=task)
            if task.outcome == Outcome.MISSING.value or task.output_name is None:
                return Answer(OUTPUT_MISSING, task.message or "output missing", task=task)
            path = self.folder(uid) / task.output_name
            if task.protocol == V1:
                content_type = None  # v1 sends its zip with no Content-Type (and no length)
            else:
                content_type = "application/gzip" if task.output_gzip else "application/x-tar"
            delivery = behaviour.delivery if behaviour is not None else Delivery.NORMAL
            return Answer(OK, path=path, content_type=content_type, task=task, delivery=delivery)

    def delete(self, protocol: str, uid: str, now: float | None = None) -> Answer:
        now = time.time() if now is None else now
        with self._lock:
            task = self._visible(protocol, uid, now)
            if protocol == V1:
                # The v1.2 bug: the task is deleted (if there is one), the answer is 500 anyway.
                if task is not None and not task.deleted:
                    task.deleted = True
                    self._remove_files(task)
                return Answer(INTERNAL_ERROR, "Internal Server Error", task=task)
            if task is None or task.deleted:
                return Answer(NOT_FOUND, f"task {uid} not found")
            if task.status(now) in ("pending", "running"):
                return Answer(INTERNAL_ERROR, "task is still running", task=task)
            task.deleted = True
            self._remove_files(task)
        return Answer(OK, "task deleted", task=task)

    def _remove_files(self, task: Task) -> None:
        # A model still running for it will notice `deleted` and leave no files behind.
        for name in (f"input.{ARCHIVE_KIND[task.protocol]}", task.output_name):
            if name:
                (self.folder(task.uid) / name).unlink(missing_ok=True)
        self._save(task)

    def snapshot(self) -> list[dict]:
        with self._lock:
            tasks = list(self._tasks.values())
        now = time.time()
        return [
            {
                "uid": t.uid,
                "model": t.model,
                "protocol": t.protocol,
                "status": t.status(now),
                "input_files": t.input_files,
                "skipped_files": t.skipped_files,
                "input_folders": t.input_folders,
                "input_series": t.input_series,
                "deleted": t.deleted,
                "message": t.message,
            }
            for t in tasks
        ]

    # --- internals ---

    def _visible(self, protocol: str, uid: str, now: float) -> Task | None:
        task = self._tasks.get(uid)
        if task is None or task.protocol != protocol:
            return None  # each protocol sees only its own tasks
        if protocol == V1 and now < task.created_at + self.settings.v1_register_delay:
            # The v1 quirk: the submit was answered before the task was stored.
            return None
        return task

    def _save(self, task: Task) -> None:
        folder = self.folder(task.uid)
        if folder.is_dir():  # gone after a reset
            _atomic_json(folder / "task.json", task.to_json())

    def _run_model(self, task: Task) -> None:
        try:
            self._run_model_unguarded(task)
        except Exception as exc:  # noqa: BLE001 - a model crash must never take the server down
            # Only the exception type: its message could quote a value from the upload.
            log.exception("model for task %s crashed", task.uid)
            self._finish(task, Outcome.FAILED, f"model crashed: {type(exc).__name__}")

    def _run_model_unguarded(self, task: Task) -> None:
        behaviour = behaviour_for(task.model)
        folder = self.folder(task.uid)
        kind = ARCHIVE_KIND[task.protocol]
        if behaviour is None:
            self._finish(task, Outcome.FAILED, f"model {task.model!r} is not known")
            return
        try:
            instances, skipped, folders = self._read_input(folder / f"input.{kind}", kind)
        except archives.InputArchiveError as exc:
            self._finish(task, Outcome.FAILED, f"invalid input: {exc}")
            return
        except FileNotFoundError:
            self._finish(task, Outcome.FAILED, "input archive is gone (task deleted?)")
            return
        task.input_files, task.skipped_files = len(instances), skipped
        task.input_folders = folders
        task.input_series = sorted({str(getattr(ds, "SeriesInstanceUID", "")) for ds in instances})
        if not instances:
            self._finish(task, Outcome.FAILED, f"invalid input: no DICOM instances in the {kind} archive")
            return
        if behaviour.outcome in (Outcome.FAILED, Outcome.MISSING):
            self._finish(task, behaviour.outcome, behaviour.failure_message)
            return
        series = models.group_series(instances)
        outputs = []
        if behaviour.outcome is Outcome.OUTPUT:
            outputs = _model_outputs(task, models.predict(series, task.model), len(series))
        entries, compress = _output_entries(task, outputs, behaviour.evil, self.settings.bomb_bytes)
        if task.deleted:
            return
        name = f"output.{kind}" + (".gz" if compress else "")
        archives.write_archive(folder / name, kind, entries, gzip=compress)
        task.output_name, task.output_gzip = name, compress
        self._finish(task, behaviour.outcome, "")

    @staticmethod
    def _read_input(path: Path, kind: str):
        instances, skipped, folders = [], 0, {}
        for name, member in archives.iter_members(path, kind):
            ds = models.read_instance(member)
            if ds is None:
                skipped += 1
            else:
                instances.append(ds)
                folder = name.rpartition("/")[0]
                folders[folder] = folders.get(folder, 0) + 1
        return instances, skipped, folders

    def _finish(self, task: Task, outcome: Outcome, message: str) -> None:
        with self._lock:
            task.outcome, task.message = outcome.value, message
        self._save(task)
        if task.deleted and task.output_name:
            (self.folder(task.uid) / task.output_name).unlink(missing_ok=True)
        log.info(
            "task %s (%s, %s): model done, outcome %s, %s DICOM input file(s)",
            task.uid, task.protocol, task.model, outcome.value, task.input_files,
        )


def _model_outputs(task: Task, predictions: list[models.Prediction], series_count: int) -> list[archives.Entry]:
    """What a model writes into its output folder: predictions and the junk real models leave
    (a log, a NIfTI mask), at the top, and an intermediate file in a sub-folder."""
    log_text = (
        f"ISDR InferenceServer emulator\n"
        f"task {task.uid} model {task.model} protocol {task.protocol}\n"
        f"{task.input_files} DICOM input file(s) in {series_count} series, "
        f"{task.skipped_files} non-DICOM member(s) skipped\n"
        + "".join(f"wrote {Path(p.name).name}\n" for p in predictions)
    )
    return [
        *(archives.file_entry(Path(p.name).name, p.data) for p in predictions),
        archives.file_entry("log.txt", log_text.encode()),
        # Real models also leave NIfTI masks behind; clients must skip non-DICOM files.
        archives.file_entry("mask.nii.gz", _fake_nifti()),
        archives.file_entry("intermediate/probabilities.npy", b"\x93NUMPY emulated"),
    ]


def _output_entries(
    task: Task, outputs: list[archives.Entry], evil: Evil | None, bomb_bytes: int
) -> tuple[list[archives.Entry], bool]:
    """The output archive's members, as each release packs the model's output folder.

    v1 zips the top-level files only: a sub-folder becomes a bare directory entry (its files are
    lost), and a model that wrote nothing gets one file, no_output_files_found.error. v2 tars the
    top-level files, flat, plus an empty container.log. Evil models add their hostile entries.
    """
    top = [e for e in outputs if "/" not in e.name]
    folders = sorted({e.name.split("/", 1)[0] + "/" for e in outputs if "/" in e.name})
    if task.protocol == V1:
        entries = top + [archives.Entry(folder, "dir") for folder in folders]
        if not top:
            entries = [archives.file_entry(NO_OUTPUT_MARKER, b"no output files found\n")]
    else:
        entries = top + [archives.file_entry("container.log", b"")]
    compress = False
    if evil is None:
        return entries, compress
    first = next(e.data for e in top if e.name.endswith(".dcm"))
    if evil is Evil.DOTDOT:
        entries += [
            archives.file_entry("../../escaped.dcm", first),
            archives.file_entry("/tmp/isdr-absolute-escape.dcm", first),
        ]
    elif evil is Evil.SYMLINK:
        entries += [
            archives.Entry("predictions/passwd.dcm", "symlink", target="/etc/passwd"),
            # Link a folder out, then write "into" it: the classic two-step escape.
            archives.Entry("predictions/outside", "symlink", target="/tmp"),
            archives.file_entry("predictions/outside/isdr-through-symlink.dcm", first),
            archives.Entry("predictions/hardlink.dcm", "hardlink", target="/etc/passwd"),
        ]
    elif evil is Evil.BOMB:
        entries.append(archives.Entry("predictions/bomb.dcm", "zeros", size=bomb_bytes))
        # A plain tar stores zeros as zeros; compress it so the download stays small.
        compress = task.protocol == V2
    return entries, compress


def _fake_nifti() -> bytes:
    # A NIfTI-1 header is 348 bytes starting with sizeof_hdr=348 and magic "n+1"; enough to
    # look like one to anything that sniffs it, and certainly not DICOM.
    header = bytearray(352)
    header[0:4] = (348).to_bytes(4, "little")
    header[344:348] = b"n+1\x00"
    return gzip.compress(bytes(header) + bytes(64), mtime=0)
