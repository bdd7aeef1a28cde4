"""Every object the emulator's models produce passes dicom3tools' `dciodvfy` without errors.

A treatment-planning system's acceptance test would refuse an RTSTRUCT that dciodvfy faults
(issue 10: the toy model's once lacked the Frame of Reference module), and the relay's delivery
is tested with these objects, so they must be what a real model would send.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pydicom
import pytest

from isdr_devtools.emulator.models import group_series, predict
from isdr_devtools.synthetic import write_ct_series, write_small_instances
from tests.support.processes import require_binary


def dciodvfy(path: Path) -> list[str]:
    """dciodvfy's findings for one file (its first line, the IOD it recognised, is left out)."""
    binary = require_binary("dciodvfy")
    result = subprocess.run([binary, "-new", str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (result.stdout + result.stderr).splitlines() if " - " in line]


def predictions_for(files: list[Path], folder: Path) -> list[Path]:
    series = group_series(pydicom.dcmread(path, stop_before_pixels=True) for path in files)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for prediction in predict(series, "toy"):
        path = folder / Path(prediction.name).name
        path.write_bytes(prediction.data)
        written.append(path)
    return written


@pytest.mark.parametrize("kind", ["CT", "MR", "SC"])
def test_the_toy_models_predictions_pass_dciodvfy_without_errors(tmp_path, kind):
    if kind == "CT":
        inputs = write_ct_series(tmp_path / "in", count=3, rows=32, cols=32)
    else:
        inputs = write_small_instances(tmp_path / "in", count=3, kind=kind)
    expected_class = "RT Structure Set Storage" if kind != "SC" else "Secondary Capture Image Storage"

    (output,) = predictions_for(inputs, tmp_path / "out")

    assert pydicom.dcmread(output).SOPClassUID.name == expected_class
    findings = dciodvfy(output)
    assert [line for line in findings if line.startswith("Error")] == []
    print(f"\n{kind} -> {expected_class}: dciodvfy {findings or 'clean'}")
