"""Request bodies as bounded streams: Content-Length or chunked, with a size limit.

http.server hands the handler a raw socket file; reading past the body would hang on a keep-alive
connection, and an upload must never be held in memory whole (a CT series is hundreds of MiB).
"""

from __future__ import annotations

from typing import BinaryIO


class BodyError(ValueError):
    """The request body is malformed (bad chunk framing, connection closed early)."""


class BodyTooLarge(Exception):
    def __init__(self, limit: int):
        super().__init__(f"request body exceeds the limit of {limit} bytes")
        self.limit = limit


class BodyReader:
    """Reads exactly one request body from `rfile`; `read()` returns b"" at its end."""

    def __init__(self, rfile: BinaryIO, content_length: int | None, chunked: bool, limit: int):
        if not chunked and content_length is None:
            raise BodyError("a body needs Content-Length or chunked Transfer-Encoding")
        self._rfile = rfile
        self._chunked = chunked
        self._remaining = 0 if chunked else content_length  # bytes left (in the current chunk)
        self._finished = False
        self._limit = limit
        self.consumed = 0

    def _next_chunk(self) -> None:
        line = self._rfile.readline(1024)
        if not line.endswith(b"\n"):
            raise BodyError("malformed chunk header")
        try:
            size = int(line.split(b";", 1)[0].strip(), 16)
        except ValueError as exc:
            raise BodyError("malformed chunk size") from exc
        if size == 0:
            # Trailer fields, then the empty line that ends the body.
            while True:
                trailer = self._rfile.readline(8192)
                if trailer in (b"\r\n", b"\n", b""):
                    break
            self._finished = True
        self._remaining = size

    def _read_raw(self, size: int) -> bytes:
        while not self._finished and self._remaining == 0:
            if not self._chunked:
                self._finished = True
                break
            self._next_chunk()
        if self._finished:
            return b""
        data = self._rfile.read(min(size, self._remaining))
        if not data:
            raise BodyError("connection closed before the end of the request body")
        self._remaining -= len(data)
        if self._chunked and self._remaining == 0:
            if self._rfile.readline(8) not in (b"\r\n", b"\n"):
                raise BodyError("malformed chunk terminator")
        return data

    def read(self, size: int = 65536) -> bytes:
        data = self._read_raw(size)
        self.consumed += len(data)
        if self.consumed > self._limit:
            raise BodyTooLarge(self._limit)
        return data

    def drain(self) -> None:
        """Discard the rest of the body, so the answer reaches a client that is still sending."""
        while self._read_raw(1 << 20):
            pass
