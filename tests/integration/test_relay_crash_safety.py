"""`isdr run` keeps its two promises under kill -9, late instances and a full disk.

A sender told "stored" can trust it, and an inference the InferenceServer accepted is not run
again because the relay restarted. Every peer is a real process: dcmtk sends and receives, the
InferenceServer emulator infers (and counts submits), the relay is killed with SIGKILL. A TCP
proxy in front of the emulator plays the answers that never come back (a hung or cut request).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from isdr_devtools.synthetic import write_ct_series
from tests.support.emulator import EmulatorProcess
from tests.support.fingerprints import manifest
from tests.support.processes import free_port, wait_until
from tests.support.prometheus import scrape
from tests.support.small_disk import SmallDisk
from tests.support.tcp_proxy import TcpProxy

from tests.integration.test_relay_end_to_end import send


def submitted_inputs(emulator) -> list[int]:
    return sorted(t["input_files"] or 0 for t in emulator.stats()["tasks"])


@pytest.fixture
def slow_emulator(tmp_path):
    """Models take 3 s: time for things to happen while a task runs."""
    with EmulatorProcess(tmp_path / "slow-emulator", tls=False, delay=3.0) as server:
        yield server


@pytest.fixture
def proxied(slow_emulator):
    """A TCP proxy in front of the emulator, which a test tells to swallow some answers."""
    with TcpProxy("127.0.0.1", slow_emulator.port) as proxy:
        yield proxy, f"http://127.0.0.1:{proxy.port}"


def relay_behind(proxied, relays, pacs, tmp_path, held: tuple[bytes, ...], **env):
    """`isdr run` whose InferenceServer answers to `held` requests never arrive; a series sent."""
    proxy, url = proxied
    proxy.hold_answers_to(*held)
    relay = relays(env=env)
    relay.add_manifest(manifest("ct", url, "toy", pacs))
    relay.start()
    send(relay, write_ct_series(tmp_path / "ct", count=2, rows=16, cols=16))
    return relay


# --- late instances ------------------------------------------------------------------------------


def test_an_instance_with_a_new_uid_after_the_dispatch_runs_in_a_second_generation(
        tmp_path, slow_emulator, pacs, relays):
    relay = relays()  # the default LATE_INSTANCE_POLICY
    relay.add_manifest(manifest("ct", slow_emulator.base_url, "toy", pacs))
    relay.start()
    series = write_ct_series(tmp_path / "ct", count=3, rows=16, cols=16)

    send(relay, series[:2])
    relay.wait_for_log(r"submitted 2 instances")
    send(relay, series[2:])  # acknowledged after the dispatch: the series was incomplete

    wait_until(lambda: submitted_inputs(slow_emulator) == [2, 3], 60, "a second run with all 3 instances")
    relay.wait_for_log(r"re-opened")
    pacs.wait_for_files(2, timeout=60)
    wait_until(lambda: not relay.stored_instances(), 60, "the instances deleted once both runs finished")
    assert "deleted its 3 instances" not in relay.log().split("submitted 3 instances")[0]


def test_a_resent_instance_after_the_dispatch_is_a_duplicate_and_runs_nothing(
        tmp_path, emulator, pacs, relays):
    relay = relays()
    relay.add_manifest(manifest("ct", emulator.base_url, "toy", pacs))
    relay.start()
    series = write_ct_series(tmp_path / "ct", count=3, rows=16, cols=16)

    send(relay, series)
    relay.wait_for_log(r"submitted 3 instances")
    send(relay, series)  # the sender resends the whole series (say, after a time-out of its own)

    pacs.wait_for_files(1, timeout=60)
    relay.wait_for_log(r"already dispatched")
    wait_until(lambda: not relay.stored_instances(), 60, "the duplicates deleted with the series")
    time.sleep(2)  # POST_AFTER and more: nothing runs again
    assert submitted_inputs(emulator) == [3] and len(pacs.files()) == 1


def test_ignored_late_instances_are_kept_until_the_retention_and_then_deleted_with_a_warning(
        tmp_path, emulator, pacs, relays):
    relay = relays(env={"LATE_INSTANCE_POLICY": "ignore", "SERIES_RETENTION": "4"})
    relay.add_manifest(manifest("ct", emulator.base_url, "toy", pacs))
    relay.start()
    series = write_ct_series(tmp_path / "ct", count=3, rows=16, cols=16)

    send(relay, series[:2])
    relay.wait_for_log(r"submitted 2 instances")
    send(relay, series[2:])
    relay.wait_for_log(r"kept but not run")
    pacs.wait_for_files(1, timeout=60)
    relay.wait_for_log(r"deleted its 2 instances")
    assert len(relay.stored_instances()) == 1  # the late one: acknowledged, never run, kept

    relay.wait_for_log(r"WARNING .*deleted 1 instance\(s\) that arrived after the dispatch", timeout=30)
    assert relay.stored_instances() == [] and submitted_inputs(emulator) == [2]


# --- submit at most once -------------------------------------------------------------------------


def possible_duplicates(relay) -> float:
    return scrape(int(relay.env["METRICS_PORT"]))[1][("isdr_possible_duplicate_submits_total", ())]


def test_a_kill_while_the_submit_is_in_flight_repeats_it_at_most_once(tmp_path, slow_emulator, proxied,
                                                                      pacs, relays):
    # The server stores the task; the relay never hears of it.
    relay = relay_behind(proxied, relays, pacs, tmp_path, (b"POST",), POST_TIMEOUT="120",
                         METRICS_PORT=str(free_port()))

    wait_until(lambda: slow_emulator.stats()["submits"] == 1, 60, "the first submit")
    assert possible_duplicates(relay) == 0
    relay.kill()
    relay.start()
    wait_until(lambda: slow_emulator.stats()["submits"] == 2, 60, "the one repeat")
    assert possible_duplicates(relay) == 1  # the restarted process counts the repeat it sent
    relay.kill()
    relay.start()

    relay.wait_for_log(r"series \S+ failed", timeout=30)
    assert slow_emulator.stats()["submits"] == 2
    log = relay.log()
    assert "WARNING relay.task: task ct-" in log and "possible duplicate" in log
    assert re.search(r"task failed: the outcome of 2 submits is unknown", log)
    assert len(relay.stored_instances()) == 2  # a failed series keeps its instances


def test_a_submit_answered_is_of_known_outcome_and_a_kill_after_it_flags_nothing(tmp_path, slow_emulator, pacs,
                                                                                  relays):
    relay = relays(env={"METRICS_PORT": str(free_port())})
    relay.add_manifest(manifest("ct", slow_emulator.base_url, "toy", pacs))
    relay.start()
    send(relay, write_ct_series(tmp_path / "ct", count=2, rows=16, cols=16))
    relay.wait_for_log(r"submitted 2 instances")

    relay.kill()  # while the model runs: the task is polled after the restart, never submitted again
    relay.start()
    pacs.wait_for_files(1, timeout=60)

    assert slow_emulator.stats()["submits"] == 1 and possible_duplicates(relay) == 0
    assert "possible duplicate" not in relay.log()
    (record,) = [json.loads(path.read_text())["task"] for path in (relay.data_dir / "state" / "tasks").glob("*.json")]
    assert record["inference_uid"] and record["unknown_submits"] == 0


def test_a_submit_whose_answer_never_comes_is_repeated_once_then_the_task_fails(tmp_path, slow_emulator,
                                                                               proxied, pacs, relays):
    relay = relay_behind(proxied, relays, pacs, tmp_path, (b"POST",), POST_TIMEOUT="2",
                         METRICS_PORT=str(free_port()))

    wait_until(lambda: slow_emulator.stats()["submits"] == 2, 30, "the one repeat")
    time.sleep(8)  # more than two more time-outs and a retry's back-off
    assert slow_emulator.stats()["submits"] == 2
    assert possible_duplicates(relay) == 1
    log = relay.wait_for_log(r"task failed: the outcome of 2 submits is unknown")
    assert "possible duplicate" in log


# --- a finished task stays finished ----------------------------------------------------------------


def test_a_kill_after_the_remote_delete_leaves_the_delivered_task_succeeded(tmp_path, slow_emulator, proxied,
                                                                           pacs, relays):
    # The server deletes the task; the relay never hears of it.
    relay = relay_behind(proxied, relays, pacs, tmp_path, (b"DELETE",), NOT_FOUND_GRACE="1")

    wait_until(lambda: slow_emulator.stats()["deletes"] == 1, 60, "the remote delete")
    relay.kill()
    proxied[0].hold_answers_to()
    relay.start()

    relay.wait_for_log(r"series \S+ succeeded")
    wait_until(lambda: not relay.stored_instances(), 30, "clean-up")
    assert "task failed" not in relay.log()
    assert len(pacs.files()) == 1 and slow_emulator.stats()["submits"] == 1


# --- a full disk delays, never wedges --------------------------------------------------------------


def test_a_full_disk_when_the_state_is_saved_delays_the_series_until_space_is_back(tmp_path, emulator, pacs,
                                                                                 relays):
    with SmallDisk(tmp_path / "disk", size_mb=16) as disk:
        relay = relays(env={"INCOMING_DIR": str(disk.path), "MIN_FREE_BYTES": "0", "POST_AFTER": "2"})
        relay.add_manifest(manifest("ct", emulator.base_url, "toy", pacs))
        relay.start()
        send(relay, write_ct_series(tmp_path / "ct", count=2, rows=16, cols=16))
        disk.fill()  # before POST_AFTER: the dispatch cannot be saved

        time.sleep(5)  # POST_AFTER and more
        assert emulator.stats()["submits"] == 0
        disk.free()

        pacs.wait_for_files(1, timeout=60)  # it goes on by itself
        assert emulator.stats()["submits"] == 1
        log = relay.wait_for_log(r"ERROR .*state can be saved again")
        assert re.search(r"ERROR .*cannot save the state of series", log)
        assert "scheduler tick failed" not in log
        relay.stop()


# --- no patient data outside the configured folders ---------------------------------------------


def test_task_work_data_stays_under_the_storage_root_and_is_swept_after_a_kill(tmp_path, slow_emulator, pacs,
                                                                             relays):
    scratch = tmp_path / "system-tmp"
    scratch.mkdir()
    relay = relays(env={"TMPDIR": str(scratch)})
    relay.add_manifest(manifest("ct", slow_emulator.base_url, "toy", pacs))
    relay.start()
    send(relay, write_ct_series(tmp_path / "ct", count=3, rows=16, cols=16))
    relay.wait_for_log(r"submitted 3 instances")
    relay.kill()  # polling: the task's fetched copies are on disk

    assert list(scratch.iterdir()) == []
    work = relay.data_dir / "work"
    assert [p.name for p in work.iterdir()]  # the killed task's folder, under the storage root
    relay.start()
    relay.wait_for_log(r"removed 1 task work folder")
    pacs.wait_for_files(1, timeout=60)
    wait_until(lambda: not any(work.iterdir()), 30, "the task's work folder removed when it ended")
    assert list(scratch.iterdir()) == []


def test_a_stopped_relay_leaves_no_task_work_data(tmp_path, slow_emulator, pacs, relays):
    relay = relays()
    relay.add_manifest(manifest("ct", slow_emulator.base_url, "toy", pacs))
    relay.start()
    send(relay, write_ct_series(tmp_path / "ct", count=2, rows=16, cols=16))
    relay.wait_for_log(r"submitted 2 instances")
    relay.stop()  # SIGTERM while the task is polling

    work = relay.data_dir / "work"
    assert not work.exists() or list(work.iterdir()) == []
    dicom_outside = [p for p in Path(relay.data_dir).rglob("*.dcm") if "series" not in p.parts]
    assert dicom_outside == []
