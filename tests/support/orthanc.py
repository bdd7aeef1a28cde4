"""Orthanc (the Debian package) as a real DICOM peer: a destination that the relay delivers to,
and a sender whose REST API makes it C-STORE to the relay.

One launcher for every test that needs Orthanc. Each instance gets its own configuration file,
its own storage folder under the test's tmp_path, and ports chosen free, so tests run in
parallel with other helpers' tests. No plugins are loaded (the Debian configuration would load
every plugin in /usr/share/orthanc/plugins), and its REST API listens on 127.0.0.1 only.

    orthanc = Orthanc(tmp_path / "orthanc", ae_title="ORTHANC").start()
    orthanc.wait_for_instance(sop_instance_uid)                       # as a destination
    orthanc = Orthanc(tmp_path / "o", modalities={"relay": ("ISDR", "127.0.0.1", relay.port)})
    orthanc.upload(path); orthanc.store_to("relay", orthanc.instance_ids())   # as a sender
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

import requests

from tests.support.processes import ManagedProcess, free_port, missing, wait_for_port

BINARY = "Orthanc"  # /usr/sbin/Orthanc from the Debian package `orthanc`


def require_orthanc() -> str:
    """The Orthanc server binary; skipped locally, failed under CI=true, when it is missing."""
    path = shutil.which(BINARY) or shutil.which(BINARY, path="/usr/sbin")
    if path is None:
        missing("Orthanc (Debian package orthanc)")
    return path


class Orthanc:
    """One Orthanc server, configured for a test.

    ae_title:     Orthanc's own AE title (DicomAet); the called AE title is checked, so a
                  peer that calls it by another name is refused, like a strict PACS.
    dicom_port:   its DICOM port (default: a free one).
    modalities:   name -> (AE title, host, port): the peers it may C-STORE to (DicomModalities).
    accepted_transfer_syntaxes: what its SCP accepts (default: Orthanc's own default, every
                  standard syntax); e.g. ["1.2.840.10008.1.2"] for implicit VR little endian only.
    config:       further configuration keys, merged last.
    """

    def __init__(self, folder: Path, ae_title: str = "ORTHANC", dicom_port: int | None = None,
                 modalities: Mapping[str, tuple[str, str, int]] | None = None,
                 accepted_transfer_syntaxes: Iterable[str] | None = None,
                 config: Mapping[str, Any] | None = None):
        self.folder = Path(folder)
        self.ae_title = ae_title
        self.port = dicom_port or free_port()  # the DICOM port, named like StoreSCP.port
        self.http_port = free_port()
        self.modalities = dict(modalities or {})
        self.accepted_transfer_syntaxes = list(accepted_transfer_syntaxes or [])
        self.extra_config = dict(config or {})
        self.process: ManagedProcess | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def log_path(self) -> Path:
        return self.folder / "orthanc.log"

    def configuration(self) -> dict[str, Any]:
        storage = self.folder / "storage"
        config: dict[str, Any] = {
            "Name": f"isdr-test-{self.ae_title}",
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "Plugins": [],
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "HttpDescribeErrors": True,
            "DicomServerEnabled": True,
            "DicomAet": self.ae_title,
            "DicomPort": self.port,
            "DicomCheckCalledAet": True,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "DicomModalities": {name: list(peer) for name, peer in self.modalities.items()},
            "DicomScuTimeout": 30,
            "ConcurrentJobs": 1,
            "SaveJobs": False,
            "StorageCompression": False,
        }
        if self.accepted_transfer_syntaxes:
            config["AcceptedTransferSyntaxes"] = self.accepted_transfer_syntaxes
        config.update(self.extra_config)
        return config

    def start(self, timeout: float = 60.0) -> "Orthanc":
        binary = require_orthanc()
        self.folder.mkdir(parents=True, exist_ok=True)
        config_path = self.folder / "orthanc.json"
        config_path.write_text(json.dumps(self.configuration(), indent=2))
        self.process = ManagedProcess([binary, "--verbose", str(config_path)], self.log_path, cwd=self.folder)
        wait_for_port(self.http_port, timeout=timeout, process=self.process.popen)
        wait_for_port(self.port, timeout=timeout, process=self.process.popen)
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
            self.process = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # --- REST API -----------------------------------------------------------------------------

    def get(self, path: str) -> Any:
        response = requests.get(self.url + path, timeout=30)
        response.raise_for_status()
        return response.json()

    def post(self, path: str, body: Any) -> Any:
        data = body if isinstance(body, bytes) else json.dumps(body)
        response = requests.post(self.url + path, data=data, timeout=120)
        response.raise_for_status()
        return response.json()

    def instance_ids(self) -> list[str]:
        """Orthanc's ids of every stored instance."""
        return self.get("/instances")

    def find_instance(self, sop_instance_uid: str) -> str | None:
        """Orthanc's id of the instance with this SOP Instance UID, or None."""
        found = self.post("/tools/find", {"Level": "Instance", "Query": {"SOPInstanceUID": sop_instance_uid}})
        return found[0] if found else None

    def tags(self, instance_id: str) -> dict[str, Any]:
        """The instance's tags by keyword (Orthanc's `simplified-tags`)."""
        return self.get(f"/instances/{instance_id}/simplified-tags")

    def metadata(self, instance_id: str) -> dict[str, Any]:
        """What Orthanc recorded about how it got the instance (TransferSyntax, RemoteAET, ...)."""
        return self.get(f"/instances/{instance_id}/metadata?expand")

    def file(self, instance_id: str) -> bytes:
        response = requests.get(f"{self.url}/instances/{instance_id}/file", timeout=60)
        response.raise_for_status()
        return response.content

    def wait_for_instance(self, sop_instance_uid: str, timeout: float = 60.0) -> str:
        """Orthanc's id of the instance once it has arrived; TimeoutError otherwise."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.find_instance(sop_instance_uid)
            if found:
                return found
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited:\n{self.log()[-4000:]}")
            time.sleep(0.2)
        raise TimeoutError(f"Orthanc {self.ae_title} never received instance {sop_instance_uid}")

    def wait_for_instances(self, count: int, timeout: float = 60.0) -> list[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ids = self.instance_ids()
            if len(ids) >= count:
                return ids
            time.sleep(0.2)
        raise TimeoutError(f"Orthanc {self.ae_title} holds {len(self.instance_ids())} instances, expected {count}")

    def upload(self, path: Path) -> str:
        """Store a DICOM file through the REST API (no DICOM involved); its Orthanc id."""
        return self.post("/instances", Path(path).read_bytes())["ID"]

    def store_to(self, modality: str, resources: Iterable[str], timeout: float = 120.0) -> Any:
        """C-STORE the given instances (or series, studies) to a configured modality, synchronously."""
        return self.post(f"/modalities/{modality}/store",
                         {"Resources": list(resources), "Synchronous": True, "Timeout": int(timeout)})

    def echo(self, modality: str) -> bool:
        response = requests.post(f"{self.url}/modalities/{modality}/echo", data="{}", timeout=60)
        return response.ok
