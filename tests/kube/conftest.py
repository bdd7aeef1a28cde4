"""Fixtures for the tests that need a real Kubernetes API (see tests/support/kube.py and
docs/development-kubernetes.md). Every test module here is marked `kube`."""

from tests.support.kube import kube_cluster, kube_namespace, node_agent, report_kept_dirs  # noqa: F401


def pytest_terminal_summary(terminalreporter):
    report_kept_dirs(terminalreporter)
