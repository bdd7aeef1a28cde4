"""One C-STORE's dataset on its way to storage: each fragment is written to the storage upload
and walked (relay.dicom.dataset_stream) as it arrives, so nothing of the instance is held in
memory; at the end it is checked, made durable under its key, and answered with a status.

The file is the DICOM file format: preamble and file meta (written first, from the request's
UIDs), then the dataset bytes exactly as the sender encoded them in the negotiated transfer
syntax (compressed data stays compressed). The dataset's own UIDs must agree with the request's,
so the header written before the dataset arrived is right, or the instance is refused.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from relay.dicom.conformance import encoding_of
from relay.dicom.dataset_stream import DatasetWalker, UndecodableDataset
from relay.dicom.file_meta import file_header
from relay.dicom.identity import IDENTITY_TAGS, InstanceIdentity, identify
from relay.storage.base import Storage, StorageError, StorageFull, Upload
from relay.uids import InvalidUID, require_uid

log = logging.getLogger("relay.receiver")

# C-STORE statuses (PS3.4 B.2.3 and the general statuses of PS3.7 C).
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC000  # + a low byte saying which check failed
UNDECODABLE = CANNOT_UNDERSTAND | 0x210
INVALID_UID = CANNOT_UNDERSTAND | 0x220
PROCESSING_FAILURE = 0x0110

# A durable write that takes longer is said in the log: the sender waited that long for its answer
# (a storage that stalls, e.g. behind a whole file system's write-back, looks like a hung receiver).
SLOW_COMMIT_SECONDS = 5.0
_clock = time.monotonic


@dataclass(frozen=True)
class StoredInstance:
    identity: InstanceIdentity
    size: int


class IncomingInstance:
    """Fed the dataset's fragments in order; `finish` returns (status, StoredInstance or None)."""

    def __init__(self, storage: Storage, transfer_syntax: str, affected_sop_class_uid: str,
                 affected_sop_instance_uid: str, calling_ae_title: str, upload: Upload | None = None):
        self._peer = calling_ae_title or "?"
        self._affected = (affected_sop_class_uid, affected_sop_instance_uid)
        self._walker = DatasetWalker(encoding_of(transfer_syntax), IDENTITY_TAGS)
        self._failure: int | None = None  # a status decided before the end; the rest is only walked
        self._upload: Upload | None = None
        self.size = 0
        try:
            require_uid("SOPClassUID", affected_sop_class_uid)
            require_uid("SOPInstanceUID", affected_sop_instance_uid)
        except InvalidUID:
            if upload is not None:
                upload.discard()
            return  # the dataset decides which status (its UIDs are checked first); nothing is written
        header = file_header(affected_sop_class_uid, affected_sop_instance_uid, transfer_syntax, calling_ae_title)
        try:
            self._upload = upload or storage.open_upload()
            self._upload.write(header)
            self.size = len(header)
        except StorageError as exc:
            self._storage_failed(exc)

    def write(self, fragment) -> None:
        if self._failure == UNDECODABLE:
            return
        try:
            self._walker.feed(fragment)
        except UndecodableDataset as exc:
            log.warning("refused an instance from %s: %s", self._peer, exc)
            self._failure = UNDECODABLE
            self.discard()
            return
        if self._upload is not None:
            try:
                self._upload.write(fragment)
                self.size += len(fragment)
            except StorageError as exc:
                self._storage_failed(exc)

    def finish(self) -> tuple[int, StoredInstance | None]:
        try:
            return self._finish()
        finally:
            self.discard()

    def _finish(self) -> tuple[int, StoredInstance | None]:
        if self._failure == UNDECODABLE:
            return UNDECODABLE, None
        try:
            identity = identify(self._walker.finish())
        except UndecodableDataset as exc:
            log.warning("refused an instance from %s: %s", self._peer, exc)
            return UNDECODABLE, None
        except InvalidUID as exc:
            log.warning("refused an instance from %s: %s", self._peer, exc)
            return INVALID_UID, None
        sop_class_uid, sop_instance_uid = self._affected
        if identity.series.sop_class_uid != sop_class_uid:
            log.warning("refused an instance from %s: dataset SOP class %s, request says %s",
                        self._peer, identity.series.sop_class_uid, sop_class_uid[:64])
            return DATASET_DOES_NOT_MATCH_SOP_CLASS, None
        if identity.sop_instance_uid != sop_instance_uid:
            log.warning("refused an instance from %s: dataset SOP instance UID differs from the request's",
                        self._peer)
            return INVALID_UID, None
        if self._failure is not None or self._upload is None:
            return self._failure or PROCESSING_FAILURE, None
        key = identity.series.instance_key(identity.sop_instance_uid)
        started = _clock()
        try:
            # Same SOP Instance UID, same key: a re-sent instance replaces itself, never duplicates.
            self._upload.commit(key)
        except StorageError as exc:
            self._storage_failed(exc)
            return self._failure, None
        took = _clock() - started
        if took >= SLOW_COMMIT_SECONDS:
            log.warning("the storage took %.1fs to make an instance from %s durable (the sender waited for it)",
                        took, self._peer)
        return SUCCESS, StoredInstance(identity, self.size)

    def _storage_failed(self, exc: StorageError) -> None:
        if isinstance(exc, StorageFull):
            log.error("refused an instance from %s: storage full: %s", self._peer, exc)
            self._failure = OUT_OF_RESOURCES
        else:
            log.error("refused an instance from %s: storage failed: %s", self._peer, exc)
            self._failure = PROCESSING_FAILURE
        self.discard()

    def discard(self) -> None:
        if self._upload is not None:
            self._upload.discard()
            self._upload = None
