"""dcmtk programs as the relay's real DICOM peers: storescu/echoscu send, storescp receives."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pydicom

from tests.support.processes import ManagedProcess, dcmtk_env, free_port, require_dcmtk, wait_for_port


def storescu(port: int, files, called_ae: str = "ISDR", calling_ae: str = "SCANNER",
             timeout: float = 120.0, host: str = "127.0.0.1") -> subprocess.CompletedProcess:
    """Send files with dcmtk's storescu; returns the finished process (stdout+stderr in .stdout)."""
    binary = require_dcmtk("storescu")
    args = [binary, "-aet", calling_ae, "-aec", called_ae, "--propose-lossless",
            host, str(port), *map(str, files)]
    return subprocess.run(args, env=dcmtk_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=timeout)


def echoscu(port: int, called_ae: str = "ISDR", calling_ae: str = "SCANNER") -> subprocess.CompletedProcess:
    binary = require_dcmtk("echoscu")
    return subprocess.run([binary, "-aet", calling_ae, "-aec", called_ae, "127.0.0.1", str(port)],
                          env=dcmtk_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=60)


class StoreSCP:
    """dcmtk's storescp as a destination (a PACS stand-in) writing into a folder.

    tls=(certificate, key) makes it speak DICOM over TLS only; client_cas are the CA files it
    verifies client certificates against, and it then requires one (mutual TLS)."""

    def __init__(self, folder: Path, ae_title: str = "PACS", port: int | None = None, options=(),
                 tls: tuple[Path, Path] | None = None, client_cas=()):
        self.options = list(options)  # extra storescp flags, e.g. +xi (implicit VR only)
        self.tls = tls
        self.client_cas = list(client_cas)
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.ae_title = ae_title
        self.port = port or free_port()
        self.process: ManagedProcess | None = None

    def start(self) -> "StoreSCP":
        binary = require_dcmtk("storescp")
        self.process = ManagedProcess(
            [binary, "-aet", self.ae_title, "--output-directory", str(self.folder),
             *(self.options or ["--accept-all"]), *self._tls_options(), str(self.port)],
            self.folder.parent / f"storescp-{self.port}.log",
            env=dcmtk_env(),
        )
        try:
            wait_for_port(self.port, process=self.process.popen)
        except RuntimeError as exc:
            raise RuntimeError(f"storescp: {exc}: {self.log()[-500:]}") from None
        return self

    def _tls_options(self) -> list[str]:
        if self.tls is None:
            return []
        certificate, key = self.tls
        options = ["+tls", str(key), str(certificate)]
        if not self.client_cas:
            return options + ["--ignore-peer-cert"]
        return options + ["--require-peer-cert"] + [arg for ca in self.client_cas for arg in ("+cf", str(ca))]

    def log(self) -> str:
        return self.process.output() if self.process is not None else ""

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
            self.process = None

    def files(self) -> list[Path]:
        return sorted(p for p in self.folder.rglob("*") if p.is_file())

    def datasets(self) -> list[pydicom.Dataset]:
        return [pydicom.dcmread(p) for p in self.files()]

    def wait_for_files(self, count: int, timeout: float = 60.0) -> list[Path]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            files = self.files()
            if len(files) >= count:
                time.sleep(0.2)  # let storescp finish writing the last one
                return self.files()
            time.sleep(0.1)
        raise TimeoutError(f"{self.ae_title} received {len(self.files())} files, expected {count}")
