"""What a prediction may be sent as, and how the presentation contexts are proposed (issue 10)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import (
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
)

from relay.dicom.sender import MAX_CONTEXTS, OutgoingFile, plan_contexts
from relay.dicom.transcode import ConversionError, conversion_targets, convert, decoded_size

HTJ2K = "1.2.840.10008.1.2.4.201"  # no decoder installed for it


@pytest.mark.parametrize("syntax, targets", [
    (ExplicitVRLittleEndian, (ExplicitVRLittleEndian, ImplicitVRLittleEndian)),
    (ImplicitVRLittleEndian, (ImplicitVRLittleEndian, ExplicitVRLittleEndian)),
    (ExplicitVRBigEndian, (ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian)),
    (RLELossless, (RLELossless, ExplicitVRLittleEndian, ImplicitVRLittleEndian)),
    (JPEG2000Lossless, (JPEG2000Lossless, ExplicitVRLittleEndian, ImplicitVRLittleEndian)),
    (HTJ2K, (HTJ2K,)),  # compressed, no decoder: only as it is
])
def test_a_file_is_offered_in_its_own_syntax_first_then_what_it_can_be_converted_to(syntax, targets):
    assert conversion_targets(syntax) == targets


def file(sop_class: str, syntax: str, n: int = 0) -> OutgoingFile:
    return OutgoingFile(Path(f"/x/{n}.dcm"), sop_class, f"1.2.3.{n}", syntax)


def test_each_syntax_of_a_sop_class_is_a_context_of_its_own():
    files = [file("1.2.840.10008.5.1.4.1.1.481.3", ExplicitVRLittleEndian, 1),
             file("1.2.840.10008.5.1.4.1.1.7", RLELossless, 2),
             file("1.2.840.10008.5.1.4.1.1.7", ExplicitVRLittleEndian, 3)]
    assert plan_contexts(files) == [[
        ("1.2.840.10008.5.1.4.1.1.481.3", ExplicitVRLittleEndian),
        ("1.2.840.10008.5.1.4.1.1.481.3", ImplicitVRLittleEndian),
        ("1.2.840.10008.5.1.4.1.1.7", RLELossless),
        ("1.2.840.10008.5.1.4.1.1.7", ExplicitVRLittleEndian),
        ("1.2.840.10008.5.1.4.1.1.7", ImplicitVRLittleEndian),
    ]]


def test_associations_hold_at_most_128_contexts_and_never_split_a_sop_class():
    files = [file(f"1.2.840.10008.5.1.4.1.1.{n}", ExplicitVRLittleEndian, n) for n in range(100)]
    groups = plan_contexts(files)
    assert [len(group) for group in groups] == [128, 72]
    assert sum(len(group) for group in groups) == 200
    for group in groups:
        assert len(group) <= MAX_CONTEXTS
    assert {sop for sop, _ in groups[0]}.isdisjoint({sop for sop, _ in groups[1]})


def test_big_endian_words_are_swapped_when_converted(tmp_path):
    source = get_testdata_file("MR_small_bigendian.dcm")
    converted = convert(Path(source), ImplicitVRLittleEndian, tmp_path / "out.dcm")
    assert np.array_equal(pydicom.dcmread(converted.path).pixel_array, pydicom.dcmread(source).pixel_array)


def test_decoded_size_comes_from_the_header():
    ds = pydicom.dcmread(get_testdata_file("SC_rgb_rle_2frame.dcm"), stop_before_pixels=False)
    assert decoded_size(ds) == 2 * 100 * 100 * 3
    del ds.BitsAllocated
    with pytest.raises(ConversionError, match="pixel description is incomplete"):
        decoded_size(ds)


def test_a_file_that_is_not_dicom_is_not_converted(tmp_path):
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom")
    with pytest.raises(ConversionError, match="cannot be read as DICOM"):
        convert(junk, ImplicitVRLittleEndian, tmp_path / "out.dcm")
