"""A new user's journey, from the chart: what docs/kubernetes.md and the example values say to do,
on the test control plane, with the node agent running the chart's own pods.

Nothing here starts a relay process or writes a pod's environment: every setting goes chart
values -> ConfigMap -> pod environment -> operator -> Job spec, as on a cluster. The only values
given beyond the example files are the ones a user would pass too (a faster POST_AFTER, the S3
endpoint, crds.enabled=false because the session's control plane has the CRDs pre-installed).
The InferenceServer is the emulator, the PACS is dcmtk's storescp, the scanner dcmtk's storescu,
the S3 server moto_server. The scanner reaches the receiver at its Service's address, which the
node agent gives each Service (what a LoadBalancer's or cluster IP is on a cluster), and
`helm test` runs live: its pod resolves `<receiver>.<namespace>.svc` like any pod.

Each test prints the commands as a user types them (pytest -s shows them).
"""

from __future__ import annotations

import json
import secrets
import shlex
from pathlib import Path

import pytest
import requests
import yaml

from isdr_devtools.synthetic import write_ct_series
from tests.support.dicom_peers import StoreSCP, storescu
from tests.support.emulator import EmulatorProcess
from tests.support.kube import wait_until
from tests.support.processes import missing, require_dcmtk
from tests.support.s3 import CREDENTIALS, s3_server  # noqa: F401 - a fixture

pytestmark = pytest.mark.kube

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "isdr"
PATIENT = ("Journeyman^Quintessa", "PID-5550199")


class Journey:
    """The commands of one user's session, run against the test cluster and written down."""

    def __init__(self, cluster, agent, namespace: str, tmp_path: Path):
        self.cluster, self.agent, self.namespace, self.tmp_path = cluster, agent, namespace, tmp_path
        self.transcript: list[str] = []

    def _note(self, argv) -> None:
        shown = [str(a).replace(str(REPO) + "/", "") for a in argv]
        self.transcript.append(" ".join(shlex.quote(a) for a in shown))

    def kubectl(self, *args, check: bool = True, input: str | None = None):
        self._note(["kubectl", *args])
        result = self.cluster.kubectl(*args, check=False, input=input, timeout=180)
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(map(str, args))}:\n{result.stdout}\n{result.stderr}\n{self}")
        return result

    def helm(self, *args, check: bool = True):
        self._note(["helm", *args])
        result = self.cluster.helm(*args, check=False, timeout=300)
        if check and result.returncode != 0:
            raise AssertionError(f"helm {' '.join(map(str, args))}:\n{result.stdout}\n{result.stderr}\n{self}")
        return result

    def storescu(self, host: str, port: int, files, calling_ae: str):
        self._note(["storescu", "-aet", calling_ae, "-aec", "ISDR", host, port, f"{files[0].parent}/*.dcm"])
        return storescu(port, files, called_ae="ISDR", calling_ae=calling_ae, host=host)

    def note(self, text: str) -> None:
        self.transcript.append(f"# {text}")

    def __str__(self) -> str:
        return "--- the journey so far ---\n" + "\n".join(self.transcript)

    # --- what a user reads off the cluster ---

    def names(self, kind: str, *selector: str) -> list[str]:
        output = self.kubectl("-n", self.namespace, "get", kind, *selector, "-o", "name").stdout
        return [line.split("/", 1)[1] for line in output.split()]

    def receiver_pod(self) -> str:
        (pod,) = self.names("pods", "-l", "app.kubernetes.io/component=receiver")
        return pod

    def wait(self, what: str, condition: str, timeout: int = 120) -> None:
        self.kubectl("-n", self.namespace, "wait", f"--for={condition}", what, f"--timeout={timeout}s")


@pytest.fixture
def agent(node_agent):
    if node_agent is None:
        pytest.skip("runs the chart's pods through the local node agent")
    if not node_agent.service_names_resolve:
        missing("the node agent's Service names in pods (it must run as root, for mount namespaces)")
    require_dcmtk("storescu")
    return node_agent


@pytest.fixture
def journey(kube_cluster, agent, tmp_path):
    namespace = f"journey-{secrets.token_hex(3)}"
    trip = Journey(kube_cluster, agent, namespace, tmp_path)
    yield trip
    print(f"\n{trip}")
    kube_cluster.helm("uninstall", "isdr", "-n", namespace, "--wait", check=False, timeout=120)
    kube_cluster.delete_namespace(namespace)


@pytest.fixture
def pacs(tmp_path):
    scp = StoreSCP(tmp_path / "pacs").start()
    yield scp
    scp.stop()


def fingerprint_file(tmp_path: Path, emulator: EmulatorProcess, pacs: StoreSCP) -> Path:
    """The user's fingerprint.yaml: CT series go to the toy model, its predictions to the PACS."""
    path = tmp_path / "fingerprint.yaml"
    path.write_text(yaml.safe_dump({
        "apiVersion": "isdr.io/v1alpha1", "kind": "Fingerprint", "metadata": {"name": "ct-organs"},
        "spec": {"match": {"modality": "^CT$"},
                 "inferenceServer": {"url": emulator.base_url, "protocol": "v2", "model": "toy",
                                     "pollIntervalSeconds": 1},
                 "destinations": [{"host": "127.0.0.1", "port": pacs.port, "aeTitle": pacs.ae_title}]}}))
    return path


def send_a_series_and_follow_it(trip: Journey, tmp_path: Path, emulator, pacs, calling_ae: str) -> dict:
    """From `kubectl apply -f fingerprint.yaml` to the predictions at the PACS; returns what the
    user read on the way (the series' name, the Job's log, the receiver's log)."""
    ns = trip.namespace
    trip.kubectl("-n", ns, "apply", "-f", fingerprint_file(tmp_path, emulator, pacs))
    trip.wait("fingerprint/ct-organs", "condition=Ready", 60)

    files = write_ct_series(tmp_path / "series", count=4, rows=16, cols=16, patient_name=PATIENT[0],
                            patient_id=PATIENT[1])
    address = trip.agent.service_address(ns, "isdr-receiver")
    trip.note(f"the receiver's Service is at {address} (on a cluster: its load balancer or cluster IP)")
    sent = trip.storescu(address, 11112, files, calling_ae)
    assert sent.returncode == 0, f"{sent.stdout}\n{trip}"

    series = wait_until(lambda: trip.names("dicomseries"), 60, what="the DicomSeries")
    (name,) = series
    trip.wait(f"dicomseries/{name}", "jsonpath={.status.phase}=Succeeded", 180)
    (job,) = trip.names("jobs", "-l", f"isdr.io/series={name}")
    predictions = pacs.wait_for_files(1)
    assert predictions, str(trip)
    return {
        "series": name,
        "job": job,
        "job_log": trip.kubectl("-n", ns, "logs", f"job/{job}").stdout,
        "receiver_log": trip.kubectl("-n", ns, "logs", "deployment/isdr-receiver").stdout,
        "operator_log": trip.kubectl("-n", ns, "logs", "deployment/isdr-operator").stdout,
        "objects": trip.kubectl("-n", ns, "get", "dicomseries,fingerprints,jobs,events", "-o", "yaml").stdout,
        "describe": trip.kubectl("-n", ns, "describe", f"dicomseries/{name}").stdout,
    }


def the_story_is_told_without_patient_data(seen: dict, pacs: StoreSCP) -> None:
    job_log = seen["job_log"]
    for step in ("submitted 4 instances", "received 1 predictions",
                 f"stored 1 predictions to PACS@127.0.0.1:{pacs.port}"):
        assert step in job_log, f"`kubectl logs job/{seen['job']}` lacks {step!r}:\n{job_log}"
    assert "as DicomSeries" in seen["receiver_log"] and seen["series"] in seen["receiver_log"], seen["receiver_log"]
    assert "created Job" in seen["operator_log"], seen["operator_log"]
    assert "Succeeded" in seen["describe"]
    everything = "".join(seen.values())
    assert not any(text in everything for text in PATIENT), "a patient identifier leaked"


def metrics_of(trip: Journey, pod: str) -> str:
    port = trip.agent.pod_port(trip.namespace, pod, "metrics")
    return requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text


def test_the_journey_with_a_volume_from_helm_install_to_predictions_and_the_receiver_s_readiness(
        journey, tmp_path, pacs):
    trip, ns = journey, journey.namespace
    emulator = EmulatorProcess(tmp_path / "inference", tls=True, delay=1.0)
    try:
        trip.kubectl("create", "namespace", ns)
        # values-pvc.yaml: the InferenceServers' CA from this ConfigMap (CERT_FILE in every pod).
        trip.kubectl("-n", ns, "create", "configmap", "hospital-ca", f"--from-file=ca.crt={emulator.ca_file}")
        installed = trip.helm("install", "isdr", CHART, "-n", ns, "-f", CHART / "examples" / "values-pvc.yaml",
                              "--set", "crds.enabled=false", "--set", "config.POST_AFTER=2",
                              "--set", "config.GET_INTERVAL=1", "--set", "receiver.readinessProbe.periodSeconds=1")
        assert "STATUS: deployed" in installed.stdout
        for component in ("receiver", "operator"):
            trip.kubectl("-n", ns, "rollout", "status", f"deployment/isdr-{component}", "--timeout=120s")
        tested = trip.helm("test", "isdr", "-n", ns, "--logs")
        assert "Phase:          Succeeded" in tested.stdout and "C-ECHO Success" in tested.stdout, tested.stdout

        seen = send_a_series_and_follow_it(trip, tmp_path, emulator, pacs, calling_ae="CT01")
        the_story_is_told_without_patient_data(seen, pacs)
        assert emulator.stats()["submits"] == 1
        # The receiver and the operator both serve metrics on 9120, each in a pod of its own.
        receiver = trip.receiver_pod()
        (operator,) = trip.names("pods", "-l", "app.kubernetes.io/component=operator")
        assert "isdr_instances_received_total 4.0" in metrics_of(trip, receiver)
        assert "isdr_tasks_finished_total" in metrics_of(trip, operator)

        # --- the receiver's readiness: its storage goes away, then comes back ---
        claim = trip.agent.pvc_path("isdr-data", ns)
        trip.note(f"the volume goes away: {claim} is replaced by a file")
        claim.rename(claim.with_name("isdr-data.away"))
        claim.write_text("the volume went away")
        trip.wait(f"pod/{receiver}", "condition=Ready=false", 60)
        described = trip.kubectl("-n", ns, "describe", "pod", receiver).stdout
        assert "Readiness probe failed: HTTP probe failed with statuscode: 503" in described
        log = trip.kubectl("-n", ns, "logs", "deployment/isdr-receiver").stdout
        assert "not ready: storage: cannot write to local directory" in log
        refused = trip.storescu(trip.agent.service_address(ns, "isdr-receiver"), 11112,
                                write_ct_series(tmp_path / "more", count=1, rows=8, cols=8), "CT01")
        assert refused.returncode != 0, "a NotReady receiver gets nothing through its Service"
        claim.unlink()
        claim.with_name("isdr-data.away").rename(claim)
        trip.note("the volume is back")
        trip.wait(f"pod/{receiver}", "condition=Ready", 60)

        # --- and when RBAC no longer lets it publish series ---
        trip.kubectl("-n", ns, "delete", "rolebinding", "isdr-receiver")
        trip.wait(f"pod/{receiver}", "condition=Ready=false", 60)
        log = trip.kubectl("-n", ns, "logs", "deployment/isdr-receiver").stdout
        assert "refuses to list DicomSeries" in log and "check the RBAC rules" in log
        trip.helm("upgrade", "isdr", CHART, "-n", ns, "--reset-then-reuse-values")  # puts the binding back
        trip.wait(f"pod/{receiver}", "condition=Ready", 60)
        assert "ready again: kubernetes-api is usable" in trip.kubectl(
            "-n", ns, "logs", "deployment/isdr-receiver").stdout
    finally:
        emulator.stop()


def test_the_journey_with_an_s3_bucket_from_helm_install_to_predictions(journey, tmp_path, pacs, s3_server):
    import boto3

    trip, ns = journey, journey.namespace
    trip.note(f"the bucket: aws --endpoint-url {s3_server} s3 mb s3://isdr")
    bucket = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1",
                          aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"])
    bucket.create_bucket(Bucket="isdr")
    emulator = EmulatorProcess(tmp_path / "inference", tls=False, delay=1.0)
    try:
        trip.kubectl("create", "namespace", ns)
        # values-s3.yaml: the credentials come from this Secret (envFrom in every pod and Job).
        trip.kubectl("-n", ns, "create", "secret", "generic", "isdr-s3",
                     f"--from-literal=AWS_ACCESS_KEY_ID={CREDENTIALS['AWS_ACCESS_KEY_ID']}",
                     f"--from-literal=AWS_SECRET_ACCESS_KEY={CREDENTIALS['AWS_SECRET_ACCESS_KEY']}")
        trip.helm("install", "isdr", CHART, "-n", ns, "-f", CHART / "examples" / "values-s3.yaml",
                  "--set", "crds.enabled=false", "--set", f"storage.s3.endpoint={s3_server}",
                  "--set", "storage.s3.region=us-east-1", "--set", "config.POST_AFTER=2",
                  "--set", "config.GET_INTERVAL=1", "--wait", "--timeout=3m")
        tested = trip.helm("test", "isdr", "-n", ns, "--logs")
        assert "Phase:          Succeeded" in tested.stdout and "C-ECHO Success" in tested.stdout, tested.stdout

        seen = send_a_series_and_follow_it(trip, tmp_path, emulator, pacs, calling_ae="SCANNER")
        the_story_is_told_without_patient_data(seen, pacs)

        # The instances were in the bucket (under the chart's prefix) and are cleaned up once done.
        def series_keys():
            listing = bucket.list_objects_v2(Bucket="isdr", Prefix="incoming/series/")
            return [item["Key"] for item in listing.get("Contents", [])]

        wait_until(lambda: not series_keys(), 60, what="the series' instances deleted from the bucket")
        series = json.loads(trip.kubectl("-n", ns, "get", f"dicomseries/{seen['series']}", "-o", "json").stdout)
        assert series["spec"]["storage"]["type"] == "s3" and series["spec"]["storage"]["bucket"] == "isdr"
        assert series["spec"]["storage"]["prefix"].startswith("incoming/series/")
    finally:
        emulator.stop()
