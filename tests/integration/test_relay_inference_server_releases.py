"""`isdr run` end to end against InferenceServers that behave like the real releases v1.2 and 2.0.

Each test is one way in which the real servers differ from a clean API (INFERENCE_SERVER_API.md),
or one way a server can misbehave, with every peer a real process: dcmtk storescu sends, the
relay relays, the emulator infers (with the switch that plays the behaviour), storescp receives.
"""

from __future__ import annotations

import re

import pytest

from isdr_devtools.synthetic import write_ct_series
from tests.integration.test_relay_end_to_end import assert_rtstruct_for, seed, send
from tests.support.emulator import EmulatorProcess
from tests.support.fingerprints import manifest
from tests.support.processes import wait_until

MB = 1024 * 1024


@pytest.fixture
def emulators(tmp_path):
    """Factory of emulator processes with switches; each is stopped at the end of the test."""
    started = []

    def make(*switches: str, delay: float = 0.5, name: str | None = None) -> EmulatorProcess:
        emulator = EmulatorProcess(tmp_path / (name or f"emulator-{len(started)}"), delay=delay,
                                   extra_args=list(switches))
        started.append(emulator)
        return emulator

    yield make
    for emulator in started:
        emulator.stop()


def send_a_series_through(relay, emulator, model: str, protocol: str, pacs, tmp_path) -> None:
    """Start `relay` with one fingerprint (CT to `model` on `emulator`) and send it a CT series."""
    url = emulator.v1_tasks_url if protocol == "v1" else emulator.base_url
    relay.add_manifest(manifest("ct", url, model, pacs, protocol=protocol))
    relay.start()
    send(relay, write_ct_series(tmp_path / "ct", count=2, rows=16, cols=16))


@pytest.mark.parametrize("protocol, prefix", [("v1", "-"), ("v2", "_")])
def test_a_task_uid_starting_with_dash_or_underscore_is_delivered_and_deleted(
        tmp_path, emulators, pacs, relays, protocol, prefix):
    emulator = emulators(f"--uid-prefix={prefix}")
    relay = relays()
    if protocol == "v1":
        relay.add_seed_fingerprint("ct", seed(emulator.v1_tasks_url, "toy", pacs, modality="CT"))
    else:
        relay.add_manifest(manifest("ct", emulator.base_url, "toy", pacs))
    relay.start()
    series = write_ct_series(tmp_path / "ct", count=3, rows=32, cols=32)

    send(relay, series)

    assert_rtstruct_for(pacs.wait_for_files(1), series)
    stats = wait_until(lambda: (s := emulator.stats())["deletes"] == 1 and s, what="delete")
    (task,) = stats["tasks"]
    assert task["uid"].startswith(prefix) and task["deleted"]
    log = relay.wait_for_log(r"task succeeded")
    assert f"deleted remote task {task['uid']}" in log
    # v1.2 deletes, then answers 500: the relay says what happened, not "could not delete".
    assert "could not delete" not in log
    if protocol == "v1":
        assert stats["delete_answers"] == {"500": 1}
        assert "as every v1.2 delete does; the task is gone" in log


@pytest.mark.parametrize("protocol", ["v1", "v2"])
def test_a_model_that_writes_nothing_is_a_success_with_no_predictions(tmp_path, emulators, pacs, relays, protocol):
    # v1 sends a zip holding only no_output_files_found.error, v2 a tar holding an empty container.log.
    emulator = emulators(delay=0.2)
    relay = relays()
    send_a_series_through(relay, emulator, "no-output", protocol, pacs, tmp_path)

    log = relay.wait_for_log(r"task succeeded", timeout=60)
    assert "received 0 predictions" in log
    wait_until(lambda: emulator.stats()["deletes"] == 1, what="delete")
    assert pacs.files() == []


def test_a_v2_task_the_server_lost_fails_after_the_grace_period_not_after_get_timeout(
        tmp_path, emulators, pacs, relays):
    emulator = emulators(delay=60)
    relay = relays(env={"NOT_FOUND_GRACE": "3"})  # GET_TIMEOUT stays at its 24 hours
    relay.add_manifest(manifest("ct", emulator.base_url, "toy", pacs))
    relay.start()
    send(relay, write_ct_series(tmp_path / "ct", count=2, rows=16, cols=16))
    relay.wait_for_log(r"submitted 2 instances")

    emulator.reset()  # the server forgets its tasks: 2.0 answers their polls with 500

    log = relay.wait_for_log(r"task failed: task \S+ is no longer on the server", timeout=60)
    assert "HTTP 500" in log
    relay.wait_for_log(r"series \S+ failed")
    assert relay.alive() and pacs.files() == []


def test_a_v2_submit_that_hangs_while_the_task_is_stored_is_not_repeated_blindly(
        tmp_path, emulators, pacs, relays):
    # 2.0 with its queue down stores the task, then hangs; the relay's POST_TIMEOUT runs out.
    emulator = emulators("--queue-down-for", "15", delay=0.2)
    relay = relays(env={"POST_TIMEOUT": "2"})
    relay.add_manifest(manifest("ct", emulator.base_url, "toy", pacs))
    relay.start()
    send(relay, write_ct_series(tmp_path / "ct", count=2, rows=16, cols=16))

    log = relay.wait_for_log(r"task failed", timeout=60)
    assert "may have created the task" in log
    # Submitted once; the life cycle allows one repeat (flagged), never the retry loop's dozen.
    stats = wait_until(lambda: (s := emulator.stats())["tasks"] and all(
        t["status"] == "finished" for t in s["tasks"]) and s, timeout=60, what="the queue is back")
    assert 1 <= stats["submits"] <= 2


def test_a_v2_base_url_ending_in_api_tasks_is_used_with_a_warning(tmp_path, emulators, pacs, relays):
    emulator = emulators()
    relay = relays()
    relay.add_manifest(manifest("ct", emulator.base_url + "/api/tasks/", "toy", pacs))
    relay.start()
    series = write_ct_series(tmp_path / "ct", count=2, rows=16, cols=16)

    send(relay, series)

    assert_rtstruct_for(pacs.wait_for_files(1), series)
    log = relay.log()
    assert f"using {emulator.base_url} as the base URL, as the original v2 relay did" in log
    assert "HTTP 404" not in log


@pytest.mark.parametrize("protocol", ["v1", "v2"])
def test_a_slow_drip_download_fails_the_task_at_get_timeout(tmp_path, emulators, pacs, relays, protocol):
    emulator = emulators("--drip-rate", "50", delay=0.2)
    relay = relays(env={"GET_TIMEOUT": "8"})
    send_a_series_through(relay, emulator, "drip", protocol, pacs, tmp_path)

    # The output (several kB at 50 bytes per second) would take minutes.
    log = relay.wait_for_log(r"task failed: task \S+ timed out after \d+s \(GET_TIMEOUT 8s\)", timeout=60)
    assert "no complete answer within the request's deadline" in log
    failed_after = int(re.search(r"timed out after (\d+)s", log).group(1))
    assert failed_after <= 12
    assert pacs.files() == []


@pytest.mark.parametrize("protocol", ["v1", "v2"])
def test_a_gzip_bomb_download_is_refused_at_max_output_bytes(tmp_path, emulators, pacs, relays, protocol):
    emulator = emulators("--bomb-bytes", str(256 * MB), delay=0.2)
    relay = relays(env={"MAX_OUTPUT_BYTES": str(MB)})
    send_a_series_through(relay, emulator, "gzip-bomb", protocol, pacs, tmp_path)

    relay.wait_for_log(r"task failed: .*output exceeds the limit of 1048576 bytes", timeout=60)
    assert pacs.files() == []
    # The receiver's storage journal (.tmp-journal, STORAGE_JOURNAL) is two files of zeros made ahead.
    largest = max((p.stat().st_size for p in relay.workdir.rglob("*") if p.is_file() and ".tmp-journal" not in p.parts),
                  default=0)
    assert largest < 2 * MB


def test_a_redirected_poll_fails_the_task_and_nothing_goes_elsewhere(tmp_path, emulators, pacs, relays):
    elsewhere = emulators(name="elsewhere")
    emulator = emulators("--redirect-polls-to", elsewhere.base_url)
    relay = relays()
    relay.add_manifest(manifest("ct", emulator.base_url, "toy", pacs))
    relay.start()
    send(relay, write_ct_series(tmp_path / "ct", count=2, rows=16, cols=16))

    log = relay.wait_for_log(r"task failed: .*HTTP 302 redirect to", timeout=60)
    assert f"redirect to {elsewhere.base_url}/api/tasks/outputs/?uid=" in log and "not followed" in log
    assert elsewhere.stats()["polls"] == 0 and pacs.files() == []
