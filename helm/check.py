"""Chart checks for CI: strict lint, render with the default values and with every option
on, validate each rendered manifest against a recent Kubernetes schema, check the shape the
platform relies on, and prove that bad values are refused by values.schema.json.

Needs the PyPI packages helm-python-sdk (Helm 4 SDK, no helm binary), kubernetes-validate and
promql-parser (the alert rules' and the dashboard's expressions are parsed).
"""

import json
import re
import sys
from pathlib import Path

import helm_python as helm
import kubernetes_validate
import promql_parser
import yaml

CHART = Path(__file__).resolve().parent / "tessera"
METRICS_DOC = Path(__file__).resolve().parent.parent / "docs" / "metrics.md"
# Custom resources of the Prometheus Operator: not in the Kubernetes schemas, checked here.
OPERATOR_KINDS = {"ServiceMonitor", "PrometheusRule"}
SERVICES = ["catalog", "eligibility", "wallet", "campaign-scheduler", "notification", "gateway"]
GRPC = {
    "catalog": "tessera.catalog.v1.CatalogService",
    "eligibility": "tessera.eligibility.v1.EligibilityService",
    "wallet": "tessera.wallet.v1.WalletService",
    "campaign-scheduler": "tessera.scheduler.v1.SchedulerService",
    "notification": "tessera.notification.v1.NotificationService",
}
failures = []


def fail(message):
    failures.append(message)
    print(f"FAIL {message}")


def lint(label, values):
    report = helm.lint(str(CHART), values, strict=True, kube_version="v1.33.0")
    problems = [m for m in report.get("messages", []) if m.get("severity", 0) >= 2]
    for m in problems:
        fail(f"lint [{label}] {m.get('path')}: {m.get('error')}")
    for e in report.get("errors") or []:
        fail(f"lint [{label}] {e}")
    print(f"lint [{label}]: {len(report.get('messages', []))} messages, {len(problems)} warnings/errors")


def render(values):
    chart = helm.Chart.load(str(CHART))
    manifests = chart.render(values, name="tessera", namespace="loyalty", is_install=True)
    docs = []
    for path, text in manifests.items():
        if not path.endswith((".yaml", ".yml")):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                docs.append((path, doc))
    return docs


def validate(label, docs, version):
    for path, doc in docs:
        if doc["kind"] in OPERATOR_KINDS:
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            fail(f"[{label}] {path} {doc.get('kind')}/{doc['metadata'].get('name')}: {e.message}")
    print(f"validate [{label}]: {len(docs)} manifests against Kubernetes {version}")


def by_kind(docs, kind):
    return {d["metadata"]["name"]: d for _, d in docs if d["kind"] == kind}


def documented_metrics():
    return set(re.findall(r"^\| `(tessera_[a-z_]+)`", METRICS_DOC.read_text(), re.M))


def check_expr(label, where, expr, known):
    """An expression parses as PromQL and names only documented metrics."""
    try:
        promql_parser.parse(expr)
    except Exception as e:  # the parser raises its own error types
        fail(f"[{label}] {where}: not PromQL: {e}")
        return
    for name in re.findall(r"\b(tessera_[a-z_]+?)(?:_bucket|_sum|_count)?\b", expr):
        if name not in known:
            fail(f"[{label}] {where}: {name} is not in docs/metrics.md")


def check_observability(label, docs):
    """The alert rules and the dashboard use real metrics in valid PromQL; the ServiceMonitor
    scrapes the metrics port."""
    known = documented_metrics()
    rules = [d for _, d in docs if d["kind"] == "PrometheusRule"]
    count = 0
    for rule in rules:
        for group in rule["spec"]["groups"]:
            for r in group["rules"]:
                if not r.get("alert") or not r.get("expr") or "summary" not in r.get("annotations", {}):
                    fail(f"[{label}] rule {r} lacks alert, expr or summary")
                check_expr(label, f"alert {r.get('alert')}", r.get("expr", ""), known)
                count += 1
    for _, monitor in ((p, d) for p, d in docs if d["kind"] == "ServiceMonitor"):
        if [e.get("port") for e in monitor["spec"]["endpoints"]] != ["metrics"]:
            fail(f"[{label}] the ServiceMonitor does not scrape the metrics port")
    panels = 0
    for _, cm in docs:
        if cm["kind"] == "ConfigMap" and "tessera.json" in cm.get("data", {}):
            dashboard = json.loads(cm["data"]["tessera.json"])
            for panel in dashboard["panels"]:
                for target in panel["targets"]:
                    check_expr(label, f"panel {panel['title']!r}", target["expr"], known)
                panels += 1
    print(f"observability [{label}]: {count} alert rules, {panels} dashboard panels parsed")


def check_shape(label, docs, hpas, policies, prefix="tessera"):
    deployments = by_kind(docs, "Deployment")
    services = by_kind(docs, "Service")
    for name in SERVICES:
        full = f"{prefix}-{name}"
        d = deployments.get(full)
        if d is None:
            fail(f"[{label}] no Deployment {full}")
            continue
        if full not in services:
            fail(f"[{label}] no Service {full}")
        pod = d["spec"]["template"]["spec"]
        c = pod["containers"][0]
        if c["args"] != ["serve", name]:
            fail(f"[{label}] {full} runs {c['args']}")
        sc = c["securityContext"]
        if not (sc["readOnlyRootFilesystem"] and not sc["allowPrivilegeEscalation"]
                and sc["capabilities"]["drop"] == ["ALL"] and pod["securityContext"]["runAsNonRoot"]):
            fail(f"[{label}] {full} security context is not restricted")
        if name in GRPC:
            if c["readinessProbe"].get("grpc", {}).get("service") != GRPC[name]:
                fail(f"[{label}] {full} readiness is not the gRPC health of {GRPC[name]}")
        elif c["readinessProbe"].get("httpGet", {}).get("path") != "/readyz":
            fail(f"[{label}] gateway readiness is not /readyz")
        secret_env = [e for e in c.get("env", []) if e["name"] == "TESSERA_INTERNAL_SECRET"]
        if not secret_env or "secretKeyRef" not in secret_env[0].get("valueFrom", {}):
            fail(f"[{label}] {full} does not take the internal secret from a Secret")
        master_env = [e for e in c.get("env", []) if e["name"] == "TESSERA_SECRETS__MASTER_KEY"]
        if not master_env or "secretKeyRef" not in master_env[0].get("valueFrom", {}):
            fail(f"[{label}] {full} does not take the master key from a Secret")
        if "checksum/config" not in d["spec"]["template"]["metadata"]["annotations"]:
            fail(f"[{label}] {full} has no config checksum")
        if name == "gateway":
            public = [p["name"] for p in services[full]["spec"]["ports"]]
            if "metrics" in public or f"{full}-metrics" not in services:
                fail(f"[{label}] the gateway's metrics are on its public Service: {public}")
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        if "metrics" not in ports or ports["metrics"] in (ports.get("http"), ports.get("grpc")):
            fail(f"[{label}] {full} has no metrics port of its own: {ports}")
    jobs = [d for _, d in docs if d["kind"] == "Job"]
    if len(jobs) != 1 or "pre-upgrade" not in jobs[0]["metadata"]["annotations"]["helm.sh/hook"]:
        fail(f"[{label}] expected one pre-install/pre-upgrade migrations Job")
    if len(by_kind(docs, "HorizontalPodAutoscaler")) != hpas:
        fail(f"[{label}] expected {hpas} HPAs")
    if len(by_kind(docs, "PodDisruptionBudget")) != len(SERVICES):
        fail(f"[{label}] expected a PDB per service")
    if len(by_kind(docs, "NetworkPolicy")) != policies:
        fail(f"[{label}] expected {policies} NetworkPolicies")


def check_bad_values():
    chart = helm.Chart.load(str(CHART))
    bad = {
        "replicas as text": {"global": {"replicas": "two"}},
        "unknown log format": {"telemetry": {"logFormat": "xml"}},
        "unknown service": {"services": {"billing": {"enabled": True}}},
        "unknown top-level key": {"databse": {}},
        "empty database secret": {"database": {"existingSecret": ""}},
        "metrics on the gRPC port": {"metrics": {"port": 50051}},
        "error ratio above 1": {"prometheusRule": {"errorRatio": 5}},
        "ingress path without slash": {"ingress": {"hosts": [{"host": "a", "paths": [{"path": "x"}]}]}},
        "sidecar without image": {"global": {"sidecars": [{"name": "x"}]}},
    }
    for label, values in bad.items():
        try:
            chart.validate_schema(chart.merge_values(values))
        except helm.HelmError:
            continue
        fail(f"values.schema.json accepted bad values: {label}")
    print(f"schema: {len(bad)} kinds of bad values refused")


def values_table():
    """The chart README's table of values: every key of values.yaml with its default and
    the comment above it (or above its parent), helm-docs style."""
    rows, path, comment, pending = [], [], [], []
    for line in (CHART / "values.yaml").read_text().splitlines():
        stripped = line.strip()
        if not stripped:
            comment = []
            continue
        if stripped.startswith("#"):
            comment.append(stripped.lstrip("#").strip())
            continue
        indent = (len(line) - len(line.lstrip())) // 2
        if stripped.startswith("- ") or ":" not in stripped:
            continue  # a list item: part of its key's default
        key, _, rest = stripped.partition(":")
        path = path[:indent] + [key]
        pending = pending[:indent] + [" ".join(comment)]
        comment = []
        rest = rest.split(" #")[0].strip()
        if rest or not line.endswith(":"):
            # Its own comment, else its parent's (a top-level section's comment, which
            # is about the whole section, is not repeated on every key).
            description = pending[-1] or (pending[-2] if len(pending) > 2 else "")
            rows.append((".".join(path), rest or "", description))
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    out = ["| key | default | description |", "|---|---|---|"]
    for key, default, description in rows:
        out.append(f"| `{key}` | `{default}` | {description.replace('|', '/')} |")
    # Keys whose default is a block (lists, maps) are listed with their YAML.
    for key in ["services", "ingress.hosts"]:
        node = values
        for part in key.split("."):
            node = node[part]
        out.append(f"| `{key}` | `{json.dumps(node)}` | see values.yaml |")
    return "\n".join(out)


def readme():
    head = (CHART / "README.head.md").read_text()
    return f"{head}\n## Values\n\nGenerated from `values.yaml` by `helm/check.py --write-readme`; CI checks it is current.\n\n{values_table()}\n"


def check_readme():
    current = (CHART / "README.md").read_text() if (CHART / "README.md").exists() else ""
    if current != readme():
        fail("helm/tessera/README.md is not current: run `python helm/check.py --write-readme`")
    else:
        print("README: current")


def main():
    if "--write-readme" in sys.argv:
        (CHART / "README.md").write_text(readme())
        print("wrote helm/tessera/README.md")
        return
    check_readme()
    version = kubernetes_validate.latest_version()
    all_on = yaml.safe_load((CHART / "ci" / "all-options-values.yaml").read_text())
    # The NetworkPolicies are on by default (gRPC services reachable from the release only).
    runs = [("defaults", None, 0, 3, "tessera"), ("all options", all_on, 5, 3, "tessera-loyalty")]
    for label, values, hpas, policies, prefix in runs:
        lint(label, values)
        docs = render(values)
        validate(label, docs, version)
        check_shape(label, docs, hpas, policies, prefix)
        check_observability(label, docs)
        if label == "defaults" and "tessera-internal" not in by_kind(docs, "Secret"):
            fail("[defaults] no generated internal secret")
    check_bad_values()
    if failures:
        print(f"{len(failures)} chart check(s) failed")
        sys.exit(1)
    print("chart checks passed")


if __name__ == "__main__":
    main()
