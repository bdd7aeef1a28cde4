"""A small HTTP endpoint of a long-running process (metrics, readiness), served by a thread."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any


@dataclass
class HttpEndpoint:
    """A running HTTP server and its thread; stop() closes it."""

    server: Any
    thread: threading.Thread

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)
