"""Which instances storage holds: the facts every count and decision is reconciled with."""

from __future__ import annotations

from relay.storage.base import Storage
from relay.uids import SeriesKey, parse_instance_key


def stored_instances(storage: Storage, key: SeriesKey) -> tuple[list[str], float | None]:
    """The SOP Instance UIDs stored for one series, and the newest one's modification time."""
    uids, newest = [], None
    for info in storage.list(key.prefix):
        parsed = parse_instance_key(info.key)
        if parsed is not None and parsed[0] == key:
            uids.append(parsed[1])
            newest = info.modified if newest is None else max(newest, info.modified)
    return uids, newest


def stored_series(storage: Storage) -> dict[SeriesKey, tuple[list[str], float, str]]:
    """Every series in storage: its SOP Instance UIDs, the newest one's time and one instance's key."""
    found: dict[SeriesKey, tuple[list[str], float, str]] = {}
    for info in storage.list("series/"):
        parsed = parse_instance_key(info.key)
        if parsed is None:
            continue
        uids, newest, sample = found.get(parsed[0], ([], 0.0, info.key))
        uids.append(parsed[1])
        found[parsed[0]] = (uids, max(newest, info.modified), sample)
    return found
