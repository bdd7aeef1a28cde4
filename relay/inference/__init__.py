"""InferenceServer client (protocols v1 and v2), input archives, safe extraction, and polling.

    client.py    make_client, submit_with_retry (and the shared names below)
    base.py      settings, errors, poll results, uid and message rules
    http.py      the HTTP transport shared by v1.py and v2.py
    archives.py  build_input_archive, safe_extract, find_dicom_files
    polling.py   wait_for_outputs and its PollPolicy
"""

from .archives import ArchiveRejected, ExtractResult, build_input_archive, find_dicom_files, safe_extract
from .base import (
    ClientSettings,
    InferenceClient,
    InferenceError,
    PollResult,
    ServerUnavailable,
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
