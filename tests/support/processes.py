"""Helpers for tests that run real programs: find them, give them ports, start and stop them.

Under CI (CI=true) a missing real component is a failure, never a silent skip: the project's
own set-up (`make test`) is meant to install everything the tests need.
"""

from __future__ import annotations

import functools
import os
import random
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Callable

import pytest


def under_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def missing(what: str) -> None:
    """Skip locally, fail under CI, when a real component the test needs is not installed."""
    message = f"{what} is not available (run `make setup` to install it)"
    if under_ci():
        pytest.fail(message)
    pytest.skip(message)


def require_binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        missing(f"the program {name!r}")
    return path


@functools.lru_cache(maxsize=None)
def find_dcmtk(name: str) -> str | None:
    # pynetdicom installs console scripts called storescu/storescp/echoscu too, and a virtual
    # environment's bin folder usually comes first on PATH: take the first one that is dcmtk's.
    for folder in os.environ.get("PATH", "").split(os.pathsep) + ["/usr/bin", "/usr/local/bin"]:
        candidate = Path(folder) / name
        if not (candidate.is_file() and os.access(candidate, os.X_OK)):
            continue
        try:
            version = subprocess.run([str(candidate), "--version"], capture_output=True, text=True,
                                     timeout=10).stdout
        except (OSError, subprocess.TimeoutExpired):
            continue
        if "dcmtk" in version.lower():
            return str(candidate)
    return None


def require_dcmtk(name: str) -> str:
    """The path of dcmtk's `name` (storescu, storescp, echoscu, dcmdump)."""
    path = find_dcmtk(name)
    if path is None:
        missing(f"dcmtk's {name!r} (Debian package dcmtk)")
    return path


def _ephemeral_ports() -> tuple[int, int]:
    try:
        low, high = (int(n) for n in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999


def free_port() -> int:
    """A port free to listen on now, chosen below the kernel's ephemeral range: a port the kernel
    handed out (bind to 0) is also what it gives the next outgoing connection of any process, and
    the suite makes many (relay to PACS, API clients); one took a PACS's port between this choice
    and storescp's bind now and then."""
    low, _high = _ephemeral_ports()
    candidates = range(max(1024, low - 12000), low)
    for _attempt in range(50):
        port = random.choice(candidates)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("0.0.0.0", port))
                return port
            except OSError:
                continue
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, host: str = "127.0.0.1", timeout: float = 20.0, process=None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode} before listening on {port}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout}s")


def dcmtk_env() -> dict[str, str]:
    """dcmtk keeps Nagle's algorithm on unless told otherwise; every C-STORE would wait ~40 ms."""
    env = dict(os.environ)
    env["TCP_NODELAY"] = "1"
    return env


class ManagedProcess:
    """A child process with its output in a log file, stopped (and its group killed) on close."""

    def __init__(self, args: list[str], log_path: Path, env: dict[str, str] | None = None, cwd=None):
        self.args = args
        self.log_path = Path(log_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")
        self.popen = subprocess.Popen(
            args,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def poll(self):
        return self.popen.poll()

    @property
    def returncode(self):
        return self.popen.returncode

    def kill(self) -> None:
        """SIGKILL the whole process group: the way a crash or an OOM kill looks."""
        if self.popen.poll() is None:
            try:
                os.killpg(self.popen.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.popen.wait(timeout=10)

    def stop(self, timeout: float = 10.0) -> None:
        if self.popen.poll() is None:
            try:
                os.killpg(self.popen.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log.close()

    def output(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")


def wait_until(predicate: Callable[[], object], timeout: float = 30.0, what: str = "condition",
               interval: float = 0.2):
    """Poll until predicate() returns something truthy and return it; raise TimeoutError with `what`."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        try:
            result = predicate()
            if result:
                return result
        except Exception as exc:  # noqa: BLE001 - reported on timeout
            last_error = exc
        if time.monotonic() >= deadline:
            detail = f" (last error: {last_error!r})" if last_error else ""
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}{detail}")
        time.sleep(interval)
