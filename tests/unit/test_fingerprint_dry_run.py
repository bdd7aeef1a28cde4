"""`isdr fingerprint test`: which fingerprints a series would go to, and why not, as data first
(relay.fingerprints.matching.explain_match) and then as the command prints it."""

from __future__ import annotations

import os
import subprocess
import sys

import yaml

from isdr_devtools.synthetic import write_ct_series
from relay.fingerprints.matching import Mismatch, explain_match, fingerprint_matches
from relay.fingerprints.model import Fingerprint, InferenceServerRef, MatchRules, SeriesAttributes

CT = SeriesAttributes(modality="CT", sop_class_uid="1.2.840.10008.5.1.4.1.1.2", series_description="Thorax LOCALIZER",
                      study_description="Chest")


def fp(name="f", **match):
    return Fingerprint(name=name, match=MatchRules(**match), inference_server=InferenceServerRef(url="http://is",
                                                                                               model="m"))


def test_a_match_has_no_reasons_against_it():
    explanation = explain_match(fp(modality="^CT$", series_description="thorax"), CT)
    assert explanation.matches and explanation.reasons() == []


def test_every_failed_rule_is_a_reason_with_its_expression_and_the_value_it_was_searched_in():
    explanation = explain_match(fp(modality="^MR$", study_description="brain", exclude="localizer"), CT)

    assert not explanation.matches
    assert explanation.mismatches == (
        Mismatch("modality", "^MR$", "modality", "CT"),
        Mismatch("study_description", "brain", "study_description", "Chest"),
        Mismatch("exclude", "localizer", "series_description", "Thorax LOCALIZER"),
    )
    assert explanation.reasons()[2] == "exclude 'localizer' is found in series description 'Thorax LOCALIZER'"


def test_an_expression_that_cannot_be_evaluated_is_the_reason_and_never_matches():
    explanation = explain_match(fp(modality="(?=CT)"), CT)

    assert not explanation.matches and "lookahead" in explanation.reasons()[0]


def test_the_explanation_agrees_with_matching_on_every_rule():
    for match in ({}, {"modality": "ct"}, {"modality": "mr"}, {"exclude": "loc"}, {"exclude": "xyz"},
                  {"sop_class_uid": r"\.2$"}, {"series_description": "(a+)+$"}):
        assert explain_match(fp(**match), CT).matches == fingerprint_matches(fp(**match), CT), match


def manifest(name, modality):
    return {"apiVersion": "isdr.io/v1alpha1", "kind": "Fingerprint", "metadata": {"name": name},
            "spec": {"match": {"modality": modality}, "inferenceServer": {"url": "http://is:8000", "model": "m"},
                     "destinations": [{"host": "pacs", "port": 104, "aeTitle": "PACS"}]}}


def isdr(*args, env=None):
    return subprocess.run([sys.executable, "-m", "relay.cli", *args], capture_output=True, text=True, timeout=60,
                          env=env)


def test_the_command_names_the_matching_fingerprint_and_why_the_others_do_not(tmp_path):
    folder = tmp_path / "fingerprints"
    folder.mkdir()
    for name, modality in (("ct-any", "^CT$"), ("mr-only", "^MR$")):
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(manifest(name, modality)))
    series = write_ct_series(tmp_path / "ct", count=2, rows=16, cols=16)
    (tmp_path / "ct" / "notes.txt").write_text("not DICOM")

    result = isdr("fingerprint", "test", str(tmp_path / "ct"), "--fingerprints", str(folder))

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"testing 1 series against 2 fingerprints in {folder}"
    assert "(2 file(s)" in lines[1]
    assert lines[3].split()[:2] == ["match", "ct-any"]
    assert lines[4].split(maxsplit=2) == ["no", "match", "mr-only  modality '^MR$' is not found in 'CT'"]
    assert "notes.txt: not a DICOM file" in result.stderr
    assert "SYNTH" not in result.stdout  # the synthetic patient's ID and name are never printed
    assert len(series) == 2


def test_a_series_no_fingerprint_takes_exits_1_and_the_default_folder_is_fingerprint_dir(tmp_path):
    folder = tmp_path / "fingerprints"
    folder.mkdir()
    (folder / "mr.yaml").write_text(yaml.safe_dump(manifest("mr-only", "^MR$")))
    write_ct_series(tmp_path / "ct", count=1, rows=16, cols=16)

    result = isdr("fingerprint", "test", str(tmp_path / "ct"), env={**os.environ, "FINGERPRINT_DIR": str(folder)})

    assert result.returncode == 1 and "no match  mr-only" in result.stdout
