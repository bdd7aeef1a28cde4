"""DicomSeries objects as the receiver and the operator leave them, made directly through the API:
thousands of old, finished series for the operator's scale tests and benchmark."""

from __future__ import annotations

from relay.kube.resources import GROUP, SERIES_PLURAL, VERSION, resource_name, to_rfc3339
from relay.uids import SeriesKey

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"


def finished_series(index: int, now: float, fingerprint: str = "bench") -> tuple[dict, dict]:
    """(object, status) of a series that Succeeded a minute ago, instances deleted, remembered
    for SERIES_RETENTION: nothing is left to do for it."""
    key = SeriesKey(f"1.2.826.0.1.3680043.10.1.{index}", CT_IMAGE)
    body = {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "DicomSeries",
        "metadata": {"name": resource_name(key)},
        "spec": {"seriesInstanceUID": key.series_uid, "sopClassUID": key.sop_class_uid, "modality": "CT",
                 "seriesDescription": f"bench {index}", "studyDescription": "bench",
                 "storage": {"type": "local", "prefix": key.prefix}},
    }
    status = {
        "instances": 200, "firstReceived": to_rfc3339(now - 60), "lastReceived": to_rfc3339(now - 50),
        "phase": "Succeeded", "generation": 1, "dispatchedInstances": 200, "instancesDeleted": True,
        "dispatchedTime": to_rfc3339(now - 40), "completedTime": to_rfc3339(now - 10), "progress": "1/1",
        "tasks": [{"taskId": f"bench-{index}-1", "fingerprint": fingerprint, "generation": 1,
                   "job": f"bench-{index}-1", "phase": "Succeeded", "inferenceTaskUID": f"uid{index}"}],
    }
    return body, status


def create_series(custom, namespace: str, body: dict, status: dict) -> dict:
    """Create the object, then write its status (the status subresource ignores it on create)."""
    created = custom.create_namespaced_custom_object(GROUP, VERSION, namespace, SERIES_PLURAL, body)
    return custom.patch_namespaced_custom_object_status(
        GROUP, VERSION, namespace, SERIES_PLURAL, created["metadata"]["name"], {"status": status},
        _content_type="application/merge-patch+json")
