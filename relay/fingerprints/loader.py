"""Fingerprint files -> Fingerprints, with every problem located in its file.

A fingerprint folder (FINGERPRINT_DIR) holds:

- `*.json`: the original relay's seed fingerprints (protocol v1; the name is the file's stem,
  made a valid DNS-1123 label);
- `*.yaml` / `*.yml`: `Fingerprint` manifests, as for `kubectl apply`, several per file allowed.

Anything else (`*.example`, a README, editor back-ups, hidden files and folders such as the
`..data` of a mounted ConfigMap) is ignored. A broken file or document is reported with its
file name, line and column and left out; every other fingerprint keeps working.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import yaml

from relay.fingerprints.manifest import (
    FingerprintError,
    dns_label,
    fingerprint_from_manifest,
    fingerprint_from_seed,
    fingerprint_issues,
    manifest_regex_issues,
    seed_path,
    seed_regex_issues,
)
from relay.fingerprints.model import Destination, Fingerprint
from relay.fingerprints.schema import FieldIssue, FieldPath

__all__ = [
    "FingerprintError",
    "LoadProblem",
    "LoadResult",
    "fingerprint_files",
    "fingerprint_from_manifest",
    "load_fingerprint_dir",
    "load_fingerprint_file",
    "load_fingerprint_files",
    "load_manifest_file",
    "load_seed_file",
]

SEED_SUFFIXES = (".json",)
MANIFEST_SUFFIXES = (".yaml", ".yml")
MAX_JSON_COMMENTS = 200  # a file with more "comments" than this is not JSON at all


@dataclass(frozen=True)
class LoadProblem:
    """Something wrong in a fingerprint file. line and column are 1-based; None when unknown."""

    path: str
    line: int | None
    column: int | None
    message: str
    severity: Literal["error", "warning"] = "error"

    def __str__(self) -> str:
        where = self.path
        if self.line is not None:
            where += f":{self.line}"
            if self.column is not None:
                where += f":{self.column}"
        prefix = "warning: " if self.severity == "warning" else ""
        return f"{where}: {prefix}{self.message}"


@dataclass(frozen=True)
class LoadResult:
    fingerprints: tuple[Fingerprint, ...] = ()
    problems: tuple[LoadProblem, ...] = ()

    @property
    def errors(self) -> tuple[LoadProblem, ...]:
        return tuple(p for p in self.problems if p.severity == "error")


@dataclass(frozen=True)
class _Loaded:
    """A fingerprint and where its name is written (for the duplicate-name message)."""

    fingerprint: Fingerprint
    name_line: int | None = None
    name_column: int | None = None


# --- folders and files ------------------------------------------------------------------------


def fingerprint_files(directory: Path) -> list[Path]:
    """The fingerprint files of a folder, sorted by name (the first of two equal names wins)."""
    suffixes = SEED_SUFFIXES + MANIFEST_SUFFIXES
    return sorted(
        entry
        for entry in Path(directory).iterdir()
        if not entry.name.startswith(".") and entry.suffix.lower() in suffixes and entry.is_file()
    )


def load_fingerprint_dir(path: str | Path) -> LoadResult:
    directory = Path(path)
    if not directory.is_dir():
        return LoadResult(problems=(LoadProblem(str(directory), None, None, "is not a folder (FINGERPRINT_DIR)"),))
    try:
        files = fingerprint_files(directory)
    except OSError as error:
        return LoadResult(problems=(LoadProblem(str(directory), None, None, f"cannot be read: {error.strerror}"),))
    return load_fingerprint_files(files)


def load_fingerprint_files(paths: Iterable[str | Path]) -> LoadResult:
    """Fingerprints of several files; a name used a second time is a problem of the second file."""
    fingerprints: list[Fingerprint] = []
    problems: list[LoadProblem] = []
    first_source: dict[str, str] = {}
    for path in paths:
        loaded, file_problems = _load_file(Path(path))
        problems.extend(file_problems)
        for item in loaded:
            fp = item.fingerprint
            if fp.name in first_source:
                problems.append(
                    LoadProblem(
                        str(path),
                        item.name_line,
                        item.name_column,
                        f"the fingerprint name {fp.name!r} is already used by {first_source[fp.name]}; "
                        "names must be unique, so this fingerprint is ignored"
                        + ("" if item.name_line else " (a seed file's name comes from its file name)"),
                    )
                )
                continue
            first_source[fp.name] = fp.source
            fingerprints.append(fp)
    return LoadResult(tuple(fingerprints), tuple(problems))


def load_fingerprint_file(path: str | Path) -> LoadResult:
    return load_fingerprint_files([path])


def load_seed_file(path: str | Path) -> LoadResult:
    """An original relay seed file, whatever its name ends with (for `isdr fingerprint convert`)."""
    loaded, problems = _in_order(*_with_text(Path(path), _load_seed))
    return LoadResult(tuple(item.fingerprint for item in loaded), tuple(problems))


def load_manifest_file(path: str | Path) -> LoadResult:
    loaded, problems = _in_order(*_with_text(Path(path), _load_manifests))
    return LoadResult(tuple(item.fingerprint for item in loaded), tuple(problems))


def _in_order(loaded: list[_Loaded], problems: list[LoadProblem]) -> tuple[list[_Loaded], list[LoadProblem]]:
    """Problems in the order of the file (those without a position first)."""
    return loaded, sorted(problems, key=lambda problem: (problem.line or 0, problem.column or 0))


def _load_file(path: Path) -> tuple[list[_Loaded], list[LoadProblem]]:
    return _in_order(*_load_by_suffix(path))


def _load_by_suffix(path: Path) -> tuple[list[_Loaded], list[LoadProblem]]:
    suffix = path.suffix.lower()
    if suffix in SEED_SUFFIXES:
        return _with_text(path, _load_seed)
    if suffix in MANIFEST_SUFFIXES:
        return _with_text(path, _load_manifests)
    return [], [
        LoadProblem(str(path), None, None, "is not a fingerprint file: expected *.json (seed) or *.yaml / *.yml")
    ]


def _with_text(path: Path, load) -> tuple[list[_Loaded], list[LoadProblem]]:
    try:
        data = path.read_bytes()
    except OSError as error:
        return [], [LoadProblem(str(path), None, None, f"cannot be read: {error.strerror or error}")]
    try:
        text = data.decode("utf-8-sig")  # tolerate the byte-order mark some Windows editors write
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        return [], [LoadProblem(str(path), line, None, "is not UTF-8 text; save it as UTF-8")]
    return load(path, text)


# --- positions --------------------------------------------------------------------------------


def _compose(text: str) -> yaml.Node | None:
    """The YAML node tree of a JSON text, for positions only (JSON is, nearly, YAML).

    Tabs are only whitespace in JSON, but YAML refuses them between tokens; swapping each tab
    for one space keeps every line and column. If YAML still disagrees, positions are left out.
    """
    try:
        return yaml.compose(text.replace("\t", " "), Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return None


def _walk(node: yaml.Node | None, path: FieldPath) -> list[tuple[yaml.Node | None, yaml.Node]]:
    """(key node, value node) for each step of `path` that exists in the tree."""
    steps: list[tuple[yaml.Node | None, yaml.Node]] = []
    for element in path:
        if isinstance(node, yaml.MappingNode) and isinstance(element, str):
            pair = next(((k, v) for k, v in node.value if isinstance(k, yaml.ScalarNode) and k.value == element), None)
            if pair is None:
                break
            steps.append(pair)
            node = pair[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(element, int) and element < len(node.value):
            node = node.value[element]
            steps.append((None, node))
        else:
            break
    return steps


def _position(root: yaml.Node | None, issue: FieldIssue) -> tuple[int | None, int | None]:
    """Where to point for an issue: the value itself, or the key for an unknown field; for a
    missing field, the key of the mapping it is missing from."""
    if root is None:
        return None, None
    steps = _walk(root, issue.path)
    if len(steps) == len(issue.path) and steps:
        key, value = steps[-1]
        # A scalar is shown where it is written; a block (mapping, list) by its key.
        point_at_key = issue.message.startswith("unknown field") or not isinstance(value, yaml.ScalarNode)
        node = key if key is not None and point_at_key else value
    elif steps:
        key, value = steps[-1]
        node = key if key is not None else value
    else:
        node = root
    return node.start_mark.line + 1, node.start_mark.column + 1


def _duplicate_keys(node: yaml.Node, seen: set[int] | None = None) -> Iterator[tuple[str, yaml.Node]]:
    """Keys written twice in one mapping: both JSON and YAML parsers silently keep the last."""
    seen = set() if seen is None else seen
    if id(node) in seen:  # an alias: already visited
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        names: set[str] = set()
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode):
                if key.value in names:
                    yield key.value, key
                names.add(key.value)
            yield from _duplicate_keys(value, seen)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            yield from _duplicate_keys(item, seen)


def _duplicate_problems(path: Path, root: yaml.Node | None) -> list[LoadProblem]:
    if root is None:
        return []
    return [
        LoadProblem(
            str(path),
            key.start_mark.line + 1,
            key.start_mark.column + 1,
            f"the key {name!r} appears twice in the same block; keep only one",
        )
        for name, key in _duplicate_keys(root)
    ]


def _issue_problems(
    path: Path, root: yaml.Node | None, issues: Iterable[FieldIssue], severity: Literal["error", "warning"] = "error"
) -> list[LoadProblem]:
    return [LoadProblem(str(path), *_position(root, issue), str(issue), severity) for issue in issues]


# --- seed files (JSON) ------------------------------------------------------------------------


def _blank(text: str, start: int, end: int) -> str:
    """Replace text[start:end] with spaces, keeping newlines, so positions stay true."""
    return text[:start] + re.sub(r"[^\n]", " ", text[start:end]) + text[end:]


def _comment_end(text: str, start: int) -> int:
    if text.startswith("/*", start):
        end = text.find("*/", start + 2)
        return len(text) if end < 0 else end + 2
    end = text.find("\n", start)
    return len(text) if end < 0 else end


def _json_hint(text: str, error: json.JSONDecodeError) -> str:
    rest = text[error.pos :].lstrip()
    if rest[:1] in ("}", "]") and error.msg.startswith(("Expecting property name", "Expecting value")):
        return f" (JSON allows no comma before '{rest[0]}'; remove the last comma)"
    if rest[:1] == "'":
        return ' (JSON strings need double quotes: "..." )'
    return ""


def parse_seed_json(path: Path, text: str) -> tuple[Any, str, list[LoadProblem]]:
    """(value, text, problems): the parsed JSON (None when it cannot be parsed), the text with
    comments blanked out, and the problems.

    Every `#` (or `//`) comment is reported, not just the first: the original relay's example
    seed file has one on nearly every line. The rest of the file is still parsed and checked,
    so that one run reports everything (the file is rejected all the same)."""
    problems: list[LoadProblem] = []
    for _ in range(MAX_JSON_COMMENTS):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as error:
            if text.startswith(("#", "//", "/*"), error.pos):
                end = _comment_end(text, error.pos)
                comment = " ".join(text[error.pos : end].split())
                problems.append(
                    LoadProblem(
                        str(path), error.lineno, error.colno, f"JSON does not allow comments ({comment!r}); remove it"
                    )
                )
                text = _blank(text, error.pos, end)
                continue
            message = f"invalid JSON: {error.msg}{_json_hint(text, error)}"
            problems.append(LoadProblem(str(path), error.lineno, error.colno, message))
            return None, text, problems
        return value, text, problems
    return None, text, problems


def _load_seed(path: Path, text: str) -> tuple[list[_Loaded], list[LoadProblem]]:
    seed, text, problems = parse_seed_json(path, text)
    if seed is None:
        return [], problems
    root = _compose(text)
    problems += _duplicate_problems(path, root)
    try:
        fp, warnings = fingerprint_from_seed(seed, dns_label(path.stem), str(path))
    except FingerprintError as error:
        return [], problems + _issue_problems(path, root, error.issues + tuple(seed_regex_issues(seed)))
    problems += _issue_problems(path, root, warnings, "warning")
    invalid = [FieldIssue(seed_path(issue.path), issue.message) for issue in fingerprint_issues(fp)]
    problems += _issue_problems(path, root, invalid)
    if any(p.severity == "error" for p in problems):
        return [], problems
    return [_Loaded(fp)], problems


# --- manifest files (YAML) --------------------------------------------------------------------


def _documents(path: Path, text: str) -> Iterator[tuple[yaml.Node, Any] | LoadProblem]:
    """Each document's node tree and value; a syntax error ends the file (YAML cannot resume)."""
    loader = yaml.SafeLoader(text)
    try:
        while loader.check_node():
            node = loader.get_node()
            yield node, loader.construct_document(node)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        detail = " ".join(filter(None, [error.context, error.problem]))
        line, column = (mark.line + 1, mark.column + 1) if mark else (None, None)
        yield LoadProblem(str(path), line, column, f"invalid YAML: {detail}")
    except yaml.YAMLError as error:
        yield LoadProblem(str(path), None, None, f"invalid YAML: {error}")
    finally:
        loader.dispose()


def _local_file(folder: Path, path: str, where: FieldPath, what: str) -> tuple[str, list[FieldIssue]]:
    """A file named in a manifest: relative to the manifest's folder, and it must exist."""
    resolved = (folder / path).resolve()
    if not resolved.is_file():
        return path, [FieldIssue(where, f"the {what} file {str(resolved)!r} does not exist")]
    return str(resolved), []


def _kubernetes_only(where: FieldPath, what: str, instead: str) -> FieldIssue:
    return FieldIssue(where, f"{what} only works on Kubernetes; outside a cluster give {instead}")


def _local_server(fp: Fingerprint, folder: Path) -> tuple[Fingerprint, list[FieldIssue]]:
    server = fp.inference_server
    where: FieldPath = ("spec", "inferenceServer", "caBundle")
    if server.ca_bundle_ref is not None:
        kind = server.ca_bundle_ref.kind
        return fp, [_kubernetes_only(where, f"a {kind} reference", "the PEM file as caBundle.path")]
    if server.ca_bundle is None:
        return fp, []
    bundle, issues = _local_file(folder, server.ca_bundle, where + ("path",), "CA bundle")
    return replace(fp, inference_server=replace(server, ca_bundle=bundle)), issues


def _local_destination(destination: Destination, index: int, folder: Path) -> tuple[Destination, list[FieldIssue]]:
    tls = destination.tls
    if tls is None:
        return destination, []
    where: FieldPath = ("spec", "destinations", index, "tls")
    issues: list[FieldIssue] = []
    if tls.ca_bundle_ref is not None:
        issues.append(_kubernetes_only(where + ("caBundle",), f"a {tls.ca_bundle_ref.kind} reference",
                                       "the PEM file as caBundle.path"))
    if tls.client_secret is not None:
        issues.append(_kubernetes_only(where + ("clientCertificate", "secretName"), "a Secret",
                                       "clientCertificate.certificatePath and keyPath"))
    files = {}
    for attribute, path, what in (("ca_bundle", ("caBundle", "path"), "CA bundle"),
                                  ("client_certificate", ("clientCertificate", "certificatePath"), "certificate"),
                                  ("client_key", ("clientCertificate", "keyPath"), "private key")):
        value = getattr(tls, attribute)
        if value is not None:
            files[attribute], found = _local_file(folder, value, where + path, what)
            issues += found
    return replace(destination, tls=replace(tls, **files)), issues


def _local_issues(fp: Fingerprint, folder: Path) -> tuple[Fingerprint, list[FieldIssue]]:
    """What only works on Kubernetes, and files that are not there (for `isdr run`); file paths
    are made absolute (relative ones are relative to the manifest)."""
    fp, issues = _local_server(fp, folder)
    destinations = []
    for index, destination in enumerate(fp.destinations):
        destination, found = _local_destination(destination, index, folder)
        destinations.append(destination)
        issues += found
    return replace(fp, destinations=tuple(destinations)), issues


def _load_manifests(path: Path, text: str) -> tuple[list[_Loaded], list[LoadProblem]]:
    loaded: list[_Loaded] = []
    problems: list[LoadProblem] = []
    for document in _documents(path, text):
        if isinstance(document, LoadProblem):
            problems.append(document)
            continue
        root, value = document
        if value is None:  # an empty document, e.g. after a final `---`
            continue
        doc_problems = _duplicate_problems(path, root)
        try:
            fp = fingerprint_from_manifest(value, str(path))
        except FingerprintError as error:
            problems += doc_problems + _issue_problems(path, root, error.issues + tuple(manifest_regex_issues(value)))
            continue
        fp, issues = _local_issues(fp, path.parent)
        doc_problems += _issue_problems(path, root, issues + fingerprint_issues(fp))
        problems += doc_problems
        if not doc_problems:
            line, column = _position(root, FieldIssue(("metadata", "name"), ""))
            loaded.append(_Loaded(fp, line, column))
    return loaded, problems
