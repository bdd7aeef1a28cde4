"""The synthetic DICOM generator: valid Part-10 files, consistent geometry, hostile options."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.errors import InvalidDicomError
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    MRImageStorage,
    SecondaryCaptureImageStorage,
)

from isdr_devtools import synthetic

REPO_ROOT = Path(__file__).resolve().parents[2]


def _is_part10(path: Path) -> bool:
    with open(path, "rb") as handle:
        head = handle.read(132)
    return len(head) == 132 and head[128:] == b"DICM"


def test_ct_series_is_a_consistent_series(tmp_path):
    paths = synthetic.write_ct_series(
        tmp_path, count=5, rows=32, cols=24, series_description="Thorax", study_description="CT chest",
        patient_id="P1", patient_name="Doe^Jane",
    )
    assert len(paths) == 5 and all(p.exists() and _is_part10(p) for p in paths)
    datasets = [pydicom.dcmread(p) for p in paths]

    for ds in datasets:
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.file_meta.MediaStorageSOPClassUID == ds.SOPClassUID == CTImageStorage
        assert ds.Modality == "CT"
        assert (ds.Rows, ds.Columns) == (32, 24)
        assert len(ds.PixelData) == 32 * 24 * 2
        assert ds.PixelRepresentation == 1 and ds.BitsAllocated == 16
        assert float(ds.RescaleSlope) == 1.0 and float(ds.RescaleIntercept) == -1024.0
        assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
        assert len(ds.PixelSpacing) == 2
        assert ds.SeriesDescription == "Thorax" and ds.StudyDescription == "CT chest"
        assert ds.PatientID == "P1" and str(ds.PatientName) == "Doe^Jane"

    assert len({ds.SeriesInstanceUID for ds in datasets}) == 1
    assert len({ds.StudyInstanceUID for ds in datasets}) == 1
    assert len({ds.FrameOfReferenceUID for ds in datasets}) == 1
    assert len({ds.SOPInstanceUID for ds in datasets}) == 5
    assert [ds.InstanceNumber for ds in datasets] == [1, 2, 3, 4, 5]
    z = [float(ds.ImagePositionPatient[2]) for ds in datasets]
    thickness = float(datasets[0].SliceThickness)
    assert all(abs((b - a) - thickness) < 1e-3 for a, b in zip(z, z[1:], strict=False))


def test_ct_series_pixels_are_not_blank(tmp_path):
    (path,) = synthetic.write_ct_series(tmp_path, count=1, rows=64, cols=64)
    data = pydicom.dcmread(path).PixelData
    assert len(set(data)) > 1


def test_ct_series_honours_given_uids_and_transfer_syntax(tmp_path):
    study, series = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    paths = synthetic.write_ct_series(
        tmp_path, count=2, rows=8, cols=8, study_uid=study, series_uid=series,
        transfer_syntax=ImplicitVRLittleEndian, modality="MR",
    )
    for path in paths:
        ds = pydicom.dcmread(path)
        assert ds.StudyInstanceUID == study and ds.SeriesInstanceUID == series
        assert ds.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
        assert ds.Modality == "MR"


def test_unsupported_transfer_syntax_is_refused_clearly(tmp_path):
    with pytest.raises(ValueError, match="not supported"):
        synthetic.write_ct_series(tmp_path, count=1, transfer_syntax=JPEGBaseline8Bit)


def test_ct_generation_is_fast(tmp_path):
    started = time.monotonic()
    paths = synthetic.write_ct_series(tmp_path, count=60)
    elapsed = time.monotonic() - started
    assert len(paths) == 60
    # 300 slices should take a few seconds; 60 in well under 10 even on a slow CI machine.
    assert elapsed < 10, f"60 slices of 512x512 took {elapsed:.1f}s"


def test_small_instances_spread_over_series(tmp_path):
    paths = synthetic.write_small_instances(tmp_path, count=10, series_count=3)
    datasets = [pydicom.dcmread(p) for p in paths]
    by_series: dict[str, list] = {}
    for ds in datasets:
        by_series.setdefault(ds.SeriesInstanceUID, []).append(ds)
    assert sorted(len(v) for v in by_series.values()) == [3, 3, 4]
    assert len({ds.StudyInstanceUID for ds in datasets}) == 1
    for ds in datasets:
        assert ds.SOPClassUID == MRImageStorage
        assert (ds.Rows, ds.Columns) == (16, 16)
        assert "ImagePositionPatient" in ds and "FrameOfReferenceUID" in ds
    for members in by_series.values():
        assert sorted(ds.InstanceNumber for ds in members) == list(range(1, len(members) + 1))


def test_small_secondary_captures_have_no_geometry(tmp_path):
    paths = synthetic.write_small_instances(tmp_path, count=2, kind="SC", size=8)
    for path in paths:
        ds = pydicom.dcmread(path)
        assert ds.SOPClassUID == SecondaryCaptureImageStorage
        assert "ImagePositionPatient" not in ds
        assert len(ds.PixelData) == 8 * 8 * 2


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_write_instance_keeps_hostile_values(tmp_path):
    path = synthetic.write_instance(
        tmp_path / "hostile.dcm",
        {"PatientID": "../../x", "SeriesInstanceUID": "1.2.3/../4", "SeriesDescription": "a\\b"},
    )
    ds = pydicom.dcmread(path)
    assert ds.PatientID == "../../x"
    assert ds.SeriesInstanceUID == "1.2.3/../4"
    assert _is_part10(path)


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_write_instance_takes_overrides_as_keywords(tmp_path):
    path = synthetic.write_instance(tmp_path / "kw.dcm", SeriesInstanceUID="1.2.3/../../4", PatientID="../../x")
    ds = pydicom.dcmread(path)
    assert ds.SeriesInstanceUID == "1.2.3/../../4" and ds.PatientID == "../../x"
    with pytest.raises(TypeError):
        synthetic.write_instance(tmp_path / "typo.dcm", patient_id="x")


def test_write_instance_can_remove_attributes(tmp_path):
    path = synthetic.write_instance(tmp_path / "x.dcm", remove=["SeriesInstanceUID", "ImagePositionPatient"])
    ds = pydicom.dcmread(path)
    assert "SeriesInstanceUID" not in ds and "ImagePositionPatient" not in ds


def test_write_instance_truncated(tmp_path):
    whole = synthetic.write_instance(tmp_path / "whole.dcm")
    size = whole.stat().st_size
    cut = synthetic.write_instance(tmp_path / "cut.dcm", truncate_to=size - 10)
    assert cut.stat().st_size == size - 10
    # pydicom reads it without complaint, which is why receivers must check the pixel length.
    ds = pydicom.dcmread(cut)
    assert len(ds.PixelData) < ds.Rows * ds.Columns * 2


def test_write_instance_without_part10_header(tmp_path):
    path = synthetic.write_instance(tmp_path / "bare.dcm", part10=False)
    assert not _is_part10(path)
    with pytest.raises(InvalidDicomError):
        pydicom.dcmread(path)  # force=False refuses it, as the emulator and relay do
    assert pydicom.dcmread(path, force=True).SOPInstanceUID


def test_cli_writes_series(tmp_path):
    assert synthetic.main(["ct", str(tmp_path / "ct"), "--count", "3", "--rows", "8", "--cols", "8"]) == 0
    assert len(list((tmp_path / "ct").glob("*.dcm"))) == 3
    assert synthetic.main(["small", str(tmp_path / "small"), "--count", "4", "--series", "2", "--kind", "sc"]) == 0
    assert len(list((tmp_path / "small").glob("*.dcm"))) == 4


def test_cli_module_help():
    result = subprocess.run(
        [sys.executable, "-m", "isdr_devtools.synthetic", "--help"], cwd=REPO_ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0
    assert "ct" in result.stdout and "small" in result.stdout


def test_add_parser_registers_sample_subcommand(tmp_path):
    import argparse

    parser = argparse.ArgumentParser(prog="isdr")
    synthetic.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["sample", "ct", str(tmp_path), "--count", "2", "--rows", "4", "--cols", "4"])
    assert args.func(args) == 0
    assert len(list(tmp_path.glob("*.dcm"))) == 2
