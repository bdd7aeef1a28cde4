"""Protocol v2: the fingerprint carries the server's base URL; tar archives; the uid is a query
parameter.

    submit  POST   <base>/api/tasks/?human_readable_id=<model>   file field tar_file  -> {"uid": ...}
    poll    GET    <base>/api/tasks/outputs/?uid=<uid>
    delete  DELETE <base>/api/tasks/?uid=<uid>

The 2.0 server answers 500 where a clean API would say "not found": to a poll of an unknown or
deleted uid (the poll state 'gone': the task failed once such answers last NOT_FOUND_GRACE), and
to a submit for an unknown model (retried a few times only, see submit_with_retry).
"""

from __future__ import annotations

import logging
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from .base import ClientSettings, PollResult, redact_url, task_file_name, validate_uid
from .http import HttpTransport, PooledClient

log = logging.getLogger(__name__)

_TASKS_PATH = "/api/tasks"
_POLL_MEANINGS = {500: ("gone", "InferenceServer 2.0 answers 500 for a task it does not know")}


def normalize_base_url(url: str) -> str:
    """The base URL without a trailing '/', so that '/api/...' can be appended.

    Appending (not urljoin with an absolute path) keeps a path prefix: a server published at
    https://h/inference answers at https://h/inference/api/tasks/. A URL that ends in
    /api/tasks/ (which the original v2 relay accepted: it ignored any path) means the base URL
    before it.
    """
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"not an http(s) URL: {url!r}")
    if parts.query or parts.fragment:
        raise ValueError(f"the v2 base URL must not have a query or fragment: {url!r}")
    path = parts.path.rstrip("/")
    if path.endswith(_TASKS_PATH):
        path = path[: -len(_TASKS_PATH)]
    return urlunsplit((parts.scheme, parts.netloc, path, "", ""))


class V2Client(PooledClient):
    protocol = "v2"

    def __init__(self, base_url: str, settings: ClientSettings, download_dir: Path):
        self.base_url = self.url = normalize_base_url(base_url)
        if urlsplit(base_url.strip()).path.rstrip("/").endswith(_TASKS_PATH):
            log.warning("the v2 base URL %s ends in %s/; using %s as the base URL, as the original v2 "
                        "relay did (put the base URL in the fingerprint to silence this)",
                        redact_url(base_url.strip()), _TASKS_PATH, redact_url(self.base_url))
        self.tasks_url = self.base_url + _TASKS_PATH + "/"
        self.outputs_url = self.tasks_url + "outputs/"
        self.download_dir = Path(download_dir)
        self.http = HttpTransport(settings)

    def archive_format(self) -> str:
        return "tar"

    def submit(self, archive_path: Path, model: str) -> str:
        # An unknown model answers 500 (no task is created): there is no "model not found" code.
        return self.http.submit(
            self.tasks_url,
            {"human_readable_id": model},
            "tar_file",
            Path(archive_path),
            "application/x-tar",
            rejected={},
        )

    def poll(self, uid: str, time_limit: float | None = None) -> PollResult:
        return self.http.poll(self.outputs_url, {"uid": validate_uid(uid)},
                              self.download_dir / task_file_name(uid, ".tar"), time_limit, _POLL_MEANINGS)

    def delete(self, uid: str) -> None:
        self.http.delete(self.tasks_url, {"uid": validate_uid(uid)})
