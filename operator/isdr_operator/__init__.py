"""The ISDR control plane: a kopf operator for Fingerprint and DicomSeries resources and Jobs.

Its import name is `isdr_operator`, not `operator`, which is a module of Python's standard library.
"""
