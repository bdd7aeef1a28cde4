"""SeriesPublisher without a cluster: a fake DicomSeries API with resourceVersion semantics, a fake
clock, and real local storage (the instance count comes from storage)."""

from __future__ import annotations

import copy
import logging
import threading

import pytest

from relay.config import Settings
from relay.dicom.identity import InstanceIdentity
from relay.dicom.receiver import ReceivedInstance
from relay.fingerprints.model import SeriesAttributes
from relay.kube.api import AlreadyExists, ApiUnavailable, Conflict, NotFound, Rejected
from relay.kube.publisher import SeriesPublisher, count_instances
from relay.kube.resources import from_rfc3339, resource_name, to_rfc3339
from relay.retry import Backoff
from relay.storage.local import LocalStorage
from relay.uids import SeriesKey

CT = "1.2.840.10008.5.1.4.1.1.2"
KEY = SeriesKey("1.2.826.0.1.3680043.8.498.1", CT)
STUDY = "1.2.826.0.1.3680043.8.498.9"
ATTRIBUTES = SeriesAttributes(modality="CT", sop_class_uid=CT, series_description="Thorax 1mm",
                              study_description="CT chest")
T0 = 1_700_000_000.0


class FakeClock:
    def __init__(self, now: float = 100.0):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeApi:
    """DicomSeries in memory, with the API server's rules that matter here: status is not taken on
    create, a merge patch whose resourceVersion is stale fails with 409, deleted objects 404."""

    def __init__(self):
        self.objects: dict[str, dict] = {}
        self.version = 0
        self.down = False
        self.calls: list[tuple[str, str]] = []
        self.before_patch = None  # callable(name): another writer acting between our read and write
        self.before_create = None

    def _bump(self) -> str:
        self.version += 1
        return str(self.version)

    def _check(self, verb: str, name: str) -> None:
        self.calls.append((verb, name))
        if self.down:
            raise ApiUnavailable("connection refused")

    def get_series(self, name):
        self._check("get", name)
        body = self.objects.get(name)
        return copy.deepcopy(body) if body is not None else None

    def create_series(self, body):
        self._check("create", body["metadata"]["name"])
        if self.before_create is not None:
            hook, self.before_create = self.before_create, None
            hook(body["metadata"]["name"])
        name = body["metadata"]["name"]
        if name in self.objects:
            raise AlreadyExists(name)
        stored = copy.deepcopy(body)
        stored.pop("status", None)
        stored["metadata"]["resourceVersion"] = self._bump()
        self.objects[name] = stored
        return copy.deepcopy(stored)

    def patch_series_status(self, name, status, resource_version=None):
        patch = {"status": status}
        if resource_version is not None:
            patch["metadata"] = {"resourceVersion": resource_version}
        self._check("patch", name)
        if self.before_patch is not None:
            hook, self.before_patch = self.before_patch, None
            hook(name)
        if name not in self.objects:
            raise NotFound(name)
        current = self.objects[name]
        wanted = (patch.get("metadata") or {}).get("resourceVersion")
        if wanted is not None and wanted != current["metadata"]["resourceVersion"]:
            raise Conflict(name)
        assert set(patch) <= {"metadata", "status"}, "only status may be patched"
        status = current.setdefault("status", {})
        for field, value in patch["status"].items():
            if value is None:
                status.pop(field, None)
            else:
                status[field] = value
        current["metadata"]["resourceVersion"] = self._bump()
        return copy.deepcopy(current)

    # what another party (the operator, another replica) does
    def operator_writes(self, name, **status):
        self.objects[name].setdefault("status", {}).update(status)
        self.objects[name]["metadata"]["resourceVersion"] = self._bump()

    @property
    def writes(self) -> int:
        return sum(1 for verb, _ in self.calls if verb in ("create", "patch"))


@pytest.fixture
def storage(tmp_path):
    return LocalStorage(tmp_path / "incoming")


@pytest.fixture
def settings(tmp_path):
    return Settings(incoming_dir=tmp_path / "incoming")


def make_publisher(api, storage, settings, clock=None, pod="receiver-a", **kwargs):
    backoff = Backoff(initial=1.0, factor=2.0, maximum=8.0, jitter=0.0)
    return SeriesPublisher(api, storage, settings, pod_name=pod, clock=clock or FakeClock(),
                           backoff=backoff, **kwargs)


def receive(publisher, storage, index: int, received_at: float, key: SeriesKey = KEY, caller: str = "SCANNER"):
    """What the receiver does: store the instance durably, then tell the sink."""
    uid = f"{key.series_uid}.{index}"
    storage.put_bytes(key.instance_key(uid), b"DICM")
    publisher.instance_stored(ReceivedInstance(
        identity=InstanceIdentity(series=key, sop_instance_uid=uid, study_uid=STUDY, attributes=ATTRIBUTES),
        size=4, calling_ae_title=caller, received_at=received_at))


NAME = resource_name(KEY)


# --- pure parts -------------------------------------------------------------------------------


def test_count_instances_counts_only_this_series_instance_objects(storage):
    other = SeriesKey(KEY.series_uid, "1.2.840.10008.5.1.4.1.1.4")
    for i in range(3):
        storage.put_bytes(KEY.instance_key(f"1.2.3.{i}"), b"x")
    storage.put_bytes(KEY.instance_key("1.2.3.0"), b"again")  # a re-sent instance replaces itself
    storage.put_bytes(other.instance_key("1.2.3.9"), b"x")
    storage.put_bytes(KEY.prefix + "notes.txt", b"not an instance")
    assert count_instances(storage, KEY) == 3


# --- the publisher ---------------------------------------------------------------------------


def test_first_instance_creates_the_series_with_spec_and_status(storage, settings):
    api = FakeApi()
    publisher = make_publisher(api, storage, settings)
    receive(publisher, storage, 1, T0)
    receive(publisher, storage, 2, T0 + 0.5)
    assert api.calls == [], "instance_stored must not call the API"
    result = publisher.publish_due()
    assert result.published == 1 and result.pending == 0
    body = api.objects[NAME]
    assert body["spec"] == {
        "seriesInstanceUID": KEY.series_uid, "sopClassUID": CT, "studyInstanceUID": STUDY,
        "modality": "CT", "seriesDescription": "Thorax 1mm", "studyDescription": "CT chest",
        "storage": {"type": "local", "prefix": KEY.prefix},
    }
    assert body["status"] == {"instances": 2, "firstReceived": to_rfc3339(T0),
                              "lastReceived": to_rfc3339(T0 + 0.5), "receivedBy": ["receiver-a"],
                              "phase": "Receiving"}
    assert [verb for verb, _ in api.calls] == ["get", "create", "patch"]


def test_at_most_one_write_per_interval_whatever_the_rate(storage, settings):
    api, clock = FakeApi(), FakeClock()
    publisher = make_publisher(api, storage, settings, clock=clock)
    # 1000 instances over 10 seconds, the background round running every 10 ms.
    for i in range(1000):
        receive(publisher, storage, i, T0 + i * 0.01)
        publisher.publish_due()
        clock.advance(0.01)
    publisher.publish_due()
    status_writes = sum(1 for verb, _ in api.calls if verb == "patch")
    assert 9 <= status_writes <= 11, api.calls
    assert api.writes == status_writes + 1  # and the one create
    # Between rounds the count lags by at most the interval; a flush makes it exact.
    publisher.flush()
    assert api.objects[NAME]["status"]["instances"] == 1000
    assert from_rfc3339(api.objects[NAME]["status"]["lastReceived"]) == pytest.approx(T0 + 9.99)


def test_association_end_publishes_at_once_but_not_more_than_once_per_interval(storage, settings):
    api, clock = FakeApi(), FakeClock()
    publisher = make_publisher(api, storage, settings, clock=clock)
    receive(publisher, storage, 1, T0)
    publisher.publish_due()  # created
    writes = api.writes
    clock.advance(0.1)
    receive(publisher, storage, 2, T0 + 0.1)
    publisher.publish_due()
    assert api.writes == writes, "rate limited"
    publisher.association_ended("SCANNER")
    publisher.publish_due()
    assert api.writes == writes + 1, "the association end is published at once"
    assert api.objects[NAME]["status"]["instances"] == 2
    # A sender that opens one association per instance cannot push the rate up.
    for i in range(3, 30):
        clock.advance(0.05)
        receive(publisher, storage, i, T0 + i)
        publisher.association_ended("SCANNER")
        publisher.publish_due()
    elapsed = 27 * 0.05
    assert api.writes - (writes + 1) <= 2 * (elapsed / 1.0) + 1


def test_association_end_only_hurries_the_series_of_that_caller(storage, settings):
    api, clock = FakeApi(), FakeClock()
    publisher = make_publisher(api, storage, settings, clock=clock)
    other = SeriesKey("1.2.826.0.1.3680043.8.498.2", CT)
    receive(publisher, storage, 1, T0)
    receive(publisher, storage, 1, T0, key=other, caller="PACS")
    publisher.publish_due()
    clock.advance(0.1)
    receive(publisher, storage, 2, T0 + 0.1)
    receive(publisher, storage, 2, T0 + 0.1, key=other, caller="PACS")
    publisher.association_ended("SCANNER")
    publisher.publish_due()
    assert api.objects[NAME]["status"]["instances"] == 2
    assert api.objects[resource_name(other)]["status"]["instances"] == 1
    assert publisher.pending_series() == [other]


def test_outage_keeps_series_pending_logs_once_and_recovers(storage, settings, caplog):
    caplog.set_level(logging.DEBUG, logger="relay.kube.publisher")
    api, clock = FakeApi(), FakeClock()
    publisher = make_publisher(api, storage, settings, clock=clock)
    api.down = True
    for i in range(50):
        receive(publisher, storage, i, T0 + i)
        result = publisher.publish_due()
        assert result.outage or result.published == 0
        clock.advance(0.5)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "cannot reach the Kubernetes API" in warnings[0].getMessage()
    # Backoff (1, 2, 4, 8, 8 s...) over 25 s: a handful of attempts, not 50.
    attempts = sum(1 for verb, _ in api.calls if verb == "get")
    assert 3 <= attempts <= 7
    assert publisher.pending_series() == [KEY]

    api.down = False
    clock.advance(10)
    result = publisher.publish_due()
    assert result.published == 1 and not result.outage
    assert api.objects[NAME]["status"]["instances"] == 50
    assert api.objects[NAME]["status"]["firstReceived"] == to_rfc3339(T0)
    assert api.objects[NAME]["status"]["lastReceived"] == to_rfc3339(T0 + 49)
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert any("reachable again" in m for m in infos)
    assert sum("published series" in m for m in infos) == 1


def test_conflict_rereads_and_keeps_the_operators_fields(storage, settings):
    api, clock = FakeApi(), FakeClock()
    publisher = make_publisher(api, storage, settings, clock=clock)
    receive(publisher, storage, 1, T0)
    publisher.publish_due()
    clock.advance(2)
    receive(publisher, storage, 2, T0 + 2)
    # The operator dispatches the series between our read and our write.
    api.before_patch = lambda name: api.operator_writes(name, phase="Dispatched", generation=1,
                                                        tasks=[{"taskId": "t1", "fingerprint": "fp"}])
    publisher.publish_due()
    status = api.objects[NAME]["status"]
    assert status["phase"] == "Dispatched" and status["generation"] == 1 and status["tasks"]
    assert status["instances"] == 2
    patches = [verb for verb, _ in api.calls if verb == "patch"]
    assert len(patches) == 3  # create's status, the conflicting one, the retry


def test_a_stale_count_cannot_overwrite_a_newer_one(storage, settings):
    """Replica A reads, replica B stores more and publishes, A's write (older read) must fail."""
    api, clock = FakeApi(), FakeClock()
    a = make_publisher(api, storage, settings, clock=clock, pod="receiver-a")
    b = make_publisher(api, storage, settings, clock=clock, pod="receiver-b")
    receive(a, storage, 1, T0)
    a.publish_due()
    clock.advance(2)
    receive(a, storage, 2, T0 + 2)

    def b_publishes(_name):
        receive(b, storage, 3, T0 + 3)
        b.flush()

    api.before_patch = b_publishes
    a.publish_due()
    status = api.objects[NAME]["status"]
    assert status["instances"] == 3
    assert set(status["receivedBy"]) == {"receiver-a", "receiver-b"}
    assert status["lastReceived"] == to_rfc3339(T0 + 3)


def test_create_race_with_another_replica(storage, settings):
    api = FakeApi()
    a = make_publisher(api, storage, settings, pod="receiver-a")
    b = make_publisher(api, storage, settings, pod="receiver-b")
    receive(a, storage, 1, T0)
    receive(b, storage, 2, T0 + 1)
    api.before_create = lambda name: b.flush()  # B creates it while A is about to
    result = a.flush()
    assert result.published == 1 and not result.errors
    status = api.objects[NAME]["status"]
    assert status["instances"] == 2
    assert set(status["receivedBy"]) == {"receiver-a", "receiver-b"}
    assert status["firstReceived"] == to_rfc3339(T0)


def test_deleted_series_is_created_again_as_a_new_one(storage, settings):
    api, clock = FakeApi(), FakeClock()
    publisher = make_publisher(api, storage, settings, clock=clock)
    receive(publisher, storage, 1, T0)
    publisher.publish_due()
    api.objects.clear()  # the operator cleaned up: instances and object gone
    storage.delete_prefix(KEY.prefix)
    clock.advance(5)
    receive(publisher, storage, 7, T0 + 600)
    publisher.publish_due()
    status = api.objects[NAME]["status"]
    assert status["instances"] == 1
    assert status["firstReceived"] == to_rfc3339(T0 + 600)
    assert status["phase"] == "Receiving"


def test_series_being_deleted_waits_until_it_is_gone(storage, settings):
    api, clock = FakeApi(), FakeClock()
    publisher = make_publisher(api, storage, settings, clock=clock)
    receive(publisher, storage, 1, T0)
    publisher.publish_due()
    api.objects[NAME]["metadata"]["deletionTimestamp"] = "2024-01-01T00:00:00Z"
    clock.advance(2)
    receive(publisher, storage, 2, T0 + 2)
    patches_before = sum(1 for verb, _ in api.calls if verb == "patch")
    publisher.publish_due()
    assert sum(1 for verb, _ in api.calls if verb == "patch") == patches_before
    assert publisher.pending_series() == [KEY]
    del api.objects[NAME]  # the finalizers ran
    clock.advance(5)
    publisher.publish_due()
    assert api.objects[NAME]["status"]["instances"] == 2
    assert publisher.pending_series() == []


def test_a_rejected_series_does_not_block_the_others(storage, settings, caplog):
    api, clock = FakeApi(), FakeClock()
    publisher = make_publisher(api, storage, settings, clock=clock)
    bad = SeriesKey("1.2.826.0.1.3680043.8.498.3", CT)
    original_create = api.create_series

    def create(body):
        if body["metadata"]["name"] == resource_name(bad):
            api.calls.append(("create", body["metadata"]["name"]))
            raise Rejected("spec.seriesDescription: Too long", 422)
        return original_create(body)

    api.create_series = create
    receive(publisher, storage, 1, T0, key=bad)
    receive(publisher, storage, 1, T0)
    result = publisher.publish_due()
    assert result.published == 1 and len(result.errors) == 1
    assert NAME in api.objects
    assert publisher.pending_series() == [bad]
    assert any("cannot publish" in r.getMessage() for r in caplog.records if r.levelno == logging.ERROR)
    clock.advance(0.5)
    publisher.publish_due()  # within its backoff: not retried yet
    assert sum(1 for verb, name in api.calls if name == resource_name(bad) and verb == "create") == 1


def test_instance_stored_never_raises_nor_blocks_when_the_api_hangs(storage, settings):
    entered, release = threading.Event(), threading.Event()

    class HangingApi(FakeApi):
        def get_series(self, name):
            entered.set()
            release.wait(10)
            raise ApiUnavailable("timed out")

    api = HangingApi()
    publisher = make_publisher(api, storage, settings)
    receive(publisher, storage, 1, T0)
    flusher = threading.Thread(target=publisher.flush)
    flusher.start()
    assert entered.wait(5)
    done = threading.Event()

    def more():
        for i in range(2, 50):
            receive(publisher, storage, i, T0 + i)
        done.set()

    threading.Thread(target=more).start()
    assert done.wait(2), "instance_stored waited for the API"
    release.set()
    flusher.join(5)
    assert publisher.pending_series() == [KEY]


def test_stop_publishes_what_is_pending(storage, settings):
    api, clock = FakeApi(), FakeClock()
    publisher = make_publisher(api, storage, settings, clock=clock, min_interval=3600)
    publisher.start()
    try:
        receive(publisher, storage, 1, T0)
        from tests.support.kube import wait_until

        wait_until(lambda: NAME in api.objects, timeout=5, what="the first publication")
        receive(publisher, storage, 2, T0 + 1)  # within the (long) interval: not yet published
    finally:
        assert publisher.stop(timeout=5)
    assert api.objects[NAME]["status"]["instances"] == 2


def test_stop_gives_up_after_its_timeout_during_an_outage(storage, settings, caplog):
    api = FakeApi()
    api.down = True
    publisher = make_publisher(api, storage, settings)
    receive(publisher, storage, 1, T0)
    assert publisher.stop(timeout=0.3) is False
    assert any("not published" in r.getMessage() for r in caplog.records)


# --- relay.kube.client -----------------------------------------------------------------------


def write_kubeconfig(path, namespace=None, server="https://127.0.0.1:6443"):
    import yaml

    context = {"cluster": "c", "user": "u"}
    if namespace:
        context["namespace"] = namespace
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "c", "cluster": {"server": server, "insecure-skip-tls-verify": True}}],
        "users": [{"name": "u", "user": {"token": "t0ken"}}],
        "contexts": [{"name": "main", "context": context},
                     {"name": "other", "context": {"cluster": "c", "user": "u", "namespace": "other-ns"}}],
        "current-context": "main",
    }))
    return path


def test_connect_takes_the_namespace_in_order(tmp_path):
    from relay.kube.client import connect

    kubeconfig = write_kubeconfig(tmp_path / "config", namespace="ctx-ns")
    env = {"KUBECONFIG": str(kubeconfig)}
    assert connect(environ=env).namespace == "ctx-ns"
    assert connect(environ={**env, "POD_NAMESPACE": "pod-ns"}).namespace == "pod-ns"
    assert connect("flag-ns", environ={**env, "POD_NAMESPACE": "pod-ns"}).namespace == "flag-ns"
    assert connect(kubeconfig=kubeconfig, context="other", environ={}).namespace == "other-ns"
    plain = write_kubeconfig(tmp_path / "plain")
    connection = connect(environ={"KUBECONFIG": str(plain)})
    assert connection.namespace == "default"
    assert connection.server == "https://127.0.0.1:6443" and not connection.in_cluster


def test_connect_leaves_the_global_default_configuration_alone(tmp_path):
    from kubernetes import client

    from relay.kube.client import connect

    before = client.Configuration.get_default_copy().host
    connection = connect(environ={"KUBECONFIG": str(write_kubeconfig(tmp_path / "config",
                                                                      server="https://10.9.8.7:6443"))})
    assert connection.api_client.configuration.host == "https://10.9.8.7:6443"
    assert client.Configuration.get_default_copy().host == before


def test_connect_says_what_is_missing(tmp_path):
    from relay.kube.client import KubeConfigError, connect

    with pytest.raises(KubeConfigError, match="kubeconfig"):
        connect(environ={"KUBECONFIG": str(tmp_path / "absent")})
    # In a pod without a service account token: the in-cluster loader fails, clearly.
    with pytest.raises(KubeConfigError, match="service account"):
        connect(environ={"KUBERNETES_SERVICE_HOST": "10.0.0.1", "KUBERNETES_SERVICE_PORT": "443"},
                service_account_dir=tmp_path / "none")


def test_connect_in_a_pod_uses_the_service_account(tmp_path):
    from relay.kube.client import connect

    account = tmp_path / "serviceaccount"
    account.mkdir()
    (account / "token").write_text("sa-token")
    (account / "ca.crt").write_text("-----BEGIN CERTIFICATE-----\n")
    (account / "namespace").write_text("isdr\n")
    env = {"KUBERNETES_SERVICE_HOST": "10.0.0.1", "KUBERNETES_SERVICE_PORT": "443",
           "KUBECONFIG": str(tmp_path / "ignored")}
    connection = connect(environ=env, service_account_dir=account)
    assert connection.in_cluster and connection.server == "https://10.0.0.1:443"
    assert connection.namespace == "isdr"
    assert connect(environ={**env, "POD_NAMESPACE": "from-downward-api"},
                   service_account_dir=account).namespace == "from-downward-api"


def test_at_start_a_series_published_behind_its_storage_is_published_again(storage, settings, tmp_path, caplog):
    import pydicom

    from isdr_devtools.synthetic import write_ct_series

    files = write_ct_series(tmp_path / "ct", count=5, rows=8, cols=8)
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    key = SeriesKey(str(first.SeriesInstanceUID), str(first.SOPClassUID))
    api = FakeApi()
    publisher = make_publisher(api, storage, settings)
    uids = [str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID) for path in files]
    for uid, path in zip(uids[:2], files):
        storage.put_bytes(key.instance_key(uid), path.read_bytes())
        publisher.instance_stored(ReceivedInstance(
            identity=InstanceIdentity(series=key, sop_instance_uid=uid, study_uid=STUDY, attributes=ATTRIBUTES),
            size=1, calling_ae_title="SCANNER", received_at=T0))
    publisher.flush()
    assert api.objects[resource_name(key)]["status"]["instances"] == 2
    for uid, path in zip(uids[2:], files[2:]):  # stored and acknowledged, then the receiver was killed
        storage.put_bytes(key.instance_key(uid), path.read_bytes())

    restarted = make_publisher(api, storage, settings, pod="receiver-b")
    with caplog.at_level(logging.WARNING):
        assert restarted.recover_unpublished() == 1
    restarted.flush()
    status = api.objects[resource_name(key)]["status"]
    newest = max(info.modified for info in storage.list(key.prefix))
    assert status["instances"] == 5 and from_rfc3339(status["lastReceived"]) >= newest - 1e-6
    assert "behind what is stored" in caplog.text
    # Up to date now: a further restart publishes nothing.
    assert make_publisher(api, storage, settings, pod="receiver-c").recover_unpublished() == 0
