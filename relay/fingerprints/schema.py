"""Validate Fingerprint manifests against the CRD's own openAPIV3Schema (crds/fingerprint.yaml).

There is one schema: the API server applies it to custom resources, and this module applies it
to local manifest files, so a manifest that `isdr fingerprint check` accepts is one that
`kubectl apply` accepts. To behave like the API server, a manifest is first prepared the way
the API server prepares a custom resource (null fields dropped, schema defaults filled in), then
validated with jsonschema. Two additions mirror what the cluster does beyond plain JSON Schema:

- unknown fields are errors, as with kubectl's strict field validation (a misspelt
  `seriesDescripton` would otherwise be dropped silently and match everything);
- the CEL rules (`x-kubernetes-validations`) are run through Python twins, keyed by the exact
  rule text. Loading the schema fails if a rule has no twin, so a rule changed in the CRD
  cannot be forgotten here (the unit tests load it).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import yaml
from jsonschema import ValidationError

# The CRD lives in the repository's crds/ folder (the chart and the image use the same file).
# ISDR_CRDS_DIR points elsewhere, e.g. in an installation without the source tree.
CRDS_DIR_ENV = "ISDR_CRDS_DIR"
CRD_FILE_NAME = "fingerprint.yaml"

PathElement = str | int
FieldPath = tuple[PathElement, ...]


@dataclass(frozen=True)
class FieldIssue:
    """One thing wrong with one field of a manifest (or of a seed file)."""

    path: FieldPath
    message: str

    def __str__(self) -> str:
        where = format_path(self.path)
        return f"{where}: {self.message}" if where else self.message


def format_path(path: Iterable[PathElement]) -> str:
    """('spec', 'destinations', 0, 'port') -> 'spec.destinations[0].port'."""
    text = ""
    for element in path:
        if isinstance(element, int):
            text += f"[{element}]"
        else:
            text += f".{element}" if text else str(element)
    return text


def crd_path() -> Path:
    configured = os.environ.get(CRDS_DIR_ENV)
    if configured:
        return Path(configured) / CRD_FILE_NAME
    return Path(__file__).resolve().parents[2] / "crds" / CRD_FILE_NAME


@cache
def load_crd(path: Path | None = None) -> dict[str, Any]:
    """The Fingerprint CustomResourceDefinition, as a dict."""
    with open(path or crd_path(), encoding="utf-8") as stream:
        return yaml.safe_load(stream)


def crd_schema(path: Path | None = None) -> dict[str, Any]:
    """The openAPIV3Schema of the served version (a copy: callers may change it)."""
    crd = load_crd(path)
    (version,) = [v for v in crd["spec"]["versions"] if v.get("storage")]
    return copy.deepcopy(version["schema"]["openAPIV3Schema"])


# --- CEL twins --------------------------------------------------------------------------------
# Each returns True when the value passes. The API server only runs a rule on a value of the
# declared type, so a twin accepts values of another type (the type error is reported anyway).


def _is_http_url(value: Any) -> bool:
    if not isinstance(value, str):
        return True
    if any(ch.isspace() for ch in value):
        return False
    try:
        parts = urlsplit(value)
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname)


def _exactly_one_ca_source(value: Any) -> bool:
    if not isinstance(value, Mapping):
        return True
    return sum(key in value for key in ("configMapKeyRef", "secretKeyRef", "path")) == 1


def _client_certificate_source(value: Any) -> bool:
    if not isinstance(value, Mapping):
        return True
    if "secretName" in value:
        return "certificatePath" not in value and "keyPath" not in value
    return "certificatePath" in value and "keyPath" in value


def _series_level_has_match(value: Any) -> bool:
    if not isinstance(value, Mapping):
        return True
    return value.get("level", "Series") != "Series" or "match" in value


def _study_goes_with_level(value: Any) -> bool:
    if not isinstance(value, Mapping):
        return True
    return (value.get("level", "Series") == "Study") == ("study" in value)


def _unique_names(value: Any) -> bool:
    if not isinstance(value, list):
        return True
    names = [item["name"] for item in value if isinstance(item, Mapping) and isinstance(item.get("name"), str)]
    return len(names) == len(set(names))


def _no_outer_space(value: Any) -> bool:
    return not isinstance(value, str) or not (value.startswith(" ") or value.endswith(" "))


CEL_TWINS: dict[str, Callable[[Any], bool]] = {
    "self.level != 'Series' || has(self.match)": _series_level_has_match,
    "(self.level == 'Study') == has(self.study)": _study_goes_with_level,
    "self.all(x, self.exists_one(y, y.name == x.name))": _unique_names,
    "isURL(self) && url(self).getScheme() in ['http', 'https'] && url(self).getHostname() != ''": (_is_http_url),
    "[has(self.configMapKeyRef), has(self.secretKeyRef), has(self.path)].filter(x, x).size() == 1": (
        _exactly_one_ca_source
    ),
    "!self.startsWith(' ') && !self.endsWith(' ')": _no_outer_space,
    "has(self.secretName) ? !has(self.certificatePath) && !has(self.keyPath) "
    ": has(self.certificatePath) && has(self.keyPath)": _client_certificate_source,
}


def cel_rules(schema: Mapping[str, Any]) -> Iterator[str]:
    """Every CEL rule text in a schema, depth first."""
    for rule in schema.get("x-kubernetes-validations", ()):
        yield rule["rule"]
    for sub in schema.get("properties", {}).values():
        yield from cel_rules(sub)
    if isinstance(schema.get("items"), Mapping):
        yield from cel_rules(schema["items"])


# --- the validator ----------------------------------------------------------------------------


def _cel_keyword(validator, rules, instance, schema) -> Iterator[ValidationError]:
    for rule in rules:
        if not CEL_TWINS[rule["rule"]](instance):
            yield ValidationError(rule.get("message") or f"fails the rule {rule['rule']}")


_draft4_properties = jsonschema.Draft4Validator.VALIDATORS["properties"]


def _strict_properties(validator, properties, instance, schema) -> Iterator[ValidationError]:
    yield from _draft4_properties(validator, properties, instance, schema)
    if not validator.is_type(instance, "object"):
        return
    if schema.get("x-kubernetes-preserve-unknown-fields") or "additionalProperties" in schema:
        return
    for key in instance:
        if key not in properties:
            known = ", ".join(sorted(properties))
            yield ValidationError(f"unknown field (known fields here: {known})", path=[key])


# OpenAPI v3 schemas (as Kubernetes uses them) are closest to JSON Schema draft 4.
_KubernetesValidator = jsonschema.validators.extend(
    jsonschema.Draft4Validator,
    {"x-kubernetes-validations": _cel_keyword, "properties": _strict_properties},
)


@cache
def _validator() -> Any:
    schema = crd_schema()
    missing = [rule for rule in cel_rules(schema) if rule not in CEL_TWINS]
    if missing:
        raise RuntimeError(f"CEL rules in {crd_path()} without a Python twin in {__name__}: {missing}")
    # The API server keeps every metadata field (labels, annotations, ...) although the schema
    # only lists `name`; do the same instead of calling them unknown.
    schema["properties"]["metadata"]["x-kubernetes-preserve-unknown-fields"] = True
    return _KubernetesValidator(schema)


# --- preparing a manifest like the API server does ---------------------------------------------


def drop_nulls(value: Any) -> Any:
    """A copy without null object fields: the API server prunes them before defaulting, so
    `modality:` with no value means the same as leaving the field out."""
    if isinstance(value, Mapping):
        return {key: drop_nulls(item) for key, item in value.items() if item is not None}
    if isinstance(value, list):
        return [drop_nulls(item) for item in value]
    return value


def apply_defaults(value: Any, schema: Mapping[str, Any] | None = None) -> Any:
    """A copy with the schema's `default`s filled in where a field is missing."""
    if schema is None:
        schema = crd_schema()
    if isinstance(value, Mapping):
        result = dict(value)
        for key, sub in schema.get("properties", {}).items():
            if key not in result and "default" in sub:
                result[key] = copy.deepcopy(sub["default"])
            if key in result:
                result[key] = apply_defaults(result[key], sub)
        return result
    if isinstance(value, list) and isinstance(schema.get("items"), Mapping):
        return [apply_defaults(item, schema["items"]) for item in value]
    return value


def prepare(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """What the API server would store for this manifest (before validation)."""
    return apply_defaults(drop_nulls(plain(manifest)))


def plain(value: Any) -> Any:
    """Plain dicts and lists (kopf hands over Mapping views, jsonschema wants dicts)."""
    if isinstance(value, Mapping):
        return {str(key): plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(item) for item in value]
    return value


# --- messages ---------------------------------------------------------------------------------


def _issues(error: ValidationError) -> Iterator[FieldIssue]:
    path = tuple(error.absolute_path)
    if error.validator == "required":
        for name in error.validator_value:
            if isinstance(error.instance, Mapping) and name not in error.instance:
                yield FieldIssue(path + (name,), "is required but missing")
        return
    if error.validator == "pattern":
        # The bare pattern means little to most readers; the field's description says the rule.
        rule = error.schema.get("description", "").strip().rstrip(".") or f"must match {error.validator_value}"
        yield FieldIssue(path, f"{error.instance!r} is not valid: {rule}")
        return
    if error.validator == "maxLength":
        length = len(error.instance)
        yield FieldIssue(
            path, f"{error.instance!r} is {length} characters long; at most {error.validator_value} are allowed"
        )
        return
    if error.validator in ("minLength", "minItems") and len(error.instance) == 0:
        yield FieldIssue(path, "must not be empty")
        return
    yield FieldIssue(path, error.message)


def validate_manifest(manifest: Mapping[str, Any]) -> list[FieldIssue]:
    """Schema problems of an already prepared manifest (see `prepare`), sorted by field path."""
    issues = [issue for error in _validator().iter_errors(manifest) for issue in _issues(error)]
    # An empty value breaks its pattern too; "must not be empty" says all there is to say.
    empty = {issue.path for issue in issues if issue.message == "must not be empty"}
    issues = [issue for issue in issues if issue.path not in empty or issue.message == "must not be empty"]
    return sorted(issues, key=lambda issue: (format_path(issue.path), issue.message))
