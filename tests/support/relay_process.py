"""`isdr run` as a real process for the end-to-end tests: start it, kill it, start it again."""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

import yaml

from tests.support.processes import ManagedProcess, free_port, wait_for_port

FAST_TIMING = {
    "POST_AFTER": "1",
    "POST_INTERVAL": "0.2",
    "GET_INTERVAL": "0.2",
    "NOT_FOUND_GRACE": "10",
    "DELIVERY_TIMEOUT": "60",
    "POST_TIMEOUT": "10",
    "LOG_LEVEL": "INFO",
}


class RelayProcess:
    def __init__(self, workdir: Path, env: dict[str, str] | None = None, ae_title: str = "ISDR"):
        self.workdir = Path(workdir)
        self.data_dir = self.workdir / "relay-data"
        self.fingerprint_dir = self.workdir / "fingerprints"
        self.fingerprint_dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.ae_title = ae_title
        self.env = {
            **os.environ,
            **FAST_TIMING,
            "INCOMING_DIR": str(self.data_dir),
            "FINGERPRINT_DIR": str(self.fingerprint_dir),
            "SCP_HOSTNAME": "127.0.0.1",
            "SCP_PORT": str(self.port),
            "SCP_AE_TITLE": ae_title,
            **(env or {}),
        }
        self.process: ManagedProcess | None = None
        self.starts = 0

    @property
    def log_path(self) -> Path:
        return self.workdir / "relay.log"

    def add_seed_fingerprint(self, name: str, seed: dict) -> Path:
        path = self.fingerprint_dir / f"{name}.json"
        path.write_text(json.dumps(seed, indent=2))
        return path

    def add_manifest(self, manifest: dict) -> Path:
        path = self.fingerprint_dir / f"{manifest['metadata']['name']}.yaml"
        path.write_text(yaml.safe_dump(manifest, sort_keys=False))
        return path

    def start(self) -> "RelayProcess":
        self.starts += 1
        self.process = ManagedProcess([sys.executable, "-m", "relay.cli", "run"], self.log_path, env=self.env)
        wait_for_port(self.port, timeout=30, process=self.process.popen)
        return self

    def kill(self) -> None:
        """SIGKILL: no clean-up code runs, as in a crash or an OOM kill."""
        if self.process is not None:
            self.process.kill()
            self.process.stop()
            self.process = None

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
            self.process = None

    def restart(self) -> "RelayProcess":
        self.kill()
        return self.start()

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_for_log(self, pattern: str, timeout: float = 60.0, count: int = 1) -> str:
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log()
            if len(regex.findall(text)) >= count:
                return text
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(f"relay exited with {self.process.returncode}:\n{text[-4000:]}")
            time.sleep(0.1)
        raise AssertionError(f"relay log never showed {pattern!r} x{count}:\n{self.log()[-6000:]}")

    def stored_instances(self) -> list[Path]:
        # os.walk, unlike rglob, shrugs off folders that the relay removes while we look.
        found = []
        for folder, _dirs, files in os.walk(self.data_dir / "series"):
            found.extend(Path(folder) / name for name in files if name.endswith(".dcm"))
        return sorted(found)

    def state_documents(self) -> list[dict]:
        root = self.data_dir / "state" / "series"
        return [json.loads(p.read_text()) for p in sorted(root.glob("*.json"))] if root.exists() else []
