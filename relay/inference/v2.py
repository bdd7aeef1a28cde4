"""Protocol v2: the fingerprint carries the server's base URL; tar archives; the uid is a query
parameter.

    submit  POST   <base>/api/tasks/?human_readable_id=<model>   file field tar_file  -> {"uid": ...}
    poll    GET    <base>/api/tasks/outputs/?uid=<uid>
    delete  DELETE <base>/api/tasks/?uid=<uid>
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from .base import ClientSettings, PollResult, validate_uid
from .http import HttpTransport, PooledClient


def normalize_base_url(url: str) -> str:
    """The base URL without a trailing '/', so that '/api/...' can be appended.

    Appending (not urljoin with an absolute path) keeps a path prefix: a server published at
    https://h/inference answers at https://h/inference/api/tasks/.
    """
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"not an http(s) URL: {url!r}")
    if parts.query or parts.fragment:
        raise ValueError(f"the v2 base URL must not have a query or fragment: {url!r}")
    return urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/"), "", ""))


class V2Client(PooledClient):
    protocol = "v2"

    def __init__(self, base_url: str, settings: ClientSettings, download_dir: Path):
        self.base_url = normalize_base_url(base_url)
        self.tasks_url = self.base_url + "/api/tasks/"
        self.outputs_url = self.base_url + "/api/tasks/outputs/"
        self.download_dir = Path(download_dir)
        self.http = HttpTransport(settings)

    def archive_format(self) -> str:
        return "tar"

    def submit(self, archive_path: Path, model: str) -> str:
        return self.http.submit(
            self.tasks_url,
            {"human_readable_id": model},
            "tar_file",
            Path(archive_path),
            "application/x-tar",
            rejected={554: f"task could not be stored; is model {model!r} known?"},
        )

    def poll(self, uid: str) -> PollResult:
        uid = validate_uid(uid)
        return self.http.poll(self.outputs_url, {"uid": uid}, self.download_dir / f"{uid}.tar")

    def delete(self, uid: str) -> None:
        self.http.delete(self.tasks_url, {"uid": validate_uid(uid)})
