"""The InferenceServer client against real HTTP(S) peers.

Most tests run the InferenceServer emulator (`python -m isdr_devtools.emulator`) as a separate
process, answering as the real releases v1.2 and 2.0 do (INFERENCE_SERVER_API.md); a real nginx
stands in front of it where a reverse proxy matters. A few edge cases the emulator does not
produce (a hostile task uid, a 504, headers sent byte by byte) use a tiny scripted HTTP server in
this file. The pure rules of the client (uid parsing, message extraction, URL handling) are
checked at the top, without any server.
"""

from __future__ import annotations

import http.server
import importlib.util
import json
import logging
import os
import threading
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import RTStructureSetStorage

from relay.fingerprints.model import InferenceServerRef
from relay.inference import (
    ArchiveRejected,
    ClientSettings,
    InferenceError,
    PollPolicy,
    ServerUnavailable,
    SubmitOutcomeUnknown,
    SubmitRejected,
    TaskFailed,
    build_input_archive,
    find_dicom_files,
    make_client,
    safe_extract,
    submit_with_retry,
    wait_for_outputs,
)
from relay.inference.base import (
    InvalidTaskUid,
    parse_task_uid,
    redact_url,
    server_message,
    task_file_name,
    validate_uid,
)
from relay.inference.http import TlsVerificationFailed, is_transient, poll_state
from relay.inference.v1 import normalize_tasks_url
from relay.inference.v2 import normalize_base_url
from relay.retry import Backoff
from tests.support.processes import missing, wait_until

MB = 1024 * 1024
FAST = PollPolicy(interval=0.1, timeout=60, not_found_grace=15, max_transient_backoff=0.5, progress_every=5)
QUICK = Backoff(initial=0.1, maximum=0.3)  # submit retries, for tests
REAL_UID = "-Zq8" + "x" * 38 + "_"  # 43 characters of secrets.token_urlsafe()'s alphabet


# ============================================================================================
# Pure rules
# ============================================================================================


@pytest.mark.parametrize(
    "body, uid",
    [
        ('"abc-123"', "abc-123"),  # v1: a JSON string
        ('{"id": 7, "uid": "Zf00d_1-2", "model": "toy", "status": 0}', "Zf00d_1-2"),  # v2: an object
        (' "padded" \n', "padded"),
        ("bare-uid", "bare-uid"),  # not JSON at all, still a clean uid
        # secrets.token_urlsafe() values; about 3 % start with '-' or '_', and they are real tasks
        (f'"{REAL_UID}"', REAL_UID),
        ('"_3kT9vQ2mZx1Lp8Rw4Yb6Nc0Hd5Fg7Js-Ua2Ve9Xi1Ok"', "_3kT9vQ2mZx1Lp8Rw4Yb6Nc0Hd5Fg7Js-Ua2Ve9Xi1Ok"),
        ('"--"', "--"),
    ],
)
def test_parse_task_uid_accepts_the_real_alphabet(body, uid):
    assert parse_task_uid(body) == uid


@pytest.mark.parametrize(
    "body",
    ['"../../etc"', '".."', '"."', '".hidden"', '"a.b"', '"a/b"', '"a\\\\b"', '"a?b=c"', '"a#b"', '""', "{}",
     '{"uid": 5}', "[]", "null", '"' + "a" * 129 + '"', '"a b"', '"%2e%2e"', '"-rf /"', "<html>error</html>"],
)
def test_parse_task_uid_refuses_anything_outside_the_real_alphabet(body):
    with pytest.raises(InvalidTaskUid):
        parse_task_uid(body)


def test_file_names_built_from_a_uid_are_harmless_with_a_leading_dash_or_underscore():
    assert validate_uid("-rf") == "-rf"
    assert task_file_name("-rf", ".zip") == "task--rf.zip"
    assert task_file_name("_x", ".tar") == "task-_x.tar"
    with pytest.raises(InvalidTaskUid):
        task_file_name("../x", ".zip")


@pytest.mark.parametrize(
    "body, message",
    [
        (b'{"detail": "model not found"}', "model not found"),
        (b'{"detail": {"detail": "task not found"}}', "task not found"),  # v1 nests its message
        (b'{"detail": [{"loc": ["query"], "msg": "field required"}]}', '[{"loc": ["query"], "msg": "field required"}]'),
        (b'"just a string"', "just a string"),
        (b"plain text\r\nforged log line", "plain text  forged log line"),
        (b"x" * 2000, "x" * 497 + "..."),
        (b"\xff\xfe bad bytes", "\ufffd\ufffd bad bytes"),
    ],
)
def test_server_message(body, message):
    assert server_message(body) == message


def test_redact_url_drops_credentials():
    assert redact_url("https://user:secret@h.example:8443/api/tasks/?x=1") == "https://h.example:8443/api/tasks/?x=1"
    assert redact_url("http://h/api/") == "http://h/api/"


@pytest.mark.parametrize(
    "url, normalized",
    [
        ("https://h/api/tasks/", "https://h/api/tasks/"),
        ("https://h/api/tasks", "https://h/api/tasks/"),  # without the slash urljoin would drop 'tasks'
        ("  http://h:8000/x/api/tasks  ", "http://h:8000/x/api/tasks/"),
    ],
)
def test_v1_tasks_url_gets_a_trailing_slash(url, normalized):
    assert normalize_tasks_url(url) == normalized


def test_v2_base_url_keeps_a_path_prefix():
    assert normalize_base_url("https://h/inference/") == "https://h/inference"
    assert normalize_base_url("https://h") == "https://h"
    # The original v2 relay ignored the path: a URL ending in /api/tasks/ means the base before it.
    assert normalize_base_url("https://h/api/tasks/") == "https://h"
    assert normalize_base_url("https://h/inference/api/tasks") == "https://h/inference"
    for bad in ("ftp://h", "h/api", "https://h/?x=1"):
        with pytest.raises(ValueError):
            normalize_base_url(bad)


def test_status_rules():
    assert [poll_state(c) for c in (200, 551, 552, 553, 554, 500, 502, 404, 302, 307)] == [
        "ready", "pending", "failed", "failed", "not_found", "error", "error", "error", "failed", "failed"
    ]
    assert [is_transient(c) for c in (500, 502, 503, 429, 408, 550, 554, 400, 404)] == [
        True, True, True, True, True, False, False, False, False
    ]


def test_make_client_picks_the_protocol_and_the_fingerprints_ca_bundle(tmp_path):
    settings = ClientSettings(ca_bundle="/relay/cert_file.pem")
    v1 = make_client(InferenceServerRef("https://h/api/tasks", "m", "v1"), settings, tmp_path)
    v2 = make_client(InferenceServerRef("https://h", "m", "v2", ca_bundle="/fp/ca.pem"), settings, tmp_path)
    assert (v1.protocol, v1.archive_format(), v1.http.verify) == ("v1", "zip", "/relay/cert_file.pem")
    assert (v2.protocol, v2.archive_format(), v2.http.verify) == ("v2", "tar", "/fp/ca.pem")
    assert make_client(InferenceServerRef("https://h", "m", "v2"), ClientSettings(), tmp_path).http.verify is True
    with pytest.raises(ValueError):
        make_client(InferenceServerRef("https://h", "m", "v3"), settings, tmp_path)


# ============================================================================================
# Against the emulator
# ============================================================================================


def _emulator_class():
    if importlib.util.find_spec("isdr_devtools") is None:
        missing("the InferenceServer emulator (isdr_devtools: pip install ./devtools)")
    from tests.support.emulator import EmulatorProcess

    return EmulatorProcess


@pytest.fixture
def start_emulator(tmp_path):
    EmulatorProcess = _emulator_class()
    started = []

    def start(**kwargs):
        kwargs.setdefault("name", f"emulator{len(started)}")
        emulator = EmulatorProcess(tmp_path, **kwargs)
        started.append(emulator)
        return emulator

    yield start
    for emulator in started:
        emulator.stop()


@pytest.fixture(scope="module")
def series(tmp_path_factory) -> dict[str, list[Path]]:
    from isdr_devtools.synthetic import write_ct_series

    root = tmp_path_factory.mktemp("series")
    files = write_ct_series(root, count=3, rows=16, cols=16)
    return {"1.2.826.0.1.3680043.10.1_1.2.840.10008.5.1.4.1.1.2": files}


def server_ref(emulator, protocol: str, model: str = "toy", **kwargs) -> InferenceServerRef:
    url = emulator.v1_tasks_url if protocol == "v1" else emulator.base_url
    return InferenceServerRef(url=url, model=model, protocol=protocol, **kwargs)


_open_clients: list = []


@pytest.fixture(autouse=True)
def _close_clients():
    yield
    while _open_clients:
        _open_clients.pop().close()


def make_test_client(server: InferenceServerRef, settings: ClientSettings, download_dir: Path):
    client = make_client(server, settings, download_dir)
    _open_clients.append(client)
    return client


def client_for(emulator, protocol, tmp_path, **settings):
    settings.setdefault("ca_bundle", str(emulator.ca_file) if emulator.tls else None)
    return make_test_client(server_ref(emulator, protocol), ClientSettings(**settings), tmp_path / "downloads")


def input_archive(client, series, tmp_path) -> Path:
    fmt = client.archive_format()
    return build_input_archive(fmt, series, tmp_path / f"input-{client.protocol}.{fmt}")


class Recording:
    """Wraps a client and records the status code of every poll."""

    def __init__(self, client):
        self.client = client
        self.codes: list[int] = []

    def poll(self, uid, *args, **kwargs):
        result = self.client.poll(uid, *args, **kwargs)
        self.codes.append(result.status_code)
        return result


def run_task(client, archive, model, policy=FAST, **kwargs):
    uid = client.submit(archive, model)
    recording = Recording(client)
    lines: list[str] = []
    path = wait_for_outputs(recording, uid, time.time(), policy, on_progress=lines.append, **kwargs)
    return uid, path, recording.codes, lines


def submit_while_down(emulator, client, archive, down_for: float = 1.5) -> tuple[str, list[ServerUnavailable]]:
    """Kill the emulator, submit with retries, and restart it `down_for` seconds later."""
    emulator.kill()
    retries: list[ServerUnavailable] = []
    restart = threading.Timer(down_for, emulator.restart)
    restart.start()
    try:
        uid = submit_with_retry(client, archive, "toy", deadline_seconds=60, backoff=QUICK,
                                on_retry=lambda exc, n, d: retries.append(exc))
    finally:
        restart.join()
    return uid, retries


def collapse(codes: list[int]) -> list[int]:
    return [c for i, c in enumerate(codes) if i == 0 or codes[i - 1] != c]


@pytest.mark.parametrize("protocol", ["v1", "v2"])
@pytest.mark.parametrize("uid_prefix", ["", "-", "_"])  # about 3 % of real uids start with - or _
def test_round_trip(start_emulator, series, tmp_path, protocol, uid_prefix, caplog):
    emulator = start_emulator(delay=1.0, v1_register_delay=0.5, extra_args=[f"--uid-prefix={uid_prefix}"])
    client = client_for(emulator, protocol, tmp_path)
    archive = input_archive(client, series, tmp_path)

    uid, output, codes, lines = run_task(client, archive, "toy")

    assert uid.startswith(uid_prefix) and len(uid) == 43
    if protocol == "v1":
        # The v1 quirk: not found right after the submit, then pending, then the outputs.
        assert collapse(codes) == [554, 551, 200]
        assert any("not found yet" in line for line in lines)
    else:
        assert collapse(codes) == [551, 200]
    # Named after the task, never by the uid alone (which may start with '-').
    assert output.parent == tmp_path / "downloads" and output.name == f"task-{uid}.{client.archive_format()}"
    extracted = safe_extract(output, tmp_path / "outputs", max_total_bytes=100 * MB)
    assert extracted.skipped == []
    dicoms = find_dicom_files(tmp_path / "outputs")
    assert len(dicoms) == 1 < len(extracted.files)  # the log and the NIfTI mask are skipped
    assert dcmread(dicoms[0]).SOPClassUID == RTStructureSetStorage

    stats = emulator.stats()
    task = next(t for t in stats["tasks"] if t["uid"] == uid)
    assert (task["protocol"], task["input_files"]) == (protocol, 3)

    with caplog.at_level(logging.INFO, logger="relay.inference"):
        client.delete(uid)  # v1.2 deletes, then answers 500: done all the same
        client.delete(uid)  # already gone: not an error
    assert next(t for t in emulator.stats()["tasks"] if t["uid"] == uid)["deleted"]
    assert emulator.stats()["delete_answers"] == ({"500": 2} if protocol == "v1" else {"200": 1, "554": 1})
    if protocol == "v1":
        assert "answered HTTP 500, as every v1.2 delete does; the task is gone" in caplog.text
    # What a poll of a deleted task answers: v1 554, v2 500.
    assert client.poll(uid).state == ("not_found" if protocol == "v1" else "gone")


def test_v1_tasks_url_without_trailing_slash(start_emulator, series, tmp_path):
    emulator = start_emulator(delay=0.2, v1_register_delay=0.2)
    ref = InferenceServerRef(url=emulator.v1_tasks_url.rstrip("/"), model="toy", protocol="v1")
    client = make_test_client(ref, ClientSettings(), tmp_path / "downloads")
    uid, output, _, _ = run_task(client, input_archive(client, series, tmp_path), "toy")
    assert output.is_file()


@pytest.mark.parametrize("protocol", ["v1", "v2"])
def test_tls_with_the_emulators_ca(start_emulator, series, tmp_path, protocol):
    emulator = start_emulator(tls=True, delay=0.3, v1_register_delay=0.2)
    assert emulator.base_url.startswith("https://")
    # An operator's bundle often holds several certificates: the public roots and the private CA.
    system_roots = Path("/etc/ssl/certs/ca-certificates.crt")
    bundle = tmp_path / "bundle.pem"
    bundle.write_text((system_roots.read_text() if system_roots.exists() else "") + emulator.ca_file.read_text())
    client = client_for(emulator, protocol, tmp_path, ca_bundle=str(bundle))
    uid, output, _, _ = run_task(client, input_archive(client, series, tmp_path), "toy")
    assert len(find_dicom_files(safe_extract(output, tmp_path / "out", 100 * MB).files[0].parent.parent)) >= 1
    client.delete(uid)


@pytest.mark.parametrize("protocol", ["v1", "v2"])
def test_tls_verification_fails_with_the_wrong_ca(start_emulator, series, tmp_path, protocol):
    from isdr_devtools.emulator.tls import ensure_tls_files

    emulator = start_emulator(tls=True, delay=0.3)
    other_ca = ensure_tls_files(tmp_path / "other-ca").ca_cert
    for ca_bundle in (str(other_ca), None):  # a different private CA; the default store
        client = client_for(emulator, protocol, tmp_path, ca_bundle=ca_bundle)
        with pytest.raises(TlsVerificationFailed) as caught:
            client.submit(input_archive(client, series, tmp_path), "toy")
        assert isinstance(caught.value, ServerUnavailable)
        assert "CERTIFICATE_VERIFY_FAILED" in str(caught.value)
    assert emulator.stats()["submits"] == 0


@pytest.mark.parametrize("protocol", ["v1", "v2"])
@pytest.mark.parametrize(
    "model, code, said",
    [("fail", 552, "model crashed (emulated)"), ("missing-output", 553, "output is missing")],
)
def test_failed_tasks_carry_the_servers_message(start_emulator, series, tmp_path, protocol, model, code, said):
    emulator = start_emulator(delay=0.3, v1_register_delay=0.2)
    client = client_for(emulator, protocol, tmp_path)
    with pytest.raises(TaskFailed) as caught:
        run_task(client, input_archive(client, series, tmp_path), model)
    assert caught.value.status_code == code
    assert said in caught.value.server_message
    assert said in str(caught.value) and f"HTTP {code}" in str(caught.value)


def test_v1_unknown_model_is_rejected_without_retrying(start_emulator, series, tmp_path):
    emulator = start_emulator(delay=0.3)
    client = client_for(emulator, "v1", tmp_path)
    retries = []
    with pytest.raises(SubmitRejected) as caught:
        submit_with_retry(
            client, input_archive(client, series, tmp_path), "no-such-model",
            deadline_seconds=30, on_retry=lambda *a: retries.append(a),
        )
    assert caught.value.status_code == 550
    assert "no-such-model" in str(caught.value) and "HTTP 550" in str(caught.value)
    assert retries == []
    assert emulator.stats()["rejected_submits"] == 1


def test_v2_unknown_model_is_retried_a_few_times_then_refused_naming_model_and_server(
        start_emulator, series, tmp_path):
    # 2.0 answers a submit for an unknown model with a bare 500 and creates no task.
    emulator = start_emulator(delay=0.3)
    client = client_for(emulator, "v2", tmp_path)
    retries = []
    with pytest.raises(SubmitRejected) as caught:
        submit_with_retry(
            client, input_archive(client, series, tmp_path), "no-such-model", deadline_seconds=3600,
            backoff=QUICK, internal_error_backoff=QUICK, on_retry=lambda exc, n, d: retries.append(exc),
        )
    message = str(caught.value)
    assert caught.value.status_code == 500 and len(retries) == 3
    assert "model 'no-such-model'" in message and emulator.base_url in message and "4 submits" in message
    assert "Internal Server Error" in message
    assert emulator.stats()["rejected_submits"] == 4 and emulator.stats()["tasks"] == []


@pytest.mark.parametrize("protocol", ["v1", "v2"])
def test_internal_errors_while_polling_are_retried(start_emulator, series, tmp_path, protocol):
    emulator = start_emulator(delay=0.3, v1_register_delay=0.2)
    client = client_for(emulator, protocol, tmp_path)
    _, output, codes, lines = run_task(client, input_archive(client, series, tmp_path), "internal-error")
    assert codes.count(500) == 2 and codes[-1] == 200
    # v2's 500 may also mean "no such task": retried all the same while it lasts only briefly
    said = "server trouble" if protocol == "v1" else "no such task, or a passing error"
    assert any(said in line and "HTTP 500" in line for line in lines)
    assert output.is_file()


@pytest.mark.parametrize("protocol", ["v1", "v2"])
def test_a_task_gone_from_the_server_fails_after_the_grace_period(start_emulator, series, tmp_path, protocol):
    emulator = start_emulator(delay=30, v1_register_delay=0.2)
    client = client_for(emulator, protocol, tmp_path)
    uid = client.submit(input_archive(client, series, tmp_path), "toy")
    submitted_at = time.time()
    wait_until(lambda: client.poll(uid).state == "pending", what="the task is visible")
    emulator.reset()  # the server lost every task (its database was reset)

    policy = PollPolicy(interval=0.2, timeout=120, not_found_grace=2, max_transient_backoff=0.5)
    with pytest.raises(TaskFailed) as caught:
        wait_for_outputs(client, uid, submitted_at - 5, policy)  # past v1's grace after the submit
    # v1 says 554; 2.0 answers 500 for a task it does not know: no longer polled for GET_TIMEOUT.
    assert "timed out" not in str(caught.value) and time.time() - submitted_at < 60
    if protocol == "v1":
        assert caught.value.status_code == 554 and "not found" in str(caught.value)
    else:
        assert caught.value.status_code == 500 and "is no longer on the server" in str(caught.value)


def test_internal_errors_on_submit_are_retried(start_emulator, series, tmp_path):
    emulator = start_emulator(delay=0.3, extra_args=["--fail-submits", "2"])
    client = client_for(emulator, "v2", tmp_path)
    retries = []
    uid = submit_with_retry(
        client, input_archive(client, series, tmp_path), "toy", deadline_seconds=30,
        backoff=QUICK, internal_error_backoff=QUICK, on_retry=lambda exc, n, d: retries.append(exc),
    )
    assert len(retries) == 2 and all(e.status_code == 500 and not e.maybe_accepted for e in retries)
    assert [t["uid"] for t in emulator.stats()["tasks"]] == [uid]


def test_a_submit_that_hangs_while_the_task_is_stored_is_not_repeated(start_emulator, series, tmp_path):
    # 2.0 with its queue down: the task is stored, the submit hangs until the queue is back.
    emulator = start_emulator(delay=0.3, extra_args=["--queue-down-for", "4"])
    client = client_for(emulator, "v2", tmp_path, post_timeout=1)
    retries = []
    with pytest.raises(SubmitOutcomeUnknown) as caught:
        submit_with_retry(client, input_archive(client, series, tmp_path), "toy", deadline_seconds=60,
                          backoff=QUICK, on_retry=lambda *a: retries.append(a))
    assert isinstance(caught.value, ServerUnavailable) and caught.value.maybe_accepted
    assert "may have created the task" in str(caught.value)
    assert retries == []
    (task,) = emulator.stats()["tasks"]  # one task, which runs once the queue is back
    assert wait_for_outputs(client, task["uid"], time.time(), FAST).is_file()
    assert emulator.stats()["submits"] == 1


@pytest.mark.parametrize("protocol", ["v1", "v2"])
def test_server_down_then_back(start_emulator, series, tmp_path, protocol):
    emulator = start_emulator(delay=1.0, v1_register_delay=0.2)
    client = client_for(emulator, protocol, tmp_path)
    archive = input_archive(client, series, tmp_path)

    # Submit while the server is down: connection refused is retried until it is back.
    uid, retries = submit_while_down(emulator, client, archive)
    assert retries and all(isinstance(e, ServerUnavailable) for e in retries)
    assert not any(e.maybe_accepted for e in retries)  # refused: the server never saw those
    assert emulator.stats()["submits"] == 1

    # Down again while the task runs: polling rides it out, and the task survived the restart.
    submitted_at = time.time()
    emulator.kill()
    restart = threading.Timer(1.5, emulator.restart)
    restart.start()
    lines: list[str] = []
    try:
        output = wait_for_outputs(client, uid, submitted_at, FAST, on_progress=lines.append)
    finally:
        restart.join()
    assert any("server trouble" in line for line in lines)
    assert output.is_file()


def test_submit_with_retry_gives_up_at_the_deadline(start_emulator, series, tmp_path):
    emulator = start_emulator()
    client = client_for(emulator, "v2", tmp_path)
    archive = input_archive(client, series, tmp_path)
    emulator.kill()
    started = time.monotonic()
    with pytest.raises(ServerUnavailable) as caught:
        submit_with_retry(client, archive, "toy", deadline_seconds=1.0, backoff=Backoff(initial=0.2, maximum=0.3))
    assert 0.9 < time.monotonic() - started < 5
    assert not isinstance(caught.value, SubmitOutcomeUnknown)  # refused: never reached the server


@pytest.mark.parametrize("protocol", ["v1", "v2"])
@pytest.mark.parametrize("model", ["evil-dotdot", "evil-symlink"])
def test_hostile_outputs_are_contained(start_emulator, series, tmp_path, protocol, model):
    absolute_escape = Path("/tmp/isdr-absolute-escape.dcm")
    through_link = Path("/tmp/isdr-through-symlink.dcm")
    before = {p: p.exists() for p in (absolute_escape, through_link)}
    passwd = Path("/etc/passwd").read_bytes()

    emulator = start_emulator(delay=0.3, v1_register_delay=0.2)
    client = client_for(emulator, protocol, tmp_path)
    _, output, _, _ = run_task(client, input_archive(client, series, tmp_path), model)
    dest = tmp_path / "work" / "outputs"
    result = safe_extract(output, dest, max_total_bytes=100 * MB)

    reasons = {reason for _, reason in result.skipped}
    if model == "evil-dotdot":
        assert {"'..' in path", "absolute path"} <= reasons
    else:
        assert "symbolic link" in reasons or "link" in reasons
        if protocol == "v2":
            assert ("predictions/hardlink.dcm", "link") in result.skipped
    for path in dest.rglob("*"):
        assert not path.is_symlink()
        assert path.resolve().is_relative_to(dest.resolve())
    assert not list(tmp_path.rglob("escaped.dcm"))
    for path, existed in before.items():
        assert path.exists() == existed
    assert Path("/etc/passwd").read_bytes() == passwd
    # The genuine prediction is still there.
    assert any(dcmread(p).SOPClassUID == RTStructureSetStorage for p in find_dicom_files(dest))


@pytest.mark.parametrize("protocol", ["v1", "v2"])
def test_decompression_bomb_is_refused(start_emulator, series, tmp_path, protocol):
    emulator = start_emulator(delay=0.3, v1_register_delay=0.2, extra_args=["--bomb-bytes", str(64 * MB)])
    client = client_for(emulator, protocol, tmp_path)
    _, output, _, _ = run_task(client, input_archive(client, series, tmp_path), "evil-bomb")
    assert output.stat().st_size < 2 * MB  # small on the wire
    dest = tmp_path / "outputs"
    with pytest.raises(ArchiveRejected, match="limit"):
        safe_extract(output, dest, max_total_bytes=16 * MB)
    assert not dest.exists()


@pytest.mark.parametrize("protocol", ["v1", "v2"])  # v1 sends no Content-Length: counted as written
def test_oversized_download_fails_the_task(start_emulator, series, tmp_path, protocol):
    emulator = start_emulator(delay=0.2, v1_register_delay=0.2)
    client = client_for(emulator, protocol, tmp_path, max_download_bytes=200)
    with pytest.raises(TaskFailed, match="exceeds the limit of 200"):
        run_task(client, input_archive(client, series, tmp_path), "toy")
    assert list((tmp_path / "downloads").glob("*")) == []


@pytest.mark.parametrize("protocol", ["v1", "v2"])
@pytest.mark.parametrize("model", ["gzip-bomb", "endless"])
def test_a_download_is_bounded_by_its_decoded_bytes_as_they_are_written(
        start_emulator, series, tmp_path, protocol, model):
    # gzip-bomb: Content-Encoding gzip, 64 MiB decoded from a few kB; endless: a body without end.
    emulator = start_emulator(delay=0.2, v1_register_delay=0.2, extra_args=["--bomb-bytes", str(64 * MB)])
    client = client_for(emulator, protocol, tmp_path, max_download_bytes=1 * MB)
    uid = client.submit(input_archive(client, series, tmp_path), model)
    wait_until(lambda: client.http.answer_status(
        client.task_url(uid) if protocol == "v1" else client.outputs_url,
        None if protocol == "v1" else {"uid": uid}) == 200, what="outputs ready")
    result = client.poll(uid)
    assert (result.state, result.status_code) == ("failed", 200)
    assert "exceeds the limit of 1048576 bytes" in result.message
    assert list((tmp_path / "downloads").glob("*")) == []


@pytest.mark.parametrize("protocol", ["v1", "v2"])
def test_a_slow_drip_download_ends_at_the_tasks_timeout(start_emulator, series, tmp_path, protocol):
    emulator = start_emulator(delay=0.2, v1_register_delay=0.2, extra_args=["--drip-rate", "100"])
    client = client_for(emulator, protocol, tmp_path)
    uid = client.submit(input_archive(client, series, tmp_path), "drip")
    submitted_at = time.time()
    policy = PollPolicy(interval=0.2, timeout=5, not_found_grace=15, max_transient_backoff=0.5)
    with pytest.raises(TaskFailed) as caught:
        wait_for_outputs(client, uid, submitted_at, policy)
    # A tar of several kB at 100 bytes/s would take a minute or more; the task's timeout is 5 s.
    assert "timed out" in str(caught.value) and "deadline" in str(caught.value)
    assert time.time() - submitted_at < 20
    assert list((tmp_path / "downloads").glob("*")) == []


def test_every_request_has_a_total_deadline(start_emulator, series, tmp_path):
    emulator = start_emulator(delay=0.2, extra_args=["--drip-rate", "100"])
    # 2 s per operation, plus 100 kB at 50 kB/s: 4 s in all, whatever the server does.
    client = client_for(emulator, "v2", tmp_path, request_timeout=2, max_download_bytes=100_000,
                        min_transfer_rate=50_000)
    uid = client.submit(input_archive(client, series, tmp_path), "drip")
    wait_until(lambda: client.http.answer_status(client.outputs_url, {"uid": uid}) == 200, what="outputs ready")
    started = time.monotonic()
    with pytest.raises(ServerUnavailable, match="no complete answer within the request's deadline of 4s"):
        client.poll(uid)
    assert time.monotonic() - started < 10


@pytest.mark.parametrize("protocol", ["v1", "v2"])
def test_redirects_are_never_followed(start_emulator, series, tmp_path, protocol):
    elsewhere = start_emulator(delay=0.2, v1_register_delay=0.2)
    emulator = start_emulator(delay=0.2, v1_register_delay=0.2,
                              extra_args=["--redirect-polls-to", elsewhere.base_url])
    client = client_for(emulator, protocol, tmp_path)
    uid = client.submit(input_archive(client, series, tmp_path), "toy")
    with pytest.raises(TaskFailed) as caught:
        wait_for_outputs(client, uid, time.time(), FAST)
    assert "HTTP 302 redirect to " + elsewhere.base_url in str(caught.value)
    assert "not followed" in str(caught.value)
    assert elsewhere.stats()["polls"] == 0
    assert list((tmp_path / "downloads").glob("*")) == []


@pytest.mark.parametrize("protocol", ["v1", "v2"])
def test_a_model_that_writes_nothing_is_an_output_without_dicom(start_emulator, series, tmp_path, protocol):
    emulator = start_emulator(delay=0.2, v1_register_delay=0.2)
    client = client_for(emulator, protocol, tmp_path)
    _, output, _, _ = run_task(client, input_archive(client, series, tmp_path), "no-output")
    extracted = safe_extract(output, tmp_path / "outputs", max_total_bytes=MB)
    marker = "no_output_files_found.error" if protocol == "v1" else "container.log"
    assert [p.name for p in extracted.files] == [marker]
    assert find_dicom_files(tmp_path / "outputs") == []


def test_a_v2_base_url_ending_in_api_tasks_is_used_as_the_original_relay_did(
        start_emulator, series, tmp_path, caplog):
    emulator = start_emulator(delay=0.2)
    ref = InferenceServerRef(url=emulator.base_url + "/api/tasks/", model="toy", protocol="v2")
    with caplog.at_level(logging.WARNING, logger="relay.inference"):
        client = make_test_client(ref, ClientSettings(), tmp_path / "downloads")
    assert f"using {emulator.base_url} as the base URL" in caplog.text
    _, output, _, _ = run_task(client, input_archive(client, series, tmp_path), "toy")
    assert output.is_file()


def test_poll_timeout_fails_the_task(start_emulator, series, tmp_path):
    emulator = start_emulator(delay=30)
    client = client_for(emulator, "v2", tmp_path)
    policy = PollPolicy(interval=0.2, timeout=1.0)
    with pytest.raises(TaskFailed, match="timed out"):
        run_task(client, input_archive(client, series, tmp_path), "toy", policy=policy)


# ============================================================================================
# Against a scripted HTTP server (answers the emulator does not give)
# ============================================================================================


class Scripted(http.server.ThreadingHTTPServer):
    """Answers every request with (status, body, delay[, headers]) from `answers`, in turn."""

    daemon_threads = True

    def __init__(self, answers):
        self.answers = list(answers)
        self.requests: list[tuple[str, str, int]] = []
        super().__init__(("127.0.0.1", 0), _ScriptedHandler)
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def close(self):
        self.shutdown()
        self.server_close()


class _ScriptedHandler(http.server.BaseHTTPRequestHandler):
    def _answer(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        self.server.requests.append((self.command, self.path, len(body)))
        status, payload, delay, *headers = self.server.answers.pop(0)
        time.sleep(delay)
        self.send_response(status)
        self.send_header("Content-Length", str(len(payload)))
        for name, value in (headers[0] if headers else {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = do_DELETE = _answer

    def log_message(self, *args):
        pass


@pytest.fixture
def scripted():
    servers = []

    def make(*answers):
        server = Scripted(answers)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.close()


def test_a_hostile_task_uid_is_refused(scripted, tmp_path):
    server = scripted((200, b'"../../admin"', 0))
    client = make_test_client(InferenceServerRef(server.url + "/api/tasks/", "m", "v1"), ClientSettings(), tmp_path)
    archive = tmp_path / "a.zip"
    archive.write_bytes(b"PK\x05\x06" + b"\0" * 18)
    with pytest.raises(SubmitRejected, match="not a valid task uid"):
        client.submit(archive, "m")


def test_the_upload_is_a_standard_multipart_form(scripted, tmp_path):
    server = scripted((200, b'{"uid": "u1"}', 0))
    client = make_test_client(InferenceServerRef(server.url + "/prefix", "m", "v2"), ClientSettings(), tmp_path)
    archive = tmp_path / "input.tar"
    archive.write_bytes(os.urandom(300_000))
    assert client.submit(archive, "my model") == "u1"
    method, path, length = server.requests[0]
    assert (method, path) == ("POST", "/prefix/api/tasks/?human_readable_id=my+model")
    assert length > 300_000


def test_a_lost_submit_answer_leaves_the_outcome_unknown_and_is_not_repeated(scripted, tmp_path):
    server = scripted((200, b'"late"', 3.0), (200, b'"second"', 0))
    client = make_test_client(
        InferenceServerRef(server.url + "/api/tasks/", "m", "v1"), ClientSettings(post_timeout=0.5), tmp_path
    )
    archive = tmp_path / "a.zip"
    archive.write_bytes(b"PK\x05\x06" + b"\0" * 18)
    with pytest.raises(SubmitOutcomeUnknown) as caught:
        submit_with_retry(client, archive, "m", deadline_seconds=30, backoff=QUICK)
    # The server got the upload: a retry could run the model twice.
    assert isinstance(caught.value, ServerUnavailable) and caught.value.maybe_accepted
    assert "ReadTimeout" in str(caught.value)
    assert len(server.requests) == 1


def test_a_gateway_timeout_leaves_the_submit_outcome_unknown(scripted, tmp_path):
    server = scripted((504, b"<html>504 Gateway Time-out</html>", 0), (200, b'{"uid": "u2"}', 0))
    client = make_test_client(InferenceServerRef(server.url, "m", "v2"), ClientSettings(), tmp_path)
    archive = tmp_path / "a.tar"
    archive.write_bytes(b"\0" * 1024)
    with pytest.raises(SubmitOutcomeUnknown) as caught:
        submit_with_retry(client, archive, "m", deadline_seconds=30, backoff=QUICK)
    assert caught.value.status_code == 504 and "a gateway gave up waiting" in str(caught.value)
    assert len(server.requests) == 1


def test_bad_gateway_and_service_unavailable_are_retried(scripted, tmp_path):
    server = scripted((502, b"Bad Gateway", 0), (503, b"Service Unavailable", 0), (200, b'{"uid": "u3"}', 0))
    client = make_test_client(InferenceServerRef(server.url, "m", "v2"), ClientSettings(), tmp_path)
    archive = tmp_path / "a.tar"
    archive.write_bytes(b"\0" * 1024)
    assert submit_with_retry(client, archive, "m", deadline_seconds=30, backoff=QUICK) == "u3"
    assert len(server.requests) == 3


def test_redirects_of_a_submit_or_a_delete_are_refused(scripted, tmp_path):
    elsewhere = {"Location": "http://127.0.0.1:9/api/tasks/"}
    server = scripted((307, b"", 0, elsewhere), (302, b"", 0, elsewhere))
    client = make_test_client(InferenceServerRef(server.url, "m", "v2"), ClientSettings(), tmp_path)
    archive = tmp_path / "a.tar"
    archive.write_bytes(b"\0" * 1024)
    with pytest.raises(SubmitRejected, match="HTTP 307 redirect to http://127.0.0.1:9/api/tasks/, not followed"):
        submit_with_retry(client, archive, "m", deadline_seconds=30, backoff=QUICK)
    with pytest.raises(InferenceError, match="HTTP 302 redirect to .* not followed"):
        client.delete("u1")
    assert len(server.requests) == 2


def test_a_v1_delete_answering_500_while_the_task_is_still_there_is_not_done(scripted, tmp_path):
    server = scripted((500, b"Internal Server Error", 0), (200, b"PK\x05\x06" + b"\0" * 18, 0))
    client = make_test_client(InferenceServerRef(server.url + "/api/tasks/", "m", "v1"), ClientSettings(), tmp_path)
    with pytest.raises(ServerUnavailable, match="the task is still there .GET answered HTTP 200"):
        client.delete(REAL_UID)
    assert [(m, path) for m, path, _ in server.requests] == [("DELETE", f"/api/tasks/{REAL_UID}"),
                                                             ("GET", f"/api/tasks/{REAL_UID}")]


class DrippingHeaders:
    """A server that answers with a status line, then one more header line every 0.2 s, forever."""

    def __init__(self):
        import socket

        self.listener = socket.create_server(("127.0.0.1", 0))
        self.stopped = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.listener.getsockname()[1]}"

    def _serve(self):
        while not self.stopped.is_set():
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._drip, args=(connection,), daemon=True).start()

    def _drip(self, connection):
        with connection:
            connection.recv(65536)
            try:
                connection.sendall(b"HTTP/1.1 200 OK\r\n")
                while not self.stopped.wait(0.2):
                    connection.sendall(b"X-Drip: x\r\n")
            except OSError:
                pass

    def close(self):
        self.stopped.set()
        self.listener.close()


def test_headers_sent_without_end_are_cut_at_the_requests_deadline(tmp_path):
    server = DrippingHeaders()
    try:
        client = make_test_client(InferenceServerRef(server.url, "m", "v2"),
                                  ClientSettings(request_timeout=2, max_download_bytes=1000,
                                                 min_transfer_rate=1000), tmp_path)
        started = time.monotonic()
        with pytest.raises(ServerUnavailable, match="deadline of 3s"):
            client.poll(REAL_UID)
        assert time.monotonic() - started < 15  # each header line comes well within the 2 s timeout
    finally:
        server.close()


def test_error_bodies_are_bounded_and_attached(scripted, tmp_path):
    huge = json.dumps({"detail": "z" * 200_000}).encode()
    server = scripted((503, huge, 0), (418, b"teapot", 0))
    client = make_test_client(InferenceServerRef(server.url, "m", "v2"), ClientSettings(), tmp_path)
    result = client.poll("abc")
    assert result.state == "error" and result.status_code == 503
    assert len(result.server_message) == 500 and "HTTP 503" in result.message
    archive = tmp_path / "a.tar"
    archive.write_bytes(b"\0" * 1024)
    with pytest.raises(SubmitRejected, match="HTTP 418.*teapot"):
        client.submit(archive, "m")


def test_connection_refused_is_server_unavailable(tmp_path):
    from tests.support.processes import free_port

    url = f"http://user:pw@127.0.0.1:{free_port()}"
    client = make_test_client(InferenceServerRef(url, "m", "v2"), ClientSettings(request_timeout=2), tmp_path)
    with pytest.raises(ServerUnavailable) as caught:
        client.poll("abc")
    assert not caught.value.maybe_accepted
    assert "pw" not in str(caught.value) and "Connection refused" in str(caught.value)
    with pytest.raises(ServerUnavailable):
        client.delete("abc")


# ============================================================================================
# Behind a real reverse proxy (nginx), and a connection cut during the upload
# ============================================================================================


def test_a_gateway_timeout_from_a_real_proxy_in_front_of_a_hanging_submit_is_not_repeated(
        start_emulator, series, tmp_path):
    from tests.support.nginx import ReverseProxy

    emulator = start_emulator(delay=0.2, extra_args=["--queue-down-for", "6"])
    with ReverseProxy(tmp_path, emulator.port, read_timeout=1) as proxy:
        ref = InferenceServerRef(url=proxy.base_url, model="toy", protocol="v2")
        client = make_test_client(ref, ClientSettings(), tmp_path / "downloads")
        with pytest.raises(SubmitOutcomeUnknown) as caught:
            submit_with_retry(client, input_archive(client, series, tmp_path), "toy", deadline_seconds=60,
                              backoff=QUICK)
        assert caught.value.status_code == 504
    assert emulator.stats()["submits"] == 1  # the task exists, once


def test_a_real_proxy_whose_server_is_down_answers_502_and_the_submit_waits_for_the_server(
        start_emulator, series, tmp_path):
    from tests.support.nginx import ReverseProxy

    emulator = start_emulator(delay=0.2)
    with ReverseProxy(tmp_path, emulator.port, read_timeout=30) as proxy:
        ref = InferenceServerRef(url=proxy.base_url, model="toy", protocol="v2")
        client = make_test_client(ref, ClientSettings(), tmp_path / "downloads")
        uid, retries = submit_while_down(emulator, client, input_archive(client, series, tmp_path))
        assert retries and {e.status_code for e in retries} == {502}
    assert [t["uid"] for t in emulator.stats()["tasks"]] == [uid]


def test_an_upload_cut_off_by_the_server_is_retried(start_emulator, tmp_path):
    from tests.support.tcp_proxy import TcpProxy

    emulator = start_emulator(delay=0.2)
    proxy = TcpProxy("127.0.0.1", emulator.port).start()
    try:
        client = make_test_client(InferenceServerRef(url=f"http://127.0.0.1:{proxy.port}", model="toy",
                                                     protocol="v2"), ClientSettings(), tmp_path / "downloads")
        big = tmp_path / "big.bin"
        big.write_bytes(os.urandom(32 * MB))  # far more than the socket buffers hold
        archive = build_input_archive("tar", {"s": [big]}, tmp_path / "input.tar")
        proxy.pause("reset")  # connections accepted and closed at once, during the upload
        retries: list[ServerUnavailable] = []

        def resume_after_two(exc, attempt, delay):
            retries.append(exc)
            if attempt == 2:
                proxy.resume()

        uid = submit_with_retry(client, archive, "toy", deadline_seconds=60, backoff=QUICK,
                                on_retry=resume_after_two)
    finally:
        proxy.stop()
    assert len(retries) == 2 and not any(e.maybe_accepted for e in retries)
    assert all("while uploading" in str(e) or "Connection" in str(e) for e in retries)
    assert [t["uid"] for t in emulator.stats()["tasks"]] == [uid]
