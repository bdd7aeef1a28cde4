"""The emulator's settings (what the command line fills in)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

DEFAULT_MAX_UPLOAD_BYTES = 4 * 1024**3
DEFAULT_BOMB_BYTES = 64 * 1024**2
DEFAULT_DRIP_RATE = 64.0
UID_LENGTH = 43  # len(secrets.token_urlsafe()): 32 random bytes in URL-safe base64
_UID_ALPHABET = re.compile(r"[A-Za-z0-9_-]*")


@dataclass
class EmulatorConfig:
    host: str = "127.0.0.1"
    port: int = 8000  # 0: any free port (see port_file)
    port_file: Path | None = None  # the bound port is written here once listening
    tls_dir: Path | None = None  # HTTPS with a CA generated here; None: plain HTTP
    tls_names: list[str] = field(default_factory=list)  # extra names for the server certificate
    delay: float = 2.0  # seconds a task stays pending/running
    v1_register_delay: float = 1.0  # seconds a v1 task answers 554 after its submit
    data_dir: Path | None = None  # None: a temporary folder, removed on exit
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES
    fail_submits: int = 0  # the first N submits answer 500
    bomb_bytes: int = DEFAULT_BOMB_BYTES  # expanded size of the evil-bomb entry and the gzip-bomb body
    uid_prefix: str = ""  # every new task uid starts with this (e.g. '-'); "": random, as the real server
    queue_down_for: float = 0.0  # v2: the queue is down this long after start (or a reset)
    redirect_polls_to: str | None = None  # every poll answers 302 to this base URL + the same path
    drip_rate: float = DEFAULT_DRIP_RATE  # bytes per second of the drip model's download

    def validate(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port {self.port} is out of range")
        for name in ("delay", "v1_register_delay"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name.replace('_', '-')} must not be negative")
        if self.max_upload_bytes < 1:
            raise ValueError("max-upload-bytes must be positive")
        if self.fail_submits < 0:
            raise ValueError("fail-submits must not be negative")
        if self.bomb_bytes < 0:
            raise ValueError("bomb-bytes must not be negative")
        if len(self.uid_prefix) >= UID_LENGTH or not _UID_ALPHABET.fullmatch(self.uid_prefix):
            raise ValueError(f"uid-prefix must be fewer than {UID_LENGTH} characters of A-Z a-z 0-9 - _")
        if self.queue_down_for < 0:
            raise ValueError("queue-down-for must not be negative")
        if self.redirect_polls_to is not None:
            parts = urlsplit(self.redirect_polls_to)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                raise ValueError("redirect-polls-to must be an http(s) URL")
        if self.drip_rate <= 0:
            raise ValueError("drip-rate must be positive")
