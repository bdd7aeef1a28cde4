"""The Dockerfile, checked as far as it can be without a Docker engine.

A small parser reads the instructions (line continuations, comments, stages); the checks are the
image's contract with the chart and the code: a non-root numeric user (the chart's runAsUser),
`isdr` as the entry point, the CRDs in the image and ISDR_CRDS_DIR pointing at them, pinned base
images. The build context is simulated from .dockerignore, and the builder stage's wheel is built
from exactly that context, so a file the build needs but the context leaves out is caught here.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]


def _load_build_context():
    """hack/image/build_context.py: the .dockerignore matcher the image build uses too."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("build_context", REPO / "hack" / "image" / "build_context.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build_context = _load_build_context()
from tests.support.dockerfile import Stage, copy_sources, env_assignments, parse_dockerfile  # noqa: E402
in_context = build_context.in_context
context_files = build_context.context_files
dockerignore_patterns = build_context.dockerignore_patterns
DOCKERFILE = REPO / "Dockerfile"
CHART = REPO / "charts" / "isdr"


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return parse_dockerfile(DOCKERFILE.read_text())


@pytest.fixture(scope="module")
def final(stages) -> Stage:
    return stages[-1]


def test_parser_reads_continuations_and_stages():
    text = "# syntax=docker/dockerfile:1\nFROM a:1 AS b\nRUN x \\\n  # note\n  && y\nFROM c:2\nENV A=1 \\\n    B=2\n"
    parsed = parse_dockerfile(text)
    assert [(s.base, s.name) for s in parsed] == [("a:1", "b"), ("c:2", None)]
    assert parsed[0].instructions[0].value == "x && y"
    assert env_assignments(parsed[1]) == {"A": "1", "B": "2"}


# --- the image's contract -------------------------------------------------------------------------


def test_base_images_are_python_3_11_slim_with_a_pinned_tag(stages):
    names = {s.name for s in stages if s.name}
    for stage in stages:
        if stage.base in names:
            continue  # FROM an earlier stage
        image, _, tag = stage.base.partition(":")
        assert image in ("python", "docker.io/library/python"), stage.base
        assert tag and tag != "latest", f"{stage.base}: pin a tag, never latest"
        assert re.fullmatch(r"3\.11(\.\d+)?-slim(-[a-z]+)?(@sha256:[0-9a-f]{64})?", tag), stage.base


def test_the_image_runs_as_a_numeric_non_root_user_that_the_chart_expects(final):
    user = final.last("USER")
    assert user is not None, "the final stage must set USER"
    uid, _, gid = user.value.partition(":")
    assert uid.isdigit() and int(uid) != 0, "USER must be numeric (runAsNonRoot can only verify a numeric uid)"
    # The chart sets no user id (OpenShift assigns one; elsewhere the image's numeric USER runs,
    # which runAsNonRoot can verify); its fsGroup is the image's group.
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert "runAsUser" not in values["podSecurityContext"] and values["podSecurityContext"]["runAsNonRoot"]
    if gid:
        assert values["podSecurityContext"]["fsGroup"] == int(gid)
    # the user is created in the image with that uid
    created = " ".join(i.value for i in final.all("RUN"))
    assert re.search(rf"useradd\b.*--uid {uid}\b", created)
    # nothing after USER switches back to root
    assert final.instructions.index(user) > max(final.instructions.index(i) for i in final.all("RUN"))


def test_entrypoint_is_the_isdr_command(final):
    entrypoint = final.last("ENTRYPOINT")
    assert entrypoint is not None and entrypoint.exec_form == ["isdr"]
    # the chart's containers pass only the subcommand
    for template in ("receiver.yaml", "operator.yaml"):
        text = (CHART / "templates" / template).read_text()
        assert "command:" not in text, f"{template} must not override the image's ENTRYPOINT"


def test_crds_are_in_the_image_and_isdr_crds_dir_points_at_them(final):
    from relay.fingerprints import schema

    env = env_assignments(final)
    crds_dir = env.get(schema.CRDS_DIR_ENV)
    assert crds_dir == "/opt/isdr/crds"
    copies = [copy_sources(i) for i in final.all("COPY")]
    assert any(sources == ["crds/"] and dest.rstrip("/") == crds_dir and "from" not in flags
               for sources, dest, flags in copies), copies
    assert (REPO / "crds" / schema.CRD_FILE_NAME).is_file()


def test_the_venv_is_on_path_and_the_console_script_is_installed_from_a_wheel(stages, final):
    builder = stages[0]
    assert builder.name and len(stages) >= 2, "a builder stage and a runtime stage"
    run = " ".join(i.value for i in builder.all("RUN"))
    assert re.search(r"pip wheel .*--no-deps .*\.", run), "the builder builds the project's wheel"
    assert re.search(r"pip install \S*/isdr-\*\.whl", run), "and installs that wheel"
    assert "[test]" not in run and ".[" not in run, "no extras (test dependencies) in the image"
    copied = [copy_sources(i) for i in final.all("COPY")]
    venvs = [dest for sources, dest, flags in copied if flags.get("from") == builder.name]
    assert venvs, "the runtime stage copies the venv from the builder"
    assert env_assignments(final)["PATH"].startswith(venvs[0].rstrip("/") + "/bin:")


def test_exposes_the_dicom_port_and_has_no_healthcheck(final):
    exposed = {word.split("/")[0] for i in final.all("EXPOSE") for word in i.value.split()}
    assert "11112" in exposed
    from relay.config import Settings

    assert Settings().scp_port == 11112
    assert not final.all("HEALTHCHECK"), "Kubernetes probes the port; no HEALTHCHECK"


def test_no_add_and_no_secrets_baked_in(stages):
    for stage in stages:
        assert not stage.all("ADD"), "use COPY (ADD fetches URLs and unpacks archives)"
        for key in env_assignments(stage):
            assert not re.search(r"SECRET|PASSWORD|TOKEN|ACCESS_KEY", key), key


# --- the build context ----------------------------------------------------------------------------


def test_dockerignore_matcher():
    patterns = [(True, re.compile(r"[^/]*\Z")), (False, re.compile(r"relay\Z")),
                (True, re.compile(r"(?:.*/)?__pycache__\Z"))]
    assert in_context("relay/cli.py", patterns)
    assert not in_context("relay/__pycache__/cli.cpython-311.pyc", patterns)
    assert not in_context("tests/unit/test_x.py", patterns)
    assert not in_context("isdr-data/series/1.2/1.2/1.dcm", patterns)


def packaged_top_level_packages() -> list[str]:
    """Folders (relative to the repository) of the top-level packages pyproject.toml packages:
    setuptools' find looks in every `where` folder (".", "operator") for the `include` names."""
    find = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    found = []
    for where in find.get("where", ["."]):
        root = (REPO / where).resolve()
        for folder in sorted(root.iterdir()):
            if not (folder / "__init__.py").is_file():
                continue
            if any(re.fullmatch(re.escape(p.rstrip("*").rstrip(".")) + r".*", folder.name) for p in find["include"]):
                found.append(folder.relative_to(REPO).as_posix())
    return found


def test_every_packaged_package_is_found_in_its_where_folder():
    assert {"relay", "operator/isdr_operator"} <= set(packaged_top_level_packages())


def test_the_build_context_holds_what_the_build_needs_and_nothing_else():
    files = context_files()
    tops = {f.split("/")[0] for f in files}
    # what the Dockerfile copies and pyproject.toml packages
    assert {"pyproject.toml", "README.md", "crds", "relay"} <= tops
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert project["project"]["readme"] in files
    for package in packaged_top_level_packages():
        assert f"{package}/__init__.py" in files, f"{package}/ is packaged but not in .dockerignore's allow-list"
    # never the test suite, the venv, git, caches or local data
    assert not tops & {"tests", ".venv", ".git", "isdr-data", "demo-data", "benchmark-data", "charts", "docs"}
    assert not [f for f in files if "__pycache__" in f or f.endswith(".pyc")]


def test_every_copy_source_is_in_the_context(stages):
    files = context_files()
    for stage in stages:
        for instruction in stage.all("COPY"):
            sources, _, flags = copy_sources(instruction)
            if "from" in flags:
                continue
            for source in sources:
                source = source.rstrip("/")
                if source == ".":
                    continue
                assert any(f == source or f.startswith(source + "/") for f in files), \
                    f"line {instruction.line}: COPY {source} is not in the build context"


def test_the_builder_stage_builds_the_wheel_from_the_context(tmp_path):
    """The builder's `pip wheel --no-deps .`, run on a copy of exactly the build context."""
    context = tmp_path / "context"
    for relative in context_files():
        target = context / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes((REPO / relative).read_bytes())
    dist = tmp_path / "dist"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(dist), "."],
        cwd=context, capture_output=True, text=True, timeout=240, check=False,
    )
    if result.returncode != 0 and "Could not find a version that satisfies" in result.stderr:
        from tests.support.processes import missing

        missing("PyPI (pip needs setuptools to build the wheel)")
    assert result.returncode == 0, result.stderr
    (wheel,) = dist.glob("isdr-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        assert "isdr = relay.cli:main" in archive.read(entry_points).decode()
    assert "relay/cli.py" in names
    assert "isdr_operator/command.py" in names, "the operator's package must be in the wheel (isdr operator)"
    assert not [n for n in names if n.startswith("isdr_devtools/")], "the development tools stay out"
    assert not [n for n in names if n.startswith("tests/")]
