"""Where the Kubernetes adapter's lines run, checked on the source (no import-linter: a few AST rules).

- Only the vocabulary (relay/kube/resources.py) reads or writes an object's `status` by key.
- The vocabulary is pure: no `kubernetes` client, no API calls; the API module is the only
  place that catches the client's exceptions.
- Layers depend one way: core <- adapters (relay.kube among them) <- drivers (isdr_operator)
  <- command line. The adapter never imports the operator; the operator never spells the
  contract with the Job's pod or the API's errors itself.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
VOCABULARY = ROOT / "relay" / "kube" / "resources.py"
API = ROOT / "relay" / "kube" / "api.py"
SOURCES = sorted([*(ROOT / "relay").rglob("*.py"), *(ROOT / "operator" / "isdr_operator").rglob("*.py")])


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def status_indexing(tree: ast.AST) -> list[int]:
    """Lines that index something by the key "status": x["status"], x.get("status"),
    x.setdefault("status", ...), x.pop("status")."""
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant) and node.slice.value == "status":
            lines.append(node.lineno)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr in ("get", "setdefault", "pop") and node.args
              and isinstance(node.args[0], ast.Constant) and node.args[0].value == "status"):
            lines.append(node.lineno)
    return lines


def imported_modules(tree: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def test_the_rule_finds_status_indexing_in_its_every_form():
    tree = ast.parse('a["status"]; b.get("status") or {}; c.setdefault("status", {}); d.pop("status", None)\n'
                     'labels = ["status"]; e.get("phase")')
    assert status_indexing(tree) == [1, 1, 1, 1]


def test_only_the_vocabulary_indexes_an_objects_status():
    offenders = {_rel(path): lines for path in SOURCES if path != VOCABULARY
                 if (lines := status_indexing(_tree(path)))}
    assert offenders == {}, "read and write `status` through relay.kube.resources"


def test_the_vocabulary_is_pure_no_kubernetes_client_no_api_module():
    imports = imported_modules(_tree(VOCABULARY))
    assert not {name for name in imports if name.split(".")[0] in ("kubernetes", "urllib3", "kopf", "requests")}
    assert "relay.kube.api" not in imports and "relay.kube.client" not in imports


def test_only_the_api_module_catches_the_clients_exceptions():
    catching = [_rel(path) for path in SOURCES if "ApiException" in path.read_text()]
    assert catching == [_rel(API)]


@pytest.mark.parametrize("path", [p for p in SOURCES if p.is_relative_to(ROOT / "relay")],
                         ids=_rel)
def test_the_relay_package_never_imports_the_operator_except_to_start_it(path):
    imports = imported_modules(_tree(path))
    if _rel(path) == "relay/cli.py":
        return  # the command line starts the operator (`isdr operator`)
    assert not {name for name in imports if name.split(".")[0] == "isdr_operator"}


def test_the_operator_keeps_no_second_api_wrapper_or_job_contract():
    for path in (ROOT / "operator" / "isdr_operator").rglob("*.py"):
        text = path.read_text()
        assert "_request_timeout" not in text, f"{_rel(path)} calls the client directly: use relay.kube.api"
        assert "ISDR_FINGERPRINT" not in text, f"{_rel(path)} spells the Job's environment: use relay.kube.job_contract"
        imports = imported_modules(_tree(path))
        assert not {name for name in imports if name.startswith("kubernetes.client.exceptions")}
