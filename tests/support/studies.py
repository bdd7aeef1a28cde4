"""Study-level fingerprints and the series of one study, for the end-to-end tests of both modes."""

from __future__ import annotations

from isdr_devtools.synthetic import write_ct_series
from tests.support.fingerprints import manifest


def prostate_manifest(url, pacs, protocol="v2", timeout=60, on_timeout="fail", study_description=""):
    """A study-level Fingerprint needing a T2 and an ADC series of one MR study (model `toy`)."""
    fingerprint = manifest("prostate", url, "toy", pacs, protocol=protocol, modality="^MR$")
    fingerprint["spec"]["level"] = "Study"
    fingerprint["spec"]["match"]["studyDescription"] = study_description
    fingerprint["spec"]["study"] = {
        "series": [{"name": "t2", "match": {"seriesDescription": "t2"}},
                   {"name": "adc", "match": {"seriesDescription": "adc"}}],
        "timeoutSeconds": timeout,
        "onTimeout": on_timeout,
    }
    return fingerprint


def mr_series(folder, description, study_uid, count, **attributes):
    """`count` small MR images of one series of study `study_uid`, described as `description`."""
    return write_ct_series(folder, count=count, rows=32, cols=32, modality="MR", series_description=description,
                           study_uid=study_uid, file_prefix=description, **attributes)
