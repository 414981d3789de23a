"""deploy/k8s: the Kustomize base and its overlays, rendered as `kubectl apply -k` would apply them.

Every overlay is rendered with `kubectl kustomize` (offline) and checked: each object against the
Kubernetes API schema (strict, bundled by kubernetes-validate) or, for KEDA's objects, against KEDA's
CRD models (cloudcoil.models.keda); pods against the Pod Security "restricted" level; and the wiring
the deployment relies on (queues, device, settings, autoscaling, migrations, network policy).
"""

from __future__ import annotations

import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml
from nnm.service.settings import ENV_NAMES

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "deploy" / "k8s"
OVERLAYS = ("cpu", "gpu")
POD_KINDS = {"Deployment", "Job"}
#: Volume types the "restricted" Pod Security level allows.
RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                      "projected", "secret"}


@cache
def render(overlay: str) -> dict[tuple[str, str], dict[str, Any]]:
    """(kind, name) -> object of `kubectl kustomize deploy/k8s/overlays/OVERLAY`."""
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl is needed to render deploy/k8s (kubectl kustomize, offline)"
    out = subprocess.run([kubectl, "kustomize", str(K8S / "overlays" / overlay)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    objects = {}
    for doc in yaml.safe_load_all(out.stdout):
        key = (doc["kind"], doc["metadata"]["name"])
        assert key not in objects, f"{overlay}: {key} twice"
        objects[key] = doc
    return objects


def pods(objects: dict) -> list[tuple[str, dict[str, Any]]]:
    return [(name, obj["spec"]["template"]) for (kind, name), obj in objects.items() if kind in POD_KINDS]


def container(objects: dict, deployment: str) -> dict[str, Any]:
    return objects[("Deployment", deployment)]["spec"]["template"]["spec"]["containers"][0]


def env_of(c: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in c.get("env", [])}


def queues(c: dict[str, Any]) -> set[str]:
    argv = c["command"]
    return set(argv[argv.index("-Q") + 1].split(","))


def secret_templates() -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in yaml.safe_load_all((K8S / "secret.example.yaml").read_text())}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_matches_its_schema(overlay: str) -> None:
    """Strict: an unknown or misspelt field is an error, for the Kubernetes API and for KEDA's CRDs."""
    import kubernetes_validate
    from cloudcoil.models.keda import v1alpha1 as keda

    for (kind, name), obj in render(overlay).items():
        if obj["apiVersion"].startswith("keda.sh/"):
            model = getattr(keda, kind)
            parsed = model.model_validate(obj)
            # Round trip: the models ignore unknown fields, so a field that does not come back is unknown.
            back = parsed.model_dump(by_alias=True, exclude_unset=True, mode="json")
            assert back == obj, f"{kind}/{name}: fields KEDA does not know: {_diff(obj, back)}"
            continue
        try:
            kubernetes_validate.validate(obj, kubernetes_validate.latest_version(), strict=True)
        except kubernetes_validate.ValidationError as exc:
            raise AssertionError(f"{overlay}: {kind}/{name}: {exc.message} at {'.'.join(map(str, exc.path))}") from None


def _diff(a: Any, b: Any, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [p for k in a for p in (_diff(a[k], b[k], f"{path}.{k}") if k in b else [f"{path}.{k}"])]
    if isinstance(a, list) and isinstance(b, list):
        return [p for i, (x, y) in enumerate(zip(a, b, strict=False)) for p in _diff(x, y, f"{path}[{i}]")]
    return [] if a == b else [path]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_pass_the_restricted_pod_security_level(overlay: str) -> None:
    """The checks of the "restricted" Pod Security Standard (which includes "baseline")."""
    for name, template in pods(render(overlay)):
        spec = template["spec"]
        pod_sc = spec.get("securityContext", {})
        for host in ("hostNetwork", "hostPID", "hostIPC"):
            assert not spec.get(host), f"{name}: {host}"
        for volume in spec.get("volumes", []):
            kinds = set(volume) - {"name"}
            assert kinds <= RESTRICTED_VOLUMES, f"{name}: volume {volume['name']} is {kinds}"
        assert pod_sc.get("seccompProfile", {}).get("type") in {"RuntimeDefault", "Localhost"}, name
        assert pod_sc.get("runAsUser", 1) != 0
        for c in spec["containers"] + spec.get("initContainers", []):
            sc = c.get("securityContext", {})
            where = f"{name}/{c['name']}"
            assert not sc.get("privileged"), where
            assert sc.get("allowPrivilegeEscalation") is False, f"{where}: allowPrivilegeEscalation must be false"
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], f"{where}: must drop ALL capabilities"
            assert set(sc.get("capabilities", {}).get("add", [])) <= {"NET_BIND_SERVICE"}, where
            assert sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True, f"{where}: runAsNonRoot"
            assert sc.get("runAsUser", pod_sc.get("runAsUser", 1)) != 0, where
            assert "seccompProfile" not in sc or sc["seccompProfile"]["type"] in {"RuntimeDefault", "Localhost"}
            assert not any(p.get("hostPort") for p in c.get("ports", [])), where
            assert sc.get("procMount", "Default") == "Default", where
        assert spec.get("automountServiceAccountToken") is False, f"{name}: no pod talks to the Kubernetes API"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_asks_for_what_it_uses(overlay: str) -> None:
    """CPU, memory and ephemeral storage requested (the scheduler places pods by them; emptyDir data
    counts as ephemeral storage), memory and ephemeral storage capped, and every emptyDir bounded."""
    for name, template in pods(render(overlay)):
        for c in template["spec"]["containers"]:
            res = c["resources"]
            assert {"cpu", "memory", "ephemeral-storage"} <= set(res["requests"]), name
            assert {"memory", "ephemeral-storage"} <= set(res["limits"]), name
        for volume in template["spec"].get("volumes", []):
            if "emptyDir" in volume:
                assert volume["emptyDir"].get("sizeLimit"), f"{name}: emptyDir {volume['name']} without sizeLimit"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_settings_secrets_and_migrations(overlay: str) -> None:
    """Every pod reads the ConfigMap and the Secret and names only real settings; keys are required;
    the schema is migrated by the migrate Job alone; the Secret is a template outside the overlays."""
    objects = render(overlay)
    config = objects[("ConfigMap", "nnm-config")]["data"]
    assert set(config) <= ENV_NAMES, set(config) - ENV_NAMES
    assert config["NNM_AUTH"] == "required"
    assert config["NNM_AUTO_MIGRATE"] == "false", "gateways must not race on the schema"
    assert not any(kind == "Secret" for kind, _ in objects), "placeholders must never be applied"
    secrets = secret_templates()
    stored = secrets["nnm-secrets"]["stringData"]
    assert set(stored) <= ENV_NAMES and not set(stored) & set(config)
    assert all("CHANGE_ME" in v for s in secrets.values() for v in s["stringData"].values())
    assert "NNM_AUTH" not in stored
    for name, template in pods(objects):
        for c in template["spec"]["containers"]:
            refs = {r.get("configMapRef", {}).get("name") or r.get("secretRef", {}).get("name") for r in c["envFrom"]}
            assert refs == {"nnm-config", "nnm-secrets"}, name
            assert set(env_of(c)) <= ENV_NAMES - {"NNM_AUTH", "NNM_AUTO_MIGRATE"}, name
    job = objects[("Job", "nnm-migrate")]["spec"]["template"]["spec"]["containers"][0]
    assert job["command"] == ["nnm", "migrate"]
    # The admin key reaches the gateway alone, from its own optional Secret.
    assert set(secrets["nnm-admin"]["stringData"]) == {"admin-key"}
    for name, template in pods(objects):
        for c in template["spec"]["containers"]:
            admin = [e for e in c.get("env", []) if e["name"] == "NNM_ADMIN_KEY"]
            if name == "nnm-gateway":
                assert admin == [{"name": "NNM_ADMIN_KEY", "valueFrom": {"secretKeyRef": {
                    "name": "nnm-admin", "key": "admin-key", "optional": True}}}]
            else:
                assert admin == [], name


def test_queues_and_device_per_overlay() -> None:
    """cpu: one worker takes both queues and `auto` is fixed for the CPU. gpu: GPU workers take training
    (`gpu`) only, the CPU worker evaluation (`cpu`) only, and `auto` is fixed for CUDA."""
    from nnm.service.queue import QUEUES

    cpu = render("cpu")
    assert not any(name == "nnm-worker-gpu" for _, name in cpu)
    assert queues(container(cpu, "nnm-worker-cpu")) == set(QUEUES)
    assert env_of(container(cpu, "nnm-gateway"))["NNM_DEVICE"] == env_of(container(cpu, "nnm-worker-cpu"))["NNM_DEVICE"]
    assert env_of(container(cpu, "nnm-gateway"))["NNM_DEVICE"] == "cpu"
    gpu = render("gpu")
    assert queues(container(gpu, "nnm-worker-cpu")) == {"cpu"}
    assert queues(container(gpu, "nnm-worker-gpu")) == {"gpu"}
    assert env_of(container(gpu, "nnm-gateway"))["NNM_DEVICE"] == env_of(container(gpu, "nnm-worker-gpu"))["NNM_DEVICE"]
    assert env_of(container(gpu, "nnm-gateway"))["NNM_DEVICE"] == "cuda"
    assert str(container(gpu, "nnm-worker-gpu")["resources"]["limits"]["nvidia.com/gpu"]) == "1"
    for overlay, objects in (("cpu", cpu), ("gpu", gpu)):
        for (kind, name), _ in objects.items():
            if kind == "Deployment" and name.startswith("nnm-worker-"):
                probe = " ".join(container(objects, name)["livenessProbe"]["exec"]["command"])
                assert "nnm.service.worker.liveness" in probe and "inspect ping" not in probe, (overlay, probe)


def test_gpu_workers_scale_from_zero_on_training_jobs() -> None:
    """KEDA owns the GPU workers' count: from 0, one per queued or running training job (the query itself
    runs against a real job store in tests/service/test_repository.py)."""
    from nnm.service.store.repository import ACTIVE

    gpu = render("gpu")
    scaled = gpu[("ScaledObject", "nnm-worker-gpu")]["spec"]
    assert scaled["scaleTargetRef"]["name"] == "nnm-worker-gpu" and ("Deployment", "nnm-worker-gpu") in gpu
    assert scaled["minReplicaCount"] == 0 and scaled["maxReplicaCount"] >= 1
    assert "replicas" not in gpu[("Deployment", "nnm-worker-gpu")]["spec"], "KEDA owns the count"
    (trigger,) = scaled["triggers"]
    assert trigger["type"] == "postgresql" and trigger["metadata"]["targetQueryValue"] == "1"
    query = trigger["metadata"]["query"]
    assert "queue = 'gpu'" in query and all(f"'{s}'" in query for s in ACTIVE)
    auth = gpu[("TriggerAuthentication", trigger["authenticationRef"]["name"])]["spec"]["secretTargetRef"]
    templates = secret_templates()
    for ref in auth:
        assert ref["key"] in templates[ref["name"]]["stringData"], ref
    # The GPU workers are never scaled by KEDA in the cpu overlay (there are none).
    assert not any(kind == "ScaledObject" for kind, _ in render("cpu"))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gateway_availability_and_probes(overlay: str) -> None:
    """A drain leaves a gateway up; a dependency blip takes gateways out of the Service, never restarts
    them: liveness asks /healthz, which answers while Postgres stalls
    (tests/service/test_defaults_hold.py::test_healthz_answers_while_postgres_stalls)."""
    objects = render(overlay)
    gateway = objects[("Deployment", "nnm-gateway")]
    pdb = objects[("PodDisruptionBudget", "nnm-gateway")]["spec"]
    assert pdb["selector"]["matchLabels"] == gateway["spec"]["selector"]["matchLabels"]
    assert pdb["minAvailable"] >= 1 and gateway["spec"]["replicas"] > pdb["minAvailable"]
    c = container(objects, "nnm-gateway")
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz" == c["startupProbe"]["httpGet"]["path"]
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    service = objects[("Service", "nnm-gateway")]["spec"]
    assert service["selector"] == gateway["spec"]["selector"]["matchLabels"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policy_closes_every_pod_but_the_gateway_port(overlay: str) -> None:
    objects = render(overlay)
    default = objects[("NetworkPolicy", "nnm-default")]["spec"]
    assert set(default["policyTypes"]) == {"Ingress", "Egress"} and default["ingress"] == []
    selector = default["podSelector"]["matchLabels"]
    for name, template in pods(objects):
        labels = template["metadata"]["labels"]
        assert selector.items() <= labels.items(), f"{name}'s pods escape the default policy"
    ports = {(p["protocol"], p["port"]) for rule in default["egress"] for p in rule["ports"]}
    assert {("UDP", 53), ("TCP", 5432), ("TCP", 6379)} <= ports
    gateway = objects[("NetworkPolicy", "nnm-gateway-ingress")]["spec"]
    assert gateway["podSelector"]["matchLabels"] == objects[("Deployment", "nnm-gateway")]["spec"]["selector"][
        "matchLabels"]
    assert [p["port"] for rule in gateway["ingress"] for p in rule["ports"]] == [
        container(objects, "nnm-gateway")["ports"][0]["containerPort"]]


def test_multinode_example_runs_torchrun_on_every_replica() -> None:
    """The PyTorchJob example (outside the overlays): each replica's pod template is a valid pod whose
    container runs the pipeline through torchrun (the operator sets its rendezvous), on a shared claim."""
    import kubernetes_validate

    job = yaml.safe_load((REPO / "deploy" / "k8s" / "multinode" / "pytorchjob.yaml").read_text())
    assert job["apiVersion"] == "kubeflow.org/v1" and job["kind"] == "PyTorchJob"
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert set(replicas) == {"Master", "Worker"} and replicas["Master"]["replicas"] == 1
    gpus = int(job["spec"]["nprocPerNode"])
    for spec in replicas.values():
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}, **spec["template"]}
        kubernetes_validate.validate(pod, kubernetes_validate.latest_version(), strict=True)
        (c,) = pod["spec"]["containers"]
        assert c["name"] == "pytorch" and c["command"][:3] == ["torchrun", "-m", "nnm.cli.main"]
        assert c["resources"]["limits"]["nvidia.com/gpu"] == gpus
        claims = {v["name"]: v for v in pod["spec"]["volumes"]}
        out = c["command"][c["command"].index("--out") + 1]
        shared = next(m for m in c["volumeMounts"] if out.startswith(m["mountPath"] + "/"))
        assert "persistentVolumeClaim" in claims[shared["name"]]
