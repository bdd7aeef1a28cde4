"""The chart's metrics: ports, metrics Services, ServiceMonitor, PrometheusRule and dashboard.

Rendered with the pinned `helm` (no cluster needed). The alert rules are checked by Prometheus's
own `promtool`: their syntax (`check rules`) and what they do on given series (`test rules`).
"""

from __future__ import annotations

import json
import re
import subprocess

import pytest
import yaml

from relay import metrics
from tests.kube.test_chart import CHART, container, one, render, run_helm
from tests.support.prometheus import require_promtool

RULE_VALUES = ("metrics.prometheusRule.enabled=true",)
ALERTS = {"IsdrReceiverDown", "IsdrOperatorDown", "IsdrNoActiveOperator", "IsdrStorageFull", "IsdrStorageLow", "IsdrInstancesRefused",
          "IsdrTasksFailing", "IsdrInferenceServerErrors", "IsdrDeliveryErrors", "IsdrPossibleDuplicateSubmit",
          "IsdrAssociationsRejected"}


def ports(c: dict) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in c.get("ports", [])}


def selects(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_receiver_and_operator_serve_metrics_on_the_configured_port_behind_headless_services():
    docs = render("metrics.port=9300")
    assert one(docs, "ConfigMap")["data"]["METRICS_PORT"] == "9300"
    for component in ("receiver", "operator"):
        deployment = one(docs, "Deployment", f"isdr-{component}")
        assert ports(container(deployment))["metrics"] == 9300
        service = one(docs, "Service", f"isdr-{component}-metrics")
        assert service["spec"]["clusterIP"] == "None"
        assert service["spec"]["ports"] == [{"name": "metrics", "port": 9300, "targetPort": "metrics",
                                             "protocol": "TCP"}]
        pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert selects(service["spec"]["selector"], pod_labels)
        other = "operator" if component == "receiver" else "receiver"
        assert not selects(service["spec"]["selector"],
                           one(docs, "Deployment", f"isdr-{other}")["spec"]["template"]["metadata"]["labels"])
    # The DICOM Service (possibly a LoadBalancer at the hospital's network) never carries metrics.
    assert [p["name"] for p in one(docs, "Service", "isdr-receiver")["spec"]["ports"]] == ["dicom"]
    kinds = {d["kind"] for d in docs}
    assert not kinds & {"ServiceMonitor", "PrometheusRule"}, "prometheus-operator objects are opt-in"
    assert not [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-dashboard")]


def test_metrics_disabled_turns_the_endpoint_off_and_removes_ports_and_services():
    docs = render("metrics.enabled=false")
    assert one(docs, "ConfigMap")["data"]["METRICS_PORT"] == "0"
    for component in ("receiver", "operator"):
        assert "metrics" not in ports(container(one(docs, "Deployment", f"isdr-{component}")))
    assert not [d for d in docs if d["kind"] == "Service" and d["metadata"]["name"].endswith("-metrics")]


def test_the_service_monitor_selects_both_metrics_services_and_nothing_else():
    docs = render("metrics.serviceMonitor.enabled=true", "metrics.serviceMonitor.labels.release=prom",
                  "metrics.serviceMonitor.interval=15s")
    monitor = one(docs, "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "prom"
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["isdr-ns"]}
    assert monitor["spec"]["endpoints"] == [{"port": "metrics", "path": "/metrics", "interval": "15s",
                                             "scrapeTimeout": "10s"}]
    selected = {d["metadata"]["name"] for d in docs if d["kind"] == "Service"
                and selects(monitor["spec"]["selector"]["matchLabels"], d["metadata"]["labels"])}
    assert selected == {"isdr-receiver-metrics", "isdr-operator-metrics"}


@pytest.mark.parametrize("sets, message", [
    (("config.METRICS_PORT=9999",), "config.METRICS_PORT is set by the chart"),
    (("metrics.port=8181", "operator.healthPort=8181"), "metrics.port must differ from operator.healthPort"),
    (("metrics.enabled=false", "metrics.serviceMonitor.enabled=true"), "serviceMonitor.enabled needs metrics.enabled"),
    (("metrics.port=0",), "/metrics/port"),
    (("metrics.serviceMonitor.interval=30",), "/metrics/serviceMonitor/interval"),
    (("metrics.prometheusRule.disabled.NoSuchAlert=true",), "NoSuchAlert"),
])
def test_invalid_metrics_values_are_refused(sets, message):
    args = ["template", "isdr", str(CHART)]
    for item in sets:
        args += ["--set", item]
    result = run_helm(*args, check=False)
    assert result.returncode != 0 and message in result.stderr, result.stderr


def rule_groups(*sets: str, namespace: str = "isdr-ns") -> dict:
    return one(render(*RULE_VALUES, *sets, namespace=namespace), "PrometheusRule")["spec"]


def alerts_of(spec: dict) -> dict[str, dict]:
    return {rule["alert"]: rule for group in spec["groups"] for rule in group["rules"]}


def test_the_prometheus_rule_has_every_alert_with_a_severity_and_passes_promtool(tmp_path):
    promtool = require_promtool()
    spec = rule_groups("metrics.prometheusRule.alertLabels.team=radiology-it")
    rules = alerts_of(spec)
    assert set(rules) == ALERTS
    for name, rule in rules.items():
        assert rule["labels"]["severity"] in ("critical", "warning", "info"), name
        assert rule["labels"]["team"] == "radiology-it"
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name
        assert 'namespace="isdr-ns"' in rule["expr"], f"{name} must only see its own release's namespace"
        for metric in re.findall(r"\b(isdr_[a-z_]+)", rule["expr"]):
            assert metric in exposed_metric_names(), f"{name} uses {metric}, which the relay does not expose"
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump(spec))
    checked = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True)
    assert checked.returncode == 0 and f"{len(ALERTS)} rules found" in checked.stdout, checked.stdout + checked.stderr


def test_alerts_can_be_left_out_by_name():
    assert set(alerts_of(rule_groups("metrics.prometheusRule.disabled.IsdrAssociationsRejected=true"))) == (
        ALERTS - {"IsdrAssociationsRejected"})


# What the alerts do, on series Prometheus's own rule unit tests feed them (`promtool test rules`).
RECEIVER = {"namespace": "isdr-ns", "service": "isdr-receiver-metrics", "pod": "r-1", "job": "isdr-receiver-metrics"}
OPERATOR = {"namespace": "isdr-ns", "service": "isdr-operator-metrics", "pod": "o-1", "job": "isdr-operator-metrics"}


def series(name: str, target: dict, values: str, **labels) -> dict:
    selector = ", ".join(f'{k}="{v}"' for k, v in {**target, **labels}.items())
    return {"series": f"{name}{{{selector}}}", "values": values}


def alert_tests(rules: dict[str, dict]) -> list[dict]:
    def firing(name: str, labels: dict, value: str = "") -> dict:
        """The alert as it must fire: the rule's labels and its annotations filled in."""
        def fill(text: str) -> str:
            text = re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda m: labels[m.group(1)], text)
            return re.sub(r"\{\{ \$value[^}]*\}\}", value, text)

        return {"exp_labels": {**rules[name]["labels"], **labels},
                "exp_annotations": {k: fill(v) for k, v in rules[name]["annotations"].items()}}

    def at(time: str, name: str, *alerts: dict) -> dict:
        return {"eval_time": time, "alertname": name, "exp_alerts": list(alerts)}

    ns = {"namespace": "isdr-ns"}
    return [
        {   # A healthy relay: both targets up, space to spare, every task succeeded: no alert at all.
            "interval": "1m",
            "input_series": [
                series("up", RECEIVER, "1x120"),
                series("up", OPERATOR, "1x120"),
                series("isdr_storage_free_bytes", RECEIVER, "5e9x120"),
                series("isdr_storage_reserve_bytes", RECEIVER, "2.5e8x120"),
                series("isdr_tasks_finished_total", OPERATOR, "0+1x120", fingerprint="ct", outcome="succeeded"),
                series("isdr_tasks_finished_total", OPERATOR, "0x120", fingerprint="ct", outcome="failed"),
                series("isdr_possible_duplicate_submits_total", OPERATOR, "0x120"),
                series("isdr_operator_active", OPERATOR, "1x120"),
            ],
            "alert_rule_test": [at("100m", name) for name in sorted(ALERTS)],
        },
        {   # The operator is gone, the disk fills up, a first refusal and a first failed task appear.
            "interval": "1m",
            "input_series": [
                series("up", RECEIVER, "1x60"),
                series("isdr_storage_free_bytes", RECEIVER, "4e8-1e7x60"),  # 400 MB, 10 MB less a minute
                series("isdr_storage_reserve_bytes", RECEIVER, "2.5e8x60"),  # twice: 500 MB
                series("isdr_instances_refused_total", RECEIVER, "_x25 1x35", status="A700"),
                series("isdr_tasks_finished_total", OPERATOR, "_x20 1x40", fingerprint="ct", outcome="failed"),
            ],
            "alert_rule_test": [
                at("30m", "IsdrOperatorDown", firing("IsdrOperatorDown", {**ns, "service": "isdr-operator-metrics"})),
                at("30m", "IsdrReceiverDown"),
                at("10m", "IsdrStorageLow"),
                at("16m", "IsdrStorageLow", firing("IsdrStorageLow", RECEIVER, "228.9Mi")),
                at("16m", "IsdrStorageFull"),  # at or below the reserve since 15m: pending for 2m
                at("18m", "IsdrStorageFull", firing("IsdrStorageFull", RECEIVER, "209.8Mi")),
                at("24m", "IsdrInstancesRefused"),
                at("26m", "IsdrInstancesRefused", firing("IsdrInstancesRefused", {**ns, "status": "A700"})),
                at("45m", "IsdrInstancesRefused"),  # nothing new for 10 minutes
                at("21m", "IsdrTasksFailing", firing("IsdrTasksFailing", {**ns, "fingerprint": "ct"}, "1")),
            ],
        },
        {   # Two operators, both standing by: nobody dispatches. One active of two is fine.
            "interval": "1m",
            "input_series": [
                series("isdr_operator_active", OPERATOR, "0x30 1x30"),
                series("isdr_operator_active", {**OPERATOR, "pod": "o-2"}, "0x60"),
            ],
            "alert_rule_test": [
                at("5m", "IsdrNoActiveOperator"),
                at("20m", "IsdrNoActiveOperator",
                   firing("IsdrNoActiveOperator", {**ns, "service": "isdr-operator-metrics"})),
                at("45m", "IsdrNoActiveOperator"),
            ],
        },
        {   # A receiver pod that cannot be scraped, while another one can, is not "no receiver".
            "interval": "1m",
            "input_series": [
                series("up", RECEIVER, "0x30"),
                series("up", {**RECEIVER, "pod": "r-2"}, "1x30"),
                series("up", OPERATOR, "0x30"),
            ],
            "alert_rule_test": [
                at("20m", "IsdrReceiverDown"),
                at("20m", "IsdrOperatorDown", firing("IsdrOperatorDown", {**ns, "service": "isdr-operator-metrics"})),
            ],
        },
        {   # Errors that go on for 15 minutes alert; a short burst does not.
            "interval": "1m",
            "input_series": [
                series("isdr_inference_errors_total", OPERATOR, "0+2x40", operation="submit"),
                series("isdr_delivery_errors_total", OPERATOR, "0+1x5 5x35", reason="unavailable"),
            ],
            "alert_rule_test": [
                at("10m", "IsdrInferenceServerErrors"),
                at("30m", "IsdrInferenceServerErrors",
                   firing("IsdrInferenceServerErrors", {**ns, "operation": "submit"})),
                at("30m", "IsdrDeliveryErrors"),
            ],
        },
    ]


def test_the_alerts_fire_when_they_should_and_stay_quiet_otherwise(tmp_path):
    promtool = require_promtool()
    spec = rule_groups()
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump(spec))
    tests = tmp_path / "tests.yaml"
    tests.write_text(yaml.safe_dump({"rule_files": [str(rules)], "evaluation_interval": "1m",
                                     "tests": alert_tests(alerts_of(spec))}, width=200))
    result = subprocess.run([promtool, "test", "rules", str(tests)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


DASHBOARD = CHART / "dashboards" / "isdr.json"


def exposed_metric_names() -> set[str]:
    """Every sample name the relay's endpoint can show (counters with _total, histograms' parts)."""
    names = {"isdr_series", "isdr_tasks", "isdr_storage_free_bytes", "isdr_storage_reserve_bytes",
             "isdr_operator_active"}
    for family in metrics.REGISTRY.collect():
        names.add(family.name)
        if family.type == "counter":
            names.add(f"{family.name}_total")
        if family.type == "histogram":
            names.update(f"{family.name}_{part}" for part in ("bucket", "count", "sum"))
        if family.type == "info":
            names.add(f"{family.name}_info")
    return names


def test_the_dashboard_config_map_carries_the_dashboard_file_for_grafanas_sidecar():
    docs = render("metrics.dashboard.enabled=true", "metrics.dashboard.annotations.grafana_folder=ISDR")
    (config_map,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "isdr-dashboard"]
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert config_map["metadata"]["annotations"] == {"grafana_folder": "ISDR"}
    assert json.loads(config_map["data"]["isdr.json"]) == json.loads(DASHBOARD.read_text())


def test_the_dashboard_only_queries_metrics_the_relay_exposes():
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 15
    used = {name for expr in exprs for name in re.findall(r"\b((?:isdr|process)_[a-z_]+)\b", expr)}
    assert used - exposed_metric_names() <= {"process_resident_memory_bytes", "process_cpu_seconds_total"}
    assert {"isdr_instances_received_total", "isdr_instances_refused_total", "isdr_series", "isdr_tasks",
            "isdr_tasks_finished_total", "isdr_task_duration_seconds_bucket", "isdr_inference_errors_total",
            "isdr_delivery_errors_total", "isdr_possible_duplicate_submits_total", "isdr_storage_free_bytes",
            "isdr_associations_rejected_total", "isdr_received_bytes_total"} <= used
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    assert all('namespace=~"$namespace"' in expr for expr in exprs)


def test_the_packaged_chart_carries_the_dashboard(tmp_path):
    run_helm("package", str(CHART), "--destination", str(tmp_path))
    (archive,) = tmp_path.glob("isdr-*.tgz")
    import tarfile

    with tarfile.open(archive) as tar:
        assert "isdr/dashboards/isdr.json" in tar.getnames()
