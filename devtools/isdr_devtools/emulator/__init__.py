"""An InferenceServer emulator: both protocols, TLS with its own CA, and toy models.

Tests and the demo run it as a real HTTP(S) server process (`python -m isdr_devtools.emulator`, or
`isdr emulator`). What a task does is chosen by its model name (see behaviours.py): `toy` returns
real DICOM predictions derived from the input, other names fail, lose their output, answer 500,
or return hostile archives.
"""

from .config import EmulatorConfig

__all__ = ["EmulatorConfig"]
