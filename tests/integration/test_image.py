"""The product image, built from the unchanged Dockerfile (hack/image/build.sh, buildah) and run
as the image runs: its ENTRYPOINT, its USER, its environment (tests/support/image.py).

What the Dockerfile tests (tests/unit/test_dockerfile.py) can only read, these run: every entry
point of the chart's pods starts, the example fingerprints check out, and the development tools
(the emulator, synthetic series) and their dependencies are not in the product.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.support.dockerfile import env_assignments, parse_dockerfile

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def dockerfile_final_stage():
    return parse_dockerfile((REPO / "Dockerfile").read_text())[-1]


def test_the_image_config_is_what_the_dockerfile_says(product_image, dockerfile_final_stage):
    config = product_image.config()
    assert config.entrypoint == dockerfile_final_stage.last("ENTRYPOINT").exec_form == ["isdr"]
    assert config.user == dockerfile_final_stage.last("USER").value == "10001:10001"
    assert config.env["ISDR_CRDS_DIR"] == env_assignments(dockerfile_final_stage)["ISDR_CRDS_DIR"]
    assert config.env["PATH"].startswith("/opt/isdr/venv/bin:")


@pytest.mark.parametrize("command", ["scp", "operator", "job", "run", "echo"])
def test_every_entry_point_starts_in_the_image_as_its_user(image_container, command):
    result = image_container.run(command, "--help")
    assert result.returncode == 0, result.stdout
    assert result.stdout.startswith(f"usage: isdr {command}"), result.stdout
    assert "Traceback" not in result.stdout


def test_the_image_runs_as_its_non_root_user(image_container):
    result = image_container.run("id", "-u", entrypoint=False)
    assert result.stdout.strip() == "10001", result.stdout


def test_the_example_fingerprints_check_out_in_the_image(image_container):
    result = image_container.run("fingerprint", "check", "/fingerprints",
                                 volumes={REPO / "examples" / "fingerprints": "/fingerprints"})
    assert result.returncode == 0, result.stdout
    examples = sorted(path for path in (REPO / "examples" / "fingerprints").iterdir()
                      if path.suffix in (".json", ".yaml", ".yml"))
    assert len(examples) >= 3  # series-level (original JSON, manifest) and study-level
    assert f"{len(examples)} fingerprint(s) ok, 0 problem(s)" in result.stdout


def test_the_crds_in_the_image_are_the_repository_crds(image_container):
    for crd in sorted((REPO / "crds").glob("*.yaml")):
        result = image_container.run("cat", f"/opt/isdr/crds/{crd.name}", entrypoint=False)
        assert result.returncode == 0, result.stdout
        assert yaml.safe_load(result.stdout) == yaml.safe_load(crd.read_text())


def test_the_image_carries_no_development_tools_and_no_cryptography(image_container):
    result = image_container.run("emulator", "--help")
    assert result.returncode == 2 and "development tool and is not installed here" in result.stdout
    probe = ("import importlib.util as u; "
             "print([m for m in ('isdr_devtools', 'cryptography', 'moto', 'pytest') if u.find_spec(m)])")
    result = image_container.run("python", "-c", probe, entrypoint=False)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stdout
    listed = image_container.run("pip", "list", "--format=freeze", entrypoint=False).stdout.lower()
    assert "isdr==" in listed and "isdr-devtools" not in listed and "cryptography" not in listed
