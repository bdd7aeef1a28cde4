"""`isdr job`: the entry point of an inference task's Kubernetes Job.

It runs the core's task pipeline for one (series, fingerprint) and tells its story on stdout,
one line per step, so that `kubectl logs job/<name>` explains what happened. Exit codes:
  0  the predictions reached every destination
  2  the task failed for good (the InferenceServer said so, a destination refused, ...): the
     Job's podFailurePolicy fails the Job at once instead of retrying
  1  anything else (killed, crashed, shut down): the Job controller starts a new pod, which
     resumes from the task's record, polling a task the InferenceServer already accepted
(What the operator gives a Job and what the Job reports: relay.kube.job_contract.)
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import threading
import time
from dataclasses import replace

from relay import metrics
from relay.config import ConfigError, load_settings
from relay.fingerprints.manifest import FingerprintError, fingerprint_from_manifest
from relay.fingerprints.model import Fingerprint
from relay.kube.job_contract import (
    DESTINATION_CA_FILE,
    DESTINATION_CLIENT_CERTIFICATE_FILE,
    DESTINATION_CLIENT_KEY_FILE,
    FINGERPRINT_CA_ENV,
    FINGERPRINT_ENV,
    JobExit,
    destination_tls_dir,
    destination_tls_env,
    with_errors,
)
from relay.lifecycle import TaskPhase, TaskState
from relay.pipeline import Interrupted, NoSpaceForWork, PipelineSettings, TaskRunner, TaskSpec
from relay.state_store import DispatchStore, StateWrites, StudyStore, TaskStore
from relay.storage import StorageError, open_storage
from relay.uids import InvalidUID, SeriesKey, parse_instance_key

def with_mounted_destination_tls(fingerprint: Fingerprint, environ=os.environ) -> Fingerprint:
    """The fingerprint with its destinations' Secret and ConfigMap references replaced by the
    files the operator mounted into the Job."""
    destinations = []
    for index, destination in enumerate(fingerprint.destinations):
        tls = destination.tls
        if tls is not None and (tls.ca_bundle_ref is not None or tls.client_secret is not None):
            folder = environ.get(destination_tls_env(index), destination_tls_dir(index))
            if tls.ca_bundle_ref is not None:
                tls = replace(tls, ca_bundle=f"{folder}/{DESTINATION_CA_FILE}")
            if tls.client_secret is not None:
                tls = replace(tls, client_certificate=f"{folder}/{DESTINATION_CLIENT_CERTIFICATE_FILE}",
                              client_key=f"{folder}/{DESTINATION_CLIENT_KEY_FILE}")
            destination = replace(destination, tls=tls)
        destinations.append(destination)
    return replace(fingerprint, destinations=tuple(destinations))


def say(line: str) -> None:
    now = time.time()
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(now))
    print(f"{stamp}.{int(now % 1 * 1000):03d} {line}", flush=True)


def warn(line: str) -> None:
    say(f"WARNING {line}")


class _Log:
    """StateWrites reports through a logger; in a Job everything goes to stdout, line by line."""

    def error(self, message: str, *args) -> None:
        say(f"ERROR {message % args}")


def _fingerprint():
    raw = os.environ.get(FINGERPRINT_ENV)
    if not raw:
        raise FingerprintError(f"{FINGERPRINT_ENV} is not set: the Job must carry its fingerprint")
    manifest = json.loads(raw)
    fingerprint = fingerprint_from_manifest(manifest, source="the Job's fingerprint")
    ca_file = os.environ.get(FINGERPRINT_CA_ENV)
    if ca_file:
        fingerprint = replace(fingerprint,
                              inference_server=replace(fingerprint.inference_server, ca_bundle=ca_file))
    return with_mounted_destination_tls(fingerprint)


def run_job(args) -> int:
    try:
        settings = load_settings()
        key = SeriesKey(args.series_uid, args.sop_class_uid)
        fingerprint = _fingerprint()
    except (ConfigError, InvalidUID, FingerprintError, ValueError) as exc:
        say(f"cannot start: {exc}")
        return JobExit.FAILED
    storage = open_storage(settings)
    store = TaskStore(storage, args.task_id)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    writes = StateWrites(_Log())

    try:
        # A study task sends the series its record names (written before the Job was created).
        parts = StudyStore(storage).load(args.task_id) or ()
        loaded = store.load()
        if loaded is None:
            instances = (tuple(uid for part in parts for uid in part.instances) if parts
                         else _dispatched_instances(storage, key, args.generation))
            state = TaskState(task_id=args.task_id, fingerprint=fingerprint.name,
                              generation=args.generation, updated_at=time.time())
            if not writes.until_done(lambda: store.save(state, instances), f"task {args.task_id}",
                                     stop.is_set, stop.wait):
                return JobExit.RETRY
            what = (", ".join(f"{p.folder} (series {p.key.series_uid})" for p in parts) if parts
                    else f"series {key.series_uid}")
            say(f"task {args.task_id}: {what} (dispatch #{args.generation}, "
                f"{len(instances)} instances), fingerprint {fingerprint.name}, "
                f"model {fingerprint.inference_server.model}")
        else:
            state, instances = loaded
            say(f"task {args.task_id}: resuming from phase {state.phase}")
    except StorageError as exc:
        say(f"storage unavailable: {exc}")
        return JobExit.RETRY

    if state.phase == TaskPhase.SUCCEEDED and not state.remote_delete_pending:
        say("the task already succeeded; nothing to do")
        return JobExit.OK
    if state.phase == TaskPhase.FAILED:
        say(f"the task already failed: {state.message}")
        return JobExit.FAILED

    # The errors of earlier pods of this Job, to which this pod adds its own in every save: the
    # operator counts them from the record (this pod is never scraped).
    earlier_errors = dict(state.errors)

    def save(task: TaskState) -> None:
        task = with_errors(task, earlier_errors, metrics.errors_counted())
        if not writes.until_done(lambda: store.save(task, instances), f"task {args.task_id}",
                                 stop.is_set, stop.wait):
            raise Interrupted()

    runner = TaskRunner(
        storage,
        PipelineSettings.from_settings(settings),
        save=save,
        say=say,
        warn=warn,
        work_root=settings.task_work_root,
        should_stop=stop.is_set,
    )
    spec = TaskSpec(task_id=args.task_id, series=key, generation=args.generation, instance_uids=instances,
                    fingerprint=fingerprint, parts=parts)
    try:
        final = runner.run(spec, state)
    except Interrupted:
        say("stopped; a retried pod resumes from here")
        return JobExit.RETRY
    except NoSpaceForWork as exc:
        say(f"ERROR waiting for disk space: {exc}; a retried pod resumes from here")
        return JobExit.RETRY
    if final.phase == TaskPhase.SUCCEEDED:
        return JobExit.OK
    say(f"failed: {final.message}")
    return JobExit.FAILED


def _dispatched_instances(storage, key: SeriesKey, generation: int) -> tuple[str, ...]:
    """What the operator dispatched; a dispatch recorded before dispatch records existed: what
    storage holds now."""
    dispatch = DispatchStore(storage).load(key, generation)
    if dispatch is not None:
        return dispatch.instances
    return tuple(sorted(
        parsed[1] for info in storage.list(key.prefix)
        if (parsed := parse_instance_key(info.key)) is not None and parsed[0] == key
    ))


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "job",
        help="run one inference task (the entry point of the operator's Jobs)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--task-id", required=True, help="the task's id (also the Job's name)")
    parser.add_argument("--series-uid", required=True, help="SeriesInstanceUID of the series")
    parser.add_argument("--sop-class-uid", required=True, help="SOP Class UID of the series")
    parser.add_argument("--generation", type=int, default=1, help="which dispatch of the series this is")
    parser.set_defaults(func=run_job)
    return parser
