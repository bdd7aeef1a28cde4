"""Fingerprint manifests (the `Fingerprint` custom resource's shape) <-> Fingerprint objects,
and the original relay's seed JSON -> manifest.

A seed file is converted to a manifest first and then goes through the same schema as every
manifest, so both formats obey one set of rules (crds/fingerprint.yaml). Problems are reported
as FieldIssues, in the vocabulary of what the user wrote: manifest paths for manifests
(`spec.destinations[0].port`), seed keys for seed files (`scus[0].scu_port`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

import yaml

from relay.fingerprints.matching import regex_problems
from relay.fingerprints.model import (
    CABundleRef,
    Destination,
    DestinationTLS,
    Fingerprint,
    InferenceServerRef,
    MatchRules,
    StudyRules,
    StudySeries,
)
from relay.fingerprints.schema import FieldIssue, FieldPath, prepare, validate_manifest

API_VERSION = "isdr.io/v1alpha1"
KIND = "Fingerprint"

# MatchRules attribute -> key in spec.match -> key in a seed file.
MATCH_FIELDS: tuple[tuple[str, str, str], ...] = (
    ("modality", "modality", "modality_regex"),
    ("sop_class_uid", "sopClassUID", "sop_class_uid_regex"),
    ("series_description", "seriesDescription", "series_description_regex"),
    ("study_description", "studyDescription", "study_description_regex"),
    ("exclude", "exclude", "exclude_regex"),
)
MANIFEST_MATCH_KEY = {attr: key for attr, key, _ in MATCH_FIELDS}

SEED_URL = "inference_server_url"
SEED_MODEL = "model_human_readable_id"
SEED_SCUS = "scus"
SEED_SCU_FIELDS = ("scu_ip", "scu_port", "scu_ae_title")
SEED_FIELDS = tuple(seed for _, _, seed in MATCH_FIELDS) + (SEED_URL, SEED_MODEL, SEED_SCUS)

# Where a manifest field came from in a seed file, to report problems in the seed's own terms.
_SEED_PATHS: dict[FieldPath, FieldPath] = {
    **{("spec", "match", key): (seed,) for _, key, seed in MATCH_FIELDS},
    ("spec", "inferenceServer", "url"): (SEED_URL,),
    ("spec", "inferenceServer", "model"): (SEED_MODEL,),
    ("spec", "destinations"): (SEED_SCUS,),
}
_SEED_DESTINATION_KEYS = {"host": "scu_ip", "port": "scu_port", "aeTitle": "scu_ae_title"}

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS_LABEL_MAX = 63


class FingerprintError(ValueError):
    """A fingerprint that cannot be used; `issues` says which fields are wrong and why."""

    def __init__(self, issues: Iterable[FieldIssue], source: str = "") -> None:
        self.issues = tuple(issues)
        self.source = source
        super().__init__("; ".join(str(issue) for issue in self.issues))


# --- names ------------------------------------------------------------------------------------


def is_dns_label(name: str) -> bool:
    return len(name) <= DNS_LABEL_MAX and bool(_DNS_LABEL.match(name))


def dns_label(text: str) -> str:
    """A DNS-1123 label made from any text (a seed file's stem): 'CNS_T1 oars' -> 'cns-t1-oars'."""
    label = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    label = label[:DNS_LABEL_MAX].rstrip("-")
    return label or "fingerprint"


# --- manifest -> Fingerprint ------------------------------------------------------------------


def _identity_issues(manifest: Mapping[str, Any]) -> list[FieldIssue]:
    issues = []
    for key, expected in (("apiVersion", API_VERSION), ("kind", KIND)):
        found = manifest.get(key)
        if found != expected:
            shown = "missing" if found is None else f"{found!r}"
            issues.append(FieldIssue((key,), f"must be {expected} (found {shown})"))
    return issues


def fingerprint_from_manifest(obj: Mapping[str, Any], source: str) -> Fingerprint:
    """The Fingerprint of a manifest or custom resource (a dict, or kopf's body).

    Raises FingerprintError when the object is not a valid Fingerprint. Regular expressions
    are not compiled here, so that the operator can still report an invalid one on the
    resource: see validate_fingerprint.
    """
    if not isinstance(obj, Mapping):
        raise FingerprintError([FieldIssue((), "a Fingerprint manifest must be a mapping of fields")], source)
    identity = _identity_issues(obj)
    if identity:  # another kind of object: its fields would only produce noise
        raise FingerprintError(identity, source)
    manifest = prepare(obj)
    issues = validate_manifest(manifest)
    if not manifest.get("metadata", {}).get("name"):
        issues.insert(0, FieldIssue(("metadata", "name"), "is required but missing"))
    if issues:
        raise FingerprintError(issues, source)
    return _build(manifest, source)


def _ca_bundle_ref(ca: Mapping[str, Any]) -> CABundleRef | None:
    for key, kind in (("configMapKeyRef", "configMap"), ("secretKeyRef", "secret")):
        if key in ca:
            return CABundleRef(kind=kind, name=ca[key]["name"], key=ca[key]["key"])
    return None


def _seconds(value: Any) -> float | None:
    return None if value is None else float(value)


def _match_rules(match: Mapping[str, Any]) -> MatchRules:
    return MatchRules(**{attr: match.get(key, "") for attr, key, _ in MATCH_FIELDS})


def _study_rules(study: Mapping[str, Any] | None) -> StudyRules | None:
    if study is None:
        return None
    return StudyRules(
        series=tuple(StudySeries(name=entry["name"], match=_match_rules(entry["match"])) for entry in study["series"]),
        timeout_seconds=float(study["timeoutSeconds"]),
        on_timeout=study["onTimeout"],
    )


def _build(manifest: Mapping[str, Any], source: str) -> Fingerprint:
    spec = manifest["spec"]
    match = spec.get("match", {})
    server = spec["inferenceServer"]
    ca = server.get("caBundle", {})
    return Fingerprint(
        name=manifest["metadata"]["name"],
        match=_match_rules(match),
        inference_server=InferenceServerRef(
            url=server["url"],
            model=server["model"],
            protocol=server.get("protocol", "v2"),
            ca_bundle=ca.get("path"),
            ca_bundle_ref=_ca_bundle_ref(ca),
            poll_interval_seconds=_seconds(server.get("pollIntervalSeconds")),
            timeout_seconds=_seconds(server.get("timeoutSeconds")),
            delete_when_done=server.get("deleteWhenDone"),
        ),
        destinations=tuple(
            Destination(host=d["host"], port=d["port"], ae_title=d["aeTitle"], tls=_destination_tls(d.get("tls")))
            for d in spec["destinations"]
        ),
        source=source,
        study=_study_rules(spec.get("study")),
        priority=int(spec.get("priority") or 0),
    )


def _destination_tls(tls: Mapping[str, Any] | None) -> DestinationTLS | None:
    """The TLS settings of a destination; None for plain DICOM (no tls, or enabled: false)."""
    if not tls or not tls.get("enabled"):
        return None
    ca = tls.get("caBundle", {})
    client = tls.get("clientCertificate", {})
    return DestinationTLS(
        ca_bundle=ca.get("path"),
        ca_bundle_ref=_ca_bundle_ref(ca),
        client_certificate=client.get("certificatePath"),
        client_key=client.get("keyPath"),
        client_secret=client.get("secretName"),
        server_name=tls.get("serverName"),
    )


def _ca_bundle_spec(path: str | None, ref: CABundleRef | None) -> dict[str, Any] | None:
    if ref is not None:
        return {f"{ref.kind}KeyRef": {"name": ref.name, "key": ref.key}}
    return {"path": path} if path is not None else None


def _destination_spec(destination: Destination) -> dict[str, Any]:
    spec: dict[str, Any] = {"host": destination.host, "port": destination.port, "aeTitle": destination.ae_title}
    tls = destination.tls
    if tls is None:
        return spec
    spec["tls"] = {"enabled": True}
    ca = _ca_bundle_spec(tls.ca_bundle, tls.ca_bundle_ref)
    if ca:
        spec["tls"]["caBundle"] = ca
    if tls.client_secret:
        spec["tls"]["clientCertificate"] = {"secretName": tls.client_secret}
    elif tls.client_certificate:
        spec["tls"]["clientCertificate"] = {"certificatePath": tls.client_certificate, "keyPath": tls.client_key}
    if tls.server_name:
        spec["tls"]["serverName"] = tls.server_name
    return spec


def fingerprint_issues(fp: Fingerprint) -> list[FieldIssue]:
    """What makes a structurally valid fingerprint unusable (today: expressions that do not compile)."""
    rules: list[tuple[FieldPath, MatchRules]] = [(("spec", "match"), fp.match)]
    if fp.study is not None:
        rules += [(("spec", "study", "series", i, "match"), entry.match) for i, entry in enumerate(fp.study.series)]
    return [
        FieldIssue(prefix + (MANIFEST_MATCH_KEY[problem.field],), problem.describe())
        for prefix, match in rules
        for problem in regex_problems(match)
    ]


def _regex_issues(match: Any, key_of: Mapping[str, str], prefix: FieldPath) -> list[FieldIssue]:
    """Expressions that do not compile, read straight from a mapping that failed validation for
    other reasons (so that one run reports them all). Fields that are not strings are skipped:
    the schema already reports those."""
    if not isinstance(match, Mapping):
        return []
    values = {attr: match[key] for attr, key in key_of.items() if isinstance(match.get(key), str)}
    return [
        FieldIssue(prefix + (key_of[problem.field],), problem.describe())
        for problem in regex_problems(MatchRules(**values))
    ]


def manifest_regex_issues(manifest: Any) -> list[FieldIssue]:
    spec = manifest.get("spec") if isinstance(manifest, Mapping) else None
    match = spec.get("match") if isinstance(spec, Mapping) else None
    issues = _regex_issues(match, MANIFEST_MATCH_KEY, ("spec", "match"))
    study = spec.get("study") if isinstance(spec, Mapping) else None
    entries = study.get("series") if isinstance(study, Mapping) else None
    for index, entry in enumerate(entries if isinstance(entries, list) else ()):
        if isinstance(entry, Mapping):
            prefix = ("spec", "study", "series", index, "match")
            issues += _regex_issues(entry.get("match"), MANIFEST_MATCH_KEY, prefix)
    return issues


def seed_regex_issues(seed: Any) -> list[FieldIssue]:
    return _regex_issues(seed, {attr: seed_key for attr, _, seed_key in MATCH_FIELDS}, ())


def validate_fingerprint(fp: Fingerprint) -> list[str]:
    """Messages for the operator's Ready condition; empty when the fingerprint can be used."""
    return [str(issue) for issue in fingerprint_issues(fp)]


# --- Fingerprint -> manifest ------------------------------------------------------------------


def _whole(seconds: float) -> int | float:
    return int(seconds) if float(seconds).is_integer() else seconds


def _match_spec(match: MatchRules) -> dict[str, str]:
    return {key: getattr(match, attr) for attr, key, _ in MATCH_FIELDS}


def _study_spec(study: StudyRules) -> dict[str, Any]:
    return {
        "series": [{"name": entry.name, "match": _match_spec(entry.match)} for entry in study.series],
        "timeoutSeconds": _whole(study.timeout_seconds),
        "onTimeout": study.on_timeout,
    }


def fingerprint_to_manifest(fp: Fingerprint) -> dict[str, Any]:
    """The manifest of a fingerprint; optional settings appear only when set."""
    server = fp.inference_server
    server_spec: dict[str, Any] = {"url": server.url, "protocol": server.protocol, "model": server.model}
    ca = _ca_bundle_spec(server.ca_bundle, server.ca_bundle_ref)
    if ca:
        server_spec["caBundle"] = ca
    if server.poll_interval_seconds is not None:
        server_spec["pollIntervalSeconds"] = _whole(server.poll_interval_seconds)
    if server.timeout_seconds is not None:
        server_spec["timeoutSeconds"] = _whole(server.timeout_seconds)
    if server.delete_when_done is not None:
        server_spec["deleteWhenDone"] = server.delete_when_done
    spec: dict[str, Any] = {"match": _match_spec(fp.match)}
    if fp.study is not None:
        spec = {"level": fp.level, **spec, "study": _study_spec(fp.study)}
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {"name": fp.name},
        "spec": {**spec, "inferenceServer": server_spec, "destinations": [_destination_spec(d) for d in fp.destinations],
                 **({"priority": fp.priority} if fp.priority else {})},
    }


def manifest_yaml(fp: Fingerprint, comment: str = "") -> str:
    """The manifest of a fingerprint as YAML text, after an optional `#` comment block."""
    header = "".join(f"# {line}\n" if line else "#\n" for line in comment.splitlines())
    body = yaml.safe_dump(fingerprint_to_manifest(fp), sort_keys=False, default_flow_style=False, allow_unicode=True)
    return header + body


# --- seed -> manifest -------------------------------------------------------------------------


def seed_path(path: FieldPath) -> FieldPath:
    """The seed-file path of a manifest field: spec.destinations[0].port -> scus[0].scu_port."""
    path = tuple(path)
    if path in _SEED_PATHS:
        return _SEED_PATHS[path]
    if len(path) >= 3 and path[:2] == ("spec", "destinations") and isinstance(path[2], int):
        rest = tuple(_SEED_DESTINATION_KEYS.get(str(part), part) for part in path[3:])
        return (SEED_SCUS, path[2]) + rest
    return path


def _port(value: Any) -> int | None:
    """A port from a seed: the original wrote it as a string ("11111"); a number is fine too."""
    if isinstance(value, bool):  # bool is an int in Python; true is not a port
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    return None


def _string_issue(seed: Mapping[str, Any], path: FieldPath, key: str) -> FieldIssue | None:
    if key not in seed:
        return FieldIssue(path + (key,), "is required but missing")
    if not isinstance(seed[key], str):
        return FieldIssue(path + (key,), f"must be a string in double quotes (found {json_text(seed[key])})")
    return None


def json_text(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, list)):
        return "an object" if isinstance(value, dict) else "a list"
    return repr(value)


def _destination(scu: Any, index: int, issues: list[FieldIssue], warnings: list[FieldIssue]) -> dict[str, Any]:
    path: FieldPath = (SEED_SCUS, index)
    if not isinstance(scu, Mapping):
        issues.append(FieldIssue(path, 'must be an object like {"scu_ip": ..., "scu_port": ..., "scu_ae_title": ...}'))
        return {}
    for key in ("scu_ip", "scu_ae_title"):
        issue = _string_issue(scu, path, key)
        if issue:
            issues.append(issue)
    port = None
    if "scu_port" not in scu:
        issues.append(FieldIssue(path + ("scu_port",), "is required but missing"))
    else:
        port = _port(scu["scu_port"])
        if port is None:
            issues.append(FieldIssue(path + ("scu_port",), f"{json_text(scu['scu_port'])} is not a port number"))
    warnings.extend(
        FieldIssue(path + (key,), "is not a seed fingerprint field; it is ignored")
        for key in scu
        if key not in SEED_SCU_FIELDS
    )
    return {"host": scu.get("scu_ip"), "port": port, "aeTitle": scu.get("scu_ae_title")}


def manifest_from_seed(seed: Any, name: str) -> tuple[dict[str, Any], list[FieldIssue]]:
    """The manifest equivalent to an original relay seed fingerprint, and warnings.

    A seed fingerprint speaks protocol v1: its URL is the v1 tasks URL. Raises FingerprintError
    (with seed paths) for missing fields and wrong types; values are checked by the schema later.
    """
    if not isinstance(seed, Mapping):
        raise FingerprintError([FieldIssue((), "a seed fingerprint must be a JSON object: { ... }")])
    issues: list[FieldIssue] = []
    warnings = [
        FieldIssue((key,), "is not a seed fingerprint field; it is ignored") for key in seed if key not in SEED_FIELDS
    ]
    for key in SEED_FIELDS[:-1]:
        issue = _string_issue(seed, (), key)
        if issue:
            issues.append(issue)
    destinations = []
    if SEED_SCUS not in seed:
        issues.append(FieldIssue((SEED_SCUS,), "is required but missing"))
    elif not isinstance(seed[SEED_SCUS], list):
        issues.append(FieldIssue((SEED_SCUS,), f"must be a list [ ... ] (found {json_text(seed[SEED_SCUS])})"))
    else:
        destinations = [_destination(scu, i, issues, warnings) for i, scu in enumerate(seed[SEED_SCUS])]
    if issues:
        raise FingerprintError(issues)
    manifest = {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {"name": name},
        "spec": {
            "match": {key: seed[seed_key] for _, key, seed_key in MATCH_FIELDS},
            "inferenceServer": {"url": seed[SEED_URL], "protocol": "v1", "model": seed[SEED_MODEL]},
            "destinations": destinations,
        },
    }
    return manifest, warnings


def fingerprint_from_seed(seed: Any, name: str, source: str) -> tuple[Fingerprint, list[FieldIssue]]:
    """The Fingerprint of a seed, and warnings; raises FingerprintError with seed paths."""
    manifest, warnings = manifest_from_seed(seed, name)
    try:
        return fingerprint_from_manifest(manifest, source), warnings
    except FingerprintError as error:
        raise FingerprintError([FieldIssue(seed_path(i.path), i.message) for i in error.issues], source) from None
