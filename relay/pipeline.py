"""One inference task, start to finish: fetch, submit, poll, extract, deliver, delete.

The same code runs in a worker of `isdr run` and in the pod of a Kubernetes Job (`isdr job`).
Every step that must not be repeated is recorded through `save` before the next begins, so a
task killed at any moment resumes where it was:

- the InferenceServer's uid is recorded the moment the submit's answer arrives; after that the
  task is polled, never submitted again. A submit whose answer never came (a kill, a time-out
  after the upload) is repeated at most once, with a warning (relay.lifecycle.submit_decision);
- a destination that accepted an instance is not sent it again;
- once every destination accepted the predictions the task is Succeeded, whatever happens next:
  the remote task's deletion is best effort, and resumed after a kill.

Working copies (fetched instances, archives, predictions) live in one folder per task under the
work root (WORK_DIR, by default inside the storage root), removed when the task stops for any
reason; what a kill leaves behind is swept at the next start.
"""

from __future__ import annotations

import errno
import logging
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from relay import metrics
from relay.config import Settings
from relay.dicom.sender import (
    DestinationUnavailable,
    OutgoingFile,
    describe_destination,
    read_outgoing,
    send_files,
)
from relay.fingerprints.model import Destination, Fingerprint
from relay.inference.archives import ArchiveRejected, build_input_archive, find_dicom_files, safe_extract
from relay.inference.client import (
    ClientSettings,
    InferenceError,
    ServerUnavailable,
    SubmitOutcomeUnknown,
    SubmitRejected,
    TaskFailed,
    make_client,
    submit_with_retry,
)
from relay.inference.polling import PollPolicy, WaitStopped, wait_for_outputs
from relay.lifecycle import (
    StudyPart,
    SubmitDecision,
    TaskPhase,
    TaskState,
    apply_cancel,
    cancelled_remote,
    give_up_message,
    repeat_warning,
    submit_decision,
)
from relay.retry import Backoff
from relay.storage.base import Storage, StorageError, StorageFull
from relay.uids import SeriesKey

log = logging.getLogger("relay.pipeline")


class Interrupted(Exception):
    """The relay is shutting down; the task's recorded state is where it resumes."""


class DeliveryFailed(Exception):
    pass


class SubmitGivenUp(Exception):
    """Too many submits of unknown outcome: the task fails rather than risk another GPU run."""


class NoSpaceForWork(Exception):
    """The disk is full (or the work folder unusable): the task waits and is tried again later;
    it does not fail for it."""


def _disk_full(exc: BaseException | None) -> bool:
    while exc is not None:
        if isinstance(exc, StorageFull) or (isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)):
            return True
        exc = exc.__cause__
    return False


WORK_FOLDER_PREFIX = "task-"


def work_folder(work_root: Path, task_id: str) -> Path:
    return Path(work_root) / f"{WORK_FOLDER_PREFIX}{task_id}"


def sweep_work_folders(work_root: Path) -> int:
    """Remove every task work folder under `work_root` (at start: what a killed run left)."""
    root = Path(work_root)
    if not root.is_dir():
        return 0
    removed = 0
    for folder in root.iterdir():
        if folder.name.startswith(WORK_FOLDER_PREFIX) and folder.is_dir() and not folder.is_symlink():
            shutil.rmtree(folder, ignore_errors=True)
            removed += 1
    return removed


@dataclass(frozen=True)
class TaskSpec:
    """Everything a task needs, as plain data."""

    task_id: str
    series: SeriesKey
    generation: int
    instance_uids: tuple[str, ...]
    fingerprint: Fingerprint
    # A study task: its series, each posted in a folder of its own (relay.lifecycle.StudyPart).
    # Empty for a series-level task: `series` with `instance_uids`, in a folder named by its UIDs.
    parts: tuple[StudyPart, ...] = ()

    @property
    def inputs(self) -> tuple[StudyPart, ...]:
        return self.parts or (StudyPart(self.series.slug, self.series, self.generation, self.instance_uids),)

    def describe(self) -> str:
        if not self.parts:
            return f"series {self.series.series_uid}"
        return "study task with " + ", ".join(f"{part.folder} (series {part.key.series_uid})" for part in self.parts)


@dataclass(frozen=True)
class PipelineSettings:
    ca_bundle: str | None = None
    post_timeout: float = 60.0
    get_interval: float = 15.0
    get_timeout: float = 86400.0
    not_found_grace: float = 60.0
    delete_when_done: bool = True
    max_output_bytes: int = 2 * 1024**3
    delivery_timeout: float = 3600.0
    submit_timeout: float = 3600.0  # keep trying to reach an InferenceServer that is down
    calling_ae_title: str = "ISDR"

    @classmethod
    def from_settings(cls, settings: Settings) -> "PipelineSettings":
        return cls(
            ca_bundle=settings.cert_file,
            post_timeout=settings.post_timeout,
            get_interval=settings.get_interval,
            get_timeout=settings.get_timeout,
            not_found_grace=settings.not_found_grace,
            delete_when_done=settings.ask_inference_server_to_delete_task,
            max_output_bytes=settings.max_output_bytes,
            delivery_timeout=settings.delivery_timeout,
            submit_timeout=max(settings.delivery_timeout, settings.post_timeout),
            calling_ae_title=settings.calling_ae_title,
        )


class _RecordedSubmits:
    """A client whose every submit is counted in the task's record before its upload starts, and
    un-counted when it certainly created nothing (refused, answered 5xx): the count of submits of
    unknown outcome survives a kill at any moment."""

    def __init__(self, client, runner: "TaskRunner", state: TaskState):
        self.client = client
        self.runner = runner
        self.state = state

    def submit(self, archive: Path, model: str) -> str:
        known = self.state.unknown_submits
        self.state = self.runner._record(self.state, phase=TaskPhase.SUBMITTING, unknown_submits=known + 1)
        try:
            uid = self.client.submit(archive, model)
        except ServerUnavailable as exc:
            if not exc.maybe_accepted:
                self.state = self.runner._record(self.state, unknown_submits=known)
            raise
        except SubmitRejected:
            self.state = self.runner._record(self.state, unknown_submits=known)
            raise
        # Answered: this submit's outcome is known. The caller records that together with the uid
        # (a kill before that record leaves the submit counted as unknown, as it must).
        self.state = replace(self.state, unknown_submits=known)
        return uid


class TaskRunner:
    def __init__(
        self,
        storage: Storage,
        settings: PipelineSettings,
        save: Callable[[TaskState], None],
        say: Callable[[str], None],
        work_root: Path,
        warn: Callable[[str], None] | None = None,
        should_stop: Callable[[], bool] = lambda: False,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self.storage = storage
        self.settings = settings
        self._save = save
        self.say = say
        self.warn = warn or say
        self.work_root = Path(work_root)
        self.should_stop = should_stop
        self.sleep = sleep

    def _record(self, state: TaskState, **changes) -> TaskState:
        state = replace(state, updated_at=time.time(), **changes)
        self._save(state)
        return state

    def _pause(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.should_stop():
                raise Interrupted()
            self.sleep(min(0.2, max(0.0, deadline - time.monotonic())))

    def run(self, spec: TaskSpec, state: TaskState) -> TaskState:
        """Run (or resume) the task; returns its final state, Succeeded or Failed.

        Raises Interrupted when asked to stop; the saved state is then where it resumes."""
        if state.finished:
            if state.remote_delete_pending:
                return self._delete_remote(spec, state, self._client(spec, self.work_root))
            return state
        work = work_folder(self.work_root, spec.task_id)
        shutil.rmtree(work, ignore_errors=True)  # a killed attempt's leftovers
        try:
            try:
                work.mkdir(parents=True)
            except OSError as exc:
                raise NoSpaceForWork(f"cannot create the task's work folder {work}: {exc}") from exc
            return self._run(spec, state, work)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def _client(self, spec: TaskSpec, download_dir: Path):
        server = spec.fingerprint.inference_server
        return metrics.ObservedInferenceClient(make_client(
            server,
            ClientSettings(ca_bundle=server.ca_bundle or self.settings.ca_bundle,
                           post_timeout=self.settings.post_timeout,
                           max_download_bytes=self.settings.max_output_bytes),
            download_dir=download_dir,
        ))

    def _run(self, spec: TaskSpec, state: TaskState, work: Path) -> TaskState:
        try:
            client = self._client(spec, work)
            if state.inference_uid is None:
                state = self._submit(spec, state, client, work)
            else:
                self.say(f"resuming: task {state.inference_uid} was accepted by the InferenceServer; "
                         "polling again, not submitting twice")
            if state.phase != TaskPhase.DELIVERING:
                state = self._record(state, phase=TaskPhase.RUNNING)
            try:
                archive = wait_for_outputs(
                    client, state.inference_uid, state.submitted_at,
                    self._poll_policy(spec.fingerprint),
                    on_progress=self.say, should_stop=self.should_stop, sleep=self._pause,
                )
            except WaitStopped:
                raise Interrupted() from None
            state = self._record(state, phase=TaskPhase.DELIVERING)
            predictions = self._extract(archive, work / "outputs")
            state = self._deliver(spec, state, predictions)
            # Delivered everywhere: Succeeded from here on, whatever happens to the remote task.
            state = self._record(state, phase=TaskPhase.SUCCEEDED, message="predictions delivered",
                                 remote_delete_pending=self._delete_when_done(spec.fingerprint))
            self.say("task succeeded")
        except (TaskFailed, SubmitRejected, SubmitGivenUp, ServerUnavailable, ArchiveRejected, DeliveryFailed,
                StorageError) as exc:
            if _disk_full(exc):
                raise NoSpaceForWork(str(exc)) from exc
            self.say(f"task failed: {exc}")
            return self._record(state, phase=TaskPhase.FAILED, message=str(exc)[:1000])
        except InferenceError as exc:
            if self.should_stop():
                raise Interrupted() from exc
            self.say(f"task failed: {exc}")
            return self._record(state, phase=TaskPhase.FAILED, message=str(exc)[:1000])
        if state.remote_delete_pending:
            state = self._delete_remote(spec, state, client)
        return state

    def _delete_remote(self, spec: TaskSpec, state: TaskState, client) -> TaskState:
        """Best effort, once per attempt; a task already deleted (a kill after the delete) is fine."""
        try:
            client.delete(state.inference_uid)
            self.say(f"deleted remote task {state.inference_uid}")
        except InferenceError as exc:
            # The predictions are delivered; a leftover task on the server is not a failure.
            self.warn(f"could not delete remote task {state.inference_uid} (it stays on the server): {exc}")
        return self._record(state, remote_delete_pending=False)

    def cancel(self, spec: TaskSpec, state: TaskState) -> TaskState:
        """An administrator cancelled the task: its remote task is deleted (when it has one; a
        failed delete is said, not retried) and the task is recorded as Failed, saying so."""
        error = None
        if state.inference_uid:
            try:
                self._client(spec, self.work_root).delete(state.inference_uid)
            except InferenceError as exc:
                error = str(exc)
        remote = cancelled_remote(state.inference_uid, state.unknown_submits, error)
        final = apply_cancel(state, time.time(), remote)
        self._save(final)
        self.warn(final.message)
        return final

    # --- steps ---

    def _submit(self, spec: TaskSpec, state: TaskState, client, work: Path) -> TaskState:
        """Submit at most once more than the outcomes we know: see lifecycle.submit_decision."""
        decision = submit_decision(state)
        if decision == SubmitDecision.GIVE_UP:
            raise SubmitGivenUp(give_up_message(state))
        inputs = {part.folder: self._fetch(spec, part, work / "input" / part.folder) for part in spec.inputs}
        archive = build_input_archive(client.archive_format(), inputs, work / f"input.{client.archive_format()}")
        server = spec.fingerprint.inference_server
        recorded = _RecordedSubmits(client, self, state)
        while True:
            if decision == SubmitDecision.REPEAT:  # after a restart, or an answer that never came
                self.warn(repeat_warning(recorded.state))
                metrics.possible_duplicate_submit()
            try:
                uid = submit_with_retry(
                    recorded, archive, server.model,
                    deadline_seconds=self.settings.submit_timeout,
                    sleep=self._pause,
                    on_retry=lambda exc, attempt, delay: self.say(
                        f"InferenceServer unavailable, retrying in {delay:.0f}s: {exc}"),
                )
                break
            except SubmitOutcomeUnknown as exc:
                if self.should_stop():
                    raise Interrupted() from exc
                self.warn(f"submit outcome unknown: {exc}")
                decision = submit_decision(recorded.state)
                if decision == SubmitDecision.GIVE_UP:
                    raise SubmitGivenUp(give_up_message(recorded.state)) from exc
        # Recorded before anything else: from here on the task is polled, never submitted again.
        state = self._record(recorded.state, phase=TaskPhase.RUNNING, inference_uid=uid,
                             submitted_at=time.time())
        sent = sum(len(files) for files in inputs.values())
        self.say(f"submitted {sent} instances of {spec.describe()} (dispatch "
                 f"#{spec.generation}) to model {server.model} at {server.url} as task {uid}")
        archive.unlink(missing_ok=True)
        return state

    def _fetch(self, spec: TaskSpec, part: StudyPart, folder: Path) -> list[Path]:
        folder.mkdir(parents=True, exist_ok=True)
        files = []
        for uid in part.instances:
            target = folder / f"{uid}.dcm"
            try:
                self.storage.download(part.key.instance_key(uid), target)
            except KeyError:
                self.say(f"instance {uid} is no longer in storage; sending the series without it")
                continue
            files.append(target)
        if not files:
            raise DeliveryFailed(f"none of series {part.key.series_uid}'s instances is in storage any more")
        self.say(f"fetched {len(files)} instances of series {part.key.series_uid}")
        return files

    def _poll_policy(self, fingerprint: Fingerprint) -> PollPolicy:
        server = fingerprint.inference_server
        return PollPolicy(
            interval=server.poll_interval_seconds or self.settings.get_interval,
            timeout=server.timeout_seconds or self.settings.get_timeout,
            not_found_grace=self.settings.not_found_grace,
        )

    def _delete_when_done(self, fingerprint: Fingerprint) -> bool:
        value = fingerprint.inference_server.delete_when_done
        return self.settings.delete_when_done if value is None else value

    def _extract(self, archive: Path, folder: Path) -> list[OutgoingFile]:
        folder.mkdir(parents=True, exist_ok=True)
        extracted = safe_extract(archive, folder, max_total_bytes=self.settings.max_output_bytes)
        archive.unlink(missing_ok=True)
        for name, reason in extracted.skipped:
            self.say(f"skipped archive entry {name!r}: {reason}")
        files = read_outgoing(find_dicom_files(folder))
        self.say(f"received {len(files)} predictions")
        return files

    def _deliver(self, spec: TaskSpec, state: TaskState, files: list[OutgoingFile]) -> TaskState:
        problems = []
        for destination in spec.fingerprint.destinations:
            state, problem = self._deliver_to(destination, state, files)
            if problem:
                problems.append(problem)
        if problems:
            raise DeliveryFailed("; ".join(problems))
        return state

    def _deliver_to(self, destination: Destination, state: TaskState,
                    files: list[OutgoingFile]) -> tuple[TaskState, str | None]:
        where = describe_destination(destination)
        deadline = time.monotonic() + self.settings.delivery_timeout
        backoff = iter(Backoff(initial=1.0, factor=2.0, maximum=60.0))
        while True:
            done = set(state.delivered.get(where, ()))
            pending = [item for item in files if item.sop_instance_uid not in done]
            if not pending:
                if files:
                    self.say(f"stored {len(files)} predictions to {where}")
                return state, None
            try:
                result = send_files(destination, pending, self.settings.calling_ae_title)
            except DestinationUnavailable as exc:
                result, failure = None, str(exc)
                metrics.delivery_error(metrics.DELIVERY_UNAVAILABLE)
            if result is not None:
                if result.refused:
                    metrics.delivery_error(metrics.DELIVERY_REFUSED)
                if result.accepted:
                    delivered = dict(state.delivered)
                    delivered[where] = tuple(sorted(done | set(result.accepted)))
                    state = self._record(state, delivered=delivered)
                permanent = {uid: r for uid, r in result.refused.items()
                             if uid not in result.transient_refusals}
                if permanent:
                    details = ", ".join(f"{uid} ({meaning})" for uid, (_, meaning) in
                                        sorted(permanent.items())[:5])
                    problem = f"{where} refused {len(permanent)} of {len(files)} predictions: {details}"
                    log.error("delivery failed for good: %s", problem)
                    return state, problem
                if not result.refused:
                    continue  # all accepted: the loop's first check reports it
                failure = f"{where} refused {len(result.refused)} predictions for now (out of resources)"
            delay = next(backoff)
            if time.monotonic() + delay > deadline:
                problem = f"{failure}; gave up after {self.settings.delivery_timeout:.0f}s"
                log.error("delivery failed for good: %s", problem)
                return state, problem
            self.say(f"{failure}; retrying in {delay:.0f}s")
            self._pause(delay)
