"""A real Prometheus server (Debian's `prometheus`) scraping the relay, for the metrics tests.

It runs as a process of its own with a generated prometheus.yml (a one-second scrape and rule
evaluation interval), its storage in the test's folder and a port chosen by the OS; the tests ask
it through its HTTP API what it scraped and which alerts are pending or firing.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import requests
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.support.processes import ManagedProcess, free_port, missing, wait_for_port, wait_until


def scrape(port: int) -> tuple[str, dict[tuple[str, tuple], float]]:
    """A process's /metrics on `port`: the text, and every sample by (name, sorted labels)."""
    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    return text, samples


def require_prometheus() -> str:
    path = shutil.which("prometheus")
    if path is None:
        missing("Prometheus (Debian package prometheus)")
    return path


def require_promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        missing("promtool (Debian package prometheus)")
    return path


class Prometheus:
    def __init__(self, folder: Path, targets: dict[str, tuple[int, dict[str, str]]],
                 rule_files: list[Path] = ()):
        """`targets`: job name -> (port on 127.0.0.1, extra target labels)."""
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.config = self.folder / "prometheus.yml"
        self.config.write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(path) for path in rule_files],
            "scrape_configs": [
                {"job_name": job, "static_configs": [{"targets": [f"127.0.0.1:{port}"], "labels": labels}]}
                for job, (port, labels) in targets.items()
            ],
        }))
        self.process: ManagedProcess | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "Prometheus":
        binary = require_prometheus()
        self.process = ManagedProcess(
            [binary, f"--config.file={self.config}", f"--storage.tsdb.path={self.folder / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--storage.tsdb.retention.time=1d"],
            self.folder / "prometheus.log")
        wait_for_port(self.port, timeout=60, process=self.process.popen)
        wait_until(lambda: requests.get(f"{self.url}/-/ready", timeout=5).ok, 60, "Prometheus to be ready")
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
            self.process = None

    def log(self) -> str:
        return self.process.output() if self.process else ""

    def _api(self, path: str, **params) -> dict:
        answer = requests.get(f"{self.url}/api/v1/{path}", params=params, timeout=10).json()
        assert answer["status"] == "success", answer
        return answer["data"]

    def query(self, expr: str) -> list[dict]:
        """The instant vector `expr` evaluates to now."""
        return self._api("query", query=expr)["result"]

    def value(self, expr: str) -> float | None:
        """The single value of `expr`, or None when it has no result."""
        result = self.query(expr)
        assert len(result) <= 1, f"{expr} has {len(result)} results: {result}"
        return float(result[0]["value"][1]) if result else None

    def wait_for_value(self, expr: str, expected: float, timeout: float = 60.0) -> float:
        return wait_until(lambda: self.value(expr) == expected, timeout,
                          f"{expr} == {expected} (now {self.value(expr)})") and expected

    def targets_up(self) -> bool:
        active = self._api("targets")["activeTargets"]
        return bool(active) and all(t["health"] == "up" for t in active)

    def alerts(self) -> list[dict]:
        """Alerts pending or firing, as Prometheus's rule evaluation sees them."""
        return self._api("alerts")["alerts"]
