"""Tests for the Helm chart in helm/conveyour-cdc.

Helm itself comes from helm-python-sdk (Helm's Go library behind ctypes, no
helm binary); manifests are checked against the Kubernetes API schemas that
kubernetes-validate ships. The prometheus-operator resources (ServiceMonitor,
PrometheusRule) are custom resources with no schema there, so they are
checked structurally. The rendered config file is handed to the real
binary's `check --config-only`.

Run from the repository root, after `cargo build`:

    CONVEYOUR_CDC_BIN=target/debug/conveyour-cdc <venv>/bin/pytest -q tests/chart
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "conveyour-cdc"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
TELEMETRY_SOURCE = REPO / "src" / "telemetry.rs"

# A Kubernetes version kubernetes-validate ships schemas for, and that the
# chart's kubeVersion (>=1.25) admits.
KUBE_VERSION = "1.30.0"

SECRETS = {"appkey": "chart-test-appkey", "token": "chart-test-token", "pgpassword": "chart-test-pw"}
RELEASE = "cdc-test"
NAMESPACE = "apps"
METRICS_PORT = 9187

# Every metric the connector exports (without the conveyour_cdc_ prefix).
METRICS = {
    "changes_received_total",
    "identify_entries_acknowledged_total",
    "track_events_acknowledged_total",
    "requests_total",
    "request_duration_seconds",
    "retries_total",
    "backoff_seconds",
    "in_flight_requests",
    "buffered_actions",
    "received_lsn",
    "confirmed_lsn",
    "lag_bytes",
    "lag_seconds",
    "slot_retained_wal_bytes",
    "snapshot_rows_total",
    "snapshot_tables_remaining",
    "connected",
    "dead_letters_total",
    "outage",
    "dead_letters_stored",
    "concurrency_limit",
    "request_rtt_seconds",
    "commit_to_ack_seconds",
    "build_info",
}


def base_values(**overrides):
    values = {"secret": dict(SECRETS)}
    values.update(overrides)
    return values


def render(values: dict | None) -> dict[str, str]:
    """Template path -> rendered text, as `helm template` would produce."""
    with helm.Chart.load(str(CHART)) as chart:
        return chart.render(values or {}, name=RELEASE, namespace=NAMESPACE)


def manifests(rendered: dict[str, str]) -> list[dict]:
    docs = []
    for path, text in sorted(rendered.items()):
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                docs.append(doc)
    return docs


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict], kind: str) -> dict:
    found = by_kind(docs, kind)
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def load_values_file(path: Path) -> dict:
    return yaml.safe_load(path.read_text()) or {}


# Default values (plus the secrets they require), then every ci/ file as is.
CASES = [pytest.param(None, id="default")] + [pytest.param(p, id=p.stem) for p in CI_VALUES]


def case_values(path: Path | None) -> dict:
    return base_values() if path is None else load_values_file(path)


def test_there_is_a_ci_values_file_per_optional_part_and_one_with_everything():
    names = {p.name for p in CI_VALUES}
    for expected in [
        "servicemonitor-values.yaml",
        "prometheusrule-values.yaml",
        "grafana-dashboard-values.yaml",
        "existing-secret-values.yaml",
        "all-enabled-values.yaml",
    ]:
        assert expected in names
    everything = load_values_file(CHART / "ci" / "all-enabled-values.yaml")
    for part in ["serviceMonitor", "prometheusRule", "grafanaDashboard"]:
        assert everything[part]["enabled"] is True, part
    assert everything["existingSecret"]["name"]


# --- lint -------------------------------------------------------------------


@pytest.mark.parametrize("values_file", CASES)
def test_lint_is_clean(values_file):
    report = helm.lint(str(CHART), case_values(values_file), strict=True, namespace=NAMESPACE,
                       kube_version=f"v{KUBE_VERSION}")
    assert report["total_charts_linted"] == 1
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not report["errors"] and not problems, report


def test_lint_reports_a_broken_values_file():
    report = helm.lint(str(CHART), base_values(logFormat="xml"), strict=True)
    assert report["errors"] or any(m["severity"] >= 3 for m in report["messages"]), report


# --- render and validate ----------------------------------------------------


@pytest.mark.parametrize("values_file", CASES)
def test_every_manifest_is_valid_kubernetes(values_file):
    docs = manifests(render(case_values(values_file)))
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "ConfigMap", "Service"} <= kinds
    for doc in docs:
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # custom resources: checked structurally below
        try:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {e.message} at {list(e.path)}")
        assert doc["metadata"]["labels"]["app.kubernetes.io/instance"] == RELEASE
        assert doc["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "Helm"


def test_the_validator_catches_a_broken_manifest():
    deployment = one(manifests(render(base_values())), "Deployment")
    deployment["spec"]["replicas"] = "one"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBE_VERSION, strict=True)
    deployment["spec"]["replicas"] = 1
    deployment["spec"]["template"]["spec"]["containers"][0]["securityContxt"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBE_VERSION, strict=True)


@pytest.mark.parametrize("values_file", CASES)
def test_the_deployment_runs_one_locked_down_pod_with_probes(values_file):
    docs = manifests(render(case_values(values_file)))
    deployment = one(docs, "Deployment")
    spec = deployment["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"] == {"type": "Recreate"}

    pod = spec["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    psc = pod["securityContext"]
    assert psc["runAsNonRoot"] is True
    assert psc["runAsUser"] == 65532
    assert psc["seccompProfile"] == {"type": "RuntimeDefault"}

    [container] = pod["containers"]
    sc = container["securityContext"]
    assert sc["runAsNonRoot"] is True
    assert sc["runAsUser"] == 65532
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}

    assert container["args"][:3] == ["run", "--config", "/etc/conveyour-cdc/config.yaml"]
    assert container["args"][3] == "--log-format"
    assert container["ports"] == [{"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"}]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert container["resources"]["requests"] and container["resources"]["limits"]

    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/etc/conveyour-cdc"]["readOnly"] is True
    volumes = {v["name"]: v for v in pod["volumes"]}
    config_maps = {d["metadata"]["name"] for d in by_kind(docs, "ConfigMap") if "config.yaml" in d.get("data", {})}
    assert volumes["config"]["configMap"]["name"] in config_maps

    annotations = spec["template"]["metadata"]["annotations"]
    assert re.fullmatch(r"[0-9a-f]{64}", annotations["checksum/config"])
    assert re.fullmatch(r"[0-9a-f]{64}", annotations["checksum/secret"])
    assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()


def test_credentials_come_from_the_rendered_secret():
    docs = manifests(render(base_values()))
    secret = one(docs, "Secret")
    assert secret["stringData"] == {
        "CONVEYOUR_APPKEY": SECRETS["appkey"],
        "CONVEYOUR_TOKEN": SECRETS["token"],
        "PGPASSWORD": SECRETS["pgpassword"],
    }
    env = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["env"]
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in env if "valueFrom" in e}
    assert refs == {
        name: {"name": secret["metadata"]["name"], "key": name}
        for name in ["CONVEYOUR_APPKEY", "CONVEYOUR_TOKEN", "PGPASSWORD"]
    }
    # No credential is in plain sight in the Deployment or the ConfigMap.
    for kind in ["Deployment", "ConfigMap"]:
        text = json.dumps(one(docs, kind))
        for value in SECRETS.values():
            assert value not in text, kind


def test_an_existing_secret_is_used_with_its_own_key_names():
    docs = manifests(render(load_values_file(CHART / "ci" / "existing-secret-values.yaml")))
    assert not by_kind(docs, "Secret")
    env = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["env"]
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in env if "valueFrom" in e}
    assert refs == {
        "CONVEYOUR_APPKEY": {"name": "conveyour-cdc-credentials", "key": "appkey"},
        "CONVEYOUR_TOKEN": {"name": "conveyour-cdc-credentials", "key": "token"},
        "PGPASSWORD": {"name": "conveyour-cdc-credentials", "key": "password"},
    }


def test_existing_secret_and_inline_credentials_together_fail():
    values = base_values(existingSecret={"name": "mine"})
    with pytest.raises(helm.HelmRenderError, match="not both"):
        render(values)
    # One inline value is enough to be ambiguous.
    with pytest.raises(helm.HelmRenderError, match="not both"):
        render({"existingSecret": {"name": "mine"}, "secret": {"token": "t"}})


@pytest.mark.parametrize("missing", ["appkey", "token", "pgpassword"])
def test_each_inline_credential_is_required_with_a_helpful_message(missing):
    secrets = dict(SECRETS)
    del secrets[missing]
    with pytest.raises(helm.HelmRenderError, match=rf"secret\.{missing} is required.*existingSecret"):
        render({"secret": secrets})


def test_checksums_follow_the_config_and_the_secret():
    def annotations(values):
        deployment = one(manifests(render(values)), "Deployment")
        return deployment["spec"]["template"]["metadata"]["annotations"]

    base = annotations(base_values())
    assert annotations(base_values()) == base
    other_mapping = base_values(mapping=[{"table": "public.people", "identify": {"id": "email"}}])
    changed = annotations(other_mapping)
    assert changed["checksum/config"] != base["checksum/config"]
    assert changed["checksum/secret"] == base["checksum/secret"]
    rotated = annotations({"secret": {**SECRETS, "token": "rotated"}})
    assert rotated["checksum/secret"] != base["checksum/secret"]
    assert rotated["checksum/config"] == base["checksum/config"]


def test_the_service_exposes_the_metrics_port():
    docs = manifests(render(base_values(service={"port": 9999})))
    service = one(docs, "Service")
    assert service["spec"]["ports"] == [
        {"name": "metrics", "port": 9999, "targetPort": "metrics", "protocol": "TCP"}
    ]
    labels = one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()


def test_the_service_account_does_not_mount_a_token():
    account = one(manifests(render(base_values())), "ServiceAccount")
    assert account["automountServiceAccountToken"] is False
    pod = one(manifests(render(base_values())), "Deployment")["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == account["metadata"]["name"]


def test_optional_parts_are_off_by_default():
    kinds = {d["kind"] for d in manifests(render(base_values()))}
    assert kinds == {"Deployment", "ConfigMap", "Service", "Secret", "ServiceAccount"}


def test_notes_explain_how_to_check_slot_lag():
    notes = render(base_values())["conveyour-cdc/templates/NOTES.txt"]
    assert "pg_replication_slots" in notes
    assert "confirmed_flush_lsn" in notes
    assert "WHERE slot_name = 'conveyour_cdc'" in notes
    assert "conveyour_cdc_lag_bytes" in notes
    assert "conveyour-cdc status --config /etc/conveyour-cdc/config.yaml" in notes


# --- values.schema.json -----------------------------------------------------


@pytest.mark.parametrize(
    "values, complaint",
    [
        (base_values(mapping=[]), "mapping"),
        (base_values(mapping=[{"table": "public.t"}]), "oneOf"),
        (
            base_values(mapping=[{"table": "t", "identify": {"id": "a"}, "track": {"id": "a", "event": "e"}}]),
            "oneOf",
        ),
        (base_values(mapping=[{"table": "t", "track": {"id": "a"}}]), "event"),
        (base_values(mapping=[{"table": "t", "identify": {"id": "a", "trait": {}}}]), "trait"),
        (
            base_values(
                mapping=[{"table": "t", "track": {"id": "a", "event": "e",
                                                  "properties": {f"p{i}": "c" for i in range(16)}}}]
            ),
            "properties",
        ),
        (base_values(config={"postgres": {"url": "postgres://cdc:hunter2@db/app"},
                             "conveyour": {"url": "https://acme.conveyour.com"}}), "url"),
        (base_values(config={"postgres": {"url": "postgres://cdc@db/app"},
                             "conveyour": {"url": "https://acme.conveyour.com", "token": "x"}}), "token"),
        (base_values(config={"postgres": {"url": "postgres://cdc@db/app", "slot": "Bad-Slot"},
                             "conveyour": {"url": "https://acme.conveyour.com"}}), "slot"),
        (base_values(mapping=[{"table": "t", "identify": {"id": "a"}, "operations": ["upsert"]}]), "operations"),
        (base_values(mapping=[{"table": "t", "identify": {"id": {"from": "u", "key": "k"}}}]), "id"),
        (base_values(mapping=[{"table": "t", "identify": {"id": "a"}, "snapshot": "sometimes"}]), "snapshot"),
        (base_values(replicas=2), "replicas"),
        (base_values(logFormat="xml"), "logFormat"),
    ],
    ids=[
        "empty-mapping", "neither-identify-nor-track", "both-identify-and-track", "track-without-event",
        "unknown-mapping-key", "too-many-properties", "bad-operation", "lookup-without-column",
        "bad-snapshot-policy", "password-in-url", "token-in-config",
        "bad-slot-name", "replicas-is-not-a-knob", "bad-log-format",
    ],
)
def test_the_schema_rejects_bad_values(values, complaint):
    with pytest.raises(helm.HelmValuesError) as info:
        render(values)
    assert complaint in str(info.value)


# --- the config file the binary reads ----------------------------------------


def binary() -> Path:
    """The binary to check: CONVEYOUR_CDC_BIN when set, else the debug build
    in CARGO_TARGET_DIR when set, else in the repository's target/ (relative
    paths are taken from the repository root)."""
    if os.environ.get("CONVEYOUR_CDC_BIN"):
        path = Path(os.environ["CONVEYOUR_CDC_BIN"])
    else:
        path = Path(os.environ.get("CARGO_TARGET_DIR") or "target") / "debug" / "conveyour-cdc"
    if not path.is_absolute():
        path = REPO / path
    if not path.is_file():
        pytest.fail(f"{path} does not exist: run `cargo build` first or set CONVEYOUR_CDC_BIN")
    return path


def check_config_only(config_text: str, tmp_path: Path) -> subprocess.CompletedProcess:
    config = tmp_path / "config.yaml"
    config.write_text(config_text)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "CONVEYOUR_APPKEY": SECRETS["appkey"],
        "CONVEYOUR_TOKEN": SECRETS["token"],
        "PGPASSWORD": SECRETS["pgpassword"],
    }
    return subprocess.run(
        [str(binary()), "check", "--config", str(config), "--config-only"],
        env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60,
    )


def rendered_config(values: dict) -> str:
    config_map = next(
        d for d in by_kind(manifests(render(values)), "ConfigMap") if "config.yaml" in d.get("data", {})
    )
    return config_map["data"]["config.yaml"]


@pytest.mark.parametrize("values_file", CASES)
def test_the_rendered_config_is_accepted_by_the_binary(values_file, tmp_path):
    values = case_values(values_file)
    text = rendered_config(values)
    config = yaml.safe_load(text)
    expected_keys = {"postgres", "conveyour", "tables", "metrics"}
    if values.get("config", {}).get("sync"):
        expected_keys.add("sync")
        assert config["sync"] == values["config"]["sync"]
    if values.get("config", {}).get("dead_letters"):
        expected_keys.add("dead_letters")
        assert config["dead_letters"] == values["config"]["dead_letters"]
    assert set(config) == expected_keys
    assert config["metrics"] == {"listen": f"0.0.0.0:{METRICS_PORT}"}
    assert "appkey" not in config["conveyour"] and "token" not in config["conveyour"]
    expected_mapping = values.get("mapping") or yaml.safe_load((CHART / "values.yaml").read_text())["mapping"]
    assert config["tables"] == expected_mapping
    result = check_config_only(text, tmp_path)
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"


def test_the_binary_check_would_catch_a_bad_config(tmp_path):
    config = yaml.safe_load(rendered_config(base_values()))
    config["tables"][0]["identify"]["idd"] = config["tables"][0]["identify"].pop("id")
    result = check_config_only(yaml.safe_dump(config), tmp_path)
    assert result.returncode != 0, result.stdout


# --- prometheus-operator resources and the dashboard -------------------------


def metric_names(text: str) -> set[str]:
    return set(re.findall(r"conveyour_cdc_([a-z_]+)", text))


def known_metric(name: str) -> bool:
    for suffix in ("_bucket", "_sum", "_count"):
        if name.endswith(suffix) and name[: -len(suffix)] in METRICS:
            return True
    return name in METRICS


def test_the_metric_names_the_chart_uses_exist_in_the_connector():
    source = TELEMETRY_SOURCE.read_text()
    for name in METRICS:
        assert f'"{name}"' in source, f"{name} is not declared in src/telemetry.rs"


def test_the_service_monitor_scrapes_the_service():
    docs = manifests(render(load_values_file(CHART / "ci" / "servicemonitor-values.yaml")))
    monitor = one(docs, "ServiceMonitor")
    service = one(docs, "Service")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    [endpoint] = monitor["spec"]["endpoints"]
    assert endpoint["port"] == service["spec"]["ports"][0]["name"]
    assert endpoint["path"] == "/metrics"
    assert endpoint["interval"] == "15s"
    assert endpoint["metricRelabelings"][0]["action"] == "keep"


def rules_of(values: dict) -> list[dict]:
    rule = one(manifests(render(values)), "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["metadata"]["namespace"] == NAMESPACE
    [group] = rule["spec"]["groups"]
    assert group["name"]
    return group["rules"]


def balanced(expr: str) -> bool:
    depth = {"(": 0, "{": 0, "[": 0}
    closers = {")": "(", "}": "{", "]": "["}
    for ch in re.sub(r'"[^"]*"', '""', expr):
        if ch in depth:
            depth[ch] += 1
        elif ch in closers:
            depth[closers[ch]] -= 1
            if depth[closers[ch]] < 0:
                return False
    return all(v == 0 for v in depth.values())


def test_the_alerts_cover_lag_disconnection_dead_letters_stalls_and_outages():
    rules = rules_of(base_values(prometheusRule={"enabled": True}))
    names = [r["alert"] for r in rules]
    assert names == [
        "ConveyourCdcLagBytesHigh",
        "ConveyourCdcSlotRetainedWalHigh",
        "ConveyourCdcDisconnected",
        "ConveyourCdcDeadLettersRising",
        "ConveyourCdcNoProgress",
        "ConveyourCdcOutage",
    ]
    selector = f'job="{RELEASE}-conveyour-cdc",namespace="{NAMESPACE}"'
    for rule in rules:
        expr = rule["expr"]
        assert balanced(expr), expr
        assert "{{" not in expr and "}}" not in expr, expr
        used = metric_names(expr)
        assert used and all(known_metric(m) for m in used), expr
        for m in used:
            assert f"conveyour_cdc_{m}{{{selector}}}" in expr, f"{m} without the release selector: {expr}"
        assert re.fullmatch(r"[0-9]+[smh]", rule["for"]), rule
        assert rule["labels"]["severity"] in {"warning", "critical"}
        summary, description = rule["annotations"]["summary"], rule["annotations"]["description"]
        assert len(summary) > 15 and len(description) > 120, rule["alert"]
        # Prometheus templates survive Helm's templating as written.
        assert "{{ $labels" not in description
    by_name = {r["alert"]: r for r in rules}
    assert "> 1073741824" in by_name["ConveyourCdcLagBytesHigh"]["expr"]
    assert "{{ $value | humanize1024 }}B" in by_name["ConveyourCdcLagBytesHigh"]["annotations"]["summary"]
    assert "absent(conveyour_cdc_connected" in by_name["ConveyourCdcDisconnected"]["expr"]
    assert "increase(conveyour_cdc_dead_letters_total" in by_name["ConveyourCdcDeadLettersRising"]["expr"]
    assert "changes(conveyour_cdc_confirmed_lsn" in by_name["ConveyourCdcNoProgress"]["expr"]
    outage = by_name["ConveyourCdcOutage"]
    assert outage["expr"] == f"max by (namespace, job) (conveyour_cdc_outage{{{selector}}}) == 1"
    assert outage["for"] == "5m" and outage["labels"]["severity"] == "critical"


def test_alerts_can_be_tuned_turned_off_and_extended():
    rules = rules_of(load_values_file(CHART / "ci" / "prometheusrule-values.yaml"))
    by_name = {r["alert"]: r for r in rules}
    assert "ConveyourCdcDeadLettersRising" not in by_name
    lag = by_name["ConveyourCdcLagBytesHigh"]
    assert lag["expr"].endswith("> 536870912")
    assert lag["for"] == "5m" and lag["labels"]["severity"] == "critical"
    assert "ConveyourCdcRequestsRejected" in by_name
    assert by_name["ConveyourCdcOutage"]["for"] == "10m"
    off = rules_of(
        base_values(prometheusRule={"enabled": True, "alerts": {"outage": {"enabled": False, "for": "5m", "severity": "critical"}}})
    )
    assert "ConveyourCdcOutage" not in {r["alert"] for r in off}
    custom = rules_of(base_values(prometheusRule={"enabled": True, "selector": 'job="x"'}))
    assert all('{job="x"}' in r["expr"] for r in custom)


def test_the_dashboard_is_a_grafana_dashboard_of_the_connector_metrics():
    docs = manifests(render(load_values_file(CHART / "ci" / "grafana-dashboard-values.yaml")))
    dashboards = [d for d in by_kind(docs, "ConfigMap") if d["metadata"].get("labels", {}).get("grafana_dashboard")]
    assert len(dashboards) == 1
    config_map = dashboards[0]
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert config_map["metadata"]["namespace"] == "monitoring"
    assert config_map["metadata"]["annotations"] == {"grafana_folder": "CDC"}
    dashboard = json.loads(config_map["data"]["conveyour-cdc.json"])
    assert dashboard["uid"] and dashboard["title"]
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = set().union(*(metric_names(e) for e in exprs))
    assert all(known_metric(m) for m in used), used
    for needed in ["lag_bytes", "connected", "requests_total", "changes_received_total"]:
        assert needed in used, needed
    assert any("outcome" in e for e in exprs)
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    assert all(balanced(e) for e in exprs)
