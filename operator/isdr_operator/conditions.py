"""Status conditions in the Kubernetes API convention, as pure functions."""

from __future__ import annotations

from relay.kube.series_resource import to_rfc3339


def condition(type_: str, ok: bool, reason: str, message: str, generation: int | None) -> dict:
    return {
        "type": type_,
        "status": "True" if ok else "False",
        "reason": reason,
        "message": message[:1000],
        "observedGeneration": generation,
    }


def set_condition(conditions: list[dict] | None, new: dict, now: float) -> list[dict]:
    """`conditions` with `new` in place of its type; lastTransitionTime moves only on a change
    of status, so that it tells when the condition last flipped, not when it was last written."""
    result, found = [], False
    for existing in conditions or []:
        if existing.get("type") != new["type"]:
            result.append(existing)
            continue
        found = True
        changed = existing.get("status") != new["status"]
        transition = to_rfc3339(now) if changed else existing.get("lastTransitionTime") or to_rfc3339(now)
        result.append({**new, "lastTransitionTime": transition})
    if not found:
        result.append({**new, "lastTransitionTime": to_rfc3339(now)})
    return result


def same_conditions(a: list[dict] | None, b: list[dict] | None) -> bool:
    strip = lambda items: sorted(  # noqa: E731
        ({k: v for k, v in c.items() if k != "lastTransitionTime"} for c in items or []),
        key=lambda c: c["type"])
    return strip(a) == strip(b)
