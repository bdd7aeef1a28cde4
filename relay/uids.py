"""DICOM UIDs from the network, validated before they name anything on disk or in a bucket.

Storage keys and file names are built from these only: never from descriptions or patient
identifiers, which are free text chosen by whoever sends to us.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# PS3.5 9.1: components of digits separated by dots, at most 64 characters. Leading zeros are
# not allowed by the standard but appear in the field; they are harmless in a path, so accepted.
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")
MAX_UID_LENGTH = 64


class InvalidUID(ValueError):
    pass


def is_valid_uid(value) -> bool:
    return (
        isinstance(value, str)
        and 0 < len(value) <= MAX_UID_LENGTH
        and _UID.fullmatch(value) is not None
    )


def require_uid(name: str, value) -> str:
    """Return `value` as a clean UID string, or raise InvalidUID naming the attribute."""
    text = "" if value is None else str(value).rstrip("\x00 ")
    if not is_valid_uid(text):
        shown = text[:80] + ("..." if len(text) > 80 else "")
        raise InvalidUID(f"{name} is not a valid UID: {shown!r}")
    return text


@dataclass(frozen=True, order=True)
class SeriesKey:
    """A series as the relay sees it: one SeriesInstanceUID and one SOP class (as the original)."""

    series_uid: str
    sop_class_uid: str

    def __post_init__(self):
        require_uid("SeriesInstanceUID", self.series_uid)
        require_uid("SOPClassUID", self.sop_class_uid)

    @property
    def prefix(self) -> str:
        """Storage prefix of the series' instances."""
        return f"series/{self.series_uid}/{self.sop_class_uid}/"

    def instance_key(self, sop_instance_uid: str) -> str:
        require_uid("SOPInstanceUID", sop_instance_uid)
        return f"{self.prefix}{sop_instance_uid}.dcm"

    @property
    def slug(self) -> str:
        """One path segment naming the series (UIDs contain only digits and dots)."""
        return f"{self.series_uid}_{self.sop_class_uid}"

    @classmethod
    def from_slug(cls, slug: str) -> "SeriesKey":
        series_uid, _, sop_class_uid = slug.partition("_")
        return cls(series_uid, sop_class_uid)

    def __str__(self) -> str:
        return self.slug


def parse_instance_key(key: str) -> tuple[SeriesKey, str] | None:
    """The inverse of SeriesKey.instance_key; None for anything that is not an instance key."""
    parts = key.split("/")
    if len(parts) != 4 or parts[0] != "series" or not parts[3].endswith(".dcm"):
        return None
    sop_instance_uid = parts[3][: -len(".dcm")]
    if not (is_valid_uid(parts[1]) and is_valid_uid(parts[2]) and is_valid_uid(sop_instance_uid)):
        return None
    return SeriesKey(parts[1], parts[2]), sop_instance_uid
