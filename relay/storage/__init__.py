"""Where instances and state live: a local directory or an S3-compatible bucket."""

from relay.storage.base import ObjectInfo, Storage, StorageError, StorageFull, Upload


def open_storage(settings, receiving: bool = False) -> Storage:
    """The storage the settings name (STORAGE=local|s3). `receiving`: the process stores what
    it receives (isdr run, isdr scp): local storage journals its uploads (STORAGE_JOURNAL); call
    `close` when done."""
    if settings.storage == "s3":
        from relay.storage.s3 import S3Storage

        return S3Storage(
            bucket=settings.s3_bucket,
            prefix=settings.s3_prefix,
            endpoint_url=settings.s3_endpoint_url,
            region=settings.s3_region,
            spool_dir=settings.incoming_dir / ".tmp-spool",
        )
    from relay.storage.local import LocalStorage

    return LocalStorage(settings.incoming_dir, min_free_bytes=settings.min_free_bytes,
                        journal=receiving and settings.storage_journal)


__all__ = ["ObjectInfo", "Storage", "StorageError", "StorageFull", "Upload", "open_storage"]
