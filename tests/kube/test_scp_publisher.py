"""`isdr scp` against a real API server: real DICOM (dcmtk's storescu), real storage, the real
DicomSeries CRD. The receiver runs as a local process with a kubeconfig, as it would in a pod."""

from __future__ import annotations

import json
import os
import re
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import pydicom
import pytest
import yaml

from relay.kube.resources import GROUP, VERSION, from_rfc3339, resource_name
from relay.kube.resources import SERIES_PLURAL as PLURAL
from isdr_devtools.synthetic import write_ct_series
from relay.uids import SeriesKey
from tests.support.dicom_peers import storescu
from tests.support.kube import REPO_ROOT, wait_until
from tests.support.processes import ManagedProcess, free_port, require_dcmtk, wait_for_port
from tests.support.tcp_proxy import TcpProxy

pytestmark = pytest.mark.kube

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
# Distinctive, so that finding them anywhere is certainly a leak.
PATIENT_NAME = "Quuxington^Zebediah"
PATIENT_ID = "PID-83920471"
PATIENT_MARKERS = ("Quuxington", "Zebediah", "83920471")


@pytest.fixture(autouse=True)
def _dcmtk():
    require_dcmtk("storescu")


class Scp:
    """One `isdr scp` process."""

    def __init__(self, kubeconfig: Path, namespace: str, incoming: Path, pod_name: str, log_dir: Path,
                 extra_env: dict | None = None, args: tuple = ()):
        self.port = free_port()
        self.pod_name = pod_name
        self.incoming = incoming
        env = dict(os.environ)
        for name in ("KUBERNETES_SERVICE_HOST", "POD_NAMESPACE", "STORAGE", "S3_BUCKET"):
            env.pop(name, None)
        env.update({
            "KUBECONFIG": str(kubeconfig),
            "SCP_PORT": str(self.port),
            "SCP_AE_TITLE": "ISDR",
            "INCOMING_DIR": str(incoming),
            "POD_NAME": pod_name,
            "LOG_LEVEL": "DEBUG",  # debug lines too must be free of patient data
            **(extra_env or {}),
        })
        self.process = ManagedProcess([sys.executable, "-m", "relay.cli", "scp", "--namespace", namespace, *args],
                                      log_dir / f"scp-{pod_name}.log", env=env, cwd=REPO_ROOT)
        wait_for_port(self.port, process=self.process.popen, timeout=60)

    def send(self, files, calling_ae: str = "SCANNER"):
        result = storescu(self.port, files, called_ae="ISDR", calling_ae=calling_ae)
        assert result.returncode == 0, result.stdout
        return result

    def stop(self) -> int | None:
        self.process.stop(timeout=30)
        return self.process.returncode

    def output(self) -> str:
        if not self.process._log.closed:
            self.process._log.flush()
        return self.process.log_path.read_text(errors="replace")


@pytest.fixture
def start_scp(kube_cluster, kube_namespace, tmp_path):
    started: list[Scp] = []

    def start(pod_name: str = "receiver-a", incoming: Path | None = None, kubeconfig: Path | None = None,
              args: tuple = (), **extra_env) -> Scp:
        scp = Scp(kubeconfig or kube_cluster.kubeconfig, kube_namespace, incoming or tmp_path / "incoming",
                  pod_name, tmp_path / "logs", extra_env, args)
        started.append(scp)
        return scp

    yield start
    for scp in started:
        scp.stop()


def list_series(cluster, namespace: str) -> list[dict]:
    return cluster.custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)["items"]


def get_series(cluster, namespace: str, key: SeriesKey) -> dict | None:
    from kubernetes.client.exceptions import ApiException

    try:
        return cluster.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, resource_name(key))
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


def wait_for_instances(cluster, namespace: str, key: SeriesKey, count: int, timeout: float = 30.0) -> dict:
    def check():
        body = get_series(cluster, namespace, key)
        if body and (body.get("status") or {}).get("instances") == count:
            return body
        return None

    return wait_until(check, timeout, what=f"DicomSeries {resource_name(key)} with {count} instances")


def series_key(files) -> SeriesKey:
    dataset = pydicom.dcmread(files[0], stop_before_pixels=True)
    return SeriesKey(str(dataset.SeriesInstanceUID), str(dataset.SOPClassUID))


def stored_instances(incoming: Path, key: SeriesKey) -> list[Path]:
    return sorted((incoming / key.prefix).glob("*.dcm"))


# --------------------------------------------------------------------------------------------------


def test_a_series_becomes_one_dicomseries_without_patient_data(kube_cluster, kube_namespace, start_scp, tmp_path):
    files = write_ct_series(tmp_path / "ct", count=12, rows=16, cols=16, patient_name=PATIENT_NAME,
                            patient_id=PATIENT_ID, series_description="Thorax 1mm", study_description="CT chest")
    key = series_key(files)
    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    scp = start_scp()
    before = time.time()
    scp.send(files)

    body = wait_for_instances(kube_cluster, kube_namespace, key, 12)
    assert [item["metadata"]["name"] for item in list_series(kube_cluster, kube_namespace)] == [resource_name(key)]
    assert body["spec"] == {
        "seriesInstanceUID": key.series_uid,
        "sopClassUID": CT_IMAGE_STORAGE,
        "studyInstanceUID": study_uid,
        "modality": "CT",
        "seriesDescription": "Thorax 1mm",
        "studyDescription": "CT chest",
        "storage": {"type": "local", "prefix": key.prefix},
    }
    status = body["status"]
    assert status["phase"] == "Receiving"
    assert status["receivedBy"] == ["receiver-a"]
    first, last = from_rfc3339(status["firstReceived"]), from_rfc3339(status["lastReceived"])
    assert before - 1 <= first <= last <= time.time()
    assert len(stored_instances(scp.incoming, key)) == 12

    assert scp.stop() == 0
    log = scp.output()
    assert f"published series {key.series_uid} (modality CT, " in log
    text = json.dumps(get_series(kube_cluster, kube_namespace, key))
    for marker in PATIENT_MARKERS:
        assert marker not in text, f"{marker!r} in the DicomSeries"
        assert marker not in log, f"{marker!r} in the receiver's log"
    for field in ("PatientName", "PatientID", "PatientBirthDate"):
        assert field not in text


def test_api_writes_are_rate_limited_whatever_the_instance_rate(kube_cluster, kube_namespace, start_scp, tmp_path):
    files = write_ct_series(tmp_path / "ct", count=150, rows=16, cols=16)
    key = series_key(files)
    name = resource_name(key)
    scp = start_scp()

    # Watch from now on: every write to the object is one event (ADDED for the create, MODIFIED
    # for each status write).
    events: list[tuple[float, str, str]] = []
    start_version = kube_cluster.custom.list_namespaced_custom_object(
        GROUP, VERSION, kube_namespace, PLURAL)["metadata"]["resourceVersion"]
    stop = threading.Event()

    def watch():
        for event in kube_cluster.rest.watch(f"/apis/{GROUP}/{VERSION}/namespaces/{kube_namespace}/{PLURAL}",
                                             start_version, timeout_seconds=120, stop=stop):
            if event.get("type") in ("ADDED", "MODIFIED") and event["object"]["metadata"]["name"] == name:
                events.append((time.monotonic(), event["type"],
                               str((event["object"].get("status") or {}).get("instances"))))

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    time.sleep(0.5)  # the watch is established

    # One association at ~30 instances a second (storescu would send them all in under a second,
    # too fast to show a rate limit of one write a second).
    started = time.monotonic()
    send_in_one_association(scp.port, files, pause=0.03)
    duration = time.monotonic() - started
    wait_for_instances(kube_cluster, kube_namespace, key, 150)
    time.sleep(3)  # anything still to come would come now
    stop.set()

    added = [e for e in events if e[1] == "ADDED"]
    modified = [e for e in events if e[1] == "MODIFIED"]
    print(f"\nrate: 150 instances in {duration:.2f}s (one association): {len(added)} create, "
          f"{len(modified)} status writes; instances seen: {[e[2] for e in modified]}")
    assert len(added) == 1
    assert 1 <= len(modified) <= duration + 3
    # Consecutive status writes while receiving are about a second apart; the association end may
    # add one sooner (one more allowed for the watch's delivery jitter).
    times = [e[0] for e in modified]
    quick = sum(1 for a, b in zip(times, times[1:]) if b - a < 0.5)
    assert quick <= 2, times


def test_an_api_outage_delays_publication_but_loses_nothing(kube_cluster, kube_namespace, start_scp, tmp_path):
    server = urlparse(kube_cluster.server)
    with TcpProxy(server.hostname, server.port) as proxy:
        kubeconfig = proxied_kubeconfig(kube_cluster.kubeconfig, proxy.port, tmp_path / "proxied.kubeconfig")
        scp = start_scp(kubeconfig=kubeconfig)
        proxy.pause("refuse")

        files = write_ct_series(tmp_path / "ct", count=20, rows=16, cols=16)
        key = series_key(files)
        scp.send(files)
        assert len(stored_instances(scp.incoming, key)) == 20
        time.sleep(3)
        assert get_series(kube_cluster, kube_namespace, key) is None  # nothing got through

        proxy.resume()
        body = wait_for_instances(kube_cluster, kube_namespace, key, 20, timeout=60)
        assert body["status"]["phase"] == "Receiving"
        assert scp.stop() == 0
        log = scp.output()
    # Every instance was acknowledged with success while the API was away.
    assert "stopped (20 instances stored, 0 refused)" in log, log
    # The outage is reported once, not once per retry. (The start-up probe may report it as well,
    # depending on whether it ran before the proxy started refusing.)
    assert len(re.findall(r"DicomSeries publication is delayed", log)) == 1, log
    assert "reachable again" in log


def test_a_receiver_killed_before_publishing_publishes_at_its_next_start(kube_cluster, kube_namespace,
                                                                        start_scp, tmp_path):
    server = urlparse(kube_cluster.server)
    with TcpProxy(server.hostname, server.port) as proxy:
        kubeconfig = proxied_kubeconfig(kube_cluster.kubeconfig, proxy.port, tmp_path / "proxied.kubeconfig")
        scp = start_scp(kubeconfig=kubeconfig)
        proxy.pause("refuse")
        files = write_ct_series(tmp_path / "ct", count=5, rows=16, cols=16)
        key = series_key(files)
        scp.send(files)  # acknowledged, stored, but the API is away: not published
        scp.process.kill()
        assert len(stored_instances(scp.incoming, key)) == 5
        assert get_series(kube_cluster, kube_namespace, key) is None
        proxy.resume()

        again = start_scp(pod_name="receiver-a2", kubeconfig=kubeconfig)
        body = wait_for_instances(kube_cluster, kube_namespace, key, 5, timeout=60)
        assert body["status"]["phase"] == "Receiving"
        assert "never published" in again.output()


def test_a_receiver_killed_mid_series_corrects_the_count_from_storage_at_its_next_start(
        kube_cluster, kube_namespace, start_scp, tmp_path):
    server = urlparse(kube_cluster.server)
    with TcpProxy(server.hostname, server.port) as proxy:
        kubeconfig = proxied_kubeconfig(kube_cluster.kubeconfig, proxy.port, tmp_path / "proxied.kubeconfig")
        scp = start_scp(kubeconfig=kubeconfig)
        files = write_ct_series(tmp_path / "ct", count=5, rows=16, cols=16)
        key = series_key(files)
        scp.send(files[:2])
        before = wait_for_instances(kube_cluster, kube_namespace, key, 2)
        proxy.pause("refuse")
        scp.send(files[2:])  # acknowledged and stored; the DicomSeries still says 2
        scp.process.kill()
        proxy.resume()

        again = start_scp(pod_name="receiver-a2", kubeconfig=kubeconfig)
        body = wait_for_instances(kube_cluster, kube_namespace, key, 5, timeout=60)
        newest = max(p.stat().st_mtime for p in stored_instances(scp.incoming, key))
        # (lastReceived is kept to the microsecond, a file's time finer)
        assert from_rfc3339(body["status"]["lastReceived"]) >= newest - 1e-6
        assert newest > from_rfc3339(before["status"]["lastReceived"])
        assert "behind what is stored" in again.output()


def test_two_replicas_share_one_series(kube_cluster, kube_namespace, start_scp, tmp_path):
    incoming = tmp_path / "shared"
    a = start_scp("receiver-a", incoming=incoming)
    b = start_scp("receiver-b", incoming=incoming)
    files = write_ct_series(tmp_path / "ct", count=40, rows=16, cols=16)
    key = series_key(files)

    errors: list[BaseException] = []

    def send(scp, part):
        try:
            scp.send(part)
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            errors.append(exc)

    threads = [threading.Thread(target=send, args=(a, files[::2])),
               threading.Thread(target=send, args=(b, files[1::2]))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors, errors

    body = wait_for_instances(kube_cluster, kube_namespace, key, 40)
    assert sorted(body["status"]["receivedBy"]) == ["receiver-a", "receiver-b"]
    assert len(list_series(kube_cluster, kube_namespace)) == 1
    assert len(stored_instances(incoming, key)) == 40
    # Stays right after both flushed for the last time.
    assert a.stop() == 0 and b.stop() == 0
    assert get_series(kube_cluster, kube_namespace, key)["status"]["instances"] == 40


def test_a_deleted_series_is_created_again_when_instances_arrive(kube_cluster, kube_namespace, start_scp, tmp_path):
    files = write_ct_series(tmp_path / "ct", count=6, rows=16, cols=16)
    key = series_key(files)
    scp = start_scp()
    scp.send(files[:3])
    wait_for_instances(kube_cluster, kube_namespace, key, 3)
    kube_cluster.custom.delete_namespaced_custom_object(GROUP, VERSION, kube_namespace, PLURAL, resource_name(key))
    wait_until(lambda: get_series(kube_cluster, kube_namespace, key) is None, 30, what="the deletion")
    scp.send(files[3:])
    body = wait_for_instances(kube_cluster, kube_namespace, key, 6)
    assert body["status"]["phase"] == "Receiving"


def send_in_one_association(port: int, files, pause: float, acknowledged: list | None = None) -> None:
    """C-STORE `files` in one association with a pause after each; successes go to `acknowledged`."""
    from pynetdicom import AE

    datasets = [pydicom.dcmread(path) for path in files]
    ae = AE(ae_title="SCANNER")
    ae.add_requested_context(datasets[0].SOPClassUID, datasets[0].file_meta.TransferSyntaxUID)
    association = ae.associate("127.0.0.1", port, ae_title="ISDR")
    assert association.is_established
    try:
        for dataset in datasets:
            status = association.send_c_store(dataset)
            assert status and status.Status == 0x0000, status
            if acknowledged is not None:
                acknowledged.append(dataset.SOPInstanceUID)
            time.sleep(pause)
    finally:
        association.release()


def test_sigterm_lets_the_association_finish_and_publishes_it(kube_cluster, kube_namespace, start_scp, tmp_path):
    files = write_ct_series(tmp_path / "ct", count=40, rows=16, cols=16)
    key = series_key(files)
    scp = start_scp()
    acknowledged: list[str] = []
    sender = threading.Thread(target=send_in_one_association, args=(scp.port, files, 0.05, acknowledged))
    sender.start()
    wait_until(lambda: len(acknowledged) >= 5, 30, what="the first instances")
    scp.process.popen.send_signal(15)  # SIGTERM, as the kubelet does
    sender.join(60)
    assert scp.process.popen.wait(60) == 0
    assert len(acknowledged) == 40, "the running association was allowed to finish"
    body = get_series(kube_cluster, kube_namespace, key)
    assert body["status"]["instances"] == 40  # the final flush published all of it


def test_sigterm_aborts_an_association_that_outlasts_the_drain_timeout(kube_cluster, kube_namespace,
                                                                       start_scp, tmp_path):
    files = write_ct_series(tmp_path / "ct", count=200, rows=16, cols=16)
    key = series_key(files)
    scp = start_scp(args=("--drain-timeout", "1"))
    acknowledged: list[str] = []

    def send_until_aborted():
        try:
            send_in_one_association(scp.port, files, 0.05, acknowledged)
        except (AssertionError, RuntimeError):  # the receiver aborted the association: expected
            pass

    sender = threading.Thread(target=send_until_aborted, daemon=True)
    sender.start()
    wait_until(lambda: len(acknowledged) >= 5, 30, what="the first instances")
    scp.process.popen.send_signal(15)
    assert scp.process.popen.wait(30) == 0
    sender.join(30)
    assert 5 <= len(acknowledged) < 200, "the association was aborted"
    stored = len(stored_instances(scp.incoming, key))
    assert stored >= len(acknowledged)
    # Nothing acknowledged (or stored) after the final flush: the object counts all of it.
    assert get_series(kube_cluster, kube_namespace, key)["status"]["instances"] == stored


def proxied_kubeconfig(kubeconfig: Path, port: int, path: Path) -> Path:
    """A copy of the kubeconfig whose current cluster is reached through 127.0.0.1:`port`."""
    document = yaml.safe_load(Path(kubeconfig).read_text())
    context_name = document["current-context"]
    context = next(c["context"] for c in document["contexts"] if c["name"] == context_name)
    cluster = next(c["cluster"] for c in document["clusters"] if c["name"] == context["cluster"])
    original = urlparse(cluster["server"])
    if original.hostname not in ("127.0.0.1", "localhost"):
        cluster.setdefault("tls-server-name", original.hostname)  # the certificate names that host
    cluster["server"] = f"{original.scheme}://127.0.0.1:{port}"
    path.write_text(yaml.safe_dump(document))
    path.chmod(0o600)
    return path
