"""The container and deployment files: docker-compose*.yml, docker/*.Dockerfile, .env.example, deploy/k8s.

Static checks only (no Docker): the files parse, the topology is wired as documented, and every
setting, module and command they name exists in the package.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml
from nnm.service.settings import ENV_PREFIX, Settings, load_settings

REPO = Path(__file__).resolve().parents[1]
COMPOSE = REPO / "docker-compose.yml"
COMPOSE_GPU = REPO / "docker-compose.gpu.yml"
ENV_EXAMPLE = REPO / ".env.example"
K8S = REPO / "deploy" / "k8s"

SERVICES = {"postgres", "redis", "minio", "createbuckets", "migrate", "gateway", "worker-cpu"}
ONE_SHOT = {"createbuckets", "migrate"}
APP_SERVICES = ("gateway", "worker-cpu")
HEALTHY = ("postgres", "redis", "minio")
COMPLETED = ("createbuckets", "migrate")
CONNECTION_VARS = (
    "NNM_DATABASE_URL",
    "NNM_BROKER_URL",
    "NNM_S3_ENDPOINT",
    "NNM_S3_ACCESS_KEY",
    "NNM_S3_SECRET_KEY",
    "NNM_S3_BUCKET",
    "NNM_S3_PUBLIC_ENDPOINT",
)
FIELDS = {f"{ENV_PREFIX}{name.upper()}" for name in Settings.model_fields}


def _load(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict), f"{path.name} is not a mapping"
    return data


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return _load(COMPOSE)


@pytest.fixture(scope="module")
def compose_gpu() -> dict[str, Any]:
    return _load(COMPOSE_GPU)


def _env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):  # KEY=VALUE form
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def _depends(service: dict[str, Any]) -> dict[str, str]:
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):
        return dict.fromkeys(deps, "service_started")
    return {name: (spec or {}).get("condition", "service_started") for name, spec in deps.items()}


def _walk(obj: Any):
    """Every (key, value) pair and every scalar of a parsed YAML tree."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield key, value
            yield from _walk(value)
    elif isinstance(obj, list):
        for item in obj:
            yield from _walk(item)


def _command(value: Any) -> str:
    return value if isinstance(value, str) else " ".join(map(str, value))


def _healthcheck_test(service: dict[str, Any]) -> str:
    test = service["healthcheck"]["test"]
    return test if isinstance(test, str) else " ".join(test[1:])


def _gpu_devices(tree: Any) -> list[dict[str, Any]]:
    found = []
    for key, value in _walk(tree):
        if key == "devices" and isinstance(value, list):
            found += [d for d in value if isinstance(d, dict) and (d.get("driver") == "nvidia" or "gpu" in str(d))]
    return found


def _dockerfile(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        instruction, _, args = full.partition(" ")
        out.append((instruction.upper(), args.strip()))
    assert not pending, f"{path.name}: dangling line continuation"
    return out


def _exec_form(args: str) -> list[str]:
    args = args.strip()
    if args.startswith("["):
        return json.loads(args)
    return shlex.split(args)


def _dockerfile_cmd(path: Path) -> list[str]:
    cmds = [args for instr, args in _dockerfile(path) if instr == "CMD"]
    assert len(cmds) == 1, f"{path.name}: expected one CMD"
    return _exec_form(cmds[0])


def _dockerfile_healthcheck(path: Path) -> str:
    checks = [args for instr, args in _dockerfile(path) if instr == "HEALTHCHECK"]
    assert len(checks) == 1, f"{path.name}: expected one HEALTHCHECK"
    _, _, cmd = checks[0].partition(" CMD ")
    assert cmd, f"{path.name}: HEALTHCHECK without CMD"
    return " ".join(_exec_form(cmd))


def _env_example() -> dict[str, str]:
    values = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep, f".env.example: not KEY=VALUE: {line!r}"
        assert key not in values, f".env.example: {key} twice"
        values[key] = value
    return values


def _celery_option(argv: list[str], *names: str) -> str:
    for i, arg in enumerate(argv):
        if arg in names:
            return argv[i + 1]
    raise AssertionError(f"none of {names} in {argv}")


# --------------------------------------------------------------------------------------------- compose


def test_compose_services(compose: dict[str, Any]) -> None:
    assert "version" not in compose, "the compose spec has no version key"
    assert set(compose["services"]) >= SERVICES


def test_long_running_services_have_healthchecks(compose: dict[str, Any], compose_gpu: dict[str, Any]) -> None:
    services = {**compose["services"], **compose_gpu["services"]}
    for name, service in services.items():
        if name in ONE_SHOT:
            assert service.get("restart", "no") == "no", f"{name} is one-shot"
            continue
        assert "healthcheck" in service, f"{name} has no healthcheck"
        assert _healthcheck_test(service), f"{name}: empty healthcheck"
    assert "pg_isready" in _healthcheck_test(compose["services"]["postgres"])
    assert "redis-cli ping" in _healthcheck_test(compose["services"]["redis"])
    assert "mc ready local" in _healthcheck_test(compose["services"]["minio"])


def test_app_services_wait_for_their_dependencies(compose: dict[str, Any], compose_gpu: dict[str, Any]) -> None:
    services = {name: compose["services"][name] for name in APP_SERVICES}
    services["worker-gpu"] = compose_gpu["services"]["worker-gpu"]
    for name, service in services.items():
        deps = _depends(service)
        for dep in HEALTHY:
            assert deps.get(dep) == "service_healthy", f"{name} -> {dep}"
        for dep in COMPLETED:
            assert deps.get(dep) == "service_completed_successfully", f"{name} -> {dep}"
    assert _depends(compose["services"]["migrate"]) == {"postgres": "service_healthy"}
    assert _depends(compose["services"]["createbuckets"]) == {"minio": "service_healthy"}


def test_minio_images_are_pinned_on_quay(compose: dict[str, Any]) -> None:
    for name, repo in (("minio", "quay.io/minio/minio"), ("createbuckets", "quay.io/minio/mc")):
        image = compose["services"][name]["image"]
        assert re.fullmatch(re.escape(repo) + r":RELEASE\.\d{4}-\d{2}-\d{2}T\d{2}-\d{2}-\d{2}Z", image), image
    assert compose["services"]["minio"]["command"][:2] == ["server", "/data"]
    bucket_script = _command(compose["services"]["createbuckets"]["entrypoint"])
    assert "mc alias set" in bucket_script
    assert "mc mb --ignore-existing" in bucket_script


def test_redis_is_a_durable_broker(compose: dict[str, Any]) -> None:
    command = _command(compose["services"]["redis"]["command"])
    assert "--appendonly yes" in command
    assert "--maxmemory-policy noeviction" in command
    assert "redis-data" in " ".join(compose["services"]["redis"]["volumes"])


def test_compose_env_names_are_settings_fields(compose: dict[str, Any], compose_gpu: dict[str, Any]) -> None:
    for doc in (compose, compose_gpu):
        for name, service in doc["services"].items():
            unknown = {k for k in _env(service) if k.startswith(ENV_PREFIX)} - FIELDS
            assert not unknown, f"{name}: {sorted(unknown)} are not fields of Settings"


def test_compose_connection_settings(compose: dict[str, Any], compose_gpu: dict[str, Any]) -> None:
    services = {name: compose["services"][name] for name in APP_SERVICES}
    services["worker-gpu"] = compose_gpu["services"]["worker-gpu"]
    for name, service in services.items():
        env = _env(service)
        for var in CONNECTION_VARS:
            assert env.get(var), f"{name}: {var} missing"
        assert env["NNM_DATABASE_URL"].startswith("postgresql+psycopg://")
        assert "@postgres:5432/" in env["NNM_DATABASE_URL"]
        assert env["NNM_BROKER_URL"] == "redis://redis:6379/0"
        assert env["NNM_S3_ENDPOINT"] == "minio:9000"
        assert env["NNM_DATA_DIR"] == "/var/lib/nnm"
        assert any(v.split(":")[-1] == "/var/lib/nnm" for v in service.get("volumes", [])), f"{name}: data volume"
    assert _env(compose["services"]["migrate"])["NNM_DATABASE_URL"] == _env(services["gateway"])["NNM_DATABASE_URL"]
    assert _env(compose["services"]["worker-cpu"])["NNM_DEVICE"] == "cpu"
    assert _env(compose_gpu["services"]["worker-gpu"])["NNM_DEVICE"] == "cuda"


def test_gpu_env_copy_matches_main_file(compose: dict[str, Any], compose_gpu: dict[str, Any]) -> None:
    main = {k: v for k, v in _env(compose["services"]["worker-cpu"]).items() if k != "NNM_DEVICE"}
    gpu = {k: v for k, v in _env(compose_gpu["services"]["worker-gpu"]).items() if k != "NNM_DEVICE"}
    assert gpu == main, "docker-compose.gpu.yml's copy of x-nnm-env drifted from docker-compose.yml"
    assert compose["x-nnm-env"] == compose_gpu["x-nnm-env"]


def test_interpolations_have_defaults() -> None:
    """`docker compose up` must work without a .env file: every ${VAR} has a :- default."""
    for path in (COMPOSE, COMPOSE_GPU):
        lines = [line for line in path.read_text().splitlines() if not line.lstrip().startswith("#")]
        text = re.sub(r"\$\$", "", "\n".join(lines))  # $$ is a literal $ for the container's shell
        bare = re.findall(r"\$(?!\{)\w+", text)
        assert not bare, f"{path.name}: use ${{VAR:-default}}, not {bare}"
        for expr in re.findall(r"\$\{([^}]*)\}", text):
            assert re.fullmatch(r"[A-Z_][A-Z0-9_]*:-.*", expr), f"{path.name}: ${{{expr}}} has no default"


def test_gpu_is_opt_in(compose: dict[str, Any], compose_gpu: dict[str, Any]) -> None:
    assert not _gpu_devices(compose), "docker-compose.yml must run on hosts without a GPU"
    assert "worker-gpu" not in compose["services"]
    worker = compose_gpu["services"]["worker-gpu"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    assert worker["build"]["dockerfile"] == "docker/worker-gpu.Dockerfile"
    assert worker["shm_size"]
    assert compose["services"]["worker-cpu"]["shm_size"]


def test_compose_volumes_are_declared(compose: dict[str, Any], compose_gpu: dict[str, Any]) -> None:
    for doc in (compose, compose_gpu):
        declared = set(doc.get("volumes") or {})
        for name, service in doc["services"].items():
            for volume in service.get("volumes", []):
                source = volume.split(":")[0]
                if not source.startswith((".", "/")):
                    assert source in declared, f"{name}: volume {source} not declared"


# ---------------------------------------------------------------------------------- images and commands


def _built_services(compose: dict[str, Any], compose_gpu: dict[str, Any]) -> dict[str, dict[str, Any]]:
    services = {**compose["services"], **compose_gpu["services"]}
    return {name: s for name, s in services.items() if "build" in s}


def test_dockerfiles_exist_and_name_real_modules(compose: dict[str, Any], compose_gpu: dict[str, Any]) -> None:
    from nnm.service.queue import QUEUES

    built = _built_services(compose, compose_gpu)
    assert {"gateway", "migrate", "worker-cpu", "worker-gpu"} <= set(built)
    for name, service in built.items():
        path = REPO / service["build"].get("context", ".") / service["build"]["dockerfile"]
        assert path.is_file(), f"{name}: {path} missing"
        instructions = _dockerfile(path)
        assert instructions[0][0] == "FROM"
        users = [args for instr, args in instructions if instr == "USER"]
        assert users and users[-1] not in {"root", "0"}, f"{path.name} runs as root"
        argv = _dockerfile_cmd(path)
        if argv[0] == "uvicorn":
            assert "--factory" in argv
            target = next(a for a in argv[1:] if ":" in a)
            module, _, attr = target.partition(":")
            assert module == "nnm.service.gateway.main"
            assert importlib.util.find_spec(module) is not None
            factory = getattr(importlib.import_module(module), attr)
            assert callable(factory)
            assert "EXPOSE 8000" in path.read_text()
            assert "/healthz" in _dockerfile_healthcheck(path)
        else:
            assert argv[:4] == ["celery", "-A", "nnm.service.celery_app", "worker"], argv
            assert importlib.util.find_spec("nnm.service.celery_app") is not None
            queues = _celery_option(argv, "-Q", "--queues").split(",")
            assert set(queues) <= set(QUEUES)
            assert _celery_option(argv, "--concurrency", "-c") == "1"
            assert _celery_option(argv, "--prefetch-multiplier") == "1"
            node = _celery_option(argv, "-n", "--hostname")
            prefix = node.split("@")[0]
            health = _dockerfile_healthcheck(path)
            assert "celery -A nnm.service.celery_app inspect ping" in health
            assert f"-d {prefix}@$HOSTNAME" in health, f"{path.name}: healthcheck pings another node"
            compose_health = _healthcheck_test(service)
            assert f"-d {prefix}@$$HOSTNAME" in compose_health, f"{name}: compose healthcheck pings another node"
    cpu_queues = _celery_option(_dockerfile_cmd(REPO / "docker/worker-cpu.Dockerfile"), "-Q").split(",")
    assert set(cpu_queues) == set(QUEUES), "with no GPU worker the CPU worker must take training jobs too"
    assert _celery_option(_dockerfile_cmd(REPO / "docker/worker-gpu.Dockerfile"), "-Q") == "gpu"


def test_migrate_runs_the_cli_migrate_command(compose: dict[str, Any]) -> None:
    from nnm.cli.main import build_parser

    migrate, gateway = compose["services"]["migrate"], compose["services"]["gateway"]
    assert migrate["image"] == gateway["image"]
    assert migrate["build"] == gateway["build"]
    argv = migrate["command"] if isinstance(migrate["command"], list) else shlex.split(migrate["command"])
    assert argv[0] == "nnm"
    assert build_parser().parse_args(argv[1:]).command == "migrate"


def test_dockerfiles_install_the_project() -> None:
    cpu = ("gateway", "worker-cpu")
    for name in (*cpu, "worker-gpu"):
        text = (REPO / "docker" / f"{name}.Dockerfile").read_text()
        for path in ("pyproject.toml", "README.md", "services/", "api_schemas/"):
            assert path in text, f"{name}: does not copy {path}"
        if name in cpu:
            assert "FROM python:3.11-slim" in text
            assert "download.pytorch.org/whl/cpu" in text
            assert ".[faiss,small-data,service]" in text
        else:
            assert "FROM pytorch/pytorch:" in text and "cuda" in text
            assert "faiss-gpu" in text
            assert ".[small-data,service]" in text


def test_dockerignore_keeps_the_context_small() -> None:
    patterns = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()}
    for needed in (".venv", ".git", "runs", "nnm-data", "bench/out", "**/__pycache__", "**/*.pt", "**/*.npy"):
        assert needed in patterns, needed
    for copied in ("pyproject.toml", "README.md", "services", "api_schemas"):
        assert copied not in patterns


# ---------------------------------------------------------------------------------------- .env.example


def test_env_example_lists_every_setting() -> None:
    values = _env_example()
    names = {k for k in values if k.startswith(ENV_PREFIX)}
    assert FIELDS - names == set(), f"missing from .env.example: {sorted(FIELDS - names)}"
    assert names - FIELDS == set(), f"not fields of Settings: {sorted(names - FIELDS)}"
    for var in ("POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB", "MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD"):
        assert var in values, var


def test_env_example_values_are_the_defaults() -> None:
    """Sourcing .env.example as it is runs the embedded defaults (empty means unset)."""
    nnm = {k: v for k, v in _env_example().items() if k.startswith(ENV_PREFIX)}
    assert load_settings(nnm) == Settings()
    assert nnm["NNM_S3_SECRET_KEY"] == "" and nnm["NNM_DATABASE_URL"] == ""


def test_env_example_comments_every_setting() -> None:
    lines = ENV_EXAMPLE.read_text().splitlines()
    for i, line in enumerate(lines):
        if line.startswith(ENV_PREFIX):
            assert i > 0 and lines[i - 1].startswith("#"), f".env.example: {line} has no comment above it"


def test_env_names_in_compose_interpolations_are_documented() -> None:
    documented = set(_env_example())
    for path in (COMPOSE, COMPOSE_GPU):
        used = set(re.findall(r"(?<!\$)\$\{([A-Z_][A-Z0-9_]*)", path.read_text()))
        undocumented = used - documented - {"GATEWAY_IMAGE", "WORKER_CPU_IMAGE", "WORKER_GPU_IMAGE"}
        assert not undocumented, f"{path.name}: {sorted(undocumented)} not in .env.example"


# ------------------------------------------------------------------------------------------ Kubernetes


def _k8s() -> dict[tuple[str, str], dict[str, Any]]:
    objects = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                objects[(doc["kind"], doc["metadata"]["name"])] = doc
    return objects


def test_k8s_manifests() -> None:
    objects = _k8s()
    for key in (
        ("Deployment", "nnm-gateway"),
        ("Service", "nnm-gateway"),
        ("Deployment", "nnm-worker-gpu"),
        ("Job", "nnm-migrate"),
        ("ConfigMap", "nnm-config"),
        ("Secret", "nnm-secrets"),
    ):
        assert key in objects, key
    config, secret = objects[("ConfigMap", "nnm-config")], objects[("Secret", "nnm-secrets")]
    assert set(config["data"]) <= FIELDS
    assert set(secret["stringData"]) <= FIELDS
    assert not set(config["data"]) & set(secret["stringData"])
    assert all("CHANGE_ME" in v for v in secret["stringData"].values()), "the Secret holds placeholders only"
    gpu = objects[("Deployment", "nnm-worker-gpu")]["spec"]["template"]["spec"]["containers"][0]
    assert str(gpu["resources"]["limits"]["nvidia.com/gpu"]) == "1"
    job = objects[("Job", "nnm-migrate")]["spec"]["template"]["spec"]["containers"][0]
    assert job["command"] == ["nnm", "migrate"]
    for (kind, name), obj in objects.items():
        if kind in {"Deployment", "Job"}:
            for container in obj["spec"]["template"]["spec"]["containers"]:
                refs = {
                    ref.get("configMapRef", {}).get("name") or ref.get("secretRef", {}).get("name")
                    for ref in container["envFrom"]
                }
                assert refs == {"nnm-config", "nnm-secrets"}, name
                for var in container.get("env", []):
                    assert var["name"] in FIELDS, f"{name}: {var['name']}"
