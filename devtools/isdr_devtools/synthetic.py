"""Synthetic DICOM series for tests, the demo and the benchmark.

Everything here is generated, so it carries no real patient data; it still looks like what a
scanner sends (correct geometry, Part-10 files with file meta), because the relay and the
emulator's toy model both depend on that.

Generation is meant to be fast: a series shares one template dataset and one pixel buffer, and
only the per-slice attributes change from one file to the next (300 CT slices of 512x512 take a
few seconds, most of it disk writes).

Command line (exposed by the lead as `isdr sample`):

    python -m isdr_devtools.synthetic ct DEST --count 120
    python -m isdr_devtools.synthetic small DEST --count 1000 --series 4
"""

from __future__ import annotations

import argparse
import array
import datetime as _dt
import sys
from pathlib import Path
from typing import Any, Iterable, Mapping

from pydicom import config as _pydicom_config
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import dcmwrite
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MRImageStorage,
    SecondaryCaptureImageStorage,
    UID,
    generate_uid,
)

__all__ = [
    "DEFAULT_PATIENT_ID",
    "DEFAULT_PATIENT_NAME",
    "SUPPORTED_TRANSFER_SYNTAXES",
    "new_study_uid",
    "write_ct_series",
    "write_instance",
    "write_small_instances",
    "main",
    "add_parser",
]

DEFAULT_PATIENT_ID = "SYNTH0001"
DEFAULT_PATIENT_NAME = "Synthetic^Patient"

# Only uncompressed encodings: compressed ones would need pixel encoders this generator does not
# want to depend on. Deflate compresses the whole dataset, pixels included, and pydicom writes it.
SUPPORTED_TRANSFER_SYNTAXES = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
)

# The body of the CT phantom: air outside, soft tissue inside, a ring of "bone". Stored values
# with RescaleIntercept -1024, so stored 0 is -1024 HU.
_AIR, _TISSUE, _BONE = 0, 1064, 2024


def new_study_uid() -> str:
    return generate_uid()


def _check_transfer_syntax(transfer_syntax: str) -> UID:
    uid = UID(transfer_syntax)
    if uid not in SUPPORTED_TRANSFER_SYNTAXES:
        raise ValueError(
            f"transfer syntax {uid} ({uid.name}) is not supported by the synthetic generator; "
            f"use one of: {', '.join(t.name for t in SUPPORTED_TRANSFER_SYNTAXES)}"
        )
    return uid


def _now() -> tuple[str, str]:
    now = _dt.datetime.now()
    return now.strftime("%Y%m%d"), now.strftime("%H%M%S")


def _phantom_pixels(rows: int, cols: int) -> bytes:
    """A disk phantom as little-endian int16 bytes, built row by row with slice fills.

    Pure standard library (the array module) so numpy stays optional; a 512x512 buffer takes a
    few milliseconds because each row is three slice assignments, not 512 Python operations.
    """
    pixels = array.array("h", bytes(2 * rows * cols))
    cy, cx = (rows - 1) / 2.0, (cols - 1) / 2.0
    outer = 0.45 * min(rows, cols)
    inner = 0.40 * min(rows, cols)
    for y in range(rows):
        dy = y - cy
        base = y * cols
        if abs(dy) < outer:
            half = int((outer * outer - dy * dy) ** 0.5)
            lo, hi = max(0, int(cx - half)), min(cols, int(cx + half) + 1)
            pixels[base + lo : base + hi] = array.array("h", [_BONE]) * (hi - lo)
        if abs(dy) < inner:
            half = int((inner * inner - dy * dy) ** 0.5)
            lo, hi = max(0, int(cx - half)), min(cols, int(cx + half) + 1)
            pixels[base + lo : base + hi] = array.array("h", [_TISSUE]) * (hi - lo)
    if sys.byteorder != "little":
        pixels.byteswap()
    return pixels.tobytes()


def _small_pixels(rows: int, cols: int) -> bytes:
    """A gradient for small 8-bit-in-16 images: cheap and visibly not blank in a viewer."""
    pixels = array.array("h", (((x + y) * 8) % 4096 for y in range(rows) for x in range(cols)))
    if sys.byteorder != "little":
        pixels.byteswap()
    return pixels.tobytes()


def _file_meta(sop_class_uid: str, transfer_syntax: UID) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class_uid
    meta.MediaStorageSOPInstanceUID = generate_uid()  # replaced per instance
    meta.TransferSyntaxUID = transfer_syntax
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "ISDR_SYNTH"
    return meta


def _patient_study(
    ds: Dataset,
    *,
    patient_id: str,
    patient_name: str,
    study_uid: str,
    study_description: str,
    accession_number: str = "",
) -> None:
    date, time = _now()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyInstanceUID = study_uid
    ds.StudyDate = date
    ds.StudyTime = time
    ds.StudyID = "1"
    ds.AccessionNumber = accession_number
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = study_description


def _image_pixel(ds: Dataset, rows: int, cols: int, pixel_data: bytes) -> None:
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = cols
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.PixelData = pixel_data


def _geometry(ds: Dataset, index: int, spacing: float, thickness: float, rows: int, cols: int) -> None:
    """Axial slices: rows run along +y, columns along +x, slices step along +z by `thickness`.

    The origin is chosen so the volume is centred on the scanner's isocentre, like a real scan.
    """
    x0 = -spacing * (cols - 1) / 2.0
    y0 = -spacing * (rows - 1) / 2.0
    z = round(index * thickness, 4)
    ds.ImagePositionPatient = [f"{x0:.4f}", f"{y0:.4f}", f"{z:.4f}"]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.PixelSpacing = [f"{spacing:.4f}", f"{spacing:.4f}"]
    ds.SliceThickness = f"{thickness:.4f}"
    ds.SliceLocation = f"{z:.4f}"


def _write(ds: Dataset, path: Path) -> Path:
    # enforce_file_format: a 128-byte preamble, "DICM" and the file meta group, i.e. Part 10.
    dcmwrite(path, ds, enforce_file_format=True)
    return path


def write_ct_series(
    dest_dir: str | Path,
    count: int = 50,
    rows: int = 512,
    cols: int = 512,
    series_description: str = "Synthetic CT",
    study_description: str = "Synthetic study",
    modality: str = "CT",
    patient_id: str = DEFAULT_PATIENT_ID,
    patient_name: str = DEFAULT_PATIENT_NAME,
    study_uid: str | None = None,
    series_uid: str | None = None,
    transfer_syntax: str = ExplicitVRLittleEndian,
    *,
    series_number: int = 1,
    slice_thickness: float = 2.5,
    pixel_spacing: float = 0.9765625,
    frame_of_reference_uid: str | None = None,
    file_prefix: str = "CT",
) -> list[Path]:
    """Write a CT Image Storage series of `count` slices into `dest_dir`; return the file paths.

    Geometry is consistent (ImagePositionPatient steps by the slice thickness along the normal of
    ImageOrientationPatient), so a model can contour it. `modality` is written as given (tests
    match fingerprints on it); the SOP class stays CT Image Storage.
    """
    if count < 1:
        raise ValueError("count must be at least 1")
    if rows < 1 or cols < 1:
        raise ValueError("rows and cols must be positive")
    syntax = _check_transfer_syntax(transfer_syntax)
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)

    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    frame_uid = frame_of_reference_uid or generate_uid()
    date, time = _now()

    ds = Dataset()
    ds.file_meta = _file_meta(CTImageStorage, syntax)
    _patient_study(
        ds,
        patient_id=patient_id,
        patient_name=patient_name,
        study_uid=study_uid,
        study_description=study_description,
    )
    ds.SOPClassUID = CTImageStorage
    ds.Modality = modality
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = series_number
    ds.SeriesDescription = series_description
    ds.SeriesDate = date
    ds.SeriesTime = time
    ds.Manufacturer = "ISDR synthetic"
    ds.FrameOfReferenceUID = frame_uid
    ds.PositionReferenceIndicator = ""
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.AcquisitionNumber = 1
    ds.KVP = "120"
    ds.PatientPosition = "HFS"
    ds.RescaleIntercept = "-1024"
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    ds.WindowCenter = "40"
    ds.WindowWidth = "400"
    ds.ContentDate = date
    # One pixel buffer for the whole series: bytes are immutable, so every slice shares it.
    _image_pixel(ds, rows, cols, _phantom_pixels(rows, cols))

    paths: list[Path] = []
    for index in range(count):
        sop_uid = generate_uid()
        ds.SOPInstanceUID = sop_uid
        ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
        ds.InstanceNumber = index + 1
        ds.ContentTime = time
        _geometry(ds, index, pixel_spacing, slice_thickness, rows, cols)
        paths.append(_write(ds, dest / f"{file_prefix}{index + 1:05d}.dcm"))
    return paths


def write_small_instances(
    dest_dir: str | Path,
    count: int,
    series_count: int = 1,
    *,
    kind: str = "MR",
    size: int = 16,
    patient_id: str = DEFAULT_PATIENT_ID,
    patient_name: str = DEFAULT_PATIENT_NAME,
    study_uid: str | None = None,
    series_description: str = "Synthetic small series",
    study_description: str = "Synthetic study",
    transfer_syntax: str = ExplicitVRLittleEndian,
) -> list[Path]:
    """Write `count` small instances spread over `series_count` series of one study.

    kind="MR": MR Image Storage with geometry (what a model can contour); kind="SC": Secondary
    Capture without geometry (what makes the toy model fall back to a secondary capture).
    Instances are assigned to series round-robin; files are named <series>-<instance>.dcm.
    """
    if count < 1 or series_count < 1:
        raise ValueError("count and series_count must be at least 1")
    kind = kind.upper()
    if kind not in ("MR", "SC"):
        raise ValueError(f"kind must be 'MR' or 'SC', not {kind!r}")
    syntax = _check_transfer_syntax(transfer_syntax)
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)

    sop_class = MRImageStorage if kind == "MR" else SecondaryCaptureImageStorage
    study_uid = study_uid or generate_uid()
    date, time = _now()
    pixels = _small_pixels(size, size)
    series = [
        {"uid": generate_uid(), "frame": generate_uid(), "next": 0}
        for _ in range(series_count)
    ]

    ds = Dataset()
    ds.file_meta = _file_meta(sop_class, syntax)
    _patient_study(
        ds,
        patient_id=patient_id,
        patient_name=patient_name,
        study_uid=study_uid,
        study_description=study_description,
    )
    ds.SOPClassUID = sop_class
    ds.SeriesDate = date
    ds.SeriesTime = time
    ds.Manufacturer = "ISDR synthetic"
    ds.ContentDate = date
    ds.ContentTime = time
    _image_pixel(ds, size, size, pixels)
    if kind == "MR":
        ds.Modality = "MR"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
        ds.ScanningSequence = "SE"
        ds.SequenceVariant = "NONE"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "2D"
        ds.EchoTime = "10"
        ds.RepetitionTime = "500"
        ds.PositionReferenceIndicator = ""
    else:
        ds.Modality = "OT"
        ds.ConversionType = "WSD"
        ds.ImageType = ["DERIVED", "SECONDARY"]

    paths: list[Path] = []
    for n in range(count):
        number = n % series_count
        entry = series[number]
        index = entry["next"]
        entry["next"] += 1
        sop_uid = generate_uid()
        ds.SOPInstanceUID = sop_uid
        ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
        ds.SeriesInstanceUID = entry["uid"]
        ds.SeriesNumber = number + 1
        ds.SeriesDescription = (
            series_description if series_count == 1 else f"{series_description} {number + 1}"
        )
        ds.InstanceNumber = index + 1
        if kind == "MR":
            ds.FrameOfReferenceUID = entry["frame"]
            _geometry(ds, index, 1.0, 5.0, size, size)
        paths.append(_write(ds, dest / f"{number + 1:03d}-{index + 1:06d}.dcm"))
    return paths


def write_instance(
    path: str | Path,
    overrides: Mapping[str, Any] | None = None,
    *,
    sop_class_uid: str = CTImageStorage,
    rows: int = 16,
    cols: int = 16,
    transfer_syntax: str = ExplicitVRLittleEndian,
    part10: bool = True,
    truncate_to: int | None = None,
    remove: Iterable[str] = (),
    **keyword_overrides: Any,
) -> Path:
    """Write one instance at `path`, with overrides applied last; return the path.

    Overrides are DICOM keywords, given as a mapping or as keyword arguments (CamelCase, so they
    never clash with this function's own options): write_instance(p, PatientID="../../x").

    Built for hostile inputs: overrides are written without value validation (a PatientID of
    "../../x", a SeriesInstanceUID containing "/"), `remove` drops attributes by keyword,
    `part10=False` writes a bare dataset without preamble and file meta, and `truncate_to` cuts
    the written file to that many bytes (a transfer interrupted halfway).
    """
    syntax = _check_transfer_syntax(transfer_syntax)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    date, time = _now()

    ds = Dataset()
    ds.file_meta = _file_meta(sop_class_uid, syntax)
    _patient_study(
        ds,
        patient_id=DEFAULT_PATIENT_ID,
        patient_name=DEFAULT_PATIENT_NAME,
        study_uid=generate_uid(),
        study_description="Synthetic study",
    )
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "CT" if sop_class_uid == CTImageStorage else "OT"
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = 1
    ds.SeriesDescription = "Synthetic instance"
    ds.SeriesDate = date
    ds.SeriesTime = time
    ds.InstanceNumber = 1
    ds.FrameOfReferenceUID = generate_uid()
    _geometry(ds, 0, 1.0, 1.0, rows, cols)
    _image_pixel(ds, rows, cols, _small_pixels(rows, cols))

    # Hostile values are the point here, so pydicom must not refuse or "fix" them.
    with _pydicom_config.disable_value_validation():
        for keyword, value in {**(overrides or {}), **keyword_overrides}.items():
            if not keyword[:1].isupper():
                raise TypeError(f"{keyword!r} is neither an option nor a DICOM keyword")
            setattr(ds, keyword, value)
        for keyword in remove:
            if keyword in ds:
                delattr(ds, keyword)
        ds.file_meta.MediaStorageSOPClassUID = ds.get("SOPClassUID", sop_class_uid)
        ds.file_meta.MediaStorageSOPInstanceUID = ds.get("SOPInstanceUID", generate_uid())
        if part10:
            _write(ds, path)
        else:
            # A bare dataset, encoded as the transfer syntax says, with no preamble or meta.
            del ds.file_meta
            dcmwrite(
                path,
                ds,
                implicit_vr=syntax == ImplicitVRLittleEndian,
                little_endian=True,
            )
    if truncate_to is not None:
        with open(path, "r+b") as handle:
            handle.truncate(truncate_to)
    return path


# --- command line ---------------------------------------------------------------------------


def _add_common_arguments(parser: argparse.ArgumentParser, count: int, count_help: str,
                          series_description: str) -> None:
    """DEST, --count, and the descriptive attributes every kind of sample writes."""
    parser.add_argument("dest", type=Path, metavar="DEST", help="folder to write into (created if missing)")
    parser.add_argument("--count", type=int, default=count, help=f"{count_help} (default: %(default)s)")
    parser.add_argument("--series-description", default=series_description, help="SeriesDescription")
    parser.add_argument("--study-description", default="Synthetic study", help="StudyDescription")
    parser.add_argument("--patient-id", default=DEFAULT_PATIENT_ID, help="PatientID (default: %(default)s)")
    parser.add_argument("--patient-name", default=DEFAULT_PATIENT_NAME, help="PatientName")


def _common_attributes(args: argparse.Namespace) -> dict:
    return {"series_description": args.series_description, "study_description": args.study_description,
            "patient_id": args.patient_id, "patient_name": args.patient_name}


def _configure_parser(parser: argparse.ArgumentParser) -> None:
    kinds = parser.add_subparsers(dest="kind", metavar="KIND", required=True)

    ct = kinds.add_parser(
        "ct",
        help="one CT series with consistent geometry (512x512 slices by default)",
        description="Write one synthetic CT series (CT Image Storage, Part-10 files) into DEST.",
    )
    _add_common_arguments(ct, count=50, count_help="number of slices", series_description="Synthetic CT")
    ct.add_argument("--rows", type=int, default=512, help="image rows (default: %(default)s)")
    ct.add_argument("--cols", type=int, default=512, help="image columns (default: %(default)s)")
    ct.add_argument("--modality", default="CT", help="Modality written (default: %(default)s)")
    ct.add_argument("--study-uid", default=None, help="StudyInstanceUID (default: a new one)")
    ct.set_defaults(func=_run_ct)

    small = kinds.add_parser(
        "small",
        help="many small instances (16x16 MR or secondary capture), for benchmarks",
        description="Write many small synthetic instances, spread over one or more series of one study.",
    )
    _add_common_arguments(small, count=100, count_help="number of instances",
                          series_description="Synthetic small series")
    small.add_argument("--series", type=int, default=1, help="number of series (default: %(default)s)")
    small.add_argument(
        "--kind",
        choices=("mr", "sc"),
        default="mr",
        help="mr: MR images with geometry; sc: secondary captures without geometry (default: %(default)s)",
    )
    small.add_argument("--size", type=int, default=16, help="rows and columns (default: %(default)s)")
    small.set_defaults(func=_run_small)


def _run_ct(args: argparse.Namespace) -> int:
    paths = write_ct_series(
        args.dest,
        count=args.count,
        rows=args.rows,
        cols=args.cols,
        modality=args.modality,
        study_uid=args.study_uid,
        **_common_attributes(args),
    )
    print(f"wrote {len(paths)} CT instances to {args.dest}")
    return 0


def _run_small(args: argparse.Namespace) -> int:
    paths = write_small_instances(
        args.dest,
        count=args.count,
        series_count=args.series,
        kind=args.kind,
        size=args.size,
        **_common_attributes(args),
    )
    print(f"wrote {len(paths)} {args.kind.upper()} instances in {args.series} series to {args.dest}")
    return 0


_DESCRIPTION = "Generate synthetic DICOM series (no real patient data) for tests, the demo and benchmarks."


def add_parser(subparsers, name: str = "sample") -> argparse.ArgumentParser:
    """Register the generator as a subcommand (`isdr sample ct|small ...`)."""
    parser = subparsers.add_parser(name, help=_DESCRIPTION, description=_DESCRIPTION)
    _configure_parser(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m isdr_devtools.synthetic", description=_DESCRIPTION)
    _configure_parser(parser)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
