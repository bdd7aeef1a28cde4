"""Does a series match a fingerprint? Pure functions, with the original relay's semantics, in
linear time.

- Each expression is searched (not anchored, like `re.search`) case-insensitively in its
  attribute, so "T1" is found in "Ax T1 MPRAGE".
- An empty expression matches everything, including an empty or missing attribute.
- `exclude` is searched in all four attributes; a hit in any of them excludes the series. An
  empty `exclude` excludes nothing (the original example used "a^", which is never found).
- Attribute values come from the network: None counts as "", and only the first
  MAX_MATCHED_LENGTH characters are looked at (DICOM allows at most 64 in these attributes).

Expressions are evaluated with RE2 (Google's engine, through the `google-re2` binding), which
never backtracks: the time to search is linear in the length of the text, whatever the
expression. With Python's `re`, `(a+)+$` against sixty `a`s and a `!` runs for hours. The syntax
is Python's, less what needs backtracking: backreferences (`\\1`, `(?P=name)`), lookahead and
lookbehind (`(?=`, `(?!`, `(?<=`, `(?<!`), possessive quantifiers and atomic groups, and
repetition counts above 1000. Such an expression is reported (`regex_problems`), never run.

A fingerprint whose expressions do not compile never matches (sending a series to the wrong
model is worse than sending it nowhere); loaders reject such fingerprints up front, and the
operator reports them through `regex_problems`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import lru_cache

import re2

from relay.fingerprints.model import Fingerprint, MatchRules, SeriesAttributes

# The attributes matching looks at, by their names in MatchRules and SeriesAttributes.
ATTRIBUTES = ("modality", "sop_class_uid", "series_description", "study_description")
RULE_FIELDS = ATTRIBUTES + ("exclude",)

# DICOM's longest of the four (LO, UI) is 64 characters; longer values are not DICOM, and
# searching them only costs time.
MAX_MATCHED_LENGTH = 1024

# RE2 bounds the memory of a compiled expression (a larger one does not compile); this is its
# default, written out so that the bound is a decision, not an accident.
MAX_PROGRAM_MEMORY = 8 << 20

RegexError = re2.error


def _options() -> re2.Options:
    options = re2.Options()
    options.case_sensitive = False
    options.log_errors = False  # problems are reported by regex_problems, not on stderr
    options.max_mem = MAX_PROGRAM_MEMORY
    return options


@lru_cache(maxsize=4096)
def compiled(pattern: str):
    """The compiled, case-insensitive RE2 form of an expression (cached: matching runs per series).

    Raises RegexError for an expression RE2 cannot take."""
    return re2.compile(pattern, _options())


def _text(value: object) -> str:
    return "" if value is None else str(value)[:MAX_MATCHED_LENGTH]


def _found(pattern: str, value: object) -> bool:
    return compiled(pattern).search(_text(value)) is not None


def rules_match(rules: MatchRules, attrs: SeriesAttributes) -> bool:
    """True when every expression is found in its attribute and exclude is found in none.

    Raises RegexError for an expression that does not compile.
    """
    return next(mismatches(rules, attrs), None) is None


@dataclass(frozen=True)
class Mismatch:
    """Why a series does not match: `rule`'s expression was not found in its attribute, or (rule
    "exclude") was found in `attribute`. `value` is the attribute as matching saw it."""

    rule: str  # a MatchRules field name
    pattern: str
    attribute: str  # a SeriesAttributes field name
    value: str

    def describe(self) -> str:
        attribute = self.attribute.replace("_", " ").replace("sop class uid", "SOP Class UID")
        if self.rule == "exclude":
            return f"exclude {self.pattern!r} is found in {attribute} {self.value!r}"
        return f"{attribute} {self.pattern!r} is not found in {self.value!r}"


def mismatches(rules: MatchRules, attrs: SeriesAttributes) -> Iterator[Mismatch]:
    """Each reason the series does not match `rules`, in field order (none: it matches); lazily,
    so that a yes/no question stops at the first. Raises RegexError like rules_match."""
    for name in ATTRIBUTES:
        pattern = getattr(rules, name)
        if pattern and not _found(pattern, getattr(attrs, name)):
            yield Mismatch(name, pattern, name, _text(getattr(attrs, name)))
    if rules.exclude:
        for name in ATTRIBUTES:
            if _found(rules.exclude, getattr(attrs, name)):
                yield Mismatch("exclude", rules.exclude, name, _text(getattr(attrs, name)))


def fingerprint_matches(fp: Fingerprint, attrs: SeriesAttributes) -> bool:
    """True when the series should go to this fingerprint's model; False for a broken regex.

    A study-level fingerprint takes a series that matches `match` and fills one of its entries
    (see study_entry)."""
    try:
        if not rules_match(fp.match, attrs):
            return False
    except RegexError:
        return False
    return fp.study is None or study_entry(fp, attrs) is not None


def study_entry(fp: Fingerprint, attrs: SeriesAttributes) -> str | None:
    """The entry of a study-level fingerprint that the series fills: the first, in list order,
    whose match it matches. None for a series-level fingerprint, a series that fills none, or a
    series that does not say which study it belongs to (nothing to group it with)."""
    if fp.study is None or not attrs.study_uid:
        return None
    try:
        return next((entry.name for entry in fp.study.series if rules_match(entry.match, attrs)), None)
    except RegexError:
        return None


def matching_fingerprints(fps: Iterable[Fingerprint], attrs: SeriesAttributes) -> list[Fingerprint]:
    """The fingerprints the series matches, sorted by name so every run dispatches alike."""
    return sorted((fp for fp in fps if fingerprint_matches(fp, attrs)), key=lambda fp: fp.name)


# --- problems ---------------------------------------------------------------------------------

# The construct RE2 quotes in its message -> why it was refused, for constructs that only a
# backtracking engine has.
_UNSUPPORTED = (
    (("(?=", "(?!"), "lookahead ((?= or (?!) is not supported"),
    (("(?<=", "(?<!"), "lookbehind ((?<= or (?<!) is not supported"),
    (("(?P=",), "backreferences are not supported"),
    (("(?>",), "atomic groups are not supported"),
    (("*+", "++", "?+", "}+"), "possessive quantifiers are not supported"),
)


def _unsupported(message: str, fragment: str) -> str | None:
    """Why RE2 refused an expression that Python's re takes, in the user's terms."""
    for starts, reason in _UNSUPPORTED:
        if fragment.startswith(starts):
            return reason
    if message == "invalid escape sequence" and re.fullmatch(r"\\[1-9][0-9]?", fragment):
        return "backreferences are not supported"
    if message == "invalid escape sequence" and fragment == "\\Z":
        return "\\Z is not supported; write \\z (or $) for the end of the text"
    if message == "invalid repetition size":
        return "repetition counts above 1000 are not supported (nested counts multiply)"
    if "too large" in message:
        return "the expression is too large for the engine's memory bound"
    return None


@dataclass(frozen=True)
class RegexProblem:
    """An expression that cannot be used: which rule field, where in the expression, and why."""

    field: str  # a MatchRules attribute name, e.g. "series_description"
    pattern: str
    position: int | None  # 0-based offset in the expression, when one is known
    reason: str  # e.g. "missing )"
    # True when the expression needs backtracking (valid for Python's re, refused by RE2).
    unsupported: bool = False

    def describe(self) -> str:
        where = f" at position {self.position}" if self.position is not None else ""
        if self.unsupported:
            return (f"{self.pattern!r} cannot be evaluated in linear time: {self.reason}{where} "
                    "(fingerprint expressions use RE2, an engine that never backtracks)")
        return f"{self.pattern!r} is not a valid regular expression: {self.reason}{where}"


def regex_problem(field: str, pattern: str) -> RegexProblem | None:
    """What is wrong with one expression, or None when RE2 takes it."""
    try:
        compiled(pattern)
        return None
    except RegexError as error:
        raw = error.args[0] if error.args else ""
        text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
    message, _, fragment = text.partition(": ")
    try:
        re.compile(pattern, re.IGNORECASE)
    except re.error as python_error:  # invalid in any syntax: Python says where and why best
        return RegexProblem(field, pattern, python_error.pos, python_error.msg)
    except (RecursionError, OverflowError, ValueError):  # pragma: no cover - Python's own limits
        pass
    if fragment == "(?P" and "(?P=" in pattern:  # RE2 quotes only "(?P" for "(?P=name)"
        fragment = "(?P="
    reason = _unsupported(message, fragment) or (f"{message} ({fragment})" if fragment else message)
    position = pattern.find(fragment) if fragment else -1
    return RegexProblem(field, pattern, position if position >= 0 else None, reason, unsupported=True)


def regex_problems(rules: MatchRules) -> list[RegexProblem]:
    """Every expression of `rules` that RE2 cannot take."""
    return [problem for name in RULE_FIELDS if (problem := regex_problem(name, getattr(rules, name)))]


# --- explaining a match (`isdr fingerprint test`) -----------------------------------------------


@dataclass(frozen=True)
class MatchExplanation:
    """Whether a series matches one fingerprint, and every reason it does not, as data."""

    fingerprint: str
    mismatches: tuple[Mismatch, ...] = ()
    problems: tuple[RegexProblem, ...] = ()  # expressions that cannot be evaluated: it never matches

    @property
    def matches(self) -> bool:
        return not self.mismatches and not self.problems

    def reasons(self) -> list[str]:
        return [problem.describe() for problem in self.problems] + [m.describe() for m in self.mismatches]


def explain_match(fp: Fingerprint, attrs: SeriesAttributes) -> MatchExplanation:
    """What fingerprint_matches decides, with its reasons."""
    problems = tuple(regex_problems(fp.match))
    if problems:
        return MatchExplanation(fp.name, problems=problems)
    return MatchExplanation(fp.name, mismatches=tuple(mismatches(fp.match, attrs)))
