"""InferenceServer client (protocols v1 and v2), input archives, safe extraction, and polling.

    client.py    make_client, submit_with_retry (and the shared names below)
    base.py      settings, errors, poll results, uid and message rules
    http.py      the HTTP transport shared by v1.py and v2.py
    deadline.py  a total deadline for one HTTP request (used by http.py)
    archives.py  build_input_archive, safe_extract, find_dicom_files
    polling.py   wait_for_outputs and its PollPolicy

The exception tree:

    InferenceError
      TaskFailed             the task will not produce outputs (permanent)
      SubmitRejected         the server refused the submit; retrying cannot help
      ServerUnavailable      transient: down, 5xx, timeouts (`maybe_accepted`: did it get there?)
        SubmitOutcomeUnknown   a submit that may have created a task: never repeated here
        TlsVerificationFailed  the certificate did not verify (check CERT_FILE)
      InvalidTaskUid         a uid outside the real alphabet
      ArchiveRejected        an output archive that cannot be used as a whole
      WaitStopped            asked to stop polling; the task can be resumed
"""

from .archives import ArchiveRejected, ExtractResult, build_input_archive, find_dicom_files, safe_extract
from .base import (
    ClientSettings,
    InferenceClient,
    InferenceError,
    PollResult,
    ServerUnavailable,
    SubmitOutcomeUnknown,
    SubmitRejected,
    TaskFailed,
)
from .client import make_client, submit_with_retry
from .polling import PollPolicy, WaitStopped, wait_for_outputs

__all__ = [
    "ArchiveRejected",
    "ClientSettings",
    "ExtractResult",
    "InferenceClient",
    "InferenceError",
    "PollPolicy",
    "PollResult",
    "ServerUnavailable",
    "SubmitOutcomeUnknown",
    "SubmitRejected",
    "TaskFailed",
    "WaitStopped",
    "build_input_archive",
    "find_dicom_files",
    "make_client",
    "safe_extract",
    "submit_with_retry",
    "wait_for_outputs",
]
