"""Chart checks for CI: strict lint, render with the default values and with every option
on, validate each rendered manifest against a recent Kubernetes schema, check the shape the
platform relies on, and prove that bad values are refused by values.schema.json.

Needs the PyPI packages helm-python-sdk (Helm 4 SDK, no helm binary) and kubernetes-validate.
"""

import sys
from pathlib import Path

import helm_python as helm
import kubernetes_validate
import yaml

CHART = Path(__file__).resolve().parent / "tessera"
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
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            fail(f"[{label}] {path} {doc.get('kind')}/{doc['metadata'].get('name')}: {e.message}")
    print(f"validate [{label}]: {len(docs)} manifests against Kubernetes {version}")


def by_kind(docs, kind):
    return {d["metadata"]["name"]: d for _, d in docs if d["kind"] == kind}


def check_shape(label, docs, hpas, policies):
    deployments = by_kind(docs, "Deployment")
    services = by_kind(docs, "Service")
    for name in SERVICES:
        full = f"tessera-{name}"
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
    }
    for label, values in bad.items():
        try:
            chart.validate_schema(chart.merge_values(values))
        except helm.HelmError:
            continue
        fail(f"values.schema.json accepted bad values: {label}")
    print(f"schema: {len(bad)} kinds of bad values refused")


def main():
    version = kubernetes_validate.latest_version()
    all_on = yaml.safe_load((CHART / "ci" / "all-options-values.yaml").read_text())
    # The NetworkPolicies are on by default (gRPC services reachable from the release only).
    for label, values, hpas, policies in [("defaults", None, 0, 3), ("all options", all_on, 5, 3)]:
        lint(label, values)
        docs = render(values)
        validate(label, docs, version)
        check_shape(label, docs, hpas, policies)
        if label == "defaults" and "tessera-internal" not in by_kind(docs, "Secret"):
            fail("[defaults] no generated internal secret")
    check_bad_values()
    if failures:
        print(f"{len(failures)} chart check(s) failed")
        sys.exit(1)
    print("chart checks passed")


if __name__ == "__main__":
    main()
