"""A real Prometheus scrapes `isdr run`: what the relay did is what Prometheus stores and alerts on.

Two `isdr run` processes serve /metrics on METRICS_PORT: one receives series from dcmtk's storescu,
runs them through the InferenceServer emulator and delivers to dcmtk's storescp (and fails to reach
a second InferenceServer and a second destination on purpose); the other has a storage "full" for
its MIN_FREE_BYTES and refuses every instance. Debian's Prometheus scrapes both every second, with
the chart's own alert rules loaded, and the test asks it through its HTTP API. The dashboard's
queries run against the same Prometheus.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from isdr_devtools.synthetic import write_ct_series
from tests.support.dicom_peers import echoscu, storescu
from tests.support.fingerprints import manifest
from tests.support.processes import free_port, wait_until
from tests.support.prometheus import Prometheus, require_prometheus

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "charts" / "isdr" / "dashboards" / "isdr.json"
NAMESPACE = "isdr-test"
PATIENT = ("Zebra^Quentin", "PID-4711-XYZ")


def chart_rules(folder: Path) -> Path:
    """The chart's PrometheusRule, rendered for NAMESPACE, as a Prometheus rule file."""
    from tests.kube.test_chart import render

    docs = render("metrics.prometheusRule.enabled=true", namespace=NAMESPACE)
    (rule,) = [d for d in docs if d["kind"] == "PrometheusRule"]
    path = folder / "isdr-rules.yaml"
    path.write_text(yaml.safe_dump(rule["spec"]))
    return path


def labels_for(pod: str) -> dict[str, str]:
    """What the prometheus-operator's ServiceMonitor would add to the chart's receiver target."""
    return {"namespace": NAMESPACE, "service": "isdr-receiver-metrics", "pod": pod}


@pytest.fixture
def prometheus_started(tmp_path):
    require_prometheus()
    started = []

    def start(targets, rule_files=()):
        server = Prometheus(tmp_path / "prometheus", targets, rule_files).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def test_prometheus_scrapes_what_isdr_run_received_refused_ran_and_failed_to_reach(
        relays, emulator, pacs, prometheus_started, tmp_path):
    unreachable = free_port()  # nothing listens here: an InferenceServer and a PACS that are down
    relay = relays(env={"METRICS_PORT": str(free_port()), "DELETE_ON_POST": "false"}, name="relay")
    relay.add_manifest(manifest("ct", emulator.base_url, "toy", pacs))
    relay.add_manifest(manifest("mr-server-down", f"http://127.0.0.1:{unreachable}", "toy", pacs, modality="MR"))
    down_pacs = type("Pacs", (), {"port": unreachable, "ae_title": "DOWN"})
    relay.add_manifest(manifest("ot-pacs-down", emulator.base_url, "toy", down_pacs, modality="OT"))
    relay.start()
    full = relays(env={"METRICS_PORT": str(free_port()), "MIN_FREE_BYTES": str(10**18)}, name="full").start()
    prometheus = prometheus_started({
        "relay": (int(relay.env["METRICS_PORT"]), labels_for("relay-a")),
        "full": (int(full.env["METRICS_PORT"]), labels_for("relay-b")),
    }, [chart_rules(tmp_path)])
    wait_until(prometheus.targets_up, 60, f"both targets up\n{prometheus.log()[-2000:]}")

    ct = write_ct_series(tmp_path / "ct", count=5, rows=16, cols=16, patient_name=PATIENT[0], patient_id=PATIENT[1])
    assert storescu(relay.port, ct).returncode == 0
    assert storescu(relay.port, write_ct_series(tmp_path / "mr", count=2, rows=16, cols=16, modality="MR")
                    ).returncode == 0
    assert storescu(relay.port, write_ct_series(tmp_path / "ot", count=1, rows=16, cols=16, modality="OT")
                    ).returncode == 0
    assert echoscu(relay.port, called_ae="NOT-ISDR").returncode != 0
    for instance in write_ct_series(tmp_path / "refused", count=3, rows=16, cols=16):
        storescu(full.port, [instance])  # storescu halts at the first refusal: one association each
    pacs.wait_for_files(1)
    relay.wait_for_log(r"series \S+ succeeded")

    a, b = 'pod="relay-a"', 'pod="relay-b"'
    prometheus.wait_for_value(f"isdr_instances_received_total{{{a}}}", 8)
    stored = sum(p.stat().st_size for p in relay.stored_instances())
    assert prometheus.value(f"isdr_received_bytes_total{{{a}}}") == stored
    assert prometheus.value(f"isdr_associations_accepted_total{{{a}}}") == 3
    assert prometheus.value(f'isdr_associations_rejected_total{{{a}, reason="called_ae_title"}}') == 1
    assert prometheus.value(f'isdr_instances_refused_total{{{b}, status="A700"}}') == 3
    assert prometheus.value(f"isdr_instances_received_total{{{b}}}") == 0
    assert prometheus.value(f"sum(isdr_instances_refused_total{{{a}}})") is None  # none refused

    prometheus.wait_for_value(f'isdr_tasks_finished_total{{{a}, fingerprint="ct", outcome="succeeded"}}', 1)
    assert prometheus.value(f'isdr_tasks_started_total{{{a}, fingerprint="ct"}}') == 1
    assert prometheus.value(f'isdr_task_duration_seconds_count{{{a}, fingerprint="ct"}}') == 1
    assert 0 < prometheus.value(f'isdr_task_duration_seconds_sum{{{a}, fingerprint="ct"}}') < 60
    prometheus.wait_for_value(f'isdr_series{{{a}, phase="Succeeded"}}', 1)
    assert prometheus.value(f'isdr_series{{{a}, phase="Dispatched"}}') == 2  # MR and OT still trying
    assert prometheus.value(f'isdr_tasks{{{a}, phase="Succeeded"}}') == 1
    wait_until(lambda: prometheus.value(f'isdr_inference_errors_total{{{a}, operation="submit"}}'), 60,
               "the submits to the InferenceServer that is down")
    wait_until(lambda: prometheus.value(f'isdr_delivery_errors_total{{{a}, reason="unavailable"}}'), 60,
               "the deliveries to the PACS that is down")
    assert prometheus.value(f'isdr_tasks{{{a}, phase="Submitting"}}') == 1
    assert prometheus.value(f'isdr_tasks{{{a}, phase="Delivering"}}') == 1
    assert prometheus.value(f"isdr_storage_free_bytes{{{a}}}") > prometheus.value(f"isdr_storage_reserve_bytes{{{a}}}")
    assert prometheus.value(f"isdr_storage_free_bytes{{{b}}}") < prometheus.value(f"isdr_storage_reserve_bytes{{{b}}}")
    assert prometheus.value(f'isdr_build_info{{{a}}}') == 1
    assert prometheus.value(f"process_resident_memory_bytes{{{a}}}") > 0

    # No patient identifier reached Prometheus: not in a label, not in a value.
    everything = json.dumps(prometheus.query('{__name__=~"isdr_.*"}'))
    assert not any(text in everything for text in PATIENT)

    # The chart's alerts, evaluated by Prometheus on what it scraped.
    def alerts():
        return {(x["labels"]["alertname"], x["labels"].get("pod") or x["labels"].get("status")
                 or x["labels"].get("reason") or x["labels"].get("operation") or x["labels"].get("fingerprint"),
                 x["state"]) for x in prometheus.alerts()}

    expected = {
        ("IsdrStorageFull", "relay-b", "pending"),  # for 2m
        ("IsdrStorageLow", "relay-b", "pending"),  # for 15m
        ("IsdrInstancesRefused", "A700", "firing"),
        ("IsdrAssociationsRejected", "called_ae_title", "firing"),
        ("IsdrInferenceServerErrors", "submit", "pending"),  # for 15m
        ("IsdrDeliveryErrors", "unavailable", "pending"),  # for 15m
        ("IsdrOperatorDown", None, "pending"),  # no operator target at all here
    }
    found = wait_until(lambda: (now := alerts()) >= expected and now, 60,
                       f"the expected alerts (now {alerts()})")
    assert {name for name, *_ in found} == {name for name, *_ in expected}, found  # nothing else
    assert not [x for x in found if x[1] == "relay-a"]

    # Every query of the Grafana dashboard is valid PromQL over these metrics, and the main ones
    # show what happened.
    answers = {}
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"].replace("$namespace", ".*").replace("$__rate_interval", "1m")
            answers[(panel["title"], target["refId"])] = prometheus.query(expr)
    for title in ("Instances per second", "Series by phase", "Tasks finished per hour", "Free storage",
                  "Resident memory", "InferenceServer errors per minute", "Delivery errors per minute",
                  "Associations per minute"):
        assert answers[(title, "A")], f"dashboard panel {title!r} shows nothing"


def test_metrics_off_is_said_in_the_log(relays):
    relay = relays(env={"METRICS_PORT": "0"}).start()
    relay.wait_for_log("metrics off")
    assert "serving Prometheus metrics" not in relay.log()
