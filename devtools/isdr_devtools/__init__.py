"""ISDR's development tools: never part of the product image.

- `isdr_devtools.emulator`: an InferenceServer emulator (protocols v1 and v2) that behaves like
  the real releases, quirks included, for the tests and the demo.
- `isdr_devtools.synthetic`: synthetic DICOM series (no patient data) for tests, demo and
  benchmarks.
"""
