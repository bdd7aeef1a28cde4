"""Input archives, and extraction of hostile output archives crafted here byte by byte."""

from __future__ import annotations

import io
import os
import stat
import struct
import tarfile
import zipfile
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.filewriter import dcmwrite
from pydicom.uid import generate_uid

from relay.inference.archives import (
    ArchiveRejected,
    UnsafeName,
    _Extraction,
    build_input_archive,
    detect_format,
    find_dicom_files,
    is_dicom_file,
    safe_extract,
    safe_relative_parts,
    unique_names,
)
from isdr_devtools.synthetic import write_ct_series

MB = 1024 * 1024


# --- helpers that craft archives ---


def make_zip(path: Path, entries: list[tuple], compression=zipfile.ZIP_DEFLATED) -> Path:
    """entries: (name, data) for files, or (name, data, unix_mode) to set the entry's type."""
    with zipfile.ZipFile(path, "w", compression) as zf:
        for entry in entries:
            name, data = entry[0], entry[1]
            info = zipfile.ZipInfo(name)
            info.compress_type = compression
            if len(entry) > 2:
                info.create_system = 3
                info.external_attr = entry[2] << 16
            zf.writestr(info, data)
    return path


def tar_entry(name: str, data: bytes = b"", type_=tarfile.REGTYPE, linkname: str = "") -> tuple:
    info = tarfile.TarInfo(name)
    info.type = type_
    info.linkname = linkname
    info.size = len(data) if type_ == tarfile.REGTYPE else 0
    info.mode = 0o755 if type_ == tarfile.DIRTYPE else 0o644
    return info, (io.BytesIO(data) if type_ == tarfile.REGTYPE else None)


def make_tar(path: Path, entries: list[tuple], mode: str = "w") -> Path:
    with tarfile.open(path, mode) as tar:
        for info, data in entries:
            tar.addfile(info, data)
    return path


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.fixture
def outside(tmp_path) -> Path:
    """A folder next to the extraction folder: nothing may ever appear in it."""
    path = tmp_path / "outside"
    path.mkdir()
    return path


@pytest.fixture
def dest(tmp_path) -> Path:
    return tmp_path / "extract" / "here"


# --- building input archives ---


@pytest.fixture
def two_series(tmp_path) -> dict[str, list[Path]]:
    a = write_ct_series(tmp_path / "a", count=3, rows=8, cols=8)
    b = write_ct_series(tmp_path / "b", count=2, rows=8, cols=8)
    return {"1.2.3_1.2.840.10008.5.1.4.1.1.2": a, "1.2.4_1.2.840.10008.5.1.4.1.1.2": b}


def test_zip_input_archive_is_flat_with_unique_names(tmp_path, two_series):
    archive = build_input_archive("zip", two_series, tmp_path / "out" / "input.zip")
    assert archive == tmp_path / "out" / "input.zip"
    with zipfile.ZipFile(archive) as zf:
        names = zf.namelist()
        assert all("/" not in n for n in names)
        assert len(names) == len(set(names)) == 5
        # Both series have CT00001.dcm: the second gets a suffix instead of overwriting the first.
        assert "CT00001.dcm" in names and "CT00001-2.dcm" in names
        assert zf.read("CT00002.dcm") == two_series["1.2.3_1.2.840.10008.5.1.4.1.1.2"][1].read_bytes()
    assert not (tmp_path / "out" / "input.zip.part").exists()


def test_tar_input_archive_has_one_folder_per_series(tmp_path, two_series):
    archive = build_input_archive("tar", two_series, tmp_path / "input.tar")
    with tarfile.open(archive) as tar:
        members = {m.name: m for m in tar.getmembers()}
        assert members["1.2.3_1.2.840.10008.5.1.4.1.1.2"].isdir()
        files = sorted(n for n, m in members.items() if m.isfile())
        assert len(files) == 5
        assert all(n.count("/") == 1 for n in files)
        first = two_series["1.2.4_1.2.840.10008.5.1.4.1.1.2"][0]
        member = members[f"1.2.4_1.2.840.10008.5.1.4.1.1.2/{first.name}"]
        assert member.uid == 0 and member.uname == "" and member.mode == 0o644
        assert tar.extractfile(member).read() == first.read_bytes()


def test_input_archives_round_trip_through_safe_extract(tmp_path, two_series):
    for fmt in ("zip", "tar"):
        archive = build_input_archive(fmt, two_series, tmp_path / f"input.{fmt}")
        result = safe_extract(archive, tmp_path / f"x-{fmt}", max_total_bytes=100 * MB)
        assert len(result.files) == 5 and result.skipped == []
        assert len(find_dicom_files(tmp_path / f"x-{fmt}")) == 5


@pytest.mark.parametrize("folder", ["../up", "a/b", "", ".hidden", "x" * 300])
def test_tar_input_archive_refuses_unsafe_folder_names(tmp_path, two_series, folder):
    files = next(iter(two_series.values()))
    with pytest.raises(ValueError):
        build_input_archive("tar", {folder: files}, tmp_path / "input.tar")
    assert not (tmp_path / "input.tar").exists() and not (tmp_path / "input.tar.part").exists()


def test_unknown_format_and_empty_input_are_refused(tmp_path, two_series):
    with pytest.raises(ValueError):
        build_input_archive("rar", two_series, tmp_path / "x")
    with pytest.raises(ValueError):
        build_input_archive("zip", {"s": []}, tmp_path / "x")


def test_unique_names():
    pairs = unique_names([Path("a/x.dcm"), Path("b/x.dcm"), Path("c/x.dcm"), Path("d/y")])
    assert [name for _, name in pairs] == ["x.dcm", "x-2.dcm", "x-3.dcm", "y"]


# --- entry names ---


@pytest.mark.parametrize(
    "name, parts",
    [
        ("a.dcm", ("a.dcm",)),
        ("./a/./b.dcm", ("a", "b.dcm")),
        ("a//b/", ("a", "b")),
        ("dir\\file.dcm", ("dir", "file.dcm")),
        ("..foo/bar..", ("..foo", "bar..")),
    ],
)
def test_safe_relative_parts_accepts(name, parts):
    assert safe_relative_parts(name) == parts


@pytest.mark.parametrize(
    "name",
    ["/etc/passwd", "../x", "a/../../x", "a/..", "..\\..\\x", "C:/x", "c:x", "", "./", "a\x00b", "\\\\server\\share"],
)
def test_safe_relative_parts_refuses(name):
    with pytest.raises(UnsafeName):
        safe_relative_parts(name)


# --- safe extraction: good archives ---


def test_nested_folders_and_non_dicom_files(tmp_path, dest):
    archive = make_zip(
        tmp_path / "out.bin",
        [("rtstruct/RS.dcm", b"R" * 10), ("seg/deep/er/SEG.dcm", b"S" * 20), ("log.txt", b"hello"), ("empty/", b"")],
    )
    result = safe_extract(archive, dest, max_total_bytes=MB)
    assert tree(dest) == {
        "rtstruct", "rtstruct/RS.dcm", "seg", "seg/deep", "seg/deep/er", "seg/deep/er/SEG.dcm", "log.txt", "empty"
    }
    assert result.bytes_written == 35
    assert list(result) == result.files and len(result) == 3
    assert (dest / "seg/deep/er/SEG.dcm").read_bytes() == b"S" * 20


def test_format_is_detected_by_content_not_by_name(tmp_path, dest):
    zip_named_tar = make_zip(tmp_path / "outputs.tar", [("a", b"1")])
    tar_named_zip = make_tar(tmp_path / "outputs.zip", [tar_entry("b", b"2")])
    assert detect_format(zip_named_tar) == "zip"
    assert detect_format(tar_named_zip) == "tar"
    assert tree(safe_extract(zip_named_tar, dest / "1", MB).files[0].parent) == {"a"}
    assert tree(safe_extract(tar_named_zip, dest / "2", MB).files[0].parent) == {"b"}


def test_compressed_tar_is_accepted(tmp_path, dest):
    entries = [tar_entry("dir/", type_=tarfile.DIRTYPE), tar_entry("dir/a.dcm", b"x" * 100)]
    archive = make_tar(tmp_path / "out", entries, "w:gz")
    result = safe_extract(archive, dest, MB)
    assert tree(dest) == {"dir", "dir/a.dcm"}
    assert result.bytes_written == 100


def test_file_modes_from_the_archive_are_ignored(tmp_path, dest):
    info, data = tar_entry("tool", b"#!/bin/sh\n")
    info.mode = 0o4777  # setuid, world-writable
    safe_extract(make_tar(tmp_path / "t", [(info, data)]), dest, MB)
    mode = stat.S_IMODE(os.stat(dest / "tool").st_mode)
    assert not mode & (stat.S_ISUID | stat.S_IXUSR | stat.S_IWOTH)


# --- safe extraction: hostile archives ---


@pytest.mark.parametrize("evil", ["../escaped.dcm", "../../escaped.dcm", "a/../../escaped.dcm", "..\\escaped.dcm"])
def test_zip_dotdot_entries_are_skipped(tmp_path, dest, outside, evil):
    archive = make_zip(tmp_path / "evil.zip", [(evil, b"pwned"), ("ok.dcm", b"fine")])
    result = safe_extract(archive, dest, MB)
    assert [p.name for p in result.files] == ["ok.dcm"]
    assert result.skipped == [(evil, "'..' in path")]
    assert not list(tmp_path.rglob("escaped.dcm"))


def test_tar_dotdot_and_absolute_entries_are_skipped(tmp_path, dest, outside):
    target = outside / "abs.dcm"
    archive = make_tar(
        tmp_path / "evil.tar",
        [tar_entry("../outside/rel.dcm", b"x"), tar_entry(str(target), b"x"), tar_entry("ok.dcm", b"fine")],
    )
    result = safe_extract(archive, dest, MB)
    assert tree(dest) == {"ok.dcm"}
    assert {reason for _, reason in result.skipped} == {"'..' in path", "absolute path"}
    assert list(outside.iterdir()) == []


def test_zip_absolute_entry_is_skipped(tmp_path, dest, outside):
    archive = tmp_path / "abs.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        # ZipInfo strips a leading '/'; a hostile archive does not have to, so write the raw name.
        info = zipfile.ZipInfo("x" * len(str(outside / "abs.dcm")))
        zf.writestr(info, b"pwned")
    raw = archive.read_bytes().replace(b"x" * len(str(outside / "abs.dcm")), str(outside / "abs.dcm").encode())
    archive.write_bytes(raw)
    result = safe_extract(archive, dest, MB)
    assert result.files == []
    assert result.skipped == [(str(outside / "abs.dcm"), "absolute path")]
    assert list(outside.iterdir()) == []


def test_zip_symlink_entries_are_skipped_and_not_written_through(tmp_path, dest, outside):
    archive = make_zip(
        tmp_path / "link.zip",
        [
            ("link", str(outside).encode(), stat.S_IFLNK | 0o777),
            ("link/pwned.dcm", b"through the link"),
        ],
    )
    result = safe_extract(archive, dest, MB)
    assert ("link", "symbolic link") in result.skipped
    assert list(outside.iterdir()) == []
    assert not (dest / "link").is_symlink()
    # The second entry lands in a real folder named 'link', inside the extraction folder.
    assert (dest / "link" / "pwned.dcm").read_bytes() == b"through the link"


def test_zip_special_file_modes_are_skipped(tmp_path, dest):
    entries = [("fifo", b"", stat.S_IFIFO | 0o644), ("reg", b"1", stat.S_IFREG | 0o644)]
    archive = make_zip(tmp_path / "fifo.zip", entries)
    result = safe_extract(archive, dest, MB)
    assert tree(dest) == {"reg"}
    assert result.skipped == [("fifo", "not a regular file")]


def test_tar_links_devices_and_fifos_are_skipped(tmp_path, dest, outside):
    secret = outside / "secret"
    secret.write_text("do not touch")
    archive = make_tar(
        tmp_path / "evil.tar",
        [
            tar_entry("sym", type_=tarfile.SYMTYPE, linkname=str(outside)),
            tar_entry("sym/pwned", b"through the link"),
            tar_entry("hard", type_=tarfile.LNKTYPE, linkname=str(secret)),
            tar_entry("hard2", type_=tarfile.LNKTYPE, linkname="../outside/secret"),
            tar_entry("dev", type_=tarfile.CHRTYPE),
            tar_entry("blk", type_=tarfile.BLKTYPE),
            tar_entry("fifo", type_=tarfile.FIFOTYPE),
            tar_entry("ok.dcm", b"fine"),
        ],
    )
    result = safe_extract(archive, dest, MB)
    assert dict(result.skipped) == {
        "sym": "link",
        "hard": "link",
        "hard2": "link",
        "dev": "device file or fifo",
        "blk": "device file or fifo",
        "fifo": "device file or fifo",
    }
    assert tree(dest) == {"sym", "sym/pwned", "ok.dcm"}
    assert not (dest / "sym").is_symlink()
    assert sorted(p.name for p in outside.iterdir()) == ["secret"]
    assert secret.read_text() == "do not touch"


def test_duplicate_entries_do_not_overwrite(tmp_path, dest):
    archive = make_tar(tmp_path / "dup.tar", [tar_entry("a.dcm", b"first"), tar_entry("a.dcm", b"second")])
    result = safe_extract(archive, dest, MB)
    assert (dest / "a.dcm").read_bytes() == b"first"
    assert result.skipped == [("a.dcm", "duplicate entry")]


def test_file_where_a_folder_is_needed_is_skipped(tmp_path, dest):
    archive = make_tar(tmp_path / "clash.tar", [tar_entry("a", b"file"), tar_entry("a/b.dcm", b"x")])
    result = safe_extract(archive, dest, MB)
    assert tree(dest) == {"a"}
    assert result.skipped[0][0] == "a/b.dcm"


def _patch_zip_sizes(path: Path, declared: int) -> None:
    """Make every header of a one-entry zip claim `declared` uncompressed bytes."""
    raw = bytearray(path.read_bytes())
    local = raw.index(b"PK\x03\x04")
    struct.pack_into("<I", raw, local + 22, declared)
    central = raw.index(b"PK\x01\x02")
    struct.pack_into("<I", raw, central + 24, declared)
    path.write_bytes(bytes(raw))


def test_zip_bomb_with_lying_sizes_is_rejected_and_nothing_is_left(tmp_path, dest):
    archive = make_zip(tmp_path / "bomb.zip", [("zeros.dcm", b"\0" * (20 * MB))])
    assert archive.stat().st_size < 100 * 1024
    _patch_zip_sizes(archive, 1000)  # "only 1000 bytes"
    with pytest.raises(ArchiveRejected):
        safe_extract(archive, dest, max_total_bytes=MB)
    assert not dest.exists()


def test_real_zip_bomb_is_rejected_before_writing(tmp_path, dest):
    archive = make_zip(tmp_path / "bomb.zip", [(f"z{i}.dcm", b"\0" * (10 * MB)) for i in range(5)])
    assert archive.stat().st_size < MB
    with pytest.raises(ArchiveRejected, match="limit"):
        safe_extract(archive, dest, max_total_bytes=8 * MB)
    assert not dest.exists()


def test_tar_over_the_limit_is_rejected_and_what_was_written_is_removed(tmp_path, dest):
    dest.mkdir(parents=True)
    (dest / "keep.txt").write_text("was here before")
    archive = make_tar(
        tmp_path / "big.tar.gz",
        [tar_entry("a/first.dcm", b"\0" * (3 * MB)), tar_entry("a/second.dcm", b"\0" * (3 * MB))],
        "w:gz",
    )
    with pytest.raises(ArchiveRejected, match="limit"):
        safe_extract(archive, dest, max_total_bytes=5 * MB)
    assert tree(dest) == {"keep.txt"}  # only what extraction wrote is removed


def test_the_byte_counter_stops_a_stream_longer_than_declared(tmp_path):
    """Defence in depth behind the declared-size checks: count what is really written."""

    class Endless(io.RawIOBase):
        def readable(self):
            return True

        def readinto(self, buffer):
            buffer[:] = b"\0" * len(buffer)
            return len(buffer)

    root = tmp_path / "root"
    root.mkdir()
    job = _Extraction(root, max_total_bytes=3 * MB)
    with pytest.raises(ArchiveRejected, match="limit"):
        job.add_file("endless.dcm", io.BufferedReader(Endless()))
    assert (root / "endless.dcm").stat().st_size <= 3 * MB
    job.undo()
    assert list(root.iterdir()) == []


def test_too_many_members_is_rejected(tmp_path, dest):
    zip_archive = make_zip(tmp_path / "many.zip", [(f"f{i}", b"") for i in range(30)])
    tar_archive = make_tar(tmp_path / "many.tar", [tar_entry(f"f{i}", b"") for i in range(30)])
    for archive in (zip_archive, tar_archive):
        with pytest.raises(ArchiveRejected, match="limit of 20"):
            safe_extract(archive, dest, MB, max_members=20)
        assert not dest.exists()


@pytest.mark.parametrize(
    "content, reason",
    [(b"", "empty"), (b"this is a log file, not an archive\n" * 100, "neither"), (b"PK\x03\x04garbage", "corrupt")],
)
def test_not_an_archive_is_rejected(tmp_path, dest, content, reason):
    path = tmp_path / "download"
    path.write_bytes(content)
    with pytest.raises(ArchiveRejected, match=reason):
        safe_extract(path, dest, MB)


def test_truncated_tar_is_rejected_and_cleaned_up(tmp_path, dest):
    archive = make_tar(tmp_path / "t.tar", [tar_entry("a.dcm", b"a" * 5000), tar_entry("b.dcm", b"b" * 50000)])
    archive.write_bytes(archive.read_bytes()[:20000])
    with pytest.raises(ArchiveRejected, match="corrupt"):
        safe_extract(archive, dest, MB)
    assert not dest.exists()


# --- finding DICOM files ---


def _bare_dataset(path: Path) -> Path:
    """A DICOM dataset without preamble nor file meta (implicit VR little endian), as some tools write."""
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "OT"
    dcmwrite(path, ds, implicit_vr=True, little_endian=True)
    return path


def test_find_dicom_files_by_content_in_sub_folders(tmp_path):
    root = tmp_path / "outputs"
    part10 = write_ct_series(root / "ct" / "deeper", count=2, rows=8, cols=8)
    renamed = root / "no_extension"
    renamed.write_bytes(part10[0].read_bytes())
    bare = _bare_dataset(root / "bare.raw")
    (root / "log.txt").write_text("model finished\n")
    (root / "mask.nii").write_bytes(struct.pack("<i", 348) + b"\0" * 344 + b"n+1\0")
    (root / "looks_like_group8.bin").write_bytes(b"\x08\x00" + os.urandom(500))
    (root / "empty.dcm").write_bytes(b"")
    (root / "link.dcm").symlink_to(part10[1])
    found = find_dicom_files(root)
    assert set(found) == {*part10, renamed, bare}
    assert len(found) == 4 and found == find_dicom_files(root)  # no duplicates, stable order
    assert is_dicom_file(bare)
    assert not is_dicom_file(root / "looks_like_group8.bin")
