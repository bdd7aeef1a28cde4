"""Loading fingerprints from files: both formats, the CRD schema, and problems with positions."""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path
from types import MappingProxyType

import pytest
import yaml

from relay.fingerprints import schema
from relay.fingerprints.loader import (
    LoadProblem,
    fingerprint_files,
    load_fingerprint_dir,
    load_fingerprint_file,
    load_fingerprint_files,
)
from relay.fingerprints.manifest import (
    FingerprintError,
    dns_label,
    fingerprint_from_manifest,
    fingerprint_to_manifest,
    is_dns_label,
    validate_fingerprint,
)
from relay.fingerprints.model import CABundleRef, Destination, Fingerprint, InferenceServerRef, MatchRules

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples" / "fingerprints"

# The original relay's example seed file, as it was shipped: with `#` comments.
ORIGINAL_EXAMPLE = """\
{
  "modality_regex": "", # Matches everything
  "series_description_regex": "", # Matches everything
  "study_description_regex": "", # Matches everything
  "sop_class_uid_regex": "", # Matches everything
  "exclude_regex": "a^", # Matches nothing
  "inference_server_url": "https://omen.onerm.dk/api/tasks/",
  "model_human_readable_id": "cns_t1_oars",
  "scus":[
    {
      "scu_ip": "127.0.0.1",
      "scu_port":  "11111",
      "scu_ae_title": "DICOM_ENDPOINT_AE"}
  ]
}
"""


def seed(**changes) -> dict:
    value = {
        "modality_regex": "",
        "series_description_regex": "",
        "study_description_regex": "",
        "sop_class_uid_regex": "",
        "exclude_regex": "a^",
        "inference_server_url": "https://omen.onerm.dk/api/tasks/",
        "model_human_readable_id": "cns_t1_oars",
        "scus": [{"scu_ip": "127.0.0.1", "scu_port": "11111", "scu_ae_title": "DICOM_ENDPOINT"}],
    }
    value.update(changes)
    return {key: item for key, item in value.items() if item is not DELETE}


DELETE = object()


def manifest(name: str = "ct-head", **spec_changes) -> dict:
    spec = {
        "match": {"modality": "^CT$", "seriesDescription": "head"},
        "inferenceServer": {"url": "https://inference.example.org", "model": "ct_head"},
        "destinations": [{"host": "pacs.example.org", "port": 104, "aeTitle": "PACS"}],
    }
    spec.update(spec_changes)
    return {"apiVersion": "isdr.io/v1alpha1", "kind": "Fingerprint", "metadata": {"name": name}, "spec": spec}


def write(folder: Path, name: str, content: str | dict | list) -> Path:
    path = folder / name
    if isinstance(content, (dict, list)):
        content = json.dumps(content, indent=2) if name.endswith(".json") else yaml.safe_dump_all(content)
    path.write_text(content, encoding="utf-8")
    return path


def messages(result) -> list[str]:
    return [str(problem) for problem in result.problems]


# --- the examples -----------------------------------------------------------------------------


def test_examples_load_without_problems():
    result = load_fingerprint_dir(EXAMPLES)
    assert messages(result) == []
    by_name = {fp.name: fp for fp in result.fingerprints}
    assert set(by_name) == {"cns-t1-oars", "ct-thorax-oars", "prostate-mr"}

    seed_fp = by_name["cns-t1-oars"]
    assert seed_fp.inference_server == InferenceServerRef(
        url="https://inference.example.org/api/tasks/", model="cns_t1_oars", protocol="v1"
    )
    assert seed_fp.match == MatchRules(modality="^MR$", series_description="t1", exclude="a^")
    assert seed_fp.destinations == (Destination("127.0.0.1", 11111, "DICOM_ENDPOINT"),)
    assert seed_fp.source == str(EXAMPLES / "cns_t1_oars.json")

    manifest_fp = by_name["ct-thorax-oars"]
    assert manifest_fp.inference_server.protocol == "v2"
    assert manifest_fp.inference_server.poll_interval_seconds == 15.0
    assert manifest_fp.inference_server.timeout_seconds == 3600.0
    assert manifest_fp.inference_server.delete_when_done is True
    assert manifest_fp.match.exclude == "scout|topogram|localizer"
    assert len(manifest_fp.destinations) == 2


# --- seed files -------------------------------------------------------------------------------


def test_original_example_reports_every_comment_and_the_long_ae_title(tmp_path):
    path = write(tmp_path, "ct.json", ORIGINAL_EXAMPLE)
    result = load_fingerprint_file(path)
    assert result.fingerprints == ()
    assert messages(result) == [
        f"{path}:2:25: JSON does not allow comments ('# Matches everything'); remove it",
        f"{path}:3:35: JSON does not allow comments ('# Matches everything'); remove it",
        f"{path}:4:34: JSON does not allow comments ('# Matches everything'); remove it",
        f"{path}:5:30: JSON does not allow comments ('# Matches everything'); remove it",
        f"{path}:6:26: JSON does not allow comments ('# Matches nothing'); remove it",
        # DICOM allows 16 characters; the example's title has 17
        f"{path}:13:23: scus[0].scu_ae_title: 'DICOM_ENDPOINT_AE' is 17 characters long; at most 16 are allowed",
    ]


def test_load_problem_format():
    problem = LoadProblem(
        "fingerprints/ct.json", 3, 24, "JSON does not allow comments ('# Matches everything'); remove it"
    )
    assert str(problem) == "fingerprints/ct.json:3:24: JSON does not allow comments ('# Matches everything'); remove it"
    assert str(LoadProblem("a.json", None, None, "is not UTF-8 text")) == "a.json: is not UTF-8 text"
    assert str(LoadProblem("a.json", 2, None, "x", "warning")) == "a.json:2: warning: x"


def test_original_example_without_comments_loads(tmp_path):
    text = re.sub(r" #.*", "", ORIGINAL_EXAMPLE).replace("DICOM_ENDPOINT_AE", "DICOM_ENDPOINT")
    result = load_fingerprint_file(write(tmp_path, "cns_t1_oars.json", text))
    assert messages(result) == []
    (fp,) = result.fingerprints
    assert fp == Fingerprint(
        name="cns-t1-oars",
        match=MatchRules(exclude="a^"),
        inference_server=InferenceServerRef(url="https://omen.onerm.dk/api/tasks/", model="cns_t1_oars", protocol="v1"),
        destinations=(Destination("127.0.0.1", 11111, "DICOM_ENDPOINT"),),
        source=str(tmp_path / "cns_t1_oars.json"),
    )


@pytest.mark.parametrize(
    "text, expected",
    [
        (
            '{\n  "a": 1,\n}\n',
            ":3:1: invalid JSON: Expecting property name enclosed in double quotes "
            "(JSON allows no comma before '}'; remove the last comma)",
        ),
        (
            '{\n  "a": [1,]\n}\n',
            ":2:11: invalid JSON: Expecting value (JSON allows no comma before ']'; remove the last comma)",
        ),
        (
            "{\n  'a': 1\n}\n",
            ":2:3: invalid JSON: Expecting property name enclosed in double quotes "
            '(JSON strings need double quotes: "..." )',
        ),
        ('{\n  "a": 1 // note\n}\n', ":2:10: JSON does not allow comments ('// note'); remove it"),
        ("", ":1:1: invalid JSON: Expecting value"),
    ],
)
def test_json_syntax_problems(tmp_path, text, expected):
    path = write(tmp_path, "x.json", text)
    result = load_fingerprint_file(path)
    assert result.fingerprints == ()
    assert f"{path}{expected}" in messages(result)


@pytest.mark.parametrize(
    "changes, expected",
    [
        ({"model_human_readable_id": DELETE}, ":1:1: model_human_readable_id: is required but missing"),
        ({"exclude_regex": DELETE}, ":1:1: exclude_regex: is required but missing"),
        ({"scus": DELETE}, ":1:1: scus: is required but missing"),
        ({"modality_regex": None}, ":2:21: modality_regex: must be a string in double quotes (found null)"),
        ({"scus": {}}, ":9:3: scus: must be a list [ ... ] (found an object)"),
        ({"scus": []}, ":9:3: scus: must not be empty"),
        (
            {"inference_server_url": "omen.onerm.dk/api/tasks/"},
            ":7:27: inference_server_url: must be an http:// or https:// URL with a host name, e.g. https://inference.example.org",
        ),
        ({"model_human_readable_id": ""}, ":8:30: model_human_readable_id: must not be empty"),
        (
            {"series_description_regex": "t1 (ax"},
            ":3:31: series_description_regex: 't1 (ax' is not a valid regular expression: "
            "missing ), unterminated subpattern at position 3",
        ),
        (
            {"exclude_regex": "*"},
            ":6:20: exclude_regex: '*' is not a valid regular expression: nothing to repeat at position 0",
        ),
    ],
)
def test_seed_field_problems(tmp_path, changes, expected):
    path = write(tmp_path, "x.json", seed(**changes))
    result = load_fingerprint_file(path)
    assert result.fingerprints == ()
    assert f"{path}{expected}" in messages(result)


@pytest.mark.parametrize(
    "port, expected",
    [
        ("11111", 11111),
        (" 104 ", 104),
        (104, 104),
        ("abc", "scus[0].scu_port: 'abc' is not a port number"),
        ("", "scus[0].scu_port: '' is not a port number"),
        (True, "scus[0].scu_port: true is not a port number"),
        (10.5, "scus[0].scu_port: 10.5 is not a port number"),
        ("70000", "scus[0].scu_port: 70000 is greater than the maximum of 65535"),
        ("0", "scus[0].scu_port: 0 is less than the minimum of 1"),
    ],
)
def test_seed_ports(tmp_path, port, expected):
    scus = [{"scu_ip": "10.0.0.1", "scu_port": port, "scu_ae_title": "DEST"}]
    result = load_fingerprint_file(write(tmp_path, "x.json", seed(scus=scus)))
    if isinstance(expected, int):
        assert messages(result) == []
        assert result.fingerprints[0].destinations[0].port == expected
    else:
        assert result.fingerprints == ()
        (problem,) = result.problems
        assert problem.message == expected
        assert (problem.line, problem.column) == (12, 19)


def test_seed_with_several_scus_and_problems_in_the_second(tmp_path):
    scus = [
        {"scu_ip": "10.0.0.1", "scu_port": "104", "scu_ae_title": "ONE"},
        {"scu_ip": "", "scu_port": "105", "scu_ae_title": "TWO\\BAD"},
    ]
    result = load_fingerprint_file(write(tmp_path, "x.json", seed(scus=scus)))
    assert [p.message.split(":")[0] for p in result.problems] == ["scus[1].scu_ip", "scus[1].scu_ae_title"]
    assert result.problems[0].message == "scus[1].scu_ip: must not be empty"


def test_seed_unknown_keys_are_warnings_and_the_fingerprint_loads(tmp_path):
    result = load_fingerprint_file(write(tmp_path, "x.json", seed(comment="old notes")))
    assert len(result.fingerprints) == 1
    (problem,) = result.problems
    assert problem.severity == "warning"
    assert problem.message == "comment: is not a seed fingerprint field; it is ignored"
    assert result.errors == ()


def test_seed_duplicate_key_is_a_problem(tmp_path):
    text = json.dumps(seed(), indent=2).replace(
        '"exclude_regex": "a^",', '"exclude_regex": "a^",\n  "exclude_regex": "",'
    )
    result = load_fingerprint_file(write(tmp_path, "x.json", text))
    assert result.fingerprints == ()
    assert [p.message for p in result.problems] == [
        "the key 'exclude_regex' appears twice in the same block; keep only one"
    ]
    assert result.problems[0].line == 7


def test_seed_with_tabs_keeps_positions(tmp_path):
    text = json.dumps(seed(sop_class_uid_regex="(("), indent="\t")
    result = load_fingerprint_file(write(tmp_path, "x.json", text))
    (problem,) = result.problems
    assert (problem.line, problem.column) == (5, 25)


def test_seed_must_be_an_object(tmp_path):
    result = load_fingerprint_file(write(tmp_path, "x.json", "[1, 2]"))
    assert messages(result) == [f"{tmp_path / 'x.json'}:1:1: a seed fingerprint must be a JSON object: {{ ... }}"]


def test_seed_with_byte_order_mark_loads(tmp_path):
    path = tmp_path / "bom.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(seed()).encode())
    assert messages(load_fingerprint_file(path)) == []


def test_file_that_is_not_utf8(tmp_path):
    path = tmp_path / "latin1.json"
    path.write_bytes(b'{\n"modality_regex": "\xe6"}')
    assert messages(load_fingerprint_file(path)) == [f"{path}:2: is not UTF-8 text; save it as UTF-8"]


@pytest.mark.parametrize(
    "stem, name",
    [
        ("cns_t1_oars", "cns-t1-oars"),
        ("CT Head (v2)", "ct-head-v2"),
        ("--x--", "x"),
        ("æøå", "fingerprint"),
        ("a" * 80, "a" * 63),
        ("a" * 62 + "_b", "a" * 62),
    ],
)
def test_seed_names_are_dns_labels(stem, name):
    assert dns_label(stem) == name
    assert is_dns_label(name)


# --- manifest files ---------------------------------------------------------------------------


def test_manifest_defaults(tmp_path):
    doc = manifest(match={"modality": None})  # `modality:` with no value, as YAML writes it
    result = load_fingerprint_file(write(tmp_path, "m.yaml", [doc]))
    assert messages(result) == []
    (fp,) = result.fingerprints
    assert fp.match == MatchRules()
    assert fp.inference_server == InferenceServerRef(url="https://inference.example.org", model="ct_head")
    assert fp.inference_server.protocol == "v2"


def test_manifest_problems_have_field_paths_and_positions(tmp_path):
    text = textwrap.dedent(
        """\
        apiVersion: isdr.io/v1alpha1
        kind: Fingerprint
        metadata:
          name: ct-head
        spec:
          match:
            seriesDescripton: head
          inferenceServer:
            url: ftp://inference.example.org
            protocol: v3
          destinations:
            - host: pacs.example.org
              port: 70000
              aeTitle: " PACS"
        """
    )
    path = write(tmp_path, "m.yaml", text)
    result = load_fingerprint_file(path)
    assert result.fingerprints == ()
    assert messages(result) == [
        f"{path}:7:5: spec.match.seriesDescripton: unknown field (known fields here: exclude, modality, "
        "seriesDescription, sopClassUID, studyDescription)",
        f"{path}:8:3: spec.inferenceServer.model: is required but missing",
        f"{path}:9:10: spec.inferenceServer.url: must be an http:// or https:// URL with a host name, "
        "e.g. https://inference.example.org",
        f"{path}:10:15: spec.inferenceServer.protocol: 'v3' is not one of ['v1', 'v2']",
        f"{path}:13:13: spec.destinations[0].port: 70000 is greater than the maximum of 65535",
        f"{path}:14:16: spec.destinations[0].aeTitle: an AE title must not start or end with a space",
    ]


def test_yaml_syntax_error_has_position_and_earlier_documents_load(tmp_path):
    good = yaml.safe_dump(manifest("first"))
    path = write(tmp_path, "m.yaml", good + "---\nspec:\n  match: [unclosed\n")
    result = load_fingerprint_file(path)
    assert [fp.name for fp in result.fingerprints] == ["first"]
    (problem,) = result.problems
    assert problem.message.startswith("invalid YAML: ")
    assert problem.line is not None and problem.line > good.count("\n")


def test_yaml_multi_document_file(tmp_path):
    docs = [
        manifest("one"),
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}},
        None,
        manifest("two"),
    ]
    path = write(tmp_path, "all.yaml", docs)
    result = load_fingerprint_file(path)
    assert [fp.name for fp in result.fingerprints] == ["one", "two"]
    assert [p.message for p in result.problems] == [
        "apiVersion: must be isdr.io/v1alpha1 (found 'v1')",
        "kind: must be Fingerprint (found 'ConfigMap')",
    ]


def test_yaml_document_that_is_not_a_mapping(tmp_path):
    result = load_fingerprint_file(write(tmp_path, "m.yml", "- a\n- b\n"))
    assert [p.message for p in result.problems] == ["a Fingerprint manifest must be a mapping of fields"]


def test_manifest_name_must_be_a_dns_label(tmp_path):
    result = load_fingerprint_file(write(tmp_path, "m.yaml", [manifest("CT_Head")]))
    (problem,) = result.problems
    assert problem.message.startswith("metadata.name: 'CT_Head' is not valid: Must be a DNS-1123 label")
    assert (problem.line, problem.column) == (4, 9)


def test_manifest_invalid_regex_is_reported_with_schema_problems(tmp_path):
    doc = manifest(match={"modality": "CT(", "exclude": "[a"}, destinations=[])
    result = load_fingerprint_file(write(tmp_path, "m.yaml", [doc]))
    assert sorted(p.message for p in result.problems) == [
        "spec.destinations: must not be empty",
        "spec.match.exclude: '[a' is not a valid regular expression: unterminated character set at position 0",
        "spec.match.modality: 'CT(' is not a valid regular expression: "
        "missing ), unterminated subpattern at position 2",
    ]


def test_manifest_needs_match_for_series_level(tmp_path):
    doc = manifest()
    del doc["spec"]["match"]
    result = load_fingerprint_file(write(tmp_path, "m.yaml", [doc]))
    assert [p.message for p in result.problems] == [
        "spec: a series-level fingerprint needs spec.match (write `match: {}` to send every series)"
    ]
    doc["spec"]["match"] = {}
    assert messages(load_fingerprint_file(write(tmp_path, "m.yaml", [doc]))) == []


def test_manifest_duplicate_key(tmp_path):
    text = yaml.safe_dump(manifest()).replace("  model: ct_head\n", "  model: ct_head\n    model: other\n")
    result = load_fingerprint_file(write(tmp_path, "m.yaml", text))
    assert [p.message for p in result.problems] == ["the key 'model' appears twice in the same block; keep only one"]


def test_ca_bundle_path_is_relative_to_the_manifest(tmp_path):
    (tmp_path / "ca.pem").write_text("-----BEGIN CERTIFICATE-----\n")
    doc = manifest(inferenceServer={"url": "https://x.example", "model": "m", "caBundle": {"path": "ca.pem"}})
    result = load_fingerprint_file(write(tmp_path, "m.yaml", [doc]))
    assert messages(result) == []
    assert result.fingerprints[0].inference_server.ca_bundle == str((tmp_path / "ca.pem").resolve())


def test_ca_bundle_path_must_exist(tmp_path):
    doc = manifest(inferenceServer={"url": "https://x.example", "model": "m", "caBundle": {"path": "missing.pem"}})
    result = load_fingerprint_file(write(tmp_path, "m.yaml", [doc]))
    (problem,) = result.problems
    assert problem.message.startswith("spec.inferenceServer.caBundle.path: the CA bundle file")


@pytest.mark.parametrize("ref", ["configMapKeyRef", "secretKeyRef"])
def test_ca_bundle_references_only_work_on_kubernetes(tmp_path, ref):
    ca = {ref: {"name": "hospital-ca", "key": "ca.crt"}}
    doc = manifest(inferenceServer={"url": "https://x.example", "model": "m", "caBundle": ca})
    result = load_fingerprint_file(write(tmp_path, "m.yaml", [doc]))
    (problem,) = result.problems
    assert "only works on Kubernetes" in problem.message


@pytest.mark.parametrize(
    "ca",
    [
        {},
        {"path": "a.pem", "configMapKeyRef": {"name": "a", "key": "b"}},
        {"configMapKeyRef": {"name": "a", "key": "b"}, "secretKeyRef": {"name": "a", "key": "b"}},
    ],
)
def test_ca_bundle_needs_exactly_one_source(tmp_path, ca):
    doc = manifest(inferenceServer={"url": "https://x.example", "model": "m", "caBundle": ca})
    result = load_fingerprint_file(write(tmp_path, "m.yaml", [doc]))
    assert [p.message for p in result.problems] == [
        "spec.inferenceServer.caBundle: give exactly one of configMapKeyRef, secretKeyRef or path"
    ]


# --- folders ----------------------------------------------------------------------------------


def test_folder_ignores_other_files_and_a_broken_file_does_not_stop_the_others(tmp_path):
    write(tmp_path, "a-broken.json", ORIGINAL_EXAMPLE)
    write(tmp_path, "b.json", seed())
    write(tmp_path, "c.yaml", [manifest("c")])
    write(tmp_path, "d.yml", [manifest("d")])
    write(tmp_path, "e.YAML", [manifest("e")])
    write(tmp_path, "fingerprint.json.example", ORIGINAL_EXAMPLE)
    write(tmp_path, "README.md", "# notes\n")
    write(tmp_path, ".hidden.json", "{")
    (tmp_path / "sub").mkdir()
    write(tmp_path / "sub", "x.json", "{")
    (tmp_path / "..data").mkdir()  # how a mounted ConfigMap looks
    write(tmp_path / "..data", "y.yaml", "{")

    result = load_fingerprint_dir(tmp_path)
    assert [fp.name for fp in result.fingerprints] == ["b", "c", "d", "e"]
    assert {p.path for p in result.problems} == {str(tmp_path / "a-broken.json")}
    assert [p.name for p in fingerprint_files(tmp_path)] == ["a-broken.json", "b.json", "c.yaml", "d.yml", "e.YAML"]


def test_duplicate_names_across_files_second_is_a_problem(tmp_path):
    write(tmp_path, "ct-head.json", seed())
    write(tmp_path, "other.yaml", [manifest("ct-head"), manifest("unique")])
    write(tmp_path, "z.yaml", [manifest("unique")])
    result = load_fingerprint_dir(tmp_path)
    assert [(fp.name, Path(fp.source).name) for fp in result.fingerprints] == [
        ("ct-head", "ct-head.json"),
        ("unique", "other.yaml"),
    ]
    assert messages(result) == [
        f"{tmp_path / 'other.yaml'}:4:9: the fingerprint name 'ct-head' is already used by "
        f"{tmp_path / 'ct-head.json'}; names must be unique, so this fingerprint is ignored",
        f"{tmp_path / 'z.yaml'}:4:9: the fingerprint name 'unique' is already used by "
        f"{tmp_path / 'other.yaml'}; names must be unique, so this fingerprint is ignored",
    ]


def test_duplicate_seed_name_mentions_the_file_name(tmp_path):
    write(tmp_path, "CT_Head.json", seed())
    write(tmp_path, "ct-head.json", seed())
    result = load_fingerprint_dir(tmp_path)
    assert len(result.fingerprints) == 1
    (problem,) = result.problems
    assert problem.line is None
    assert problem.message.endswith("(a seed file's name comes from its file name)")


def test_missing_folder(tmp_path):
    result = load_fingerprint_dir(tmp_path / "nope")
    assert messages(result) == [f"{tmp_path / 'nope'}: is not a folder (FINGERPRINT_DIR)"]


def test_explicit_file_of_another_kind(tmp_path):
    result = load_fingerprint_files([write(tmp_path, "notes.txt", "x")])
    assert [p.message for p in result.problems] == [
        "is not a fingerprint file: expected *.json (seed) or *.yaml / *.yml"
    ]


# --- custom resources (the operator's entry point) --------------------------------------------


def custom_resource(**spec_changes) -> dict:
    obj = manifest("brain", **spec_changes)
    obj["metadata"].update(
        namespace="radiology",
        uid="0b6f8a52-4a2b-4a1e-9c1b-1f2f3a4b5c6d",
        generation=3,
        labels={"team": "neuro"},
        managedFields=[{"manager": "kubectl"}],
    )
    obj["status"] = {"kopf": {"progress": {}}, "matchedSeries": 2, "conditions": []}
    return obj


def test_fingerprint_from_custom_resource_with_config_map_ca():
    server = {
        "url": "https://inference.example.org",
        "model": "brain",
        "protocol": "v2",
        "caBundle": {"configMapKeyRef": {"name": "hospital-ca", "key": "ca.crt"}},
        "pollIntervalSeconds": 10,
        "timeoutSeconds": 600,
        "deleteWhenDone": False,
    }
    fp = fingerprint_from_manifest(MappingProxyType(custom_resource(inferenceServer=server)), "radiology/brain")
    assert fp.name == "brain"
    assert fp.source == "radiology/brain"
    assert fp.inference_server == InferenceServerRef(
        url="https://inference.example.org",
        model="brain",
        protocol="v2",
        ca_bundle=None,
        ca_bundle_ref=CABundleRef("configMap", "hospital-ca", "ca.crt"),
        poll_interval_seconds=10.0,
        timeout_seconds=600.0,
        delete_when_done=False,
    )
    assert validate_fingerprint(fp) == []


def test_fingerprint_from_custom_resource_with_secret_ca():
    server = {"url": "https://x.example", "model": "m", "caBundle": {"secretKeyRef": {"name": "s", "key": "k"}}}
    fp = fingerprint_from_manifest(custom_resource(inferenceServer=server), "ns/x")
    assert fp.inference_server.ca_bundle_ref == CABundleRef("secret", "s", "k")


def test_fingerprint_from_manifest_raises_with_every_issue():
    with pytest.raises(FingerprintError) as caught:
        fingerprint_from_manifest(custom_resource(destinations=[{"host": "h", "port": 0}]), "ns/x")
    assert str(caught.value) == (
        "spec.destinations[0].aeTitle: is required but missing; "
        "spec.destinations[0].port: 0 is less than the minimum of 1"
    )
    assert caught.value.source == "ns/x"
    assert [schema.format_path(i.path) for i in caught.value.issues] == [
        "spec.destinations[0].aeTitle",
        "spec.destinations[0].port",
    ]


def test_fingerprint_from_manifest_rejects_other_kinds_and_missing_names():
    with pytest.raises(FingerprintError, match="kind: must be Fingerprint"):
        fingerprint_from_manifest({"apiVersion": "isdr.io/v1alpha1", "kind": "DicomSeries"}, "x")
    doc = manifest()
    del doc["metadata"]
    with pytest.raises(FingerprintError, match=r"metadata\.name: is required but missing"):
        fingerprint_from_manifest(doc, "x")


def test_invalid_regex_builds_but_does_not_validate():
    fp = fingerprint_from_manifest(custom_resource(match={"seriesDescription": "t1 (ax"}), "ns/x")
    assert validate_fingerprint(fp) == [
        "spec.match.seriesDescription: 't1 (ax' is not a valid regular expression: "
        "missing ), unterminated subpattern at position 3"
    ]


def test_manifest_round_trip():
    server = {
        "url": "https://x.example",
        "protocol": "v1",
        "model": "m",
        "caBundle": {"secretKeyRef": {"name": "s", "key": "k"}},
        "pollIntervalSeconds": 5,
        "timeoutSeconds": 60,
        "deleteWhenDone": True,
    }
    fp = fingerprint_from_manifest(manifest(inferenceServer=server), "x")
    again = fingerprint_from_manifest(fingerprint_to_manifest(fp), "x")
    assert again == fp
    assert fingerprint_to_manifest(fp)["spec"]["inferenceServer"] == server


# --- the CRD itself ---------------------------------------------------------------------------


def crd() -> dict:
    return yaml.safe_load((REPO / "crds" / "fingerprint.yaml").read_text())


def all_schemas(node: dict, path: str = ""):
    yield path, node
    for key, sub in node.get("properties", {}).items():
        yield from all_schemas(sub, f"{path}.{key}")
    if "items" in node:
        yield from all_schemas(node["items"], f"{path}[]")


def test_crd_identity():
    value = crd()
    assert value["apiVersion"] == "apiextensions.k8s.io/v1"
    assert value["metadata"]["name"] == "fingerprints.isdr.io"
    spec = value["spec"]
    assert (spec["group"], spec["scope"]) == ("isdr.io", "Namespaced")
    assert spec["names"]["kind"] == "Fingerprint" and spec["names"]["plural"] == "fingerprints"
    assert "fp" in spec["names"]["shortNames"] and spec["names"]["categories"] == ["isdr"]
    (version,) = spec["versions"]
    assert version["name"] == "v1alpha1" and version["served"] and version["storage"]
    assert version["subresources"] == {"status": {}}


def test_crd_schema_is_structural_and_documented():
    root = schema.crd_schema()
    for path, node in all_schemas(root):
        if path == ".metadata":  # the API server forbids anything but name restrictions here
            assert set(node) == {"type", "properties"} and set(node["properties"]) == {"name"}
            continue
        if path == ".metadata.name":
            continue
        assert node.get("description"), f"{path or 'root'} has no description (kubectl explain shows it)"
        assert node.get("type") in {"object", "array", "string", "integer", "boolean", "number"}, path
        if node["type"] == "array":
            assert "items" in node, path
        assert "additionalProperties" not in node or "properties" not in node, path
        if "default" in node:  # a default must itself be valid
            assert jsonschema_valid(node["default"], node), path
        for key in ("pattern",):
            if key in node:
                re.compile(node[key])
        if node.get("x-kubernetes-list-type") == "map":
            assert set(node["x-kubernetes-list-map-keys"]) <= set(node["items"]["required"]), path


def jsonschema_valid(value, node) -> bool:
    import jsonschema

    return jsonschema.Draft4Validator(node).is_valid(value)


def test_crd_status_keeps_kopf_state_and_follows_condition_conventions():
    status = schema.crd_schema()["properties"]["status"]
    assert status["x-kubernetes-preserve-unknown-fields"] is True
    conditions = status["properties"]["conditions"]
    assert conditions["x-kubernetes-list-map-keys"] == ["type"]
    item = conditions["items"]["properties"]
    assert set(item) == {"type", "status", "reason", "message", "lastTransitionTime", "observedGeneration"}
    assert item["status"]["enum"] == ["True", "False", "Unknown"]
    for counter in ("observedGeneration", "matchedSeries", "succeededTasks", "failedTasks", "lastMatchTime"):
        assert counter in status["properties"]


def test_every_cel_rule_has_exactly_one_python_twin():
    # A rule used in two places (the CA bundle's "exactly one source") has one twin.
    rules = set(schema.cel_rules(schema.crd_schema()))
    assert sorted(rules) == sorted(schema.CEL_TWINS)


def test_printer_columns_point_at_schema_fields():
    (version,) = crd()["spec"]["versions"]
    columns = {c["name"]: c for c in version["additionalPrinterColumns"]}
    assert {"Model", "Server", "Protocol", "Destination", "Ready", "Matched", "Succeeded", "Failed", "Age"} <= set(
        columns
    )
    root = schema.crd_schema()
    for column in columns.values():
        assert column.get("description"), column["name"]
        path = column["jsonPath"]
        if path == ".metadata.creationTimestamp":
            continue
        node = root
        for part in re.findall(r"\.(\w+)", re.sub(r"\[[^\]]*\]", "", path)):
            node = node["properties"][part] if "properties" in node else node["items"]["properties"][part]
        assert column["type"] == node["type"], column["name"]


def test_minimal_manifest_gets_defaults_that_validate():
    prepared = schema.prepare(manifest(match={}))
    assert prepared["spec"]["level"] == "Series"
    assert prepared["spec"]["match"] == {
        "modality": "",
        "sopClassUID": "",
        "seriesDescription": "",
        "studyDescription": "",
        "exclude": "",
    }
    assert prepared["spec"]["inferenceServer"]["protocol"] == "v2"
    assert schema.validate_manifest(prepared) == []


@pytest.mark.parametrize(
    "url, ok",
    [
        ("https://inference.example.org", True),
        ("http://10.0.0.5:8000/api/tasks/", True),
        ("HTTPS://Inference.Example.org/", True),
        ("https://[::1]:8443", True),
        ("ftp://inference.example.org", False),
        ("inference.example.org", False),
        ("https://", False),
        ("https:///api/tasks/", False),
        ("https://inference example.org", False),
    ],
)
def test_url_rule_twin(url, ok):
    doc = schema.prepare(manifest(inferenceServer={"url": url, "model": "m"}))
    assert (schema.validate_manifest(doc) == []) is ok


@pytest.mark.parametrize(
    "ae_title, ok",
    [
        ("PACS", True),
        ("A", True),
        ("MY AE", True),
        ("X" * 16, True),
        ("X" * 17, False),
        ("", False),
        (" PACS", False),
        ("PACS ", False),
        ("PA\\CS", False),
        ("PACSæ", False),
        ("PA\tCS", False),
    ],
)
def test_ae_title_rules(ae_title, ok):
    doc = schema.prepare(manifest(destinations=[{"host": "h", "port": 104, "aeTitle": ae_title}]))
    assert (schema.validate_manifest(doc) == []) is ok
