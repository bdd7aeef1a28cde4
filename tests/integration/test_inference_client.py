"""The InferenceServer client against real HTTP(S) peers.

Most tests run the InferenceServer emulator (`python -m isdr_devtools.emulator`) as a separate process;
a few edge cases the emulator does not produce (a hostile task uid, a response that never comes)
use a tiny scripted HTTP server in this file. The pure rules of the client (uid parsing, message
extraction, URL handling) are checked at the top, without any server.
"""

from __future__ import annotations

import http.server
import importlib.util
import json
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
    PollPolicy,
    ServerUnavailable,
    SubmitRejected,
    TaskFailed,
    build_input_archive,
    find_dicom_files,
    make_client,
    safe_extract,
    submit_with_retry,
    wait_for_outputs,
)
from relay.inference.base import InvalidTaskUid, parse_task_uid, redact_url, server_message, validate_uid
from relay.inference.http import TlsVerificationFailed, is_transient, poll_state
from relay.inference.v1 import normalize_tasks_url
from relay.inference.v2 import normalize_base_url
from relay.retry import Backoff
from tests.support.processes import missing

MB = 1024 * 1024
FAST = PollPolicy(interval=0.1, timeout=60, not_found_grace=15, max_transient_backoff=0.5, progress_every=5)


# ============================================================================================
# Pure rules
# ============================================================================================


@pytest.mark.parametrize(
    "body, uid",
    [
        ('"abc-123"', "abc-123"),  # v1: a JSON string
        ('{"uid": "f00d.1_2", "model": "toy"}', "f00d.1_2"),  # v2: an object
        (' "padded" \n', "padded"),
        ("bare-uid", "bare-uid"),  # not JSON at all, still a clean uid
    ],
)
def test_parse_task_uid(body, uid):
    assert parse_task_uid(body) == uid


@pytest.mark.parametrize(
    "body",
    ['"../../etc"', '".."', '"a/b"', '"a?b=c"', '""', "{}", '{"uid": 5}', "[]", "null", '"' + "a" * 129 + '"',
     '"-rf"', '"a b"', '"%2e%2e"', "<html>error</html>"],
)
def test_parse_task_uid_refuses_unsafe_values(body):
    with pytest.raises(InvalidTaskUid):
        parse_task_uid(body)


def test_validate_uid_is_applied_before_urls_and_file_names():
    assert validate_uid("A1._-z") == "A1._-z"
    with pytest.raises(InvalidTaskUid):
        validate_uid(".hidden")


@pytest.mark.parametrize(
    "body, message",
    [
        (b'{"detail": "model not found"}', "model not found"),
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
    for bad in ("ftp://h", "h/api", "https://h/?x=1"):
        with pytest.raises(ValueError):
            normalize_base_url(bad)


def test_status_rules():
    assert [poll_state(c) for c in (200, 551, 552, 553, 554, 500, 502, 404)] == [
        "ready", "pending", "failed", "failed", "not_found", "error", "error", "error"
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
    try:
        from tests.support.emulator import EmulatorProcess
    except ImportError:
        missing("tests/support/emulator.py")
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

    def poll(self, uid):
        result = self.client.poll(uid)
        self.codes.append(result.status_code)
        return result


def run_task(client, archive, model, policy=FAST, **kwargs):
    uid = client.submit(archive, model)
    recording = Recording(client)
    lines: list[str] = []
    path = wait_for_outputs(recording, uid, time.time(), policy, on_progress=lines.append, **kwargs)
    return uid, path, recording.codes, lines


def collapse(codes: list[int]) -> list[int]:
    return [c for i, c in enumerate(codes) if i == 0 or codes[i - 1] != c]


@pytest.mark.parametrize("protocol", ["v1", "v2"])
def test_round_trip(start_emulator, series, tmp_path, protocol):
    emulator = start_emulator(delay=1.0, v1_register_delay=0.5)
    client = client_for(emulator, protocol, tmp_path)
    archive = input_archive(client, series, tmp_path)

    uid, output, codes, lines = run_task(client, archive, "toy")

    if protocol == "v1":
        # The v1 quirk: not found right after the submit, then pending, then the outputs.
        assert collapse(codes) == [554, 551, 200]
        assert any("not found yet" in line for line in lines)
    else:
        assert collapse(codes) == [551, 200]
    assert output.parent == tmp_path / "downloads" and uid in output.name
    extracted = safe_extract(output, tmp_path / "outputs", max_total_bytes=100 * MB)
    assert extracted.skipped == []
    dicoms = find_dicom_files(tmp_path / "outputs")
    assert len(dicoms) == 1 < len(extracted.files)  # the log and the NIfTI mask are skipped
    assert dcmread(dicoms[0]).SOPClassUID == RTStructureSetStorage

    stats = emulator.stats()
    task = next(t for t in stats["tasks"] if t["uid"] == uid)
    assert (task["protocol"], task["input_files"]) == (protocol, 3)

    client.delete(uid)
    client.delete(uid)  # already gone (554): not an error
    assert next(t for t in emulator.stats()["tasks"] if t["uid"] == uid)["deleted"]
    assert client.poll(uid).state in ("failed", "not_found")


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


@pytest.mark.parametrize("protocol, code", [("v1", 550), ("v2", 554)])
def test_unknown_model_is_rejected_without_retrying(start_emulator, series, tmp_path, protocol, code):
    emulator = start_emulator(delay=0.3)
    client = client_for(emulator, protocol, tmp_path)
    retries = []
    with pytest.raises(SubmitRejected) as caught:
        submit_with_retry(
            client, input_archive(client, series, tmp_path), "no-such-model",
            deadline_seconds=30, on_retry=lambda *a: retries.append(a),
        )
    assert caught.value.status_code == code
    assert "no-such-model" in str(caught.value) and f"HTTP {code}" in str(caught.value)
    assert retries == []
    assert emulator.stats()["rejected_submits"] == 1


@pytest.mark.parametrize("protocol", ["v1", "v2"])
def test_internal_errors_while_polling_are_retried(start_emulator, series, tmp_path, protocol):
    emulator = start_emulator(delay=0.3, v1_register_delay=0.2)
    client = client_for(emulator, protocol, tmp_path)
    _, output, codes, lines = run_task(client, input_archive(client, series, tmp_path), "internal-error")
    assert codes.count(500) == 2 and codes[-1] == 200
    assert any("server trouble" in line and "HTTP 500" in line for line in lines)
    assert output.is_file()


def test_internal_errors_on_submit_are_retried(start_emulator, series, tmp_path):
    emulator = start_emulator(delay=0.3, extra_args=["--fail-submits", "2"])
    client = client_for(emulator, "v2", tmp_path)
    retries = []
    uid = submit_with_retry(
        client, input_archive(client, series, tmp_path), "toy", deadline_seconds=30,
        backoff=Backoff(initial=0.1, maximum=0.3), on_retry=lambda exc, n, d: retries.append(exc),
    )
    assert len(retries) == 2 and all(e.status_code == 500 and not e.maybe_accepted for e in retries)
    assert [t["uid"] for t in emulator.stats()["tasks"]] == [uid]


@pytest.mark.parametrize("protocol", ["v1", "v2"])
def test_server_down_then_back(start_emulator, series, tmp_path, protocol):
    emulator = start_emulator(delay=1.0, v1_register_delay=0.2)
    client = client_for(emulator, protocol, tmp_path)
    archive = input_archive(client, series, tmp_path)

    # Submit while the server is down: connection refused is retried until it is back.
    emulator.kill()
    retries: list[ServerUnavailable] = []
    restart = threading.Timer(1.5, emulator.restart)
    restart.start()
    try:
        uid = submit_with_retry(
            client, archive, "toy", deadline_seconds=30,
            backoff=Backoff(initial=0.2, maximum=0.5), on_retry=lambda exc, n, d: retries.append(exc),
        )
    finally:
        restart.join()
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
    with pytest.raises(ServerUnavailable):
        submit_with_retry(client, archive, "toy", deadline_seconds=1.0, backoff=Backoff(initial=0.2, maximum=0.3))
    assert 0.9 < time.monotonic() - started < 5


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


def test_oversized_download_fails_the_task(start_emulator, series, tmp_path):
    emulator = start_emulator(delay=0.2, v1_register_delay=0.2)
    client = client_for(emulator, "v2", tmp_path, max_download_bytes=200)
    with pytest.raises(TaskFailed, match="exceeds the limit of 200"):
        run_task(client, input_archive(client, series, tmp_path), "toy")
    assert list((tmp_path / "downloads").glob("*")) == []


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
    """Answers every request with (status, body, delay) from `answers`, in turn."""

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
        status, payload, delay = self.server.answers.pop(0)
        time.sleep(delay)
        self.send_response(status)
        self.send_header("Content-Length", str(len(payload)))
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


def test_a_lost_submit_answer_may_have_been_accepted(scripted, tmp_path):
    server = scripted((200, b'"late"', 3.0))
    client = make_test_client(
        InferenceServerRef(server.url + "/api/tasks/", "m", "v1"), ClientSettings(post_timeout=0.5), tmp_path
    )
    archive = tmp_path / "a.zip"
    archive.write_bytes(b"PK\x05\x06" + b"\0" * 18)
    with pytest.raises(ServerUnavailable) as caught:
        client.submit(archive, "m")
    assert caught.value.maybe_accepted  # the server got the upload: a retry could run the model twice


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
