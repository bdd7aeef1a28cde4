"""One inference task, start to finish: fetch, submit, poll, extract, deliver, delete.

The same code runs in a worker of `isdr run` and in the pod of a Kubernetes Job (`isdr job`).
Every step that must not be repeated is recorded through `save` before the next begins, so a
task killed at any moment resumes where it was: after the InferenceServer accepted the series its
uid is on record and polling resumes (no second submit), and a destination that accepted an
instance is not sent it again.
"""

from __future__ import annotations

import logging
import tempfile
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
    SubmitRejected,
    TaskFailed,
    make_client,
    submit_with_retry,
)
from relay.inference.polling import PollPolicy, WaitStopped, wait_for_outputs
from relay.lifecycle import (
    TASK_DELIVERING,
    TASK_FAILED,
    TASK_RUNNING,
    TASK_SUBMITTING,
    TASK_SUCCEEDED,
    TaskState,
)
from relay.retry import Backoff
from relay.storage.base import Storage, StorageError
from relay.uids import SeriesKey

log = logging.getLogger("relay.pipeline")


class Interrupted(Exception):
    """The relay is shutting down; the task's recorded state is where it resumes."""


class DeliveryFailed(Exception):
    pass


@dataclass(frozen=True)
class TaskSpec:
    """Everything a task needs, as plain data."""

    task_id: str
    series: SeriesKey
    instance_uids: tuple[str, ...]
    fingerprint: Fingerprint


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


class TaskRunner:
    def __init__(
        self,
        storage: Storage,
        settings: PipelineSettings,
        save: Callable[[TaskState], None],
        say: Callable[[str], None],
        workdir: Path | None = None,
        should_stop: Callable[[], bool] = lambda: False,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self.storage = storage
        self.settings = settings
        self._save = save
        self.say = say
        self.workdir = workdir
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
        server = spec.fingerprint.inference_server
        try:
            with tempfile.TemporaryDirectory(prefix=f"isdr-{spec.task_id}-", dir=self.workdir) as tmp:
                work = Path(tmp)
                client = metrics.ObservedInferenceClient(make_client(
                    server,
                    ClientSettings(ca_bundle=server.ca_bundle or self.settings.ca_bundle,
                                   post_timeout=self.settings.post_timeout,
                                   max_download_bytes=self.settings.max_output_bytes),
                    download_dir=work,
                ))
                if state.inference_uid is None:
                    state = self._submit(spec, state, client, work)
                else:
                    self.say(f"resuming: task {state.inference_uid} was accepted by the InferenceServer; "
                             "polling again, not submitting twice")
                if state.phase != TASK_DELIVERING:
                    state = self._record(state, phase=TASK_RUNNING)
                try:
                    archive = wait_for_outputs(
                        client, state.inference_uid, state.submitted_at,
                        self._poll_policy(spec.fingerprint),
                        on_progress=self.say, should_stop=self.should_stop, sleep=self._pause,
                    )
                except WaitStopped:
                    raise Interrupted() from None
                state = self._record(state, phase=TASK_DELIVERING)
                predictions = self._extract(archive, work / "outputs")
                state = self._deliver(spec, state, predictions)
                if self._delete_when_done(spec.fingerprint):
                    try:
                        client.delete(state.inference_uid)
                        self.say(f"deleted remote task {state.inference_uid}")
                    except InferenceError as exc:
                        # The predictions are delivered; a leftover task on the server is not a failure.
                        self.say(f"could not delete remote task {state.inference_uid}: {exc}")
                state = self._record(state, phase=TASK_SUCCEEDED, message="predictions delivered")
                self.say("task succeeded")
                return state
        except (TaskFailed, SubmitRejected, ServerUnavailable, ArchiveRejected, DeliveryFailed,
                StorageError) as exc:
            self.say(f"task failed: {exc}")
            return self._record(state, phase=TASK_FAILED, message=str(exc)[:1000])
        except InferenceError as exc:
            if self.should_stop():
                raise Interrupted() from exc
            self.say(f"task failed: {exc}")
            return self._record(state, phase=TASK_FAILED, message=str(exc)[:1000])

    # --- steps ---

    def _submit(self, spec: TaskSpec, state: TaskState, client, work: Path) -> TaskState:
        if state.phase == TASK_SUBMITTING:
            # Killed between sending the series and recording the uid: the server may or may not
            # have it. No uid means nothing to poll, so the only way forward is to send again.
            self.say("the previous submit's outcome is unknown (interrupted before its answer was "
                     "recorded); submitting again")
            metrics.possible_duplicate_submit()
        files = self._fetch(spec, work / "input" / spec.series.slug)
        archive = build_input_archive(client.archive_format(), {spec.series.slug: files},
                                      work / f"input.{client.archive_format()}")
        state = self._record(state, phase=TASK_SUBMITTING)
        server = spec.fingerprint.inference_server
        uid = submit_with_retry(
            client, archive, server.model,
            deadline_seconds=self.settings.submit_timeout,
            sleep=self._pause,
            on_retry=lambda exc, attempt, delay: self.say(
                f"InferenceServer unavailable, retrying in {delay:.0f}s: {exc}"),
        )
        state = self._record(state, phase=TASK_RUNNING, inference_uid=uid, submitted_at=time.time())
        self.say(f"submitted {len(files)} instances to model {server.model} at {server.url} as task {uid}")
        archive.unlink(missing_ok=True)
        return state

    def _fetch(self, spec: TaskSpec, folder: Path) -> list[Path]:
        folder.mkdir(parents=True, exist_ok=True)
        files = []
        for uid in spec.instance_uids:
            target = folder / f"{uid}.dcm"
            try:
                self.storage.download(spec.series.instance_key(uid), target)
            except KeyError:
                self.say(f"instance {uid} is no longer in storage; sending the series without it")
                continue
            files.append(target)
        if not files:
            raise DeliveryFailed("none of the series' instances is in storage any more")
        self.say(f"fetched {len(files)} instances of series {spec.series.series_uid}")
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
