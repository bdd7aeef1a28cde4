"""Plain data for fingerprints: what a series must look like, where it goes, where results go.

These dataclasses are the one in-memory form of a fingerprint, whatever it was read from
(an original relay JSON file, a local `Fingerprint` manifest, or a custom resource).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Protocol = Literal["v1", "v2"]


@dataclass(frozen=True)
class MatchRules:
    """Regular expressions, searched case-insensitively; an empty expression matches anything."""

    modality: str = ""
    sop_class_uid: str = ""
    series_description: str = ""
    study_description: str = ""
    # Searched in all four attributes; a hit in any of them excludes the series.
    exclude: str = ""


@dataclass(frozen=True)
class CABundleRef:
    """A CA bundle kept in a ConfigMap or Secret (custom resources only; the operator resolves it)."""

    kind: Literal["configMap", "secret"]
    name: str
    key: str


@dataclass(frozen=True)
class DestinationTLS:
    """DICOM over TLS (PS3.15 secure transport) to one destination.

    The destination's certificate is verified against `ca_bundle` (a PEM file; None: the
    system's trusted CAs) and must name `server_name` (None: the destination's host). A client
    certificate and key (PEM files) are shown to destinations that require one (mutual TLS).
    On Kubernetes the files come from a ConfigMap or Secret (`ca_bundle_ref`) and a
    kubernetes.io/tls Secret (`client_secret`), mounted into the task's Job, which sets the paths.
    """

    ca_bundle: str | None = None
    ca_bundle_ref: CABundleRef | None = None
    client_certificate: str | None = None
    client_key: str | None = None
    client_secret: str | None = None
    server_name: str | None = None


@dataclass(frozen=True)
class Destination:
    """A DICOM storage SCP that receives the predictions."""

    host: str
    port: int
    ae_title: str
    tls: DestinationTLS | None = None  # None: plain DICOM (TCP)


@dataclass(frozen=True)
class InferenceServerRef:
    """How to reach the model: protocol v1 carries the tasks URL, v2 the server's base URL."""

    url: str
    model: str
    protocol: Protocol = "v2"
    # Path of a PEM bundle to verify TLS against; None means the relay's CERT_FILE.
    ca_bundle: str | None = None
    # On Kubernetes the bundle lives in a ConfigMap or Secret; then ca_bundle is None.
    ca_bundle_ref: CABundleRef | None = None
    poll_interval_seconds: float | None = None  # None: the relay's GET_INTERVAL
    timeout_seconds: float | None = None  # None: the relay's GET_TIMEOUT
    delete_when_done: bool | None = None  # None: ASK_INFERENCE_SERVER_TO_DELETE_TASK


OnTimeout = Literal["run", "fail"]


@dataclass(frozen=True)
class StudySeries:
    """One required series of a study-level fingerprint: its name (the folder it is posted in,
    a DNS-1123 label) and what it must look like."""

    name: str
    match: MatchRules


@dataclass(frozen=True)
class StudyRules:
    """A study-level fingerprint: one task per study, posted once every entry of `series` has a
    complete series of that study, or `timeout_seconds` after the first one was complete (then
    `on_timeout` says: run with what is there, or fail)."""

    series: tuple[StudySeries, ...]
    timeout_seconds: float = 600.0
    on_timeout: OnTimeout = "fail"

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(entry.name for entry in self.series)


@dataclass(frozen=True)
class Fingerprint:
    """One fingerprint: series matching `match` go to `inference_server`, results to `destinations`.

    With `study`, the fingerprint is study-level: `match` filters every series of the study, and
    the series that fill the entries of `study.series` are posted together, in one task."""

    name: str  # unique, a DNS-1123 label (from metadata.name or the seed file's stem)
    match: MatchRules
    inference_server: InferenceServerRef
    destinations: tuple[Destination, ...] = field(default_factory=tuple)
    source: str = ""  # where it was read from, for messages (a file path, or namespace/name)
    study: StudyRules | None = None
    # Which waiting task `isdr run` starts first (higher first). On Kubernetes the Jobs' pods
    # are ordered by the scheduler, through spec.priorityClassName (read by the operator).
    priority: int = 0

    @property
    def level(self) -> str:
        return "Study" if self.study is not None else "Series"


@dataclass(frozen=True)
class SeriesAttributes:
    """The attributes of a series that matching looks at (never patient identifiers)."""

    modality: str = ""
    sop_class_uid: str = ""
    series_description: str = ""
    study_description: str = ""
    # Which study the series belongs to (a UID, not a patient identifier); only study-level
    # fingerprints look at it, to group series. "" when the instances did not say.
    study_uid: str = ""
