"""Study-level fingerprints in manifests: the schema (the CRD's, with its CEL rules' twins), the
model they become, and what `isdr fingerprint check` says about them."""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import pytest
import yaml

from relay.fingerprints.commands import add_parser
from relay.fingerprints.manifest import FingerprintError, fingerprint_from_manifest, fingerprint_to_manifest
from relay.fingerprints.model import MatchRules, StudySeries

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "fingerprints" / "prostate-mr.yaml"


def example() -> dict:
    return yaml.safe_load(EXAMPLE.read_text())


def problems(manifest) -> list[str]:
    with pytest.raises(FingerprintError) as caught:
        fingerprint_from_manifest(manifest, "test")
    return [str(issue) for issue in caught.value.issues]


def test_the_prostate_example_is_a_study_level_fingerprint_with_three_named_series():
    fp = fingerprint_from_manifest(example(), "example")
    assert fp.level == "Study"
    assert fp.study.names == ("t2", "adc", "dwi")
    assert fp.study.series[1] == StudySeries("adc", MatchRules(series_description="adc"))
    assert (fp.study.timeout_seconds, fp.study.on_timeout) == (600, "fail")
    assert fp.match.study_description == "prostat"


def test_a_study_level_fingerprint_survives_the_round_trip_through_a_manifest():
    fp = fingerprint_from_manifest(example(), "example")
    assert fingerprint_from_manifest(fingerprint_to_manifest(fp), "example") == fp


def test_timeout_and_on_timeout_have_defaults_and_spec_match_is_optional():
    manifest = example()
    del manifest["spec"]["match"], manifest["spec"]["study"]["timeoutSeconds"], manifest["spec"]["study"]["onTimeout"]
    fp = fingerprint_from_manifest(manifest, "test")
    assert (fp.study.timeout_seconds, fp.study.on_timeout) == (600, "fail")
    assert fp.match == MatchRules()


def test_a_fingerprint_without_study_is_series_level_as_before():
    manifest = example()
    del manifest["spec"]["study"], manifest["spec"]["level"]
    fp = fingerprint_from_manifest(manifest, "test")
    assert fp.level == "Series" and fp.study is None
    assert "level" not in fingerprint_to_manifest(fp)["spec"]


def test_entry_names_must_be_unique():
    manifest = example()
    manifest["spec"]["study"]["series"][2]["name"] = "t2"
    assert problems(manifest) == ["spec.study.series: the names of spec.study.series must be unique"]


def test_a_study_needs_at_least_one_series():
    manifest = example()
    manifest["spec"]["study"]["series"] = []
    assert problems(manifest) == ["spec.study.series: must not be empty"]


@pytest.mark.parametrize("change", ["drop level", "drop study"])
def test_level_study_and_spec_study_go_together(change):
    manifest = example()
    del manifest["spec"]["level" if change == "drop level" else "study"]
    assert problems(manifest) == [
        "spec: spec.study and `level: Study` go together (a study-level fingerprint needs both)"]


def test_entry_names_are_folder_names_and_on_timeout_is_run_or_fail():
    manifest = example()
    manifest["spec"]["study"]["series"][0]["name"] = "../T2"
    manifest["spec"]["study"]["onTimeout"] = "wait"
    found = problems(manifest)
    assert found[0].startswith("spec.study.onTimeout: 'wait' is not one of ['run', 'fail']")
    assert found[1].startswith("spec.study.series[0].name: '../T2' is not valid: The entry's name")


def test_an_unknown_field_in_an_entry_is_an_error():
    manifest = example()
    manifest["spec"]["study"]["series"][0]["match"]["seriesDescripton"] = "t2"
    assert problems(manifest)[0].startswith("spec.study.series[0].match.seriesDescripton: unknown field")


def isdr(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="isdr")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_check_reports_a_broken_expression_of_an_entry_where_it_is_written(tmp_path, capsys):
    text = EXAMPLE.read_text()
    assert 'seriesDescription: "adc"' in text
    broken = tmp_path / "prostate.yaml"
    broken.write_text(text.replace('seriesDescription: "adc"', 'seriesDescription: "(adc"'))

    assert isdr("fingerprint", "check", str(broken)) == 1

    line = capsys.readouterr().out.splitlines()[0]
    assert line.startswith(f"{broken}:23:30: spec.study.series[1].match.seriesDescription: '(adc' is not a valid "
                           "regular expression")


def test_check_reports_duplicate_entry_names(tmp_path, capsys):
    manifest = copy.deepcopy(example())
    manifest["spec"]["study"]["series"][1]["name"] = "t2"
    path = tmp_path / "prostate.yaml"
    path.write_text(yaml.safe_dump(manifest, sort_keys=False))
    assert isdr("fingerprint", "check", str(path)) == 1
    assert "the names of spec.study.series must be unique" in capsys.readouterr().out
