"""The container and deployment files: docker-compose*.yml, docker/*.Dockerfile, .env.example, deploy/k8s.

Static checks only (no Docker): the files parse, the topology is wired as documented, and every
setting, module and command they name exists in the package. The compose files are also resolved
the way `docker compose` does it (variables interpolated from a .env, the GPU override merged over
the main file) to check what the containers get: no default passwords, keys required, MinIO on the
host's loopback only, a bucket-scoped S3 user for the service, and each worker on its own queues.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml
from nnm.service.settings import ENV_NAMES, ENV_PREFIX, Settings, load_settings

REPO = Path(__file__).resolve().parents[1]
COMPOSE = REPO / "docker-compose.yml"
COMPOSE_GPU = REPO / "docker-compose.gpu.yml"
ENV_EXAMPLE = REPO / ".env.example"
MAKE_ENV = REPO / "scripts" / "make-env.sh"
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
#: Compose variables that must never have a default: `docker compose up` refuses to start without them.
SECRET_VARS = ("POSTGRES_PASSWORD", "MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD", "NNM_S3_ACCESS_KEY", "NNM_S3_SECRET_KEY")
WORKERS = ("worker-cpu", "worker-gpu")
BOOTSTRAP = "docker compose exec gateway nnm keys create --name admin"


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


# ------------------------------------------------------------- compose as `docker compose` resolves it


class MissingVariable(Exception):
    pass


_INTERPOLATION = re.compile(r"\$(?:(\$)|\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|([A-Za-z_][A-Za-z0-9_]*))")


def _interpolate(value: str, env: Mapping[str, str]) -> str:
    """Compose's interpolation: $$, ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?err}, ${VAR?err}."""

    def sub(m: re.Match) -> str:
        if m.group(1):
            return "$"
        name, op, arg = m.group(2) or m.group(5), m.group(3), m.group(4)
        val = env.get(name)
        if op == ":-":
            return val if val else arg
        if op == "-":
            return arg if val is None else val
        if (op == ":?" and not val) or (op == "?" and val is None):
            raise MissingVariable(f"{name}: {arg}")
        return val or ""

    return _INTERPOLATION.sub(sub, value)


def _interpolate_tree(obj: Any, env: Mapping[str, str]) -> Any:
    if isinstance(obj, dict):
        return {k: _interpolate_tree(v, env) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_interpolate_tree(v, env) for v in obj]
    return _interpolate(obj, env) if isinstance(obj, str) else obj


def _merge(base: Any, over: Any, key: str = "") -> Any:
    """Compose's merge of an override file: mappings merge, ports add up, volumes merge by target,
    anything else (command, entrypoint, healthcheck.test, ...) is replaced."""
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for k, v in over.items():
            out[k] = _merge(out[k], v, k) if k in out else v
        return out
    if key in {"ports", "expose"} and isinstance(base, list) and isinstance(over, list):
        return base + [item for item in over if item not in base]
    if key == "volumes" and isinstance(base, list) and isinstance(over, list):
        target = {str(v).split(":")[1] if ":" in str(v) else str(v): v for v in base}
        target.update({str(v).split(":")[1] if ":" in str(v) else str(v): v for v in over})
        return list(target.values())
    return over


def _dotenv(text: str) -> dict[str, str]:
    """A .env file as Docker Compose reads it (KEY=VALUE lines, # comments)."""
    env = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f"not KEY=VALUE: {line!r}"
            env[key] = value
    return env


def _make_env() -> dict[str, str]:
    out = subprocess.run(["bash", str(MAKE_ENV)], capture_output=True, text=True, timeout=30, check=True)
    return _dotenv(out.stdout)


def _topology(env: Mapping[str, str], gpu: bool) -> dict[str, Any]:
    """docker-compose.yml (+ docker-compose.gpu.yml), interpolated from `env` and merged."""
    doc = _interpolate_tree(_load(COMPOSE), env)
    if gpu:
        doc = _merge(doc, _interpolate_tree(_load(COMPOSE_GPU), env))
    return doc


@pytest.fixture(scope="module")
def dotenv() -> dict[str, str]:
    """The .env that the documented one-liner writes: `bash scripts/make-env.sh > .env`."""
    assert MAKE_ENV.is_file(), "scripts/make-env.sh (the documented way to write .env) is missing"
    return _make_env()


def _worker_argv(service: dict[str, Any]) -> list[str]:
    """The command a worker container runs: its compose command, or the CMD of its image."""
    command = service.get("command")
    if command:
        return command if isinstance(command, list) else shlex.split(command)
    return _dockerfile_cmd(REPO / service["build"].get("context", ".") / service["build"]["dockerfile"])


def _queues(argv: list[str]) -> set[str]:
    return set(_celery_option(argv, "-Q", "--queues").split(","))


def _published(port: Any) -> tuple[str | None, str]:
    """(host address or None for every interface, container port) of a compose port entry."""
    if isinstance(port, dict):
        return port.get("host_ip"), str(port["target"])
    spec = str(port).split("/")[0]
    if spec.startswith("["):
        host, _, rest = spec[1:].partition("]:")
        return host, rest.split(":")[-1]
    parts = spec.split(":")
    return (parts[0] if len(parts) == 3 else None), parts[-1]


# --------------------------------------------------------------------------------------------- compose


def test_compose_services(compose: dict[str, Any]) -> None:
    assert "version" not in compose, "the compose spec has no version key"
    assert set(compose["services"]) >= SERVICES


def test_long_running_services_have_healthchecks(compose: dict[str, Any], compose_gpu: dict[str, Any]) -> None:
    services = _merge(compose, compose_gpu)["services"]
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
    assert "mc admin user add" in bucket_script


def test_redis_is_a_durable_broker(compose: dict[str, Any]) -> None:
    command = _command(compose["services"]["redis"]["command"])
    assert "--appendonly yes" in command
    assert "--maxmemory-policy noeviction" in command
    assert "redis-data" in " ".join(compose["services"]["redis"]["volumes"])


def test_compose_env_names_are_settings_fields(compose: dict[str, Any], compose_gpu: dict[str, Any]) -> None:
    for doc in (compose, compose_gpu):
        for name, service in doc["services"].items():
            unknown = {k for k in _env(service) if k.startswith(ENV_PREFIX)} - ENV_NAMES
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


def test_interpolations_have_defaults_except_secrets() -> None:
    """Every ${VAR} has a :- default, except the secrets: those are ${VAR:?message}, so that
    `docker compose up` without the .env of scripts/make-env.sh stops and says what to do."""
    for path in (COMPOSE, COMPOSE_GPU):
        lines = [line for line in path.read_text().splitlines() if not line.lstrip().startswith("#")]
        text = re.sub(r"\$\$", "", "\n".join(lines))  # $$ is a literal $ for the container's shell
        bare = re.findall(r"\$(?!\{)\w+", text)
        assert not bare, f"{path.name}: use ${{VAR:-default}}, not {bare}"
        for expr in re.findall(r"\$\{([^}]*)\}", text):
            name = re.match(r"[A-Z_][A-Z0-9_]*", expr)
            assert name, f"{path.name}: ${{{expr}}}"
            if name.group(0) in SECRET_VARS:
                assert re.fullmatch(r"[A-Z_][A-Z0-9_]*:\?.*make-env\.sh.*", expr), (
                    f"{path.name}: ${{{expr}}} must be ${{VAR:?message naming scripts/make-env.sh}}")
            else:
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
    services = _merge(compose, compose_gpu)["services"]
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
        assert users and re.fullmatch(r"[1-9]\d*(:[1-9]\d*)?", users[-1]), f"{path.name} runs as {users}: not a uid"
        if name == "gateway":
            argv = _dockerfile_cmd(path)  # the image's default command is the gateway
            assert argv[0] == "uvicorn" and "--factory" in argv and not service.get("command")
            target = next(a for a in argv[1:] if ":" in a)
            module, _, attr = target.partition(":")
            assert module == "nnm.service.gateway.main"
            assert callable(getattr(importlib.import_module(module), attr))
            assert "EXPOSE 8000" in path.read_text()
            assert "/healthz" in _dockerfile_healthcheck(path)
        elif name.startswith("worker"):
            image_argv = _dockerfile_cmd(path)
            argvs = [_worker_argv(service), _worker_argv(compose["services"].get(name, service))]
            if image_argv[0] == "celery":
                argvs.append(image_argv)
            for argv in argvs:
                assert argv[:4] == ["celery", "-A", "nnm.service.worker.celery_app", "worker"], argv
                assert importlib.util.find_spec("nnm.service.worker.celery_app") is not None
                assert _queues(argv) <= set(QUEUES)
                assert _celery_option(argv, "--concurrency", "-c") == "1"
                assert _celery_option(argv, "--prefetch-multiplier") == "1"
                assert _celery_option(argv, "-n", "--hostname")
            # Liveness must not go through the broker: a Redis outage would restart every worker.
            health = [_healthcheck_test(service)]
            if image_argv[0] == "celery":
                health.append(_dockerfile_healthcheck(path))
            for test in health:
                assert "python -m nnm.service.worker.liveness" in test and "inspect ping" not in test, test
            assert importlib.util.find_spec("nnm.service.worker.liveness") is not None
    # One CPU image: the gateway, the migrations and the CPU worker differ only in their command.
    for name in ("migrate", "worker-cpu"):
        assert built[name]["image"] == built["gateway"]["image"] and built[name]["build"] == built["gateway"]["build"]
    assert built["gateway"]["build"]["dockerfile"] == "docker/cpu.Dockerfile"
    assert sorted(p.name for p in (REPO / "docker").glob("*Dockerfile")) == ["cpu.Dockerfile", "worker-gpu.Dockerfile"]
    # The GPU image alone takes only training.
    assert _celery_option(_dockerfile_cmd(REPO / "docker/worker-gpu.Dockerfile"), "-Q") == "gpu"


def test_migrate_runs_the_cli_migrate_command(compose: dict[str, Any]) -> None:
    from nnm.cli.main import build_parser

    migrate, gateway = compose["services"]["migrate"], compose["services"]["gateway"]
    assert migrate["image"] == gateway["image"]
    assert migrate["build"] == gateway["build"]
    argv = migrate["command"] if isinstance(migrate["command"], list) else shlex.split(migrate["command"])
    assert argv[0] == "nnm"
    assert build_parser().parse_args(argv[1:]).command == "migrate"


def test_dockerfiles_install_from_the_lock_in_layers() -> None:
    """Dependencies from the hash-checked lock through docker/install.sh, in a layer before the code;
    pip's cache in a build-cache mount; the optional extras by build argument."""
    for name, variant in (("cpu", "cpu"), ("worker-gpu", "gpu")):
        path = REPO / "docker" / f"{name}.Dockerfile"
        steps = _dockerfile(path)
        assert steps[0] == ("FROM", "python:3.11-slim"), f"{name}: {steps[0]}"
        runs = [args for instr, args in steps if instr == "RUN"]
        copies = [args for instr, args in steps if instr == "COPY"]
        deps = next(i for i, (instr, args) in enumerate(steps) if instr == "RUN" and "install.sh deps" in args)
        code = next(i for i, (instr, args) in enumerate(steps) if instr == "COPY" and args.startswith("services/"))
        assert deps < code, f"{name}: the dependencies are installed after the code is copied"
        assert f"install.sh deps {variant} ${{NNM_EXTRAS}}" in steps[deps][1]
        assert "--mount=type=cache,target=/root/.cache/pip" in steps[deps][1]
        assert ("ARG", 'NNM_EXTRAS=""') in steps
        assert any("install.sh project" in r for r in runs)
        for copied in ("docker/install.sh docker/", "docker/requirements/ docker/requirements/",
                       "pyproject.toml README.md ./", "services/ services/", "api_schemas/ api_schemas/"):
            assert copied in copies, f"{name}: does not copy {copied}"
        assert "pip install" not in path.read_text(), f"{name}: installs outside docker/install.sh"
    assert "faiss-gpu" in (REPO / "docker" / "requirements" / "gpu.txt").read_text()


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
    assert ENV_NAMES - names == set(), f"missing from .env.example: {sorted(ENV_NAMES - names)}"
    assert names - ENV_NAMES == set(), f"not fields of Settings: {sorted(names - ENV_NAMES)}"
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
        undocumented = used - documented - {"CPU_IMAGE", "WORKER_GPU_IMAGE"}
        assert not undocumented, f"{path.name}: {sorted(undocumented)} not in .env.example"


# ---------------------------------------------------------------------------------- closed by default


def test_compose_refuses_to_start_without_secrets() -> None:
    """No password or S3 key has a default: without a .env, interpolation stops on each of them."""
    for gpu in (False, True):
        for missing in SECRET_VARS:
            env = {name: "x" * 16 for name in SECRET_VARS if name != missing}
            with pytest.raises(MissingVariable, match=missing):
                _topology(env, gpu)
    for path in (COMPOSE, COMPOSE_GPU):
        for key, value in _walk(_load(path)):
            if isinstance(key, str) and re.search(r"PASSWORD|SECRET|ACCESS_KEY|ROOT_USER", key):
                assert re.fullmatch(r"\$\{" + key + r":\?[^}]+\}", str(value)), (
                    f"{path.name}: {key}: {value!r} is not ${{{key}:?...}}")
        url = _load(path)["x-nnm-env"]["NNM_DATABASE_URL"]
        password = r"\$\{POSTGRES_PASSWORD:\?[^}]+\}"
        assert re.fullmatch(r"postgresql\+psycopg://\$\{POSTGRES_USER:-\w+\}:" + password + "@.*", url), (
            f"{path.name}: the password in {url} has a default")


def test_make_env_fills_every_required_variable(dotenv: dict[str, str]) -> None:
    """`bash scripts/make-env.sh > .env` gives compose every ${VAR:?} it needs, with fresh secrets."""
    required = set()
    for path in (COMPOSE, COMPOSE_GPU):
        required |= set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*):\?", path.read_text()))
    assert required >= set(SECRET_VARS)
    for name in required:
        assert dotenv.get(name), f"make-env.sh leaves {name} empty"
    for gpu in (False, True):
        doc = _topology(dotenv, gpu)  # raises MissingVariable if anything is still missing
        for name in ("gateway", "migrate", *(w for w in WORKERS if w in doc["services"])):
            env = _env(doc["services"][name])
            settings = load_settings(env)
            assert settings.database_url and settings.database_url.startswith("postgresql+psycopg://")
            from sqlalchemy.engine import make_url

            assert make_url(settings.database_url).password == dotenv["POSTGRES_PASSWORD"], "password needs escaping"
    for name in ("POSTGRES_PASSWORD", "MINIO_ROOT_PASSWORD", "NNM_S3_SECRET_KEY"):
        assert re.fullmatch(r"[0-9a-f]{32,}", dotenv[name]), f"{name}: not a long random secret"
    assert len({dotenv[n] for n in ("POSTGRES_PASSWORD", "MINIO_ROOT_PASSWORD", "NNM_S3_SECRET_KEY")}) == 3
    assert dotenv["NNM_S3_ACCESS_KEY"] != dotenv["MINIO_ROOT_USER"]
    again = _make_env()
    assert all(again[n] != dotenv[n] for n in ("POSTGRES_PASSWORD", "MINIO_ROOT_PASSWORD", "NNM_S3_SECRET_KEY"))
    # A whole .env: every variable of .env.example, in its order, the documented ones unchanged.
    example = _env_example()
    assert list(dotenv) == list(example)
    changed = {k for k in example if example[k] != dotenv[k]}
    assert changed <= {*SECRET_VARS, "NNM_AUTH", "NNM_ADMIN_KEY"}, changed
    for doc in (REPO / "README.md", REPO / "deploy" / "README.md", ENV_EXAMPLE):
        assert "bash scripts/make-env.sh > .env" in doc.read_text(), f"{doc.name} does not show the one-liner"


def test_minio_is_published_on_loopback_only(dotenv: dict[str, str]) -> None:
    """Only the gateway is published beyond the host; MinIO's API and console listen on 127.0.0.1."""
    for gpu in (False, True):
        for name, service in _topology(dotenv, gpu)["services"].items():
            for port in service.get("ports", []):
                host, target = _published(port)
                if name == "gateway":
                    assert target == "8000"
                    continue
                assert host is not None and ipaddress.ip_address(host).is_loopback, (
                    f"{name}: port {port!r} is published on every interface of the host")
    assert not _topology(dotenv, False)["services"]["postgres"].get("ports")
    assert not _topology(dotenv, False)["services"]["redis"].get("ports")


def test_keys_are_required_in_compose(dotenv: dict[str, str], tmp_path: Path) -> None:
    """NNM_AUTH=required everywhere the service runs, whatever .env says (Kubernetes: tests/test_k8s.py);
    the first key's bootstrap is documented and the keys CLI works with the settings compose gives the
    gateway."""
    from nnm.cli.main import build_parser

    for env in (dotenv, {**dotenv, "NNM_AUTH": "auto"}, {**dotenv, "NNM_AUTH": "off"}):
        for gpu in (False, True):
            services = _topology(env, gpu)["services"]
            for name in ("gateway", "migrate", *(w for w in WORKERS if w in services)):
                assert load_settings(_env(services[name])).auth == "required", name
    # The bootstrap: documented, and it parses.
    for doc in (REPO / "README.md", REPO / "deploy" / "README.md", COMPOSE):
        assert BOOTSTRAP in doc.read_text(), f"{doc.name} does not show how to create the first key"
    argv = shlex.split(BOOTSTRAP)[4:]
    assert argv[0] == "nnm" and build_parser().parse_args(argv[1:]).keys_command == "create"
    # Run it with the gateway's compose environment (a SQLite file stands in for Postgres; S3 and the
    # broker are unreachable here and the keys CLI does not need them).
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    env.update(_env(_topology(dotenv, False)["services"]["gateway"]))
    env.update(NNM_DATA_DIR=str(tmp_path), NNM_DATABASE_URL=f"sqlite:///{tmp_path / 'jobs.db'}")
    cli = [sys.executable, "-m", "nnm.cli.main", *argv[1:]]
    out = subprocess.run(cli, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["key"].startswith("nnm_")
    listed = subprocess.run([*cli[:3], "keys", "list"], env=env, capture_output=True, text=True, timeout=120)
    assert [json.loads(line)["name"] for line in listed.stdout.splitlines()] == ["admin"], listed.stderr


def test_admin_key_reaches_the_gateway_only(dotenv: dict[str, str]) -> None:
    """make-env.sh writes a random admin key; compose hands it to the gateway and to no worker."""
    assert re.fullmatch(r"[0-9a-f]{64}", dotenv["NNM_ADMIN_KEY"])
    assert _make_env()["NNM_ADMIN_KEY"] != dotenv["NNM_ADMIN_KEY"]
    for gpu in (False, True):
        services = _topology(dotenv, gpu)["services"]
        settings = load_settings(_env(services["gateway"]))
        assert settings.admin_key is not None and settings.admin_key.get_secret_value() == dotenv["NNM_ADMIN_KEY"]
        for name in ("migrate", *(w for w in WORKERS if w in services)):
            assert "NNM_ADMIN_KEY" not in _env(services[name]), name
    # An old .env without one still starts: the admin API then needs a key with the admin scope.
    old = {k: v for k, v in dotenv.items() if k != "NNM_ADMIN_KEY"}
    assert load_settings(_env(_topology(old, False)["services"]["gateway"])).admin_key is None


def test_service_uses_a_bucket_scoped_s3_user(dotenv: dict[str, str], tmp_path: Path) -> None:
    """The gateway and workers get the service's own S3 user, never MinIO's root; createbuckets makes
    that user with a policy limited to the bucket (its script is run here with a stand-in `mc`)."""
    for gpu in (False, True):
        services = _topology(dotenv, gpu)["services"]
        root = _env(services["minio"])
        for name in ("gateway", "migrate", *(w for w in WORKERS if w in services)):
            env = _env(services[name])
            assert env["NNM_S3_ACCESS_KEY"] == dotenv["NNM_S3_ACCESS_KEY"] != root["MINIO_ROOT_USER"], name
            assert env["NNM_S3_SECRET_KEY"] == dotenv["NNM_S3_SECRET_KEY"] != root["MINIO_ROOT_PASSWORD"], name
            assert not {k for k in env if k.startswith("MINIO_")}, f"{name} sees MinIO's root credentials"
            assert root["MINIO_ROOT_PASSWORD"] not in json.dumps(env), f"{name} sees MinIO's root password"
    bucket = _env(_topology(dotenv, False)["services"]["createbuckets"])
    script = _topology(dotenv, False)["services"]["createbuckets"]["entrypoint"]
    assert script[0] == "sh"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "mc.log"
    (bin_dir / "mc").write_text(
        "#!/bin/sh\n"
        f'printf "%s\\n" "$*" >> "{log}"\n'
        'if [ "$1 $2 $3" = "admin policy create" ]; then cp "$6" "$TMPDIR/policy-seen.json"; fi\n'
    )
    (bin_dir / "mc").chmod(0o755)

    def run(env: dict[str, str]) -> subprocess.CompletedProcess:
        log.unlink(missing_ok=True)
        full = {"PATH": f"{bin_dir}:/usr/bin:/bin", "TMPDIR": str(tmp_path), **env}
        return subprocess.run(script, env=full, capture_output=True, text=True, timeout=30)

    done = run(bucket)
    assert done.returncode == 0, done.stderr
    calls = log.read_text().splitlines()
    user, secret, name = bucket["NNM_S3_ACCESS_KEY"], bucket["NNM_S3_SECRET_KEY"], bucket["NNM_S3_BUCKET"]
    assert calls[0] == f"alias set nnm http://minio:9000 {dotenv['MINIO_ROOT_USER']} {dotenv['MINIO_ROOT_PASSWORD']}"
    assert f"mb --ignore-existing nnm/{name}" in calls
    assert f"admin user add nnm {user} {secret}" in calls
    policy_name = next(c.split()[4] for c in calls if c.startswith("admin policy create"))
    assert f"admin policy attach nnm {policy_name} --user {user}" in calls
    policy = json.loads((tmp_path / "policy-seen.json").read_text())
    actions, resources = set(), set()
    for statement in policy["Statement"]:
        assert statement["Effect"] == "Allow"
        actions |= set(statement["Action"])
        resources |= set(statement["Resource"])
    assert resources == {f"arn:aws:s3:::{name}", f"arn:aws:s3:::{name}/*"}, resources
    assert all(a.startswith("s3:") and "*" not in a for a in actions), actions
    # What S3Store calls: bucket_exists/list (ListBucket), get/stat/presign, put (multipart too), remove.
    assert actions >= {"s3:ListBucket", "s3:GetObject", "s3:PutObject", "s3:DeleteObject"}
    # The service's user may not be the root user.
    refused = run({**bucket, "NNM_S3_ACCESS_KEY": dotenv["MINIO_ROOT_USER"]})
    assert refused.returncode != 0 and not (log.exists() and "admin" in log.read_text())


# ------------------------------------------------------------------------------------------ queues


def test_each_worker_takes_only_its_queues(dotenv: dict[str, str]) -> None:
    """CPU only: the CPU worker takes both queues (nobody else would train). With the GPU override:
    the CPU worker takes `cpu` only and the GPU worker `gpu` only (Kubernetes: tests/test_k8s.py)."""
    from nnm.service.queue import QUEUES

    alone = _topology(dotenv, gpu=False)["services"]
    assert [w for w in WORKERS if w in alone] == ["worker-cpu"]
    assert _queues(_worker_argv(alone["worker-cpu"])) == set(QUEUES)
    both = _topology(dotenv, gpu=True)["services"]
    assert _queues(_worker_argv(both["worker-cpu"])) == {"cpu"}, "the CPU worker still takes training jobs"
    assert _queues(_worker_argv(both["worker-gpu"])) == {"gpu"}


def test_the_gateway_knows_the_training_device_and_worker_liveness_skips_redis(dotenv: dict[str, str]) -> None:
    """The gateway fixes `auto` at submission from NNM_DEVICE, so it must name the device of the workers
    that take the `gpu` queue; and no worker's liveness probe goes through the broker."""
    alone = _topology(dotenv, gpu=False)["services"]
    both = _topology(dotenv, gpu=True)["services"]
    assert alone["gateway"]["environment"]["NNM_DEVICE"] == alone["worker-cpu"]["environment"]["NNM_DEVICE"] == "cpu"
    assert both["gateway"]["environment"]["NNM_DEVICE"] == both["worker-gpu"]["environment"]["NNM_DEVICE"] == "cuda"
    for services in (alone, both):
        for worker in (w for w in WORKERS if w in services):
            probe = " ".join(map(str, services[worker]["healthcheck"]["test"]))
            assert "nnm.service.worker.liveness" in probe and "inspect ping" not in probe, probe


# ------------------------------------------------------------------------------------------ SIGTERM


def test_sigterm_docs_say_what_the_code_does() -> None:
    """A worker's SIGTERM hands its running job back to the queue (celery_app.py, runner.py); it does
    not wait for the job. Every file that explains SIGTERM says that."""
    code = (REPO / "services/nnm/service/worker/celery_app.py").read_text()
    assert "running jobs are handed back to the queue" in code, "the code changed: update the docs and this test"
    docs = [REPO / "README.md", REPO / "deploy" / "README.md", COMPOSE, COMPOSE_GPU,
            REPO / "docker" / "cpu.Dockerfile", REPO / "docker" / "worker-gpu.Dockerfile",
            K8S / "base" / "worker-cpu.yaml", K8S / "overlays" / "gpu" / "worker-gpu.yaml"]
    for path in docs:
        text = " ".join(path.read_text().split()).replace("# ", "")
        assert "SIGTERM" in text, f"{path.relative_to(REPO)} does not say what SIGTERM does"
        assert not re.search(r"(?<!not )waits? (for|out) (the|its) running job", text, re.I), (
            f"{path.relative_to(REPO)} says SIGTERM waits for the running job")
        assert re.search(r"hand(s|ed)? (the |its )?(running )?job back|handed back|hand-back", text, re.I), (
            f"{path.relative_to(REPO)} does not say that the job is handed back to the queue")
