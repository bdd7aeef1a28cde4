"""Fingerprints: which series go to which model, and where the predictions go.

- model:    the plain dataclasses (Fingerprint, MatchRules, ...)
- matching: does a series match? (pure functions, the original relay's semantics)
- schema:   the CRD's openAPIV3Schema applied to manifests (crds/fingerprint.yaml is the source)
- manifest: manifest dict <-> Fingerprint; original seed JSON -> manifest
- loader:   FINGERPRINT_DIR files -> Fingerprints, with located problems
- commands: `isdr fingerprint convert|check`
"""

from relay.fingerprints.loader import (
    LoadProblem,
    LoadResult,
    load_fingerprint_dir,
    load_fingerprint_file,
    load_fingerprint_files,
)
from relay.fingerprints.manifest import (
    FingerprintError,
    fingerprint_from_manifest,
    fingerprint_to_manifest,
    validate_fingerprint,
)
from relay.fingerprints.matching import fingerprint_matches, matching_fingerprints
from relay.fingerprints.model import (
    CABundleRef,
    Destination,
    DestinationTLS,
    Fingerprint,
    InferenceServerRef,
    MatchRules,
    SeriesAttributes,
)

__all__ = [
    "CABundleRef",
    "Destination",
    "DestinationTLS",
    "Fingerprint",
    "FingerprintError",
    "InferenceServerRef",
    "LoadProblem",
    "LoadResult",
    "MatchRules",
    "SeriesAttributes",
    "fingerprint_from_manifest",
    "fingerprint_matches",
    "fingerprint_to_manifest",
    "load_fingerprint_dir",
    "load_fingerprint_file",
    "load_fingerprint_files",
    "matching_fingerprints",
    "validate_fingerprint",
]
