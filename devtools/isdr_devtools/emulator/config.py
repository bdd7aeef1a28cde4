"""The emulator's settings (what the command line fills in)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_MAX_UPLOAD_BYTES = 4 * 1024**3
DEFAULT_BOMB_BYTES = 64 * 1024**2


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
    bomb_bytes: int = DEFAULT_BOMB_BYTES  # expanded size of the evil-bomb entry

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
