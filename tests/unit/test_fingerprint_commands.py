"""`isdr fingerprint convert` and `isdr fingerprint check`, through a local argparse parser."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from relay.fingerprints.commands import add_parser
from relay.fingerprints.loader import load_fingerprint_file, load_seed_file
from relay.fingerprints.manifest import fingerprint_from_manifest

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples" / "fingerprints"
EXAMPLE_SEED = EXAMPLES / "cns_t1_oars.json"


def isdr(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="isdr")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def seed(**changes) -> dict:
    value = json.loads(EXAMPLE_SEED.read_text())
    value.update(changes)
    return value


def write_seed(folder: Path, name: str, value: dict | str) -> Path:
    path = folder / name
    path.write_text(value if isinstance(value, str) else json.dumps(value, indent=2), encoding="utf-8")
    return path


# --- convert ----------------------------------------------------------------------------------


def test_convert_prints_a_valid_v1_manifest(capsys):
    assert isdr("fingerprint", "convert", str(EXAMPLE_SEED)) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert out.startswith(f"# Converted from {EXAMPLE_SEED} by `isdr fingerprint convert`.\n")
    doc = yaml.safe_load(out)
    assert doc == {
        "apiVersion": "isdr.io/v1alpha1",
        "kind": "Fingerprint",
        "metadata": {"name": "cns-t1-oars"},
        "spec": {
            "match": {
                "modality": "^MR$",
                "sopClassUID": "",
                "seriesDescription": "t1",
                "studyDescription": "",
                "exclude": "a^",
            },
            "inferenceServer": {
                "url": "https://inference.example.org/api/tasks/",
                "protocol": "v1",
                "model": "cns_t1_oars",
            },
            "destinations": [{"host": "127.0.0.1", "port": 11111, "aeTitle": "DICOM_ENDPOINT"}],
        },
    }


@pytest.mark.parametrize(
    "rules",
    [
        {},
        {"series_description_regex": r"^t1\s+(ax|sag)\b.*\+c$", "sop_class_uid_regex": r"^1\.2\.840\.10008\."},
        {"modality_regex": "CT|MR", "exclude_regex": "# not a comment"},
        {"study_description_regex": "key: value", "series_description_regex": "'quoted' \"double\""},
        {"series_description_regex": "  leading and trailing  ", "study_description_regex": "æøå hjerne"},
        {"exclude_regex": "yes", "modality_regex": "null", "study_description_regex": "0123"},
        {"series_description_regex": "&anchor *alias !tag %directive @at `tick` [x] {y}"},
    ],
)
def test_convert_round_trip(tmp_path, capsys, rules):
    source = write_seed(tmp_path, "Brain T1.json", seed(**rules))
    assert isdr("fingerprint", "convert", str(source)) == 0
    manifest_path = tmp_path / "converted.yaml"
    manifest_path.write_text(capsys.readouterr().out, encoding="utf-8")

    (from_seed,) = load_seed_file(source).fingerprints
    result = load_fingerprint_file(manifest_path)
    assert result.problems == ()
    (from_manifest,) = result.fingerprints
    assert from_manifest.name == "brain-t1"
    assert replace(from_manifest, source="") == replace(from_seed, source="")


def test_convert_with_name(capsys):
    assert isdr("fingerprint", "convert", str(EXAMPLE_SEED), "--name", "brain-oars") == 0
    doc = yaml.safe_load(capsys.readouterr().out)
    assert doc["metadata"]["name"] == "brain-oars"
    assert fingerprint_from_manifest(doc, "stdin").name == "brain-oars"


@pytest.mark.parametrize("name", ["Brain", "brain_oars", "-x", "x" * 64, ""])
def test_convert_refuses_an_invalid_name(capsys, name):
    assert isdr("fingerprint", "convert", str(EXAMPLE_SEED), f"--name={name}") == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert "is not a valid name" in err


def test_convert_broken_file_reports_positions_on_stderr(tmp_path, capsys):
    source = write_seed(tmp_path, "ct.json", '{\n  "modality_regex": "", # Matches everything\n}\n')
    assert isdr("fingerprint", "convert", str(source)) == 2
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert f"{source}:2:25: JSON does not allow comments ('# Matches everything'); remove it" in lines
    assert all(line.startswith(f"{source}:") for line in lines)


def test_convert_missing_file(tmp_path, capsys):
    assert isdr("fingerprint", "convert", str(tmp_path / "nope.json")) == 2
    assert "cannot be read" in capsys.readouterr().err


def test_convert_warnings_go_to_stderr_and_conversion_goes_on(tmp_path, capsys):
    source = write_seed(tmp_path, "x.json", seed(note="legacy"))
    assert isdr("fingerprint", "convert", str(source)) == 0
    out, err = capsys.readouterr()
    assert "warning: note: is not a seed fingerprint field; it is ignored" in err
    assert "note" not in yaml.safe_load(out)["spec"]


# --- check ------------------------------------------------------------------------------------


def test_check_examples(capsys):
    assert isdr("fingerprint", "check", str(EXAMPLES)) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        f"ok   cns-t1-oars     ({EXAMPLES / 'cns_t1_oars.json'})",
        f"ok   ct-thorax-oars  ({EXAMPLES / 'ct-thorax-oars.yaml'})",
        f"ok   prostate-mr     ({EXAMPLES / 'prostate-mr.yaml'})",
        "3 fingerprint(s) ok, 0 problem(s)",
    ]


def test_check_folder_with_a_broken_file(tmp_path, capsys):
    write_seed(tmp_path, "good.json", seed())
    broken = write_seed(tmp_path, "broken.json", seed(exclude_regex="(a"))
    assert isdr("fingerprint", "check", str(tmp_path)) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"ok   good  ({tmp_path / 'good.json'})"
    assert lines[1].startswith(f"{broken}:6:20: exclude_regex: '(a' is not a valid regular expression")
    assert lines[-1] == "1 fingerprint(s) ok, 1 problem(s)"


def test_check_reports_an_expression_that_needs_backtracking_where_it_is_written(tmp_path, capsys):
    write_seed(tmp_path, "good.json", seed(series_description_regex="(a+)+$"))  # fine in linear time
    backref = write_seed(tmp_path, "backref.json", seed(series_description_regex=r"(t1)\s+\1"))
    lookahead = tmp_path / "lookahead.yaml"
    text = (EXAMPLES / "ct-thorax-oars.yaml").read_text()
    assert 'modality: "^CT$"' in text
    lookahead.write_text(text.replace('modality: "^CT$"', "modality: 'CT(?!X)'").replace("ct-thorax", "other"))

    assert isdr("fingerprint", "check", str(tmp_path)) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"ok   good  ({tmp_path / 'good.json'})"
    assert lines[1] == (
        f"{backref}:3:31: series_description_regex: '(t1)\\\\s+\\\\1' cannot be evaluated in linear time: "
        "backreferences are not supported at position 7 (fingerprint expressions use RE2, an engine that "
        "never backtracks)")
    assert lines[2].startswith(
        f"{lookahead}:9:15: spec.match.modality: 'CT(?!X)' cannot be evaluated in linear time: lookahead")
    assert lines[-1] == "1 fingerprint(s) ok, 2 problem(s)"


def test_check_files_and_folders_together_finds_duplicate_names(tmp_path, capsys):
    folder = tmp_path / "fingerprints"
    folder.mkdir()
    write_seed(folder, "cns_t1_oars.json", seed())
    assert isdr("fingerprint", "check", str(EXAMPLES / "cns_t1_oars.json"), str(folder)) == 1
    out = capsys.readouterr().out
    assert "the fingerprint name 'cns-t1-oars' is already used by" in out


def test_check_warnings_only_exit_zero(tmp_path, capsys):
    write_seed(tmp_path, "x.json", seed(note="legacy"))
    assert isdr("fingerprint", "check", str(tmp_path)) == 0
    out = capsys.readouterr().out
    assert "warning: note: is not a seed fingerprint field" in out
    assert out.splitlines()[-1] == "1 fingerprint(s) ok, 0 problem(s), 1 warning(s)"


def test_check_empty_folder_and_missing_path(tmp_path, capsys):
    assert isdr("fingerprint", "check", str(tmp_path), str(tmp_path / "missing")) == 1
    out = capsys.readouterr().out.splitlines()
    assert out == [
        f"{tmp_path}: holds no fingerprint files (*.json, *.yaml, *.yml)",
        f"{tmp_path / 'missing'}: does not exist",
        "0 fingerprint(s) ok, 2 problem(s)",
    ]


# --- the command line itself ------------------------------------------------------------------


@pytest.mark.parametrize("command", ["convert", "check"])
def test_help_has_examples(capsys, command):
    with pytest.raises(SystemExit) as exited:
        isdr("fingerprint", command, "--help")
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out
    assert f"isdr fingerprint {command} " in out


def test_fingerprint_needs_a_sub_command(capsys):
    with pytest.raises(SystemExit) as exited:
        isdr("fingerprint")
    assert exited.value.code == 2
