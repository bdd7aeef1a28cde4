"""The product image, built from the unchanged Dockerfile and run without a Docker engine.

hack/image/build.sh makes the base image (Debian's python3.11 by mmdebstrap, tagged under the
Dockerfile's FROM name) and builds the Dockerfile with buildah; both are cached, so a warm
session pays well under a second. Containers run with `buildah from` + `buildah run`, with the
image's own entry point, user, environment and working directory, in buildah's chroot isolation:
the machines here (and CI) have hybrid cgroups, which crun, buildah's OCI runtime, refuses, while
the chroot isolation needs no cgroups and still runs the command in its own mount, PID, IPC and
UTS namespaces on the image's root file system as the image's user.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.processes import missing

REPO_ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO_ROOT / "hack" / "image" / "build.sh"


@dataclass
class ImageConfig:
    entrypoint: list[str]
    cmd: list[str]
    user: str
    env: dict[str, str]
    working_dir: str
    labels: dict[str, str]


class ProductImage:
    """The built image in buildah's cache, and a way to run commands in it."""

    def __init__(self, name: str, storage: list[str]):
        self.name = name
        self.storage = storage

    def buildah(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run(["buildah", *self.storage, *args], capture_output=True, text=True,
                                timeout=timeout, check=False)
        if check and result.returncode != 0:
            raise AssertionError(f"buildah {' '.join(args)} exited {result.returncode}:\n{result.stderr}")
        return result

    def config(self) -> ImageConfig:
        raw = json.loads(self.buildah("inspect", "--type", "image", self.name).stdout)["OCIv1"]["config"]
        env = dict(item.partition("=")[::2] for item in raw.get("Env") or [])
        return ImageConfig(entrypoint=raw.get("Entrypoint") or [], cmd=raw.get("Cmd") or [],
                           user=raw.get("User") or "", env=env, working_dir=raw.get("WorkingDir") or "",
                           labels=raw.get("Labels") or {})

    def container(self) -> "Container":
        name = self.buildah("from", "--pull-never", "--quiet", self.name).stdout.strip()
        return Container(self, name)


class Container:
    """A working container of the image (`buildah from`); runs commands the way the image does."""

    def __init__(self, image: ProductImage, name: str):
        self.image = image
        self.name = name
        self.config = image.config()

    def run(self, *args: str, user: str | None = None, volumes: dict[Path, str] | None = None,
            entrypoint: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        """The image's ENTRYPOINT followed by `args` (as a pod without `command` runs it), as the
        image's USER unless `user` is given; stdout and stderr together in .stdout."""
        argv = [*(self.config.entrypoint if entrypoint else []), *args]
        options = ["--isolation", "chroot", "--user", user or self.config.user or "0:0"]
        if self.config.working_dir:
            options += ["--workingdir", self.config.working_dir]
        for local, inside in (volumes or {}).items():
            options += ["--volume", f"{local}:{inside}:ro"]
        return subprocess.run(["buildah", *self.image.storage, "run", *options, self.name, "--", *argv],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout,
                              check=False)

    def remove(self) -> None:
        self.image.buildah("rm", self.name, check=False)


def build_product_image() -> ProductImage:
    """Build (or find in the cache) the image; a missing buildah skips, or fails under CI."""
    if shutil.which("buildah") is None or shutil.which("mmdebstrap") is None:
        missing("buildah and mmdebstrap (Debian packages; scripts/install-system-deps.sh installs them)")
    result = subprocess.run(["bash", str(BUILD_SCRIPT)], capture_output=True, text=True, timeout=1800,
                            check=False)
    if result.returncode != 0:
        raise AssertionError(f"hack/image/build.sh exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    name = result.stdout.strip().splitlines()[-1]
    storage = subprocess.run(["bash", str(BUILD_SCRIPT), "--print-storage"], capture_output=True, text=True,
                             check=True).stdout.split()
    return ProductImage(name, storage)


@pytest.fixture(scope="session")
def product_image() -> ProductImage:
    return build_product_image()


@pytest.fixture(scope="session")
def image_container(product_image):
    """One working container for the session's read-only checks (vfs copies the whole image)."""
    container = product_image.container()
    yield container
    container.remove()
