"""The storage interface: durable objects under string keys, on a disk or in a bucket.

Keys are relative, '/'-separated, and built by the relay from validated UIDs (relay.uids); a
backend still refuses keys that could escape its root, as a second line of defence.
"""

from __future__ import annotations

import abc
import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

Chunks = Sequence[bytes | bytearray | memoryview]


class StorageError(Exception):
    """Storage did not do what was asked; the instance or state must not be acknowledged."""


class StorageFull(StorageError):
    """No space left (or below the configured reserve)."""


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    modified: float  # epoch seconds


def check_key(key: str) -> str:
    if (
        not key
        or key.startswith("/")
        or "\\" in key
        or "\x00" in key
        or posixpath.normpath(key) != key.rstrip("/")
        or any(part in ("", ".", "..") for part in key.rstrip("/").split("/"))
    ):
        raise StorageError(f"refusing unsafe storage key {key!r}")
    return key


class Upload(abc.ABC):
    """An object written piece by piece as its bytes arrive (a C-STORE dataset, fragment by
    fragment), whose key is given only at the end: it is nowhere under any key until `commit`
    returns, and then it survives a crash. Not thread-safe: one writer."""

    @abc.abstractmethod
    def write(self, data: bytes | bytearray | memoryview) -> None: ...

    @abc.abstractmethod
    def commit(self, key: str) -> None:
        """Make what was written durable under `key` (replacing an object already there)."""

    @abc.abstractmethod
    def discard(self) -> None:
        """Forget what was written; safe to call after commit or twice."""


class Storage(abc.ABC):
    """Durable key/value objects. `put` and `Upload.commit` return only once the object survives
    a crash."""

    @abc.abstractmethod
    def open_upload(self) -> Upload:
        """Start writing an object whose key is known only once it is complete."""

    @abc.abstractmethod
    def put(self, key: str, chunks: Chunks) -> None: ...

    @abc.abstractmethod
    def get(self, key: str) -> bytes: ...

    @abc.abstractmethod
    def download(self, key: str, destination: Path) -> None: ...

    @abc.abstractmethod
    def exists(self, key: str) -> bool: ...

    @abc.abstractmethod
    def list(self, prefix: str) -> Iterator[ObjectInfo]: ...

    @abc.abstractmethod
    def delete(self, keys: Iterable[str]) -> None:
        """Delete the objects; keys that do not exist are ignored."""

    def free_bytes(self) -> int | None:
        """Space left, where the backend can tell (None: unknown or unlimited)."""
        return None

    @abc.abstractmethod
    def describe(self) -> str: ...

    def close(self) -> None:
        """Finish what the backend does in the background (local storage: its journal)."""

    def put_bytes(self, key: str, data: bytes) -> None:
        self.put(key, (data,))

    def put_state(self, key: str, data: bytes) -> None:
        """A small state document the relay needs to make progress (a dispatch, a task's uid).

        Written even below a free-space reserve: the reserve stops receiving so that these still
        fit, and the progress they record is what frees space again."""
        self.put_bytes(key, data)

    def delete_prefix(self, prefix: str) -> int:
        keys = [info.key for info in self.list(prefix)]
        self.delete(keys)
        return len(keys)
