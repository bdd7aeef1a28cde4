"""Protocol v1: the fingerprint carries the tasks URL; zip archives; the task uid is a URL segment.

    submit  POST <tasks-url>?model_human_readable_id=<model>   file field zip_file   -> "uid"
    poll    GET    <tasks-url><uid>
    delete  DELETE <tasks-url><uid>

The v1.2 server deletes a task and then answers every DELETE with 500 (a bug of that release):
a 500 is checked with a poll, and a task that polls as 554 (not found) counts as deleted.
"""

from __future__ import annotations

import logging
from pathlib import Path
from urllib.parse import urljoin, urlsplit, urlunsplit

from .base import ClientSettings, PollResult, ServerUnavailable, redact_url, task_file_name, validate_uid
from .http import HttpTransport, PooledClient

log = logging.getLogger(__name__)


def normalize_tasks_url(url: str) -> str:
    """The tasks URL with a trailing '/' on its path.

    urljoin replaces the last path segment unless the base ends with '/':
    urljoin('https://h/api/tasks', 'abc') is 'https://h/api/abc', not '.../tasks/abc'. The
    original relay's configuration always had the slash; a user who leaves it off still means
    the tasks collection, so it is added rather than silently polling the wrong URL.
    """
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"not an http(s) URL: {url!r}")
    path = parts.path if parts.path.endswith("/") else parts.path + "/"
    return urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))


class V1Client(PooledClient):
    protocol = "v1"

    def __init__(self, tasks_url: str, settings: ClientSettings, download_dir: Path):
        self.tasks_url = self.url = normalize_tasks_url(tasks_url)
        self.download_dir = Path(download_dir)
        self.http = HttpTransport(settings)

    def archive_format(self) -> str:
        return "zip"

    def task_url(self, uid: str) -> str:
        # A valid uid has no '/', '?', '#' or '.', so the join stays below the tasks URL; a
        # leading '-' or '_' is an ordinary character of a path segment.
        return urljoin(self.tasks_url, validate_uid(uid))

    def submit(self, archive_path: Path, model: str) -> str:
        return self.http.submit(
            self.tasks_url,
            {"model_human_readable_id": model},
            "zip_file",
            Path(archive_path),
            "application/zip",
            rejected={550: f"model {model!r} not found"},
        )

    def poll(self, uid: str, time_limit: float | None = None) -> PollResult:
        return self.http.poll(self.task_url(uid), None, self.download_dir / task_file_name(uid, ".zip"), time_limit)

    def delete(self, uid: str) -> None:
        url = self.task_url(uid)
        try:
            self.http.delete(url, None)
        except ServerUnavailable as exc:
            if exc.status_code != 500:
                raise
            status = self.http.answer_status(url, None)
            if status != 554:
                raise ServerUnavailable(f"{exc}; the task is still there (GET answered HTTP {status})", 500) from exc
            log.info("DELETE %s answered HTTP 500, as every v1.2 delete does; the task is gone "
                     "(GET answers 554)", redact_url(url))
