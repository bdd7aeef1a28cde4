"""ISDR data plane: DICOM receive/send, storage, fingerprints, series life cycle, inference tasks."""

__version__ = "0.1.0"
