"""Matching semantics, as in the original relay: case-insensitive search per attribute, an empty
expression matches everything, the exclude expression is searched in all four attributes; and,
unlike the original, in linear time (RE2): expressions that need backtracking are reported."""

from __future__ import annotations

import pytest

from relay.fingerprints.matching import (
    MAX_MATCHED_LENGTH,
    RegexError,
    compiled,
    fingerprint_matches,
    matching_fingerprints,
    regex_problems,
    rules_match,
)
from relay.fingerprints.model import (
    Destination,
    Fingerprint,
    InferenceServerRef,
    MatchRules,
    SeriesAttributes,
)

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"

BRAIN_T1 = SeriesAttributes(
    modality="MR",
    sop_class_uid=MR_IMAGE,
    series_description="Ax T1 MPRAGE +C",
    study_description="MRI Brain w/ contrast",
)
CHEST_CT = SeriesAttributes(
    modality="CT",
    sop_class_uid=CT_IMAGE,
    series_description="Thorax 1.0 Br40",
    study_description="CT Chest",
)
EMPTY = SeriesAttributes()


def fingerprint(name: str = "fp", **rules: str) -> Fingerprint:
    return Fingerprint(
        name=name,
        match=MatchRules(**rules),
        inference_server=InferenceServerRef(url="https://inference.example.org/api/tasks/", model="m", protocol="v1"),
        destinations=(Destination("127.0.0.1", 11111, "DEST"),),
    )


# The original relay's example seed: empty expressions, exclude "a^" (never found).
ORIGINAL_EXAMPLE = dict(modality="", series_description="", study_description="", sop_class_uid="", exclude="a^")


@pytest.mark.parametrize(
    "rules, attrs, expected",
    [
        # the original example matches every series, even one without any attribute
        (ORIGINAL_EXAMPLE, BRAIN_T1, True),
        (ORIGINAL_EXAMPLE, CHEST_CT, True),
        (ORIGINAL_EXAMPLE, EMPTY, True),
        (ORIGINAL_EXAMPLE, SeriesAttributes(series_description="a", study_description="^a"), True),
        # no rules at all: everything matches
        ({}, BRAIN_T1, True),
        ({}, EMPTY, True),
        # case-insensitive, both ways
        (dict(modality="mr"), BRAIN_T1, True),
        (dict(modality="MR"), SeriesAttributes(modality="mr"), True),
        (dict(series_description="t1 mprage"), BRAIN_T1, True),
        (dict(study_description="BRAIN"), BRAIN_T1, True),
        # search, not match: found anywhere in the value
        (dict(series_description="T1"), BRAIN_T1, True),
        (dict(series_description="MPRAGE"), BRAIN_T1, True),
        (dict(study_description="brain"), BRAIN_T1, True),
        (dict(sop_class_uid=r"5\.1\.4\.1\.1\.4"), BRAIN_T1, True),
        # anchors still anchor
        (dict(series_description="^T1"), BRAIN_T1, False),
        (dict(series_description="^ax t1"), BRAIN_T1, True),
        (dict(modality="^M$"), BRAIN_T1, False),
        (dict(modality="^MR$"), BRAIN_T1, True),
        (dict(sop_class_uid=r"^1\.2\.840\.10008\.5\.1\.4\.1\.1\.2$"), CHEST_CT, True),
        (dict(sop_class_uid=r"^1\.2\.840\.10008\.5\.1\.4\.1\.1\.2$"), BRAIN_T1, False),
        # alternatives
        (dict(modality="CT|MR"), BRAIN_T1, True),
        (dict(modality="CT|MR"), CHEST_CT, True),
        (dict(modality="CT|PT"), BRAIN_T1, False),
        # every expression must be found (AND)
        (dict(modality="MR", series_description="t1"), BRAIN_T1, True),
        (dict(modality="MR", series_description="t2"), BRAIN_T1, False),
        (dict(modality="CT", series_description="t1"), BRAIN_T1, False),
        (dict(modality="MR", study_description="chest"), BRAIN_T1, False),
        (dict(modality="MR", sop_class_uid=CT_IMAGE.replace(".", r"\.") + "$"), BRAIN_T1, False),
        # a non-empty expression against an empty attribute: only if it matches ""
        (dict(series_description="t1"), EMPTY, False),
        (dict(series_description="^$"), EMPTY, True),
        (dict(series_description=".*"), EMPTY, True),
        (dict(series_description="^$"), BRAIN_T1, False),
    ],
)
def test_match_table(rules, attrs, expected):
    assert fingerprint_matches(fingerprint(**rules), attrs) is expected


ATTRIBUTE_NAMES = ["modality", "sop_class_uid", "series_description", "study_description"]


@pytest.mark.parametrize("attribute", ATTRIBUTE_NAMES)
def test_exclude_hit_in_each_attribute_excludes(attribute):
    attrs = SeriesAttributes(**{attribute: "value with SCOUT inside"})
    assert fingerprint_matches(fingerprint(), attrs) is True
    assert fingerprint_matches(fingerprint(exclude="scout"), attrs) is False


@pytest.mark.parametrize(
    "exclude, expected",
    [
        ("", True),  # empty excludes nothing (unlike re.search("", ...), which is always found)
        ("a^", True),  # the original example's "never found"
        ("localizer", True),  # not in any attribute
        ("mprage", False),  # case-insensitive, in the series description
        ("CONTRAST", False),  # in the study description
        (r"4\.1\.1\.4$", False),  # in the SOP class UID
        ("^MR$", False),  # in the modality
        ("^T1", True),  # anchored: not at the start of any attribute
        ("t2|flair", True),
        ("t2|t1", False),
    ],
)
def test_exclude_table(exclude, expected):
    assert fingerprint_matches(fingerprint(modality="MR", exclude=exclude), BRAIN_T1) is expected


def test_exclude_wins_over_a_match():
    fp = fingerprint(series_description="t1", exclude="t1")
    assert fingerprint_matches(fp, BRAIN_T1) is False


@pytest.mark.parametrize("attribute", ATTRIBUTE_NAMES)
def test_none_attribute_counts_as_empty(attribute):
    attrs = SeriesAttributes(**{attribute: None})
    assert fingerprint_matches(fingerprint(), attrs) is True
    assert fingerprint_matches(fingerprint(**{attribute: ""}), attrs) is True
    assert fingerprint_matches(fingerprint(**{attribute: "^$"}), attrs) is True
    assert fingerprint_matches(fingerprint(**{attribute: "x"}), attrs) is False
    assert fingerprint_matches(fingerprint(exclude="None"), attrs) is True  # not the text "None"


@pytest.mark.parametrize("field", ATTRIBUTE_NAMES + ["exclude"])
def test_invalid_expression_never_matches(field):
    fp = fingerprint(**{field: "CT("})
    assert fingerprint_matches(fp, CHEST_CT) is False
    assert matching_fingerprints([fp], CHEST_CT) == []


def test_rules_match_raises_for_invalid_expression():
    with pytest.raises(RegexError):
        rules_match(MatchRules(modality="["), CHEST_CT)


def test_regex_problems_names_field_and_position():
    (problem,) = regex_problems(MatchRules(modality="CT", series_description="t1 (ax"))
    assert problem.field == "series_description"
    assert problem.pattern == "t1 (ax"
    assert problem.position == 3
    assert problem.reason == "missing ), unterminated subpattern"
    assert not problem.unsupported
    assert problem.describe() == (
        "'t1 (ax' is not a valid regular expression: missing ), unterminated subpattern at position 3"
    )


def test_catastrophic_backtracking_expression_is_searched_in_linear_time():
    # With Python's re this search takes hours (2^60 ways to split the a's); RE2 answers at once.
    fp = fingerprint(series_description="(a+)+$")
    assert regex_problems(fp.match) == []
    assert fingerprint_matches(fp, SeriesAttributes(series_description="a" * 60 + "!")) is False
    assert fingerprint_matches(fp, SeriesAttributes(series_description="Ax " + "a" * 60)) is True
    assert fingerprint_matches(fingerprint(exclude="(a+)+$"), SeriesAttributes(modality="a" * 60 + "!")) is True


@pytest.mark.parametrize("pattern, position, reason", [
    (r"(t1)\1", 4, "backreferences are not supported"),
    ("(?P<seq>t1) (?P=seq)", 12, "backreferences are not supported"),
    ("t1(?=gd)", 2, "lookahead ((?= or (?!) is not supported"),
    ("t1(?!gd)", 2, "lookahead ((?= or (?!) is not supported"),
    ("(?<=ax )t1", 0, "lookbehind ((?<= or (?<!) is not supported"),
    ("(?>t1|t2)", 0, "atomic groups are not supported"),
    ("a*+", 1, "possessive quantifiers are not supported"),
    ("a{1001}", 1, "repetition counts above 1000 are not supported (nested counts multiply)"),
    (r"t1\Z", 2, r"\Z is not supported; write \z (or $) for the end of the text"),
])
def test_expressions_that_need_backtracking_are_reported_as_unsupported(pattern, position, reason):
    (problem,) = regex_problems(MatchRules(exclude=pattern))
    assert (problem.field, problem.position, problem.reason, problem.unsupported) == (
        "exclude", position, reason, True)
    assert problem.describe().startswith(f"{pattern!r} cannot be evaluated in linear time: {reason}")
    assert fingerprint_matches(fingerprint(exclude=pattern), CHEST_CT) is False  # never run


def test_only_the_first_characters_of_an_attribute_are_searched():
    long = "x" * MAX_MATCHED_LENGTH + "SCOUT"
    assert fingerprint_matches(fingerprint(series_description="scout"), SeriesAttributes(series_description=long)) \
        is False
    assert fingerprint_matches(fingerprint(series_description="x$"), SeriesAttributes(series_description=long))


def test_regex_problems_reports_every_field():
    rules = MatchRules(modality="(", sop_class_uid="[", series_description="*", study_description="ok", exclude="+")
    assert [p.field for p in regex_problems(rules)] == ["modality", "sop_class_uid", "series_description", "exclude"]
    assert regex_problems(MatchRules(exclude="a^")) == []


def test_matching_fingerprints_sorted_by_name_and_filtered():
    fps = [
        fingerprint("zeta"),
        fingerprint("alpha", modality="MR"),
        fingerprint("ct-only", modality="^CT$"),
        fingerprint("mid", series_description="t1"),
    ]
    assert [fp.name for fp in matching_fingerprints(fps, BRAIN_T1)] == ["alpha", "mid", "zeta"]
    assert [fp.name for fp in matching_fingerprints(reversed(fps), CHEST_CT)] == ["ct-only", "zeta"]
    assert matching_fingerprints([], BRAIN_T1) == []


def test_compiled_expressions_are_cached():
    assert compiled("t1.*gd") is compiled("t1.*gd")
    before = compiled.cache_info().hits
    fp = fingerprint(series_description="cache-me")
    for _ in range(3):
        fingerprint_matches(fp, BRAIN_T1)
    assert compiled.cache_info().hits >= before + 2
