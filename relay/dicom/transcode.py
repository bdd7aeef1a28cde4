"""Re-encode a prediction in a transfer syntax the destination accepted.

Predictions are sent as the model wrote them whenever the destination accepts that syntax. When
it does not, a file can be converted:

- between the uncompressed syntaxes (explicit and implicit VR little endian, deflated explicit
  VR little endian, the retired explicit VR big endian), always: only the encoding changes,
  not a value;
- from a compressed syntax (JPEG, JPEG-LS, JPEG 2000, RLE) to an uncompressed one, when a
  decoder for it is installed. pydicom finds the decoders: its own for RLE, GDCM (python-gdcm,
  a dependency of the relay) for the JPEG family and JPEG 2000. The decoded pixel data must fit
  in `max_decoded_bytes`, checked from the header before anything is decoded.

The targets are always explicit or implicit VR little endian: what every storage SCP accepts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    UID,
)

# What a prediction may be converted to, in order of preference: explicit VR keeps every VR.
TARGETS = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian)

DEFAULT_MAX_DECODED_BYTES = 2 * 1024**3

# Bytes per value of the VRs whose values are raw words: big endian ones must be swapped.
_WORD_SIZES = {"OW": 2, "OL": 4, "OF": 4, "OD": 8, "OV": 8}


class ConversionError(Exception):
    """A file that cannot be converted to the requested syntax; the message says why."""


def decoder_available(transfer_syntax: str) -> bool:
    """True when pydicom has a usable pixel data decoder for a compressed syntax."""
    from pydicom.pixels import get_decoder

    try:
        return get_decoder(UID(transfer_syntax)).is_available
    except (NotImplementedError, ValueError):
        return False


def conversion_targets(transfer_syntax: str) -> tuple[str, ...]:
    """The syntaxes a file in `transfer_syntax` can be sent in, its own first."""
    own = UID(transfer_syntax)
    if own in UNCOMPRESSED or (own.is_compressed and decoder_available(own)):
        return (own,) + tuple(target for target in TARGETS if target != own)
    return (own,)


@dataclass(frozen=True)
class Converted:
    path: Path
    transfer_syntax: str


def decoded_size(ds: Dataset) -> int:
    """Bytes of the pixel data once decoded, from the header (0 without pixel data)."""
    if "PixelData" not in ds:
        return 0
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        values = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1) or 1)
        bits = int(ds.BitsAllocated)
    except (AttributeError, TypeError, ValueError) as exc:
        raise ConversionError(f"its image pixel description is incomplete or invalid: {exc}") from exc
    if min(frames, values, bits) < 1:
        raise ConversionError("its image pixel description is invalid (zero or negative sizes)")
    return frames * math.ceil(values * bits / 8)


def _swap_words(ds: Dataset) -> None:
    """Big endian -> little endian for the values pydicom keeps as raw bytes (OW, OL, OF, ...)."""
    for element in ds.iterall():
        size = _WORD_SIZES.get(element.VR)
        value = element.value
        if size and isinstance(value, (bytes, bytearray)) and len(value) % size == 0:
            swapped = bytearray(len(value))
            for offset in range(size):
                swapped[offset::size] = value[size - 1 - offset::size]
            element.value = bytes(swapped)


def convert(path: Path, target: str, destination: Path,
            max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES) -> Converted:
    """Write the file at `path` re-encoded in `target` (one of TARGETS) to `destination`."""
    target = UID(target)
    if target not in TARGETS:
        raise ConversionError(f"converting to {target.name} is not supported")
    try:
        ds = pydicom.dcmread(path)
    except Exception as exc:  # noqa: BLE001 - a model's output is untrusted input
        raise ConversionError(f"it cannot be read as DICOM: {exc}") from exc
    source = UID(ds.file_meta.TransferSyntaxUID)
    if source.is_compressed:
        if not decoder_available(source):
            raise ConversionError(f"no decoder for {source.name} is installed")
        size = decoded_size(ds)
        if size > max_decoded_bytes:
            raise ConversionError(f"its decoded pixel data would take {size} bytes, more than the "
                                  f"{max_decoded_bytes} allowed")
        try:
            # The same instance in another encoding: it keeps its SOP Instance UID (pydicom would
            # make a new one), which is how the destination and the task's record know it.
            ds.decompress(generate_instance_uid=False)
        except Exception as exc:  # noqa: BLE001 - decoders raise many kinds of errors
            raise ConversionError(f"its {source.name} pixel data cannot be decoded: {exc}") from exc
    elif source not in UNCOMPRESSED:
        raise ConversionError(f"{source.name} is not a syntax the relay can convert from")
    if source == ExplicitVRBigEndian:
        _swap_words(ds)
    ds.file_meta.TransferSyntaxUID = target
    try:
        pydicom.dcmwrite(destination, ds, enforce_file_format=True,
                         implicit_vr=target.is_implicit_VR, little_endian=True)
    except Exception as exc:  # noqa: BLE001
        raise ConversionError(f"it cannot be written as {target.name}: {exc}") from exc
    return Converted(Path(destination), target)
