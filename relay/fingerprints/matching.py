"""Does a series match a fingerprint? Pure functions, with the original relay's semantics.

- Each expression is searched (`re.search`, not `re.match`) case-insensitively in its attribute,
  so "T1" is found in "Ax T1 MPRAGE".
- An empty expression matches everything, including an empty or missing attribute.
- `exclude` is searched in all four attributes; a hit in any of them excludes the series. An
  empty `exclude` excludes nothing (the original example used "a^", which is never found).
- Attribute values come from the network: None counts as "".

A fingerprint whose expressions do not compile never matches (sending a series to the wrong
model is worse than sending it nowhere); loaders reject such fingerprints up front, and the
operator reports them through `regex_problems`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache

from relay.fingerprints.model import Fingerprint, MatchRules, SeriesAttributes

# The attributes matching looks at, by their names in MatchRules and SeriesAttributes.
ATTRIBUTES = ("modality", "sop_class_uid", "series_description", "study_description")
RULE_FIELDS = ATTRIBUTES + ("exclude",)


@lru_cache(maxsize=4096)
def compiled(pattern: str) -> re.Pattern[str]:
    """The compiled, case-insensitive form of an expression (cached: matching runs per series)."""
    return re.compile(pattern, re.IGNORECASE)


def _text(value: object) -> str:
    return "" if value is None else str(value)


def _found(pattern: str, value: object) -> bool:
    return compiled(pattern).search(_text(value)) is not None


def rules_match(rules: MatchRules, attrs: SeriesAttributes) -> bool:
    """True when every expression is found in its attribute and exclude is found in none.

    Raises re.error for an expression that does not compile.
    """
    for name in ATTRIBUTES:
        pattern = getattr(rules, name)
        if pattern and not _found(pattern, getattr(attrs, name)):
            return False
    if rules.exclude:
        return not any(_found(rules.exclude, getattr(attrs, name)) for name in ATTRIBUTES)
    return True


def fingerprint_matches(fp: Fingerprint, attrs: SeriesAttributes) -> bool:
    """True when the series should go to this fingerprint's model; False for a broken regex."""
    try:
        return rules_match(fp.match, attrs)
    except re.error:
        return False


def matching_fingerprints(fps: Iterable[Fingerprint], attrs: SeriesAttributes) -> list[Fingerprint]:
    """The fingerprints the series matches, sorted by name so every run dispatches alike."""
    return sorted((fp for fp in fps if fingerprint_matches(fp, attrs)), key=lambda fp: fp.name)


@dataclass(frozen=True)
class RegexProblem:
    """An expression that does not compile: which rule field, where in the expression, and why."""

    field: str  # a MatchRules attribute name, e.g. "series_description"
    pattern: str
    position: int | None  # 0-based offset in the expression, when Python names one
    reason: str  # e.g. "missing ), unterminated subpattern"

    def describe(self) -> str:
        where = f" at position {self.position}" if self.position is not None else ""
        return f"{self.pattern!r} is not a valid regular expression: {self.reason}{where}"


def regex_problems(rules: MatchRules) -> list[RegexProblem]:
    """Every expression of `rules` that Python's `re` cannot compile."""
    problems = []
    for name in RULE_FIELDS:
        pattern = getattr(rules, name)
        try:
            compiled(pattern)
        except re.error as error:
            problems.append(RegexProblem(name, pattern, error.pos, error.msg))
    return problems
