"""The toy model: real DICOM predictions derived from the input series.

For every input series the model writes one RT Structure Set with a single ROI, a square in the
middle of every slice, placed with the slice's own geometry. It references the study, the frame
of reference, the series and every image, and carries the input's patient and study attributes,
so a PACS files it under the same patient and study, and a viewer can overlay it.

A series without image geometry (secondary captures, multi-frame images, anything without
ImagePositionPatient) cannot carry contours, so the model answers with a small Secondary Capture
image instead, which references its sources via SourceImageSequence and ReferencedSeriesSequence.
"""

from __future__ import annotations

import copy
import datetime as dt
import io
from dataclasses import dataclass, field
from typing import BinaryIO, Iterable

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.sequence import Sequence
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    ExplicitVRLittleEndian,
    RTStructureSetStorage,
    SecondaryCaptureImageStorage,
    generate_uid,
)
from pydicom.valuerep import format_number_as_ds

# Study Component Management SOP class, which RTReferencedStudySequence conventionally names.
_STUDY_REFERENCE_SOP_CLASS = "1.2.840.10008.3.1.2.3.1"

# Copied verbatim from the input so the output lands under the same patient and study.
_PATIENT_STUDY_KEYWORDS = (
    "SpecificCharacterSet",
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "PatientBirthDate",
    "PatientSex",
    "OtherPatientIDsSequence",
    "PatientAge",
    "PatientSize",
    "PatientWeight",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
    "StudyDescription",
)
# Type 2 attributes of those modules: present (maybe empty) even when the input lacks them.
_TYPE2_KEYWORDS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)


@dataclass
class InputSeries:
    """The instances of one input series (headers only, pixels are never read)."""

    series_uid: str
    instances: list[Dataset] = field(default_factory=list)


@dataclass(frozen=True)
class Prediction:
    """One output instance: its archive-relative file name and its Part-10 bytes."""

    name: str
    data: bytes
    sop_class_uid: str
    sop_instance_uid: str


def read_instance(stream: BinaryIO) -> Dataset | None:
    """The instance's header if `stream` is a usable Part-10 DICOM file, else None.

    force=False: a file without the DICM prefix is not DICOM, however it is named. Pixel data is
    not read: the model only needs identifiers and geometry.
    """
    try:
        ds = pydicom.dcmread(stream, force=False, stop_before_pixels=True)
    except InvalidDicomError:
        return None
    except Exception:  # noqa: BLE001 - hostile bytes can break the parser in many ways
        return None
    for keyword in ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID"):
        if not str(ds.get(keyword, "") or "").strip():
            return None
    return ds


def group_series(instances: Iterable[Dataset]) -> list[InputSeries]:
    """Group instances by SeriesInstanceUID (archive folders are not trusted to do it)."""
    by_uid: dict[str, InputSeries] = {}
    for ds in instances:
        uid = str(ds.SeriesInstanceUID)
        by_uid.setdefault(uid, InputSeries(uid)).instances.append(ds)
    return list(by_uid.values())


# --- geometry -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Slice:
    ds: Dataset
    position: tuple[float, float, float]
    row_dir: tuple[float, float, float]
    col_dir: tuple[float, float, float]
    row_spacing: float  # between rows (along col_dir), PixelSpacing[0]
    col_spacing: float  # between columns (along row_dir), PixelSpacing[1]
    rows: int
    cols: int


def _floats(value, count: int) -> tuple[float, ...] | None:
    try:
        numbers = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return numbers if len(numbers) == count else None


def _slice_geometry(ds: Dataset) -> _Slice | None:
    try:
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            return None
    except (TypeError, ValueError):
        return None  # multi-frame geometry lives in functional groups; not contoured here
    position = _floats(ds.get("ImagePositionPatient"), 3)
    orientation = _floats(ds.get("ImageOrientationPatient"), 6)
    spacing = _floats(ds.get("PixelSpacing"), 2)
    rows, cols = ds.get("Rows"), ds.get("Columns")
    if not (position and orientation and spacing and rows and cols):
        return None
    return _Slice(ds, position, orientation[:3], orientation[3:], spacing[0], spacing[1], int(rows), int(cols))


def _geometry_of(series: InputSeries) -> tuple[str, list[_Slice]] | None:
    """(frame of reference, slices sorted along the normal) when every image has geometry."""
    frames = {str(ds.get("FrameOfReferenceUID", "") or "") for ds in series.instances}
    if len(frames) != 1 or "" in frames:
        return None
    slices = [_slice_geometry(ds) for ds in series.instances]
    if any(s is None for s in slices):
        return None
    resolved = [s for s in slices if s is not None]

    def along_normal(s: _Slice) -> float:
        r, c = s.row_dir, s.col_dir
        normal = (r[1] * c[2] - r[2] * c[1], r[2] * c[0] - r[0] * c[2], r[0] * c[1] - r[1] * c[0])
        return sum(p * n for p, n in zip(s.position, normal, strict=True))

    resolved.sort(key=along_normal)
    return frames.pop(), resolved


def _square_contour(s: _Slice) -> list[str]:
    """A closed square over the middle half of the slice, in patient coordinates (mm)."""
    corners = [
        (s.cols * 0.25, s.rows * 0.25),
        (s.cols * 0.75, s.rows * 0.25),
        (s.cols * 0.75, s.rows * 0.75),
        (s.cols * 0.25, s.rows * 0.75),
    ]
    points: list[str] = []
    for column, row in corners:
        for axis in range(3):
            value = (
                s.position[axis]
                + column * s.col_spacing * s.row_dir[axis]
                + row * s.row_spacing * s.col_dir[axis]
            )
            points.append(format_number_as_ds(round(value, 4)))
    return points


# --- common modules -------------------------------------------------------------------------


def _now() -> tuple[str, str]:
    now = dt.datetime.now()
    return now.strftime("%Y%m%d"), now.strftime("%H%M%S")


def _reference(ds: Dataset) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = ds.SOPClassUID
    item.ReferencedSOPInstanceUID = ds.SOPInstanceUID
    return item


def _new_dataset(source: Dataset, sop_class_uid: str, modality: str, model: str, series_number: int) -> Dataset:
    ds = Dataset()
    for keyword in _PATIENT_STUDY_KEYWORDS:
        if keyword in source:
            element = source[keyword]
            ds[element.tag] = copy.deepcopy(element)
    for keyword in _TYPE2_KEYWORDS:
        if keyword not in ds:
            setattr(ds, keyword, "")
    date, time = _now()
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = generate_uid()
    ds.InstanceCreationDate = date
    ds.InstanceCreationTime = time
    ds.Modality = modality
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = series_number
    ds.SeriesDate = date
    ds.SeriesTime = time
    # The model name is not patient data, and it tells a reader in the PACS where this came from.
    ds.SeriesDescription = f"{model} prediction"[:64]
    ds.Manufacturer = "ISDR InferenceServer emulator"
    ds.ManufacturerModelName = model[:64]
    ds.InstanceNumber = 1
    return ds


def encode(ds: Dataset) -> bytes:
    """Part-10 bytes: preamble, DICM, file meta, Explicit VR Little Endian."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "ISDR_EMULATOR"
    ds.file_meta = meta
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


# --- the two outputs ------------------------------------------------------------------------


def rtstruct(series: InputSeries, frame_uid: str, slices: list[_Slice], model: str, series_number: int) -> Dataset:
    first = slices[0].ds
    ds = _new_dataset(first, RTStructureSetStorage, "RTSTRUCT", model, series_number)
    date, time = _now()
    ds.OperatorsName = ""
    ds.StructureSetLabel = "TOY"
    ds.StructureSetName = "Toy model square"
    ds.StructureSetDate = date
    ds.StructureSetTime = time
    # Frame of Reference module (dciodvfy checks it at the top level): the images' own frame.
    ds.FrameOfReferenceUID = frame_uid
    ds.PositionReferenceIndicator = first.get("PositionReferenceIndicator", "") or ""

    referenced_series = Dataset()
    referenced_series.SeriesInstanceUID = series.series_uid
    referenced_series.ContourImageSequence = Sequence([_reference(s.ds) for s in slices])
    referenced_study = Dataset()
    referenced_study.ReferencedSOPClassUID = _STUDY_REFERENCE_SOP_CLASS
    referenced_study.ReferencedSOPInstanceUID = first.StudyInstanceUID
    referenced_study.RTReferencedSeriesSequence = Sequence([referenced_series])
    frame = Dataset()
    frame.FrameOfReferenceUID = frame_uid
    frame.RTReferencedStudySequence = Sequence([referenced_study])
    ds.ReferencedFrameOfReferenceSequence = Sequence([frame])

    roi = Dataset()
    roi.ROINumber = 1
    roi.ReferencedFrameOfReferenceUID = frame_uid
    roi.ROIName = "ToySquare"
    roi.ROIGenerationAlgorithm = "AUTOMATIC"
    ds.StructureSetROISequence = Sequence([roi])

    contours = []
    for number, s in enumerate(slices, start=1):
        contour = Dataset()
        contour.ContourImageSequence = Sequence([_reference(s.ds)])
        contour.ContourGeometricType = "CLOSED_PLANAR"
        contour.NumberOfContourPoints = 4
        contour.ContourNumber = number
        contour.ContourData = _square_contour(s)
        contours.append(contour)
    roi_contour = Dataset()
    roi_contour.ROIDisplayColor = [255, 0, 0]
    roi_contour.ReferencedROINumber = 1
    roi_contour.ContourSequence = Sequence(contours)
    ds.ROIContourSequence = Sequence([roi_contour])

    observation = Dataset()
    observation.ObservationNumber = 1
    observation.ReferencedROINumber = 1
    observation.RTROIInterpretedType = "ORGAN"
    observation.ROIInterpreter = ""
    ds.RTROIObservationsSequence = Sequence([observation])
    return ds


_SC_SIZE = 64


def secondary_capture(series: InputSeries, model: str, series_number: int) -> Dataset:
    first = series.instances[0]
    ds = _new_dataset(first, SecondaryCaptureImageStorage, "OT", model, series_number)
    date, time = _now()
    ds.ConversionType = "WSD"
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.DerivationDescription = f"{model} toy prediction"[:1024]
    ds.PatientOrientation = ""
    # General Series, type 2C: dciodvfy wants it whenever the body part is not known to be unpaired.
    ds.Laterality = first.get("Laterality", "") or ""
    ds.ContentDate = date
    ds.ContentTime = time
    references = [_reference(instance) for instance in series.instances]
    ds.SourceImageSequence = Sequence(copy.deepcopy(references))
    referenced = Dataset()
    referenced.SeriesInstanceUID = series.series_uid
    referenced.ReferencedInstanceSequence = Sequence(references)
    ds.ReferencedSeriesSequence = Sequence([referenced])
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = _SC_SIZE
    ds.Columns = _SC_SIZE
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    # A bright square on a dark background: the "finding".
    lo, hi = _SC_SIZE // 4, 3 * _SC_SIZE // 4
    ds.PixelData = bytes(
        200 if lo <= x < hi and lo <= y < hi else 20 for y in range(_SC_SIZE) for x in range(_SC_SIZE)
    )
    return ds


def predict(series_list: list[InputSeries], model: str, folder: str = "predictions") -> list[Prediction]:
    """One prediction per input series: an RTSTRUCT where there is geometry, else an SC image."""
    predictions = []
    for index, series in enumerate(series_list):
        geometry = _geometry_of(series)
        if geometry is not None:
            frame_uid, slices = geometry
            ds = rtstruct(series, frame_uid, slices, model, 900 + index)
            prefix = "RS"
        else:
            ds = secondary_capture(series, model, 900 + index)
            prefix = "SC"
        # Named from our own fresh UID: never from anything the upload contained.
        name = f"{folder}/{prefix}.{ds.SOPInstanceUID}.dcm"
        predictions.append(Prediction(name, encode(ds), str(ds.SOPClassUID), str(ds.SOPInstanceUID)))
    return predictions
