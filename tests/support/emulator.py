"""Run the InferenceServer emulator as a real process in tests.

    with EmulatorProcess(tmp_path, tls=True, delay=0.3) as emulator:
        requests.post(emulator.v1_tasks_url, params=..., files=..., verify=emulator.ca_file)
        emulator.kill()      # the server is down (SIGKILL, like a crash)
        emulator.restart()   # back on the same port, with the same tasks and the same CA
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import requests

from tests.support.processes import ManagedProcess, wait_for_port

REPO_ROOT = Path(__file__).resolve().parents[2]


class EmulatorProcess:
    """`python -m isdr_devtools.emulator` in a child process, with its files under `tmp_path`/name."""

    def __init__(
        self,
        tmp_path: Path,
        tls: bool = False,
        delay: float = 0.3,
        v1_register_delay: float = 0.5,
        extra_args: list[str] | tuple[str, ...] = (),
        name: str = "emulator",
        start: bool = True,
        startup_timeout: float = 30.0,
    ):
        self.workdir = Path(tmp_path) / name
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.tls = tls
        self.delay = delay
        self.v1_register_delay = v1_register_delay
        self.extra_args = list(extra_args)
        self.startup_timeout = startup_timeout
        self.data_dir = self.workdir / "data"
        self.tls_dir = self.workdir / "tls"
        self.port_file = self.workdir / "port"
        self.log_path = self.workdir / "emulator.log"
        self.port: int | None = None
        self.process: ManagedProcess | None = None
        if start:
            self.start()

    # --- addresses ---

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    @property
    def base_url(self) -> str:
        """The v2 base URL (also where /_emulator/ lives)."""
        return f"{self.scheme}://127.0.0.1:{self.port}"

    @property
    def v1_tasks_url(self) -> str:
        return f"{self.base_url}/api/tasks/"

    @property
    def ca_file(self) -> Path | None:
        return self.tls_dir / "ca.pem" if self.tls else None

    @property
    def verify(self):
        """What to pass as requests' `verify=`: the emulator's CA under TLS."""
        return str(self.ca_file) if self.tls else True

    # --- process control ---

    def _args(self, port: int) -> list[str]:
        args = [
            sys.executable,
            "-m",
            "isdr_devtools.emulator",
            "--port",
            str(port),
            "--port-file",
            str(self.port_file),
            "--data-dir",
            str(self.data_dir),
            "--delay",
            str(self.delay),
            "--v1-register-delay",
            str(self.v1_register_delay),
        ]
        if self.tls:
            args += ["--tls-dir", str(self.tls_dir)]
        return args + self.extra_args

    def start(self) -> "EmulatorProcess":
        """Start (first time: on a free port chosen by the emulator; later: on the same port)."""
        if self.process is not None:
            if self.process.poll() is None:
                raise RuntimeError("the emulator is already running")
            self.process.stop()  # already dead: this only closes its log file
        self.port_file.unlink(missing_ok=True)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        self.process = ManagedProcess(self._args(self.port or 0), self.log_path, env=env, cwd=REPO_ROOT)
        self.port = self._wait_for_port_file()
        wait_for_port(self.port, timeout=self.startup_timeout, process=self.process.popen)
        return self

    def _wait_for_port_file(self) -> int:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"the emulator exited with {self.process.returncode}:\n{self.output()[-4000:]}"
                )
            try:
                text = self.port_file.read_text().strip()
            except FileNotFoundError:
                text = ""
            if text:
                return int(text)
            time.sleep(0.05)
        raise TimeoutError(f"the emulator wrote no port file in {self.startup_timeout}s:\n{self.output()[-4000:]}")

    def kill(self) -> None:
        """SIGKILL: the server vanishes mid-whatever, like a crash."""
        if self.process is not None:
            self.process.kill()

    def stop(self) -> None:
        """SIGTERM and wait (a clean shutdown)."""
        if self.process is not None:
            self.process.stop()

    def restart(self) -> "EmulatorProcess":
        """Stop if running, then start again on the same port with the same data and CA."""
        if self.process is not None and self.process.poll() is None:
            self.stop()
        return self.start()

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # --- inspection ---

    def stats(self) -> dict:
        response = requests.get(f"{self.base_url}/_emulator/stats", verify=self.verify, timeout=10)
        response.raise_for_status()
        return response.json()

    def reset(self) -> None:
        response = requests.post(f"{self.base_url}/_emulator/reset", verify=self.verify, timeout=10)
        response.raise_for_status()

    def __enter__(self) -> "EmulatorProcess":
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()
