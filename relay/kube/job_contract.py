"""The contract between the operator and an inference Job's pod: what one gives, what the other reports.

The operator (isdr_operator.jobs) builds the Job from these names; the pod (`isdr job`,
relay.kube.job_command) reads them. Neither side spells any of them itself.

Given to the pod:
  * the command line `isdr job` with the task id, the series (SeriesInstanceUID, SOP Class UID)
    and the dispatch generation (job_command_line);
  * FINGERPRINT_ENV: the Fingerprint as it was at dispatch (JSON), so that editing or deleting
    it does not change a task that is already running; FINGERPRINT_CA_ENV: where its CA bundle is
    mounted, if it has one;
  * destination i's TLS files (CA bundle, client certificate) mounted in destination_tls_dir(i),
    named to the pod by the variable destination_tls_env(i), under the file names below.

Reported by the pod:
  * its exit code (JobExit): the Job's podFailurePolicy fails the Job at once on FAILED and
    retries anything else with a new pod;
  * its task record (relay.state_store.TaskStore, under the storage root), written at every step:
    phase, message, the InferenceServer's uid, possible duplicate submits, and the errors the
    pod met by kind (relay.metrics.ERROR_KINDS). The pod itself has no API access and is never
    scraped; the operator reads the record (relay.state_store.read_task) whenever the Job changes,
    and counts from it (relay.kube.resources.task_change says what is new).
"""

from __future__ import annotations

from dataclasses import replace
from enum import IntEnum
from typing import Mapping

from relay.lifecycle import TaskState
from relay.metrics import ERROR_KINDS
from relay.uids import SeriesKey


class JobExit(IntEnum):
    OK = 0  # the predictions reached every destination
    # Anything else: killed, crashed, shut down, storage unavailable. The Job controller starts a
    # new pod, which resumes from the task's record (polling a task the server already accepted).
    RETRY = 1
    # The task failed for good (the InferenceServer said so, a destination refused, a broken
    # fingerprint): the Job fails at once instead of retrying.
    FAILED = 2


CONTAINER = "task"  # the pod's one container (named in the podFailurePolicy)
COMMAND = ["isdr", "job"]

FINGERPRINT_ENV = "ISDR_FINGERPRINT"
FINGERPRINT_CA_ENV = "ISDR_FINGERPRINT_CA_FILE"

DESTINATION_TLS_MOUNT = "/etc/isdr/destination-tls"
DESTINATION_CA_FILE = "ca.pem"
DESTINATION_CLIENT_CERTIFICATE_FILE = "tls.crt"  # the keys of a kubernetes.io/tls Secret
DESTINATION_CLIENT_KEY_FILE = "tls.key"



def destination_tls_dir(index: int) -> str:
    return f"{DESTINATION_TLS_MOUNT}/{index}"


def destination_tls_env(index: int) -> str:
    return f"ISDR_DESTINATION_TLS_DIR_{index}"


def job_command_line(task_id: str, key: SeriesKey, generation: int) -> tuple[list[str], list[str]]:
    """The container's command and args for one task (`isdr job --help` says what they mean)."""
    return list(COMMAND), ["--task-id", task_id, "--series-uid", key.series_uid,
                           "--sop-class-uid", key.sop_class_uid, "--generation", str(generation)]


def with_errors(task: TaskState, before: Mapping[str, int], counted: Mapping[str, int]) -> TaskState:
    """The record `task` carrying the errors of the pods before this one (`before`, from the record
    it resumed) plus those this pod `counted` so far (relay.metrics.errors_counted)."""
    errors = {kind: int(before.get(kind) or 0) + int(counted.get(kind) or 0) for kind in ERROR_KINDS}
    return replace(task, errors={kind: count for kind, count in errors.items() if count})
