"""`isdr fingerprint test FILE|DIR`: which fingerprints a DICOM file or series would go to, and
why the others would not, without sending anything anywhere.

Files are read the way the receiver reads what it stores (relay.dicom.identity) and grouped into
series like the relay groups them (Series Instance UID and SOP class); the fingerprints come from
a folder (FINGERPRINT_DIR, as `isdr run` reads it) or from the cluster (the Fingerprints the
operator matches against: only Ready ones are used). Matching is relay.fingerprints.matching's,
the reasons are its `explain_match`. What is printed are the four attributes matching reads and
UIDs: nothing that identifies a patient.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from relay.fingerprints.matching import MatchExplanation, explain_match
from relay.fingerprints.model import Fingerprint, SeriesAttributes
from relay.uids import SeriesKey

EXIT_ALL_MATCH, EXIT_SOME_UNMATCHED, EXIT_UNUSABLE = 0, 1, 2
MAX_FILES = 100_000  # a folder is walked for at most this many files


@dataclass(frozen=True)
class Candidate:
    """A fingerprint to test, and why it would not be used at all (None: it would)."""

    fingerprint: Fingerprint
    unusable: str | None = None


@dataclass
class SeriesFound:
    key: SeriesKey
    attributes: SeriesAttributes
    files: int = 0


def _files(paths: list[Path]) -> Iterator[Path]:
    count = 0
    for path in paths:
        walked = [path] if path.is_file() else (
            Path(folder) / name for folder, _dirs, names in os.walk(path) for name in sorted(names))
        for file in walked:
            count += 1
            if count > MAX_FILES:
                raise ValueError(f"more than {MAX_FILES} files: name a series' folder")
            yield file


def read_series(paths: list[Path]) -> tuple[list[SeriesFound], list[str]]:
    """The series the files hold, and a line for each file that is not a DICOM file."""
    from relay.dicom.identity import identify_part10_stream

    found: dict[SeriesKey, SeriesFound] = {}
    skipped = []
    for file in _files(paths):
        try:
            with file.open("rb") as handle:  # read in chunks: a multi-gigabyte file costs no memory
                identity = identify_part10_stream(handle)
        except Exception as exc:  # anything unreadable is skipped, and said
            skipped.append(f"{file}: not a DICOM file the relay would store ({type(exc).__name__}: {exc})"[:300])
            continue
        series = found.setdefault(identity.series, SeriesFound(identity.series, identity.attributes))
        series.files += 1
    return list(found.values()), skipped


def folder_candidates(folder: Path) -> tuple[list[Candidate], list[str]]:
    from relay.fingerprints.loader import load_fingerprint_dir

    result = load_fingerprint_dir(folder)
    return [Candidate(fp) for fp in result.fingerprints], [str(problem) for problem in result.problems]


def cluster_candidates(namespace: str | None, kubeconfig: str | None) -> tuple[list[Candidate], list[str], str]:
    """The namespace's Fingerprints; one the operator has not found Ready is shown, never matched."""
    from relay.fingerprints.manifest import FingerprintError, fingerprint_from_manifest
    from relay.kube.api import KubeApi
    from relay.kube.client import connect
    from relay.kube.resources import fingerprint_readiness

    connection = connect(namespace, kubeconfig=kubeconfig)
    try:
        bodies = KubeApi(connection.api_client, connection.namespace).list_fingerprints()
    finally:
        connection.close()
    candidates, problems = [], []
    for body in sorted(bodies, key=lambda b: b["metadata"]["name"]):
        name = body["metadata"]["name"]
        try:
            fp = fingerprint_from_manifest(body, source=f"{connection.namespace}/{name}")
        except FingerprintError as exc:
            problems.append(f"{connection.namespace}/{name}: {exc}")
            continue
        ready, message = fingerprint_readiness(body)
        unusable = None if ready else (f"not Ready: {message}" if ready is False else "not looked at by the operator yet")
        candidates.append(Candidate(fp, unusable))
    return candidates, problems, connection.namespace


def report(series: SeriesFound, candidates: list[Candidate]) -> tuple[list[str], bool]:
    """The lines printed for one series, and whether any fingerprint would take it."""
    a = series.attributes
    lines = [f"series {series.key.series_uid} ({series.files} file(s), SOP class {series.key.sop_class_uid})",
             f"  modality {a.modality!r}, series description {a.series_description!r}, "
             f"study description {a.study_description!r}"]
    matched = False
    width = max((len(c.fingerprint.name) for c in candidates), default=0)
    for candidate in sorted(candidates, key=lambda c: c.fingerprint.name):
        explanation: MatchExplanation = explain_match(candidate.fingerprint, a)
        name = candidate.fingerprint.name.ljust(width)
        if explanation.matches and candidate.unusable is None:
            matched = True
            server = candidate.fingerprint.inference_server
            lines.append(f"  match     {name}  -> model {server.model} ({server.protocol})")
            continue
        reasons = explanation.reasons() if not explanation.matches else [f"would match, but is {candidate.unusable}"]
        if candidate.unusable and not explanation.matches:
            reasons.append(f"and is {candidate.unusable}")
        lines.append(f"  no match  {name}  {reasons[0]}")
        lines.extend(f"            {' ' * width}  {reason}" for reason in reasons[1:])
    if not candidates:
        lines.append("  no fingerprints to test")
    return lines, matched


def run(args) -> int:
    if args.cluster:
        from relay.kube.api import ApiError
        from relay.kube.client import KubeConfigError

        try:
            candidates, problems, where = cluster_candidates(args.namespace, args.kubeconfig)
        except (ApiError, KubeConfigError) as exc:
            print(f"isdr fingerprint test: cannot list the cluster's Fingerprints: {exc}", file=sys.stderr)
            return EXIT_UNUSABLE
        source = f"Fingerprints in namespace {where}"
    else:
        folder = args.fingerprints or _fingerprint_dir()
        if folder is None:
            return EXIT_UNUSABLE
        if not folder.is_dir():
            print(f"isdr fingerprint test: fingerprint folder {folder} does not exist", file=sys.stderr)
            return EXIT_UNUSABLE
        candidates, problems = folder_candidates(folder)
        source = f"fingerprints in {folder}"
    for problem in problems:
        print(f"warning: {problem} (left out)", file=sys.stderr)
    missing = [str(path) for path in args.paths if not path.exists()]
    if missing:
        print(f"isdr fingerprint test: no such file or folder: {', '.join(missing)}", file=sys.stderr)
        return EXIT_UNUSABLE
    try:
        found, skipped = read_series(list(args.paths))
    except ValueError as exc:
        print(f"isdr fingerprint test: {exc}", file=sys.stderr)
        return EXIT_UNUSABLE
    for line in skipped:
        print(f"skipped {line}", file=sys.stderr)
    if not found:
        print("isdr fingerprint test: no DICOM file found", file=sys.stderr)
        return EXIT_UNUSABLE
    print(f"testing {len(found)} series against {len(candidates)} {source}")
    unmatched = 0
    for series in sorted(found, key=lambda s: s.key):
        lines, matched = report(series, candidates)
        unmatched += not matched
        print("\n".join(lines))
    return EXIT_SOME_UNMATCHED if unmatched else EXIT_ALL_MATCH


def _fingerprint_dir() -> Path | None:
    from relay.config import ConfigError, load_settings

    try:
        return load_settings().fingerprint_dir
    except ConfigError as exc:
        print(f"isdr fingerprint test: {exc}", file=sys.stderr)
        return None
