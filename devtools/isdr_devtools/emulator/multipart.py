"""A streaming multipart/form-data parser (RFC 7578) that writes file parts straight to disk.

The standard library no longer has one (cgi is gone in 3.13), and an upload can be hundreds of
MiB, so parts are scanned chunk by chunk for the boundary and never held in memory whole. Only
the small non-file fields are kept in memory, with a cap.
"""

from __future__ import annotations

import email.message
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

_CHUNK = 256 * 1024
_MAX_PREAMBLE = 64 * 1024
_MAX_HEADERS = 16 * 1024
_MAX_FIELD = 64 * 1024
_MAX_PARTS = 100


class MultipartError(ValueError):
    """The body is not well-formed multipart/form-data."""


class _Reader(Protocol):
    def read(self, size: int = ...) -> bytes: ...


@dataclass
class FilePart:
    field: str
    filename: str
    path: Path
    size: int


@dataclass
class Form:
    fields: dict[str, str] = field(default_factory=dict)
    files: dict[str, FilePart] = field(default_factory=dict)

    def discard(self) -> None:
        for part in self.files.values():
            part.path.unlink(missing_ok=True)


def boundary_of(content_type: str | None) -> bytes:
    """The boundary parameter of a multipart/form-data Content-Type header."""
    message = email.message.Message()
    message["content-type"] = content_type or ""
    if message.get_content_type() != "multipart/form-data":
        raise MultipartError(f"expected multipart/form-data, got {message.get_content_type()!r}")
    boundary = message.get_param("boundary")
    if not isinstance(boundary, str) or not 1 <= len(boundary) <= 200:
        raise MultipartError("multipart/form-data without a usable boundary")
    return boundary.encode("latin-1")


def _disposition(headers: dict[str, str]) -> tuple[str, str | None]:
    message = email.message.Message()
    message["content-disposition"] = headers.get("content-disposition", "")
    if message.get_content_disposition() != "form-data":
        raise MultipartError("part without 'Content-Disposition: form-data'")
    name = message.get_param("name", header="content-disposition")
    if not isinstance(name, str) or not name:
        raise MultipartError("part without a field name")
    filename = message.get_filename()  # also decodes RFC 2231 filename*=
    return name, filename


def _parse_headers(raw: bytes) -> dict[str, str]:
    headers: dict[str, str] = {}
    for line in raw.split(b"\r\n"):
        if not line:
            continue
        name, sep, value = line.partition(b":")
        if not sep:
            raise MultipartError("malformed part header line")
        headers[name.decode("latin-1").strip().lower()] = value.decode("utf-8", "replace").strip()
    return headers


class _Scanner:
    """A buffer over the body stream with the few operations the parser needs."""

    def __init__(self, stream: _Reader):
        self._stream = stream
        self.buf = bytearray()
        self.eof = False

    def fill(self) -> None:
        if self.eof:
            raise MultipartError("unexpected end of the multipart body")
        chunk = self._stream.read(_CHUNK)
        if not chunk:
            self.eof = True
        self.buf += chunk

    def take(self, n: int) -> bytes:
        while len(self.buf) < n:
            self.fill()
        data = bytes(self.buf[:n])
        del self.buf[:n]
        return data

    def until(self, marker: bytes, limit: int, what: str) -> bytes:
        """Bytes up to `marker` (which is consumed), refusing more than `limit` bytes of them."""
        while True:
            index = self.buf.find(marker)
            if index >= 0:
                data = bytes(self.buf[:index])
                del self.buf[: index + len(marker)]
                return data
            if len(self.buf) > limit + len(marker):
                raise MultipartError(f"{what} is too long")
            self.fill()


def parse_form(stream: _Reader, boundary: bytes, spool_dir: str | Path) -> Form:
    """Parse the whole body; file parts are written to new files in `spool_dir`.

    On any error, files already written are removed before the exception propagates.
    """
    delimiter = b"--" + boundary
    part_end = b"\r\n" + delimiter
    scanner = _Scanner(stream)
    form = Form()
    try:
        # The first delimiter may be preceded by a preamble (which is ignored).
        first = scanner.until(delimiter, _MAX_PREAMBLE, "the multipart preamble")
        if first and not first.endswith(b"\r\n"):
            raise MultipartError("boundary found inside the preamble")
        for _ in range(_MAX_PARTS + 1):
            ending = scanner.take(2)
            if ending == b"--":
                return form  # the close delimiter; an epilogue, if any, is left unread
            # RFC 2046 allows transport padding (spaces) after a delimiter.
            while ending[:1] in (b" ", b"\t"):
                ending = ending[1:] + scanner.take(1)
            if ending != b"\r\n":
                raise MultipartError("malformed delimiter line")
            if len(form.fields) + len(form.files) >= _MAX_PARTS:
                raise MultipartError("too many parts")
            headers = _parse_headers(scanner.until(b"\r\n\r\n", _MAX_HEADERS, "a part header"))
            name, filename = _disposition(headers)
            if filename is None:
                value = scanner.until(part_end, _MAX_FIELD, f"form field {name!r}")
                form.fields[name] = value.decode("utf-8", "replace")
            else:
                if name in form.files:  # a repeated file field: the last one wins
                    form.files.pop(name).path.unlink(missing_ok=True)
                form.files[name] = _spool_part(scanner, part_end, name, filename, Path(spool_dir))
        raise MultipartError("too many parts")
    except BaseException:
        form.discard()
        raise


def _spool_part(scanner: _Scanner, part_end: bytes, name: str, filename: str, spool_dir: Path) -> FilePart:
    fd, tmp = tempfile.mkstemp(prefix="upload-", suffix=".part", dir=spool_dir)
    path = Path(tmp)
    size = 0
    # Everything but the last len(part_end)-1 bytes can be written: the delimiter cannot start
    # earlier than that without being found by the search.
    keep = len(part_end) - 1
    try:
        with os.fdopen(fd, "wb") as out:
            while True:
                index = scanner.buf.find(part_end)
                if index >= 0:
                    out.write(scanner.buf[:index])
                    size += index
                    del scanner.buf[: index + len(part_end)]
                    break
                flushable = len(scanner.buf) - keep
                if flushable > 0:
                    out.write(scanner.buf[:flushable])
                    size += flushable
                    del scanner.buf[:flushable]
                scanner.fill()
        return FilePart(field=name, filename=filename, path=path, size=size)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
