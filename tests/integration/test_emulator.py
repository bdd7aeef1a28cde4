"""The InferenceServer emulator, driven as a real process over HTTP(S) through both protocols."""

from __future__ import annotations

import http.client
import io
import json
import os
import stat
import tarfile
import time
import zipfile
from pathlib import Path
from urllib.parse import urljoin

import pydicom
import pytest
import requests
from pydicom.uid import ExplicitVRLittleEndian, RTStructureSetStorage, SecondaryCaptureImageStorage

from isdr_devtools import synthetic
from tests.support.emulator import EmulatorProcess

PATIENT_ID = "PID-SECRET-4711"
PATIENT_NAME = "Secretname^Jane"
BOMB_BYTES = 16 * 1024 * 1024
TIMEOUT = 15


# --- fixtures and helpers -------------------------------------------------------------------


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    with EmulatorProcess(
        tmp_path_factory.mktemp("emulator"),
        delay=0.3,
        v1_register_delay=0.3,
        extra_args=["--bomb-bytes", str(BOMB_BYTES)],
    ) as process:
        yield process


@pytest.fixture(scope="module")
def ct_files(tmp_path_factory) -> list[Path]:
    return synthetic.write_ct_series(
        tmp_path_factory.mktemp("ct"), count=4, rows=32, cols=32, patient_id=PATIENT_ID, patient_name=PATIENT_NAME
    )


@pytest.fixture(scope="module")
def sc_files(tmp_path_factory) -> list[Path]:
    return synthetic.write_small_instances(
        tmp_path_factory.mktemp("sc"), count=2, kind="SC", size=8, patient_id=PATIENT_ID, patient_name=PATIENT_NAME
    )


def zip_of(files: list[Path], extra: dict[str, bytes] | None = None) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path in files:
            archive.write(path, path.name)
        for name, data in (extra or {}).items():
            archive.writestr(name, data)
    return buffer.getvalue()


def tar_of(series: dict[str, list[Path]], extra: dict[str, bytes] | None = None) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for folder, files in series.items():
            for path in files:
                archive.add(path, f"{folder}/{path.name}")
        for name, data in (extra or {}).items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def submit_v1(emulator: EmulatorProcess, model: str, archive: bytes) -> requests.Response:
    return requests.post(
        emulator.v1_tasks_url,
        params={"model_human_readable_id": model},
        files={"zip_file": ("series.zip", archive, "application/zip")},
        verify=emulator.verify,
        timeout=TIMEOUT,
    )


def submit_v2(emulator: EmulatorProcess, model: str, archive: bytes) -> requests.Response:
    return requests.post(
        f"{emulator.base_url}/api/tasks/",
        params={"human_readable_id": model},
        files={"tar_file": ("series.tar", archive, "application/x-tar")},
        verify=emulator.verify,
        timeout=TIMEOUT,
    )


def poll_v1(emulator: EmulatorProcess, uid: str) -> requests.Response:
    return requests.get(urljoin(emulator.v1_tasks_url, uid), verify=emulator.verify, timeout=TIMEOUT)


def poll_v2(emulator: EmulatorProcess, uid: str) -> requests.Response:
    return requests.get(
        f"{emulator.base_url}/api/tasks/outputs/", params={"uid": uid}, verify=emulator.verify, timeout=TIMEOUT
    )


def delete_v1(emulator: EmulatorProcess, uid: str) -> requests.Response:
    return requests.delete(urljoin(emulator.v1_tasks_url, uid), verify=emulator.verify, timeout=TIMEOUT)


def delete_v2(emulator: EmulatorProcess, uid: str) -> requests.Response:
    return requests.delete(
        f"{emulator.base_url}/api/tasks/", params={"uid": uid}, verify=emulator.verify, timeout=TIMEOUT
    )


def wait_for(poll, uid: str, waiting=(551, 554), timeout: float = 10.0) -> requests.Response:
    """Poll until the answer is no longer one of `waiting`; return that answer."""
    deadline = time.monotonic() + timeout
    while True:
        response = poll(uid)
        if response.status_code not in waiting or time.monotonic() > deadline:
            return response
        time.sleep(0.05)


def v1_uid(response: requests.Response) -> str:
    assert response.status_code == 200, response.text
    uid = response.json()
    assert isinstance(uid, str) and uid
    return uid


def v2_uid(response: requests.Response) -> str:
    assert response.status_code == 200, response.text
    task = response.json()
    assert isinstance(task, dict) and task["uid"]
    return task["uid"]


def zip_members(data: bytes) -> dict[str, zipfile.ZipInfo]:
    return {info.filename: info for info in zipfile.ZipFile(io.BytesIO(data)).infolist()}


def tar_members(data: bytes) -> dict[str, tarfile.TarInfo]:
    return {info.name: info for info in tarfile.open(fileobj=io.BytesIO(data), mode="r:*").getmembers()}


def dicom_entries_of_zip(data: bytes) -> list[pydicom.Dataset]:
    archive = zipfile.ZipFile(io.BytesIO(data))
    result = []
    for info in archive.infolist():
        if info.filename.endswith(".dcm") and info.filename.startswith("predictions/RS"):
            result.append(pydicom.dcmread(io.BytesIO(archive.read(info))))
    return result


def task_in_stats(emulator: EmulatorProcess, uid: str) -> dict:
    (task,) = [t for t in emulator.stats()["tasks"] if t["uid"] == uid]
    return task


# --- protocol v1 ----------------------------------------------------------------------------


def test_v1_toy_returns_an_rtstruct_referencing_the_input(emulator, ct_files):
    uid = v1_uid(submit_v1(emulator, "toy", zip_of(ct_files)))
    response = wait_for(lambda u: poll_v1(emulator, u), uid)
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"] == "application/zip"

    members = zip_members(response.content)
    assert "log.txt" in members and "predictions/mask.nii.gz" in members
    (rtstruct_name,) = [n for n in members if n.startswith("predictions/RS.") and n.endswith(".dcm")]
    raw = zipfile.ZipFile(io.BytesIO(response.content)).read(rtstruct_name)
    assert raw[128:132] == b"DICM"
    rs = pydicom.dcmread(io.BytesIO(raw), force=False)

    inputs = [pydicom.dcmread(p) for p in ct_files]
    first = inputs[0]
    assert rs.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert rs.SOPClassUID == RTStructureSetStorage and rs.Modality == "RTSTRUCT"
    assert rs.file_meta.MediaStorageSOPInstanceUID == rs.SOPInstanceUID
    # Filed under the same patient and study, as a new series with new UIDs.
    assert rs.PatientID == PATIENT_ID and str(rs.PatientName) == PATIENT_NAME
    assert rs.PatientBirthDate == first.PatientBirthDate
    assert rs.StudyInstanceUID == first.StudyInstanceUID
    assert rs.SeriesInstanceUID != first.SeriesInstanceUID
    assert rs.SOPInstanceUID not in {ds.SOPInstanceUID for ds in inputs}

    (frame,) = rs.ReferencedFrameOfReferenceSequence
    assert frame.FrameOfReferenceUID == first.FrameOfReferenceUID
    (study,) = frame.RTReferencedStudySequence
    assert study.ReferencedSOPInstanceUID == first.StudyInstanceUID
    (series,) = study.RTReferencedSeriesSequence
    assert series.SeriesInstanceUID == first.SeriesInstanceUID
    assert {i.ReferencedSOPInstanceUID for i in series.ContourImageSequence} == {ds.SOPInstanceUID for ds in inputs}

    (roi,) = rs.StructureSetROISequence
    assert roi.ReferencedFrameOfReferenceUID == first.FrameOfReferenceUID
    (roi_contour,) = rs.ROIContourSequence
    assert roi_contour.ReferencedROINumber == roi.ROINumber
    contours = roi_contour.ContourSequence
    assert len(contours) == len(inputs)
    z_by_sop = {ds.SOPInstanceUID: float(ds.ImagePositionPatient[2]) for ds in inputs}
    for contour in contours:
        assert contour.ContourGeometricType == "CLOSED_PLANAR"
        assert contour.NumberOfContourPoints == 4 and len(contour.ContourData) == 12
        (image,) = contour.ContourImageSequence
        # Each contour lies in the plane of the slice it references.
        assert all(abs(float(z) - z_by_sop[image.ReferencedSOPInstanceUID]) < 1e-3 for z in contour.ContourData[2::3])

    task = task_in_stats(emulator, uid)
    assert task["protocol"] == "v1" and task["model"] == "toy" and task["input_files"] == len(ct_files)


def test_v1_poll_right_after_submit_answers_554_then_the_output(tmp_path, ct_files):
    with EmulatorProcess(tmp_path, delay=0.0, v1_register_delay=1.5) as slow_register:
        uid = v1_uid(submit_v1(slow_register, "toy", zip_of(ct_files)))
        right_after = poll_v1(slow_register, uid)
        assert right_after.status_code == 554
        assert "not found" in right_after.json()["detail"]
        assert delete_v1(slow_register, uid).status_code == 554  # not stored yet either
        later = wait_for(lambda u: poll_v1(slow_register, u), uid)
        assert later.status_code == 200


def test_v1_pending_answers_551(emulator, ct_files):
    uid = v1_uid(submit_v1(emulator, "slow", zip_of(ct_files)))  # 3 x 0.3 s
    response = wait_for(lambda u: poll_v1(emulator, u), uid, waiting=(554,))
    assert response.status_code == 551
    assert "detail" in response.json()
    assert wait_for(lambda u: poll_v1(emulator, u), uid).status_code == 200


def test_v1_unknown_model_answers_550(emulator, ct_files):
    before = emulator.stats()["rejected_submits"]
    response = submit_v1(emulator, "unknown", zip_of(ct_files))
    assert response.status_code == 550
    assert "unknown" in response.json()["detail"]
    assert emulator.stats()["rejected_submits"] == before + 1


@pytest.mark.parametrize(
    ("model", "code", "message"),
    [("fail", 552, "model crashed (emulated)"), ("missing-output", 553, "missing")],
)
def test_v1_failures(emulator, ct_files, model, code, message):
    uid = v1_uid(submit_v1(emulator, model, zip_of(ct_files)))
    response = wait_for(lambda u: poll_v1(emulator, u), uid)
    assert response.status_code == code
    assert message in response.json()["detail"]


def test_v1_internal_error_answers_500_twice_then_the_output(emulator, ct_files):
    uid = v1_uid(submit_v1(emulator, "internal-error", zip_of(ct_files)))
    answers = []
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        code = poll_v1(emulator, uid).status_code
        if code != 554:
            answers.append(code)
        if code == 200:
            break
        time.sleep(0.05)
    assert answers[:2] == [500, 500]
    assert answers[-1] == 200 and 500 not in answers[2:]


def test_v1_delete(emulator, ct_files):
    uid = v1_uid(submit_v1(emulator, "toy", zip_of(ct_files)))
    assert wait_for(lambda u: poll_v1(emulator, u), uid).status_code == 200
    assert delete_v1(emulator, uid).status_code == 200
    after = poll_v1(emulator, uid)
    assert after.status_code == 552 and "deleted" in after.json()["detail"]
    assert delete_v1(emulator, uid).status_code == 554
    assert delete_v1(emulator, "0" * 32).status_code == 554
    assert task_in_stats(emulator, uid)["deleted"] is True


def test_v1_unknown_uid_answers_554(emulator):
    response = poll_v1(emulator, "f" * 32)
    assert response.status_code == 554
    assert response.json()["detail"]


def test_non_dicom_members_of_the_upload_are_skipped(emulator, ct_files):
    archive = zip_of(ct_files, extra={"README.txt": b"not dicom", "fake.dcm": b"\0" * 300})
    uid = v1_uid(submit_v1(emulator, "toy", archive))
    assert wait_for(lambda u: poll_v1(emulator, u), uid).status_code == 200
    task = task_in_stats(emulator, uid)
    assert task["input_files"] == len(ct_files) and task["skipped_files"] == 2


def test_corrupt_upload_fails_the_task_not_the_server(emulator, ct_files):
    uid = v1_uid(submit_v1(emulator, "toy", b"PK\x03\x04 this is no zip"))
    response = wait_for(lambda u: poll_v1(emulator, u), uid)
    assert response.status_code == 552
    assert "invalid input" in response.json()["detail"]

    uid = v2_uid(submit_v2(emulator, "toy", tar_of({}, extra={"series/notes.txt": b"hello"})))
    response = wait_for(lambda u: poll_v2(emulator, u), uid)
    assert response.status_code == 552
    assert "no DICOM" in response.json()["detail"]

    # Still serving.
    uid = v1_uid(submit_v1(emulator, "toy", zip_of(ct_files)))
    assert wait_for(lambda u: poll_v1(emulator, u), uid).status_code == 200


# --- protocol v2 ----------------------------------------------------------------------------


def test_v2_toy_answers_one_prediction_per_series(emulator, ct_files, sc_files):
    response = submit_v2(emulator, "toy-v2", tar_of({"ct": ct_files, "sc": sc_files}))
    assert response.status_code == 200
    task = response.json()
    assert task["model"] == "toy-v2" and task["status"] in ("pending", "running") and task["created_at"]
    uid = task["uid"]

    assert poll_v2(emulator, uid).status_code == 551  # the delay has just begun
    response = wait_for(lambda u: poll_v2(emulator, u), uid)
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "application/x-tar"

    archive = tarfile.open(fileobj=io.BytesIO(response.content))
    members = {m.name: m for m in archive.getmembers()}
    assert "log.txt" in members and "predictions/mask.nii.gz" in members
    outputs = [
        pydicom.dcmread(archive.extractfile(m))
        for name, m in members.items()
        if name.endswith(".dcm") and m.isreg()
    ]
    by_class = {str(ds.SOPClassUID): ds for ds in outputs}
    assert set(by_class) == {RTStructureSetStorage, SecondaryCaptureImageStorage}

    rs = by_class[RTStructureSetStorage]
    ct_series = pydicom.dcmread(ct_files[0]).SeriesInstanceUID
    assert rs.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0].RTReferencedSeriesSequence[
        0
    ].SeriesInstanceUID == ct_series

    # The secondary captures have no geometry, so the model answered with an SC image.
    sc = by_class[SecondaryCaptureImageStorage]
    sc_inputs = [pydicom.dcmread(p) for p in sc_files]
    assert sc.StudyInstanceUID == sc_inputs[0].StudyInstanceUID and sc.PatientID == PATIENT_ID
    assert {i.ReferencedSOPInstanceUID for i in sc.SourceImageSequence} == {d.SOPInstanceUID for d in sc_inputs}
    (referenced,) = sc.ReferencedSeriesSequence
    assert referenced.SeriesInstanceUID == sc_inputs[0].SeriesInstanceUID
    assert len(sc.PixelData) == sc.Rows * sc.Columns

    assert task_in_stats(emulator, uid)["input_files"] == len(ct_files) + len(sc_files)


def test_v2_unknown_model_answers_554(emulator, ct_files):
    response = submit_v2(emulator, "unknown", tar_of({"ct": ct_files}))
    assert response.status_code == 554
    assert "unknown" in response.json()["detail"]


@pytest.mark.parametrize(
    ("model", "code", "message"),
    [("fail", 552, "model crashed (emulated)"), ("missing-output", 553, "missing")],
)
def test_v2_failures(emulator, ct_files, model, code, message):
    uid = v2_uid(submit_v2(emulator, model, tar_of({"ct": ct_files})))
    response = wait_for(lambda u: poll_v2(emulator, u), uid)
    assert response.status_code == code
    assert message in response.json()["detail"]


def test_v2_internal_error_answers_500_twice_then_the_output(emulator, ct_files):
    uid = v2_uid(submit_v2(emulator, "internal-error", tar_of({"ct": ct_files})))
    assert poll_v2(emulator, uid).status_code == 500
    assert poll_v2(emulator, uid).status_code == 500
    assert wait_for(lambda u: poll_v2(emulator, u), uid).status_code == 200


def test_v2_delete(emulator, ct_files):
    uid = v2_uid(submit_v2(emulator, "toy", tar_of({"ct": ct_files})))
    response = delete_v2(emulator, uid)  # deleting a pending task is allowed
    assert response.status_code == 200
    assert response.json()["uid"] == uid and response.json()["status"] == "deleted"
    assert poll_v2(emulator, uid).status_code == 552
    assert delete_v2(emulator, uid).status_code == 554
    assert delete_v2(emulator, "0" * 32).status_code == 554
    assert poll_v2(emulator, "0" * 32).status_code == 554


def test_protocols_do_not_see_each_others_tasks(emulator, ct_files):
    uid = v1_uid(submit_v1(emulator, "toy", zip_of(ct_files)))
    assert wait_for(lambda u: poll_v1(emulator, u), uid).status_code == 200
    assert poll_v2(emulator, uid).status_code == 554
    assert delete_v2(emulator, uid).status_code == 554


# --- hostile outputs ------------------------------------------------------------------------


def test_evil_dotdot(emulator, ct_files):
    uid = v1_uid(submit_v1(emulator, "evil-dotdot", zip_of(ct_files)))
    zipped = zip_members(wait_for(lambda u: poll_v1(emulator, u), uid).content)
    assert {"../../escaped.dcm", "/tmp/isdr-absolute-escape.dcm"} <= set(zipped)
    assert any(n.startswith("predictions/RS.") for n in zipped)

    uid = v2_uid(submit_v2(emulator, "evil-dotdot", tar_of({"ct": ct_files})))
    tarred = tar_members(wait_for(lambda u: poll_v2(emulator, u), uid).content)
    assert {"../../escaped.dcm", "/tmp/isdr-absolute-escape.dcm"} <= set(tarred)
    assert any(n.startswith("predictions/RS.") for n in tarred)


def test_evil_symlink(emulator, ct_files):
    uid = v1_uid(submit_v1(emulator, "evil-symlink", zip_of(ct_files)))
    data = wait_for(lambda u: poll_v1(emulator, u), uid).content
    zipped = zip_members(data)
    link = zipped["predictions/passwd.dcm"]
    assert stat.S_ISLNK(link.external_attr >> 16)
    assert zipfile.ZipFile(io.BytesIO(data)).read(link) == b"/etc/passwd"
    assert "predictions/outside/isdr-through-symlink.dcm" in zipped
    assert dicom_entries_of_zip(data)

    uid = v2_uid(submit_v2(emulator, "evil-symlink", tar_of({"ct": ct_files})))
    tarred = tar_members(wait_for(lambda u: poll_v2(emulator, u), uid).content)
    assert tarred["predictions/passwd.dcm"].issym() and tarred["predictions/passwd.dcm"].linkname == "/etc/passwd"
    assert tarred["predictions/hardlink.dcm"].islnk()
    assert tarred["predictions/outside"].issym()
    assert any(n.startswith("predictions/RS.") and m.isreg() for n, m in tarred.items())


def test_evil_bomb(emulator, ct_files):
    uid = v1_uid(submit_v1(emulator, "evil-bomb", zip_of(ct_files)))
    response = wait_for(lambda u: poll_v1(emulator, u), uid)
    assert response.status_code == 200
    bomb = zip_members(response.content)["predictions/bomb.dcm"]
    assert bomb.file_size == BOMB_BYTES
    assert len(response.content) < BOMB_BYTES / 100
    assert dicom_entries_of_zip(response.content)

    uid = v2_uid(submit_v2(emulator, "evil-bomb", tar_of({"ct": ct_files})))
    response = wait_for(lambda u: poll_v2(emulator, u), uid)
    assert response.status_code == 200
    assert tar_members(response.content)["predictions/bomb.dcm"].size == BOMB_BYTES
    assert len(response.content) < BOMB_BYTES / 100  # a gzip-compressed tar


# --- uploads, submit failures, restarts, TLS ------------------------------------------------


def _multipart(field: str, filename: str, data: bytes, boundary: str = "xYzZY-boundary") -> tuple[bytes, str]:
    body = (
        f"--{boundary}\r\n"
        f'Content-Disposition: form-data; name="note"\r\n\r\n'
        f"hello\r\n"
        f"--{boundary}\r\n"
        f'Content-Disposition: form-data; name="{field}"; filename="{filename}"\r\n'
        f"Content-Type: application/octet-stream\r\n\r\n"
    ).encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def test_chunked_upload_is_accepted(emulator, ct_files):
    body, content_type = _multipart("zip_file", "series.zip", zip_of(ct_files))

    def chunks():  # a generator body makes requests use Transfer-Encoding: chunked
        for start in range(0, len(body), 777):
            yield body[start : start + 777]

    response = requests.post(
        emulator.v1_tasks_url,
        params={"model_human_readable_id": "toy"},
        data=chunks(),
        headers={"Content-Type": content_type},
        timeout=TIMEOUT,
    )
    uid = v1_uid(response)
    assert wait_for(lambda u: poll_v1(emulator, u), uid).status_code == 200


def test_keep_alive_connection_survives_uploads(emulator, ct_files):
    # One connection for everything, as the relay's requests.Session does: the server must read
    # each body to its very end, or leftovers are taken for the next request.
    connection = http.client.HTTPConnection("127.0.0.1", emulator.port, timeout=TIMEOUT)
    body, content_type = _multipart("zip_file", "series.zip", zip_of(ct_files))
    try:
        for model, expected, chunked in (("toy", 200, False), ("toy", 200, True), ("unknown", 550, True)):
            connection.request(
                "POST",
                f"/api/tasks/?model_human_readable_id={model}",
                body=iter([body[:1000], body[1000:]]) if chunked else body,
                headers={"Content-Type": content_type},
                encode_chunked=chunked,
            )
            response = connection.getresponse()
            response.read()
            assert response.status == expected
            assert not response.will_close
        connection.request("GET", "/_emulator/stats")
        response = connection.getresponse()
        assert response.status == 200 and json.loads(response.read())["submits"] >= 2
    finally:
        connection.close()


def test_malformed_uploads_answer_422(emulator, ct_files):
    url = emulator.v1_tasks_url
    wrong_field = requests.post(
        url, params={"model_human_readable_id": "toy"}, files={"file": ("x.zip", zip_of(ct_files))}, timeout=TIMEOUT
    )
    assert wrong_field.status_code == 422 and "zip_file" in wrong_field.json()["detail"]
    not_multipart = requests.post(url, params={"model_human_readable_id": "toy"}, data=b"abc", timeout=TIMEOUT)
    assert not_multipart.status_code == 422
    body, content_type = _multipart("zip_file", "x.zip", b"data")
    truncated = requests.post(
        url,
        params={"model_human_readable_id": "toy"},
        data=body[: len(body) // 2],
        headers={"Content-Type": content_type},
        timeout=TIMEOUT,
    )
    assert truncated.status_code == 422
    no_model = requests.post(url, files={"zip_file": ("x.zip", b"x")}, timeout=TIMEOUT)
    assert no_model.status_code == 422
    assert requests.get(f"{emulator.base_url}/nowhere", timeout=TIMEOUT).status_code == 404


def test_fail_submits_and_upload_limit(tmp_path, ct_files):
    archive = zip_of(ct_files)
    with EmulatorProcess(
        tmp_path, extra_args=["--fail-submits", "2", "--max-upload-bytes", str(len(archive) + 4096)]
    ) as emulator:
        assert submit_v1(emulator, "toy", archive).status_code == 500
        assert submit_v2(emulator, "toy", tar_of({"ct": ct_files})).status_code == 500
        v1_uid(submit_v1(emulator, "toy", archive))
        stats = emulator.stats()
        assert stats["submits"] == 1 and stats["injected_submit_failures"] == 2
        assert stats["rejected_submits"] == 2

        too_big = submit_v1(emulator, "toy", archive + b"\0" * 10000)
        assert too_big.status_code == 413

        emulator.reset()  # a fresh server: counters cleared, failures re-armed
        stats = emulator.stats()
        assert stats["submits"] == 0 and stats["tasks"] == [] and stats["fail_submits_left"] == 2
        assert submit_v1(emulator, "toy", archive).status_code == 500


def test_restart_keeps_tasks_and_port(tmp_path, ct_files):
    emulator = EmulatorProcess(tmp_path, delay=1.0, v1_register_delay=0.0)
    try:
        port = emulator.port
        uid = v2_uid(submit_v2(emulator, "toy", tar_of({"ct": ct_files})))
        emulator.kill()
        with pytest.raises(requests.ConnectionError):
            poll_v2(emulator, uid)
        emulator.restart()
        assert emulator.port == port
        assert wait_for(lambda u: poll_v2(emulator, u), uid).status_code == 200
    finally:
        emulator.stop()


def test_tls_verifies_against_the_generated_ca(tmp_path, ct_files):
    with EmulatorProcess(tmp_path, tls=True, v1_register_delay=0.0) as emulator:
        assert emulator.base_url.startswith("https://127.0.0.1:")
        for name in ("ca.pem", "ca-key.pem", "server.pem", "server-key.pem"):
            assert (emulator.tls_dir / name).exists()
        assert stat.S_IMODE(os.stat(emulator.tls_dir / "ca-key.pem").st_mode) == 0o600

        uid = v1_uid(submit_v1(emulator, "toy", zip_of(ct_files)))
        assert wait_for(lambda u: poll_v1(emulator, u), uid).status_code == 200

        with pytest.raises(requests.exceptions.SSLError):
            requests.get(f"{emulator.base_url}/_emulator/stats", timeout=TIMEOUT)  # system CAs only
        with pytest.raises(requests.ConnectionError):
            requests.get(f"http://127.0.0.1:{emulator.port}/_emulator/stats", timeout=TIMEOUT)
        # "localhost" is in the certificate too.
        response = requests.get(
            f"https://localhost:{emulator.port}/_emulator/stats", verify=emulator.verify, timeout=TIMEOUT
        )
        assert response.status_code == 200

        ca_before = emulator.ca_file.read_bytes()
        emulator.restart()
        assert emulator.ca_file.read_bytes() == ca_before  # clients keep trusting it
        assert emulator.stats()["tasks"][0]["uid"] == uid


def test_logs_one_line_per_request_without_patient_data(emulator):
    log = emulator.output()
    assert '"POST /api/tasks/?model_human_readable_id=toy" 200' in log
    assert "/api/tasks/outputs/?uid=" in log
    for secret in (PATIENT_ID, PATIENT_NAME, "Secretname", "19700101"):
        assert secret not in log


def test_stats_count_requests(emulator):
    stats = emulator.stats()
    assert stats["submits"] >= 1 and stats["polls"] >= 1 and stats["deletes"] >= 1
    assert stats["submits_by_model"]["toy"] >= 1
    assert set(stats["tasks"][0]) >= {"uid", "model", "protocol", "status", "input_files", "deleted"}
    assert json.dumps(stats)  # plain JSON
