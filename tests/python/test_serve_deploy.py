"""deploy/: Kubernetes manifests wired together (probes, ports, volumes, Secret, HPA), the Dockerfile
installs the README's way and runs `aimass serve`, alert rules and the Grafana dashboard name only
metrics the server exports."""
import json
import re
import shutil
import subprocess
import sys
import warnings

import pytest
import yaml

from aimass.serve import TokenTable
from serve_util import PKG_ROOT, ROOT, make_store

DEPLOY = ROOT / "deploy"


def manifests():
    docs = []
    for p in sorted((DEPLOY / "k8s").glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(p.read_text()) if d]
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


def test_kubernetes_wiring():
    m = manifests()
    dep = m[("Deployment", "aimass-serve")]
    pod = dep["spec"]["template"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    (c,) = pod["spec"]["containers"]
    args = c["args"]
    opt = {args[i]: args[i + 1] for i in range(0, len(args) - 1, 2)}
    port = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert int(opt["--port"]) == port["http"] and opt["--host"] == "0.0.0.0"
    assert c["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "http"}
    # SIGTERM drain fits in the grace period
    assert pod["spec"]["terminationGracePeriodSeconds"] > float(opt["--drain-timeout"])
    mounts = {v["name"]: v["mountPath"] for v in c["volumeMounts"]}
    vols = {v["name"]: v for v in pod["spec"]["volumes"]}
    # the store on a PVC that exists
    store_vol = next(n for n, mp in mounts.items() if opt["--store"].startswith(mp + "/"))
    claim = vols[store_vol]["persistentVolumeClaim"]["claimName"]
    assert ("PersistentVolumeClaim", claim) in m
    # tokens from a Secret that holds a valid tokens.yml under the mounted key
    tok_vol = next(n for n, mp in mounts.items() if opt["--tokens"].startswith(mp + "/"))
    sec = vols[tok_vol]["secret"]
    key = next(i["key"] for i in sec["items"] if mounts[tok_vol] + "/" + i["path"] == opt["--tokens"])
    secret = m[("Secret", sec["secretName"])]
    assert len(TokenTable.from_dict(yaml.safe_load(secret["stringData"][key]))) >= 1
    # Service selects the pods and targets the named port; HPA scales the Deployment on CPU requests
    svc = m[("Service", "aimass-serve")]
    assert svc["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert svc["spec"]["ports"][0]["targetPort"] in port
    hpa = m[("HorizontalPodAutoscaler", "aimass-serve")]
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "aimass-serve"}
    assert hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    assert "cpu" in c["resources"]["requests"]
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(port["http"])


def test_kubeconform_if_present():
    exe = shutil.which("kubeconform")
    if exe is None:
        pytest.skip("kubeconform is not installed (optional: the wiring test above parses the manifests)")
    r = subprocess.run([exe, "-strict", "-summary", *map(str, sorted((DEPLOY / "k8s").glob("*.yaml")))],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def test_dockerfile_installs_the_readme_way():
    readme = (ROOT / "README.md").read_text()
    install = re.search(r"```bash\n(python3 -m pip install -r requirements.txt[^\n]*)\n```", readme).group(1)
    steps = [s.strip() for s in install.split("&&") if "pip install" in s]
    docker = (DEPLOY / "Dockerfile").read_text()
    norm = " ".join(docker.replace("\\\n", " ").split()).replace("--no-cache-dir ", "")
    for s in steps:
        assert s in norm, f"the Dockerfile does not run the README's `{s}`"
    entry = re.search(r"^ENTRYPOINT (.*)$", docker, re.M).group(1)
    assert json.loads(entry) == ["aimass", "serve"]
    cmd = json.loads(re.search(r"^CMD (.*)$", docker, re.M).group(1))
    assert "--tokens" in cmd and "STOPSIGNAL SIGTERM" in docker


@pytest.fixture(scope="module")
def exported_metrics(tmp_path_factory):
    pytest.importorskip("torch")
    from aimass.serve import ServeConfig, Server, create_app
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from starlette.testclient import TestClient
    reg, _ = make_store(tmp_path_factory.mktemp("deploy"), versions=1)
    with TestClient(create_app(Server(reg, ServeConfig(poll_interval_s=0)))) as c:
        assert c.post("/predict", json={"input": [1, 2, 3, 4]}).status_code == 200
        text = c.get("/metrics").text
    return set(re.findall(r"^(aimass_[a-z_]+)", text, re.M))


def _names(expr):
    return set(re.findall(r"\b(aimass_[a-z_]+)", expr))


def test_alert_rules_use_exported_metrics(exported_metrics):
    doc = yaml.safe_load((DEPLOY / "prometheus-rules.yaml").read_text())
    rules = doc["groups"][0]["rules"]
    names = {r["alert"] for r in rules}
    assert {"AimassHighErrorRate", "AimassHighP99Latency", "AimassQueueFull", "AimassModelNotReady"} <= names
    for r in rules:
        assert r["annotations"]["summary"] and r["labels"]["severity"]
        missing = _names(r["expr"]) - exported_metrics
        assert not missing, f"{r['alert']} uses {missing}, which /metrics does not export"
    promtool = shutil.which("promtool")
    if promtool:
        subprocess.run([promtool, "check", "rules", str(DEPLOY / "prometheus-rules.yaml")], check=True, timeout=60)


def test_grafana_dashboard_uses_exported_metrics(exported_metrics):
    d = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    titles = " ".join(p["title"] for p in d["panels"]).lower()
    for word in ("requests/s", "errors", "latency", "queue", "batch", "loaded"):
        assert word in titles
    for p in d["panels"]:
        for t in p["targets"]:
            missing = _names(t["expr"]) - exported_metrics
            assert not missing, f"panel {p['title']!r} uses {missing}, which /metrics does not export"


def test_cli_help_lists_the_options():
    out = subprocess.run([sys.executable, "-m", "aimass", "serve", "--help"], capture_output=True, text=True, timeout=60,
                         cwd=ROOT, env={"PYTHONPATH": PKG_ROOT, "PATH": "/usr/bin:/bin"}).stdout
    for opt in ("--store", "--host", "--port", "--tokens", "--insecure", "--http {native,uvicorn}"):
        assert opt in out
    assert "--http native, the default" in " ".join(out.split())
