"""Fingerprint resources: are they usable (Ready), and the set the operator matches against."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable

from relay.fingerprints.manifest import FingerprintError, fingerprint_from_manifest, validate_fingerprint
from relay.fingerprints.matching import regex_problems
from relay.fingerprints.model import Fingerprint
from relay.kube.resources import ConditionType, Reason, condition


@dataclass(frozen=True)
class Evaluation:
    fingerprint: Fingerprint | None  # None when the spec cannot be used at all
    ready: bool
    reason: str
    message: str


def evaluate(body: dict, ca_problem: Callable[[str, str, str], str | None]) -> Evaluation:
    """Whether a Fingerprint can be used. `ca_problem(kind, name, key)` says what is wrong with
    a CA bundle reference (None: it resolves)."""
    name = body["metadata"]["name"]
    namespace = body["metadata"].get("namespace", "")
    try:
        fingerprint = fingerprint_from_manifest(body, source=f"{namespace}/{name}")
    except FingerprintError as exc:
        return Evaluation(None, False, Reason.INVALID_SPEC, str(exc))
    problems = validate_fingerprint(fingerprint)
    if problems:
        return Evaluation(fingerprint, False, _regex_reason(fingerprint), "; ".join(problems))
    ca = (body["spec"]["inferenceServer"].get("caBundle") or {})
    if "path" in ca:
        return Evaluation(fingerprint, False, Reason.UNSUPPORTED_CA_BUNDLE,
                          "caBundle.path names a file on the relay's machine, which Jobs do not "
                          "have: use caBundle.configMapKeyRef or caBundle.secretKeyRef")
    for field, kind in (("configMapKeyRef", "ConfigMap"), ("secretKeyRef", "Secret")):
        if field in ca:
            problem = ca_problem(kind, ca[field]["name"], ca[field]["key"])
            if problem:
                return Evaluation(fingerprint, False, Reason.CA_BUNDLE_NOT_FOUND, problem)
    problem = _destination_tls_problem(body["spec"]["destinations"], ca_problem)
    if problem:
        return Evaluation(fingerprint, False, *problem)
    server = fingerprint.inference_server
    return Evaluation(fingerprint, True, Reason.VALID,
                      f"series matching it go to model {server.model} at {server.url} ({server.protocol})")


def _destination_tls_problem(destinations: list[dict],
                             ca_problem: Callable[[str, str, str], str | None]) -> tuple[str, str] | None:
    """(reason, message) for the first destination whose TLS files cannot be mounted into a Job."""
    for index, destination in enumerate(destinations):
        tls = destination.get("tls") or {}
        if not tls.get("enabled"):
            continue
        where = f"spec.destinations[{index}].tls"
        ca = tls.get("caBundle") or {}
        client = tls.get("clientCertificate") or {}
        if "path" in ca or "certificatePath" in client:
            return (Reason.UNSUPPORTED_DESTINATION_TLS,
                    f"{where} names files on the relay's machine, which Jobs do not have: use "
                    "caBundle.configMapKeyRef or caBundle.secretKeyRef, and clientCertificate.secretName")
        references = [("ConfigMap", ca["configMapKeyRef"]["name"], ca["configMapKeyRef"]["key"])
                      if "configMapKeyRef" in ca else None,
                      ("Secret", ca["secretKeyRef"]["name"], ca["secretKeyRef"]["key"])
                      if "secretKeyRef" in ca else None]
        if "secretName" in client:
            references += [("Secret", client["secretName"], "tls.crt"), ("Secret", client["secretName"], "tls.key")]
        for reference in filter(None, references):
            problem = ca_problem(*reference)
            if problem:
                return Reason.DESTINATION_TLS_NOT_FOUND, f"{where}: {problem}"
    return None


def _regex_reason(fingerprint: Fingerprint) -> str:
    """InvalidRegex for an expression no engine takes; UnsupportedRegex when every problem is a
    construct only a backtracking engine has (valid for Python's re, refused by RE2)."""
    problems = regex_problems(fingerprint.match)
    if problems and all(problem.unsupported for problem in problems):
        return Reason.UNSUPPORTED_REGEX
    return Reason.INVALID_REGEX if problems else Reason.INVALID_SPEC


def ready_condition(evaluation: Evaluation, generation: int | None) -> dict:
    return condition(ConditionType.READY, evaluation.ready, evaluation.reason, evaluation.message, generation)


class FingerprintSet:
    """The Fingerprints the operator knows, with their raw bodies (Jobs carry a snapshot)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._items: dict[str, tuple[Evaluation, dict]] = {}
        self.loaded = threading.Event()  # set once the first full listing is in

    def put(self, body: dict, evaluation: Evaluation) -> None:
        with self._lock:
            self._items[body["metadata"]["name"]] = (evaluation, body)

    def remove(self, name: str) -> None:
        with self._lock:
            self._items.pop(name, None)

    def ready(self) -> list[Fingerprint]:
        with self._lock:
            return [e.fingerprint for e, _ in self._items.values() if e.ready and e.fingerprint]

    def body(self, name: str) -> dict | None:
        with self._lock:
            item = self._items.get(name)
            return item[1] if item else None
