"""The image's build context as Docker and buildah see it: the files .dockerignore lets through.

    python3 hack/image/build_context.py            # lists the files
    python3 hack/image/build_context.py --digest   # one sha256 over the Dockerfile and the context

hack/image/build.sh labels the image with the digest and skips the build when the image already
has it; tests/unit/test_dockerfile.py checks the context with the same matcher. Standard library
only: it runs before any virtual environment exists.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# Never part of a context worth walking into (and the virtual environment is large).
SKIPPED_FOLDERS = {".git", ".venv", "__pycache__", ".pytest_cache"}


def dockerignore_patterns(dockerignore: Path = REPO / ".dockerignore") -> list[tuple[bool, re.Pattern]]:
    """(exclude?, regex) per .dockerignore line, in order (Docker: the last match wins)."""
    patterns = []
    for raw in dockerignore.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        exclude = not line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        regex = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex += "(?:.*/)?"
                i += 3
            elif pattern.startswith("**", i):
                regex += ".*"
                i += 2
            elif pattern[i] == "*":
                regex += "[^/]*"
                i += 1
            elif pattern[i] == "?":
                regex += "[^/]"
                i += 1
            else:
                regex += re.escape(pattern[i])
                i += 1
        patterns.append((exclude, re.compile(regex + r"\Z")))
    return patterns


def in_context(relative: str, patterns) -> bool:
    """Whether Docker sends the file: a pattern matches the path or one of its parent folders."""
    parts = relative.split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    included = True
    for exclude, regex in patterns:
        if any(regex.match(candidate) for candidate in candidates):
            included = not exclude
    return included


def context_files(repo: Path = REPO) -> list[str]:
    """The repository-relative paths of every file in the build context, sorted."""
    patterns = dockerignore_patterns(repo / ".dockerignore")
    result = []
    for folder, folders, files in os.walk(repo):
        folders[:] = [f for f in folders if f not in SKIPPED_FOLDERS]
        for name in files:
            relative = (Path(folder) / name).relative_to(repo).as_posix()
            if in_context(relative, patterns):
                result.append(relative)
    return sorted(result)


def context_digest(repo: Path = REPO) -> str:
    """sha256 over the Dockerfile, .dockerignore and every context file's path, mode and bytes."""
    digest = hashlib.sha256()
    for relative in ["Dockerfile", ".dockerignore", *context_files(repo)]:
        path = repo / relative
        digest.update(f"{relative}\0{os.stat(path).st_mode & 0o111:o}\0".encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


if __name__ == "__main__":
    if sys.argv[1:] == ["--digest"]:
        print(context_digest())
    elif not sys.argv[1:]:
        print("\n".join(context_files()))
    else:
        sys.exit("usage: build_context.py [--digest]")
