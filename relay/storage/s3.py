"""Storage in an S3-compatible object store (AWS S3, MinIO, Ceph RGW, ...).

A PUT that returned 200 is durable in every S3 implementation we target, so an instance is
acknowledged to the sender only after `put_object` returned. Credentials come from the standard
AWS variables (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_PROFILE, ...).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Iterable, Iterator

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from relay.storage.base import Chunks, ObjectInfo, Storage, StorageError, StorageFull, Upload, check_key

_DELETE_BATCH = 1000  # the S3 API's limit for DeleteObjects
# An upload is kept in memory up to this size, then spooled to a file under `spool_dir`, and sent
# with boto3's managed transfer (multipart above its threshold) once complete.
SPOOL_IN_MEMORY = 8 * 1024 * 1024


class S3Storage(Storage):
    def __init__(self, bucket: str, prefix: str = "", endpoint_url: str | None = None,
                 region: str | None = None, client=None, spool_dir: Path | None = None):
        self.bucket = bucket
        # Where uploads larger than SPOOL_IN_MEMORY wait for their end (never a shared /tmp).
        self.spool_dir = Path(spool_dir) if spool_dir is not None else None
        self.prefix = f"{prefix.strip('/')}/" if prefix.strip("/") else ""
        self.endpoint_url = endpoint_url
        self.client = client or boto3.client(
            "s3",
            endpoint_url=endpoint_url,
            region_name=region,
            config=Config(retries={"max_attempts": 5, "mode": "standard"},
                          max_pool_connections=32),
        )

    def describe(self) -> str:
        where = f" at {self.endpoint_url}" if self.endpoint_url else ""
        return f"S3 bucket {self.bucket}/{self.prefix}{where}"

    def _full(self, key: str) -> str:
        return self.prefix + check_key(key)

    def put(self, key: str, chunks: Chunks) -> None:
        body = b"".join(bytes(chunk) if not isinstance(chunk, bytes) else chunk for chunk in chunks)
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._full(key), Body=body)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("QuotaExceeded", "EntityTooLarge", "XMinioStorageFull"):
                raise StorageFull(f"S3 refused {key}: {code}") from exc
            raise StorageError(f"S3 PUT {key} failed: {code or exc}") from exc
        except BotoCoreError as exc:
            raise StorageError(f"S3 PUT {key} failed: {exc}") from exc

    def open_upload(self) -> "S3Upload":
        return S3Upload(self)

    def _upload_file(self, key: str, handle) -> None:
        try:
            self.client.upload_fileobj(handle, self.bucket, self._full(key))
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("QuotaExceeded", "EntityTooLarge", "XMinioStorageFull"):
                raise StorageFull(f"S3 refused {key}: {code}") from exc
            raise StorageError(f"S3 upload {key} failed: {code or exc}") from exc
        except (BotoCoreError, Exception) as exc:  # boto3's transfer manager wraps errors freely
            raise StorageError(f"S3 upload {key} failed: {exc}") from exc

    def get(self, key: str) -> bytes:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._full(key))["Body"].read()
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                raise KeyError(key) from None
            raise StorageError(f"S3 GET {key} failed: {exc}") from exc
        except BotoCoreError as exc:
            raise StorageError(f"S3 GET {key} failed: {exc}") from exc

    def download(self, key: str, destination: Path) -> None:
        try:
            self.client.download_file(self.bucket, self._full(key), str(destination))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                raise KeyError(key) from None
            raise StorageError(f"S3 download {key} failed: {exc}") from exc
        except BotoCoreError as exc:
            raise StorageError(f"S3 download {key} failed: {exc}") from exc

    def exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self._full(key))
            return True
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound"):
                return False
            raise StorageError(f"S3 HEAD {key} failed: {exc}") from exc

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        if prefix:
            check_key(prefix)
        paginator = self.client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix + prefix):
                for item in page.get("Contents", []):
                    yield ObjectInfo(
                        key=item["Key"][len(self.prefix):],
                        size=item["Size"],
                        modified=item["LastModified"].timestamp(),
                    )
        except (ClientError, BotoCoreError) as exc:
            raise StorageError(f"S3 LIST {prefix} failed: {exc}") from exc

    def delete(self, keys: Iterable[str]) -> None:
        batch: list[str] = []
        for key in keys:
            batch.append(self._full(key))
            if len(batch) == _DELETE_BATCH:
                self._delete_batch(batch)
                batch = []
        if batch:
            self._delete_batch(batch)

    def _delete_batch(self, full_keys: list[str]) -> None:
        try:
            answer = self.client.delete_objects(
                Bucket=self.bucket,
                Delete={"Objects": [{"Key": k} for k in full_keys], "Quiet": True},
            )
        except (ClientError, BotoCoreError) as exc:
            raise StorageError(f"S3 DELETE failed: {exc}") from exc
        errors = [e for e in answer.get("Errors", []) if e.get("Code") != "NoSuchKey"]
        if errors:
            raise StorageError(f"S3 DELETE failed for {len(errors)} objects: {errors[0]}")

    def ensure_bucket(self) -> None:
        """Create the bucket if it does not exist (development and tests; production pre-creates)."""
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError:
            self.client.create_bucket(Bucket=self.bucket)


class S3Upload(Upload):
    def __init__(self, storage: S3Storage):
        self._storage = storage
        spool = storage.spool_dir
        try:
            if spool is not None:
                spool.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot make the spool folder {spool} for uploads: {exc}") from exc
        self._file = tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY, dir=spool, prefix=".tmp-spool-")

    def write(self, data) -> None:
        try:
            self._file.write(data)
        except OSError as exc:
            self.discard()
            raise StorageError(f"could not spool an upload: {exc}") from exc

    def commit(self, key: str) -> None:
        if self._file is None:
            raise StorageError(f"upload for {key} was discarded")
        self._file.seek(0)
        try:
            self._storage._upload_file(key, self._file)
        finally:
            self.discard()

    def discard(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
