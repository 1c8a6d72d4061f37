"""deploy/kubernetes, checked offline: every manifest against the Kubernetes OpenAPI schemas (kubernetes-validate),
checkov's workload checks (each skip with its reason), `kubectl kustomize` when kubectl is here, every
environment variable a real setting, and the promises the manifests make (probes, shutdown, security)."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from support import ROOT, wait_until

K8S = ROOT / "deploy" / "kubernetes"
SCHEMA_VERSION = "1.37.0"  # the newest release whose schemas kubernetes-validate (pinned) ships
CRDS = {"monitoring.coreos.com/v1"}  # not in Kubernetes' own schemas: checked by hand below
CHECKOV_HINT = ("checkov is not installed: .ci/run installs it into .venv-checkov (python3 -m venv .venv-checkov && "
                ".venv-checkov/bin/pip install checkov==3.3.30); REQUIRE_CHECKOV=1 makes its absence a failure")


def manifest_files() -> list[Path]:
    return sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")


def documents(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d]


def all_documents() -> list[tuple[Path, dict]]:
    return [(path, doc) for path in manifest_files() for doc in documents(path.read_text(encoding="utf-8"))]


def by_kind(kind: str) -> dict[str, dict]:
    return {doc["metadata"]["name"]: doc for _, doc in all_documents() if doc["kind"] == kind}


def containers(deployment: dict) -> list[dict]:
    return deployment["spec"]["template"]["spec"]["containers"]


def _validate(doc: dict) -> None:
    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate is missing: pip install -r requirements-dev.txt")
    kubernetes_validate.validate(doc, SCHEMA_VERSION, strict=True)


def test_every_manifest_matches_the_kubernetes_schemas():
    checked = []
    for path, doc in all_documents():
        if doc["apiVersion"] in CRDS:
            continue
        try:
            _validate(doc)
        except Exception as exc:  # ValidationError names the field
            pytest.fail(f"{path.relative_to(ROOT)}: {doc['kind']} {doc['metadata']['name']}: {exc}")
        checked.append(doc["kind"])
    assert {"Namespace", "Deployment", "Service", "Ingress", "PodDisruptionBudget", "HorizontalPodAutoscaler",
            "NetworkPolicy", "Secret"} <= set(checked)


def test_the_service_monitor_scrapes_the_web_service_with_the_metrics_token():
    [monitor] = [doc for _, doc in all_documents() if doc["kind"] == "ServiceMonitor"]
    [endpoint] = monitor["spec"]["endpoints"]
    service = by_kind("Service")["wecom-mailer-web"]
    assert monitor["spec"]["selector"]["matchLabels"] == service["metadata"]["labels"]
    assert endpoint["port"] in [p["name"] for p in service["spec"]["ports"]] and endpoint["path"] == "/metrics"
    credentials = endpoint["authorization"]["credentials"]
    secret = by_kind("Secret")["wecom-mailer-secrets"]
    assert endpoint["authorization"]["type"] == "Bearer" and credentials["name"] == secret["metadata"]["name"]
    assert credentials["key"] == "METRICS_TOKEN" and "METRICS_TOKEN" in secret["stringData"]


def test_kubectl_kustomize_renders_a_complete_valid_deployment():
    kubectl = shutil.which("kubectl")
    if not kubectl:
        pytest.skip("kubectl is not installed (Debian: apt-get install kubernetes-client, or the release binary); "
                    "the manifests were still checked file by file")
    rendered = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=120)
    assert rendered.returncode == 0, rendered.stderr
    docs = documents(rendered.stdout)
    for doc in docs:
        _validate(doc)
        assert doc["metadata"].get("namespace", "wecom-mailer") == "wecom-mailer"
    [config_map] = [d for d in docs if d["kind"] == "ConfigMap"]
    # The generator's hashed name is what the pods read: a change to config.env rolls them.
    assert re.fullmatch(r"wecom-mailer-config-[a-z0-9]{10}", config_map["metadata"]["name"])
    for deployment in (d for d in docs if d["kind"] == "Deployment"):
        refs = [e["configMapRef"]["name"] for c in containers(deployment) for e in c.get("envFrom", [])]
        assert refs == [config_map["metadata"]["name"]]
        assert all(c["image"] == "registry.corp.example/wecom-mailer:1.0.0" for c in containers(deployment))
    assert "Secret" not in {d["kind"] for d in docs}, "real secrets never come from the repository"


def _checkov() -> str | None:
    found = os.environ.get("CHECKOV") or shutil.which("checkov")
    local = ROOT / ".venv-checkov" / "bin" / "checkov"
    return found or (str(local) if local.exists() else None)


def test_checkov_workload_checks_pass_and_every_skip_gives_its_reason():
    checkov = _checkov()
    if checkov is None:
        if os.environ.get("REQUIRE_CHECKOV") == "1":
            pytest.fail("REQUIRE_CHECKOV=1 but " + CHECKOV_HINT)
        pytest.skip(CHECKOV_HINT)
    result = subprocess.run([checkov, "--framework", "kubernetes", "-d", str(K8S), "--skip-download",
                             "--output", "json"], capture_output=True, text=True, timeout=600,
                            env={**os.environ, "BC_SKIP_MAPPING": "TRUE", "CHECKOV_RUN_SCA_PACKAGE_SCAN_V2": ""})
    report = json.loads(result.stdout)
    results = report["results"]
    failed = [(c["check_id"], c["resource"], c["check_name"]) for c in results["failed_checks"]]
    assert not failed, f"checkov failed checks: {failed}"
    assert report["summary"]["parsing_errors"] == 0
    assert report["summary"]["passed"] >= 150  # the checks really ran on the workloads
    passed = {c["check_id"] for c in results["passed_checks"]}
    # The workload checks that matter most here, each passing (not skipped).
    assert {"CKV_K8S_20", "CKV_K8S_22", "CKV_K8S_23", "CKV_K8S_28", "CKV_K8S_31", "CKV_K8S_37", "CKV_K8S_38",
            "CKV_K8S_40", "CKV_K8S_8", "CKV_K8S_11", "CKV_K8S_13", "CKV_K8S_21"} <= passed
    skipped = results["skipped_checks"]
    assert {c["check_id"] for c in skipped} == {"CKV_K8S_9", "CKV_K8S_15", "CKV_K8S_43"}
    for check in skipped:
        reason = check["check_result"].get("suppress_comment") or ""
        assert len(reason) > 20, f"{check['check_id']} on {check['resource']} is skipped without a reason"


# --- the environment the manifests set is the service's -------------------------------------------------

def _settings_names() -> set[str]:
    from dotenv import dotenv_values

    names = set(dotenv_values(ROOT / "config.example.env"))
    design = ROOT.parent / "shared" / "DESIGN.md"
    if design.is_file():
        names |= {n for row in re.findall(r"^\| `([A-Z_]+)`(?:, `([A-Z_]+)`)?(?: / `([A-Z_]+)`)?",
                                          design.read_text(encoding="utf-8"), re.M) for n in row if n}
    return names


def test_every_environment_variable_the_manifests_set_is_a_setting_of_the_service():
    from dotenv import dotenv_values

    known = _settings_names()
    assert len(known) > 40
    set_here = {name: "config.env" for name in dotenv_values(K8S / "config.env")}
    for name, deployment in by_kind("Deployment").items():
        for container in containers(deployment):
            set_here.update({e["name"]: name for e in container.get("env", [])})
    unknown = {name: where for name, where in set_here.items()
               if name not in known and not (name.endswith("_FILE") and name[:-5] in known)}
    assert not unknown, f"not settings of the service (config.example.env): {unknown}"
    secret_keys = set(by_kind("Secret")["wecom-mailer-secrets"]["stringData"])
    assert not secret_keys & set(dotenv_values(K8S / "config.env")), "a secret in the ConfigMap"
    for name, deployment in by_kind("Deployment").items():
        for container in containers(deployment):
            for env in container.get("env", []):
                if env["name"].endswith("_FILE") and env["name"] != "WORKER_HEARTBEAT_FILE":
                    # Each file is a key of the Secret, mounted where the variable says.
                    assert env["value"] == f"/run/secrets/wecom-mailer/{env['name'][:-5]}"
                    assert env["name"][:-5] in secret_keys, f"{name}: {env['name']} names no key of the Secret"


def test_the_configuration_the_manifests_give_is_valid():
    """config.env plus the Secret's example values: the settings load (no bad or missing variable)."""
    import config
    from dotenv import dotenv_values

    secret = by_kind("Secret")["wecom-mailer-secrets"]["stringData"]
    env = {k: v for k, v in dotenv_values(K8S / "config.env").items() if v}
    env.update({k: v for k, v in secret.items() if v}, WECOM_CALLBACK_AES_KEY="a" * 43, WORKER_IN_WEB="false")
    settings = config.from_env(env)
    assert settings.retention_days == 90 and settings.mail_backend == "smtp" and settings.trusted_proxies == 1


# --- what the manifests promise -------------------------------------------------------------------------

def _gunicorn_setting(name: str) -> int:
    match = re.search(rf"^{name} = (\d+)$", (ROOT / "gunicorn.conf.py").read_text(encoding="utf-8"), re.M)
    assert match, f"gunicorn.conf.py sets no {name}"
    return int(match.group(1))


def test_web_pods_stop_gracefully_within_their_grace_period():
    web = by_kind("Deployment")["wecom-mailer-web"]
    [container] = containers(web)
    pause = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    grace = web["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    # The kubelet counts the preStop pause in the grace period; gunicorn then has its graceful timeout.
    assert pause >= 3 and grace > pause + _gunicorn_setting("graceful_timeout")
    assert {e["name"]: e["value"] for e in container["env"]}["WORKER_IN_WEB"] == "false"
    assert web["spec"]["replicas"] == 2 and web["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300  # a long first migration


def test_the_worker_runs_delivery_alone_with_a_heartbeat_liveness_probe():
    worker = by_kind("Deployment")["wecom-mailer-worker"]
    [container] = containers(worker)
    assert container["args"] == ["flask", "--app", "app", "worker"] and worker["spec"]["replicas"] == 2
    env = {e["name"]: e["value"] for e in container["env"]}
    probe = container["livenessProbe"]["exec"]["command"]
    assert probe[:4] == ["python", "/app/healthcheck.py", "--heartbeat", env["WORKER_HEARTBEAT_FILE"]]
    assert probe[4:] == ["--max-age", "60"]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in worker["spec"]["template"]["spec"]["volumes"]}
    assert "emptyDir" in volumes[mounts[str(Path(env["WORKER_HEARTBEAT_FILE"]).parent)]]
    assert "readinessProbe" not in container


def test_every_pod_is_locked_down_and_sized_from_the_benchmark():
    dockerfile = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    uid = re.search(r"useradd --system --uid (\d+)", dockerfile).group(1)
    for name, deployment in by_kind("Deployment").items():
        pod = deployment["spec"]["template"]["spec"]
        assert pod["automountServiceAccountToken"] is False, name
        assert pod["securityContext"]["runAsNonRoot"] is True and str(pod["securityContext"]["runAsUser"]) == uid
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        assert pod["topologySpreadConstraints"]
        writable = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
        for container in pod["containers"]:
            context = container["securityContext"]
            assert context["readOnlyRootFilesystem"] is True and context["allowPrivilegeEscalation"] is False
            assert context["capabilities"]["drop"] == ["ALL"] and "add" not in context["capabilities"]
            mounted = {m["mountPath"] for m in container["volumeMounts"] if m["name"] in writable}
            assert {"/tmp", "/tmp/metrics"} <= mounted  # PROMETHEUS_MULTIPROC_DIR is /tmp/metrics in the image
            memory = container["resources"]["limits"]["memory"]
            assert memory.endswith("Mi") and int(memory[:-2]) >= 2 * 82  # peak RSS 82 MB (BENCHMARKS.md)
            assert container["resources"]["requests"]["cpu"] and container["resources"]["limits"]["cpu"]
        assert by_kind("PodDisruptionBudget")[name]["spec"]["selector"]["matchLabels"] == \
            deployment["spec"]["selector"]["matchLabels"]
    assert by_kind("HorizontalPodAutoscaler")["wecom-mailer-web"]["spec"]["scaleTargetRef"]["name"] == \
        "wecom-mailer-web"


def test_the_ingress_publishes_tls_and_refuses_bodies_the_service_would():
    import config

    [ingress] = by_kind("Ingress").values()
    size = ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/proxy-body-size"]
    assert size.endswith("k") and int(size[:-1]) * 1024 == config.DEFAULTS["callback_max_body"]
    assert ingress["spec"]["tls"][0]["hosts"] == [r["host"] for r in ingress["spec"]["rules"]]
    paths = {p["path"] for r in ingress["spec"]["rules"] for p in r["http"]["paths"]}
    assert paths == {config.DEFAULTS["callback_path"], "/admin"}  # /metrics and the probes stay inside


def test_egress_is_only_dns_mysql_smtp_imap_and_https():
    egress = by_kind("NetworkPolicy")["wecom-mailer-egress"]
    ports = {(p["port"], p["protocol"]) for rule in egress["spec"]["egress"] for p in rule["ports"]}
    assert ports == {(53, "UDP"), (53, "TCP"), (3306, "TCP"), (25, "TCP"), (465, "TCP"), (587, "TCP"),
                     (143, "TCP"), (993, "TCP"), (443, "TCP")}
    ingress = by_kind("NetworkPolicy")["wecom-mailer-ingress"]
    assert [p["port"] for rule in ingress["spec"]["ingress"] for p in rule["ports"]] == [8000]


def test_the_example_secret_holds_placeholders_only():
    secret = by_kind("Secret")["wecom-mailer-secrets"]
    for key, value in secret["stringData"].items():
        assert value == "" or "REPLACE" in value, f"{key} looks like a real value"


# --- the worker's heartbeat (WORKER_HEARTBEAT_FILE) and the probe that reads it ---------------------------

def _probe(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["python3", str(ROOT / "healthcheck.py"), "--heartbeat", str(path), "--max-age", "60"],
                          capture_output=True, text=True, timeout=30)


def test_the_heartbeat_keeps_beating_while_the_database_is_unreachable(make_app, tmp_path):
    beat = tmp_path / "heartbeat"
    # Port 9 (discard) on loopback: nothing listens, every connection is refused at once.
    app = make_app(DATABASE_URL="mysql+pymysql://root@127.0.0.1:9/wm", WORKER_HEARTBEAT_FILE=str(beat))
    assert _probe(beat).returncode == 1 and "has the worker's loop started" in _probe(beat).stderr
    worker = app.extensions["wecom_mailer"].make_worker()
    worker.start()
    try:
        wait_until(beat.exists, timeout=20, what="the first heartbeat")
        first = beat.stat().st_mtime
        # The loop retries the database every 4 s; each round touches the file again.
        wait_until(lambda: beat.stat().st_mtime > first, timeout=30, what="a second heartbeat without MySQL")
        assert _probe(beat).returncode == 0
    finally:
        worker.shutdown()
    old = time.time() - 61
    os.utime(beat, (old, old))
    stale = _probe(beat)
    assert stale.returncode == 1 and "the delivery loop is stuck" in stale.stderr
