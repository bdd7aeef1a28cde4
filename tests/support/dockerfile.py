"""A small Dockerfile parser: instructions (line continuations, comments), stages, ENV, COPY.

Used by the Dockerfile's unit tests and by the node agent (a container without `command` runs
the image's ENTRYPOINT).
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field


@dataclass
class Instruction:
    keyword: str
    value: str
    line: int

    @property
    def exec_form(self) -> list[str] | None:
        """The JSON array of an exec-form instruction (ENTRYPOINT ["isdr"]), else None."""
        text = self.value.strip()
        if not text.startswith("["):
            return None
        return json.loads(text)


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction | None:
        found = self.all(keyword)
        return found[-1] if found else None


def parse_dockerfile(text: str) -> list[Stage]:
    lines = text.splitlines()
    logical: list[tuple[int, str]] = []
    buffer, start = "", 0
    for number, raw in enumerate(lines, 1):
        stripped = raw.strip()
        if not buffer and (not stripped or stripped.startswith("#")):
            continue  # comments and parser directives (# syntax=...)
        if buffer and stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if not buffer:
            start = number
        if stripped.endswith("\\"):
            buffer += stripped[:-1].rstrip() + " "
            continue
        buffer += stripped
        logical.append((start, buffer))
        buffer = ""
    assert not buffer, "the Dockerfile ends inside a continued line"

    stages: list[Stage] = []
    for number, statement in logical:
        keyword, _, value = statement.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            words = value.split()
            words = [w for w in words if not w.startswith("--platform")]
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base=words[0], name=name))
            continue
        assert stages or keyword in ("ARG",), f"line {number}: {keyword} before the first FROM"
        if stages:
            stages[-1].instructions.append(Instruction(keyword, value.strip(), number))
    return stages


def env_assignments(stage: Stage) -> dict[str, str]:
    """ENV KEY=VALUE ... (and the legacy ENV KEY VALUE) of one stage, in order."""
    result: dict[str, str] = {}
    for instruction in stage.all("ENV"):
        words = shlex.split(instruction.value)
        if words and "=" not in words[0]:
            result[words[0]] = " ".join(words[1:])
            continue
        for word in words:
            key, _, value = word.partition("=")
            result[key] = value
    return result


def copy_sources(instruction: Instruction) -> tuple[list[str], str, dict[str, str]]:
    """(sources, destination, flags) of a COPY/ADD."""
    form = instruction.exec_form
    words = form if form is not None else shlex.split(instruction.value)
    flags = {}
    while words and words[0].startswith("--"):
        key, _, value = words.pop(0)[2:].partition("=")
        flags[key] = value
    return words[:-1], words[-1], flags
