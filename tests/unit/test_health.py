"""relay.health: the receiving processes' /readyz, its checks and how it behaves on a hanging storage."""

from __future__ import annotations

import logging
import threading

import pytest
import requests

from relay import health
from relay.config import ConfigError, load_settings
from relay.storage.local import LocalStorage
from tests.support.fake_time import FakeTime
from tests.support.processes import free_port


class Counting:
    """A check that counts its runs, fails while `problem` is set, and can be made to hang."""

    def __init__(self):
        self.runs = 0
        self.problem: str | None = None
        self.release = threading.Event()
        self.release.set()
        self.running = threading.Event()

    def __call__(self) -> None:
        self.runs += 1
        self.running.set()
        self.release.wait()
        self.running.clear()
        if self.problem:
            raise health.NotReady(self.problem)


@pytest.fixture
def endpoint():
    started = []

    def start(readiness: health.Readiness) -> str:
        running = health.serve(free_port(), readiness, host="127.0.0.1")
        started.append(running)
        return f"http://127.0.0.1:{running.port}"

    yield start
    for running in started:
        running.stop()


def test_readyz_answers_ok_while_every_check_passes_and_503_naming_the_one_that_fails(endpoint):
    storage, api = Counting(), Counting()
    url = endpoint(health.Readiness([("storage", storage), ("kubernetes-api", api)], max_age=0))
    response = requests.get(f"{url}/readyz", timeout=10)
    assert (response.status_code, response.text) == (200, "ok\n")
    verbose = requests.get(f"{url}/readyz?verbose", timeout=10)
    assert verbose.text == "[+]storage ok\n[+]kubernetes-api ok\nreadyz check passed\n"

    api.problem = "cannot reach the Kubernetes API at https://10.0.0.1:443"
    response = requests.get(f"{url}/readyz", timeout=10)
    assert response.status_code == 503
    assert response.text == ("[+]storage ok\n[-]kubernetes-api failed: cannot reach the Kubernetes API at "
                             "https://10.0.0.1:443\nreadyz check failed\n")
    assert requests.get(f"{url}/metrics", timeout=10).status_code == 404


def test_the_storage_check_writes_reads_back_and_deletes_its_probe_object(tmp_path):
    storage = LocalStorage(tmp_path / "data", min_free_bytes=0)
    check = health.storage_writable(storage, "isdr-receiver-7d9f/../x")
    check()
    assert not list(storage.list("")), "the probe object is gone afterwards"
    assert [p.name for p in (tmp_path / "data").iterdir()] == [], "and so is its folder"


def test_storage_whose_root_is_gone_is_not_ready(tmp_path):
    root = tmp_path / "data"
    storage = LocalStorage(root, min_free_bytes=0)
    check = health.storage_writable(storage, "receiver-0")
    root.rmdir()
    root.write_text("the volume went away")  # every write below it fails, even as root
    with pytest.raises(health.NotReady, match=f"cannot write to local directory {root}"):
        check()
    root.unlink()
    root.mkdir()
    check()


def test_storage_below_its_reserve_is_not_ready(tmp_path):
    storage = LocalStorage(tmp_path / "data", min_free_bytes=10**18)
    with pytest.raises(health.NotReady, match="bytes free"):
        health.storage_writable(storage, "receiver-0")()


def test_a_result_is_reused_for_max_age_seconds():
    time = FakeTime()
    check = Counting()
    readiness = health.Readiness([("storage", check)], max_age=1.0, wait=30, clock=time.clock)
    assert readiness.ready() and readiness.ready()
    assert check.runs == 1
    time.sleep(1.0)
    assert readiness.ready()
    assert check.runs == 2


def test_a_hanging_check_runs_once_and_fails_after_the_stall_time():
    time = FakeTime()
    check = Counting()
    readiness = health.Readiness([("storage", check)], max_age=0, wait=30, stall=10.0, clock=time.clock)
    assert readiness.ready()
    check.release.clear()  # the next run hangs (an NFS server gone, say)
    time.sleep(1.0)
    readiness.wait = 0  # requests do not wait for it
    first = readiness.verdicts()
    assert check.running.wait(30)
    assert first[0].ok, "a request that cannot wait gets the previous result"
    time.sleep(5.0)
    assert readiness.verdicts()[0].ok
    time.sleep(5.0)
    (verdict,) = readiness.verdicts()
    assert not verdict.ok and verdict.message == "no answer for 10s"
    assert check.runs == 2, "no second thread while the first still hangs"
    check.release.set()
    readiness.wait = 30
    time.sleep(1.0)
    assert readiness.ready()


def test_shutting_down_is_not_ready():
    readiness = health.Readiness([("storage", Counting())], wait=30)
    assert readiness.ready()
    readiness.shutting_down()
    (verdict,) = readiness.verdicts()
    assert (verdict.name, verdict.ok, verdict.message) == ("shutdown", False, "the process is stopping")


def test_a_failure_is_logged_when_it_starts_and_when_it_ends_not_at_every_probe(caplog):
    check = Counting()
    readiness = health.Readiness([("storage", check)], max_age=0, wait=30)
    check.problem = "cannot write to local directory /data: [Errno 30] Read-only file system"
    with caplog.at_level(logging.INFO, logger="relay.health"):
        for _ in range(3):
            assert not readiness.ready()
        check.problem = None
        for _ in range(3):
            assert readiness.ready()
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("WARNING", "not ready: storage: cannot write to local directory /data: [Errno 30] Read-only file system"),
        ("INFO", "ready again: storage is usable"),
    ]


def test_health_port_is_off_by_default_and_checked():
    assert load_settings({}).health_port == 0
    assert load_settings({"HEALTH_PORT": "8080"}).health_port == 8080
    for bad in ("-1", "65536", "http"):
        with pytest.raises(ConfigError, match="HEALTH_PORT"):
            load_settings({"HEALTH_PORT": bad})
    assert health.serve(0, health.Readiness([])) is None
