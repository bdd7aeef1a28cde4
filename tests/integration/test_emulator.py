"""The InferenceServer emulator, driven as a real process over HTTP(S) through both protocols.

It must answer as the real releases v1.2 and 2.0 do (INFERENCE_SERVER_API.md), bugs included:
these tests are the emulator's side of that promise.
"""

from __future__ import annotations

import gzip
import http.client
import io
import json
import os
import re
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
from tests.support.processes import wait_until

REAL_UID = re.compile(r"[A-Za-z0-9_-]{43}")  # secrets.token_urlsafe()
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
    assert isinstance(uid, str) and REAL_UID.fullmatch(uid)
    return uid


def v2_uid(response: requests.Response) -> str:
    assert response.status_code == 200, response.text
    task = response.json()
    assert isinstance(task, dict) and REAL_UID.fullmatch(task["uid"])
    return task["uid"]


def v1_detail(response: requests.Response) -> str:
    """v1's nested error body: {"detail": {"detail": "..."}}."""
    return response.json()["detail"]["detail"]


def assert_internal_server_error(response: requests.Response) -> None:
    """The bare 500 of a real server that crashed on the request."""
    assert response.status_code == 500
    assert response.headers["Content-Type"].startswith("text/plain")
    assert response.text == "Internal Server Error"


def zip_members(data: bytes) -> dict[str, zipfile.ZipInfo]:
    return {info.filename: info for info in zipfile.ZipFile(io.BytesIO(data)).infolist()}


def tar_members(data: bytes) -> dict[str, tarfile.TarInfo]:
    return {info.name: info for info in tarfile.open(fileobj=io.BytesIO(data), mode="r:*").getmembers()}


def dicom_entries_of_zip(data: bytes) -> list[pydicom.Dataset]:
    archive = zipfile.ZipFile(io.BytesIO(data))
    result = []
    for info in archive.infolist():
        if info.filename.endswith(".dcm") and info.filename.startswith("RS."):
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
    # v1.2 sends its zip chunked, with neither a Content-Type nor a Content-Length.
    assert response.headers["Transfer-Encoding"] == "chunked"
    assert "Content-Type" not in response.headers and "Content-Length" not in response.headers

    # The top-level files of the model's output folder; a sub-folder is a bare directory entry.
    members = zip_members(response.content)
    assert "log.txt" in members and "mask.nii.gz" in members
    assert members["intermediate/"].is_dir()
    assert not [n for n in members if n.startswith("intermediate/") and n != "intermediate/"]
    (rtstruct_name,) = [n for n in members if n.startswith("RS.") and n.endswith(".dcm")]
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
        assert "not found" in v1_detail(right_after)
        # Not stored yet: a delete finds nothing (and answers 500, as every v1.2 delete does)...
        assert_internal_server_error(delete_v1(slow_register, uid))
        # ...and the task is stored and runs all the same.
        later = wait_for(lambda u: poll_v1(slow_register, u), uid)
        assert later.status_code == 200


def test_v1_pending_answers_551(emulator, ct_files):
    uid = v1_uid(submit_v1(emulator, "slow", zip_of(ct_files)))  # 3 x 0.3 s
    response = wait_for(lambda u: poll_v1(emulator, u), uid, waiting=(554,))
    assert response.status_code == 551
    assert v1_detail(response)
    assert wait_for(lambda u: poll_v1(emulator, u), uid).status_code == 200


def test_v1_unknown_model_answers_550(emulator, ct_files):
    before = emulator.stats()["rejected_submits"]
    response = submit_v1(emulator, "unknown", zip_of(ct_files))
    assert response.status_code == 550
    assert "unknown" in v1_detail(response)
    assert emulator.stats()["rejected_submits"] == before + 1


@pytest.mark.parametrize(
    ("model", "code", "message"),
    [("fail", 552, "model crashed (emulated)"), ("missing-output", 553, "missing")],
)
def test_v1_failures(emulator, ct_files, model, code, message):
    uid = v1_uid(submit_v1(emulator, model, zip_of(ct_files)))
    response = wait_for(lambda u: poll_v1(emulator, u), uid)
    assert response.status_code == code
    assert message in v1_detail(response)


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


def test_v1_delete_deletes_then_answers_500(emulator, ct_files):
    uid = v1_uid(submit_v1(emulator, "toy", zip_of(ct_files)))
    assert wait_for(lambda u: poll_v1(emulator, u), uid).status_code == 200
    assert_internal_server_error(delete_v1(emulator, uid))
    assert task_in_stats(emulator, uid)["deleted"] is True
    after = poll_v1(emulator, uid)  # a deleted task is not found
    assert after.status_code == 554 and "not found" in v1_detail(after)
    assert_internal_server_error(delete_v1(emulator, uid))  # for known and unknown uids alike
    assert_internal_server_error(delete_v1(emulator, "A" * 43))


def test_v1_unknown_uid_answers_554(emulator):
    response = poll_v1(emulator, "-" + "f" * 42)
    assert response.status_code == 554
    assert v1_detail(response)


def test_v1_model_that_writes_nothing_sends_the_no_output_marker(emulator, ct_files):
    uid = v1_uid(submit_v1(emulator, "no-output", zip_of(ct_files)))
    response = wait_for(lambda u: poll_v1(emulator, u), uid)
    assert response.status_code == 200
    assert list(zip_members(response.content)) == ["no_output_files_found.error"]


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
    assert "invalid input" in v1_detail(response)

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
    assert task["model"] == "toy-v2" and task["status"] in (0, 1) and task["created_at"]
    assert isinstance(task["id"], int) and REAL_UID.fullmatch(task["uid"])
    uid = task["uid"]

    assert poll_v2(emulator, uid).status_code == 551  # the delay has just begun
    response = wait_for(lambda u: poll_v2(emulator, u), uid)
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "application/x-tar"
    assert int(response.headers["Content-Length"]) == len(response.content)

    # An uncompressed tar of the model's top-level outputs, flat, plus an empty container.log.
    archive = tarfile.open(fileobj=io.BytesIO(response.content), mode="r:")
    members = {m.name: m for m in archive.getmembers()}
    assert "log.txt" in members and "mask.nii.gz" in members
    assert members["container.log"].isreg() and members["container.log"].size == 0
    assert all("/" not in name and m.isreg() for name, m in members.items())
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


def test_v2_unknown_model_answers_500_and_creates_no_task(emulator, ct_files):
    before = len(emulator.stats()["tasks"])
    assert_internal_server_error(submit_v2(emulator, "unknown", tar_of({"ct": ct_files})))
    assert len(emulator.stats()["tasks"]) == before


def test_v2_model_that_writes_nothing_sends_only_container_log(emulator, ct_files):
    uid = v2_uid(submit_v2(emulator, "no-output", tar_of({"ct": ct_files})))
    response = wait_for(lambda u: poll_v2(emulator, u), uid)
    assert response.status_code == 200
    assert list(tar_members(response.content)) == ["container.log"]


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
    assert_internal_server_error(delete_v2(emulator, uid))  # still running
    assert wait_for(lambda u: poll_v2(emulator, u), uid).status_code == 200
    response = delete_v2(emulator, uid)
    assert response.status_code == 200
    assert response.json()["uid"] == uid and response.json()["status"] == 4
    assert delete_v2(emulator, uid).status_code == 554
    assert delete_v2(emulator, "0" * 43).status_code == 554


def test_v2_poll_of_an_unknown_or_deleted_uid_answers_500(emulator, ct_files):
    assert_internal_server_error(poll_v2(emulator, "_" + "0" * 42))
    uid = v2_uid(submit_v2(emulator, "toy", tar_of({"ct": ct_files})))
    assert wait_for(lambda u: poll_v2(emulator, u), uid).status_code == 200
    assert delete_v2(emulator, uid).status_code == 200
    assert_internal_server_error(poll_v2(emulator, uid))


def test_protocols_do_not_see_each_others_tasks(emulator, ct_files):
    uid = v1_uid(submit_v1(emulator, "toy", zip_of(ct_files)))
    assert wait_for(lambda u: poll_v1(emulator, u), uid).status_code == 200
    assert_internal_server_error(poll_v2(emulator, uid))
    assert delete_v2(emulator, uid).status_code == 554


# --- hostile outputs ------------------------------------------------------------------------


def test_evil_dotdot(emulator, ct_files):
    uid = v1_uid(submit_v1(emulator, "evil-dotdot", zip_of(ct_files)))
    zipped = zip_members(wait_for(lambda u: poll_v1(emulator, u), uid).content)
    assert {"../../escaped.dcm", "/tmp/isdr-absolute-escape.dcm"} <= set(zipped)
    assert any(n.startswith("RS.") for n in zipped)

    uid = v2_uid(submit_v2(emulator, "evil-dotdot", tar_of({"ct": ct_files})))
    tarred = tar_members(wait_for(lambda u: poll_v2(emulator, u), uid).content)
    assert {"../../escaped.dcm", "/tmp/isdr-absolute-escape.dcm"} <= set(tarred)
    assert any(n.startswith("RS.") for n in tarred)


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
    assert any(n.startswith("RS.") and m.isreg() for n, m in tarred.items())


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


# --- the real uid alphabet, and the switches for failure modes ------------------------------


def test_uids_are_token_urlsafe_values_that_start_with_dash_or_underscore_at_the_real_rate():
    from isdr_devtools.emulator.tasks import new_uid

    uids = [new_uid() for _ in range(20000)]
    assert all(REAL_UID.fullmatch(uid) for uid in uids)
    leading = sum(uid[0] in "-_" for uid in uids)
    # 2 of the 64 characters: about 3.1 %, i.e. 625 of 20000 (a standard deviation is about 25).
    assert 450 < leading < 800


@pytest.mark.parametrize("prefix", ["-", "_", "-_"])
def test_uid_prefix_forces_a_leading_dash_or_underscore(tmp_path, ct_files, prefix):
    with EmulatorProcess(tmp_path, v1_register_delay=0.0, extra_args=[f"--uid-prefix={prefix}"]) as emulator:
        for uid in (v1_uid(submit_v1(emulator, "toy", zip_of(ct_files))),
                    v2_uid(submit_v2(emulator, "toy", tar_of({"ct": ct_files})))):
            assert uid.startswith(prefix) and REAL_UID.fullmatch(uid)
        assert poll_v1(emulator, uid).status_code == 554  # v2's uid through v1's URL: unknown there
        assert wait_for(lambda u: poll_v2(emulator, u), uid).status_code == 200


def test_v2_submit_hangs_while_the_queue_is_down_but_the_task_is_stored(tmp_path, ct_files):
    with EmulatorProcess(tmp_path, delay=0.2, extra_args=["--queue-down-for", "3"]) as emulator:
        with pytest.raises(requests.exceptions.ReadTimeout):
            requests.post(
                f"{emulator.base_url}/api/tasks/", params={"human_readable_id": "toy"},
                files={"tar_file": ("series.tar", tar_of({"ct": ct_files}), "application/x-tar")}, timeout=1,
            )
        (task,) = emulator.stats()["tasks"]  # the submit timed out, yet the task exists...
        assert task["status"] == "pending"
        assert poll_v2(emulator, task["uid"]).status_code == 551
        # ...and runs once the queue is back; a submit that waits long enough gets its answer.
        assert wait_for(lambda u: poll_v2(emulator, u), task["uid"]).status_code == 200
        assert v2_uid(submit_v2(emulator, "toy", tar_of({"ct": ct_files})))
        assert emulator.stats()["submits"] == 2


def test_redirect_polls_to_answers_302_to_the_same_path_elsewhere(tmp_path, ct_files):
    with EmulatorProcess(tmp_path, extra_args=["--redirect-polls-to", "http://127.0.0.1:9/x"]) as emulator:
        uid = v2_uid(submit_v2(emulator, "toy", tar_of({"ct": ct_files})))
        for url, params in ((f"{emulator.base_url}/api/tasks/outputs/", {"uid": uid}),
                            (urljoin(emulator.v1_tasks_url, uid), None)):
            response = requests.get(url, params=params, allow_redirects=False, timeout=TIMEOUT)
            assert response.status_code == 302
            assert response.headers["Location"] == "http://127.0.0.1:9/x" + response.request.path_url


def test_drip_sends_the_output_slowly(tmp_path, ct_files):
    with EmulatorProcess(tmp_path, delay=0.0, extra_args=["--drip-rate", "200"]) as emulator:
        uid = v2_uid(submit_v2(emulator, "drip", tar_of({"ct": ct_files})))
        wait_until(lambda: task_in_stats(emulator, uid)["status"] == "finished", what="the model ran")
        with requests.get(f"{emulator.base_url}/api/tasks/outputs/", params={"uid": uid}, stream=True,
                          timeout=TIMEOUT) as streamed:
            declared = int(streamed.headers["Content-Length"])
            received, started = 0, time.monotonic()
            while time.monotonic() - started < 1.0:
                received += len(streamed.raw.read(1))
        assert 0 < received < declared / 4  # a tar of several kB, at 200 bytes per second


def test_gzip_bomb_is_small_on_the_wire_and_large_decoded(emulator, ct_files):
    uid = v2_uid(submit_v2(emulator, "gzip-bomb", tar_of({"ct": ct_files})))
    assert wait_for(lambda u: poll_v2(emulator, u), uid).status_code == 200
    with requests.get(f"{emulator.base_url}/api/tasks/outputs/", params={"uid": uid}, stream=True,
                      timeout=TIMEOUT) as response:
        assert response.headers["Content-Encoding"] == "gzip"
        wire = response.raw.read(decode_content=False)
    assert len(wire) < BOMB_BYTES / 100
    decoded = gzip.decompress(wire)
    assert len(decoded) == BOMB_BYTES
    assert "container.log" in tar_members(decoded)  # a valid tar, its end padded with zeros


@pytest.mark.parametrize("protocol", ["v1", "v2"])
def test_endless_sends_the_output_then_never_ends(emulator, ct_files, protocol):
    if protocol == "v1":
        uid = v1_uid(submit_v1(emulator, "endless", zip_of(ct_files)))
        poll = lambda: requests.get(urljoin(emulator.v1_tasks_url, uid), stream=True, timeout=TIMEOUT)  # noqa: E731
    else:
        uid = v2_uid(submit_v2(emulator, "endless", tar_of({"ct": ct_files})))
        poll = lambda: requests.get(f"{emulator.base_url}/api/tasks/outputs/", params={"uid": uid},  # noqa: E731
                                    stream=True, timeout=TIMEOUT)
    deadline = time.monotonic() + 10
    while (response := poll()).status_code != 200 and time.monotonic() < deadline:
        response.close()
        time.sleep(0.05)
    with response:
        assert "Content-Length" not in response.headers
        received = 0
        for chunk in response.iter_content(1 << 20):
            received += len(chunk)
            if received > 8 * 1024 * 1024:
                break
    assert received > 8 * 1024 * 1024
